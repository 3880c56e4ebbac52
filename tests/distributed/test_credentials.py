"""Credentials never travel through Ray nor persist: refused in storage_options/model_kwargs, absent from Ray's
session folder (logs, spilled objects) and from storage after a real run; the index holds none; rotated
credentials are picked up by workers and the index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from easyroutine_dist.errors import ConfigError
from easyroutine_dist.storage.api import ActivationSaver

from .conftest import CONFIG, POSITIONS

REPO = Path(__file__).resolve().parents[2]


def _objects(endpoint: str, bucket_url: str) -> dict[str, bytes]:
    """Every object of the bucket, read with boto3 (not the code under test)."""
    import boto3

    from tests.s3_fixtures import _KEY, _REGION, _SECRET

    client = boto3.client("s3", endpoint_url=endpoint, region_name=_REGION, aws_access_key_id=_KEY,
                          aws_secret_access_key=_SECRET)
    bucket = bucket_url.replace("s3://", "")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


# ---------------------------------------------------------------------------------------------- refusals
def test_secret_names_are_found_at_any_depth():
    from easyroutine_dist.distributed.credentials import public_options, secret_paths

    opts = {"key": "AKIAX", "secret": "s", "anon": False, "token": None, "client_kwargs": {
        "endpoint_url": "http://e", "region_name": "r", "aws_session_token": "t"}, "config_kwargs": {"x": 1}}
    assert secret_paths(opts) == ["key", "secret", "client_kwargs.aws_session_token"]
    assert public_options(opts) == {"anon": False, "token": None, "config_kwargs": {"x": 1},
                                    "client_kwargs": {"endpoint_url": "http://e", "region_name": "r"}}
    assert secret_paths({"token": "anon", "profile": "p", "endpoint_url": "x"}) == []  # modes and names travel


@pytest.mark.slow
@pytest.mark.s3
def test_secrets_in_storage_options_are_refused_and_nothing_is_written(ray_cluster, model_dir, texts, s3_endpoint,
                                                                      s3_bucket_url, s3_storage_options):
    from easyroutine_dist.distributed import DistributedExtractor

    with pytest.raises(ConfigError, match="token") as err:
        DistributedExtractor(model_dir, num_workers=1, model_kwargs={"token": "hf_not_a_real_token"})
    assert "HF_TOKEN" in str(err.value) and "hf_not_a_real_token" not in str(err.value)
    ex = DistributedExtractor(model_dir, num_workers=1)
    saver = ActivationSaver(f"{s3_bucket_url}/acts", experiment_name="creds", storage_options=s3_storage_options)
    with pytest.raises(ConfigError) as err:
        ex.extract(texts[:4], POSITIONS, CONFIG, saver, partition_size=2)
    msg = str(err.value)
    for hint in ("key", "secret", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "instance role", "ship_credentials"):
        assert hint in msg, (hint, msg)
    assert s3_storage_options["secret"] not in msg
    with pytest.raises(ConfigError, match="ship_credentials"):
        ex.logit_lens({"run_id": "x", "experiment_name": "creds"}, saver, {"target_key": "resid_out_{i}"})
    assert ex.workers == []  # refused before any worker started
    assert _objects(s3_endpoint, s3_bucket_url) == {}  # and before anything was written


# ---------------------------------------------------------------------------------------------- the index
def test_index_holds_no_credentials(monkeypatch, tmp_path):
    from easyroutine_dist.distributed import index
    from easyroutine_dist.storage.fs import resolve

    with pytest.raises(ConfigError, match="no credentials"):
        index.MetadataIndex()._catalog("s3://b/acts", {"key": "k", "secret": "s"})
    calls = []

    class FakeIndex:
        class register:  # noqa: N801 - mimics an actor method
            @staticmethod
            def remote(*args, **kwargs):  # kwargs: e.g. caller_node for local roots
                calls.append((*args, kwargs))

    monkeypatch.setattr(index, "get_index", lambda create=True: FakeIndex)
    monkeypatch.setattr(index.ray, "get", lambda ref, timeout=None: None)
    monkeypatch.setattr(index.ray, "is_initialized", lambda: True)  # as in a driver; the fake stands for the actor
    store = resolve("memory://creds-index")
    store.protocol, store.storage_options = "s3", {"key": "AKIAX", "secret": "sekrit", "client_kwargs": {"a": 1}}
    index.register_run(store, {"run_id": "r", "experiment_name": "e"})
    assert "sekrit" not in json.dumps(calls, default=str) and calls[0][1]["client_kwargs"] == {"a": 1}
    monkeypatch.setattr(index.ray, "is_initialized", lambda: True)
    assert index._query_provider(store, None) is None  # a caller with its own secrets reads the catalog itself


def test_index_and_worker_pick_up_rotated_credentials(monkeypatch, tmp_path):
    """A cached writer / catalog is rebuilt when the credentials a new client would use change."""
    from easyroutine_dist.distributed.index import MetadataIndex
    from easyroutine_dist.distributed.worker import ExtractionWorker

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-1")
    worker = ExtractionWorker.__new__(ExtractionWorker)  # no model: only the writer cache is under test
    worker._writers = {}
    storage = {"base_dir": str(tmp_path / "acts"), "storage_options": {}, "max_shard_bytes": None}
    first = worker._writer(storage)
    assert worker._writer(dict(storage)) is first  # unchanged credentials: reused
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-2")
    second = worker._writer(storage)
    assert second is not first and worker._writer(storage) is second
    shipped = {**storage, "storage_options": {"key": "id-1", "secret": "shipped-1"}}
    third = worker._writer(shipped)
    assert third is not second  # other shipped secrets: another client
    assert worker._writer({**shipped, "storage_options": {"key": "id-1", "secret": "shipped-2"}}) is not third
    assert len(worker._writers) == 1  # one client per root: rotated ones are dropped, not kept

    idx = MetadataIndex()
    base = str(tmp_path / "acts")
    cat = idx._catalog(base, {})
    assert idx._catalog(base, {}) is cat
    monkeypatch.setenv("AWS_SESSION_TOKEN", "token-2")
    assert idx._catalog(base, {}) is not cat


# ---------------------------------------------------------------------------------------------- end to end
_SCRIPT = r'''
import importlib.util, json, os, sys
import numpy as np
import ray
import easyroutine_dist.distributed.extractor as extractor_mod
from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.distributed import DistributedExtractor
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

args = json.loads(sys.argv[1])  # no secret here: Ray records the driver's command line
needles = {n: os.environ[n].encode() for n in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "CONTROL_SECRET")}
spill = os.path.join(args["temp_dir"], "spill")
# a huge min_spilling_size makes every spill take *all* spillable objects (the run's job object included)
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=args["temp_dir"],
         object_store_memory=80 * 1024 * 1024,
         _system_config={"object_spilling_config": json.dumps(
             {"type": "filesystem", "params": {"directory_path": spill}}), "min_spilling_size": 2 ** 40},
         runtime_env={"env_vars": {"PYTHONPATH": args["repo"], "HF_HUB_OFFLINE": "1",
                                   "TOKENIZERS_PARALLELISM": "false"}})
session = ray._private.worker._global_node.get_session_dir_path()
original = extractor_mod.schedule
spilled = []  # per run: {needle name: found in the spilled objects}

def schedule_after_spilling(*a, **kw):
    # the run's objects (job, source) are in the store now: fill it so that they are spilled, then search the files
    filler = [ray.put(np.full(25 * 1024 * 1024, i, dtype=np.uint8)) for i in range(4)]
    found, size = {n: False for n in needles}, 0
    for folder, _, names in os.walk(spill):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            size += len(data)
            for n, v in needles.items():
                found[n] = found[n] or v in data
    spilled.append({"bytes": size, **found})
    del filler
    return original(*a, **kw)

extractor_mod.schedule = schedule_after_spilling
# the distributed example as a user runs it on S3 (AWS_* and AWS_ENDPOINT_URL in the environment): extract with
# the lens, load, query (through the index actor) and a post-hoc lens on the workers (which read the source run)
spec = importlib.util.spec_from_file_location("distributed_example", args["example"])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
res = example.main(["--base-dir", args["base"], "--num-prompts", "6", "--num-workers", "1", "--partition-size", "2",
                    "--batch-size", "2"])
queried = len(ActivationLoader(args["base"], "distributed-example").query())
roots = ray.get(ray.get_actor("easyroutine_dist_index", namespace="easyroutine_dist").status.remote())["roots"]
# positive control: a secret shipped on purpose is found by the same search
control = {"key": "control-key-id", "secret": os.environ["CONTROL_SECRET"]}
with DistributedExtractor(args["model"], num_workers=1, ship_credentials=True) as ex:
    saver = ActivationSaver(args["base"], "control", storage_options=control)
    ex.extract(args["texts"], ["last"], ExtractionConfig(extract_resid_out=True), saver, batch_size=2,
               partition_size=2)
print("RESULT " + json.dumps({"session": session, "queried": queried, "roots": roots, "spilled": spilled}))
ray.shutdown()
'''


def _files_containing(root: str, needles: list[bytes]) -> dict[bytes, list[str]]:
    found: dict[bytes, list[str]] = {n: [] for n in needles}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            for n in needles:
                if n in data:
                    found[n].append(path)
    return found


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.timeout(600)
def test_secrets_reach_neither_ray_session_nor_storage(model_dir, texts, s3_endpoint, s3_bucket_url):
    """The distributed example on S3 (extract with the lens, a query through the index, a post-hoc lens) on its own
    Ray cluster whose driver and nodes hold unique credentials in their environment. Each run's objects (job,
    source) are forced out to Ray's spill files while alive and searched there; afterwards Ray's session folder
    (logs...), the driver's output and every object of the bucket are searched too: the credentials are nowhere.
    A last run that ships other credentials on purpose shows the same search finds a secret that went through Ray."""
    secret, token = f"node-secret-{uuid.uuid4().hex}", f"node-token-{uuid.uuid4().hex}"
    control_secret = f"shipped-secret-{uuid.uuid4().hex}"
    temp_dir = tempfile.mkdtemp(prefix="raycred")  # short: Ray's socket paths live under it
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "node-key-id", "AWS_SECRET_ACCESS_KEY": secret,
           "AWS_SESSION_TOKEN": token, "AWS_DEFAULT_REGION": "us-east-1", "PYTHONPATH": str(REPO),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    env.update(AWS_ENDPOINT_URL=s3_endpoint, CONTROL_SECRET=control_secret)
    env.pop("AWS_ENDPOINT_URL_S3", None)
    args = {"temp_dir": temp_dir, "repo": str(REPO), "example": str(REPO / "examples" / "distributed_extraction.py"),
            "model": model_dir, "base": f"{s3_bucket_url}/acts", "texts": texts[:6]}
    try:
        proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(args)], env=env, capture_output=True,
                              text=True, timeout=540)
        _check_no_secret_left(proc, temp_dir, secret, token, control_secret, s3_endpoint, s3_bucket_url)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def _check_no_secret_left(proc, temp_dir, secret, token, control_secret, s3_endpoint, s3_bucket_url):
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert out["queried"] == 2 and any(r.endswith("/acts") for r in out["roots"]), out  # the index answered
    assert out["session"].startswith(temp_dir) and len(out["spilled"]) == 3, out
    for run in out["spilled"]:  # while each run's objects were alive, they were spilled and searched
        assert run["bytes"] > 50 * 1024 * 1024 and not run["AWS_SECRET_ACCESS_KEY"] and not run["AWS_SESSION_TOKEN"]
    assert [r["CONTROL_SECRET"] for r in out["spilled"]] == [False, False, True], out  # the shipped one is seen
    for text in (proc.stdout, proc.stderr):
        assert secret not in text and token not in text
    found = _files_containing(temp_dir, [secret.encode(), token.encode()])  # logs, session files, what is left
    assert found == {secret.encode(): [], token.encode(): []}, found
    objects = _objects(s3_endpoint, s3_bucket_url)
    assert any(k.endswith("_SUCCESS") for k in objects) and len(objects) > 10
    for needle in (secret, token, control_secret, "node-key-id", "control-key-id"):
        assert not [k for k, v in objects.items() if needle.encode() in v], needle
