"""What ``ActivationSaver.save`` / ``save_cache`` store about a run besides its tensors: ``provenance`` (what
produced it) and ``self_check`` (evidence its numbers are right). Both are decided before anything is written."""

from __future__ import annotations

from typing import Any, Optional

from .errors import ConfigError
from .provenance import collect, dataset_fingerprint, part_fingerprint
from .selfcheck import check_mode, enforce, run_self_check


def _info(activations: Any) -> dict[str, Any]:
    info = activations.get("metadata") if hasattr(activations, "get") else None
    return info if isinstance(info, dict) else {}


def _batches(inputs: Any) -> list[dict[str, Any]]:
    """``inputs`` (a batch dict, a list of them, or an ``input_ids`` tensor ``[batch, seq]``) as a list of dicts."""
    if isinstance(inputs, (list, tuple)):
        return [b if hasattr(b, "get") else {"input_ids": b} for b in inputs]
    return [inputs if hasattr(inputs, "get") else {"input_ids": inputs}]


def for_save(model: Any, activations: Any, mode: str, inputs: Any = None, extraction_config: Any = None
             ) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """``(provenance, self_check)`` for ``save``.

    ``inputs``: the batch(es) the activations came from (``input_ids``/``attention_mask`` ``[batch, seq]``): they
    give the dataset fingerprint and, with ``mode`` "warn"/"error", the batch the self-check runs on. Without them
    a cache from ``extract_cache`` keeps its own fingerprint and self-check. "error" raises before any write when
    the check fails or cannot run.
    """
    mode = check_mode(mode)
    info = _info(activations)
    stored_prov = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    batches = None if inputs is None else _batches(inputs)
    fp = dataset_fingerprint([part_fingerprint(batches)]) if batches else stored_prov.get("dataset_fingerprint")
    is_model = hasattr(model, "hf_model")
    prov = collect(model, fp) if is_model else {**collect(None), **stored_prov, "dataset_fingerprint": fp}
    check = info.get("self_check")
    if mode != "off":
        if batches and is_model:
            check = run_self_check(model, batches[0], extraction_config)
        elif check is None:
            raise ConfigError(f"save(..., self_check={mode!r}) needs the HookedModel as `model` and inputs=<the batch "
                              "the activations came from>, or a cache from extract_cache(..., self_check=...); "
                              "nothing was written.")
        enforce(check, mode, "save")
    return prov, check


def for_save_cache(info: dict[str, Any], mode: str) -> tuple[dict[str, Any], Optional[dict[str, Any]]]:
    """``(provenance, self_check)`` for ``save_cache``: what ``extract_cache`` recorded. ``mode`` "warn"/"error"
    also asks that a self-check was recorded and passed ("error" raises before any write)."""
    mode = check_mode(mode)
    prov = info.get("provenance") if isinstance(info.get("provenance"), dict) else collect(None)
    check = info.get("self_check")
    if mode != "off":
        if check is None:
            raise ConfigError(f"save_cache(..., self_check={mode!r}): the cache has no self-check; extract it with "
                              "extract_cache(..., self_check='error' or 'warn'), or save with self_check='off'. "
                              "Nothing was written.")
        enforce(check, mode, "save_cache")
    return prov, check
