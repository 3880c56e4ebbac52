"""The CLI a user meets first: plain --help with a help text and default for every option, one-line errors with
exit code 2 before anything starts (the traceback only with --verbose), and timings of the refusals."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import invoke

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent / "easyroutine-dist"
COMMANDS = ("extract", "query", "verify", "logit-lens", "index", "import-easyroutine", "demo")


def _click_commands():
    import typer

    from easyroutine_dist.cli import app

    group = typer.main.get_command(app)
    return group, {name: group.commands[name] for name in COMMANDS}


def test_every_option_has_help_and_default():
    group, commands = _click_commands()
    assert sorted(commands) == sorted(group.commands), "a command is missing from this test's list"
    for name, cmd in [("(top)", group), *commands.items()]:
        for p in cmd.params:
            if p.param_type_name != "option" or p.name == "help":
                continue
            assert p.help and len(p.help) > 10, (name, p.name)
            shown = p.show_default and p.default is not None and not (p.is_flag and not p.secondary_opts)
            assert shown or "default" in p.help.lower(), (name, p.name, p.help)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_is_plain(command):
    result = invoke(*([command] if command else []), "--help", terminal_width=100)
    assert result.exit_code == 0, result.output
    out = result.output
    for bad in ("<bool>", "<str>", "<int>", "``", ":class:", ":func:", "<path>"):
        assert bad not in out, (command, bad, out)
    if command:
        group, commands = _click_commands()
        for p in commands[command].params:
            if p.param_type_name == "option":
                assert p.opts[0] in out, (command, p.opts[0])


def test_extract_without_arguments_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("extract")
    assert result.exit_code == 2
    assert result.stdout == "" and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: extract needs a dataset"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_fails_fast_in_process(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    result = invoke("extract", "--dataset", "prompts.txt")
    assert time.perf_counter() - t0 < 3.0
    assert result.exit_code == 2 and "'prompts.txt' does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_dataset_fails_fast_from_the_shell(tmp_path):
    """The console script itself (imports included) refuses a typo'd dataset in seconds, in one line."""
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN), "extract", "--dataset", str(tmp_path / "promts.txt")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    took = time.perf_counter() - t0
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "promts.txt" in proc.stderr, proc.stderr
    assert took < 10.0, took  # generous: ~1 s on an idle machine (no torch import before this check)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["extract", "--dataset", "{data}", "--extract", "resid_outt"], "'resid_outt' is not an activation"),
    (["extract", "--dataset", "{data}", "--experiment", "../up"], "experiment name '../up' is not allowed"),
    (["extract", "--dataset", "{data}", "--positions", "lastt"], "lastt"),
    (["extract", "--dataset", "{data}", "--batch-size", "0"], "batch_size=0"),
    (["extract", "--dataset", "{bad_json}"], "line 2 is not JSON"),
    (["extract", "--config", "{missing_yaml}"], "does not exist"),
    (["extract", "--config", "{bad_yaml}"], "is not valid YAML"),
    (["extract", "--dataset", "{data}", "--resume"], "--resume needs"),
    (["extract", "--dataset", "{data}", "--config", "{shared_yaml}"], "shared_base_dir='yes' must be true or false"),
    (["extract", "--dataset", "{data}", "--max-inflight-bytes", "0"], "max_inflight_bytes=0 must be an int >= 1"),
    (["query", "--base-dir", "{tmp}", "--custom", "[1, 2]"], "is a JSON list"),
    (["query", "--base-dir", "{tmp}", "--custom", "notjson"], "is not JSON"),
    (["query", "--base-dir", "{tmp}/nothing-here"], "does not exist"),
    (["index", "compact", "--base-dir", "{tmp}"], "'compact' is unknown"),
])
def test_refused_input_is_one_line_and_exit_2(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("hello world\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    (tmp_path / "shared.yaml").write_text('shared_base_dir: "yes"\n')
    files = {"data": tmp_path / "p.txt", "bad_json": tmp_path / "bad.jsonl", "missing_yaml": tmp_path / "no.yaml",
             "bad_yaml": tmp_path / "bad.yaml", "shared_yaml": tmp_path / "shared.yaml", "tmp": tmp_path}
    before = sorted(tmp_path.rglob("*"))
    result = invoke(*[a.format(**files) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.stderr
    assert expected in result.stderr, result.stderr
    assert sorted(tmp_path.rglob("*")) == before  # nothing written for refused input


def test_verbose_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quiet = invoke("extract", "--dataset", "nope.txt")
    loud = invoke("--verbose", "extract", "--dataset", "nope.txt")
    assert quiet.exit_code == loud.exit_code == 2
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr and "ConfigError" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("easyroutine-dist") == "easyroutine_dist.cli:app"
    out = subprocess.run([sys.executable, "-m", "easyroutine_dist.cli", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0 and all(re.search(rf"\b{c}\b", out.stdout) for c in COMMANDS), out.stdout


@pytest.mark.parametrize("where", ["local", "s3"])
def test_jsonl_and_txt_datasets_locally_and_on_s3(where, tmp_path, request, monkeypatch):
    from easyroutine_dist.cli.jobs import load_dataset

    body = {"p.jsonl": '{"text": "first prompt"}\n\n{"text": "second"}\n', "p.txt": "first prompt\n\nsecond\n",
            "p.json": '[{"prompt": "first prompt"}, {"prompt": "second"}]'}
    if where == "local":
        for name, text in body.items():
            (tmp_path / name).write_text(text)
        base = str(tmp_path)
    else:
        import s3fs

        endpoint = request.getfixturevalue("s3_endpoint")
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        base = request.getfixturevalue("s3_bucket_url")
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        for name, text in body.items():
            fs.pipe_file(f"{base}/{name}", text.encode())
    assert load_dataset(f"{base}/p.jsonl") == ["first prompt", "second"]
    assert load_dataset(f"{base}/p.txt") == ["first prompt", "second"]
    assert load_dataset({"path": f"{base}/p.json", "text_column": "prompt"}) == ["first prompt", "second"]


def test_positions_flags():
    from easyroutine_dist.cli.jobs import positions

    assert positions(["last", "3", "-1", "2:5", ":3", "4:", "last-2"]) == [
        "last", 3, -1, (2, 5), (None, 3), (4, None), "last-2"]
