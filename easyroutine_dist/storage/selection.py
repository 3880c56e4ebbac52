"""Query evaluation over a catalog: the one code path the loader and the metadata-index actor both run.

:func:`select` picks candidates with the catalog's equality index on the most selective exact criterion it can
use (tag, then a custom key, then the model name) and filters them with :func:`.query.compile_criteria`, so the
cost is O(candidates), not O(runs), and an answer from the index actor is the same list the loader would compute.
"""

from __future__ import annotations

from typing import Any, Optional

from .catalog import Catalog
from .query import compile_criteria


def candidates(catalog: Catalog, experiment: Optional[str], crit: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries that may match ``crit`` (a superset, oldest first): an index lookup when one criterion allows it."""
    if experiment is not None:
        found = None
        if "tag" in crit:
            found = catalog.lookup(experiment, "tag", crit["tag"])
        elif crit.get("custom_keys"):
            key, value = next(iter(crit["custom_keys"].items()))
            found = catalog.lookup(experiment, "other_metadata", value, subkey=key)
        elif "model_name" in crit:
            found = catalog.lookup(experiment, "model_name", crit["model_name"])
        if found is not None:
            return found
    return catalog.entries(experiment)


def select(catalog: Catalog, experiment: Optional[str], crit: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries of ``experiment`` (None: every experiment) matching normalised criteria (``build_criteria``),
    oldest first."""
    pred = compile_criteria(crit)
    return [e for e in candidates(catalog, experiment, crit) if pred(e)]


__all__ = ["candidates", "select"]
