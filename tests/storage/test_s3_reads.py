"""Shard byte ranges through botocore's blocking client (storage/s3_reads.py): the same bytes and errors as s3fs
(the oracle: s3fs's own ``cat_file`` on the same endpoint), a body cut off mid-way fetched again, bigger reads left to
s3fs, and a client of its own in a forked process."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from botocore.exceptions import ResponseStreamingError

from easyroutine_dist.storage import s3_reads
from easyroutine_dist.storage.fs import resolve, shard_store, write_bytes
from easyroutine_dist.storage.s3_reads import BlockingS3Reads

pytestmark = pytest.mark.s3

DATA = bytes(range(256)) * 1000  # 256,000 bytes


@pytest.fixture
def obj(s3_bucket_url, s3_storage_options):
    """``(store, its shard store's blocking reads, the object's path)`` of an object holding DATA."""
    store = resolve(s3_bucket_url + "/reads", s3_storage_options)
    path = store.path("obj.bin")
    write_bytes(store, path, DATA)
    reads = shard_store(store).fs
    assert isinstance(reads, BlockingS3Reads)
    return store, reads, path


def test_ranges_are_the_bytes_s3fs_returns(obj):
    store, reads, path = obj
    for start, end in [(0, len(DATA)), (0, len(DATA) + 1), (7, 7 + 65536), (len(DATA) - 3, len(DATA) + 100),
                       (100, 101)]:
        got = reads.cat_file(path, start=start, end=end)
        assert got == DATA[start:end] == store.fs.cat_file(path, start=start, end=end), (start, end)
    assert reads.cat_file(path, start=5, end=5) == b""


def test_errors_are_those_of_s3fs(obj):
    store, reads, path = obj
    missing = store.path("missing.bin")
    with pytest.raises(FileNotFoundError):
        store.fs.cat_file(missing, start=0, end=10)
    with pytest.raises(FileNotFoundError):
        reads.cat_file(missing, start=0, end=10)


def test_whole_objects_and_big_ranges_stay_on_s3fs(obj, monkeypatch):
    _, reads, path = obj
    calls = []
    inner = reads._fs  # the s3fs filesystem under the blocking reads

    def counting(p, *args, **kwargs):
        calls.append(kwargs)
        return type(inner).cat_file(inner, p, *args, **kwargs)

    monkeypatch.setattr(inner, "cat_file", counting)
    assert reads.cat_file(path) == DATA  # whole object: s3fs (its parallel read for big objects)
    monkeypatch.setattr(inner, "default_block_size", 1000)
    assert reads.cat_file(path, start=0, end=5000) == DATA[:5000]  # bigger than a block: s3fs
    assert reads.cat_file(path, start=0, end=1000) == DATA[:1000]  # a block: the blocking client
    assert len(calls) == 2


def test_a_body_cut_off_is_fetched_again(obj, monkeypatch):
    _, reads, path = obj
    client = reads._client()
    real = client.get_object
    cuts = [2]

    class Cut:
        def read(self):
            raise ResponseStreamingError(error="connection reset mid-body")

        def close(self):
            pass

    def flaky(**kwargs):
        if cuts[0]:
            cuts[0] -= 1
            real(**kwargs)["Body"].read()
            return {"Body": Cut()}
        return real(**kwargs)

    monkeypatch.setattr(client, "get_object", flaky)
    assert reads.cat_file(path, start=0, end=100) == DATA[:100]  # two cut off, the third whole
    cuts[0] = s3_reads.BODY_ATTEMPTS
    with pytest.raises(ResponseStreamingError):
        reads.cat_file(path, start=0, end=100)


def test_a_forked_process_makes_its_own_client(obj):
    _, reads, path = obj
    parent = reads._client()
    pid = os.fork()
    if pid == 0:  # the child: a new client, the same bytes; exit status tells the parent
        ok = reads._client() is not parent and reads.cat_file(path, start=1, end=11) == DATA[1:11]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert reads._client() is parent  # the parent keeps its own


def test_a_pickled_store_reads_with_a_client_of_its_own(obj):
    """A dataset sent to spawned DataLoader workers is pickled with its store and the store's shard store."""
    store, reads, path = obj
    reads._client()
    assert isinstance(shard_store(pickle.loads(pickle.dumps(store))).fs, BlockingS3Reads)
    again = pickle.loads(pickle.dumps(shard_store(store)))
    assert isinstance(again.fs, BlockingS3Reads) and again.fs._clients == {}
    assert again.fs.cat_file(path, start=3, end=9) == DATA[3:9]


def test_spawned_dataloader_workers_read_every_row_once(s3_bucket_url, s3_storage_options):
    """The real case of the pickling above: a dataset whose store already read shards (it holds a client), sent to
    two spawned DataLoader workers; every row arrives once, equal to the row ``load()`` returns."""
    from torch.utils.data import DataLoader

    from easyroutine_dist.interpretability.activation_saver import ActivationLoader, ActivationSaver

    url = s3_bucket_url + "/spawn"
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(3))
    ActivationSaver(url, "spawn", storage_options=s3_storage_options).save(x, "m", ["last"], None, {})
    q = ActivationLoader(url, "spawn", storage_options=s3_storage_options).query()
    ds = q.torch_dataset(batch_size=7, shuffle=True)
    next(iter(ds))  # this process reads first
    assert isinstance(shard_store(ds.store).fs, BlockingS3Reads) and shard_store(ds.store).fs._clients
    got = {}
    for b in DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="spawn", timeout=120):
        for i, row in zip(b["row_index"].tolist(), b["activations"]):
            assert i not in got
            got[i] = row.clone()
    assert sorted(got) == list(range(40))
    assert torch.equal(torch.stack([got[i] for i in range(40)]), x)
