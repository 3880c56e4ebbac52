"""``easyroutine-dist`` through typer's CliRunner on the session's Ray cluster: extract from a job YAML (a tiny model
factory, a .txt dataset), query, index stats/rebuild, refused job keys, the logit lens PNG, --help."""

from __future__ import annotations

import re
import time
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage.api import ActivationLoader

from ..models import tiny_model
from ..oracle import hf_row
from .conftest import reference

pytestmark = pytest.mark.slow

COMMANDS = ("extract", "query", "verify", "logit-lens", "index", "demo")
RUN_RE = re.compile(r"run (\S+) saved at\s+(\S.*)", re.S)  # rich may fold a long URL over lines
JOB_CONFIG = ExtractionConfig(extract_resid_out=True, save_logits=False)


def _invoke(*args: str):
    from easyroutine_dist.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _ok(result) -> str:
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def prompts_txt(workdir, texts):
    path = workdir / "prompts.txt"
    path.write_text("".join(f"{t}\n" for t in texts[:10]) + "\n")  # a blank line is skipped
    return path


@pytest.fixture(scope="module")
def job_run(ray_cluster, workdir, prompts_txt):
    """``extract --config job.yaml`` with the ``tests.distributed.tiny:tiny_hooked`` factory: (output, run id)."""
    job = {"model": "tests.distributed.tiny:tiny_hooked", "num_workers": 1, "gpus_per_worker": 0,
           "cpus_per_worker": 1, "dataset": {"path": str(prompts_txt)}, "batch_size": 2, "partition_size": 4,
           "target_token_positions": ["last"], "extraction_config": {"extract_resid_out": True, "save_logits": False},
           "base_dir": str(workdir / "runs"), "experiment": "cli-job", "tag": "from-yaml"}
    (workdir / "job.yaml").write_text(yaml.safe_dump(job))
    result = _invoke("extract", "--config", workdir / "job.yaml")
    out = _ok(result)
    match = RUN_RE.search(out)
    assert match, out
    # the run id is logged when the run starts, so a job that dies still leaves it in its log
    assert f"run {match.group(1)} started" in " ".join(result.stderr.split()), result.stderr
    return out, match.group(1)


def test_extract_from_job_yaml(job_run, workdir, hooked_ref, texts):
    out, run_id = job_run
    result = ActivationLoader(workdir / "runs", "cli-job").query(tag="from-yaml")
    assert [e["run_id"] for e in result] == [run_id]
    url = "".join(RUN_RE.search(out).group(2).split())
    assert url == str(workdir / "runs" / "cli-job" / "tiny-llama-factory" / run_id)
    cache, meta = result.load()
    assert meta["model_name"] == "tiny-llama-factory" and meta["distributed"]["dataset"]["n_rows"] == 10
    assert meta["distributed"]["batch_size"] == 2 and len(list(result.iter_parts())) == 3  # 10 rows / 4
    ref = reference(hooked_ref, texts[:10], batch_size=2, positions=["last"], config=JOB_CONFIG)
    for k in ("resid_out_0", "resid_out_2"):
        assert torch.allclose(cache[k], ref[k], atol=1e-5), k
    assert "logits" not in cache.keys()


def test_query_lists_run_with_rows(job_run, workdir, monkeypatch):
    from easyroutine_dist import cli

    _, run_id = job_run
    out = _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job"))  # 80 columns
    assert "1 run(s) in experiment 'cli-job'" in out
    lines = [line for line in out.splitlines() if run_id in line]  # the run id in full, on one line
    assert len(lines) == 1, out
    cells = [c for c in re.split(r"\s{2,}|[│┃|]", lines[0].strip()) if c.strip()]
    assert cells[0] == "0" and cells[1] == run_id, out
    assert cells[-3:-1] == ["10", "3"], out  # rows and parts columns, then the size on storage
    size = sum(f.stat().st_size for f in (workdir / "runs" / "cli-job" / "tiny-llama-factory" / run_id).rglob("*")
               if f.is_file())
    value, unit = cells[-1].split()
    assert abs(float(value) * {"B": 1, "KiB": 1024, "MiB": 1024**2}[unit] - size) < 0.06 * 1024, (cells, size)
    monkeypatch.setattr(cli.console, "width", 200)  # wide enough: nothing folded
    wide = _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job"))
    cells = re.split(r"\s{2,}", next(line for line in wide.splitlines() if run_id in line).strip())
    assert cells[:-1] == ["0", run_id, "tiny-llama-factory", "from-yaml", "10", "3"], wide
    # no --experiment: every experiment is searched, and the title says so
    every = _ok(_invoke("query", "--base-dir", workdir / "runs"))
    assert "1 run(s) in all experiments" in every and run_id in every
    # filters reach the loader: tag and custom keys
    assert run_id in _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job",
                                 "--tag", "from-yaml"))
    none = _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job", "--tag", "nope"))
    assert "0 run(s)" in none and run_id not in none
    none = _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job",
                       "--custom", '{"missing": 1}'))
    assert "0 run(s)" in none


def test_index_stats_and_rebuild(job_run, workdir):
    out = _ok(_invoke("index", "stats", "--base-dir", workdir / "runs"))
    row = next(line for line in out.splitlines() if "cli-job" in line)
    assert re.search(r"cli-job\s*\S\s*1\b", row), out
    out = _ok(_invoke("index", "rebuild", "--base-dir", workdir / "runs"))
    assert "catalog rebuilt: 1 run(s)" in out  # only the job's run lives under this base dir
    assert job_run[1] in _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job"))
    bad = _invoke("index", "compact", "--base-dir", workdir / "runs")
    assert bad.exit_code != 0 and "rebuild" in bad.output


def test_unknown_job_key_refused(ray_cluster, workdir, prompts_txt):
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"model": "tests.distributed.tiny:tiny_hooked",
                                                      "dataset": str(prompts_txt), "num_worker": 2,
                                                      "base_dir": str(workdir / "bad-runs")}))
    result = _invoke("extract", "--config", workdir / "bad.yaml")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "num_worker" in result.stderr and "unknown keys" in result.stderr, result.output
    assert not (workdir / "bad-runs").exists()  # refused before any work


def test_logit_lens_png(ray_cluster, model_dir, workdir, prompts_txt, texts, hooked_ref):
    from easyroutine_dist.cli import show_lens

    base = workdir / "lens-runs"
    out = _ok(_invoke("extract", "--model", model_dir, "--dataset", prompts_txt, "--base-dir", base,
                      "--experiment", "lens", "--num-workers", "1", "--positions", "all", "--extract", "resid_out",
                      "--logit-lens", "resid_out_{i}", "--top-k", "3", "--batch-size", "4",
                      "--partition-size", "8", "--tag", "lens"))
    run_id = RUN_RE.search(out).group(1)
    png = workdir / "lens.png"
    out = _ok(_invoke("logit-lens", "--base-dir", base, "--experiment", "lens", "--run", run_id, "--row", "1",
                      "--tokenizer", model_dir, "--plot", png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "heatmap:" in out and "logit lens, example 1" in out

    # the table rows are the stored top-1 ids at the row's last real position, decoded by the tokenizer given
    class StubTokenizer:
        def decode(self, ids):
            return f"<{int(ids[0])}>"

    cache, _ = ActivationLoader(base, "lens").query(tag="lens").load(run_id)
    last = len(cache["token_dict"]["all"][1]) - 1
    # the stored lens of row 1 is the lens by hand of that prompt alone through plain HF (final norm + lm_head on
    # its hidden states; the model's logits at the last layer), at every real token
    hf = tiny_model("llama")
    hidden, logits = hf_row(hf, hooked_ref.hf_tokenizer(texts[1])["input_ids"])
    assert last == len(logits) - 1
    with torch.no_grad():
        by_hand = [hf.lm_head(hf.model.norm(hidden[1])), hf.lm_head(hf.model.norm(hidden[2])), logits]
    for layer, lens in enumerate(by_hand):
        top = lens.softmax(-1).topk(3)
        slots = cache["mapping_index"]["all"][:last + 1]
        assert torch.equal(cache[f"logit_lens_resid_out_{layer}_topk_ids"][1, slots], top.indices), layer
        torch.testing.assert_close(cache[f"logit_lens_resid_out_{layer}_topk_probs"][1, slots].float(), top.values,
                                   atol=1e-5, rtol=1e-4)
    rows = show_lens(cache, 1, workdir / "stub.png", StubTokenizer())
    assert [r[0] for r in rows] == [0, 1, 2]
    for layer, token, prob in rows:
        ids = cache[f"logit_lens_resid_out_{layer}_topk_ids"][1, last]
        probs = cache[f"logit_lens_resid_out_{layer}_topk_probs"][1, last]
        assert token == f"<{int(ids[0])}>" and prob == pytest.approx(float(probs[0]))
    assert (workdir / "stub.png").exists()


def test_help_lists_subcommands():
    out = _ok(_invoke("--help"))
    for cmd in COMMANDS:
        assert re.search(rf"^\W*{re.escape(cmd)}\b", out, re.M), (cmd, out)
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("easyroutine-dist") == "easyroutine_dist.cli:app"


# ---------------------------------------------------------------------------------------- checked before Ray starts
@pytest.fixture
def no_cluster(monkeypatch):
    """Fail the test if the CLI gets as far as creating a DistributedExtractor (i.e. would start Ray/workers)."""
    from easyroutine_dist.distributed import extractor

    def refuse(*args, **kwargs):
        raise AssertionError("the CLI started a DistributedExtractor for input it should have refused")

    monkeypatch.setattr(extractor.DistributedExtractor, "__init__", refuse)


@pytest.mark.parametrize("extra, expected", [
    (["--positions", "10000"], "dataset row 0 "),
    (["--positions", "all", "--positions", "all"], "duplicate"),
    (["--extract", "resid_outt"], "'resid_outt' is not an activation"),
    (["--logit-lens", "resid_out_{i}", "--top-k", "0"], "top_k=0"),
])
def test_extract_refuses_bad_input_before_ray(no_cluster, model_dir, prompts_txt, tmp_path, extra, expected):
    t0 = time.perf_counter()
    result = _invoke("extract", "--model", model_dir, "--dataset", prompts_txt, "--base-dir", tmp_path / "runs",
                     *extra)
    assert result.exit_code == 2, (result.output, result.exception)
    assert expected in result.stderr and "Traceback" not in result.output, result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2
    assert time.perf_counter() - t0 < 30  # the tokenizer of the first rows, not a cluster (generous bound)
    assert not (tmp_path / "runs").exists()  # nothing written, no uncommitted run folder


def test_extract_refuses_unknown_model_and_storage(no_cluster, prompts_txt, tmp_path):
    out = _invoke("extract", "--model", tmp_path / "no-model", "--dataset", prompts_txt, "--base-dir", tmp_path / "r")
    assert out.exit_code == 2 and "unknown model" in out.stderr and not (tmp_path / "r").exists()
    (tmp_path / "file").write_text("not a folder")
    out = _invoke("extract", "--model", "tests.distributed.tiny:tiny_hooked", "--dataset", prompts_txt,
                  "--base-dir", tmp_path / "file" / "runs")
    assert out.exit_code == 2 and "is a file, not a folder" in out.stderr, out.output


def test_dry_run_json_starts_no_ray(model_dir, prompts_txt, tmp_path):
    """``--dry-run --json`` in a fresh process whose ``ray.init`` fails if called: one JSON object, nothing written."""
    import json
    import subprocess
    import sys

    code = ("import sys, ray\n"
            "def refuse(*a, **k):\n    raise SystemExit('ray.init was called')\n"
            "ray.init = refuse\n"
            "from easyroutine_dist.cli import app\n"
            "sys.argv = ['easyroutine-dist', *sys.argv[1:]]\napp()\n")
    args = ["extract", "--model", model_dir, "--dataset", str(prompts_txt), "--base-dir", str(tmp_path / "runs"),
            "--positions", "all", "--batch-size", "2", "--partition-size", "4", "--num-workers", "2", "--dry-run",
            "--json"]
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          cwd=str(Path(__file__).resolve().parents[2]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)
    for key in ("rows", "partitions", "bytes", "shards", "requests", "estimated_seconds", "keys",
                "peak_host_bytes", "assumptions"):
        assert key in plan, key
    assert plan["rows"] == 10 and plan["partitions"] == 3 and plan["num_workers"] == 2  # 10 prompts / 4
    assert set(plan["keys"]) >= {"resid_out_0", "resid_out_1", "resid_out_2"}
    assert not (tmp_path / "runs").exists()
    text = _ok(_invoke("extract", "--model", model_dir, "--dataset", prompts_txt, "--base-dir", tmp_path / "runs",
                       "--dry-run"))
    assert "bytes on storage:" in text and "estimated wall time:" in text and "assumes:" in text
    assert not (tmp_path / "runs").exists()
    small = _invoke(*args, "--max-inflight-bytes", "1")  # the budget reaches the plan's memory estimate
    assert small.exit_code == 0, small.output
    small_plan = json.loads(small.stdout)
    assert small_plan["peak_host_bytes"] < plan["peak_host_bytes"]


# ---------------------------------------------------------------------------------------- logit-lens
def test_logit_lens_errors_name_what_they_searched(job_run, workdir):
    _, run_id = job_run
    base = workdir / "runs"
    out = _invoke("logit-lens", "--base-dir", base, "--experiment", "cli-job", "--run", run_id, "--row", "999")
    assert out.exit_code == 2 and "--row 999 is out of range" in out.stderr and "10 rows" in out.stderr, out.output
    out = _invoke("logit-lens", "--base-dir", base, "--experiment", "nope")
    assert out.exit_code == 2 and "experiment 'nope'" in out.stderr and str(base) in out.stderr
    out = _invoke("logit-lens", "--base-dir", workdir / "elsewhere")
    assert out.exit_code == 2 and "elsewhere does not exist" in out.stderr
    out = _invoke("logit-lens", "--base-dir", base, "--run", "7")
    assert out.exit_code == 2 and "run index 7 is out of range" in out.stderr


def _lens_by_hand(text: str, hooked_ref):
    """Top-1 (id, prob) per layer at the last token of ``text`` alone through plain HF: final norm and lm_head on
    each block's output (the model's own logits at the last layer)."""
    hf = tiny_model("llama")
    hidden, logits = hf_row(hf, hooked_ref.hf_tokenizer(text)["input_ids"])
    with torch.no_grad():
        lens = [hf.lm_head(hf.model.norm(hidden[1])), hf.lm_head(hf.model.norm(hidden[2])), logits]
    out = []
    for layer in lens:
        p = layer[-1].softmax(-1)
        out.append((int(p.argmax()), float(p.max())))
    return out


def _table_rows(out: str) -> list[tuple[int, str, str]]:
    rows = []
    for line in out.splitlines():
        m = re.match(r"\s*[│┃|]\s*(\d+)\s*[│┃|]\s*('.*?'|\".*?\")\s*[│┃|]\s*([0-9.]+)\s*[│┃|]", line)
        if m:
            rows.append((int(m.group(1)), m.group(2), m.group(3)))
    return rows


@pytest.mark.parametrize("where", ["local", "workers"])
def test_logit_lens_from_stored_activations(job_run, workdir, texts, hooked_ref, where):
    """The job's run holds resid_out_* and no stored lens: the lens is computed from the stored activations (here
    or on the workers) and equals the lens computed by hand from HF on that prompt alone."""
    _, run_id = job_run
    png = workdir / f"lens-{where}.png"
    out = _ok(_invoke("logit-lens", "--base-dir", workdir / "runs", "--experiment", "cli-job", "--run", run_id,
                      "--row", "5", "--compute", where, "--plot", png))
    said = "lens computed on this machine" if where == "local" else "lens computed on the workers, stored as run"
    assert said in " ".join(out.split()), out
    assert "logit lens, example 5," in out  # the dataset row (row 1 of the second part of 4 rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tok = hooked_ref.hf_tokenizer
    expected = [(layer, repr(tok.decode([i])), f"{p:.3f}") for layer, (i, p) in
                enumerate(_lens_by_hand(texts[5], hooked_ref))]
    assert _table_rows(out) == expected, out
