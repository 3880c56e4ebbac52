"""Issue 8 item 8: ``logit_lens(..., resume=True)`` on a lens run that is already committed returns that run (as
``extract`` does) instead of failing with "already committed", and rewrites nothing."""

from __future__ import annotations

import os

from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from .conftest import CONFIG, POSITIONS


def _files(run_dir: str) -> dict[str, tuple[int, int]]:
    out = {}
    for root, _, names in os.walk(run_dir):
        for n in names:
            st = os.stat(os.path.join(root, n))
            out[os.path.relpath(os.path.join(root, n), run_dir)] = (st.st_mtime_ns, st.st_ino)
    return out


def test_resuming_a_committed_lens_run_returns_it(extractor, texts, tmp_path):
    from easyroutine_dist.distributed import new_run_id

    saver = ActivationSaver(tmp_path, experiment_name="lensresume")
    extractor.extract(texts, POSITIONS, CONFIG, saver, batch_size=4, partition_size=12, tag="src")
    loader = ActivationLoader(tmp_path, "lensresume")
    source = loader.query(tag="src")
    cfg = {"target_key": "resid_out_{i}", "top_k": 3}
    run_id = new_run_id()
    first = extractor.logit_lens(source, saver, cfg, tag="lens", run_id=run_id)
    assert first.recomputed == 2 and first.n_rows == len(texts)
    before = _files(first.url)
    again = extractor.logit_lens(source, saver, cfg, tag="lens", run_id=run_id, resume=True)
    assert again.run_id == run_id and again.url == first.url and again.resumed
    assert again.recomputed == 0 and again.skipped == again.n_partitions == 2 and again.n_rows == len(texts)
    assert _files(first.url) == before  # nothing rewritten
    assert [e["run_id"] for e in loader.query(tag="lens")] == [run_id]
