"""What a run tells its job log: one event per step, as one plain line each or one JSON object each.

Events (``event`` field of the JSON form), in order:

* ``run_started``: the run id is allocated *before* the workers load the model, so a job killed while loading
  can still be resumed; carries the exact resume command (``resume_command``).
* ``workers_ready``: the workers loaded the model; where each runs (node, GPUs) and the run's URL.
* ``part_committed``: a worker committed one partition (rows, bytes, seconds, worker).
* ``part_retried``: a partition was lost with its worker and goes to another attempt.
* ``run_committed``: the run is published; carries the summary: partitions total / skipped (committed by an
  earlier attempt) / computed / retried, rows, bytes written, wall time and where each worker ran.
* ``run_failed``: the run stopped; committed partitions are kept, ``resume_command`` finishes it.

Events are records of the ``easyroutine_dist.events`` logger (level INFO) whose ``event`` attribute holds the
JSON object; their message is the plain line. :func:`easyroutine_dist.joblog.log_handler` formats them for a job
log: ``"plain"`` (the line, never wrapped) or ``"json"`` (one object per line). No Ray here.
"""

from __future__ import annotations

import collections
import datetime
import logging
import re
import time
from typing import Any, Callable, Optional

from ..joblog import LOG_FORMATS, JsonFormatter, PlainFormatter, log_handler  # noqa: F401 (re-exported)

LOGGER_NAME = "easyroutine_dist.events"
_LOG = logging.getLogger(LOGGER_NAME)


def python_resume(kind: str, run_id: str) -> str:
    """How to resume from Python: ``extract(..., run_id='<id>', resume=True)``."""
    return f"{kind}(..., run_id={run_id!r}, resume=True)"


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def worker_place(index: int, info: dict[str, Any]) -> dict[str, Any]:
    """Where worker ``index`` runs, from ``ExtractionWorker.info()``: node name, IP and Ray node id, GPU ids, pid."""
    return {"worker": index, "node": info.get("node"), "node_ip": info.get("node_ip"),
            "node_id": info.get("node_id"), "gpus": [str(g) for g in info.get("gpu_ids") or []],
            "pid": info.get("pid")}


def _place_text(place: dict[str, Any]) -> str:
    where = [str(place.get("node_ip") or "")] if place.get("node_ip") else []
    if place.get("node_id"):
        where.append(f"node id {str(place['node_id'])[:12]}")
    gpus = ",".join(place.get("gpus") or []) or "none"
    extra = f" ({', '.join(where)})" if where else ""
    return f"node {place.get('node')}{extra}, GPUs {gpus}"


class RunEvents:
    """The events of one ``extract`` / ``logit_lens`` call, and the counters its summary reports.

    ``resume_command(run_id)`` gives the command that resumes the run (the CLI passes its own command line);
    without it the events name the Python call.
    """

    def __init__(self, kind: str, run_id: str, experiment: str, storage_url: str, resume: bool = False,
                 resume_command: Optional[Callable[[str], str]] = None) -> None:
        self.kind, self.run_id, self.experiment, self.storage_url = kind, run_id, experiment, storage_url
        self.resume = bool(resume)
        self.resume_command = resume_command(run_id) if resume_command else python_resume(kind, run_id)
        self.url: Optional[str] = None
        self.t0 = time.perf_counter()
        self.places: list[dict[str, Any]] = []
        self.parts_by_worker: collections.Counter = collections.Counter()
        self.bytes_written = 0
        self.computed = 0
        self.total: Optional[int] = None
        self.closed = False
        self.t_started = self.t0

    def guard(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``; an exception it raises (interrupts included) is logged as ``run_failed``, then re-raised."""
        try:
            return fn(*args)
        except BaseException as exc:
            self.failed(exc)
            raise

    # ------------------------------------------------------------------ emitting
    def _emit(self, event: str, line: str, **fields: Any) -> None:
        body = {"event": event, "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "kind": self.kind, "run_id": self.run_id, "experiment": self.experiment, **fields}
        _LOG.info("%s", line, extra={"event": body})

    def _line(self, line: str) -> None:
        """A plain line only (its facts are in an event's JSON already): the JSON format leaves it out."""
        _LOG.info("%s", line, extra={"plain_only": True})

    # ------------------------------------------------------------------ the events
    def started(self, n_rows: Optional[int] = None, partition_size: Optional[int] = None,
                n_partitions: Optional[int] = None) -> None:
        """Before the model loads: the run id, where it goes and how to resume it."""
        if n_partitions is None and n_rows is not None and partition_size:
            n_partitions = -(-int(n_rows) // int(partition_size))
        self.total = n_partitions
        self.t_started = time.perf_counter()
        size = ", ".join(x for x in (f"{n_rows} rows" if n_rows is not None else "",
                                     f"{n_partitions} partitions" if n_partitions is not None else "") if x)
        what = "resuming" if self.resume else "started"
        self._emit("run_started", f"run {self.run_id} {what}: {self.kind} into experiment {self.experiment!r} of "
                                  f"{self.storage_url}{f' ({size})' if size else ''}; if this job stops, resume "
                                  f"it with: {self.resume_command}",
                   resume=self.resume, storage=self.storage_url, n_rows=n_rows, n_partitions=n_partitions,
                   resume_command=self.resume_command)

    def workers_ready(self, infos: list[dict[str, Any]], url: str) -> None:
        """The workers hold the model (``seconds``: since ``run_started``); ``url`` is the run's folder."""
        self.url = url
        seconds = time.perf_counter() - self.t_started
        self.places = [worker_place(i, info) for i, info in enumerate(infos)]
        nodes = {p.get("node_id") or p.get("node") for p in self.places}
        self._emit("workers_ready", f"run {self.run_id}: {len(self.places)} worker(s) ready on {len(nodes)} node(s) "
                                    f"in {seconds:.1f} s, writing to {url}",
                   url=url, seconds=round(seconds, 3), workers=self.places)
        for p in self.places:
            self._line(f"run {self.run_id}: worker {p['worker']} on {_place_text(p)}")

    def part_committed(self, worker: int, res: dict[str, Any]) -> None:
        """A worker's answer for one partition (``skipped``: an earlier attempt had committed it)."""
        n_bytes = int(res.get("bytes") or 0)
        if not res.get("skipped"):
            self.computed += 1
            self.parts_by_worker[worker] += 1
            self.bytes_written += n_bytes
        done = f"{self.computed} computed" + (f" of {self.total} partitions" if self.total is not None else "")
        how = "found committed by an earlier attempt" if res.get("skipped") else "committed"
        self._emit("part_committed", f"run {self.run_id}: part {res.get('part_id')} {how} ({res.get('rows')} rows, "
                                     f"{human_bytes(n_bytes)}, {float(res.get('seconds') or 0):.2f} s) by worker "
                                     f"{worker}; {done}",
                   part_id=res.get("part_id"), rows=res.get("rows"), bytes=n_bytes, skipped=bool(res.get("skipped")),
                   seconds=round(float(res.get("seconds") or 0), 3), worker=worker)

    def part_retried(self, worker: int, part_id: int, attempt: int, max_attempts: int, error: BaseException) -> None:
        """Partition ``part_id`` was lost with ``worker`` (a process death); it is scheduled again."""
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        self._emit("part_retried", f"run {self.run_id}: part {part_id} lost with worker {worker} (attempt {attempt} "
                                   f"of {max_attempts}: {type(error).__name__}: {reason}); retrying",
                   part_id=part_id, worker=worker, attempt=attempt, max_attempts=max_attempts,
                   error=f"{type(error).__name__}: {reason}")

    def failed(self, error: BaseException) -> None:
        """The run stopped before its commit (once per run)."""
        if self.closed:
            return
        self.closed = True
        lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
        reason = (lines[0][:400] + (f" ... {lines[-1][:300]}" if len(lines) > 1 else "")) if lines else "(no message)"
        self._emit("run_failed", f"run {self.run_id} failed after {time.perf_counter() - self.t0:.1f} s "
                                 f"({type(error).__name__}: {reason}); committed partitions are kept, resume it "
                                 f"with: {self.resume_command}",
                   error=f"{type(error).__name__}: {reason}", resume_command=self.resume_command,
                   computed=self.computed, bytes_written=self.bytes_written)

    def summary(self, run: Any) -> dict[str, Any]:
        """The end-of-run summary of a :class:`DistributedRun` (what ``run_committed`` carries)."""
        workers = [{**p, "partitions": self.parts_by_worker.get(p["worker"], 0)} for p in self.places]
        return {"url": run.url, "resumed": bool(run.resumed), "partitions": {
                    "total": run.n_partitions, "skipped": run.skipped, "computed": run.recomputed,
                    "retried": run.retried},
                "rows": run.n_rows, "bytes_written": self.bytes_written, "wall_seconds": round(run.seconds, 3),
                "workers": workers}

    def finish(self, run: Any) -> Any:
        """Log ``run_committed`` for the :class:`DistributedRun` ``run``; return it with ``bytes_written`` and
        ``workers`` filled in."""
        import dataclasses

        self.committed(run)
        s = self.summary(run)
        return dataclasses.replace(run, bytes_written=s["bytes_written"], workers=tuple(s["workers"]))

    def committed(self, run: Any) -> None:
        """The run is published: ``run_committed`` with the summary (plain: the summary lines follow)."""
        self.closed = True
        s = self.summary(run)
        p = s["partitions"]
        self._emit("run_committed", f"run {self.run_id} committed at {run.url}", **s)
        self._line(f"run {self.run_id} summary: {p['total']} partitions: {p['skipped']} skipped (already "
                   f"committed), {p['computed']} computed, {p['retried']} retried; {s['rows']} rows; "
                   f"{human_bytes(s['bytes_written'])} written; {run.seconds:.1f} s wall time")
        for w in s["workers"]:
            n = w["partitions"]
            self._line(f"run {self.run_id} summary: worker {w['worker']} on {_place_text(w)}: {n} "
                       f"partition{'' if n == 1 else 's'} computed")


__all__ = ["LOGGER_NAME", "LOG_FORMATS", "JsonFormatter", "PlainFormatter", "RunEvents", "human_bytes",
           "log_handler", "python_resume", "worker_place"]
