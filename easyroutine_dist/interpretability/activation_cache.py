"""easyroutine's ``interpretability.activation_cache`` import path (re-exports; one implementation each)."""

from ..cache import ActivationCache
from ..compat import ValueWithInfo

__all__ = ["ActivationCache", "ValueWithInfo"]
