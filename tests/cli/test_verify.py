"""``easyroutine-dist verify``: exit 0 and one summary line for an intact run; exit 1 and one line per problem,
naming the file, for a corrupted shard, a deleted shard and an orphan; ``--remove-orphans`` deletes only files no
commit record references. On local disk and on the local S3 endpoint."""

from __future__ import annotations

import json

import pytest
import torch

from easyroutine_dist.storage.api import ActivationLoader

from .conftest import invoke, save_run, tensors


@pytest.fixture(params=["local", "s3"])
def place(request, tmp_path, monkeypatch):
    """``(base_dir URL, storage_options for Python)``; S3 reaches the local endpoint through the AWS_* env vars,
    as the CLI would on a real machine."""
    if request.param == "local":
        return str(tmp_path / "runs"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    return request.getfixturevalue("s3_bucket_url") + "/acts", None


def _shards(loader, run_id):
    """The run's folder and its shard files, read from its committed record (not from verify)."""
    result = loader.query(experiment_name="exp")
    store = result.store
    from easyroutine_dist.storage.runs import read_marker, run_dir

    rdir = run_dir(store, next(e for e in result if e["run_id"] == run_id))
    files = [sh["file"] for rec in read_marker(store, rdir)["records"] for sh in rec["shards"]]
    return store, rdir, files


def test_verify_finds_corrupt_missing_and_orphans(place):
    base, options = place
    run_id = save_run(base, "exp", max_shard_bytes=2048, storage_options=options)  # several shards
    loader = ActivationLoader(base, "exp", storage_options=options)
    store, rdir, files = _shards(loader, run_id)
    assert len(files) >= 2

    ok = invoke("verify", run_id, "--base-dir", base)
    assert ok.exit_code == 0, ok.output
    lines = ok.stdout.strip().splitlines()
    assert len(lines) == 1 and f"run {run_id} is intact" in lines[0] and f"{len(files)} shard(s)" in lines[0]

    corrupt, deleted = files[0], files[1]
    raw = bytearray(store.fs.cat_file(f"{rdir}/shards/{corrupt}"))
    raw[-1] ^= 0xFF  # one bit of tensor data; the size stays the same
    store.fs.pipe_file(f"{rdir}/shards/{corrupt}", bytes(raw))
    store.fs.rm(f"{rdir}/shards/{deleted}")
    orphan = corrupt[:15] + "-0123456789abcdef.safetensors"  # the same part, another attempt's name
    store.fs.pipe_file(f"{rdir}/shards/{orphan}", b"left by an attempt that lost")

    bad = invoke("verify", run_id, "--base-dir", base, "--experiment", "exp")
    assert bad.exit_code == 1, bad.output
    assert "Traceback" not in bad.output
    problems = bad.stdout.strip().splitlines()[:-1]
    assert len(problems) == 3, bad.stdout
    by_kind = {line.split(":", 1)[0]: line for line in problems}
    assert set(by_kind) == {"corrupt", "missing", "orphan"}, problems
    assert f"shards/{corrupt}" in by_kind["corrupt"] and f"shards/{deleted}" in by_kind["missing"]
    assert f"shards/{orphan}" in by_kind["orphan"]
    assert "3 problem(s)" in bad.stdout.strip().splitlines()[-1]

    report = loader.query(experiment_name="exp").verify(run_id)  # the same through Python
    assert sorted((p.kind, p.path) for p in report.problems) == sorted(
        [("corrupt", f"shards/{corrupt}"), ("missing", f"shards/{deleted}"), ("orphan", f"shards/{orphan}")])

    cleaned = invoke("verify", run_id, "--base-dir", base, "--remove-orphans")
    assert cleaned.exit_code == 1  # the damaged shards remain problems: they are committed data
    assert "removed: " in cleaned.stdout and orphan in cleaned.stdout
    assert not store.fs.exists(f"{rdir}/shards/{orphan}")
    assert store.fs.exists(f"{rdir}/shards/{corrupt}")  # committed files are never removed
    left = {line.split(":", 1)[0] for line in cleaned.stdout.strip().splitlines()[:-1]
            if not line.startswith("removed")}
    assert left == {"corrupt", "missing"}


def test_remove_orphans_keeps_an_intact_run_loadable(tmp_path):
    base = tmp_path / "runs"
    run_id = save_run(base, "exp", max_shard_bytes=2048)
    loader = ActivationLoader(base, "exp")
    store, rdir, files = _shards(loader, run_id)
    orphan = files[0][:15] + "-fedcba9876543210.safetensors"
    (tmp_path / "runs").joinpath(rdir[len(str(base)) + 1:], "shards", orphan).write_bytes(b"x" * 10)
    stray = f"{rdir}/records/part-00007.json"  # a record of a part the marker does not list
    store.fs.pipe_file(stray, json.dumps({"part_id": 7, "shards": [], "keys": []}).encode())
    out = invoke("verify", run_id, "--base-dir", base, "--remove-orphans")
    assert out.exit_code == 0, out.output
    assert out.stdout.count("removed: ") == 2 and "is intact" in out.stdout
    cache, _ = loader.query().load(run_id)
    for k, v in tensors().items():  # the saved values, regenerated from the same seed
        assert torch.equal(cache[k], v), k
    again = invoke("verify", run_id, "--base-dir", base)
    assert again.exit_code == 0 and "removed" not in again.stdout


def test_verify_names_an_unknown_run(tmp_path):
    base = tmp_path / "runs"
    save_run(base, "exp")
    out = invoke("verify", "2020-01-01_00-00-00-000000_deadbeef", "--base-dir", base)
    assert out.exit_code == 2 and "no run '2020-01-01_00-00-00-000000_deadbeef'" in out.stderr


def test_verify_reports_an_uncommitted_run(tmp_path):
    from easyroutine_dist.storage.runs import RunWriter

    base = tmp_path / "runs"
    writer = RunWriter(str(base))
    run = writer.begin_run("exp", "org/model", {"tag": None})
    writer.write_part(run, 0, tensors())  # shards without a commit record: a crashed attempt
    save_run(base, "exp")  # the experiment exists in the catalog
    out = invoke("verify", run.run_id, "--base-dir", base)
    assert out.exit_code == 1, out.output
    kinds = [line.split(":", 1)[0] for line in out.stdout.strip().splitlines()[:-1]]
    assert kinds[0] == "not-committed" and kinds.count("uncommitted") >= 1, out.stdout


def test_verify_latest(tmp_path):
    base = tmp_path / "runs"
    save_run(base, "exp")
    newest = save_run(base, "other", seed=1)
    out = invoke("verify", "latest", "--base-dir", base)
    assert out.exit_code == 0 and f"run {newest} is intact" in out.stdout, out.output
