"""What workers on several nodes must share: a local ``base_dir`` has to be one folder that every node mounts.

The driver writes a run's ``metadata.json`` before any partition is scheduled. A worker whose ``base_dir`` is a
local path looks for that file (once per run) before it writes anything: when its node does not see it, the
folder is not shared with the driver's node, and the worker refuses the partition with a ConfigError naming the
node, the folder and the fix, instead of writing parts the driver would never find. A shared filesystem that
shows a new file late (NFS attribute caches) gets ``SHARED_WAIT_S`` seconds. No Ray here.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from ..errors import ConfigError
from ..storage import layout

#: how long a worker waits for the driver's metadata.json to appear on a shared filesystem
SHARED_WAIT_S = 60.0
_SEEN: set[tuple[str, str]] = set()


def check_shared_run_dir(store: Any, run: Any, wait_s: float | None = None) -> None:
    """Raise ConfigError when ``store`` is local and this node does not see ``run``'s ``metadata.json`` (written by
    the driver) within ``wait_s`` seconds (default ``SHARED_WAIT_S``); object stores pass at once."""
    if not store.is_local or (store.root, run.run_id) in _SEEN:
        return
    run_path = store.path(run.rel)
    deadline = time.monotonic() + (SHARED_WAIT_S if wait_s is None else wait_s)
    while True:
        try:  # listing the folder (not a bare stat) makes NFS revalidate it
            if layout.METADATA_FILE in os.listdir(run_path):
                _SEEN.add((store.root, run.run_id))
                return
        except FileNotFoundError:
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise ConfigError(
        f"base_dir {store.root!r} is a local folder that node {socket.gethostname()} does not share with the "
        f"driver: run {run.run_id}'s metadata.json, which the driver wrote there, is not in {run_path} on this "
        "node. With workers on several nodes, base_dir must be a filesystem every node mounts at the same path "
        "(NFS, Lustre, a cloud file share) or object storage (s3://...); this worker wrote nothing.")


def alive_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to (1 when Ray is not initialised)."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive")) if ray.is_initialized() else 1


def check_local_base_dir(store: Any, shared: bool) -> None:
    """Before anything is written: raise ConfigError when ``store`` is a local folder and the cluster has several
    alive nodes, unless the user declared the folder ``shared`` (each node would otherwise keep its own workers'
    shards, and the driver would never see them). Object stores pass."""
    if not store.is_local or shared:
        return
    nodes = alive_nodes()
    if nodes > 1:
        raise ConfigError(
            f"base_dir {store.root!r} is a local folder and the Ray cluster has {nodes} nodes: each node's workers "
            "would write their shards on that node's own disk. Use object storage (s3://...), or, if this path is "
            "one filesystem every node mounts (NFS, Lustre, a cloud file share), pass "
            "DistributedExtractor(..., shared_base_dir=True) (CLI: --shared-base-dir; job YAML: shared_base_dir: true). "
            "Nothing was written.")


__all__ = ["SHARED_WAIT_S", "alive_nodes", "check_local_base_dir", "check_shared_run_dir"]
