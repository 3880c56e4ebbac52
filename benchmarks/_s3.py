"""The local S3 endpoint the benchmarks measure against: a moto server in its own process (so it does not share the
benchmark's GIL, as a real S3 is not on our CPU at all), on a free loopback port, with one bucket."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator


@contextlib.contextmanager
def s3_endpoint(bucket: str) -> Iterator[dict]:
    """Start the server, create ``bucket``, yield fsspec ``storage_options`` (endpoint only; the AWS_* test
    credentials go into this process' environment); stop the server on exit."""
    import boto3

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ep = f"http://127.0.0.1:{port}"
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
        for _ in range(100):
            try:
                boto3.client("s3", endpoint_url=ep, region_name="us-east-1").create_bucket(Bucket=bucket)
                break
            except Exception:  # noqa: BLE001 (server still starting)
                time.sleep(0.2)
        yield {"client_kwargs": {"endpoint_url": ep, "region_name": "us-east-1"}}
    finally:
        server.terminate()
        server.wait()
