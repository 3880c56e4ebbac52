"""Tensors <-> safetensors shards on any fsspec store, with checksums (crc32c, or sha256) and ranged partial reads.

The safetensors format is written directly (8-byte little-endian header length, JSON header, raw bytes) so that
tensors stream to storage without an extra in-memory copy, and tensors are hashed by helper threads while bytes
are written. Files are standard safetensors: ``safetensors.torch.load`` reads them.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import json
import os
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Iterable

import google_crc32c

import torch

from ..cache import cat_rows
from ..errors import CorruptShardError, StorageError
from .fs import Store, as_storage_error, make_dirs, read_bytes, retrying, shard_store, sync, sync_dir

#: default shard size limit: well inside S3's 10,000-part multipart limit at s3fs' default 50 MiB blocks, and
#: the most memory an object-store upload copies at once
DEFAULT_MAX_SHARD_BYTES = 1024**3
_CHUNK = 8 * 1024**2

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code
_FROM_CODE = {v: k for k, v in _DTYPES.items()}


def _raw(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, without copying a contiguous cpu tensor."""
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[list[str]]:
    """Group keys into shards of at most ``max_bytes`` (a bigger single tensor gets a shard of its own)."""
    groups: list[list[str]] = []
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if not groups or (size + n > max_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    return groups


def _header(tensors: dict[str, torch.Tensor], order: list[str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, tuple[int, int]] = {}
    pos = 0
    for k in order:
        t = tensors[k]
        if t.dtype not in _DTYPES:
            raise StorageError(f"tensor {k!r} has dtype {t.dtype}, which safetensors cannot store.")
        n = t.numel() * t.element_size()
        meta[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        offsets[k] = (pos, pos + n)
        pos += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


#: the checksum new shards get; ``"sha256"`` stays selectable (``RunWriter(checksum=...)``) and readable
DEFAULT_CHECKSUM = "crc32c"
CHECKSUMS = ("crc32c", "sha256")


def _load_crc32c_extend() -> Callable[[int, int, int], int] | None:
    """``crc32c_extend(crc, address, length)`` of the library inside the google-crc32c wheel, called through ctypes:
    no copy of the buffer and no GIL held while it runs (the package's own ``value`` takes only ``bytes`` and copies
    a tensor's bytes first). None when the library is not found; :func:`_crc32c` then uses the package's API."""
    base = os.path.dirname(os.path.dirname(os.path.abspath(google_crc32c.__file__)))
    for path in sorted(glob.glob(os.path.join(base, "google_crc32c.libs", "libcrc32c*.so*"))):
        try:
            fn = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        return fn
    return None


_CRC32C_EXTEND = _load_crc32c_extend() if google_crc32c.implementation == "c" else None


def _crc32c(view: memoryview | bytes) -> str:
    """crc32c of ``view`` as 8 hex digits (big-endian)."""
    n = len(view)
    if _CRC32C_EXTEND is not None and isinstance(view, memoryview) and not view.readonly and n >= 1 << 16:
        crc = _CRC32C_EXTEND(0, ctypes.addressof((ctypes.c_char * n).from_buffer(view)), n)
    elif isinstance(view, bytes):
        crc = google_crc32c.value(view)
    else:  # 8 MiB copies: the package releases the GIL on bytes of 1 MiB or more
        crc = 0
        for i in range(0, n, _CHUNK):
            crc = google_crc32c.extend(crc, bytes(view[i:i + _CHUNK]))
    return f"{crc:08x}"


def _sha(view: memoryview | bytes) -> str:
    return hashlib.sha256(view).hexdigest()  # releases the GIL on large buffers: runs beside the writes


_DIGEST: dict[str, Callable[[memoryview | bytes], str]] = {"crc32c": _crc32c, "sha256": _sha}


def check_checksum(name: Any) -> str:
    """``name`` if it is a checksum this version writes and reads; else StorageError naming the choices."""
    if name not in _DIGEST:
        raise StorageError(f"unknown checksum {name!r}: use one of {', '.join(CHECKSUMS)} (default "
                           f"{DEFAULT_CHECKSUM!r}).")
    return str(name)


def record_checksum(record: dict[str, Any]) -> str:
    """The algorithm of a shard record: its ``checksum`` field; records written before the field existed are
    sha256."""
    return check_checksum(record.get("checksum", "sha256"))


def shard_digest(header: bytes, tensor_digests: list[str], checksum: str = "sha256") -> str:
    """The shard's digest: ``H(header bytes || digest of each tensor's bytes, in file order)`` with ``H`` the
    shard's checksum (crc32c or sha256).

    Header and tensor bytes cover every byte of a safetensors file, so this digest changes with any byte of the
    shard, and it lets tensors be hashed in parallel and ranged reads be verified per tensor.
    """
    return _DIGEST[checksum](header + b"".join(bytes.fromhex(d) for d in tensor_digests))


def _new_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="shard-checksum")


_POOL = _new_pool()


def _renew_pool_in_child() -> None:
    """A forked child (e.g. a DataLoader worker) has none of the parent's threads: a copied pool would take work and
    never run it. The child gets a pool of its own."""
    global _POOL
    _POOL = _new_pool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_pool_in_child)


def write_shard(store: Store, path: str, tensors: dict[str, torch.Tensor],
                checksum: str = DEFAULT_CHECKSUM) -> dict[str, Any]:
    """Write ``tensors`` (contiguous, cpu) as one safetensors file; return its JSON record.

    Record: ``{"file", "bytes", "checksum": C, C: shard digest, "header_bytes", "header_" + C, "tensors": {key:
    digest}}`` with ``C`` the algorithm (``"crc32c"`` by default, or ``"sha256"``), digests as hex strings.
    Local files are streamed to a temporary name and renamed; object stores get one ``pipe_file`` (the object
    appears whole when the upload completes).
    """
    # widest dtypes first keeps every tensor aligned to its element size without padding
    digest = _DIGEST[check_checksum(checksum)]
    order = sorted(tensors, key=lambda k: -tensors[k].element_size())
    head, _ = _header(tensors, order)
    views = {k: _raw(tensors[k]) for k in order}
    futures = {k: _POOL.submit(digest, views[k]) for k in order}
    target = f"{path}.tmp-{uuid.uuid4().hex}" if store.is_local else path
    total = len(head)
    try:
        if store.is_local:
            make_dirs(store, os.path.dirname(path))
            with open(target, "wb") as f:
                f.write(head)
                for k in order:
                    data = views[k]
                    for i in range(0, len(data), _CHUNK):
                        f.write(data[i:i + _CHUNK])
                    total += len(data)
                sync(store, f)
        else:
            # object stores: one pipe_file (single PUT, or s3fs' concurrent multipart upload for big shards);
            # the object appears whole when the upload completes
            blob = b"".join([head, *(views[k] for k in order)])  # one extra copy of one shard, at most max_shard_bytes
            total = len(blob)

            def put() -> None:
                try:
                    store.fs.pipe_file(target, blob)  # a whole object, replaced whole: safe to retry
                except Exception as exc:
                    err = as_storage_error(exc, f"cannot write shard {store.url(path)}")
                    if err is exc:
                        raise
                    raise err from exc

            retrying(put, f"writing shard {store.url(path)}", write=True)  # 503s, resets, timeouts, outages
            del blob
        digests = {k: futures[k].result() for k in order}
        if store.is_local:
            os.replace(target, path)
            sync_dir(store, os.path.dirname(path))
    except OSError as exc:
        raise StorageError(f"cannot write shard {store.url(path)}: {exc}") from exc
    finally:
        for fut in futures.values():
            fut.cancel()
        if store.is_local and os.path.exists(target):
            os.unlink(target)
    return {
        "file": path.rsplit("/", 1)[-1],
        "bytes": total,
        "checksum": checksum,
        checksum: shard_digest(head, [digests[k] for k in order], checksum),
        "header_bytes": len(head),
        f"header_{checksum}": digest(head),
        "tensors": digests,
    }


def view_memory(owner: Any, address: int, nbytes: int) -> memoryview:
    """A writable byte view of ``nbytes`` at ``address``, memory that ``owner`` holds; the view keeps ``owner``
    alive. Only for memory its owner does not move or free while it lives (bytes, a tensor storage)."""
    arr = (ctypes.c_char * nbytes).from_address(address)
    arr._owner = owner  # type: ignore[attr-defined]
    return memoryview(arr).cast("B")


def _alias(data: bytes) -> memoryview:
    """``data``'s own memory as a writable byte view, without copying (it keeps ``data`` alive). Only for bytes
    nothing else refers to and that are only read: it lets tensors view them and crc32c run without the GIL."""
    if not data:
        return memoryview(bytearray())
    return view_memory(data, ctypes.cast(data, ctypes.c_void_p).value, len(data))


def _parse_header(raw: bytes, where: str) -> tuple[int, dict[str, Any]]:
    if len(raw) < 8:
        raise CorruptShardError(f"shard {where} is truncated ({len(raw)} bytes); delete the run or re-save it.")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError as exc:
        raise CorruptShardError(f"shard {where} has an unreadable header ({exc}).") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def _tensor_from(buf: bytearray | memoryview, start: int, spec: dict[str, Any], key: str, where: str) -> torch.Tensor:
    dtype = _FROM_CODE.get(spec["dtype"])
    if dtype is None:
        raise CorruptShardError(f"shard {where}: tensor {key!r} has unknown dtype {spec['dtype']!r}.")
    shape = spec["shape"]
    b, e = spec["data_offsets"]
    if e - b == 0:
        return torch.empty(shape, dtype=dtype)
    count = (e - b) // dtype.itemsize
    if (start + b) % dtype.itemsize:  # unaligned (files written elsewhere): copy to an aligned buffer
        return torch.frombuffer(bytearray(buf[start + b:start + e]), dtype=dtype, count=count).reshape(shape)
    return torch.frombuffer(buf, dtype=dtype, count=count, offset=start + b).reshape(shape)


def read_shard(store: Store, path: str, record: dict[str, Any], keys: Iterable[str] | None = None,
               copy: bool = True, gate: ContextManager[Any] | None = None) -> dict[str, torch.Tensor]:
    """Read a shard (all tensors, or only ``keys`` by byte ranges), checking the bytes read against the digests in
    ``record`` (its ``checksum`` algorithm; sha256 when the record has none). ``copy=False``: a whole-shard read
    returns views of the fetched bytes themselves (one copy of the shard less), for callers that only read them.
    ``gate``: held around each request only (a semaphore bounds requests in flight, not the checks after them).

    Raises CorruptShardError naming the shard when bytes do not match what was recorded at save time.
    """
    where = store.url(path)
    gate = gate or nullcontext()
    store = shard_store(store)  # every byte fetched is checked below: no second check by the transport
    algo = record_checksum(record)
    digest = _DIGEST[algo]
    wanted = list(record["tensors"]) if keys is None else [k for k in record["tensors"] if k in set(keys)]
    if not wanted:
        return {}
    if len(wanted) == len(record["tensors"]):
        with gate:
            fetched = read_bytes(store, path, size=int(record["bytes"]))
        data = bytearray(fetched) if copy else _alias(fetched)
        hb = record["header_bytes"]
        bad = len(data) != record["bytes"]
        if not bad:
            head = bytes(data[:hb])
            start, header = _parse_header(head, where)
            order = sorted(record["tensors"], key=lambda k: header[k]["data_offsets"][0] if k in header else -1)
            view = memoryview(data)
            spans = [view[hb + header[k]["data_offsets"][0]:hb + header[k]["data_offsets"][1]] if k in header else None
                     for k in order]
            if algo == "crc32c":  # GB/s without the GIL: here, saving a thread hop per tensor
                digests = [digest(v) if v is not None else "" for v in spans]
            else:  # sha256: the tensors' digests side by side
                futs = [_POOL.submit(digest, v) if v is not None else None for v in spans]
                digests = [f.result() if f is not None else "" for f in futs]
            bad = shard_digest(head, digests, algo) != record.get(algo)
        if bad:
            raise CorruptShardError(
                f"shard {where} is corrupted or truncated: {len(data)} bytes, expected {record['bytes']} with "
                f"{algo} {str(record.get(algo))[:16]}...; the run cannot be trusted, re-save it."
            )
        return {k: _tensor_from(data, start, header[k], k, where) for k in wanted}  # header checked above
    # partial: the header, then one ranged read per run of adjacent wanted tensors
    with gate:
        head = read_bytes(store, path, 0, record["header_bytes"])
    if digest(head) != record.get(f"header_{algo}"):
        raise CorruptShardError(f"shard {where}: header does not match its recorded {algo} (corrupted).")
    start, header = _parse_header(head, where)
    spans = sorted((header[k]["data_offsets"][0], header[k]["data_offsets"][1], k) for k in wanted)
    groups: list[list[tuple[int, int, str]]] = []
    for span in spans:
        if groups and groups[-1][-1][1] == span[0]:
            groups[-1].append(span)
        else:
            groups.append([span])
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        lo, hi = g[0][0], g[-1][1]
        with gate:
            buf = bytearray(read_bytes(store, path, start + lo, start + hi)) if hi > lo else bytearray()
        if len(buf) != hi - lo:
            raise CorruptShardError(f"shard {where} is truncated: range [{start + lo}, {start + hi}) is short.")
        for b, e, k in g:
            if digest(memoryview(buf)[b - lo:e - lo]) != record["tensors"][k]:
                raise CorruptShardError(f"shard {where}: tensor {k!r} does not match its recorded {algo} (corrupted).")
            out[k] = _tensor_from(buf, -lo, header[k], k, where)
    return {k: out[k] for k in wanted}


def read_part_shards(store: Store, shard_dir: str, shards: list[dict[str, Any]],
                     keys: Iterable[str] | None = None, rows: int | None = None, copy: bool = True,
                     gate: ContextManager[Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one part from its shard records (all keys, or only ``keys``), each shard verified.

    Shards without ``"rows"`` hold whole keys (a part written at once: its keys split over shards). Shards with
    ``"rows": [a, b]`` (a streamed part) hold rows ``a..b`` of their keys; their row ranges must tile ``0..rows``
    with no gap nor overlap (and end at ``rows``, the part record's row count, when given), and every such key is
    concatenated on dim 0 in row order. ``[rows, ...]`` per key. ``copy``, ``gate``: as :func:`read_shard`.
    """
    wanted = None if keys is None else list(keys)
    out: dict[str, torch.Tensor] = {}
    spans: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for sh in shards:
        got = read_shard(store, f"{shard_dir}/{sh['file']}", sh, wanted, copy, gate)
        span = sh.get("rows")
        if span is None:
            out.update(got)
        else:
            spans.setdefault((int(span[0]), int(span[1])), {}).update(got)
    if not spans:
        return out
    order = sorted(spans)
    names = {k for s in order for k in spans[s]}
    where = f"{store.url(shard_dir)} ({shards[0].get('file')}...)"
    if order[0][0] != 0 or any(a[1] != b[0] for a, b in zip(order, order[1:])) or \
            (rows is not None and order[-1][1] != int(rows)):
        expected = "" if rows is None else f" to row {int(rows)} (the part's record)"
        raise CorruptShardError(f"the streamed shards of part {where} cover rows {order}, not one contiguous range "
                                f"from row 0{expected}; the run is damaged, re-save it.")
    for (a, b), got in spans.items():
        bad = [k for k in names if k not in got or got[k].dim() == 0 or got[k].shape[0] != b - a]
        if bad:
            raise CorruptShardError(f"part {where}: keys {sorted(bad)[:5]} are missing or not {b - a} rows in the "
                                    f"shard of rows {a}..{b}; the run is damaged, re-save it.")
    out.update({k: cat_rows([spans[s][k] for s in order]) if len(order) > 1 else spans[order[0]][k]
                for k in names})
    return out
