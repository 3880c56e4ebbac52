"""A fault-injecting HTTP proxy for the local S3 endpoint (loopback only): tests of retried storage faults.

Every request is forwarded to the upstream endpoint (the moto server of tests/s3_fixtures.py), except that
``fault_rate`` of them (at random, seeded) get a 503 SlowDown or a reset connection instead, all of them do during
an outage (:meth:`FaultProxy.outage`), and every one gets 403 AccessDenied in ``deny`` mode. With ``corrupt`` set
to a substring, the body of every GET whose path holds it has its middle byte flipped in transit (headers, the
endpoint's checksum ones included, pass unchanged). Every request is logged (``requests``), so tests can count
what a call costs on the wire.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message></Error>")
_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
           b"<Message>Access Denied</Message></Error>")
_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer"}


class FaultProxy:
    """``with FaultProxy(upstream_url, fault_rate=0.1) as proxy:`` then point clients at ``proxy.url``."""

    def __init__(self, upstream: str, fault_rate: float = 0.0, seed: int = 0) -> None:
        up = urlsplit(upstream)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.fault_rate = fault_rate
        self.deny = False
        self.corrupt: str | None = None
        self.down_until = 0.0
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts = {"forwarded": 0, "slowdown": 0, "reset": 0, "outage": 0, "denied": 0}
        self.requests: list[tuple[str, str]] = []  # (method, path with query) of every request, in arrival order
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(out)
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _error(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                with proxy.lock:
                    proxy.requests.append((self.command, self.path))
                fault = proxy._decide()
                if fault == "reset" or fault == "outage":
                    self._reset()
                    return
                if fault == "slowdown":
                    self._error(503, _SLOWDOWN)
                    return
                if fault == "denied":
                    self._error(403, _DENIED)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    if body or self.command in ("PUT", "POST"):
                        headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if proxy.corrupt and self.command == "GET" and proxy.corrupt in self.path and data:
                        flipped = bytearray(data)
                        flipped[len(data) // 2] ^= 0xFF
                        data = bytes(flipped)
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in _HOP and k.lower() != "content-length":
                            self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
                    self.send_header("Content-Length", length or "0")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self) -> str | None:
        with self.lock:
            if self.deny:
                kind: str | None = "denied"
            elif time.monotonic() < self.down_until:
                kind = "outage"
            else:
                r = self.rng.random()
                kind = None if r >= self.fault_rate else ("slowdown" if r < self.fault_rate / 2 else "reset")
            self.counts[kind or "forwarded"] += 1
            return kind

    def outage(self, seconds: float) -> None:
        """From now on, for ``seconds``, every connection is reset."""
        with self.lock:
            self.down_until = time.monotonic() + seconds

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
