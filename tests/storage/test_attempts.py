"""Issue 8 item 4: two attempts at one part (threads, processes, every order of writes and commits) and two
resuming drivers never change a committed part's bytes. The oracle is the tensors each attempt was handed."""

from __future__ import annotations

import itertools
import multiprocessing as mp
import threading

import pytest
import torch

from easyroutine_dist.storage import runs
from easyroutine_dist.storage.runs import PartAlreadyCommittedError, RunHandle, RunWriter, iter_parts, load_run
from easyroutine_dist.storage.verify import remove_garbage, scan_run

EXP, MODEL = "attempts", "org/m"
SMALL_SHARDS = 100  # bytes: every part below is split into several shards


def _data(value: int, part_id: int = 0, rows: int = 3) -> tuple[dict[str, torch.Tensor], dict]:
    """What one attempt writes: distinct values per attempt, so a mix-up cannot go unseen."""
    base = 1000 * value + 10 * part_id
    return ({"x": torch.arange(rows * 8, dtype=torch.float32).reshape(rows, 8) + base,
             "y": torch.full((rows, 4), base, dtype=torch.int64),
             "z": torch.full((rows, 5), float(value), dtype=torch.bfloat16)},
            {"note": f"attempt {value} part {part_id}"})


def _assert_loaded_equals(cache, expected: list[tuple[dict[str, torch.Tensor], dict]]) -> None:
    for key in ("x", "y", "z"):
        want = torch.cat([t[key] for t, _ in expected])
        assert cache[key].dtype == want.dtype and torch.equal(cache[key], want), key


def _entry(writer: RunWriter, run: RunHandle) -> dict:
    return {"experiment_name": run.experiment, "model_name": MODEL, "run_id": run.run_id}


def _run_dir(writer: RunWriter, run: RunHandle) -> str:
    return writer.store.path(run.rel)


ORDERS = [o for o in itertools.permutations(["wA", "cA", "wB", "cB"])
          if o.index("wA") < o.index("cA") and o.index("wB") < o.index("cB")]


@pytest.mark.parametrize("order", ORDERS, ids=["-".join(o) for o in ORDERS])
def test_two_attempts_in_every_order(backend, order):
    writers = {a: RunWriter(backend.url, backend.options, max_shard_bytes=SMALL_SHARDS) for a in "AB"}
    run = writers["A"].begin_run(EXP, MODEL, {})
    data = {"A": _data(1), "B": _data(2)}
    records: dict[str, dict | None] = {}
    created: dict[str, bool] = {}
    for step in order:
        who = step[1]
        if step[0] == "w":
            try:
                records[who] = writers[who].write_part(run, 0, data[who])
            except PartAlreadyCommittedError:
                records[who] = None  # the other attempt committed first: nothing written
        elif records[who] is not None:
            created[who] = writers[who].commit_part(run, records[who])
    first_commit = next(s[1] for s in order if s[0] == "c")
    assert created[first_commit] is True
    assert [w for w, c in created.items() if c] == [first_commit]  # exactly one attempt committed
    writers["A"].commit_run(run)
    cache, _ = load_run(writers["A"].store, _entry(writers["A"], run))
    _assert_loaded_equals(cache, [data[first_commit]])
    assert cache["note"] == data[first_commit][1]["note"]
    scan = scan_run(writers["A"].store, _run_dir(writers["A"], run))
    assert scan.clean, scan  # the loser removed its own shards


def test_two_threads_interleaved_shard_by_shard(backend, monkeypatch):
    """Both attempts write shard i, wait for each other, ...; then both commit at once."""
    real = runs.write_shard
    barrier = threading.Barrier(2, timeout=60)

    def in_lockstep(store, path, tensors, *args, **kw):
        out = real(store, path, tensors, *args, **kw)
        barrier.wait()
        return out

    monkeypatch.setattr(runs, "write_shard", in_lockstep)
    for round_ in range(3):
        writer = RunWriter(backend.url, backend.options, max_shard_bytes=SMALL_SHARDS)
        run = writer.begin_run(EXP, MODEL, {"tag": f"r{round_}"})
        data = {1: _data(1), 2: _data(2)}
        results: dict[int, bool] = {}

        def attempt(value: int) -> None:
            w = RunWriter(backend.url, backend.options, max_shard_bytes=SMALL_SHARDS)
            rec = w.write_part(run, 0, data[value])
            assert len(rec["shards"]) == 3
            barrier.wait()  # both have written every shard: now both commit
            results[value] = w.commit_part(run, rec)

        threads = [threading.Thread(target=attempt, args=(v,)) for v in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results.values()) == [False, True]
        winner = next(v for v, c in results.items() if c)
        writer.commit_run(run)
        cache, _ = load_run(writer.store, _entry(writer, run))
        _assert_loaded_equals(cache, [data[winner]])
        assert scan_run(writer.store, _run_dir(writer, run)).clean


def _process_attempt(url, options, run_dict, value, barrier, queue) -> None:
    """One attempt in its own process: write the shards, wait until the other has too, then commit."""
    from easyroutine_dist.storage.runs import RunHandle, RunWriter

    writer = RunWriter(url, options, max_shard_bytes=SMALL_SHARDS)
    run = RunHandle.from_dict(run_dict)
    rec = writer.write_part(run, 0, _data(value))
    barrier.wait()
    queue.put((value, writer.commit_part(run, rec)))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_processes_race_to_commit(where, tmp_path, request):
    url, options = (str(tmp_path / "acts"), None) if where == "local" else (
        request.getfixturevalue("s3_bucket_url") + "/acts", request.getfixturevalue("s3_storage_options"))
    writer = RunWriter(url, options)
    run = writer.begin_run(EXP, MODEL, {})
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_process_attempt, args=(url, options, run.to_dict(), v, barrier, queue))
             for v in (1, 2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(results.values()) == [False, True]
    winner = next(v for v, c in results.items() if c)
    writer.commit_run(run)
    cache, _ = load_run(writer.store, _entry(writer, run))
    _assert_loaded_equals(cache, [_data(winner)])
    assert scan_run(writer.store, _run_dir(writer, run)).clean


N_PARTS = 5
PRE_COMMITTED = (0, 2)


def _resuming_driver(url, options, run_id, value, barrier, queue) -> None:
    """A driver resuming the run: compute every part without a record, wait for the other driver, commit."""
    from easyroutine_dist.storage.runs import PartAlreadyCommittedError, RunAlreadyCommittedError, RunWriter

    writer = RunWriter(url, options, max_shard_bytes=SMALL_SHARDS)
    run = writer.open_run(EXP, MODEL, run_id)
    done = set(writer.committed_part_ids(run))
    records = []
    for pid in range(N_PARTS):
        if pid in done:
            continue
        try:
            records.append(writer.write_part(run, pid, _data(value, pid)))
        except PartAlreadyCommittedError:
            pass
    barrier.wait()  # both drivers have written their shards: now both commit
    won = {rec["part_id"]: writer.commit_part(run, rec) for rec in records}
    barrier.wait()
    try:
        writer.commit_run(run)
        published = True
    except RunAlreadyCommittedError:  # the other driver published it first: the run is intact
        published = False
    queue.put((value, won, published))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_drivers_resume_one_run_at_once(where, tmp_path, request):
    url, options = (str(tmp_path / "acts"), None) if where == "local" else (
        request.getfixturevalue("s3_bucket_url") + "/acts", request.getfixturevalue("s3_storage_options"))
    writer = RunWriter(url, options, max_shard_bytes=SMALL_SHARDS)
    run = writer.begin_run(EXP, MODEL, {})
    for pid in PRE_COMMITTED:  # what the crashed first driver left
        writer.commit_part(run, writer.write_part(run, pid, _data(0, pid)))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2, timeout=120), ctx.Queue()
    procs = [ctx.Process(target=_resuming_driver, args=(url, options, run.run_id, v, barrier, queue))
             for v in (1, 2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(published for _, _, published in results) == [False, True]
    winners = {pid: 0 for pid in PRE_COMMITTED}
    for value, won, _ in results:
        for pid, created in won.items():
            if created:
                assert pid not in winners
                winners[pid] = value
    assert sorted(winners) == list(range(N_PARTS))  # every part committed by exactly one attempt
    expected = [_data(winners[pid], pid) for pid in range(N_PARTS)]
    cache, _ = load_run(writer.store, _entry(writer, run))
    _assert_loaded_equals(cache, expected)
    for pid, part in enumerate(iter_parts(writer.store, _entry(writer, run))):
        assert part["note"] == expected[pid][1]["note"]
    assert scan_run(writer.store, _run_dir(writer, run)).clean


def test_runs_with_fixed_shard_names_stay_readable(backend):
    """A run written before attempt tokens (shards 'part-PPPPP-SSSS.safetensors') loads as before."""
    from easyroutine_dist.storage import layout
    from easyroutine_dist.storage.shards import plan_shards, write_shard

    writer = RunWriter(backend.url, backend.options)
    run = writer.begin_run(EXP, MODEL, {})
    parts = [_data(7, pid) for pid in range(2)]
    for pid, (tensors, info) in enumerate(parts):
        shards = [write_shard(writer.store, writer.store.path(run.rel, layout.shard_name(pid, i)),
                              {k: tensors[k] for k in keys})
                  for i, keys in enumerate(plan_shards(tensors, SMALL_SHARDS))]
        assert all(sh["file"] == f"part-{pid:05d}-{i:04d}.safetensors" for i, sh in enumerate(shards))
        writer.commit_part(run, {"part_id": pid, "rows": 3, "keys": list(tensors), "info": info, "shards": shards})
    writer.commit_run(run)
    cache, _ = load_run(writer.store, _entry(writer, run))
    _assert_loaded_equals(cache, parts)
    assert scan_run(writer.store, _run_dir(writer, run)).clean


def test_verify_lists_and_removes_orphans_uncommitted_and_strays(backend):
    writer = RunWriter(backend.url, backend.options, max_shard_bytes=SMALL_SHARDS)
    run = writer.begin_run(EXP, MODEL, {})
    rdir = _run_dir(writer, run)
    winner = writer.write_part(run, 0, _data(1))
    crashed_loser = writer.write_part(run, 0, _data(2))  # its process dies before commit_part: orphans
    writer.commit_part(run, winner)
    pending = writer.write_part(run, 1, _data(3, 1))  # no record yet: uncommitted (maybe still running)
    writer.store.fs.pipe_file(f"{rdir}/shards/{winner['shards'][0]['file']}.tmp-0123abcd", b"partial")
    scan = scan_run(writer.store, rdir)
    assert not scan.committed and scan.parts == (0,)
    assert scan.orphans == tuple(sorted(f"shards/{s['file']}" for s in crashed_loser["shards"]))
    assert scan.uncommitted == tuple(sorted(f"shards/{s['file']}" for s in pending["shards"]))
    assert scan.strays == (f"shards/{winner['shards'][0]['file']}.tmp-0123abcd",)
    assert scan.garbage() == scan.orphans  # a live attempt's files are left alone by default
    assert sorted(remove_garbage(writer.store, rdir, scan)) == list(scan.orphans)
    scan = scan_run(writer.store, rdir)
    assert scan.orphans == () and len(scan.uncommitted) == 3 and len(scan.strays) == 1

    writer.commit_run(run, [winner])  # part 1 never finished: it is not in the run
    scan = scan_run(writer.store, rdir)
    assert scan.committed and scan.parts == (0,)
    assert scan.orphans == tuple(sorted(f"shards/{s['file']}" for s in pending["shards"]))  # committed: garbage
    assert len(remove_garbage(writer.store, rdir, scan)) == 4
    assert scan_run(writer.store, rdir).clean
    cache, _ = load_run(writer.store, _entry(writer, run))
    _assert_loaded_equals(cache, [_data(1)])
