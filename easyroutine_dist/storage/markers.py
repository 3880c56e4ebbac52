"""Run markers (``_SUCCESS``) read back: the one module both the catalog and the run writer use to parse them.

It exists to keep the import graph one-way (issue 10 item 6): ``runs`` owns committing a run, including the
commit-time catalog update (it imports ``catalog``); ``catalog`` reads run markers (``rebuild``, fallbacks) through
this module and never imports ``runs``.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import MetadataError, StorageError
from . import layout
from .fs import Store, read_bytes

#: run markers this version reads: 1 embeds every part record, 2 references ``records/part-PPPPP.json`` by part id,
#: 3 is 2 whose part records may hold row-range shards (streamed parts)
READABLE_SCHEMA_VERSIONS = (1, 2, 3)


def read_manifest(store: Store, run_dir: str) -> dict[str, Any]:
    """The raw JSON of a run's ``_SUCCESS`` marker, schema 1, 2 or 3 (StorageError when the run is not committed)."""
    raw = read_bytes(store, f"{run_dir}/{layout.RUN_MARKER}")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"run marker {store.url(run_dir)}/_SUCCESS is unreadable ({exc}).") from None
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise StorageError(f"run marker {store.url(run_dir)}/_SUCCESS has schema_version {version!r}; this version "
                           f"of easyroutine_dist reads {list(READABLE_SCHEMA_VERSIONS)} (upgrade it).")
    listed = manifest.get("parts") if version >= 2 else manifest.get("records")
    if not isinstance(listed, list) or not isinstance(manifest.get("metadata"), dict):
        raise StorageError(f"run marker {store.url(run_dir)}/_SUCCESS has no metadata or part list; the run is "
                           "damaged.")
    if version >= 2:
        try:
            for p in listed:
                layout.check_part_id(p)
        except MetadataError as exc:
            raise StorageError(f"run marker {store.url(run_dir)}/_SUCCESS is refused: {exc}") from None
    return manifest


__all__ = ["READABLE_SCHEMA_VERSIONS", "read_manifest"]
