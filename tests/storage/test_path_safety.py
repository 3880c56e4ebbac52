"""Issue 8 item 5: names read back from storage (catalog entries, snapshots, run markers, part records) are
validated like names written. Entries planted with ``../`` names are skipped with a WARNING naming the file and
never used as paths: nothing outside base_dir is read or removed (local disk and S3)."""

from __future__ import annotations

import json
import logging
import os
import posixpath

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import MetadataError, StorageError
from easyroutine_dist.storage import layout, providers
from easyroutine_dist.storage.api import QueryResult
from easyroutine_dist.storage.verify import scan_run

EVIL_RUN = "../../../victim"  # from <base>/<exp>/<model>/: <base>/../victim
EVIL_SHARD = "../../../../../victim.safetensors"  # from <base>/<exp>/<model>/<run>/shards/: <base>/../victim...
FAKE_ID = "2024-01-01_00-00-00-000000_0badc0de"
_WATCHED = ("cat_file", "cat", "open", "rm", "rm_file", "rmdir", "ls", "find", "glob", "exists", "copy", "cp_file",
            "pipe_file", "info", "isdir", "isfile", "put_file", "get_file", "mv")


class Site:
    """A storage root with a victim outside it: local ``<tmp>/acts`` + ``<tmp>/victim``, or the same in a bucket."""

    def __init__(self, request, tmp_path, where: str) -> None:
        from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

        if where == "local":
            self.url, self.options = str(tmp_path / "acts"), None
        else:
            self.url = request.getfixturevalue("s3_bucket_url") + "/acts"
            self.options = request.getfixturevalue("s3_storage_options")
        self.saver = ActivationSaver(self.url, "default", storage_options=self.options)
        self.Loader = ActivationLoader
        self.store = self.saver.store
        self.fs = self.store.fs
        self.root = self.store.root
        self.outside = posixpath.dirname(self.root)  # the victim lives next to the root
        self.victims = [f"{self.outside}/victim/keep.txt", f"{self.outside}/victim.json",
                        f"{self.outside}/victim.safetensors"]
        for v in self.victims:
            if where == "local":
                os.makedirs(posixpath.dirname(v), exist_ok=True)
            self.fs.pipe_file(v, b"must survive")

    def loader(self):
        return self.Loader(self.url, "default", storage_options=self.options)

    def put_json(self, rel: str, obj) -> None:
        path = f"{self.root}/{rel}"
        if self.store.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.pipe_file(path, json.dumps(obj).encode())

    def assert_victims_survive(self) -> None:
        for v in self.victims:
            assert self.fs.cat_file(v) == b"must survive", v


@pytest.fixture(params=["local", "s3"])
def site(request, tmp_path) -> Site:
    return Site(request, tmp_path, request.param)


class Spy:
    """Every path the code under test hands to the filesystem object of a store (the given ones and every store
    resolved from now on), and to os.listdir."""

    def __init__(self, monkeypatch, *stores) -> None:
        from easyroutine_dist.storage import api, fs as fs_mod

        scope = posixpath.dirname(stores[0].root)  # the folder holding base_dir and the victims

        self.paths: list[tuple[str, str]] = []
        self._mp = monkeypatch
        self._seen: set[int] = set()
        for store in stores:
            self._watch(store)
        real_resolve = fs_mod.resolve

        def resolve(*a, **kw):
            return self._watch(real_resolve(*a, **kw))

        monkeypatch.setattr(api, "resolve", resolve)
        real_listdir = os.listdir

        def listdir(path="."):
            if str(path).startswith(str(scope)):  # (libraries list their own folders: not ours to watch)
                self.paths.append(("listdir", str(path)))
            return real_listdir(path)

        monkeypatch.setattr(os, "listdir", listdir)

    def _watch(self, store):
        fs = store.fs
        if id(fs) in self._seen:
            return store
        self._seen.add(id(fs))
        for name in _WATCHED:
            orig = getattr(fs, name, None)
            if orig is None:
                continue

            def wrapped(*a, _orig=orig, _name=name, **kw):
                for arg in list(a[:2] if _name in ("copy", "cp_file", "mv") else a[:1]) + [kw.get("path")]:
                    if isinstance(arg, str):
                        self.paths.append((_name, arg))
                return _orig(*a, **kw)

            self._mp.setattr(fs, name, wrapped)
        return store

    def outside(self, root: str) -> list[tuple[str, str]]:
        """Accesses whose normalised path is not under ``root``."""
        return [(n, p) for n, p in self.paths
                if not posixpath.normpath(p.split("://", 1)[-1]).startswith(root.rstrip("/") + "/")
                and posixpath.normpath(p.split("://", 1)[-1]) != root.rstrip("/")]


def _save(site: Site, value: float, tag: str) -> str:
    site.saver.save({"x": torch.full((2, 3), value)}, "m", ["last"], None, ExtractionConfig(), tag=tag)
    return site.loader().query(tag=tag)[-1]["run_id"]


def _evil_entry(**over):
    entry = {"experiment_name": "default", "model_name": "m", "run_id": EVIL_RUN, "tag": "evil", "save_time": "x",
             "saved_at_unix": 1.0}
    entry.update(over)
    return entry


def _warned(caplog, *needles: str) -> bool:
    return any(r.levelno == logging.WARNING and all(n in r.getMessage() for n in needles) for r in caplog.records)


def test_planted_catalog_entry_is_skipped_and_never_removes_outside(site, monkeypatch, caplog):
    good = _save(site, 1.0, "good")
    site.put_json(f"_catalog/default/{FAKE_ID}.json", _evil_entry())  # a valid file name, an evil run id
    site.put_json("_catalog/default/evil.json", _evil_entry(run_id=FAKE_ID))  # an evil file name
    spy = Spy(monkeypatch, site.store)
    caplog.set_level(logging.WARNING)
    res = site.loader().query()
    assert [e["run_id"] for e in res] == [good]
    assert _warned(caplog, f"{FAKE_ID}.json", "victim") and _warned(caplog, "evil.json")
    res.remove(good)
    assert site.loader().query().results == []
    assert spy.outside(site.root) == []
    site.assert_victims_survive()


def test_planted_snapshot_entries_are_skipped(site, monkeypatch, caplog):
    good = _save(site, 1.0, "good")
    # the entry file exists (so the snapshot is consulted for it) and the snapshot says it is the evil run
    site.put_json(f"_catalog/default/{FAKE_ID}.json", _evil_entry())
    site.put_json("_catalog/_snapshots/default.json",
                  {"entries": {f"{FAKE_ID}.json": _evil_entry(), "x.json": _evil_entry(run_id=FAKE_ID)}})
    spy = Spy(monkeypatch, site.store)
    caplog.set_level(logging.WARNING)
    res = site.loader().query()
    assert [e["run_id"] for e in res] == [good]
    assert _warned(caplog, "default.json", "victim")
    for e in list(res):
        res.remove(e["run_id"])
    assert spy.outside(site.root) == []
    site.assert_victims_survive()


def test_planted_shard_file_in_a_record_is_refused(site, monkeypatch):
    good = _save(site, 1.0, "good")
    res = site.loader().query()
    entry = res[-1]
    rdir = f"{site.root}/default/m/{good}"
    rec = json.loads(site.fs.cat_file(f"{rdir}/records/part-00000.json"))
    (shard,) = rec["shards"]
    # the victim is a real copy of the shard: a loader that followed the name would load it without complaint
    site.fs.pipe_file(f"{site.outside}/victim.safetensors", site.fs.cat_file(f"{rdir}/shards/{shard['file']}"))
    site.victims = site.victims[:2]
    for bad in (EVIL_SHARD, "../../x", "/etc/passwd", "part-00000-0000.safetensors/../../y"):
        rec["shards"][0]["file"] = bad
        site.fs.rm(f"{rdir}/records/part-00000.json")
        site.fs.pipe_file(f"{rdir}/records/part-00000.json", json.dumps(rec).encode())
        spy = Spy(monkeypatch, site.store, res.store)
        with pytest.raises(StorageError, match="part-00000.json"):
            res.load(good)
        with pytest.raises(StorageError, match="part-00000.json"):
            list(res.iter_parts(good))
        with pytest.raises(StorageError, match="part-00000.json"):
            res.update_run_experiment(good, "elsewhere")
        assert scan_run(site.store, rdir).invalid_records == ("records/part-00000.json",)
        assert spy.outside(site.root) == [], bad
        monkeypatch.undo()
    assert site.fs.find(f"{site.root}/elsewhere") == []  # nothing was copied
    site.assert_victims_survive()
    assert entry["run_id"] == good


def test_planted_run_marker_is_skipped_by_rebuild(site, monkeypatch, caplog):
    good = _save(site, 1.0, "good")
    rdir = f"default/m/{FAKE_ID}"
    marker = {"schema_version": 2, "parts": [0],
              "metadata": _evil_entry(run_id=EVIL_RUN)}
    site.put_json(f"{rdir}/_SUCCESS", marker)
    other = "2024-01-01_00-00-00-000001_0badc0de"
    site.put_json(f"default/m/{other}/_SUCCESS",
                  dict(marker, metadata=_evil_entry(run_id=other, experiment_name="elsewhere")))  # wrong place
    spy = Spy(monkeypatch, site.store)
    caplog.set_level(logging.WARNING)
    assert site.loader().rebuild_catalog() == 1
    assert _warned(caplog, FAKE_ID, "_SUCCESS") and _warned(caplog, other, "_SUCCESS")
    assert [e["run_id"] for e in site.loader().query(experiment_name="*")] == [good]
    assert spy.outside(site.root) == []
    site.assert_victims_survive()


def test_entries_from_a_provider_or_a_user_are_checked_before_use(site, monkeypatch, caplog):
    good = _save(site, 1.0, "good")
    real = site.loader().query()[-1]
    monkeypatch.setattr(providers, "_PROVIDERS", {"evil": lambda store, exp: [real, _evil_entry()]})
    caplog.set_level(logging.WARNING)
    assert [e["run_id"] for e in site.loader().query()] == [good]
    assert _warned(caplog, "victim")
    monkeypatch.setattr(providers, "_PROVIDERS", {})
    spy = Spy(monkeypatch, site.store)
    loader = site.loader()
    forged = QueryResult(loader.store, loader.catalog, [real, _evil_entry(),
                                                        _evil_entry(run_id=FAKE_ID, model_name="../../..")])
    for which in (EVIL_RUN, FAKE_ID):
        for action in (forged.remove, forged.load, lambda w: list(forged.iter_parts(w))):
            with pytest.raises(MetadataError):
                action(which)
    with pytest.raises(MetadataError):
        forged.get_paths()
    with pytest.raises(MetadataError):
        loader.catalog.discard("default", EVIL_RUN)
    assert spy.outside(site.root) == []
    site.assert_victims_survive()
    assert torch.equal(forged.load(good)[0]["x"], torch.full((2, 3), 1.0))


def test_layout_checks_shard_names():
    assert layout.check_shard_file("part-00003-0001-0123456789abcdef.safetensors", 3)
    assert layout.check_shard_file("part-00003-0001.safetensors", 3)  # runs written before attempt tokens
    for bad in ("../part-00003-0001.safetensors", "part-00003-0001.safetensors.tmp-1", "part-3-1.safetensors",
                "part-00003-0001-0123456789ABCDEF.safetensors", None, 7):
        with pytest.raises(MetadataError):
            layout.check_shard_file(bad)
    with pytest.raises(MetadataError, match="part 4"):
        layout.check_shard_file("part-00003-0001.safetensors", 4)
