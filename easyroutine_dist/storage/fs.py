"""fsspec plumbing: resolve a base directory or URL, atomic writes and exclusive creates.

Credentials given in ``storage_options`` are handed to fsspec and kept in memory only; nothing in this
package ever writes them to storage.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import random
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import fsspec

from ..errors import StorageError

_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")
#: attempts of a read that failed for another reason than "not found" (a 503, a reset connection), and the first
#: back-off between them (doubled each time): 4 attempts wait 0.05 + 0.1 + 0.2 s at most
READ_ATTEMPTS = 4
RETRY_DELAY_S = 0.05
#: writes and commits (shards, part records, run markers, catalog entries): more attempts and a longer back-off,
#: so that a store that throttles (503 SlowDown) or is unreachable for ~10 s does not fail a partition. Each wait is
#: ``min(RETRY_MAX_DELAY_S, WRITE_RETRY_DELAY_S * 2**i)`` times a random factor in [0.5, 1] (jitter): at most
#: 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 + 5 = 16.2 s of waiting over 8 attempts
WRITE_ATTEMPTS = 8
WRITE_RETRY_DELAY_S = 0.2
RETRY_MAX_DELAY_S = 5.0

#: error codes and messages that no retry can fix: the run fails at once with :class:`StorageAccessError`
_FATAL_MARKERS = ("AccessDenied", "Access Denied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                  "InvalidToken", "TokenRefreshRequired", "NoSuchBucket", "bucket does not exist",
                  "AllAccessDisabled", "Unable to locate credentials", "NoCredentialsError", "InvalidBucketName")


class ObjectNotFoundError(StorageError):
    """The object does not exist (as opposed to a read that failed: see :func:`retrying`)."""


class StorageAccessError(StorageError):
    """Storage refused the call for a reason no retry can fix (access denied, missing bucket, bad or missing
    credentials): raised at once, never retried, and a distributed run gives up instead of re-queueing."""


class StorageUnavailableError(StorageError):
    """A storage call still failed after every retry (throttling, resets, timeouts, an outage): transient by
    nature, so a distributed run re-queues the partition (bounded attempts) like a worker death."""


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out and len(out) < 16:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return out


def is_fatal(exc: BaseException, write: bool = False) -> bool:
    """True when ``exc`` (or what caused it) is an error that retrying cannot fix: a permission error, an error code
    or message of :data:`_FATAL_MARKERS`, or, for a write, a missing bucket/directory (FileNotFoundError)."""
    for e in _chain(exc):
        if isinstance(e, PermissionError) or (write and isinstance(e, FileNotFoundError)):
            return True
        text = f"{type(e).__name__}: {e}"
        if any(m in text for m in _FATAL_MARKERS):
            return True
    return False


#: exception modules of the S3 client stack whose errors are storage errors (not programming errors)
_IO_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs", "asyncio", "socket", "ssl")


def as_storage_error(exc: BaseException, what: str) -> BaseException:
    """``exc`` as a StorageError saying ``what`` failed when it is an I/O error (OSError, a timeout, an error of
    the S3 client stack); any other exception is returned unchanged (re-raised as it is)."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, (OSError, TimeoutError)) or type(exc).__module__.split(".")[0] in _IO_MODULES:
        return StorageError(f"{what}: {type(exc).__name__}: {exc}")
    return exc


def _reraise(exc: BaseException, what: str) -> None:
    """Raise ``exc`` as a StorageError (:func:`as_storage_error`) when it is an I/O error; else return."""
    err = as_storage_error(exc, what)
    if err is not exc:
        raise err from exc


def _backoff(i: int, base: float) -> float:
    return min(RETRY_MAX_DELAY_S, base * 2**i) * random.uniform(0.5, 1.0)


_MEMORY_LOCK = threading.Lock()  # memory:// is one process; a lock makes its exclusive create exact


@dataclass
class Store:
    """A resolved storage root: the fsspec filesystem and the root path inside it."""

    fs: Any
    root: str
    protocol: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    #: local disk only: fsync files before publishing them and their directories after (survives power loss, not
    #: just process crashes)
    durable: bool = False
    #: the store shard reads go through (see :func:`shard_store`), made on first use
    _shards: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def is_local(self) -> bool:
        return self.protocol in ("file", "local")

    def path(self, *parts: str) -> str:
        """Join ``parts`` under the root with '/'."""
        return "/".join([self.root.rstrip("/"), *[p.strip("/") for p in parts if p]])

    def url(self, path: str) -> str:
        """A user-facing location for ``path`` (plain path for local disk, ``proto://`` otherwise)."""
        if self.is_local:
            return path
        return f"{self.protocol}://{path.lstrip('/')}" if self.protocol != "memory" else f"memory://{path}"


def _protocol_of(fs: Any) -> str:
    proto = fs.protocol
    return proto[0] if isinstance(proto, (tuple, list)) else str(proto)


def resolve(base_dir: str | Path, storage_options: dict[str, Any] | None = None) -> Store:
    """Resolve a local path or fsspec URL (``file://``, ``s3://``, ``memory://``) to a :class:`Store`.

    For ``s3://`` the endpoint comes from ``storage_options`` or ``AWS_ENDPOINT_URL``; credentials from
    ``storage_options`` (key/secret/token) or the standard AWS environment variables.
    """
    opts = dict(storage_options or {})
    url = str(base_dir)
    if url.startswith("s3://") or url.startswith("s3a://"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        ck = dict(opts.get("client_kwargs") or {})
        if endpoint and "endpoint_url" not in opts and "endpoint_url" not in ck:
            ck["endpoint_url"] = endpoint
        if ck:
            opts["client_kwargs"] = ck
        opts.setdefault("skip_instance_cache", True)
        # other processes (workers, the index actor, other savers) change the bucket: a cached listing would
        # hide their runs or show removed ones, so every listing and existence check asks the endpoint
        opts.setdefault("use_listings_cache", False)
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError, TypeError) as exc:
        raise StorageError(f"cannot open storage at {url!r}: {exc}") from exc
    proto = _protocol_of(fs)
    if proto in ("file", "local"):
        root = os.path.abspath(root)
    return Store(fs=fs, root=root.rstrip("/") or "/", protocol=proto, storage_options=opts)


#: botocore's switch for checking a response's CRC32 against the checksum header the endpoint sends
_RESPONSE_CRC = "response_checksum_validation"
_SHARDS_LOCK = threading.Lock()


def shard_store(store: Store) -> Store:
    """The store to fetch shard bytes through. On S3: (1) a client that does not compute botocore's CRC32 of each
    response: every byte a shard read returns is checked against the digest recorded when the shard was written
    (crc32c or sha256, :func:`..shards.read_shard`), end to end, so the transport's own CRC32 was a second pass over
    the same bytes in the client's event-loop thread (a quarter of its CPU time in the streaming reader); other
    reads (JSON metadata, which carries no digest of ours) keep botocore's default, and a ``config_kwargs`` that
    sets ``response_checksum_validation`` itself is kept as given; (2) byte ranges fetched by botocore's blocking
    client, one request per calling thread (:mod:`.s3_reads`: half the CPU of s3fs's event loop), where the
    store's options allow. Other stores are returned as they are."""
    if store.protocol not in ("s3", "s3a"):
        return store
    if store._shards is None:
        opts = dict(store.storage_options)
        config = dict(opts.get("config_kwargs") or {})
        if _RESPONSE_CRC in config or not _botocore_knows(_RESPONSE_CRC):
            shards = replace(store)
        else:
            opts["config_kwargs"] = {**config, _RESPONSE_CRC: "when_required"}
            shards = resolve(store.url(store.root), opts)
        from .s3_reads import blocking_reads

        blocking = blocking_reads(shards.fs, opts)
        if blocking is not None:
            shards.fs = blocking
        with _SHARDS_LOCK:
            if store._shards is None:
                store._shards = shards
    return store._shards


@functools.lru_cache(maxsize=None)
def _botocore_knows(option: str) -> bool:
    try:
        from botocore.config import Config
    except ImportError:
        return False
    return option in getattr(Config, "OPTION_DEFAULTS", {})


def resolve_from_env(storage_options: dict[str, Any] | None = None) -> Store:
    """Resolve ``ACTIVATION_BASE_DIR``; raises StorageError when it is unset."""
    base = os.environ.get("ACTIVATION_BASE_DIR")
    if not base:
        raise StorageError("ACTIVATION_BASE_DIR is not set; export it (a local path or an s3:// URL) or pass base_dir.")
    return resolve(base, storage_options)


def sync(store: Store, f: Any) -> None:
    """fsync a local file when the store is durable."""
    if store.durable and store.is_local:
        f.flush()
        os.fsync(f.fileno())


def sync_dir(store: Store, directory: str) -> None:
    """fsync a local directory when the store is durable, so a rename or link into it survives power loss."""
    if not (store.durable and store.is_local):
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(store: Store, directory: str) -> None:
    """``os.makedirs(directory, exist_ok=True)``; on a durable store each directory created is made durable in its
    parent (the parent is fsynced)."""
    if not store.durable:
        os.makedirs(directory, exist_ok=True)
        return
    missing = []
    d = os.path.abspath(directory)
    while not os.path.isdir(d):
        missing.append(d)
        parent = os.path.dirname(d)
        if parent == d:
            break
        d = parent
    os.makedirs(directory, exist_ok=True)
    for created in reversed(missing):
        sync_dir(store, os.path.dirname(created))


def retrying(fn: Callable[[], _T], what: str, attempts: int | None = None, *, write: bool = False) -> _T:
    """``fn()``, retried with exponential back-off and jitter (bounded: see :data:`WRITE_ATTEMPTS`) when it raises
    StorageError for a transient reason (a 503 SlowDown, a reset connection, a timeout, an outage).

    ObjectNotFoundError propagates at once; errors no retry can fix (:func:`is_fatal`) raise StorageAccessError at
    once. Reads (``write=False``: :data:`READ_ATTEMPTS`, short waits) re-raise their last failure; writes and
    commits (``write=True``) raise StorageUnavailableError after :data:`WRITE_ATTEMPTS`. A retried write must be
    idempotent (a whole object replaced, or an exclusive create whose loser compares what won).
    """
    n = (WRITE_ATTEMPTS if write else READ_ATTEMPTS) if attempts is None else attempts
    base = WRITE_RETRY_DELAY_S if write else RETRY_DELAY_S
    t0 = time.monotonic()
    for i in range(n):
        try:
            return fn()
        except (ObjectNotFoundError, StorageAccessError):
            raise
        except StorageError as exc:
            if is_fatal(exc, write):
                raise StorageAccessError(f"{what}: {exc} -- storage refused the call and retrying cannot fix it; "
                                         "check the bucket name, its permissions and the credentials of this "
                                         "process (AWS_* variables or storage_options).") from exc
            if i == n - 1:
                if not write:
                    raise
                raise StorageUnavailableError(f"{what}: still failing after {n} attempts over "
                                              f"{time.monotonic() - t0:.1f} s ({exc}); the store is throttling "
                                              "or unreachable.") from exc
            delay = _backoff(i, base)
            _LOG.log(logging.WARNING if write else logging.DEBUG, "%s failed (%s); attempt %d of %d in %.2f s",
                     what, exc, i + 2, n, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def write_bytes(store: Store, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing/the old object or the whole new one."""
    try:
        if store.is_local:
            make_dirs(store, os.path.dirname(path))
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    sync(store, f)
                os.replace(tmp, path)
                sync_dir(store, os.path.dirname(path))
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            store.fs.pipe_file(path, data)  # object stores / memory: the object appears whole
    except Exception as exc:
        err = as_storage_error(exc, f"cannot write {store.url(path)}")
        if err is exc:
            raise
        raise err from exc


def create_exclusive(store: Store, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` only if it does not exist; True when this call created it."""
    try:
        if store.is_local:
            make_dirs(store, os.path.dirname(path))
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                sync(store, f)
            try:
                os.link(tmp, path)  # atomic and exclusive: whole content or FileExistsError
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
            sync_dir(store, os.path.dirname(path))  # the new name (and the temp name's removal) reach the disk
            return True
        if store.protocol == "memory":
            with _MEMORY_LOCK:
                if store.fs.exists(path):
                    return False
                store.fs.pipe_file(path, data)
                return True
        if store.protocol in ("s3", "s3a"):
            try:
                with store.fs.open(path, "xb") as f:  # PutObject with If-None-Match: *
                    f.write(data)
                return True
            except FileExistsError:
                return False
        # other backends: best effort (documented in docs/storage_format.md)
        if store.fs.exists(path):
            return False
        store.fs.pipe_file(path, data)
        return True
    except Exception as exc:
        err = as_storage_error(exc, f"cannot create {store.url(path)}")
        if err is exc:
            raise
        raise err from exc


@functools.lru_cache(maxsize=None)
def _takes_max_concurrency(fs_type: type) -> bool:
    """Whether ``cat_file`` of ``fs_type`` takes ``max_concurrency`` (s3fs 2025+): with 1, a whole-object read is one
    request; otherwise s3fs asks the object's size first (a HEAD) to decide whether to split big objects."""
    try:
        return "max_concurrency" in inspect.signature(fs_type._cat_file).parameters
    except (TypeError, ValueError, AttributeError):
        return False


def read_bytes(store: Store, path: str, start: int | None = None, end: int | None = None,
               size: int | None = None) -> bytes:
    """Read a whole object or the byte range ``[start, end)``; missing objects raise StorageError.

    ``size``: the whole object's expected size when the caller knows it (a shard's record). An object store then
    reads ``[0, size + 1)`` in one request instead of asking the size first; the extra byte keeps an object that
    grew since visible to the caller's size check. Objects bigger than the store's block size keep the backend's
    own (parallel, chunked) whole-object read."""
    try:
        if start is None and end is None:
            if store.is_local or store.protocol == "memory":
                return store.fs.cat_file(path)
            if size is not None and 0 < size < getattr(store.fs, "default_block_size", 0):
                return store.fs.cat_file(path, start=0, end=size + 1)
            one_get = size is None and _takes_max_concurrency(type(store.fs))
            return store.fs.cat_file(path, **({"max_concurrency": 1} if one_get else {}))
        return store.fs.cat_file(path, start=start, end=end)
    except FileNotFoundError as exc:
        raise ObjectNotFoundError(f"{store.url(path)} does not exist (removed, or never committed).") from exc
    except Exception as exc:
        _reraise(exc, f"cannot read {store.url(path)}")
        raise


def exists(store: Store, path: str) -> bool:
    """Whether ``path`` exists, file or folder (on S3 a missing object costs a HEAD and a LIST: use
    :func:`file_exists` for files)."""
    try:
        return bool(store.fs.exists(path))
    except Exception as exc:
        _reraise(exc, f"cannot reach {store.url(path)}")
        raise


def file_exists(store: Store, path: str) -> bool:
    """Whether the file (object) ``path`` exists: one HEAD request on S3, where :func:`exists` also lists the prefix
    when no object has that name (a folder might)."""
    try:
        if store.protocol in ("s3", "s3a"):
            bucket, key, version = store.fs.split_path(path)
            try:
                store.fs.call_s3("head_object", Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
                return True
            except FileNotFoundError:
                return False
        return bool(store.fs.isfile(path))
    except Exception as exc:
        _reraise(exc, f"cannot reach {store.url(path)}")
        raise


def list_names(store: Store, path: str) -> list[str]:
    """Base names directly under ``path`` (empty when it does not exist). Fast path for local disk."""
    try:
        if store.is_local:
            return os.listdir(path) if os.path.isdir(path) else []
        if store.protocol not in ("s3", "s3a") and not store.fs.exists(path):
            return []
        # S3: one LIST (a missing folder raises FileNotFoundError), not a HEAD and a LIST to ask first
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False, refresh=True)]
    except FileNotFoundError:
        return []
    except TypeError:  # backends whose ls takes no refresh flag
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(path, detail=False)]
    except Exception as exc:
        _reraise(exc, f"cannot list {store.url(path)}")
        raise


def remove(store: Store, path: str, recursive: bool = False) -> None:
    """Delete ``path``; a missing path is not an error."""
    try:
        if store.fs.exists(path):
            store.fs.rm(path, recursive=recursive)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot remove {store.url(path)}: {exc}") from exc
