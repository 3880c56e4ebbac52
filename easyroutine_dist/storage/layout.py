"""Run layout: names that cannot escape the base directory, run ids, and where every file lives.

```
<root>/<experiment>/<model_slug>/<run_id>/metadata.json            written at begin_run (provenance)
<root>/<experiment>/<model_slug>/<run_id>/shards/part-00017-0003-<attempt>.safetensors   (attempt: 16 hex)
<root>/<experiment>/<model_slug>/<run_id>/records/part-00017.json  partition commit marker
<root>/<experiment>/<model_slug>/<run_id>/_SUCCESS                 run commit marker (JSON manifest), last
<root>/_catalog/<experiment>/<run_id>.json                         catalog entry (derived)
<root>/_catalog/_snapshots/<experiment>.json                        compacted catalog (derived, a cache)
```
"""

from __future__ import annotations

import re
import secrets
import time
from datetime import datetime

from ..errors import MetadataError

CATALOG_DIR = "_catalog"
SNAPSHOT_DIR = "_snapshots"
RUN_MARKER = "_SUCCESS"
METADATA_FILE = "metadata.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@ -]{0,199}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._+=@-]+$")
_RUN_ID_RE = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}-\d{6}_[0-9a-f]{8}$")
#: shard file names: ``part-PPPPP-SSSS-<attempt>.safetensors``; runs written before attempts had no ``-<attempt>``
_SHARD_RE = re.compile(r"^part-(\d{5,7})-(\d{4})(?:-[0-9a-f]{16})?\.safetensors$")
#: part ids are in [0, MAX_PARTS): names pad them to 5 digits (runs written before issue 10 have 5), up to 7
MAX_PARTS = 10_000_000
_ATTEMPT_RE = re.compile(r"^[0-9a-f]{16}$")


def check_experiment(name: object) -> str:
    """Return ``name`` if it is a safe experiment name, else raise MetadataError."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(" ") or ".." in name:
        raise MetadataError(
            f"experiment name {name!r} is not allowed: use 1-200 letters, digits, spaces and ._+=@- , starting "
            "with a letter or digit, without '..' or '/' (names must not escape base_dir)."
        )
    return name


def check_tag(tag: object) -> str | None:
    """Tags are metadata only, never paths; they must still be plain strings without control characters."""
    if tag is None:
        return None
    if not isinstance(tag, str) or any(ord(c) < 32 for c in tag) or len(tag) > 1000:
        raise MetadataError(f"tag {tag!r} must be a string of at most 1000 printable characters (or None).")
    return tag


def model_slug(model_name: object) -> str:
    """Directory name for a model: ``"org/name"`` -> ``"org--name"``; '..' segments are refused."""
    if model_name is None:
        return "unknown-model"
    if not isinstance(model_name, str) or not model_name.strip():
        raise MetadataError(f"model name {model_name!r} must be a non-empty string.")
    segments = [s for s in model_name.replace("\\", "/").split("/") if s]
    if any(s in (".", "..") for s in segments) or "\x00" in model_name:
        raise MetadataError(f"model name {model_name!r} contains '.' or '..' path segments; refused (path traversal).")
    bad = [s for s in segments if not _SEGMENT_RE.match(s)]
    if bad or not segments:
        raise MetadataError(
            f"model name {model_name!r}: segments {bad} may only contain letters, digits and ._+=@- ."
        )
    slug = "--".join(segments)
    if len(slug) > 200:
        raise MetadataError(f"model name {model_name!r} is longer than 200 characters.")
    return slug


def new_run_id(now: float | None = None) -> tuple[str, str, float]:
    """Return ``(run_id, save_time, unix_time)``; ids sort by time and carry 32 random bits."""
    t = time.time() if now is None else now
    dt = datetime.fromtimestamp(t)
    save_time = dt.strftime("%Y-%m-%d_%H-%M-%S")
    run_id = f"{save_time}-{dt.microsecond:06d}_{secrets.token_hex(4)}"
    return run_id, save_time, t


def check_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not _RUN_ID_RE.match(run_id):
        raise MetadataError(f"{run_id!r} is not a run id (expected 'YYYY-MM-DD_HH-MM-SS-ffffff_xxxxxxxx').")
    return run_id


def all_run_ids(values: list) -> bool:
    """True when :func:`check_run_id` accepts every value (one pass in C: bulk checks of names read back)."""
    try:
        return all(map(_RUN_ID_RE.match, values))
    except TypeError:  # a value that is not a str
        return False


def run_rel(experiment: str, slug: str, run_id: str) -> str:
    return f"{experiment}/{slug}/{run_id}"


def new_attempt() -> str:
    """A fresh attempt token (64 random bits, 16 hex digits): every attempt at a part writes its own shard names."""
    return secrets.token_hex(8)


def shard_name(part_id: int, index: int, attempt: str | None = None) -> str:
    """``shards/part-PPPPP-SSSS-<attempt>.safetensors`` (``attempt=None``: the fixed name of runs written before
    attempt tokens existed, which stay readable)."""
    if attempt is None:
        return f"shards/part-{part_id:05d}-{index:04d}.safetensors"
    if not isinstance(attempt, str) or not _ATTEMPT_RE.match(attempt):
        raise MetadataError(f"attempt token {attempt!r} must be 16 lowercase hex digits (layout.new_attempt()).")
    return f"shards/part-{part_id:05d}-{index:04d}-{attempt}.safetensors"


def check_shard_file(name: object, part_id: int | None = None) -> str:
    """Return ``name`` if it is a shard file name this layout writes (of part ``part_id`` when given), else raise
    MetadataError. Shard names read back from part records are used as paths only after this check."""
    m = _SHARD_RE.match(name) if isinstance(name, str) else None
    if m is None:
        raise MetadataError(f"shard file name {name!r} is not allowed: expected 'part-PPPPP-SSSS-<16 hex>.safetensors'"
                            " (or 'part-PPPPP-SSSS.safetensors'); a name read back from storage is never used as a "
                            "path unless it matches.")
    if m.group(1) != f"{int(m.group(1)):05d}":  # one name per part: part-012345 would alias part-12345
        raise MetadataError(f"shard file name {name!r} is not allowed: its part id is not written as this layout "
                            "writes it (5 digits, more only when needed).")
    if part_id is not None and int(m.group(1)) != part_id:
        raise MetadataError(f"shard file {name!r} does not belong to part {part_id}.")
    return name


def check_entry(entry: object) -> dict:
    """Return a catalog entry / run metadata dict whose names (experiment, run id, model) are all safe path parts,
    else raise MetadataError naming the field. Every entry read back from storage goes through this."""
    if not isinstance(entry, dict):
        raise MetadataError(f"a catalog entry must be a JSON object, got {type(entry).__name__}.")
    check_experiment(entry.get("experiment_name"))
    check_run_id(entry.get("run_id"))
    model_slug(entry.get("model_name"))
    return entry


def record_name(part_id: int) -> str:
    return f"records/part-{part_id:05d}.json"


def check_part_id(part_id: object) -> int:
    if not isinstance(part_id, int) or isinstance(part_id, bool) or not 0 <= part_id < MAX_PARTS:
        raise MetadataError(f"part id {part_id!r} must be an int in [0, {MAX_PARTS}).")
    return part_id
