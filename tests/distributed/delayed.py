"""A model factory for Ray workers whose every forward takes a while, so that a test can stop a driver while its
run is half done: ``"tests.distributed.delayed:delayed_tiny"``. The weights are the saved tiny model named by
``ERD_TEST_MODEL_DIR``; ``ERD_TEST_FORWARD_DELAY`` seconds are slept before each forward of the first decoder
layer (both variables come from the environment of the Ray node the worker runs on). The outputs are the saved
model's, untouched."""

from __future__ import annotations

import os
import time


def delayed_tiny(**kwargs: object):
    from easyroutine_dist.hooked_model import HookedModel

    model = HookedModel.from_pretrained(os.environ["ERD_TEST_MODEL_DIR"], **kwargs)
    delay = float(os.environ.get("ERD_TEST_FORWARD_DELAY", "0"))
    if delay > 0:
        model.hf_model.model.layers[0].register_forward_pre_hook(lambda module, args: time.sleep(delay))
    return model
