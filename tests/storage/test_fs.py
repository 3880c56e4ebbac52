"""What storage calls cost on S3, counted on the wire (storage/fs.py): requests through a logging proxy in front of
the local endpoint (tests/fault_proxy.py, no faults). Expected counts follow from the S3 protocol: one GET per
object read, one HEAD per file check, one PUT per object written; listings only where a folder is listed. Also
which check catches a byte changed in transit (the proxy corrupting GET bodies)."""

from __future__ import annotations

import collections

import pytest
import torch

from easyroutine_dist.errors import CorruptShardError
from easyroutine_dist.interpretability.activation_saver import ActivationLoader
from easyroutine_dist.storage.layout import RUN_MARKER
from easyroutine_dist.storage.fs import file_exists, list_names, resolve, shard_store, write_bytes
from easyroutine_dist.storage.runs import RunWriter, read_marker, run_dir
from easyroutine_dist.storage.s3_reads import BlockingS3Reads
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.s3


@pytest.fixture
def wire(s3_endpoint, s3_storage_options):
    """``(proxy, storage options through it)``."""
    with FaultProxy(s3_endpoint, fault_rate=0.0) as proxy:
        ck = dict(s3_storage_options["client_kwargs"], endpoint_url=proxy.url)
        yield proxy, {**s3_storage_options, "client_kwargs": ck}


def _kinds(proxy: FaultProxy) -> collections.Counter:
    """Requests so far by kind (LIST, HEAD, GET, PUT, ...); the log is cleared."""
    out = collections.Counter("LIST" if m == "GET" and "list-type=" in p else m for m, p in proxy.requests)
    proxy.requests.clear()
    return out


def _parts(i: int) -> dict[str, torch.Tensor]:
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(i))
    return {"x": x, "y": x.sum(-1)}


def test_writing_a_part_is_one_check_and_two_puts(wire, s3_bucket_url):
    proxy, opts = wire
    writer = RunWriter(s3_bucket_url + "/acts", opts)
    run = writer.begin_run("e", "m", {})
    _kinds(proxy)
    for i in range(3):
        writer.commit_part(run, writer.write_part(run, i, _parts(i)))
        # is the part committed already (a HEAD of its record), its shard, its record
        assert _kinds(proxy) == {"HEAD": 1, "PUT": 2}, i


def test_reads_are_one_get_per_object(wire, s3_bucket_url):
    proxy, opts = wire
    url = s3_bucket_url + "/acts"
    writer = RunWriter(url, opts)
    run = writer.begin_run("e", "m", {})
    for i in range(3):
        writer.commit_part(run, writer.write_part(run, i, _parts(i)))
    writer.commit_run(run)
    q = ActivationLoader(url, "e", storage_options=opts).query()
    rdir = run_dir(q.store, q[-1])
    n_shards = sum(len(r["shards"]) for r in read_marker(q.store, rdir)["records"])
    _kinds(proxy)
    cache, _ = q.load(-1)
    assert torch.equal(cache["x"], torch.cat([_parts(i)["x"] for i in range(3)]))  # what was written
    got = _kinds(proxy)
    # the run's marker and metadata, each part's record, each shard: GETs only, never a size lookup first
    assert set(got) == {"GET"} and got["GET"] >= 3 + n_shards, got
    batches = list(q.torch_dataset(keys=["x", "y"], batch_size=5, shuffle=False))
    assert torch.equal(torch.cat([b["x"] for b in batches]), cache["x"])
    assert set(_kinds(proxy)) == {"GET"}


def test_shard_bytes_are_checked_against_their_recorded_digest_not_by_the_transport(wire, s3_bucket_url, tmp_path):
    """Shard reads skip botocore's response CRC32 (storage/fs.py shard_store): every byte is checked against the
    digest recorded at save time. A byte flipped in transit, under the endpoint's own checksum header, is caught
    by that check (CorruptShardError naming the shard), while other reads keep the transport's check."""
    proxy, opts = wire
    url = s3_bucket_url + "/acts"
    writer = RunWriter(url, opts)
    run = writer.begin_run("e", "m", {})
    writer.commit_part(run, writer.write_part(run, 0, _parts(0)))
    writer.commit_run(run)
    q = ActivationLoader(url, "e", storage_options=opts).query()
    rdir = run_dir(q.store, q[-1])
    shard = read_marker(q.store, rdir)["records"][0]["shards"][0]
    path = f"{rdir}/shards/{shard['file']}"
    proxy.corrupt = "/shards/"
    # the endpoint sends a CRC32 of the shard: a client with botocore's default rejects the flipped byte itself
    with pytest.raises(Exception, match="(?i)checksum") as caught:
        resolve(url, opts).fs.cat_file(path, start=0, end=shard["bytes"] + 1)
    assert not isinstance(caught.value, CorruptShardError)
    with pytest.raises(CorruptShardError, match=shard["file"]):
        q.load(-1)
    with pytest.raises(CorruptShardError, match=shard["file"]):
        next(iter(q.torch_dataset(keys=["x"], batch_size=2, shuffle=False)))
    proxy.corrupt = None
    cache, _ = q.load(-1)
    assert torch.equal(cache["x"], _parts(0)["x"])
    # JSON metadata carries no digest of ours: its reads keep the transport's check
    assert shard_store(q.store) is not q.store and shard_store(q.store) is shard_store(q.store)
    proxy.corrupt = RUN_MARKER
    with pytest.raises(Exception, match="(?i)checksum"):
        read_marker(resolve(url, opts), rdir)
    proxy.corrupt = None
    # a config that sets the check itself is kept as given, by the blocking client shard ranges go through too
    own = resolve(url, {**opts, "config_kwargs": {"response_checksum_validation": "when_supported"}})
    assert isinstance(shard_store(q.store).fs, BlockingS3Reads) and isinstance(shard_store(own).fs, BlockingS3Reads)
    proxy.corrupt = "/shards/"
    with pytest.raises(Exception, match="(?i)checksum") as caught:
        shard_store(own).fs.cat_file(path, start=0, end=shard["bytes"] + 1)
    assert not isinstance(caught.value, CorruptShardError)
    proxy.corrupt = None
    # options only s3fs understands keep shard reads on s3fs; local stores have no transport check to skip
    payer = resolve(url, {**opts, "requester_pays": True})
    assert not isinstance(shard_store(payer).fs, BlockingS3Reads)
    local = resolve(str(tmp_path))
    assert shard_store(local) is local


def test_file_checks_and_listings(wire, s3_bucket_url):
    proxy, opts = wire
    store = resolve(s3_bucket_url + "/root", opts)
    write_bytes(store, store.path("d", "a.json"), b"{}")
    _kinds(proxy)
    assert file_exists(store, store.path("d", "a.json")) and _kinds(proxy) == {"HEAD": 1}
    assert not file_exists(store, store.path("d", "b.json")) and _kinds(proxy) == {"HEAD": 1}
    assert not file_exists(store, store.path("d"))  # a folder is not a file
    _kinds(proxy)
    assert list_names(store, store.path("d")) == ["a.json"] and _kinds(proxy) == {"LIST": 1}
    assert list_names(store, store.path("missing")) == []
