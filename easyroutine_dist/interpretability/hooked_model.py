"""easyroutine's ``interpretability.hooked_model`` import path (re-exports; one implementation each)."""

from ..compat import HookedModelConfig
from ..config import ExtractionConfig
from ..hooked_model import HookedModel

__all__ = ["ExtractionConfig", "HookedModel", "HookedModelConfig"]
