"""Query providers: optional sources of catalog entries that ActivationLoader.query asks before the catalog.

Storage never imports Ray. ``easyroutine_dist.distributed`` registers a provider that answers from the
metadata-index actor when a Ray cluster is reachable; a provider returns ``None`` to decline (no cluster, index
down, other storage root), and the loader then reads the catalog in storage as usual.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

from .fs import Store

#: ``provider(store, experiment or None for all) -> entries (oldest first) | None``
QueryProvider = Callable[[Store, Optional[str]], Optional[list[dict[str, Any]]]]

_LOCK = threading.Lock()
_PROVIDERS: dict[str, QueryProvider] = {}


def register_query_provider(name: str, provider: QueryProvider) -> None:
    """Register (or replace) the provider called ``name``."""
    with _LOCK:
        _PROVIDERS[name] = provider


def unregister_query_provider(name: str) -> None:
    with _LOCK:
        _PROVIDERS.pop(name, None)


def provided_entries(store: Store, experiment: Optional[str]) -> Optional[list[dict[str, Any]]]:
    """Entries from the first provider that answers, or None when none does (read the catalog then).

    A provider that raises is treated as declining: a broken index must never make a query fail.
    """
    with _LOCK:
        providers = list(_PROVIDERS.values())
    for provider in providers:
        try:
            entries = provider(store, experiment)
        except Exception:  # noqa: BLE001 - fall back to the catalog, which is always authoritative
            entries = None
        if entries is not None:
            return entries
    return None
