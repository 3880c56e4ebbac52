"""``easyroutine-dist`` through typer's CliRunner on the session's Ray cluster: extract from a job YAML (a tiny model
factory, a .txt dataset), query, index stats/rebuild, refused job keys, the logit lens PNG, --help."""

from __future__ import annotations

import re
from importlib.metadata import entry_points

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

COMMANDS = ("extract", "query", "logit-lens", "index", "demo")
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
    assert cells[-2:] == ["10", "3"], out  # rows and parts columns
    monkeypatch.setattr(cli.console, "width", 200)  # wide enough: nothing folded
    wide = _ok(_invoke("query", "--base-dir", workdir / "runs", "--experiment", "cli-job"))
    cells = re.split(r"\s{2,}", next(line for line in wide.splitlines() if run_id in line).strip())
    assert cells == ["0", run_id, "tiny-llama-factory", "from-yaml", "10", "3"], wide
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
    assert result.exit_code != 0
    assert "num_worker" in result.output and "unknown keys" in result.output, result.output
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
