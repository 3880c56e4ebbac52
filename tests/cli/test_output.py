"""What the CLI writes into a job log (issue 15 item 1): nothing wrapped when not a terminal, --log-format, and the
exact resume command."""

from __future__ import annotations

import io
import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from rich.table import Table

from easyroutine_dist.cli.output import JobConsole, resume_command, setup_logging

from .conftest import invoke, save_run

RUN = "2026-01-02_03-04-05-000006_0123abcd"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv,want", [
    (["/opt/venv/bin/easyroutine-dist", "extract", "--config", "job.yaml", "--ray-address", "auto"],
     ["/opt/venv/bin/easyroutine-dist", "extract", "--config", "job.yaml", "--ray-address", "auto", "--run-id", RUN,
      "--resume"]),
    # a resume of a resume: the old --run-id/--resume go, in every spelling
    (["/opt/venv/bin/easyroutine-dist", "extract", "--run-id", "old", "--resume", "--tag", "a b"],
     ["/opt/venv/bin/easyroutine-dist", "extract", "--tag", "a b", "--run-id", RUN, "--resume"]),
    (["/opt/venv/bin/easyroutine-dist", "extract", "--run-id=old", "--no-resume", "--positions", "2:5"],
     ["/opt/venv/bin/easyroutine-dist", "extract", "--positions", "2:5", "--run-id", RUN, "--resume"]),
    ([str(ROOT / "easyroutine_dist" / "cli" / "__main__.py"), "extract", "--dataset", "p.txt"],
     [sys.executable, "-m", "easyroutine_dist.cli", "extract", "--dataset", "p.txt", "--run-id", RUN, "--resume"]),
])
def test_resume_command(argv, want):
    got = resume_command(RUN, argv)
    assert shlex.split(got) == want
    assert "'a b'" in got if "a b" in want else True  # quoted for a shell


def test_resume_command_uses_the_short_name_when_it_is_on_path(tmp_path, monkeypatch):
    exe = tmp_path / "easyroutine-dist"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert resume_command(RUN, [str(exe), "extract"]) == f"easyroutine-dist extract --run-id {RUN} --resume"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "easyroutine-dist").write_text("#!/bin/sh\n")
    assert resume_command(RUN, [str(other / "easyroutine-dist"), "extract"]).startswith(str(other))


def test_job_console_never_wraps_in_a_log():
    out = io.StringIO()
    console = JobConsole(file=out, _environ={"COLUMNS": "80"})  # a StringIO is not a terminal
    url = "s3://bucket/" + "a-long-prefix/" * 20 + RUN
    console.print(f"run {RUN} saved at {url}")
    table = Table(title="runs")
    for col in ("run id", "url"):
        table.add_column(col)
    table.add_row(RUN, url)
    console.print(table)
    console.rule("dry run")
    lines = out.getvalue().splitlines()
    assert lines[0] == f"run {RUN} saved at {url}"
    assert any(RUN in ln and url in ln for ln in lines[1:])  # the row is one line, whole
    assert lines[-1] == "-- dry run --"
    terminal = JobConsole(file=io.StringIO(), force_terminal=True, width=80)
    assert terminal.width == 80  # on a terminal, the terminal's width


def test_log_format_json_and_plain(monkeypatch, capsys):
    log = logging.getLogger("easyroutine_dist.tests.output")
    try:
        setup_logging("json", verbose=False)
        log.info("hello %s", "json")
        setup_logging("plain")
        log.warning("x" * 200)
        out, err = capsys.readouterr()
        assert json.loads(out)["message"] == "hello json"  # JSON on stdout
        assert err == f"WARNING: {'x' * 200}\n"  # plain on stderr, one line
        handlers = [h for h in logging.getLogger("easyroutine_dist").handlers if getattr(h, "_easyroutine_cli", 0)]
        assert len(handlers) == 1  # replaced, not stacked
    finally:
        setup_logging("auto")


def test_bad_log_format_is_refused_before_anything(tmp_path):
    result = invoke("extract", "--dataset", str(tmp_path / "missing.txt"), "--log-format", "yaml")
    assert result.exit_code == 2
    assert "--log-format 'yaml' is unknown; use one of auto, plain, json" in result.output


def test_query_in_a_log_keeps_long_names_whole(tmp_path):
    """query into a pipe (a job log): a row of over 300 characters (run id, a 190-character model name, a
    120-character tag) is one line, nothing folded."""
    model, tag = "org/" + "m" * 186, "t" * 120
    run_id = save_run(tmp_path, "exp", model=model, tag=tag)
    env = {**os.environ, "COLUMNS": "80"}  # as a shell that exports it would: a log is still not a terminal
    out = subprocess.run([sys.executable, "-m", "easyroutine_dist.cli", "query", "--base-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    row = [ln for ln in out.stdout.splitlines() if run_id in ln]
    assert len(row) == 1 and model in row[0] and tag in row[0], out.stdout
