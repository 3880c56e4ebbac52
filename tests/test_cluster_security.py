"""Every recipe in cluster/ starts Ray with token authentication, the token from a secret the user controls (an SSM
parameter, a Kubernetes Secret, a mode-600 file per SLURM job; never a file of the repository), workers join with
it, and no dashboard / job API listens beyond localhost unless token auth is on. The checks run the recipes' shell
parts against stub commands and are themselves shown to catch mutated recipes."""

from __future__ import annotations

import copy
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_cluster_recipes import (CLUSTER, DOCS, RAY_UP, RAYCLUSTER, ROOT, SBATCH, _stub, load_one,
                                        pod_specs, rayjob_docs, wait_for_starts)

LOCALHOST = {"127.0.0.1", "localhost", "::1"}
TOKEN_SECRET_KEY = "auth_token"
MIN_TOKEN_RAY = (2, 52)  # the first Ray with token authentication


def dashboard_host(start_args: str) -> str:
    """The --dashboard-host of a ``ray start`` command line (Ray's default when absent: localhost)."""
    m = re.search(r"--dashboard-host[= ]\s*['\"]?([^\s'\"]+)", start_args)
    return m.group(1) if m else "127.0.0.1"


# --- ray up (AWS) ------------------------------------------------------------------------------

def aws_auth_problems(cfg: dict) -> list[str]:
    """What in a ``ray up`` config starts Ray without token auth or binds the dashboard wide without it."""
    problems = []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        if not starts:
            problems.append(f"{key}: no ray start")
        for cmd in starts:
            if not re.search(r"(^|[;&\s])RAY_AUTH_MODE=token\s+ray start", cmd):
                problems.append(f"{key}: ray start without RAY_AUTH_MODE=token")
            if "ssm" not in cmd or "WithDecryption=True" not in cmd or "umask 077" not in cmd:
                problems.append(f"{key}: the token is not read from the SSM parameter into a private file")
            if key.startswith("head") and dashboard_host(cmd) not in LOCALHOST and "RAY_AUTH_MODE=token" not in cmd:
                problems.append(f"{key}: dashboard on {dashboard_host(cmd)} without token auth")
    if any("token" in f"{k} {v}" for k, v in (cfg.get("file_mounts") or {}).items()):
        problems.append("file_mounts ship a token file")
    return problems


def _run_start_commands(commands: list[str], tmp_path: Path, ssm_ok: bool = True) -> tuple[list[str], str]:
    """Run a node's start commands with stub ``python`` (answers the SSM read) and ``ray``; return the ray calls
    (args, RAY_AUTH_MODE, token file mode and content) and the token SSM handed out."""
    bin_dir, home, log = tmp_path / "bin", tmp_path / "home", tmp_path / "ray.log"
    bin_dir.mkdir(parents=True)
    home.mkdir()
    token = "ssm-token-0123456789abcdef"
    answer = f'if [[ "$*" == *get_parameter* ]]; then echo {token}; exit 0; fi' if ssm_ok else "exit 1"
    _stub(bin_dir, "python", answer)
    f = "$HOME/.ray/auth_token"
    _stub(bin_dir, "ray", f'echo "ray $* | mode=${{RAY_AUTH_MODE:-}} perm=$(stat -c %a {f} 2>/dev/null) '
                          f'token=$(cat {f} 2>/dev/null)" >> {log}')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home), "RAY_HEAD_IP": "10.0.0.1"}
    for cmd in commands:
        subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=60)
    return (log.read_text().splitlines() if log.exists() else []), token


def test_ray_up_starts_every_node_with_the_ssm_token(tmp_path):
    cfg = load_one(RAY_UP)
    assert aws_auth_problems(cfg) == []
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        calls, token = _run_start_commands(cfg[key], tmp_path / key)
        starts = [c for c in calls if c.startswith("ray start")]
        assert len(starts) == 1, calls
        assert f"mode=token perm=600 token={token}" in starts[0], starts[0]
        if key.startswith("head"):
            assert dashboard_host(starts[0]) in LOCALHOST
        # no token from SSM: Ray is not started at all
        calls, _ = _run_start_commands(cfg[key], tmp_path / f"{key}-no-ssm", ssm_ok=False)
        assert not [c for c in calls if c.startswith("ray start")], calls


def test_ray_up_check_catches_unsafe_configs():
    cfg = load_one(RAY_UP)
    head = cfg["head_start_ray_commands"]
    open_dash = [c.replace("RAY_AUTH_MODE=token ray start", "ray start").replace(
        "--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0") for c in head]
    mutants = {
        "no token auth, open dashboard": {**cfg, "head_start_ray_commands": open_dash},
        "auth disabled on workers": {**cfg, "worker_start_ray_commands": [
            c.replace("RAY_AUTH_MODE=token", "RAY_AUTH_MODE=disabled") for c in cfg["worker_start_ray_commands"]]},
        "token from a synced file": {**cfg, "file_mounts": {"~/.ray/auth_token": "cluster/auth_token"}},
    }
    for name, mutant in mutants.items():
        assert aws_auth_problems(mutant), name


# --- KubeRay -----------------------------------------------------------------------------------

def kuberay_auth_problems(spec: dict, where: str) -> list[str]:
    """What in a RayCluster spec starts Ray without the token from a Secret, or opens the dashboard without it."""
    problems = []
    auth = spec.get("authOptions") or {}
    secret = auth.get("secretName")
    if auth.get("mode") != "token" or not secret:
        problems.append(f"{where}: authOptions is not mode: token with the user's secretName")
    for pod in pod_specs(spec):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{where}/{c['name']}: RAY_AUTH_MODE is not token")
            ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef") or {}
            if ref.get("name") != secret or ref.get("key") != TOKEN_SECRET_KEY or ref.get("optional"):
                problems.append(f"{where}/{c['name']}: RAY_AUTH_TOKEN does not come from Secret {secret!r} (required)")
    host = spec["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "127.0.0.1")
    if host not in LOCALHOST and problems:
        problems.append(f"{where}: dashboard on {host} without token auth")
    return problems


def test_raycluster_token_auth_and_local_dashboard():
    spec = load_one(RAYCLUSTER)["spec"]
    assert kuberay_auth_problems(spec, "RayCluster") == []
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] in LOCALHOST


def test_rayjob_token_auth():
    """The RayJob's cluster widens the dashboard bind (the operator submits and polls the job), with token auth."""
    _, job = rayjob_docs()
    spec = job["spec"]["rayClusterSpec"]
    assert kuberay_auth_problems(spec, "RayJob") == []
    assert spec["authOptions"]["secretName"] == load_one(RAYCLUSTER)["spec"]["authOptions"]["secretName"]


def test_kuberay_check_catches_unsafe_specs():
    good = load_one(RAYCLUSTER)["spec"]

    def mutant(change):
        spec = copy.deepcopy(good)
        change(spec)
        spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] = "0.0.0.0"
        return spec

    def drop_env(name):
        def change(spec):
            for pod in pod_specs(spec):
                for c in pod["containers"]:
                    c["env"] = [e for e in c["env"] if e["name"] != name]
        return change

    def optional_token(spec):
        for pod in pod_specs(spec):
            for c in pod["containers"]:
                for e in c["env"]:
                    if e["name"] == "RAY_AUTH_TOKEN":
                        e["valueFrom"]["secretKeyRef"]["optional"] = True

    def literal_token(spec):
        worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        worker["env"] = [e for e in worker["env"] if e["name"] != "RAY_AUTH_TOKEN"] + [
            {"name": "RAY_AUTH_TOKEN", "value": "literal"}]

    changes = {"no authOptions": lambda s: s.pop("authOptions"), "no RAY_AUTH_MODE": drop_env("RAY_AUTH_MODE"),
               "no RAY_AUTH_TOKEN": drop_env("RAY_AUTH_TOKEN"), "optional token": optional_token,
               "literal token on a worker": literal_token}
    for name, change in changes.items():
        problems = kuberay_auth_problems(mutant(change), name)
        assert any("0.0.0.0 without token auth" in p for p in problems), (name, problems)


# --- SLURM -------------------------------------------------------------------------------------

def _slurm_dry_run(script: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """Run the batch script against stub SLURM/Ray commands that log, for every srun and the extract call, the
    Ray auth variables and the token file's mode, length and digest."""
    bin_dir, venv, log, home = tmp_path / "bin", tmp_path / "venv", tmp_path / "calls.log", tmp_path / "home"
    for d in (bin_dir, venv / "bin", home):
        d.mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    f = '"$RAY_AUTH_TOKEN_PATH"'
    auth = (f'| mode=${{RAY_AUTH_MODE:-}} path=${{RAY_AUTH_TOKEN_PATH:-}} perm=$(stat -c %a {f} 2>/dev/null) '
            f'len=$(wc -c < {f} 2>/dev/null) sum=$(sha256sum < {f} 2>/dev/null | cut -c1-16)')
    _stub(bin_dir, "scontrol", 'printf "gpu-node-1\\ngpu-node-2\\n"')
    _stub(bin_dir, "srun", f'echo "srun $* {auth}" >> {log}; if [[ "$*" == *hostname* ]]; then echo 10.0.0.1; fi')
    _stub(bin_dir, "sleep", "exit 0")
    _stub(bin_dir, "python", wait_for_starts(log))
    _stub(bin_dir, "easyroutine-dist", f'echo "easyroutine-dist $* {auth}" >> {log}')
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "VENV": str(venv), "HOME": str(home), "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-node-[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32"}
    res = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    return log.read_text().splitlines(), home


def slurm_auth_problems(calls: list[str], home: Path) -> list[str]:
    """What in a dry run started Ray or the driver without a private per-job token, or a wide dashboard."""
    problems = []
    users = [c for c in calls if "ray start" in c or c.startswith("easyroutine-dist")]
    if not users:
        problems.append("no ray start / extract call")
    for c in users:
        fields = dict(kv.split("=", 1) for kv in c.split(" | ", 1)[-1].split() if "=" in kv)
        path = Path(fields.get("path") or "/nonexistent")
        if fields.get("mode") != "token":
            problems.append(f"without RAY_AUTH_MODE=token: {c}")
        if fields.get("perm") != "600" or fields.get("len") != "64":
            problems.append(f"token file not a private 64-char token: {c}")
        if home not in path.parents or ROOT in path.parents:
            problems.append(f"token file outside the private directory: {c}")
        if path.exists():
            problems.append(f"token file {path} left after the job")
        if "ray start --head" in c and dashboard_host(c) not in LOCALHOST:
            problems.append(f"dashboard on {dashboard_host(c)}: {c}")
    if len({c.rsplit("sum=", 1)[-1] for c in users}) != 1:
        problems.append("nodes and driver hold different tokens")
    return problems


def test_sbatch_starts_ray_with_a_fresh_private_token(tmp_path):
    calls, home = _slurm_dry_run(SBATCH, tmp_path / "a")
    assert slurm_auth_problems(calls, home) == []
    assert len([c for c in calls if "ray start" in c]) == 2  # head and worker, both checked above
    again, home2 = _slurm_dry_run(SBATCH, tmp_path / "b")
    assert slurm_auth_problems(again, home2) == []
    assert calls[-1].rsplit("sum=", 1)[-1] != again[-1].rsplit("sum=", 1)[-1], "the token is not per job"


def test_sbatch_check_catches_unsafe_scripts(tmp_path):
    text = SBATCH.read_text()
    mutants = {
        "no token auth": text.replace("export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=", "token_path="),
        "open dashboard": text.replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0"),
        "readable token": text.replace('> "$token_file"\n', '> "$token_file"\nchmod 644 "$token_file"\n'),
        "token kept": text.replace('rm -f "$token_file"', "true"),
    }
    for i, (name, script) in enumerate(mutants.items()):
        assert script != text, name
        path = tmp_path / f"mutant{i}.sbatch"
        path.write_text(script)
        calls, home = _slurm_dry_run(path, tmp_path / f"m{i}")
        assert slurm_auth_problems(calls, home), name


# --- Ray versions and docs ---------------------------------------------------------------------

def test_recipes_use_one_ray_with_token_auth():
    versions = {
        "Dockerfile": re.search(r"^FROM rayproject/ray:(\d+\.\d+\.\d+)", (CLUSTER / "Dockerfile").read_text(), re.M),
        "aws-gpu.yaml": re.match(r"rayproject/ray:(\d+\.\d+\.\d+)", load_one(RAY_UP)["docker"]["image"]),
        "RayCluster": re.match(r"(\d+\.\d+\.\d+)$", load_one(RAYCLUSTER)["spec"]["rayVersion"]),
        "RayJob": re.match(r"(\d+\.\d+\.\d+)$", rayjob_docs()[1]["spec"]["rayClusterSpec"]["rayVersion"]),
    }
    found = {k: m.group(1) for k, m in versions.items() if m}
    assert set(found) == set(versions), versions
    assert len(set(found.values())) == 1, found
    assert tuple(int(x) for x in next(iter(found.values())).split(".")[:2]) >= MIN_TOKEN_RAY


def _dicts(node):
    if isinstance(node, dict):
        yield node
        node = list(node.values())
    if isinstance(node, list):
        for item in node:
            yield from _dicts(item)


def test_no_recipe_ships_a_token():
    """No committed file holds a Ray token: no token file in cluster/, no literal RAY_AUTH_TOKEN in a recipe."""
    assert not [p.name for p in CLUSTER.iterdir() if "token" in p.name.lower()]
    for path in CLUSTER.iterdir():
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_TOKEN=(?![\"']?\$)\S", text), path.name
        docs = list(yaml.safe_load_all(text)) if path.suffix == ".yaml" else []
        literal = [d for doc in docs for d in _dicts(doc) if d.get("name") == "RAY_AUTH_TOKEN" and "value" in d]
        assert not literal, path.name


def test_docs_security_section():
    text = DOCS.read_text()
    m = re.search(r"^## Security\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, "docs/cluster.md has no '## Security' section"
    section = m.group(1)
    for needle in ("RAY_AUTH_MODE=token", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN", "~/.ray/auth_token",
                   "arbitrary code", "127.0.0.1", "kubectl port-forward", "ray dashboard", "ssh", "SSM",
                   "easyroutine-ray-token", "mode 600", "object store", "environment", "Checklist"):
        assert needle.lower() in section.lower(), f"the Security section does not mention {needle!r}"
