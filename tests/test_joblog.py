"""Job-log formats: plain lines that nothing wraps, or one JSON object per record."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from easyroutine_dist.joblog import log_handler


def test_plain_and_json_formats_of_other_records():
    out_plain, out_json = io.StringIO(), io.StringIO()
    log = logging.getLogger("easyroutine_dist.tests.events")
    log.propagate = False
    log.setLevel(logging.INFO)
    for h in (log_handler("plain", out_plain), log_handler("json", out_json)):
        log.addHandler(h)
    log.warning("part %d of run %s: %s", 3, "r1", "x" * 300)
    assert out_plain.getvalue() == f"WARNING: part 3 of run r1: {'x' * 300}\n"
    body = json.loads(out_json.getvalue())
    assert body["event"] == "log" and body["level"] == "warning" and body["message"].endswith("x" * 300)
    from easyroutine_dist.errors import ConfigError

    with pytest.raises(ConfigError, match="log format 'yaml' is unknown; use one of plain, json"):
        log_handler("yaml")


def test_stdout_handler_follows_the_current_stdout(monkeypatch):
    log = logging.getLogger("easyroutine_dist.tests.joblog")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(log_handler("json", stdout=True))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)  # swapped after the handler was made, as test runners do
    log.info("hello")
    assert json.loads(out.getvalue())["message"] == "hello"


def test_cli_import_of_joblog_is_light():
    """The CLI sets up its log format before anything heavy: joblog imports neither torch nor ray."""
    import subprocess

    code = "import sys, easyroutine_dist.joblog; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
