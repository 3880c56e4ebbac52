"""Two Ray nodes on this machine (issue 15 item 3), started as docs/cluster.md says (``ray start --head`` and
``ray start --address=...``, token auth, CPU-only, one CPU each so each node holds one worker), an extraction to
the local S3 endpoint through the CLI, its driver SIGKILLed mid-run, then the exact resume command its log gave
before the model loaded: the resumed run holds every row once, equal to each prompt run alone through plain HF.

Each node runs in its own process group and temp dir; the test stops only those (never ``ray stop``)."""

from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage.api import ActivationLoader
from tests.s3_fixtures import NODE_AWS_ENV

from .conftest import reference
from .test_auth import BIN, REPO, _base_env, _free_port, _private_file, _stop

pytestmark = [pytest.mark.slow, pytest.mark.s3]

N_PROMPTS, PARTITION = 12, 2  # 6 partitions; at most 4 are in flight when the driver dies (2 workers x 2)
FORWARD_DELAY_S = "1.5"
CONFIG = ExtractionConfig(extract_resid_out=True, save_logits=False)


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """``ray start --block ...`` in a new process group (so the test can stop it and only it)."""
    ports = []
    for flag in ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
                 "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"):
        ports.append(f"--{flag}={_free_port()}")
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
           "--disable-usage-stats", *ports, *args]
    return subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(log: Path, proc: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _alive_nodes(address: str, env: dict[str, str]) -> int:
    out = subprocess.run([str(BIN / "ray"), "status", f"--address={address}"], env=env, capture_output=True,
                         text=True, timeout=60)
    active = out.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"\bnode_[0-9a-f]+", active))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory, model_dir):
    """A head and a worker node, token auth, each with 1 CPU; yields (address, env for clients, node env)."""
    work = tmp_path_factory.mktemp("multinode")
    home = work / "home"
    home.mkdir()
    token_file = _private_file(work / "ray-token", secrets.token_hex(32))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    # the nodes' own environment: S3 keys of the local endpoint (as an instance role would give), the model
    node_env = {**_base_env(home), **auth, **NODE_AWS_ENV, "ERD_TEST_MODEL_DIR": model_dir,
                "ERD_TEST_FORWARD_DELAY": FORWARD_DELAY_S}
    temp_dirs = [tempfile.mkdtemp(prefix=f"ermn{i}-", dir="/tmp") for i in range(2)]  # short: socket paths
    port = _free_port()
    address = f"127.0.0.1:{port}"
    procs: list[tuple[subprocess.Popen, str]] = []
    try:
        head = _start_node(["--head", f"--port={port}", f"--temp-dir={temp_dirs[0]}", "--dashboard-host=127.0.0.1",
                            f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}"],
                           node_env, work / "head.log")
        procs.append((head, temp_dirs[0]))
        _wait_for(work / "head.log", head, "Ray runtime started")
        worker = _start_node([f"--address={address}", f"--temp-dir={temp_dirs[1]}"], node_env, work / "worker.log")
        procs.append((worker, temp_dirs[1]))
        _wait_for(work / "worker.log", worker, "Ray runtime started")
        client_env = {**_base_env(home), **auth}
        deadline = time.monotonic() + 60
        while _alive_nodes(address, client_env) < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(1)
        yield address, client_env
    finally:
        for proc, temp_dir in reversed(procs):
            _stop(proc, temp_dir)
        for d in temp_dirs:
            shutil.rmtree(d, ignore_errors=True)


def _lines(proc: subprocess.Popen) -> "queue.Queue[str | None]":
    """The driver's stdout, line by line, read in a thread (None at its end)."""
    q: "queue.Queue[str | None]" = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def test_two_nodes_driver_killed_mid_run_then_resumed(two_nodes, hooked_ref, texts, tmp_path, s3_endpoint,
                                                     s3_bucket_url):
    address, client_env = two_nodes
    prompts = texts[:N_PROMPTS]
    (tmp_path / "prompts.txt").write_text("".join(f"{t}\n" for t in prompts))
    # the driver's environment: the cluster's token, the endpoint and the keys a user would export
    env = {**client_env, **NODE_AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint}
    base = f"{s3_bucket_url}/runs"
    cmd = [str(BIN / "easyroutine-dist"), "extract", "--ray-address", address,
           "--model", "tests.distributed.delayed:delayed_tiny", "--dataset", "prompts.txt", "--base-dir", base,
           "--experiment", "multinode", "--num-workers", "2", "--gpus-per-worker", "0", "--cpus-per-worker", "1",
           "--batch-size", "2", "--partition-size", str(PARTITION), "--positions", "last", "--extract", "resid_out",
           "--log-format", "json"]

    # 1. the driver dies (SIGKILL) once the first partition is committed
    driver = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=open(tmp_path / "d1.err", "w"),
                              text=True)
    lines, events = _lines(driver), []
    try:
        deadline = time.monotonic() + 300
        while not any(e["event"] == "part_committed" for e in events):
            line = lines.get(timeout=max(1.0, deadline - time.monotonic()))
            assert line is not None, (driver.wait(), (tmp_path / "d1.err").read_text()[-3000:])
            events.append(json.loads(line))  # stdout holds JSON events only
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["run_started", "workers_ready"], kinds  # the run id came before the model loaded
    started = events[0]
    run_id = started["run_id"]
    assert started["n_partitions"] == N_PROMPTS // PARTITION
    nodes = {w["node_id"] for w in events[1]["workers"]}
    assert len(nodes) == 2, events[1]["workers"]  # one worker on each node

    # 2. the exact command its log gave, run as is
    resume = shlex.split(started["resume_command"])
    assert resume[-3:] == ["--run-id", run_id, "--resume"] and resume[1:-3] == cmd[1:]
    assert os.path.basename(resume[0]) == "easyroutine-dist"
    done = subprocess.run(resume, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    events2 = [json.loads(line) for line in done.stdout.splitlines()]
    assert events2[0]["event"] == "run_started" and events2[0]["resume"] is True and events2[0]["run_id"] == run_id
    summary = events2[-1]
    assert summary["event"] == "run_committed" and summary["resumed"] is True
    parts = summary["partitions"]
    assert parts["total"] == N_PROMPTS // PARTITION and parts["skipped"] + parts["computed"] == parts["total"]
    assert parts["skipped"] >= 1 and parts["computed"] >= 2, parts  # the kill really was mid-run
    assert summary["rows"] == N_PROMPTS and summary["bytes_written"] > 0
    assert sorted(w["node_id"] for w in summary["workers"]) == sorted(nodes)
    assert all(w["partitions"] >= 1 for w in summary["workers"]), summary["workers"]  # both nodes worked

    # 3. every row once, in order, equal to the prompt alone through plain HF
    loader = ActivationLoader(base, "multinode", storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}})
    found = loader.query()
    assert [e["run_id"] for e in found] == [run_id]
    cache, meta = found.load(run_id)
    ref = reference(hooked_ref, prompts, positions=["last"], config=CONFIG)
    n_layers = len(hooked_ref.hf_model.model.layers)
    for i in range(n_layers):
        key = f"resid_out_{i}"
        assert cache[key].shape[0] == N_PROMPTS, key
        assert torch.allclose(cache[key], ref[key], atol=1e-5, rtol=1e-4), key
    assert cache["token_dict"] == ref["token_dict"]
    assert meta["distributed"]["dataset"]["n_rows"] == N_PROMPTS
