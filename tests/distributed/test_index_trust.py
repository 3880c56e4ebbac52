"""Issue 10 item 2 (S3 index trust): the index actor lists an experiment at most once per ``trust_s`` seconds
instead of on every query; runs registered through it are seen at once, runs written by writers that bypass it
within ``trust_s``, and a process always sees its own changes (its next query asks the index to re-list)."""

from __future__ import annotations

import pytest

import easyroutine_dist.storage.catalog as catmod
from easyroutine_dist.distributed import index as _index
from easyroutine_dist.distributed.index import MetadataIndex
from easyroutine_dist.errors import ConfigError
from easyroutine_dist.storage import Catalog, layout, providers
from easyroutine_dist.storage.fs import resolve
from easyroutine_dist.storage.query import build_criteria


def _entry(i: int) -> dict:
    run_id, save_time, t = layout.new_run_id(1.6e9 + i)
    return {"run_id": run_id, "experiment_name": "big", "model_name": "m", "save_time": save_time,
            "saved_at_unix": t, "tag": f"t{i}", "other_metadata": {}, "extraction_config": {}, "interventions": [],
            "target_token_positions": ["last"], "pivot_positions": None}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lists(monkeypatch):
    """The listings of ``_catalog/big`` (the experiment's runs), counted; and a clock the test moves."""
    seen: list[str] = []
    real = catmod.list_names

    def counting(store, path, *a, **k):
        if path.rstrip("/").endswith(f"{layout.CATALOG_DIR}/big"):
            seen.append(path)
        return real(store, path, *a, **k)

    monkeypatch.setattr(catmod, "list_names", counting)
    clock = _Clock()
    monkeypatch.setattr(catmod, "_clock", clock)
    return seen, clock


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.s3)])
def root(request, tmp_path):
    """A root whose listing is never skipped by a directory mtime (object stores; memory:// behaves alike)."""
    if request.param == "s3":
        url, options = request.getfixturevalue("s3_bucket_url") + "/acts", request.getfixturevalue("s3_public_options")
    else:
        url, options = f"memory://trust-{tmp_path.name}/acts", None
    return url, options


def _tags(answer: dict) -> list[str]:
    return [e["tag"] for e in answer["entries"]]


def test_a_listing_is_trusted_for_trust_s_seconds(root, lists):
    url, options = root
    seen, clock = lists
    writer = Catalog(resolve(url, options))
    for i in range(3):
        writer.add(_entry(i))
    idx = MetadataIndex(trust_s=2.0)
    every = build_criteria()
    for _ in range(20):  # within 2 s: one listing in all
        assert _tags(idx.query(url, options, "big", every)) == ["t0", "t1", "t2"]
        clock.now += 0.05
    assert len(seen) == 1

    # a writer that bypasses the index: not seen before trust_s has passed since the listing, seen after
    writer.add(_entry(3))
    clock.now = 1000.0 + 1.9
    assert _tags(idx.query(url, options, "big", every)) == ["t0", "t1", "t2"] and len(seen) == 1
    clock.now = 1000.0 + 2.0
    assert _tags(idx.query(url, options, "big", every)) == ["t0", "t1", "t2", "t3"] and len(seen) == 2

    # a run registered through the index: in the very next answer, no listing
    e4 = _entry(4)
    writer.add(e4)
    idx.register(url, options, e4)
    assert _tags(idx.query(url, options, "big", build_criteria(tag="t4"))) == ["t4"]
    assert _tags(idx.query(url, options, "big", every)) == ["t0", "t1", "t2", "t3", "t4"] and len(seen) == 2


def test_trust_counts_from_the_end_of_a_slow_listing(root, lists, monkeypatch):
    """A listing that takes longer than trust_s (100 LIST requests at 100k runs) is not redone by the next query."""
    url, options = root
    seen, clock = lists
    Catalog(resolve(url, options)).add(_entry(0))
    counting = catmod.list_names

    def slow(store, path, *a, **k):
        clock.now += 3.0
        return counting(store, path, *a, **k)

    monkeypatch.setattr(catmod, "list_names", slow)
    idx = MetadataIndex(trust_s=2.0)
    for _ in range(5):
        assert _tags(idx.query(url, options, "big", build_criteria())) == ["t0"]
    assert len(seen) == 1
    clock.now += 2.0
    idx.query(url, options, "big", build_criteria())
    assert len(seen) == 2


def test_trust_0_lists_on_every_query(root, lists):
    url, options = root
    seen, _ = lists
    Catalog(resolve(url, options)).add(_entry(0))
    idx = MetadataIndex(trust_s=0.0)
    for _ in range(3):
        assert _tags(idx.query(url, options, "big", build_criteria())) == ["t0"]
    assert len(seen) == 3


def test_refresh_lists_again_at_once(root, lists):
    url, options = root
    seen, _ = lists
    writer = Catalog(resolve(url, options))
    e0, e1 = _entry(0), _entry(1)
    writer.add(e0)
    idx = MetadataIndex(trust_s=60.0)
    assert _tags(idx.query(url, options, "big", build_criteria())) == ["t0"]
    writer.add(e1)
    writer.discard("big", e0["run_id"])
    assert _tags(idx.query(url, options, "big", build_criteria())) == ["t0"]  # trusted: stale
    assert _tags(idx.query(url, options, "big", build_criteria(), refresh=True)) == ["t1"]
    assert len(seen) == 2


def test_a_process_asks_for_a_refresh_after_its_own_changes(monkeypatch):
    """The query provider sends ``refresh=True`` exactly when this process added or removed a run of that
    experiment (of that root) since its last query through the index."""
    asked = []
    monkeypatch.setattr(_index, "_ask", lambda method, store, *a, **kw: asked.append(kw["refresh"]) or None)
    store, other = resolve("memory://trust-a/acts"), resolve("memory://trust-b/acts")
    e = _entry(0)
    _index._query_provider(store, "big", {})
    Catalog(store).add(e)
    Catalog(other).add(_entry(1))  # another root: not this one's business
    _index._query_provider(store, "other-exp", {})  # another experiment of this root
    _index._query_provider(store, "big", {})
    _index._query_provider(store, "big", {})  # asked once only
    Catalog(store).discard("big", e["run_id"])
    _index._query_provider(store, None, {})  # every experiment of the root
    assert asked == [False, False, True, False, True]
    providers.take_changed(other, None)


def test_trust_from_the_environment(monkeypatch):
    monkeypatch.delenv(_index.TRUST_ENV, raising=False)
    assert _index.trust_from_env() == _index.TRUST_S == 2.0
    for raw, want in (("0", 0.0), ("0.5", 0.5), ("30", 30.0)):
        monkeypatch.setenv(_index.TRUST_ENV, raw)
        assert _index.trust_from_env() == want
    for raw in ("-1", "soon", "nan", "inf"):
        monkeypatch.setenv(_index.TRUST_ENV, raw)
        with pytest.raises(ConfigError, match=_index.TRUST_ENV):
            _index.trust_from_env()
    assert MetadataIndex(trust_s=0.25).status()["trust_s"] == 0.25
