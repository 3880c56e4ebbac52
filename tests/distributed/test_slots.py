"""A distributed run with variable-width position groups before fixed ones, over partitions and batches of
different lengths: every real slot equals the row run alone through plain HF, padding is marked invalid, and
random positions are those a single process draws for the same dataset rows."""

from __future__ import annotations

import pytest

from easyroutine_dist.config import ExtractionConfig
from easyroutine_dist.storage.api import ActivationLoader, ActivationSaver

from ..models import tiny_model
from ..oracle import check_rows, spec_name

pytestmark = pytest.mark.slow

SPECS = ["all", "last", (1, None), "random-text-2", -2]
CFG = ExtractionConfig(extract_resid_out=True, save_logits=True)


def test_variable_groups_over_partitions_equal_each_row_alone(extractor, hooked_ref, texts, tmp_path):
    saver = ActivationSaver(tmp_path, experiment_name="slots")
    res = extractor.extract(texts, SPECS, CFG, saver, batch_size=3, partition_size=5, position_seed=7)
    assert res.n_partitions == 5
    cache, meta = ActivationLoader(tmp_path, "slots").query().load()
    assert meta["position_seed"] == 7
    rows = [hooked_ref.hf_tokenizer(t)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) > 3  # the partitions really have different widths
    check_rows(cache, rows, SPECS, tiny_model("llama"), layers=[0, 1])
    # the random draw depends on (seed, dataset row) only: one single-process batch of all rows agrees
    from easyroutine_dist.distributed import tokenize_batches

    alone = hooked_ref.extract_cache(tokenize_batches(hooked_ref.hf_tokenizer, texts, len(texts)), SPECS,
                                     extraction_config=CFG, position_seed=7)
    key = spec_name("random-text-2")
    assert cache["token_dict"][key] == alone["token_dict"][key]
