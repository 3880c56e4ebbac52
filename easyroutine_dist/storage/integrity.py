"""Is a run intact? Every shard of every committed part read and checksummed, with bounded parallelism.

:func:`verify_run` checks, for the run in one directory:

* the marker and every part record it lists (readable, valid, present);
* every shard a record names: present, of the recorded size, and matching its recorded checksum
  (:func:`.shards.read_shard` verifies; ``threads`` shards are in memory at once, at most);
* what :func:`.verify.scan_run` lists beside the committed data: orphans (attempts that lost a race, parts never
  committed), strays, unreferenced and invalid records.

``remove_orphans=True`` deletes only files no commit record references (:func:`.verify.remove_garbage`).
Used by ``QueryResult.verify`` and the CLI's ``verify``.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from ..errors import CorruptShardError, StorageError
from . import layout
from .fs import ObjectNotFoundError, Store, file_exists
from .runs import embedded_record, manifest_part_ids, read_manifest, read_record
from .shards import read_shard
from .verify import RunScan, remove_garbage, scan_run


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run: ``kind`` (corrupt, missing, size, record, orphan, uncommitted, stray,
    unreferenced, not-committed), the file (relative to the run directory) and a one-line message."""

    kind: str
    path: str
    message: str


@dataclass
class VerifyReport:
    """What :func:`verify_run` found in one run. ``intact``: no problem left (removed orphans are not problems)."""

    run_id: str
    url: str
    committed: bool
    parts: int = 0
    shards: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """One line: intact or how many problems, with what was checked."""
        what = (f"{self.parts} part(s), {self.shards} shard(s), {self.bytes} bytes checked"
                + (f", {len(self.removed)} orphaned file(s) removed" if self.removed else ""))
        if self.intact:
            return f"run {self.run_id} is intact: {what} ({self.url})"
        return f"run {self.run_id} has {len(self.problems)} problem(s): {what} ({self.url})"

    def lines(self) -> list[str]:
        """One line per problem, naming the file."""
        return [f"{p.kind}: {self.url}/{p.path}: {p.message}" for p in self.problems]


def _scan_problems(scan: RunScan) -> list[Problem]:
    out = [Problem("orphan", p, "no commit record references it (a losing or crashed attempt); "
                               "--remove-orphans deletes it") for p in scan.orphans]
    out += [Problem("uncommitted", p, "a shard of a part without a commit record (an attempt that crashed or "
                                      "is still running)") for p in scan.uncommitted]
    out += [Problem("stray", p, "a temporary or foreign file in the run folder") for p in scan.strays]
    out += [Problem("unreferenced", p, "a part record the run's marker does not list") for p in
            scan.unreferenced_records]
    out += [Problem("record", p, "the part record is unreadable or invalid") for p in scan.invalid_records]
    return out


def _check_shard(store: Store, rdir: str, sh: dict[str, Any]) -> Optional[Problem]:
    rel = f"shards/{sh['file']}"
    path = f"{rdir}/{rel}"
    try:
        size = int(store.fs.size(path))
    except FileNotFoundError:
        return Problem("missing", rel, "the shard a commit record names does not exist")
    except OSError as exc:
        return Problem("missing", rel, f"cannot be reached ({exc})")
    if size != int(sh.get("bytes", -1)):
        return Problem("size", rel, f"{size} bytes, the record says {sh.get('bytes')}")
    try:
        read_shard(store, path, sh)
    except ObjectNotFoundError:
        return Problem("missing", rel, "the shard a commit record names does not exist")
    except CorruptShardError as exc:
        return Problem("corrupt", rel, f"its bytes do not match the recorded checksum ({exc})")
    except StorageError as exc:
        return Problem("corrupt", rel, str(exc))
    return None


def verify_run(store: Store, rdir: str, run_id: Optional[str] = None, threads: int = 8,
               remove_orphans: bool = False) -> VerifyReport:
    """Check the run in ``rdir`` (a path in ``store``); see the module docstring. Never raises for a damaged run:
    every problem is in the report."""
    run_id = run_id or rdir.rstrip("/").rsplit("/", 1)[-1]
    committed = file_exists(store, f"{rdir}/{layout.RUN_MARKER}")
    report = VerifyReport(run_id, store.url(rdir), committed)
    scan = scan_run(store, rdir)
    problems = _scan_problems(scan)
    if not committed:
        problems.insert(0, Problem("not-committed", layout.RUN_MARKER,
                                   f"the run is not committed ({len(scan.parts)} part(s) have records); resume it "
                                   "or remove it"))
    else:
        shards: list[dict[str, Any]] = []
        try:
            manifest = read_manifest(store, rdir)
            ids = manifest_part_ids(manifest)
        except StorageError as exc:
            problems.append(Problem("record", layout.RUN_MARKER, str(exc)))
            ids, manifest = [], {}
        for i, pid in enumerate(ids):
            name = layout.record_name(pid)
            try:
                rec = (embedded_record(store, rdir, manifest["records"][i]) if manifest["schema_version"] == 1
                       else read_record(store, rdir, pid))
            except StorageError as exc:  # missing or invalid: reported once, the other parts are still checked
                if name not in {p.path for p in problems}:
                    problems.append(Problem("record", name, str(exc)))
                continue
            report.parts += 1
            shards.extend(rec["shards"])
        with ThreadPoolExecutor(max(1, int(threads)), thread_name_prefix="verify") as pool:
            found = list(pool.map(lambda sh: _check_shard(store, rdir, sh), shards))
        problems += [p for p in found if p is not None]
        report.shards = len(shards)
        report.bytes = sum(int(sh.get("bytes", 0)) for sh in shards)
    if remove_orphans:
        report.removed = remove_garbage(store, rdir, scan)
        gone = set(report.removed)
        problems = [p for p in problems if p.path not in gone]
    report.problems = problems
    return report


__all__ = ["Problem", "VerifyReport", "verify_run"]
