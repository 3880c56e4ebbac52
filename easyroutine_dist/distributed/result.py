"""What ``DistributedExtractor.extract`` and ``logit_lens`` return."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DistributedRun:
    """What ``extract`` returns: where the run is and what this call did.

    ``recomputed``: partitions computed by this call; ``skipped``: partitions already committed (resume);
    ``retried``: partition attempts lost to worker deaths and redone. ``worker_seconds``: time spent inside
    workers (tokenise, forward, lens, write, commit part) summed over partitions; ``commit_seconds``: the driver's
    run commit (listing part records, writing ``_SUCCESS`` and the catalog entry, registering with the index).
    ``bytes_written``: shard bytes this call wrote; ``workers``: where each worker ran (node, node id, GPUs, the
    partitions it computed), as in the ``run_committed`` event (:mod:`.events`).
    """

    run_id: str
    experiment: str
    model_name: str
    url: str
    n_rows: int
    n_partitions: int
    recomputed: int
    skipped: int
    retried: int
    seconds: float
    resumed: bool = False
    worker_seconds: float = 0.0
    commit_seconds: float = 0.0
    bytes_written: int = 0
    workers: tuple = ()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
