"""Ray token authentication stays on: no library code opts out, and a cluster started as docs/cluster.md says
(``ray start --head`` with ``RAY_AUTH_MODE=token`` and a mode-600 token file) runs a CLI extraction for a driver
holding its token and refuses one holding a wrong token or none, with our one-line error and nothing written."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage.api import ActivationLoader

from .conftest import reference

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
RUN_RE = re.compile(r"run (\S+) saved at")
REFUSED = "refused this process' authentication token"
N_PROMPTS = 6


def test_no_library_code_disables_ray_auth():
    """No module of the package (CLI included) sets RAY_AUTH_MODE, let alone to 'disabled'."""
    sets = re.compile(r"""RAY_AUTH_MODE["']?\s*[\],:]?\s*=?\s*["']?disabled"""
                      r"""|environ\.setdefault\(\s*["']RAY_AUTH_MODE|environ\[\s*["']RAY_AUTH_MODE["']\s*\]\s*=(?!=)"""
                      r"""|putenv\(\s*["']RAY_AUTH_MODE""")
    assert sets.search('os.environ.setdefault("RAY_AUTH_MODE", "disabled")')  # what the library used to do
    assert sets.search("RAY_AUTH_MODE=disabled") and sets.search('{"RAY_AUTH_MODE": "disabled"}')
    assert sets.search("os.environ['RAY_AUTH_MODE'] = 'token'") and not sets.search('os.environ.get("RAY_AUTH_MODE")')
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "easyroutine_dist").rglob("*.py")
                 if sets.search(p.read_text())]
    assert offenders == []


def test_auth_refusals_are_recognised():
    """The shapes of Ray's refusals (seen with Ray 2.60): AuthenticationError from ray.init when no token is found,
    and the ConnectionError ray.init raises once the GCS has answered InvalidAuthToken; other failures are not."""
    from ray.exceptions import AuthenticationError

    from easyroutine_dist.distributed.extractor import DistributedExtractor

    refused = DistributedExtractor._auth_refused
    gcs = RuntimeError("Failed to connect to GCS. Last connection error: ... ray.exceptions.AuthenticationError: "
                       "RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
    try:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from gcs
    except ConnectionError as exc:
        assert refused(exc)
    assert refused(AuthenticationError("Token authentication is enabled but no authentication token was found"))
    down = RuntimeError("Failed to connect to GCS. Last connection error: Timed out while waiting for GCS")
    try:
        raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from down
    except ConnectionError as exc:
        assert not refused(exc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ip() -> str | None:
    """This machine's address on its network (as Ray finds it), if it has one besides loopback."""
    from ray.util import get_node_ip_address

    ip = get_node_ip_address()
    return None if ip.startswith("127.") else ip


def _private_file(path: Path, text: str) -> Path:
    """A token file as the docs create it: mode 600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def _base_env(home: Path) -> dict[str, str]:
    """This process' environment without any Ray auth setting or address, and a HOME without ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    return env


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """``ray start --head --block`` with token auth, dashboard on 127.0.0.1, in its own temp dir and process group.
    Yields (address, dashboard url, token, token file, HOME); stopping it touches no other Ray cluster."""
    work = tmp_path_factory.mktemp("auth")
    home = work / "home"
    home.mkdir()
    token = secrets.token_hex(32)
    token_file = _private_file(work / "ray-token", token)
    temp_dir = tempfile.mkdtemp(prefix="erauth-", dir="/tmp")  # short: Ray's socket paths live under it
    port, dash_port = _free_port(), _free_port()
    env = {**_base_env(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dash_port}", "--disable-usage-stats"]
    # every other port Ray would take at a fixed default, so concurrent clusters on this machine do not collide
    for flag in ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "runtime-env-agent-port", "metrics-export-port"):
        cmd.append(f"--{flag}={_free_port()}")
    log = open(work / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in (work / "head.log").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, (work / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", f"http://127.0.0.1:{dash_port}", token, token_file, home
    finally:
        _stop(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stop this test's head and only its processes: SIGTERM (``--block`` stops what it started), then SIGKILL to
    its process group and to any process whose command line names its private temp dir (not ``ray stop``, which
    would stop every Ray cluster of this user)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                mine = temp_dir.encode() in f.read()
            if mine:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def _extract(address: str, env: dict[str, str], model_dir: str, prompts_txt: Path, base_dir: Path, **extra_env):
    cmd = [str(BIN / "easyroutine-dist"), "extract", "--ray-address", address, "--model", model_dir,
           "--dataset", str(prompts_txt), "--base-dir", str(base_dir), "--experiment", "auth",
           "--num-workers", "1", "--batch-size", "2", "--partition-size", "4", "--positions", "last",
           "--extract", "resid_out"]
    return subprocess.run(cmd, env={**env, **extra_env}, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory, texts):
    path = tmp_path_factory.mktemp("auth-data") / "prompts.txt"
    path.write_text("".join(f"{t}\n" for t in texts[:N_PROMPTS]))
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_token_cluster_runs_cli_extraction_only_with_its_token(token_cluster, model_dir, prompts_txt, hooked_ref,
                                                                 texts, tmp_path):
    address, dashboard, token, token_file, home = token_cluster

    # the job API listens on 127.0.0.1 only, refuses a request without the token (401) or with a wrong one (403)
    # and answers one with it
    port = int(dashboard.rsplit(":", 1)[1])
    other_ip = _non_loopback_ip()
    if other_ip:
        with pytest.raises(OSError):
            socket.create_connection((other_ip, port), timeout=5).close()
    for header, code in ((None, 401), (f"Bearer {secrets.token_hex(32)}", 403)):
        request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": header} if header else {})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == code
    request = urllib.request.Request(f"{dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    assert urllib.request.urlopen(request, timeout=30).status == 200

    # Ray retries a refused GCS connection ~20 times, a second each; 2 keep the refused cases short
    quick = {"RAY_NUM_REDIS_GET_RETRIES": "2"}
    env = _base_env(home)
    cases = {
        "wrong token in RAY_AUTH_TOKEN": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)},
        "no token (Ray's defaults, empty HOME)": {},
    }
    for name, auth in cases.items():
        base = tmp_path / re.sub(r"\W+", "-", name)
        result = _extract(address, env, model_dir, prompts_txt, base, **auth, **quick)
        assert result.returncode == 1, (name, result.stdout, result.stderr[-3000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and REFUSED in errors[0], (name, result.stderr[-3000:])
        for how in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"):
            assert how in errors[0], (name, how, errors[0])
        assert "Traceback" not in result.stderr and token not in result.stdout + result.stderr
        assert not base.exists(), (name, sorted(p.name for p in base.rglob("*")))

    # the cluster's token from a mode-600 file: the run is committed and holds what one process computes
    base = tmp_path / "runs"
    result = _extract(address, env, model_dir, prompts_txt, base, RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN_PATH=str(token_file))
    assert result.returncode == 0, (result.stdout, result.stderr[-3000:])
    run_id = RUN_RE.search(result.stdout).group(1)
    found = ActivationLoader(base, "auth").query()
    assert [e["run_id"] for e in found] == [run_id]
    cache, meta = found.load(run_id)
    assert meta["distributed"]["dataset"]["n_rows"] == N_PROMPTS
    ref = reference(hooked_ref, texts[:N_PROMPTS], batch_size=2, positions=["last"],
                    config=ExtractionConfig(extract_resid_out=True, save_logits=False))
    for key in ("resid_out_0", "resid_out_2"):
        assert torch.allclose(cache[key], ref[key], atol=1e-5), key
    assert token not in result.stdout + result.stderr
