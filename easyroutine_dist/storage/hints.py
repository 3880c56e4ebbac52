"""Why a query found nothing, when the reason is where it looked: a base dir or an experiment that does not exist.

A query that matched no run of an existing experiment is a plain empty result; these hints are for the cases
where the user most likely looked in the wrong place (a typo in ``base_dir`` or ``experiment_name``).
"""

from __future__ import annotations

from typing import Any, Optional

from .fs import Store, exists


def where_problem(store: Store, catalog: Any, experiment: Optional[str]) -> Optional[str]:
    """A one-line reason when ``store``'s root does not exist, or ``experiment`` (None: any) has no runs there;
    None when the place exists (then an empty result means nothing matched)."""
    root = store.url(store.root)
    if store.protocol != "memory" and not exists(store, store.root):
        return (f"base dir {root} does not exist (nothing was saved there); pass the base dir the runs were saved "
                "to (e.g. --base-dir ./runs).")
    experiments = catalog.experiments()
    if experiment is None:
        return None if experiments else f"base dir {root} holds no committed run in any experiment."
    if experiment not in experiments:
        known = ", ".join(repr(e) for e in experiments[:20]) or "none"
        return (f"experiment {experiment!r} has no committed run in {root} (experiments there: {known}); "
                "pass one of them, or '*' for all.")
    return None


__all__ = ["where_problem"]
