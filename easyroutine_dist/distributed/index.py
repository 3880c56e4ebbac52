"""MetadataIndex: a named, detached Ray actor that answers ActivationLoader queries for the runs of a cluster.

It wraps one :class:`~easyroutine_dist.storage.catalog.Catalog` per storage root and holds nothing it cannot
rebuild: its state is the catalog in storage, loaded on first use of a root (after a start or a restart). The
driver registers each run right after ``commit_run``. ``ActivationLoader.query`` asks it through the storage
query-provider hook when a cluster is reachable; otherwise (no Ray, no index, the index restarting for longer
than :data:`QUERY_TIMEOUT_S`, an in-memory store) the loader reads the catalog in storage, which is the same data.
Every failure to reach the index is logged at WARNING once per cause (logger ``easyroutine_dist.distributed.index``)
until the index answers again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from ..errors import ConfigError
from ..storage.catalog import Catalog
from ..storage.fs import Store, resolve
from ..storage.providers import register_query_provider, take_changed
from ..storage.selection import select
from .credentials import credential_fingerprint, public_options, secret_paths

INDEX_NAME = "easyroutine_dist_index"
INDEX_NAMESPACE = "easyroutine_dist"
#: seconds a query (or a run's registration) waits for the index before going on without it: a query then reads
#: the catalog in storage; a restarting or unreachable index costs a query at most about this
QUERY_TIMEOUT_S = 2.0
#: storage roots the index holds in memory at once (least recently used evicted; an evicted root reloads from
#: storage on its next query)
MAX_ROOTS = 8
#: seconds the index trusts an experiment's listing (from its end) before listing it again (object stores: one LIST
#: per 1,000 runs). Runs registered through the index are seen at once; runs committed by writers that bypass it
#: (no Ray, another cluster) within this bound plus one listing's time. A process' own adds and removals are seen
#: by its next query (it asks for a refresh). Set ``EASYROUTINE_DIST_INDEX_TRUST_S`` where the index is created.
TRUST_S = 2.0
TRUST_ENV = "EASYROUTINE_DIST_INDEX_TRUST_S"
_LOG = logging.getLogger(__name__)
_WARNED: set[str] = set()
_WARN_LOCK = threading.Lock()


def _warn_once(cause: str, msg: str, *args: Any) -> None:
    """Log ``msg`` at WARNING the first time ``cause`` happens (DEBUG afterwards) until the index answers again."""
    with _WARN_LOCK:
        first = cause not in _WARNED
        _WARNED.add(cause)
    (_LOG.warning if first else _LOG.debug)(msg, *args)


def _answered() -> None:
    with _WARN_LOCK:
        _WARNED.clear()


class MetadataIndex:
    """Catalog entries of every storage root the cluster writes to, served from memory.

    It holds no credentials: callers send the non-secret storage options only (endpoint, region, anon...) and the
    index reads storage with its own environment's credentials (env vars, instance role, mounted profile). A
    catalog is rebuilt when those credentials change (rotation), keeping nothing older than the current ones.
    """

    def __init__(self, max_roots: int = MAX_ROOTS, trust_s: float = TRUST_S) -> None:
        # root key -> (credential digest, catalog), least recently used first; at most max_roots held
        self._catalogs: OrderedDict[str, tuple[str, Catalog]] = OrderedDict()
        self.max_roots = max_roots
        self.trust_s = trust_s  # an experiment listed less than trust_s ago is not listed again (Catalog.trust_s)
        self.started_at = time.time()
        self.registered = 0
        self.queries = 0
        self.node_id = _node_id()  # a local path is served only to callers on this node (its disk)

    def _catalog(self, base_url: str, storage_options: Optional[dict[str, Any]]) -> Catalog:
        found = secret_paths(storage_options)
        if found:  # the index must hold none; callers strip them (public_options)
            raise ConfigError(f"the metadata index takes no credentials (got {', '.join(found)} for {base_url}); "
                              "it reads storage with its own environment's credentials.")
        key = root_key(base_url, storage_options)
        creds = credential_fingerprint()
        held = self._catalogs.get(key)
        if held is None or held[0] != creds:  # first use since (re)start or eviction, or rotated credentials
            cat = Catalog(resolve(base_url, storage_options), trust_s=self.trust_s)
            self._catalogs[key] = (creds, cat)
            while len(self._catalogs) > self.max_roots:  # least recently used first; it reloads from storage
                self._catalogs.popitem(last=False)
        else:
            cat = held[1]
        self._catalogs.move_to_end(key)
        return cat

    def entries(self, base_url: str, storage_options: Optional[dict[str, Any]],
                experiment: Optional[str]) -> list[dict[str, Any]]:
        """Entries of one experiment (or all with None), oldest first. Ships them all: prefer :meth:`query`."""
        return self._catalog(base_url, storage_options).entries(experiment)

    def _elsewhere(self, base_url: str, caller_node: Optional[str]) -> bool:
        """True when the caller of a local ``base_url`` (callers send ``caller_node`` for local paths only) runs on
        another node: this index would read its own node's disk, not the caller's, so it declines and the caller
        reads its catalog itself. A local root is thus keyed by its path and the node that owns it."""
        return caller_node is not None and self.node_id is not None and caller_node != self.node_id

    def query(self, base_url: str, storage_options: Optional[dict[str, Any]], experiment: Optional[str],
              criteria: dict[str, Any], caller_node: Optional[str] = None,
              refresh: bool = False) -> Optional[dict[str, Any]]:
        """``{"count": n, "entries": [...]}``: the entries matching normalised ``criteria``, oldest first.

        Evaluated here by :func:`~easyroutine_dist.storage.selection.select`, the loader's own code, so the answer
        is the one the loader would compute and its size grows with the matches, not with the archive. A listing
        is trusted for ``trust_s`` seconds; ``refresh`` (a caller that changed the experiment itself) lists again."""
        if self._elsewhere(base_url, caller_node):
            return None
        self.queries += 1
        catalog = self._catalog(base_url, storage_options)
        if refresh:
            catalog.forget(experiment)
        found = select(catalog, experiment, criteria)
        return {"count": len(found), "entries": found}

    def find_run(self, base_url: str, storage_options: Optional[dict[str, Any]], run_id: str,
                 experiment: Optional[str] = None, caller_node: Optional[str] = None) -> Optional[list[dict[str, Any]]]:
        """The entries of run ``run_id`` (``Catalog.find_run``: one read per experiment, not one per run)."""
        if self._elsewhere(base_url, caller_node):
            return None
        return self._catalog(base_url, storage_options).find_run(run_id, experiment)

    def register(self, base_url: str, storage_options: Optional[dict[str, Any]], entry: dict[str, Any],
                 caller_node: Optional[str] = None) -> int:
        """Note a freshly committed run (its catalog entry is already in storage) in O(1) (``Catalog.note``);
        returns the runs of its experiment held in memory (-1: a local path of another node, not held here)."""
        if self._elsewhere(base_url, caller_node):
            return -1
        self.registered += 1
        return self._catalog(base_url, storage_options).note(entry)

    def rebuild(self, base_url: str, storage_options: Optional[dict[str, Any]]) -> int:
        """Rescan the run markers of a root (``Catalog.rebuild``); returns the number of runs."""
        return self._catalog(base_url, storage_options).rebuild()

    def status(self) -> dict[str, Any]:
        roots = sorted({json.loads(k)[0] for k in self._catalogs})
        return {"pid": os.getpid(), "started_at": self.started_at, "roots": roots,
                "registered": self.registered, "queries": self.queries, "max_roots": self.max_roots,
                "node_id": self.node_id, "trust_s": self.trust_s}


def _node_id() -> Optional[str]:
    """The Ray node this process runs on; None outside Ray."""
    try:
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - no runtime context: not on a Ray node
        return None


def root_key(base_url: str, storage_options: Optional[dict[str, Any]]) -> str:
    """The index's key of a storage root: its URL and non-secret options (two endpoints, two roots)."""
    return json.dumps([base_url, storage_options or {}], sort_keys=True, default=repr)


def store_key(store: Store) -> Optional[str]:
    """The URL the index knows a store by; None for stores other processes cannot see (memory://)."""
    if store.protocol == "memory":
        return None
    return store.url(store.root)


def trust_from_env() -> float:
    """``EASYROUTINE_DIST_INDEX_TRUST_S`` (seconds >= 0) or :data:`TRUST_S`; ConfigError naming it when invalid."""
    raw = os.environ.get(TRUST_ENV)
    if raw is None or not raw.strip():
        return TRUST_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise ConfigError(f"{TRUST_ENV}={raw!r} is not allowed: give the seconds (a number >= 0) the metadata "
                          f"index trusts a listing before listing again, e.g. {TRUST_S} (0: list on every query).")
    return value


def get_index(create: bool = True) -> Optional[Any]:
    """The index actor handle (created if missing and ``create``); None when Ray is down or it does not exist."""
    if not ray.is_initialized():
        return None
    if create:
        return ray.remote(MetadataIndex).options(
            name=INDEX_NAME, namespace=INDEX_NAMESPACE, lifetime="detached", get_if_exists=True,
            max_restarts=-1, max_task_retries=-1, num_cpus=0).remote(trust_s=trust_from_env())
    try:
        return ray.get_actor(INDEX_NAME, namespace=INDEX_NAMESPACE)
    except ValueError:
        return None


def register_run(store: Store, entry: dict[str, Any], timeout_s: float = QUERY_TIMEOUT_S) -> bool:
    """Tell the index about a committed run; False (not an error) when the index cannot be reached."""
    key = store_key(store)
    if key is None or not ray.is_initialized():
        return False
    try:
        index = get_index(create=True)
        if index is None:
            return False
        ray.get(index.register.remote(key, public_options(store.storage_options), entry,
                                        caller_node=_node_id() if store.is_local else None),
                timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the catalog in storage already has the run; the index is derived
        _warn_once(f"register:{type(exc).__name__}", "the metadata index did not take run %s within %.1f s "
                   "(%s: %s); queries still find it in the catalog in storage", entry.get("run_id"), timeout_s,
                   type(exc).__name__, exc)
        return False
    _answered()
    return True


def _query_provider(store: Store, experiment: Optional[str],
                    criteria: Optional[dict[str, Any]] = None) -> Optional[list[dict[str, Any]]]:
    """The entries matching ``criteria`` (None: all), evaluated inside the index; None when it cannot answer."""
    answer = _ask("query", store, experiment, dict(criteria or {}), refresh=take_changed(store, experiment))
    return None if answer is None else answer["entries"]


def find_run(store: Store, run_id: str, experiment: Optional[str] = None) -> list[dict[str, Any]]:
    """The catalog entries of ``run_id``: from the index when it answers, else one catalog read per experiment."""
    found = _ask("find_run", store, run_id, experiment)
    return Catalog(store).find_run(run_id, experiment) if found is None else found


def _ask(method: str, store: Store, *args: Any, **kwargs: Any) -> Any:
    key = store_key(store)
    if key is None or not ray.is_initialized() or secret_paths(store.storage_options):
        return None  # a caller with its own secrets reads the catalog itself: they never reach the index
    deadline = time.monotonic() + QUERY_TIMEOUT_S
    while True:
        try:
            index = get_index(create=False)
            if index is None:
                return None
            answer = ray.get(getattr(index, method).remote(key, public_options(store.storage_options), *args,
                                                           caller_node=_node_id() if store.is_local else None,
                                                           **kwargs),
                             timeout=max(0.1, deadline - time.monotonic()))
        except (ActorUnavailableError, RayActorError) as exc:
            if time.monotonic() + 0.2 < deadline:
                time.sleep(0.2)  # killed or restarting (max_restarts=-1): ask the new incarnation
                continue
            _warn_once(f"query:{type(exc).__name__}", "the metadata index did not answer within %.1f s (%s: %s); "
                       "reading the catalog in storage instead", QUERY_TIMEOUT_S, type(exc).__name__, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a broken index must never fail a query; the catalog is the truth
            _warn_once(f"query:{type(exc).__name__}", "the metadata index failed (%s: %s); reading the catalog in "
                       "storage instead", type(exc).__name__, exc)
            return None
        _answered()
        return answer


def index_reachable() -> bool:
    """True when Ray is initialised and the named index actor exists."""
    return get_index(create=False) is not None


register_query_provider("ray-metadata-index", _query_provider)
