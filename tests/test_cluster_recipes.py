"""The cluster recipes in cluster/ parse and carry the fields docs/cluster.md relies on.

Nothing here talks to a cloud, Kubernetes or SLURM: the YAML files are parsed and checked, the
batch script is syntax-checked and dry-run against stub ``srun``/``scontrol``/``ray`` commands.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.errors import ConfigError
from easyroutine_dist.positions import validate_specs

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCS = ROOT / "docs" / "cluster.md"

RAY_UP = CLUSTER / "aws-gpu.yaml"
RAYCLUSTER = CLUSTER / "kuberay-raycluster.yaml"
RAYJOB = CLUSTER / "kuberay-rayjob.yaml"
SBATCH = CLUSTER / "slurm-extract.sbatch"
JOB_1GPU = CLUSTER / "job-mistral7b.yaml"
JOB_2GPU = CLUSTER / "job-mistral7b-2gpu.yaml"
JOB_CONFIGS = [JOB_1GPU, JOB_2GPU]

ALL_RECIPES = [RAY_UP, RAYCLUSTER, RAYJOB, SBATCH, JOB_1GPU, JOB_2GPU, CLUSTER / "Dockerfile"]
YAML_FILES = [RAY_UP, RAYCLUSTER, RAYJOB, JOB_1GPU, JOB_2GPU]

# The job-config schema (docs/cluster.md, "Job config"); the CLI's --config reads exactly these.
REQUIRED_JOB_KEYS = {
    "model", "num_workers", "gpus_per_worker", "dataset", "batch_size", "partition_size",
    "target_token_positions", "extraction_config", "base_dir", "experiment",
}
OPTIONAL_JOB_KEYS = {"model_kwargs", "cpus_per_worker", "logit_lens", "tag", "ray_address"}
DATASET_KEYS = {"path", "name", "split", "text_column"}
LOGIT_LENS_KEYS = {"target_key", "top_k"}
SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN", "RAY_AUTH_TOKEN"}
MISTRAL_BF16_GB = 7.24e9 * 2 / 1e9  # 7.24 B parameters x 2 bytes


def load_all(path: Path) -> list:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path):
    docs = load_all(path)
    assert len(docs) == 1, f"{path.name}: expected one YAML document, got {len(docs)}"
    return docs[0]


def rayjob_docs() -> tuple[dict, dict]:
    docs = {d["kind"]: d for d in load_all(RAYJOB)}
    assert set(docs) == {"ConfigMap", "RayJob"}, f"kuberay-rayjob.yaml holds {sorted(docs)}"
    return docs["ConfigMap"], docs["RayJob"]


def pod_specs(cluster_spec: dict) -> list[dict]:
    out = [cluster_spec["headGroupSpec"]["template"]["spec"]]
    out += [g["template"]["spec"] for g in cluster_spec["workerGroupSpecs"]]
    return out


def without_dashboard_host(cluster_spec: dict) -> dict:
    """The spec less the head's dashboard bind (the RayJob widens it for the operator; test_cluster_security)."""
    spec = copy.deepcopy(cluster_spec)
    spec["headGroupSpec"].get("rayStartParams", {}).pop("dashboard-host", None)
    return spec


def gpu_limit(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def cluster_gpus(cluster_spec: dict) -> int:
    """GPUs of the worker groups at their configured replica count."""
    return sum(g.get("replicas", 0) * sum(gpu_limit(c) for c in g["template"]["spec"]["containers"])
               for g in cluster_spec["workerGroupSpecs"])


# --- secret scanning ---------------------------------------------------------------------------

_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b")
_SECRET_ASSIGN = re.compile(
    r"(?i)\b(aws_secret_access_key|aws_session_token|aws_access_key_id|hf_token|secret|password|token)"
    r"\b[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=_\-]{12,})"
)
_BARE_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")


def find_secrets(text: str) -> list[str]:
    """Strings that look like literal credentials (AWS key ids / secret keys, HF tokens)."""
    hits = _AWS_KEY_ID.findall(text) + _HF_TOKEN.findall(text)
    hits += [m.group(0) for m in _SECRET_ASSIGN.finditer(text)]
    hits += [s for s in _BARE_SECRET.findall(text) if re.search(r"\d", s) and re.search(r"[A-Z]", s)
             and re.search(r"[a-z]", s)]
    return hits


def test_secret_scanner_catches_planted_credentials():
    # AWS's documented example credentials: the scanner must flag every form of them.
    assert find_secrets("key: AKIAIOSFODNN7EXAMPLE")
    assert find_secrets("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert find_secrets("- name: AWS_SECRET_ACCESS_KEY\n  value: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert find_secrets("export HF_TOKEN=hf_abcdefghijklmnopqrstuvwxyz0123456789")
    assert not find_secrets("secretKeyRef: {name: easyroutine-s3, key: AWS_SECRET_ACCESS_KEY}")


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_no_literal_credentials_in_recipes(path):
    assert path.exists(), f"missing recipe {path}"
    hits = find_secrets(path.read_text())
    assert not hits, f"{path.name} contains what looks like a credential: {hits}"


# --- ray up ------------------------------------------------------------------------------------

def test_ray_up_config():
    cfg = load_one(RAY_UP)
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "max_workers"):
        assert key in cfg, f"aws-gpu.yaml has no {key!r}"
    assert cfg["provider"]["type"] == "aws"
    assert cfg["provider"].get("region")
    assert cfg["auth"].get("ssh_user")

    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types, "head_node_type must name an entry of available_node_types"
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0, "the head is a CPU node in docs/cluster.md"

    gpu_types = {n: t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type declares resources.GPU >= 1"
    for name, t in gpu_types.items():
        assert name != cfg["head_node_type"]
        assert t["node_config"]["InstanceType"]
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"]
        # a 2-GPU worker must fit on one node, whole nodes must be usable by 2-GPU workers
        assert t["resources"]["GPU"] % 2 == 0, f"{name}: GPU count should be even for 2-GPU workers"

    setup = "\n".join(cfg["setup_commands"] + cfg.get("worker_setup_commands", []))
    assert re.search(r"pip install .*\btorch\b", setup), "setup_commands must install torch"
    assert re.search(r"pip install .*(easyroutine-dist|/easyroutine_dist)", setup), \
        "setup_commands must install the package"
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in c for c in cfg["worker_start_ray_commands"])


@pytest.mark.parametrize("job_path", JOB_CONFIGS, ids=lambda p: p.name)
def test_ray_up_cluster_can_hold_the_jobs(job_path):
    cfg, job = load_one(RAY_UP), load_one(job_path)
    capacity = max(t["max_workers"] * t["resources"]["GPU"]
                   for t in cfg["available_node_types"].values() if t.get("resources", {}).get("GPU"))
    assert job["num_workers"] * job["gpus_per_worker"] <= capacity


# --- KubeRay -----------------------------------------------------------------------------------

def check_cluster_spec(spec: dict, where: str) -> None:
    assert "headGroupSpec" in spec, f"{where}: no headGroupSpec"
    assert spec.get("workerGroupSpecs"), f"{where}: no workerGroupSpecs"
    head_containers = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(gpu_limit(c) == 0 for c in head_containers), f"{where}: the head pod should not take GPUs"
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"]
        assert group.get("minReplicas", 0) <= group["replicas"] <= group["maxReplicas"]
        containers = group["template"]["spec"]["containers"]
        gpus = [gpu_limit(c) for c in containers]
        assert sum(gpus) >= 1, f"{where}: worker group {group['groupName']} has no nvidia.com/gpu limit"
        for c in containers:
            assert c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"]["limits"].get("nvidia.com/gpu")
    for pod in pod_specs(spec):
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(env), \
                f"{where}: container {c['name']} gets no AWS credentials from a secret"
            for name in SECRET_ENV_NAMES & set(env):
                assert "value" not in env[name], f"{where}: {name} is set to a literal value"
                assert env[name]["valueFrom"]["secretKeyRef"]["name"], f"{where}: {name} needs a secretKeyRef"


def test_raycluster():
    rc = load_one(RAYCLUSTER)
    assert rc["apiVersion"] == "ray.io/v1"
    assert rc["kind"] == "RayCluster"
    assert rc["metadata"]["name"]
    check_cluster_spec(rc["spec"], "RayCluster")


def test_rayjob():
    cm, job = rayjob_docs()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "easyroutine-dist" in spec["entrypoint"] or "easyroutine_dist" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "exactly one of rayClusterSpec/clusterSelector"
    if "rayClusterSpec" in spec:
        check_cluster_spec(spec["rayClusterSpec"], "RayJob.rayClusterSpec")
        assert without_dashboard_host(spec["rayClusterSpec"]) == without_dashboard_host(load_one(RAYCLUSTER)["spec"]), \
            "RayJob.rayClusterSpec drifted from kuberay-raycluster.yaml's spec"
    else:
        assert spec["clusterSelector"]["ray.io/cluster"] == load_one(RAYCLUSTER)["metadata"]["name"]


def test_rayjob_config_reaches_the_entrypoint():
    """--config points into the ConfigMap, which the head pod mounts, and the job fits the cluster."""
    cm, job = rayjob_docs()
    cluster_spec = job["spec"].get("rayClusterSpec") or load_one(RAYCLUSTER)["spec"]
    m = re.search(r"--config\s+(\S+)", job["spec"]["entrypoint"])
    assert m, "the RayJob entrypoint passes no --config"
    config_path = Path(m.group(1))
    head = cluster_spec["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    mounts = [vm for c in head["containers"] for vm in c.get("volumeMounts", [])]
    mount = next(vm for vm in mounts if config_path.parent == Path(vm["mountPath"]))
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert config_path.name in cm["data"], f"ConfigMap has no key {config_path.name}"

    inner = yaml.safe_load(cm["data"][config_path.name])
    check_job_config(inner, "ConfigMap job.yaml")
    assert inner["num_workers"] * inner["gpus_per_worker"] <= cluster_gpus(cluster_spec)


def test_rayjob_configmap_matches_job_file():
    cm, _ = rayjob_docs()
    assert yaml.safe_load(cm["data"]["job.yaml"]) == load_one(JOB_1GPU), \
        "the ConfigMap's job.yaml drifted from cluster/job-mistral7b.yaml"


# --- job configs -------------------------------------------------------------------------------

def check_job_config(job: dict, where: str) -> None:
    missing = REQUIRED_JOB_KEYS - set(job)
    assert not missing, f"{where}: missing keys {sorted(missing)}"
    unknown = set(job) - REQUIRED_JOB_KEYS - OPTIONAL_JOB_KEYS
    assert not unknown, f"{where}: keys outside the schema {sorted(unknown)}"

    assert isinstance(job["model"], str) and job["model"]
    assert job["gpus_per_worker"] in {1, 2}
    for key in ("num_workers", "batch_size", "partition_size"):
        assert isinstance(job[key], int) and job[key] >= 1, f"{where}: {key} must be a positive int"
    assert isinstance(job.get("cpus_per_worker", 1), int) and job.get("cpus_per_worker", 1) >= 1
    assert job["partition_size"] % job["batch_size"] == 0, f"{where}: partition_size must be a multiple of batch_size"
    assert str(job["base_dir"]).startswith("s3://")
    assert isinstance(job["experiment"], str) and job["experiment"]

    kwargs = job.get("model_kwargs") or {}
    assert "device_map" not in kwargs, f"{where}: workers choose device_map themselves"
    assert kwargs.get("dtype", "auto") in {"bfloat16", "float16", "float32", "auto"}

    ds = job["dataset"]
    assert set(ds) <= DATASET_KEYS, f"{where}: unknown dataset keys {sorted(set(ds) - DATASET_KEYS)}"
    assert isinstance(ds.get("path"), str) and ds["path"], f"{where}: dataset needs a path (file, folder or HF id)"
    assert isinstance(ds.get("text_column", "text"), str)

    validate_specs(job["target_token_positions"])
    ec = ExtractionConfig.from_dict(job["extraction_config"])
    assert ec.is_not_empty(), f"{where}: extraction_config extracts nothing"

    lens = job.get("logit_lens")
    if lens is not None:
        assert set(lens) == LOGIT_LENS_KEYS
        assert isinstance(lens["top_k"], int) and lens["top_k"] >= 1
        base = re.sub(r"_?\{[^}]*\}.*$", "", lens["target_key"])
        assert getattr(ec, f"extract_{base}", False) is True, \
            f"{where}: logit_lens.target_key {lens['target_key']!r} needs extract_{base}: true"


@pytest.mark.parametrize("job_path", JOB_CONFIGS, ids=lambda p: p.name)
def test_job_config(job_path):
    job = load_one(job_path)
    check_job_config(job, job_path.name)
    assert job["model"] == "mistralai/Mistral-7B-v0.1"
    assert job["model_kwargs"]["dtype"] == "bfloat16"
    # bf16 weights per GPU when accelerate splits the layers evenly: must leave room on a 24 GB card
    assert MISTRAL_BF16_GB / job["gpus_per_worker"] < 16


def test_gpu_variants():
    assert load_one(JOB_1GPU)["gpus_per_worker"] == 1
    assert load_one(JOB_2GPU)["gpus_per_worker"] == 2


def test_job_check_rejects_bad_configs():
    """The job-config checks fail on the mistakes they are there to catch."""
    good = load_one(JOB_1GPU)
    bad_cases = [
        ({"extraction_config": {"extract_resid_outt": True}}, ConfigError),
        ({"gpus_per_worker": 3}, AssertionError),
        ({"base_dir": "/tmp/out"}, AssertionError),
        ({"logit_lens": {"target_key": "attn_out_{i}", "top_k": 5}}, AssertionError),
        ({"storage_options": {"key": "x"}}, AssertionError),
        ({"target_token_positions": ["last-0"]}, Exception),
    ]
    for change, exc in bad_cases:
        with pytest.raises(exc):
            check_job_config({**good, **change}, f"mutated {sorted(change)}")
    with pytest.raises(AssertionError):
        check_job_config({k: v for k, v in good.items() if k != "experiment"}, "no experiment")


def test_job_configs_document_every_key():
    """The comment block at the top of job-mistral7b.yaml describes every key of the schema."""
    header = "\n".join(line for line in JOB_1GPU.read_text().splitlines() if line.startswith("#"))
    for key in sorted(REQUIRED_JOB_KEYS | OPTIONAL_JOB_KEYS | DATASET_KEYS | LOGIT_LENS_KEYS):
        assert re.search(rf"^#\s+{re.escape(key)}\s", header, re.M), f"key {key!r} is not described"


# --- SLURM -------------------------------------------------------------------------------------

def test_sbatch_syntax_and_directives():
    bash = shutil.which("bash")
    assert bash
    res = subprocess.run([bash, "-n", str(SBATCH)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = SBATCH.read_text()
    assert text.startswith("#!/bin/bash")
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, re.M)
    assert any(d.startswith(("--gpus-per-node=", "--gpus=", "--gres=gpu")) for d in directives)
    assert any(d.startswith("--nodes=") for d in directives)
    assert "ray start --head" in text
    assert re.search(r"ray start --address", text)
    assert "ray stop" in text
    assert "--ray-address auto" in text
    assert "easyroutine-dist extract" in text


def wait_for_starts(log: Path, n: int = 2) -> str:
    """Body of a stub ``python`` for the script's wait-for-GPUs step: it returns once ``n`` ``ray start`` calls
    are logged (the script starts them in the background, so their log lines may otherwise come late)."""
    return (f'cat > /dev/null; for _ in $(seq 200); do [ "$(grep -c "ray start" {log} 2>/dev/null)" -ge {n} ] '
            f'&& exit 0; /bin/sleep 0.05; done; exit 1')


def _stub(bin_dir: Path, name: str, body: str) -> None:
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.mark.parametrize("gpus_per_worker,run_id,expected_workers", [(1, "", 8), (2, "20250101-abc", 4)])
def test_sbatch_dry_run(tmp_path, gpus_per_worker, run_id, expected_workers):
    """Run the script with stub SLURM/Ray commands: one head, one worker, ray stop, the extract call."""
    bin_dir, venv, log = tmp_path / "bin", tmp_path / "venv", tmp_path / "calls.log"
    bin_dir.mkdir()
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("")
    _stub(bin_dir, "scontrol", 'printf "gpu-node-1\\ngpu-node-2\\n"')
    _stub(bin_dir, "srun", f'echo "srun $*" >> {log}; if [[ "$*" == *hostname* ]]; then echo 10.0.0.1; fi')
    _stub(bin_dir, "sleep", "exit 0")
    _stub(bin_dir, "python", wait_for_starts(log))
    _stub(bin_dir, "easyroutine-dist", f'echo "easyroutine-dist $*" >> {log}')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VENV": str(venv),
           "SLURM_JOB_NODELIST": "gpu-node-[1-2]", "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "SLURM_CPUS_PER_TASK": "32", "GPUS_PER_WORKER": str(gpus_per_worker), "RUN_ID": run_id,
           "HOME": str(tmp_path)}
    res = subprocess.run(["bash", str(SBATCH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    calls = log.read_text().splitlines()

    head = [c for c in calls if "ray start --head" in c]
    workers = [c for c in calls if "ray start --address" in c]
    assert len(head) == 1 and "-w gpu-node-1" in head[0] and "--num-gpus=4" in head[0]
    assert len(workers) == 1 and "-w gpu-node-2" in workers[0] and "10.0.0.1:6379" in workers[0]
    assert any("ray stop" in c for c in calls), "no ray stop on exit"

    extract = [c for c in calls if c.startswith("easyroutine-dist extract")]
    assert len(extract) == 1
    args = extract[0].split()
    assert args[args.index("--num-workers") + 1] == str(expected_workers)
    assert args[args.index("--gpus-per-worker") + 1] == str(gpus_per_worker)
    assert args[args.index("--ray-address") + 1] == "auto"
    assert args[args.index("--config") + 1] == "cluster/job-mistral7b.yaml"
    if run_id:
        assert args[args.index("--run-id") + 1] == run_id and "--resume" in args
    else:
        assert "--run-id" not in args and "--resume" not in args
    # the extraction runs after the cluster is up and before it is stopped
    order = [i for i, c in enumerate(calls) if "ray start" in c or c.startswith("easyroutine-dist") or "ray stop" in c]
    kinds = ["start" if "ray start" in calls[i] else "stop" if "ray stop" in calls[i] else "extract" for i in order]
    assert kinds == ["start", "start", "extract", "stop"]


# --- docs --------------------------------------------------------------------------------------

def test_docs_cover_every_recipe():
    text = DOCS.read_text()
    for path in ALL_RECIPES:
        assert f"cluster/{path.name}" in text, f"docs/cluster.md does not mention cluster/{path.name}"
    for needle in ("ray up cluster/aws-gpu.yaml", "ray job submit", "kubectl apply -f cluster/kuberay-rayjob.yaml",
                   "kubectl apply -f cluster/kuberay-raycluster.yaml", "sbatch cluster/slurm-extract.sbatch",
                   "--gpus-per-worker", "--resume", "--run-id", "easyroutine-dist query", "MetadataIndex",
                   "secretKeyRef", "14.5"):
        assert needle in text, f"docs/cluster.md does not mention {needle!r}"
    for key in sorted(REQUIRED_JOB_KEYS | OPTIONAL_JOB_KEYS):
        assert f"`{key}`" in text, f"docs/cluster.md does not document the job key {key!r}"
