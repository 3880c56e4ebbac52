"""Issue 8 item 8 (index): a restarting or broken index costs a query about QUERY_TIMEOUT_S (~2 s), never fails
it, and is logged at WARNING once per cause; a registration that cannot reach the index says so too. No cluster:
Ray's calls are replaced by ones that fail like a restarting actor."""

from __future__ import annotations

import logging
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from ray.exceptions import ActorUnavailableError, GetTimeoutError  # noqa: E402

from easyroutine_dist.config import ExtractionConfig  # noqa: E402
from easyroutine_dist.distributed import index as idx  # noqa: E402
from easyroutine_dist.storage import providers  # noqa: E402
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver  # noqa: E402


class _Method:
    def remote(self, *a, **kw):
        return "ref"


class _Index:
    entries = _Method()
    query = _Method()  # issue 10: queries are evaluated inside the index
    find_run = _Method()
    register = _Method()


@pytest.fixture
def broken_index(monkeypatch):
    """Ray is up and the index exists, but every ``ray.get`` on it raises ``broken_index["error"]()``."""
    state = {"error": lambda: ActorUnavailableError("restarting", None), "timeouts": []}

    def get(ref, timeout=None):
        state["timeouts"].append(timeout)
        raise state["error"]()

    monkeypatch.setattr(idx.ray, "is_initialized", lambda: True)
    monkeypatch.setattr(idx.ray, "get", get)
    monkeypatch.setattr(idx, "get_index", lambda create=True: _Index())
    monkeypatch.setattr(idx, "_WARNED", set())
    monkeypatch.setattr(providers, "_PROVIDERS", {"ray-metadata-index": idx._query_provider})
    return state


def _index_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "easyroutine_dist.distributed.index" and r.levelno == logging.WARNING]


def test_a_restarting_index_costs_a_query_about_two_seconds_and_one_warning(broken_index, tmp_path, caplog):
    saver = ActivationSaver(tmp_path, "e")
    for tag in ("a", "b"):
        saver.save(torch.ones(2, 3), "m", ["last"], None, ExtractionConfig(), tag=tag)
    caplog.set_level(logging.DEBUG, logger="easyroutine_dist.distributed.index")
    for _ in range(3):
        t0 = time.monotonic()
        res = ActivationLoader(tmp_path, "e").query()
        assert time.monotonic() - t0 < 4.0  # ~QUERY_TIMEOUT_S, then the catalog in storage
        assert [e["tag"] for e in res] == ["a", "b"]
    assert idx.QUERY_TIMEOUT_S <= 2.5
    warnings = _index_warnings(caplog)
    assert len(warnings) == 1 and "did not answer" in warnings[0] and "ActorUnavailableError" in warnings[0]


def test_each_new_cause_is_logged_once(broken_index, tmp_path, caplog):
    ActivationSaver(tmp_path, "e").save(torch.ones(2, 3), "m", ["last"], None, ExtractionConfig(), tag="a")
    caplog.set_level(logging.WARNING)
    for error in (lambda: GetTimeoutError("slow"), lambda: GetTimeoutError("slow"),
                  lambda: RuntimeError("index broke"), lambda: RuntimeError("index broke")):
        broken_index["error"] = error
        assert [e["tag"] for e in ActivationLoader(tmp_path, "e").query()] == ["a"]
    warnings = _index_warnings(caplog)
    assert len(warnings) == 2
    assert "GetTimeoutError" in warnings[0] and "RuntimeError" in warnings[1] and "index broke" in warnings[1]


def test_a_failed_registration_is_logged_once_and_bounded(broken_index, tmp_path, caplog):
    store = ActivationSaver(tmp_path, "e").store
    broken_index["error"] = lambda: GetTimeoutError("no answer")
    caplog.set_level(logging.WARNING)
    for rid in ("r1", "r2"):
        assert idx.register_run(store, {"run_id": rid, "experiment_name": "e"}) is False
    assert all(t is not None and t <= 2.5 for t in broken_index["timeouts"])
    warnings = _index_warnings(caplog)
    assert len(warnings) == 1 and "r1" in warnings[0] and "GetTimeoutError" in warnings[0]


def test_a_failing_provider_is_logged(monkeypatch, tmp_path, caplog):
    def broken(store, experiment):
        raise ConnectionError("index host unreachable")

    monkeypatch.setattr(providers, "_PROVIDERS", {"broken": broken})
    monkeypatch.setattr(providers, "_WARNED", set())
    ActivationSaver(tmp_path, "e").save(torch.ones(2, 3), "m", ["last"], None, ExtractionConfig(), tag="a")
    caplog.set_level(logging.WARNING)
    for _ in range(2):
        assert [e["tag"] for e in ActivationLoader(tmp_path, "e").query()] == ["a"]
    msgs = [r.getMessage() for r in caplog.records if r.name == "easyroutine_dist.storage.providers"]
    assert len(msgs) == 1 and "broken" in msgs[0] and "index host unreachable" in msgs[0]
