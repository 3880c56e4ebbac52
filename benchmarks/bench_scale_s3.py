"""What the catalog costs on S3 (issue 10 item 2): requests and bytes of the first query of a fresh process, and of
queries through the index with and without its bounded trust of a listing.

A moto server in its own process (benchmarks/_s3.py) behind a counting HTTP proxy in this process: every request
the catalog sends is counted by kind (LIST, GET, HEAD, PUT...) with the bytes of its answer. One experiment of N runs
(entries of ~530 bytes, as in bench_scale.py), uploaded straight to the server (not counted); the snapshot segment
is written as a reader that read every entry would write it (``snapshots.append``).

Run: python benchmarks/bench_scale_s3.py [--sizes 1000,10000] [--no-snapshot-max 1000]. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._s3 import s3_endpoint  # noqa: E402
from benchmarks.bench_scale import _entry  # noqa: E402
from easyroutine_dist.storage import Catalog, snapshots  # noqa: E402
from easyroutine_dist.storage.fs import resolve  # noqa: E402
from easyroutine_dist.storage.query import build_criteria  # noqa: E402
from easyroutine_dist.storage.selection import select  # noqa: E402

_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade", "trailer",
        "content-length"}


class CountingProxy:
    """Forwards every request to ``upstream`` and counts them: ``counts[kind] = [requests, answer bytes]``."""

    def __init__(self, upstream: str) -> None:
        up = urlsplit(upstream)
        self.upstream = (up.hostname, up.port)
        self.lock = threading.Lock()
        self.counts: dict[str, list[int]] = {}
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=120)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                kind = "LIST" if self.command == "GET" and "list-type=" in self.path else self.command
                with proxy.lock:
                    c = proxy.counts.setdefault(kind, [0, 0])
                    c[0] += 1
                    c[1] += len(data)
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def take(self) -> dict[str, list[int]]:
        with self.lock:
            out, self.counts = self.counts, {}
        return out


def _fmt(counts: dict[str, list[int]]) -> str:
    reqs = ", ".join(f"{k} {v[0]}" for k, v in sorted(counts.items()))
    return f"{sum(v[0] for v in counts.values())} ({reqs}); {sum(v[1] for v in counts.values()) / 2**20:.2f} MiB"


def _upload(bucket: str, endpoint: str, entries: list[dict]) -> None:
    import json

    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def put(e: dict) -> None:
        client.put_object(Bucket=bucket, Key=f"acts/_catalog/big/{e['run_id']}.json",
                          Body=json.dumps(e, sort_keys=True).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, entries))


def bench(n: int, options: dict, proxy: CountingProxy, bucket: str, no_snapshot: bool, queries: int) -> dict:
    url = f"s3://{bucket}/acts"
    direct = resolve(url, options)
    counted = dict(options, client_kwargs=dict(options["client_kwargs"], endpoint_url=proxy.url))
    entries = [_entry(i) for i in range(n)]
    t = time.perf_counter()
    _upload(bucket, options["client_kwargs"]["endpoint_url"], entries)
    row: dict = {"runs": n, "upload_s": time.perf_counter() - t}
    if no_snapshot:
        proxy.take()
        t = time.perf_counter()
        assert len(Catalog(resolve(url, counted)).entries("big")) == n  # reads each entry, writes a segment
        row["no_snapshot_s"], row["no_snapshot"] = time.perf_counter() - t, _fmt(proxy.take())
    else:
        snapshots.append(direct, "big", {f"{e['run_id']}.json": e for e in entries})
    proxy.take()
    t = time.perf_counter()
    got = Catalog(resolve(url, counted)).entries("big")  # a fresh process: a new store and catalog
    row["first_query_s"], row["first_query"] = time.perf_counter() - t, _fmt(proxy.take())
    assert got == entries
    crit = build_criteria(tag=entries[n // 2]["tag"])
    for trust in (0.0, 2.0):  # the index's catalog, queried back to back (trust_s is counted from a listing's end)
        cat = Catalog(resolve(url, counted), trust_s=trust)
        select(cat, "big", crit)
        proxy.take()
        t = time.perf_counter()
        for _ in range(queries):
            assert select(cat, "big", crit) == [entries[n // 2]]
        row[f"{queries}_queries_trust_{trust:g}_ms_each"] = (time.perf_counter() - t) * 1e3 / queries
        row[f"{queries}_queries_trust_{trust:g}"] = _fmt(proxy.take())
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,10000")
    p.add_argument("--no-snapshot-max", type=int, default=1000, help="also measure no snapshot up to this size")
    p.add_argument("--queries", type=int, default=20, help="back-to-back queries per trust setting")
    a = p.parse_args()
    rows = []
    for i, n in enumerate(int(x) for x in a.sizes.split(",")):
        bucket = f"bench-scale-{i}"
        with s3_endpoint(bucket) as options:
            proxy = CountingProxy(options["client_kwargs"]["endpoint_url"])
            rows.append(bench(n, options, proxy, bucket, n <= a.no_snapshot_max, a.queries))
            proxy.server.shutdown()
        print(rows[-1], flush=True)
    for r in rows:
        print(f"\n### {r['runs']} runs")
        for k, v in r.items():
            print(f"* {k}: {v:.3f}" if isinstance(v, float) else f"* {k}: {v}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, cpus: {os.cpu_count()}")


if __name__ == "__main__":
    main()
