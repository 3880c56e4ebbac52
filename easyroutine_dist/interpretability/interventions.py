"""easyroutine's ``interpretability.interventions`` import path.

``Intervention`` is the record users build; how it is applied (easyroutine's InterventionManager and its
per-type hook builders) is internal here, see docs/compat.md.
"""

from ..intervention_spec import Intervention
from ..interventions import validate_interventions

__all__ = ["Intervention", "validate_interventions"]
