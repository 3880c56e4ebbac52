"""``query`` finds what the user just made: every experiment by default, '*', clear errors for a wrong place or bad
filters, and a table that keeps run ids and model names on one line and shows each run's size on storage."""

from __future__ import annotations

import logging
import os
import re

import pytest

from easyroutine_dist.errors import MetadataError
from easyroutine_dist.storage.api import ActivationLoader

from .conftest import invoke, save_run

LONG_MODEL = "some-organisation/an-unusually-long-model-name-for-a-table-v2"


@pytest.fixture
def base(tmp_path):
    base = tmp_path / "runs"
    ids = {"demo": save_run(base, "demo", tag="demo"), "other": save_run(base, "other", model=LONG_MODEL, seed=1,
                                                                        other_metadata={"batch": 1})}
    return base, ids


def _row(out: str, run_id: str) -> list[str]:
    lines = [ln for ln in out.splitlines() if run_id in ln]
    assert len(lines) == 1, out  # the run id is on one line, whole
    return [c for c in re.split(r"\s{2,}", lines[0].strip()) if c]


def _du(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_query_without_experiment_searches_all(base):
    root, ids = base
    out = invoke("query", "--base-dir", root, terminal_width=80)
    assert out.exit_code == 0, out.output
    assert "2 run(s) in all experiments" in out.stdout
    for exp, run_id in ids.items():
        assert _row(out.stdout, run_id)[1:3] == [run_id, exp]
    star = invoke("query", "--base-dir", root, "--experiment", "*")
    assert star.exit_code == 0 and "2 run(s) in all experiments" in star.stdout
    one = invoke("query", "--base-dir", root, "--experiment", "demo")
    assert "1 run(s) in experiment 'demo'" in one.stdout and ids["other"] not in one.stdout


def test_table_keeps_model_and_run_id_whole_and_shows_size(base):
    root, ids = base
    out = invoke("query", "--base-dir", root, "--experiment", "other", terminal_width=80)
    assert out.exit_code == 0, out.output
    cells = _row(out.stdout, ids["other"])
    assert cells[1] == ids["other"] and LONG_MODEL in cells  # neither folded nor cut
    loader = ActivationLoader(root, "other")
    run_dir = loader.query().get_paths()[0]
    size = _du(run_dir)  # the bytes of the run folder, counted here by walking it
    shown = cells[-1]
    value, unit = shown.split()
    factor = {"B": 1, "KiB": 1024, "MiB": 1024**2}[unit]
    assert abs(float(value) * factor - size) <= 0.05 * factor + (0 if unit == "B" else 0), (shown, size)
    assert cells[-3:-1] == ["3", "1"]  # rows, parts


def test_filters_and_their_errors(base):
    root, ids = base
    out = invoke("query", "--base-dir", root, "--custom", '{"batch": 1}')
    assert out.exit_code == 0 and ids["other"] in out.stdout and ids["demo"] not in out.stdout
    out = invoke("query", "--base-dir", root, "--tag", "demo")
    assert ids["demo"] in out.stdout and ids["other"] not in out.stdout
    for bad, why in (("[1, 2]", "JSON list"), ("notjson", "is not JSON")):
        out = invoke("query", "--base-dir", root, "--custom", bad)
        assert out.exit_code == 2 and why in out.stderr and "Traceback" not in out.output
    out = invoke("query", "--base-dir", root, "--experiment", "dmeo")
    assert out.exit_code == 2 and "experiment 'dmeo'" in out.stderr and "'demo'" in out.stderr


def test_python_query_errors_and_hints(base, caplog):
    root, ids = base
    loader = ActivationLoader(root)
    assert [e["run_id"] for e in loader.query(experiment_name="*")] == sorted(ids.values())
    with pytest.raises(MetadataError, match="custom_keys='notjson' must be a dict"):
        loader.query(experiment_name="*", custom_keys="notjson")
    with pytest.raises(MetadataError, match=r"no field\(s\) \['extract_resid_outt'\]"):
        loader.query(experiment_name="*", extraction_config={"extract_resid_outt": True})
    with caplog.at_level(logging.WARNING, logger="easyroutine_dist"):
        assert len(ActivationLoader(root, "dmeo").query()) == 0
        assert len(ActivationLoader(root.parent / "nowhere").query()) == 0
        assert len(loader.query(experiment_name="demo", tag="nope")) == 0  # the place exists: no hint
    hints = [r.getMessage() for r in caplog.records]
    assert len(hints) == 2, hints
    assert "experiment 'dmeo'" in hints[0] and "'demo'" in hints[0] and "'other'" in hints[0]
    assert "nowhere does not exist" in hints[1]
