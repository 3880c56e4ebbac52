"""The easyroutine-compatible public surface: change ``easyroutine.interpretability`` to this import path."""

from ..architectures import ArchSpec, register
from ..cache import ActivationCache
from ..config import ExtractionConfig
from ..hooked_model import HookedModel
from ..intervention_spec import Intervention

__all__ = ["ActivationCache", "ArchSpec", "ExtractionConfig", "HookedModel", "Intervention", "register"]
