"""pytest plugin: a real S3-protocol endpoint (moto server mode) on 127.0.0.1 for storage tests."""

from __future__ import annotations

import os
import uuid
from typing import Any, Iterator

import pytest

_REGION = "us-east-1"
_KEY, _SECRET = "testing-key", "testing-secret"
#: the credentials the local endpoint's clients find in their environment (Ray nodes included)
NODE_AWS_ENV = {"AWS_ACCESS_KEY_ID": _KEY, "AWS_SECRET_ACCESS_KEY": _SECRET, "AWS_DEFAULT_REGION": _REGION}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """URL of a moto S3 server on a free local port (session-scoped)."""
    pytest.importorskip("moto.server")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID=_KEY, AWS_SECRET_ACCESS_KEY=_SECRET, AWS_DEFAULT_REGION=_REGION)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_storage_options(s3_endpoint: str) -> dict[str, Any]:
    """s3fs options for the local endpoint."""
    return {"key": _KEY, "secret": _SECRET, "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": _REGION}}


@pytest.fixture
def s3_public_options(s3_endpoint: str) -> dict[str, Any]:
    """s3fs options for the local endpoint without credentials (they come from the environment): what a
    distributed run accepts."""
    return {"client_kwargs": {"endpoint_url": s3_endpoint, "region_name": _REGION}}


@pytest.fixture
def s3_bucket_url(s3_endpoint: str) -> str:
    """A fresh, empty bucket per test: ``"s3://<bucket>"``."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name=_REGION, aws_access_key_id=_KEY,
                 aws_secret_access_key=_SECRET).create_bucket(Bucket=name)
    return f"s3://{name}"
