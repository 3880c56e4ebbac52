"""Reading a run's part records once, in parallel, for a driver that needs them all (the remote logit lens)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

#: concurrent record reads (each is one small GET on object stores)
READ_THREADS = 16


def read_all(records: Sequence[dict[str, Any]], threads: int = READ_THREADS) -> list[dict[str, Any]]:
    """Every item of ``records`` (e.g. a lazy ``runs.PartRecords``, which reads an item from storage on each
    access), each read exactly once, ``threads`` at a time, in order. Costs one record's memory per part."""
    n = len(records)
    if n <= 1 or threads <= 1:
        return [records[i] for i in range(n)]
    with ThreadPoolExecutor(min(threads, n)) as pool:
        return list(pool.map(records.__getitem__, range(n)))


__all__ = ["READ_THREADS", "read_all"]
