"""Query providers: optional sources of catalog entries that ActivationLoader.query asks before the catalog.

Storage never imports Ray. ``easyroutine_dist.distributed`` registers a provider that answers from the
metadata-index actor when a Ray cluster is reachable; a provider returns ``None`` to decline (no cluster, index
down, other storage root), and the loader then reads the catalog in storage as usual.
"""

from __future__ import annotations

import inspect
import logging
import threading
from typing import Any, Callable, Optional

from .fs import Store

#: ``provider(store, experiment or None for all, criteria) -> matching entries (oldest first) | None``; criteria
#: are normalised (``query.build_criteria``) and evaluated with ``selection.select``, as the loader would
QueryProvider = Callable[[Store, Optional[str], dict[str, Any]], Optional[list[dict[str, Any]]]]

_LOCK = threading.Lock()
_PROVIDERS: dict[str, QueryProvider] = {}
_LOG = logging.getLogger(__name__)
_WARNED: set[tuple[str, str]] = set()
_CHANGED: set[tuple[str, str]] = set()  # (root URL, experiment) this process changed since its last query


def _root(store: Store) -> str:
    return store.url(store.root)


def mark_changed(store: Store, experiment: str) -> None:
    """Note that this process added, moved or removed a run of ``experiment`` (``Catalog.add``/``discard``): a
    provider that caches listings (the metadata index trusts one for a few seconds) is asked to re-list it on this
    process' next query, so a process always sees its own changes."""
    with _LOCK:
        _CHANGED.add((_root(store), experiment))


def take_changed(store: Store, experiment: Optional[str]) -> bool:
    """True (once) when this process changed ``experiment`` (None: any experiment) of ``store`` since the last call."""
    root = _root(store)
    with _LOCK:
        hit = {k for k in _CHANGED if k[0] == root and (experiment is None or k[1] == experiment)}
        _CHANGED.difference_update(hit)
    return bool(hit)


def register_query_provider(name: str, provider: QueryProvider) -> None:
    """Register (or replace) the provider called ``name``."""
    with _LOCK:
        _PROVIDERS[name] = provider


def unregister_query_provider(name: str) -> None:
    with _LOCK:
        _PROVIDERS.pop(name, None)


def provided_entries(store: Store, experiment: Optional[str],
                     criteria: Optional[dict[str, Any]] = None) -> Optional[list[dict[str, Any]]]:
    """Entries matching ``criteria`` (None or {}: all) from the first provider that answers, or None when none does
    (read the catalog then).

    A provider that raises is treated as declining (a broken index must never make a query fail), with a WARNING
    the first time each provider fails with each kind of error.
    """
    with _LOCK:
        providers = list(_PROVIDERS.items())
    for name, provider in providers:
        try:
            if _takes_criteria(provider):
                entries = provider(store, experiment, dict(criteria or {}))
            else:  # a provider written before criteria were sent: all entries (the loader filters them)
                entries = provider(store, experiment)
        except Exception as exc:  # noqa: BLE001 - fall back to the catalog, which is always authoritative
            cause = (name, type(exc).__name__)
            with _LOCK:
                first = cause not in _WARNED
                _WARNED.add(cause)
            (_LOG.warning if first else _LOG.debug)("query provider %r failed (%s: %s); reading the catalog in "
                                                    "storage instead", name, type(exc).__name__, exc)
            entries = None
        if entries is not None:
            return entries
    return None


def _takes_criteria(provider: Callable[..., Any]) -> bool:
    try:
        inspect.signature(provider).bind(None, None, {})
    except TypeError:
        return False
    except ValueError:  # no signature (a builtin): assume the current protocol
        return True
    return True
