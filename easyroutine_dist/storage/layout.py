"""Run layout: names that cannot escape the base directory, run ids, and where every file lives.

```
<root>/<experiment>/<model_slug>/<run_id>/metadata.json            written at begin_run (provenance)
<root>/<experiment>/<model_slug>/<run_id>/shards/part-00017-0003.safetensors
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


def run_rel(experiment: str, slug: str, run_id: str) -> str:
    return f"{experiment}/{slug}/{run_id}"


def shard_name(part_id: int, index: int) -> str:
    return f"shards/part-{part_id:05d}-{index:04d}.safetensors"


def record_name(part_id: int) -> str:
    return f"records/part-{part_id:05d}.json"


def check_part_id(part_id: object) -> int:
    if not isinstance(part_id, int) or isinstance(part_id, bool) or not 0 <= part_id < 100_000:
        raise MetadataError(f"part id {part_id!r} must be an int in [0, 100000).")
    return part_id
