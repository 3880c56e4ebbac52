"""docs/cluster.md and cluster/ match the code (issue 15 item 2).

* Every ``easyroutine-dist`` and ``ray`` command line in docs/*.md (code blocks and inline code) and in cluster/
  is parsed by the real command-line parser (typer/click for ours, Ray's click CLI for ``ray``): no unknown
  flag, no bad value, and the files they name exist. Every other program in docs/cluster.md's shell blocks is
  on a short list of external tools (kubectl, aws, sbatch, ...) this test cannot run.
* The job-config table is the schema: its keys are exactly the loader's, each flag sets its key through the
  real ``extract`` command and ``prepare`` (flag over YAML over default), and each default is the one applied.
* Every job YAML in cluster/ (and the RayJob's ConfigMap) goes through the job loader.
* The examples of what the CLI prints (the job-log lines, the JSON event, the ``query`` table, the shared-folder
  error) have the shape the code prints now.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import typer
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLUSTER_MD = DOCS / "cluster.md"
CLUSTER = ROOT / "cluster"
RUN_ID = "2026-01-02_03-04-05-000006_0123abcd"

#: programs in docs/cluster.md's shell blocks that no test can run here (clouds, Kubernetes, SLURM, shell)
EXTERNAL = {"kubectl", "aws", "sbatch", "pip", "python", "curl", "export", "source", "ssh", "chmod", "mkdir",
            "umask", "scp", "docker", "cd", "RUN_ID", "JOB_CONFIG", "GPUS_PER_WORKER", "bash"}
OURS = {"easyroutine-dist"}
#: shell variables of the recipes, with the value they default to
VARIABLES = {"JOB_CONFIG": "cluster/job-mistral7b.yaml", "GPUS_PER_WORKER": "1", "num_workers": "8",
             "RUN_ID": RUN_ID, "RAY_ADDRESS": "10.0.0.1:6379", "RAY_PORT": "6379", "HOME": "/home/me"}


# --------------------------------------------------------------------------------------------- finding commands
def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced code block, fences paired in order."""
    out, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                out.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return out


def _shell_blocks(text: str) -> list[str]:
    return [body for lang, body in fenced_blocks(text) if lang in ("bash", "sh", "shell", "console")]


def _logical_lines(block: str) -> list[str]:
    return [ln for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]


def _substitute(line: str) -> str:
    """Placeholders (``<run id>``) and shell variables become values the parsers accept."""
    def placeholder(m: re.Match) -> str:
        before = line[:m.start()].rstrip()
        return RUN_ID if before.endswith("--run-id") or "RUN_ID=" in before[-8:] else "2"

    line = re.sub(r"<[^<>\n]+>", placeholder, line)
    line = re.sub(r'\$\{\w+\[@\]\+"\$\{\w+\[@\]\}"\}', "", line)  # optional array arguments (sbatch's resume args)
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(?::-[^}]*)?\}?", lambda m: VARIABLES.get(m.group(1), "1"), line)


def simple_commands(line: str) -> Iterator[list[str]]:
    """The simple commands of one shell line (split at ``&&``, ``||``, ``;``, ``|``, ``&``, parentheses)."""
    lex = shlex.shlex(_substitute(line), posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    current: list[str] = []
    redirect = False
    for tok in lex:
        if tok and set(tok) <= set("&|;()<>"):
            if set(tok) & set("<>"):  # a redirection: its file is no command
                redirect = True
                continue
            if current:
                yield current
            current = []
        elif redirect:
            redirect = False
        else:
            current.append(tok)
    if current:
        yield current


def tool_calls(tokens: list[str]) -> Iterator[tuple[str, list[str]]]:
    """``("easyroutine-dist" | "ray", args)`` for each of our tools called in a simple command (also after
    ``srun ...`` or ``ray job submit ... --``)."""
    for i, tok in enumerate(tokens):
        name = tok.rsplit("/", 1)[-1]
        if name == "easyroutine-dist" and i + 1 < len(tokens) and re.fullmatch(r"-.*|[a-z][a-z-]*", tokens[i + 1]):
            args = [t for t in tokens[i + 1:] if t != "..."]
            yield "easyroutine-dist", args
            return
        if tok == "ray" and i + 1 < len(tokens) and tokens[i + 1] in RAY_COMMANDS:
            args = [t for t in tokens[i + 1:] if t != "..."]
            yield "ray", args  # with what follows "--" (ray job submit's entrypoint)
            if "--" in args:
                yield from tool_calls(args[args.index("--") + 1:])
            return


def _doc_commands() -> list[tuple[str, str, list[str]]]:
    """``(where, tool, args)`` of every call of our tools in docs/*.md and cluster/*."""
    out = []
    for md in sorted(DOCS.glob("*.md")):
        text = md.read_text()
        lines = [ln for b in _shell_blocks(text) for ln in _logical_lines(b)]
        # inline code: full command lines only (a bare "ray up" in a sentence names a command, it does not run one)
        lines += [c for c in re.findall(r"`((?:easyroutine-dist|ray) [^`]+)`", text)
                  if (c.startswith("easyroutine-dist") and len(c.split()) > 2) or " --" in c]
        for ln in lines:
            for cmd in simple_commands(ln):
                out += [(f"{md.name}: {ln.strip()[:90]}", tool, args) for tool, args in tool_calls(cmd)]
    for path in sorted(CLUSTER.iterdir()):
        text = re.sub(r"\\\n\s*#?", " ", path.read_text())  # continuation lines, in comments too
        for raw in text.splitlines():
            ln = re.sub(r"^\s*(?:#+\s*)?(?:-\s+)?(?:entrypoint:\s*)?", "", raw)
            spans = [c for c in re.findall(r"`([^`]+)`", ln) if len(c.split()) > 2]  # names alone run nothing
            rest = re.sub(r"`[^`]*`", " ", ln)
            for cand in spans + [rest]:
                if not re.search(r"(?:^|[\s/])(?:easyroutine-dist|ray)\s", cand):
                    continue
                cand = re.sub(r"\s#\s.*$", "", cand)  # a trailing comment
                for cmd in simple_commands(cand):
                    out += [(f"{path.name}: {cand.strip()[:90]}", tool, args) for tool, args in tool_calls(cmd)]
    return out


def _ray_cli():
    from ray.scripts.scripts import cli

    return cli


RAY_COMMANDS = {"start", "stop", "status", "job", "up", "down", "dashboard", "attach", "exec", "rsync-up"}
COMMANDS = _doc_commands()


def test_commands_were_found():
    """The extraction finds the commands this page is about (a broken regex would make the checks vacuous)."""
    where = {(tool, args[0]) for _, tool, args in COMMANDS}
    for want in [("easyroutine-dist", "extract"), ("easyroutine-dist", "query"), ("easyroutine-dist",
                 "import-easyroutine"), ("ray", "start"), ("ray", "up"), ("ray", "job"), ("ray", "status")]:
        assert want in where, want
    ours = [args for _, tool, args in COMMANDS if tool == "easyroutine-dist" and args[0] == "extract"]
    assert any("--resume" in a for a in ours) and any("--gpus-per-worker" in a for a in ours)
    assert len(COMMANDS) >= 25


def _rest(ctx: Any) -> list[str]:
    """A group context's unparsed arguments (the subcommand and its args), across click versions."""
    protected = getattr(ctx, "_protected_args", None)
    if protected is None:
        protected = getattr(ctx, "protected_args", [])
    return list(protected) + list(ctx.args)


def _parse_ours(args: list[str]) -> Any:
    """Parse with the CLI's own click objects; returns the subcommand's context (nothing runs)."""
    from easyroutine_dist.cli import app

    group = typer.main.get_command(app)
    ctx = group.make_context("easyroutine-dist", list(args), resilient_parsing=False)
    name, cmd, rest = group.resolve_command(ctx, _rest(ctx))
    assert cmd is not None and not hasattr(cmd, "resolve_command"), name  # a command, not a group
    return cmd.make_context(name, rest, parent=ctx)


def _exists(path: str) -> bool:
    if path.startswith("/config/"):  # the RayJob's ConfigMap, mounted on the head
        return True
    return any((base / path).exists() for base in (ROOT, CLUSTER)) or path.startswith(("s3://", "/mnt/", "~"))


@pytest.mark.parametrize("where,tool,args", COMMANDS, ids=[f"{i}" for i in range(len(COMMANDS))])
def test_every_command_line_parses(where, tool, args):
    if tool == "easyroutine-dist":
        ctx = _parse_ours(args)
        config = ctx.params.get("config")
        if config is not None:
            assert _exists(str(config)), f"{where}: --config {config} does not exist"
        if ctx.params.get("resume"):
            assert ctx.params.get("run_id"), f"{where}: --resume without --run-id"
        return
    cli = _ray_cli()
    ctx = cli.make_context("ray", list(args), resilient_parsing=False)
    name, cmd, rest = cli.resolve_command(ctx, _rest(ctx))
    if hasattr(cmd, "resolve_command"):  # ray job <sub>
        sub = cmd.make_context(name, rest, parent=ctx)
        name, cmd, rest = cmd.resolve_command(sub, _rest(sub))
        ctx = sub
    sub_ctx = cmd.make_context(name, rest, parent=ctx)
    for value in sub_ctx.params.values():  # cluster YAMLs named on the command line exist
        if isinstance(value, str) and value.startswith("cluster/"):
            assert (ROOT / value).exists(), f"{where}: {value} does not exist"


def test_a_wrong_flag_is_caught():
    """The parsing above really refuses what the CLI would refuse."""
    def refused(call) -> str:
        with pytest.raises(Exception) as err:  # click's (or typer's own copy of click's) usage errors
            call()
        return type(err.value).__name__

    assert refused(lambda: _parse_ours(["extract", "--num-worker", "2"])) == "NoSuchOption"
    assert refused(lambda: _parse_ours(["extract", "--num-workers", "two"])) == "BadParameter"
    assert refused(lambda: _parse_ours(["verify"])) == "MissingParameter"
    assert refused(lambda: _ray_cli().commands["start"].make_context("start", ["--hed"])) == "NoSuchOption"


def test_cluster_md_shell_blocks_use_known_programs():
    text = CLUSTER_MD.read_text()
    unknown = set()
    for block in _shell_blocks(text):
        for ln in _logical_lines(block):
            for cmd in simple_commands(ln):
                prog = next((t for t in cmd if not re.match(r"[A-Z_]+=", t)), cmd[0])  # after VAR=value
                prog = prog.rsplit("/", 1)[-1]
                if prog not in OURS | {"ray"} | EXTERNAL:
                    unknown.add(prog)
    assert not unknown, f"commands in docs/cluster.md this test neither parses nor knows: {sorted(unknown)}"


# --------------------------------------------------------------------------------------------- the key table
def key_table() -> list[dict[str, str]]:
    """Rows of the table in '## Job config': key, flag cell, default cell."""
    section = re.search(r"^## Job config\n(.*?)(?=^## )", CLUSTER_MD.read_text(), re.M | re.S).group(1)
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows.append({"key": cells[0].strip("`"), "flag": cells[1], "default": cells[2]})
    return rows


def test_table_keys_are_the_loaders_keys():
    from easyroutine_dist.cli.jobs import JOB_KEYS

    keys = [r["key"] for r in key_table()]
    assert sorted(keys) == sorted(JOB_KEYS) and len(keys) == len(set(keys))
    extract = _parse_ours(["extract"]).command
    options = {o for p in extract.params for o in p.opts}
    for row in key_table():
        for flag in re.findall(r"`(--[a-z-]+)", row["flag"]):
            assert flag in options, f"{row['key']}: {flag} is not an option of extract"
    text = CLUSTER_MD.read_text()
    for flag in sorted(options - {"--help"}):  # every flag of extract is on the page
        assert f"`{flag}" in text, f"docs/cluster.md does not mention {flag}"


def _write_model(folder: Path) -> str:
    from tests.distributed.tiny import save_tiny_model

    return save_tiny_model(folder)


def _prepared(monkeypatch, args: list[str], cwd: Path) -> Any:
    """The Job the real ``extract`` command builds from ``args`` (real parsing, real prepare), stopped before Ray."""
    import easyroutine_dist.cli.extract as extract_cmd
    from easyroutine_dist.cli import app
    from easyroutine_dist.cli.jobs import prepare as real

    got: dict[str, Any] = {}

    def capture(*a: Any, **kw: Any) -> Any:
        got["job"] = real(*a, **kw)
        raise typer.Exit(0)

    monkeypatch.setattr(extract_cmd, "prepare", capture)
    monkeypatch.chdir(cwd)
    result = CliRunner().invoke(app, ["extract", *args])
    assert result.exit_code == 0 and "job" in got, (result.output, result.exception)
    return got["job"]


def _job_view(job: Any) -> dict[str, Any]:
    """A Job as the table's keys."""
    return {"model": job.model, "model_kwargs": job.model_kwargs, "num_workers": job.num_workers,
            "gpus_per_worker": job.gpus_per_worker, "cpus_per_worker": job.cpus_per_worker, "dataset": job.dataset,
            "batch_size": job.batch_size, "partition_size": job.partition_size,
            "target_token_positions": job.positions,
            "extraction_config": {k: v for k, v in job.config.to_dict().items()
                                  if k.startswith(("extract_", "save_logits")) and v},
            "logit_lens": None if job.lens is None else {k: job.lens[k] for k in ("target_key", "top_k")},
            "base_dir": Path(job.saver.store.root).name, "experiment": job.saver.experiment_name, "tag": job.tag,
            "ray_address": job.ray_address, "shared_base_dir": job.shared_base_dir,
            "max_inflight_bytes": job.max_inflight_bytes if job.max_inflight_bytes is not None else 512 * 2**20}


@pytest.mark.slow
def test_every_key_and_flag_through_the_loader(tmp_path, monkeypatch):
    """YAML alone, YAML plus every flag, and no YAML: the Job holds the flag's value, else the key's, else the
    table's default."""
    model_a, model_b = _write_model(tmp_path / "model-a"), _write_model(tmp_path / "model-b")
    (tmp_path / "a.txt").write_text("alpha beta gamma\ndelta epsilon\n")
    (tmp_path / "b.txt").write_text("one two three four\nfive six seven\nnine ten eleven\n")
    job_yaml = {"model": model_a, "model_kwargs": {"dtype": "float32"}, "num_workers": 3, "gpus_per_worker": 1,
                "cpus_per_worker": 2, "dataset": {"path": "a.txt"}, "batch_size": 2, "partition_size": 4,
                "target_token_positions": ["first"], "extraction_config": {"extract_attn_out": True},
                "logit_lens": {"target_key": "attn_out_{i}", "top_k": 3}, "base_dir": str(tmp_path / "base-a"),
                "experiment": "exp-a", "tag": "tag-a", "ray_address": "10.0.0.1:6379", "shared_base_dir": False,
                "max_inflight_bytes": 64 * 2**20}
    from easyroutine_dist.cli.jobs import JOB_KEYS

    assert set(job_yaml) == JOB_KEYS  # every key is exercised
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job_yaml))
    flags = {"model": ["--model", model_b], "num_workers": ["--num-workers", "5"],
             "gpus_per_worker": ["--gpus-per-worker", "0"], "cpus_per_worker": ["--cpus-per-worker", "4"],
             "dataset": ["--dataset", "b.txt"], "batch_size": ["--batch-size", "3"],
             "partition_size": ["--partition-size", "6"],
             "target_token_positions": ["--positions", "last", "--positions", "1:3"],
             "extraction_config": ["--extract", "mlp_out"],
             "logit_lens": ["--logit-lens", "mlp_out_{i}", "--top-k", "2"],
             "base_dir": ["--base-dir", str(tmp_path / "base-b")], "experiment": ["--experiment", "exp-b"],
             "tag": ["--tag", "tag-b"], "ray_address": ["--ray-address", "auto"],
             "shared_base_dir": ["--shared-base-dir"], "max_inflight_bytes": ["--max-inflight-bytes", "1048576"]}
    by_flag = {"model": model_b, "model_kwargs": {"dtype": "float32"}, "num_workers": 5, "gpus_per_worker": 0,
               "cpus_per_worker": 4, "dataset": ["one two three four", "five six seven", "nine ten eleven"],
               "batch_size": 3, "partition_size": 6, "target_token_positions": ["last", (1, 3)],
               "extraction_config": {"extract_attn_out": True, "extract_mlp_out": True, "save_logits": True},
               "logit_lens": {"target_key": "mlp_out_{i}", "top_k": 2}, "base_dir": "base-b",
               "experiment": "exp-b", "tag": "tag-b", "ray_address": "auto", "shared_base_dir": True,
               "max_inflight_bytes": 2**20}
    by_yaml = {**job_yaml, "dataset": ["alpha beta gamma", "delta epsilon"], "base_dir": "base-a",
               "extraction_config": {"extract_attn_out": True, "save_logits": True}}

    rows = {r["key"]: r for r in key_table()}
    got_yaml = _job_view(_prepared(monkeypatch, ["--config", "job.yaml"], tmp_path))
    assert got_yaml == by_yaml
    all_flags = [a for key, f in flags.items() for a in f]
    got_flags = _job_view(_prepared(monkeypatch, ["--config", "job.yaml", *all_flags], tmp_path))
    assert got_flags == by_flag
    for key in JOB_KEYS:  # a key with a flag in the table is one the flag changed, and the other way round
        has_flag = rows[key]["flag"] != "(none)"
        assert has_flag == (key in flags), key
        assert (got_flags[key] != got_yaml[key]) == has_flag, key

    # no YAML: the table's defaults (the model's is the bundled smollm2: only its name is compared)
    got = _job_view(_prepared(monkeypatch, ["--dataset", "a.txt"], tmp_path))
    for key, row in rows.items():
        cell = row["default"]
        if cell == "required" or key == "dataset":
            continue
        want = None if cell.startswith("none") else yaml.safe_load(re.search(r"`([^`]+)`", cell).group(1))
        if key == "base_dir":
            want = Path(want).name
        if key == "extraction_config":
            want = {**want, "save_logits": True}
        assert got[key] == want, (key, got[key], want)


# --------------------------------------------------------------------------------------------- job YAMLs
def _job_files() -> list[tuple[str, str]]:
    out = [(p.name, p.read_text()) for p in sorted(CLUSTER.glob("job-*.yaml"))]
    for doc in yaml.safe_load_all((CLUSTER / "kuberay-rayjob.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap":
            out += [(f"ConfigMap {name}", text) for name, text in doc["data"].items()]
    for i, block in enumerate(b for lang, b in fenced_blocks(CLUSTER_MD.read_text()) if lang in ("yaml", "yml")):
        out.append((f"docs/cluster.md yaml block {i}", block))
    return out


@pytest.mark.parametrize("name,text", _job_files(), ids=[n for n, _ in _job_files()])
def test_job_yamls_load(name, text, tmp_path):
    from easyroutine_dist.cli.jobs import DATASET_KEYS, load_job

    path = tmp_path / "job.yaml"
    path.write_text(text)
    job = load_job(path)
    table = {r["key"] for r in key_table()}
    assert set(job) <= table, f"{name}: keys outside the table {sorted(set(job) - table)}"
    ds = job.get("dataset")
    assert not isinstance(ds, dict) or set(ds) <= DATASET_KEYS, name


def test_gpus_per_worker_zero_is_documented():
    job = yaml.safe_load((CLUSTER / "job-cpu.yaml").read_text())
    assert job["gpus_per_worker"] == 0
    assert "`gpus_per_worker: 0`" in CLUSTER_MD.read_text()


@pytest.mark.slow
def test_cpu_job_dry_run(tmp_path, monkeypatch):
    """cluster/job-cpu.yaml as the plain-ray-start recipe runs it, as a dry run (model, dataset, plan; no Ray)."""
    from easyroutine_dist.cli import app

    (tmp_path / "prompts.txt").write_text("The capital of France is\nOne, two, three,\nThe sky is\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["extract", "--config", str(CLUSTER / "job-cpu.yaml"), "--base-dir",
                                      str(tmp_path / "runs"), "--dry-run", "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    plan = json.loads(next(ln for ln in result.output.splitlines() if ln.startswith("{")))  # stderr is mixed in
    assert plan["rows"] == 3 and plan["num_workers"] == 4 and plan["partitions"] == 1, plan


# --------------------------------------------------------------------------------------------- printed examples
def _section(title: str) -> str:
    return re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", CLUSTER_MD.read_text(), re.M | re.S).group(1)


def _shape(line: str) -> str:
    """A printed line with its values (ids, paths, numbers, names) replaced by placeholders."""
    line = re.sub(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}_[0-9a-f]{8}", "RUN", line)
    line = re.sub(r"resume it with: .*$", "resume it with: CMD", line)
    line = re.sub(r"(?:s3://|/)\S+", "URL", line)
    line = re.sub(r"node id [0-9a-f]+", "node id H", line)
    line = re.sub(r"node \S+ \(", "node N (", line)
    line = re.sub(r"'[^']*'", "'S'", line)
    return re.sub(r"\d+(?:\.\d+)?(?:\.\d+)*", "0", line)


def test_job_log_example_has_the_printed_shape(tmp_path):
    """The plain lines of 'Job logs' are lines RunEvents prints, values aside; the JSON example has exactly the
    fields of the run_committed event."""
    import io
    import logging

    from easyroutine_dist.distributed import DistributedRun
    from easyroutine_dist.distributed.events import LOGGER_NAME, RunEvents
    from easyroutine_dist.joblog import log_handler

    plain, js = io.StringIO(), io.StringIO()
    log = logging.getLogger(LOGGER_NAME)
    handlers, level = [log_handler("plain", plain), log_handler("json", js)], log.level
    log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        ev = RunEvents("extract", RUN_ID, "exp", "s3://b/p", resume_command=lambda r: f"easyroutine-dist x {r}")
        ev.started(10, 4)
        infos = [{"node": f"n{i}", "node_ip": f"10.0.0.{i}", "node_id": f"{i}" * 56, "gpu_ids": [], "pid": 1}
                 for i in (1, 2)]
        ev.workers_ready(infos, "s3://b/p/run")
        for pid, w in ((0, 0), (1, 1), (2, 0)):
            ev.part_committed(w, {"part_id": pid, "rows": 4, "bytes": 300_000, "seconds": 1.0, "skipped": False})
        ev.finish(DistributedRun(RUN_ID, "exp", "m", "s3://b/p/run", 10, 3, 3, 0, 0, 2.0))
    finally:
        for h in handlers:
            log.removeHandler(h)
        log.setLevel(level)
    printed = {_shape(ln) for ln in plain.getvalue().splitlines()}
    section = _section("Job logs")
    text_block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    for line in text_block.splitlines():
        assert _shape(line) in printed, f"docs line not printed by the code:\n{line}\n{_shape(line)}"
    doc_json = json.loads(re.search(r"```json\n(.*?)\n```", section, re.S).group(1))
    real = [json.loads(ln) for ln in js.getvalue().splitlines()][-1]

    def keys(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: keys(v) for k, v in d.items()}
        if isinstance(d, list) and d and isinstance(d[0], dict):
            return [keys(d[0])]
        return type(d).__name__ if d is not None else None

    assert keys(doc_json) == keys(real)
    for name in ("run_started", "workers_ready", "part_committed", "part_retried", "run_committed", "run_failed"):
        assert f"`{name}`" in section, name


def test_shared_folder_error_example_is_the_codes(tmp_path, monkeypatch):
    from easyroutine_dist.distributed import placement
    from easyroutine_dist.errors import ConfigError
    from easyroutine_dist.storage.runs import RunHandle, RunWriter

    line = re.search(r"```text\n(error: .*?)\n```", _section("A local `base_dir` on several nodes"), re.S).group(1)
    m = re.search(r"ConfigError\(\"base_dir '([^']+)' is a local folder that node (\S+) does not share.*? is not in "
                  r"(\S+) on this node", line)
    root, node, run_path = m.groups()
    run_id = re.search(r"run (\S+)'s metadata", line).group(1)
    exp, slug = run_path[len(root) + 1:].split("/")[:2]
    monkeypatch.setattr(placement.socket, "gethostname", lambda: node)
    store = RunWriter(tmp_path).store
    store.root = root  # the same folder name as the docs, never created: nothing is written
    with pytest.raises(ConfigError) as err:
        placement.check_shared_run_dir(store, RunHandle(run_id, exp, slug, "", {}), wait_s=0)
    assert repr(err.value) in line
    assert line.startswith(f"error: run {run_id}: a partition failed on a worker: ")


@pytest.mark.slow
def test_query_example_is_what_query_prints(tmp_path):
    """The query table in 'Finding runs again', as query prints it into a log (not a terminal): the same title,
    header and row layout for a run with the same names."""
    import subprocess
    import sys

    import torch

    from easyroutine_dist.storage.runs import RunWriter

    block = re.search(r"```text\n(.*?)```", _section("Finding runs again"), re.S).group(1)
    doc_lines = [ln.rstrip() for ln in block.splitlines()]
    row = next(ln for ln in doc_lines if re.match(r"\s*0\s+\d{4}-", ln)).split()
    run_id, model, tag, rows, parts = row[1], row[2], row[3], int(row[4]), int(row[5])
    experiment = re.search(r"in experiment '([^']+)'", block).group(1)
    writer = RunWriter(tmp_path)
    run = writer.begin_run(experiment, model, {"tag": tag}, run_id=run_id)
    per = [rows // parts + (1 if i < rows % parts else 0) for i in range(parts)]
    for pid, n in enumerate(per):
        writer.commit_part(run, writer.write_part(run, pid, {"resid_out_0": torch.zeros(n, 1, 4)}))
    writer.commit_run(run, n_rows=rows)
    out = subprocess.run([sys.executable, "-m", "easyroutine_dist.cli", "query", "--base-dir", str(tmp_path),
                          "--experiment", experiment], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    printed = [ln.rstrip() for ln in out.stdout.rstrip().splitlines()]
    size = re.compile(r"\d+(?:\.\d)? (?:B|KiB|MiB|GiB)$")

    def shape(lines: list[str]) -> list[str]:  # the size differs, and with it the widths
        return [re.sub(r"─+", "─", re.sub(r"\s+", " ", size.sub("SIZE", ln))) for ln in lines]

    assert shape(printed) == shape(doc_lines), "\n".join(printed)
    assert all(len(ln) < 200 and "…" not in ln for ln in printed)  # nothing folded or cut
