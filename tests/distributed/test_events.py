"""Run events (issue 15 item 1): the run id and its resume command are logged before any model loads, each part is
logged, and the summary says what happened; plain lines are never wrapped, JSON is one object per event."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
import torch

from easyroutine_dist.distributed import DistributedRun
from easyroutine_dist.distributed.events import LOGGER_NAME, RunEvents, human_bytes, log_handler
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from .conftest import CONFIG, POSITIONS, reference


@pytest.fixture
def captured():
    """``(plain stream, json stream)`` receiving every record of the events logger during the test."""
    plain, js = io.StringIO(), io.StringIO()
    log = logging.getLogger(LOGGER_NAME)
    handlers = [log_handler("plain", plain), log_handler("json", js)]
    level = log.level
    log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        yield plain, js
    finally:
        for h in handlers:
            log.removeHandler(h)
        log.setLevel(level)


def events_of(js: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in js.getvalue().splitlines()]


def test_events_without_ray(captured):
    """A scripted run: each event is one JSON object and one unwrapped plain line; the summary counts what the
    calls reported (two parts computed by two workers on two nodes, one found committed, one retry)."""
    plain, js = captured
    long_url = "s3://bucket/" + "very-long-prefix/" * 12
    ev = RunEvents("extract", "2026-01-02_03-04-05-000006_0123abcd", "exp", long_url,
                   resume_command=lambda rid: f"easyroutine-dist extract --config job.yaml --run-id {rid} --resume")
    ev.started(n_rows=10, partition_size=4)
    infos = [{"node": "host-a", "node_ip": "10.0.0.1", "node_id": "a" * 56, "gpu_ids": [0], "pid": 11},
             {"node": "host-b", "node_ip": "10.0.0.2", "node_id": "b" * 56, "gpu_ids": [1, 2], "pid": 12}]
    ev.workers_ready(infos, long_url + "run")
    ev.part_committed(0, {"part_id": 0, "rows": 4, "bytes": 1000, "seconds": 0.5, "skipped": False})
    ev.part_retried(1, 1, 1, 4, RuntimeError("worker died\nsecond line"))
    ev.part_committed(1, {"part_id": 1, "rows": 4, "bytes": 2048, "seconds": 0.5, "skipped": False})
    ev.part_committed(0, {"part_id": 2, "rows": 2, "bytes": 0, "seconds": 0.0, "skipped": True})
    run = ev.finish(DistributedRun("2026-01-02_03-04-05-000006_0123abcd", "exp", "m", long_url + "run", 10, 3, 2, 1,
                                   1, 3.25))
    assert run.bytes_written == 3048 and [w["partitions"] for w in run.workers] == [1, 1]

    events = events_of(js)
    assert [e["event"] for e in events] == ["run_started", "workers_ready", "part_committed", "part_retried",
                                            "part_committed", "part_committed", "run_committed"]
    started = events[0]
    assert started["resume_command"] == ("easyroutine-dist extract --config job.yaml --run-id "
                                         "2026-01-02_03-04-05-000006_0123abcd --resume")
    assert started["n_partitions"] == 3 and started["storage"] == long_url  # ceil(10 / 4)
    done = events[-1]
    assert done["partitions"] == {"total": 3, "skipped": 1, "computed": 2, "retried": 1}
    assert done["rows"] == 10 and done["bytes_written"] == 3048 and done["wall_seconds"] == 3.25
    assert [(w["node"], w["gpus"], w["partitions"]) for w in done["workers"]] == [("host-a", ["0"], 1),
                                                                                  ("host-b", ["1", "2"], 1)]
    assert events[3]["error"] == "RuntimeError: worker died" and events[3]["attempt"] == 1

    lines = plain.getvalue().splitlines()
    assert all(e["run_id"] in line for e, line in zip(events, lines))
    assert any(line.endswith("--run-id 2026-01-02_03-04-05-000006_0123abcd --resume") for line in lines)
    assert any(long_url in line and len(line) > 200 for line in lines)  # never folded
    summary = [line for line in lines if " summary: " in line]
    assert "3 partitions: 1 skipped (already committed), 2 computed, 1 retried; 10 rows; 3.0 KiB written" in summary[0]
    assert human_bytes(1536) == "1.5 KiB" and human_bytes(12) == "12 B"
    assert "worker 1 on node host-b (10.0.0.2, node id bbbbbbbbbbbb), GPUs 1,2: 1 partition computed" in summary[2]


def _shard_bytes(root: Path, run_id: str) -> int:
    """Bytes of the run's shard files on disk (what the summary must report for a fresh run without retries)."""
    (run_dir,) = [p for p in root.rglob(run_id) if p.is_dir()]
    return sum(p.stat().st_size for p in (run_dir / "shards").iterdir())


@pytest.mark.slow
def test_extract_logs_events_and_summary(extractor, hooked_ref, texts, tmp_path, captured):
    _, js = captured
    saver = ActivationSaver(tmp_path, experiment_name="events")
    res = extractor.extract(texts[:9], POSITIONS, CONFIG, saver, batch_size=2, partition_size=4)
    events = events_of(js)
    kinds = [e["event"] for e in events]
    assert kinds[:2] == ["run_started", "workers_ready"] and kinds[-1] == "run_committed"
    assert kinds.count("part_committed") == 3 and set(kinds) == {"run_started", "workers_ready", "part_committed",
                                                                  "run_committed"}
    assert {e["run_id"] for e in events} == {res.run_id}
    assert events[0]["resume_command"] == f"extract(..., run_id={res.run_id!r}, resume=True)"
    assert events[1]["url"] == res.url and len(events[1]["workers"]) == 2
    assert all(w["node_id"] for w in events[1]["workers"])  # Ray's node id, told apart from the host name
    done = events[-1]
    on_disk = _shard_bytes(tmp_path, res.run_id)
    assert done["bytes_written"] == on_disk == res.bytes_written > 0
    assert sum(e["bytes"] for e in events if e["event"] == "part_committed") == on_disk
    assert done["partitions"] == {"total": 3, "skipped": 0, "computed": 3, "retried": 0} and done["rows"] == 9
    assert sum(w["partitions"] for w in done["workers"]) == 3 and list(res.workers) == done["workers"]
    assert sorted(e["part_id"] for e in events if e["event"] == "part_committed") == [0, 1, 2]


def _broken_model(**_):
    raise RuntimeError("weights are corrupt (test)")


@pytest.mark.slow
def test_run_id_is_logged_before_the_model_loads_and_resumes(ray_cluster, model_dir, hooked_ref, texts, tmp_path,
                                                            captured):
    """A driver whose workers never finish loading the model has already logged the run id and how to resume it;
    resuming that id (nothing was written under it) begins the run and commits it, rows as the oracle says."""
    from easyroutine_dist.distributed import DistributedExtractor
    from easyroutine_dist.errors import DistributedError

    _, js = captured
    saver = ActivationSaver(tmp_path, experiment_name="early")
    with DistributedExtractor(_broken_model, num_workers=1) as ex:
        with pytest.raises(DistributedError, match="loading model"):
            ex.extract(texts[:5], POSITIONS, CONFIG, saver, batch_size=2, partition_size=2)
    events = events_of(js)
    assert [e["event"] for e in events] == ["run_started", "run_failed"]
    run_id = events[0]["run_id"]
    assert run_id in events[1]["resume_command"] and "weights are corrupt" in events[1]["error"]
    assert not any(p.name == run_id for p in tmp_path.rglob("*"))  # nothing was written for it

    with DistributedExtractor(model_dir, num_workers=1) as ex:
        res = ex.extract(texts[:5], POSITIONS, CONFIG, saver, batch_size=2, partition_size=2, run_id=run_id,
                         resume=True)
    assert res.run_id == run_id and (res.n_partitions, res.recomputed, res.skipped) == (3, 3, 0)
    cache, _ = ActivationLoader(tmp_path, "early").query().load(run_id)
    ref = reference(hooked_ref, texts[:5])
    for key in ("resid_out_0", "resid_out_2", "logits"):
        assert torch.allclose(cache[key], ref[key], atol=1e-5, rtol=1e-4), key
    assert cache["token_dict"] == ref["token_dict"]

    # a run id that is begun under another model is not silently begun again
    with DistributedExtractor("tests.distributed.tiny:tiny_hooked", num_workers=1) as ex:
        from easyroutine_dist.errors import ConfigError

        with pytest.raises(ConfigError, match="never begun"):
            ex.extract(texts[:5], POSITIONS, CONFIG, saver, batch_size=2, partition_size=2, run_id=run_id,
                       resume=True)
