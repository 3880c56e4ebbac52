"""Every code block of README.md and docs/*.md runs as written (docs/cluster.md and cluster/ have their own tests).

Python blocks of one file run in order in one namespace, bash blocks run their ``easyroutine-dist`` commands, in a
fresh folder, in a fresh process per file (so a file's Ray cluster is its own). Set-up lines (``bash
scripts/setup.sh``, ``. .venv/bin/activate``) are this environment; the README's pytest command is this suite. A
block that needs a GPU cluster, S3 or placeholder paths carries ``<!-- docs-test: skip (reason) -->`` on the line
before its opening fence; there are few, each with a reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OWN_TESTS = {"docs/cluster.md"}  # tests/test_cluster_recipes.py and tests/test_cluster_security.py
DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")
                              if f"docs/{p.name}" not in OWN_TESTS)
RUNNABLE = {"python", "bash"}
MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s*\((.+)\)\s*-->")
MAX_SKIPPED = 4


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: Optional[str]


def blocks(doc: str) -> list[Block]:
    lines = (REPO / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(r"^```\s*$", lines[i]):
            body.append(lines[i])
            i += 1
        marker = MARKER.search(lines[start - 1]) if start else None
        out.append(Block(doc, start + 1, m.group(1), "\n".join(body) + "\n", marker.group(1) if marker else None))
        i += 1
    return out


def shell_commands(block: Block) -> list[str]:
    """The commands of a bash block this test runs; set-up and the test command itself are left out."""
    out = []
    for raw in block.code.splitlines():
        line = re.sub(r"\s+#.*$", "", raw).strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"^bash scripts/setup\.sh\s*&&\s*", "", line)  # this environment is set up
        if line in ("bash scripts/setup.sh", ". .venv/bin/activate", "source .venv/bin/activate"):
            continue
        if re.match(r"^(\.venv/bin/)?python -m pytest\b", line):
            continue  # this suite
        cmd = re.sub(r"^(\.venv/bin/)?easyroutine-dist\b", str(BIN / "easyroutine-dist"), line)
        if cmd == line:
            raise AssertionError(f"{block.doc}:{block.line}: no way to run {line!r} here; give it a docs-test skip "
                                 "marker with the reason, or run only easyroutine-dist commands")
        out.append(cmd)
    return out


RUNNER = r'''
import json, subprocess, sys, traceback
ns = {"__name__": "__docs__"}
for b in json.load(open(sys.argv[1])):
    print(f"--- {b['where']} ({b['lang']})", flush=True)
    try:
        if b["lang"] == "python":
            exec(compile(b["code"], b["where"], "exec"), ns)
        else:
            for cmd in b["commands"]:
                print("$", cmd, flush=True)
                subprocess.run(cmd, shell=True, check=True, executable="/bin/bash")
    except BaseException:
        traceback.print_exc()
        print(f"FAILED {b['where']}", flush=True)
        sys.exit(1)
print("ALL OK", flush=True)
'''


def test_blocks_are_runnable_or_marked():
    """Every fenced block is python, bash or plain text/JSON; few are skipped, each with a reason."""
    skipped = []
    for doc in DOCS:
        for b in blocks(doc):
            assert b.lang in RUNNABLE | {"", "json", "text", "yaml"}, (doc, b.line, b.lang)
            if b.skip is not None:
                assert len(b.skip) > 20, (doc, b.line, "say why the block cannot run here")
                skipped.append((doc, b.line))
            elif b.lang == "bash":
                shell_commands(b)  # raises for a command this test cannot run
    assert len(skipped) <= MAX_SKIPPED, skipped
    readme = blocks("README.md")
    assert readme[0].skip is None and "easyroutine-dist demo" in readme[0].code  # the first command runs here


def test_blocks_are_found():
    assert any(b.lang == "python" for b in blocks("README.md"))
    found = {(b.doc, b.lang) for doc in DOCS for b in blocks(doc)}
    assert ("docs/quickstart.md", "python") in found and ("README.md", "bash") in found


@pytest.mark.slow
@pytest.mark.timeout(3000)
@pytest.mark.parametrize("doc", [d for d in DOCS if any(b.lang in RUNNABLE and b.skip is None for b in blocks(d))])
def test_doc_runs_as_written(doc, tmp_path):
    todo = [{"where": f"{doc}:{b.line}", "lang": b.lang, "code": b.code,
             "commands": shell_commands(b) if b.lang == "bash" else []}
            for b in blocks(doc) if b.lang in RUNNABLE and b.skip is None]
    spec = tmp_path / "blocks.json"
    spec.write_text(json.dumps(todo))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg", "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "160"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=2900)
    assert proc.returncode == 0 and "ALL OK" in proc.stdout, (proc.stdout[-6000:], proc.stderr[-6000:])
    if doc == "README.md":  # the demo's run is what the commands after it found and checked
        out = proc.stdout
        assert "run(s) in all experiments" in out and "demo" in out, out[-4000:]
        assert re.search(r"run \S+ is intact", out) and (work / "runs" / "logit_lens.png").exists()
