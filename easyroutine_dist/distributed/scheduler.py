"""Partition scheduling over worker actors: dynamic, failure-tolerant, one small record back per partition."""

from __future__ import annotations

import collections
import time
from typing import Any, Callable, Iterator, Optional

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError, WorkerCrashedError

from ..errors import DistributedError
from ..storage.fs import StorageUnavailableError
from ..storage.runs import RunHandle
from .partitions import PartitionSpec

#: a worker process died or is restarting: the partition is redone (Ray's own retries are off, max_task_retries=0)
ACTOR_ERRORS = (RayActorError, ActorUnavailableError, WorkerCrashedError)


class _StorageFault(Exception):
    """A partition's storage calls still failed after their retries (StorageUnavailableError in the worker): the
    partition is re-queued like one lost to a worker death, within ``max_part_attempts``."""


def schedule(workers: list[Any], submit: Callable[[Any, Any], Any], parts: Iterator[Any], run: RunHandle,
             stop_after: Optional[int], bar: Any, max_in_flight: int, max_part_attempts: int,
             max_worker_restarts: int, on_result: Optional[Callable[[dict[str, Any]], None]] = None,
             events: Any = None) -> tuple[int, int, int, int, float]:
    """Dynamic scheduling of ``parts`` over ``workers``: least-loaded first, at most ``max_in_flight`` each; a part
    lost to a worker death is redone (up to ``max_part_attempts``), and a dead worker gets no work until it
    answers a ping. Returns ``(rows, recomputed, skipped, retried, worker_seconds)``; ``bar`` counts rows;
    ``on_result(answer)`` sees each part's answer (e.g. its self-check); ``events`` (a ``RunEvents``) logs each
    committed and each retried part with the index of its worker."""
    live = list(range(len(workers)))
    load = collections.Counter({w: 0 for w in live})
    recovering: dict[Any, int] = {}  # ping ref -> worker that died or is restarting
    attempts: collections.Counter = collections.Counter()
    retry: collections.deque = collections.deque()
    in_flight: dict[Any, tuple[int, Any]] = {}
    rows = recomputed = skipped = retried = 0
    busy = 0.0
    exhausted = False

    def next_part() -> Any:
        nonlocal exhausted
        if retry:
            return retry.popleft()
        if exhausted:
            return None
        part = next(parts, None)
        exhausted = part is None
        return part

    def resume_hint() -> str:
        return (f"committed parts are kept; resume with extract(..., run_id={run.run_id!r}, resume=True) "
                f"(experiment {run.experiment!r}).")

    while True:
        while live:
            w = min(live, key=lambda i: load[i])
            if load[w] >= max_in_flight:
                break
            part = next_part()
            if part is None:
                break
            in_flight[submit(workers[w], part)] = (w, part)
            load[w] += 1
        work_left = bool(retry) or not exhausted
        if not in_flight and (not recovering or not work_left):
            if work_left:
                raise DistributedError(f"run {run.run_id}: every worker died and none can restart (max_restarts="
                                       f"{max_worker_restarts}); " + resume_hint())
            break
        done, _ = ray.wait(list(in_flight) + list(recovering), num_returns=1)
        ref = done[0]
        if ref in recovering:  # a worker answered (back in service) or is gone for good
            w = recovering.pop(ref)
            try:
                ray.get(ref)
                live.append(w)
            except ActorUnavailableError:
                time.sleep(0.2)  # still restarting (reloading its model)
                recovering[workers[w].ping.remote()] = w
            except ACTOR_ERRORS:
                pass  # restarts exhausted: the worker is dropped
            continue
        w, part = in_flight.pop(ref)
        load[w] -= 1
        try:
            try:
                res = ray.get(ref)
            except RayTaskError as exc:
                if isinstance(exc.cause, StorageUnavailableError):  # storage still failing after its retries
                    raise _StorageFault(exc.cause) from exc
                raise
        except (*ACTOR_ERRORS, _StorageFault) as exc:
            pid = part.part_id if isinstance(part, PartitionSpec) else part[1]["part_id"]
            attempts[pid] += 1
            retried += 1
            if attempts[pid] >= max_part_attempts:
                raise DistributedError(f"run {run.run_id}: partition {pid} failed {attempts[pid]} times "
                                       f"(last: {exc}); " + resume_hint()) from exc
            if events is not None:
                events.part_retried(w, pid, attempts[pid], max_part_attempts, exc)
            if isinstance(exc, _StorageFault):  # the worker is fine: the partition goes back in the queue
                retry.append(part)
                continue
            if w in live:  # no new work until it answers a ping; its other queued parts fail the same way
                live.remove(w)
                recovering[workers[w].ping.remote()] = w
            retry.append(part)
            continue
        except RayTaskError as exc:
            raise DistributedError(f"run {run.run_id}: a partition failed on a worker: {exc.cause!r}; fix the "
                                   "cause, then " + resume_hint()) from exc
        if on_result is not None:
            on_result(res)
        if events is not None:
            events.part_committed(w, res)
        rows += int(res["rows"])
        bar.update(int(res["rows"]))
        busy += float(res.get("seconds", 0.0))
        if res["skipped"]:
            skipped += 1
        else:
            recomputed += 1
        if stop_after is not None and recomputed >= stop_after:
            ray.wait(list(in_flight), num_returns=len(in_flight))  # let queued parts land, like a real crash
            raise DistributedError(f"run {run.run_id}: stopped after {recomputed} partitions (_stop_after_parts "
                                   "test hook); " + resume_hint())
    return rows, recomputed, skipped, retried, busy
