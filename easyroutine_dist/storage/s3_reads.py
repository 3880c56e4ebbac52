"""Shard bytes from S3 through botocore's blocking client, one request per calling thread.

s3fs runs every request of a process on one asyncio event-loop thread, and aiohttp hands a response body over in
64 KiB steps of that loop: fetching 8 MiB shards with 3 requests in flight, it used 0.51-0.70 s of CPU per 384 MiB
against 0.28-0.32 s for botocore's blocking client (urllib3, which reads a body of known length straight into one
buffer without the GIL), and fetched at 490-660 against 790-1,000 MB/s (benchmarks/bench_reader.py, 2-core
machine, local S3 endpoint). Shard reads come from threads already (the reader's read-ahead, ``load()``,
``verify``), so :class:`BlockingS3Reads` serves their byte ranges through a blocking client built from the same
settings as the store's s3fs filesystem, and leaves every other call to that filesystem.

The client is made in each process on first use (its connections do not survive a fork: DataLoader workers make
their own); credentials come from the store's options or this process' environment, exactly as for s3fs, and are
never stored. Options this module cannot reproduce (a session object, requester-pays, versioned reads, extra
request arguments) keep every read on s3fs (:func:`blocking_reads` returns None).
"""

from __future__ import annotations

import os
import threading
from typing import Any, Optional

__all__ = ["BlockingS3Reads", "blocking_reads"]

#: s3fs options whose meaning the blocking client reproduces (or that do not concern a GET)
_SUPPORTED = {"key", "secret", "token", "anon", "endpoint_url", "client_kwargs", "config_kwargs", "use_ssl",
              "profile", "default_block_size", "skip_instance_cache", "use_listings_cache", "listings_expiry_time",
              "max_paths", "default_fill_cache", "default_cache_type", "cache_regions", "max_concurrency",
              "username", "password"}
#: connections per process: the reader's read-ahead threads, ``load()``'s and ``verify``'s thread pools
_POOL = 32
#: a body cut off mid-way is fetched again this many times in all (botocore retries only until the headers arrive)
BODY_ATTEMPTS = 3
_LOCK = threading.Lock()


def _after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()  # a lock held by another thread at fork time would stay held in the child


os.register_at_fork(after_in_child=_after_fork)


def blocking_reads(fs: Any, storage_options: dict[str, Any]) -> Optional["BlockingS3Reads"]:
    """A :class:`BlockingS3Reads` over ``fs`` (an s3fs ``S3FileSystem`` made from ``storage_options``), or None when
    botocore is missing or an option asks for something only s3fs does."""
    try:
        import botocore.session  # noqa: F401
    except ImportError:
        return None
    if set(storage_options) - _SUPPORTED or getattr(fs, "requester_pays", True) or getattr(fs, "version_aware", True):
        return None
    if getattr(fs, "s3_additional_kwargs", None) or set(getattr(fs, "kwargs", None) or {}) - {"profile"}:
        return None
    return BlockingS3Reads(fs)


class BlockingS3Reads:
    """``fs`` with ``cat_file`` of byte ranges (``start``/``end`` >= 0, smaller than ``fs.default_block_size``)
    served by botocore's blocking client; whole-object reads, bigger ranges and every other attribute are ``fs``'s.
    Errors are s3fs's (a missing object raises FileNotFoundError, a refused one PermissionError)."""

    def __init__(self, fs: Any) -> None:
        self._fs = fs
        self._clients: dict[int, Any] = {}  # per process id

    def __getattr__(self, name: str) -> Any:
        if name in ("_fs", "_clients"):  # not set yet (while unpickling): never look them up on ``fs``
            raise AttributeError(name)
        return getattr(self._fs, name)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled as its filesystem only (a dataset sent to spawned DataLoader workers): clients are per process."""
        return BlockingS3Reads, (self._fs,)

    def _client(self) -> Any:
        """This process' client (made once per process)."""
        pid = os.getpid()
        client = self._clients.get(pid)
        if client is None:
            with _LOCK:
                client = self._clients.get(pid)
                if client is None:
                    self._clients = {pid: self._make_client()}  # a parent's client is never used after a fork
                    client = self._clients[pid]
        return client

    def _make_client(self) -> Any:
        """A client made the way s3fs makes its own (``S3FileSystem.set_session``), from ``fs``'s settings."""
        import botocore.session
        from botocore import UNSIGNED
        from botocore.config import Config

        fs = self._fs
        config = dict(fs.config_kwargs or {})
        config.setdefault("connect_timeout", fs.connect_timeout)
        config.setdefault("read_timeout", fs.read_timeout)
        config.setdefault("max_pool_connections", _POOL)
        client_kwargs = dict(fs.client_kwargs or {})
        init = {"aws_access_key_id": fs.key, "aws_secret_access_key": fs.secret, "aws_session_token": fs.token,
                "endpoint_url": fs.endpoint_url}
        init = {k: v for k, v in init.items() if v is not None and v != client_kwargs.get(k)}
        if "use_ssl" not in client_kwargs:
            init["use_ssl"] = fs.use_ssl
        if fs.anon:
            secret = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
            init = {k: v for k, v in init.items() if k not in secret}
            client_kwargs = {k: v for k, v in client_kwargs.items() if k not in secret}
            config["signature_version"] = UNSIGNED
        session = botocore.session.Session(profile=(fs.kwargs or {}).get("profile"))
        return session.create_client("s3", config=Config(**config), **init, **client_kwargs)

    def cat_file(self, path: str, start: Optional[int] = None, end: Optional[int] = None, **kwargs: Any) -> bytes:
        """Bytes ``[start, end)`` of ``path`` (``bucket/key``); the end may lie past the object (fewer bytes)."""
        small = start is not None and end is not None and 0 <= start <= end and \
            end - start <= getattr(self._fs, "default_block_size", 0)
        if not small or kwargs:
            return self._fs.cat_file(path, start=start, end=end, **kwargs)
        if end == start:
            return b""
        from botocore.exceptions import ClientError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError
        from s3fs.errors import translate_boto_error

        bucket, key, _ = self._fs.split_path(path)
        client = self._client()
        for attempt in range(BODY_ATTEMPTS):
            try:
                body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}")["Body"]
            except ClientError as exc:
                raise translate_boto_error(exc) from exc
            try:
                return body.read()  # read to the end: the connection goes back to the pool
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError):
                body.close()
                if attempt == BODY_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")
