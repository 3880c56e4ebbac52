"""A distributed run through storage faults (issue 9 item 4): the workers write to S3 through a fault-injecting
proxy (10% 503 SlowDown or reset connections, a 3 s outage once the first part is committed). The run completes,
every row exactly once, equal to the plain-HF oracle (``reference``). botocore's own retries are off so that the
faults reach this package's retry layer. The saver asks for sha256 checksums: the workers write them (the job
carries the choice) and every part record names it."""

from __future__ import annotations

import json
import threading
import time

import pytest

from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver
from tests.fault_proxy import FaultProxy

from .conftest import CONFIG, POSITIONS, reference
from .test_extract import _check_equal

pytestmark = [pytest.mark.s3, pytest.mark.slow]


def test_run_through_faults_and_an_outage(extractor, hooked_ref, texts, s3_endpoint, s3_bucket_url,
                                          s3_storage_options, s3_public_options):
    import s3fs

    direct = s3fs.S3FileSystem(**s3_storage_options, skip_instance_cache=True, use_listings_cache=False)
    bucket = s3_bucket_url[len("s3://"):]
    with FaultProxy(s3_endpoint, fault_rate=0.10, seed=3) as proxy:
        stop = threading.Event()

        def outage_after_first_commit() -> None:  # polls the endpoint itself, not through the proxy
            while not stop.is_set():
                if any("/records/" in p for p in direct.find(bucket)):
                    proxy.outage(3.0)
                    return
                time.sleep(0.1)

        watcher = threading.Thread(target=outage_after_first_commit, daemon=True)
        watcher.start()
        opts = {"client_kwargs": dict(s3_public_options["client_kwargs"], endpoint_url=proxy.url),
                "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2, "read_timeout": 10}}
        saver = ActivationSaver(f"{s3_bucket_url}/acts", experiment_name="faults", storage_options=opts,
                                checksum="sha256")
        try:
            res = extractor.extract(texts[:16], POSITIONS, CONFIG, saver, batch_size=2, partition_size=2)
        finally:
            stop.set()
            watcher.join(5)
        assert proxy.counts["outage"] > 0 and proxy.counts["slowdown"] + proxy.counts["reset"] > 0, proxy.counts
    assert res.n_rows == 16 and res.n_partitions == 8
    loader = ActivationLoader(f"{s3_bucket_url}/acts", experiment_name="faults", storage_options=s3_storage_options)
    cache, _ = loader.query().load()
    _check_equal(cache, reference(hooked_ref, texts[:16]))  # every row once, in order, equal to the oracle
    records = [p for p in direct.find(bucket) if "/records/" in p and p.endswith(".json")]
    assert len(records) == 8
    for path in records:
        rec = json.loads(direct.cat_file(path))
        assert rec["checksum"] == "sha256" and {sh["checksum"] for sh in rec["shards"]} == {"sha256"}, path
