"""Storage faults are retried, not fatal (issue 9 item 4).

A fault-injecting proxy (tests/fault_proxy.py) sits in front of the local S3 endpoint: 10% of requests get a 503
SlowDown or a reset connection, and the store is unreachable for a few seconds in the middle of the run. Saves
still complete with every row exactly once, equal to the tensors given (computed here, not by the code under
test). botocore's own retries are turned off (``max_attempts: 1``) so that the faults reach this package's retry
layer instead of being absorbed by the client; on the previous main such a run fails with StorageError.
Errors that no retry can fix (access denied, a missing bucket) fail fast with a clear StorageAccessError.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage import fs as fsmod
from easyroutine_dist.storage.runs import RunWriter
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.s3


def _options(proxy_url: str, s3_storage_options: dict) -> dict:
    ck = dict(s3_storage_options["client_kwargs"], endpoint_url=proxy_url)
    return {**s3_storage_options, "client_kwargs": ck,
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}


def _rows(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"resid_out_0": torch.randn(4, 64, generator=g), "resid_out_1": torch.randn(4, 64, generator=g),
            "ids": torch.arange(4 * i, 4 * i + 4)}


@pytest.fixture
def proxy(s3_endpoint):
    with FaultProxy(s3_endpoint, fault_rate=0.10, seed=1) as p:
        yield p


def test_run_completes_through_faults_and_an_outage(proxy, s3_bucket_url, s3_storage_options):
    """A run of 8 parts (2 shards each) written through 10% faults and a 3 s outage after the second part: it
    commits, and loading it gives every row once, in part order, equal to what was written."""
    opts = _options(proxy.url, s3_storage_options)
    writer = RunWriter(f"{s3_bucket_url}/acts", opts, max_shard_bytes=2048)
    run = writer.begin_run("faults", "m", {"tag": "faults"})
    parts = 8
    for pid in range(parts):
        if pid == 2:
            proxy.outage(3.0)
        record = writer.write_part(run, pid, _rows(pid))
        assert writer.commit_part(run, record) in (True, False)  # False: a retried create that had landed
    writer.commit_run(run)
    assert proxy.counts["slowdown"] + proxy.counts["reset"] > 0 and proxy.counts["outage"] > 0, proxy.counts
    proxy.fault_rate = 0.0
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader

    data, _ = ActivationLoader(f"{s3_bucket_url}/acts", "faults", storage_options=s3_storage_options).query(
        tag="faults").load(-1)
    expected = [_rows(i) for i in range(parts)]
    for key in ("resid_out_0", "resid_out_1", "ids"):
        assert torch.equal(data[key], torch.cat([e[key] for e in expected])), key
    assert data["ids"].tolist() == list(range(4 * parts))  # every row exactly once


def test_saver_completes_through_faults_and_an_outage(proxy, s3_bucket_url, s3_storage_options):
    """ActivationSaver.save through the same faults, with an outage starting during the third save."""
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver

    saver = ActivationSaver(f"{s3_bucket_url}/acts", "faults", storage_options=_options(proxy.url, s3_storage_options),
                            max_shard_bytes=2048)
    timer = None
    for i in range(5):
        if i == 2:
            timer = threading.Timer(0.05, proxy.outage, args=(3.0,))
            timer.start()
        saver.save(_rows(i), "m", ["last"], None, ExtractionConfig(), tag=f"save-{i}")
    timer.join()
    assert proxy.counts["outage"] > 0, proxy.counts
    res = ActivationLoader(f"{s3_bucket_url}/acts", "faults", storage_options=s3_storage_options).query()
    assert len(res) == 5
    for i in range(5):
        data, _ = ActivationLoader(f"{s3_bucket_url}/acts", "faults",
                                   storage_options=s3_storage_options).query(tag=f"save-{i}").load(-1)
        for key, t in _rows(i).items():
            assert torch.equal(data[key], t), (i, key)


def test_access_denied_fails_fast(proxy, s3_bucket_url, s3_storage_options):
    from easyroutine_dist.interpretability.activation_saver import ActivationSaver

    proxy.deny = True
    saver = ActivationSaver(f"{s3_bucket_url}/acts", "faults", storage_options=_options(proxy.url, s3_storage_options))
    t = time.monotonic()
    with pytest.raises(fsmod.StorageAccessError, match="retrying cannot fix"):
        saver.save(_rows(0), "m", ["last"], None, ExtractionConfig())
    assert time.monotonic() - t < 5.0  # not the minutes of a full retry budget
    assert proxy.counts["denied"] <= 12  # no retry storm: s3fs' own few tries, none of ours


def test_missing_bucket_fails_fast(s3_endpoint, s3_storage_options):
    from easyroutine_dist.storage.shards import write_shard

    writer = RunWriter("s3://no-such-bucket-here/acts", s3_storage_options)
    t = time.monotonic()
    with pytest.raises(fsmod.StorageAccessError, match="bucket"):
        write_shard(writer.store, writer.store.path("x", "part-00000-0000-a.safetensors"), _rows(0))
    assert time.monotonic() - t < 5.0


def test_backoff_is_bounded_and_jittered(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(fsmod.time, "sleep", waits.append)
    calls = []

    def flaky() -> None:
        calls.append(1)
        raise fsmod.StorageError("cannot write s3://b/x: ConnectionResetError: reset by peer")

    with pytest.raises(fsmod.StorageUnavailableError, match="after 8 attempts"):
        fsmod.retrying(flaky, "writing x", write=True)
    assert len(calls) == fsmod.WRITE_ATTEMPTS == 8 and len(waits) == 7
    for i, w in enumerate(waits):
        cap = min(fsmod.RETRY_MAX_DELAY_S, fsmod.WRITE_RETRY_DELAY_S * 2**i)
        assert cap / 2 <= w <= cap
    assert sum(waits) <= 16.2


@pytest.mark.parametrize("what", ["part", "run"])
def test_a_create_that_landed_but_failed_is_recognised(tmp_path, monkeypatch, what):
    """The first exclusive create writes its object and then fails (the answer was lost): the retry finds the object
    and knows it is its own; the part/run counts as committed once, and no RunAlreadyCommittedError is raised."""
    from easyroutine_dist.storage import runs

    writer = RunWriter(str(tmp_path / "acts"))
    run = writer.begin_run("faults", "m", {"tag": "landed"})
    record = writer.write_part(run, 0, _rows(0))
    real, lost = runs.create_exclusive, []

    def landed_then_lost(store, path, data):
        created = real(store, path, data)
        if not lost and (path.endswith("_SUCCESS") if what == "run" else "/records/" in path):
            lost.append(path)
            raise fsmod.StorageError(f"cannot create {path}: ConnectionResetError: reset by peer")
        return created

    monkeypatch.setattr(fsmod, "RETRY_MAX_DELAY_S", 0.01)
    monkeypatch.setattr(runs, "create_exclusive", landed_then_lost)
    committed = writer.commit_part(run, record)
    assert committed is (what == "run")  # a part record found equal to its own: committed by this (earlier) try
    writer.commit_run(run)
    assert lost
    from easyroutine_dist.interpretability.activation_saver import ActivationLoader

    data, _ = ActivationLoader(str(tmp_path / "acts"), "faults").query(tag="landed").load(-1)
    assert torch.equal(data["ids"], _rows(0)["ids"])
