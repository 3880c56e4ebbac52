"""The self-check: evidence, stored with a run, that its numbers are right for this model on this data.

On a sample of the run's first batch (two of its rows, at most ``MAX_TOKENS`` real tokens each, one of them padded),
with the run's extraction hooks and no interventions, three checks against plain HF:

* ``logits_max_abs_diff``: the hooked forward's logits vs a plain HF forward's (same ids, mask and position ids,
  same attention implementation): the hooks changed nothing;
* ``lens_max_abs_diff``: ``LogitLens.from_model`` on the last layer's ``resid_out`` vs the plain logits: the final
  norm, unembedding and logit scaling of the architecture entry are right;
* ``padding_max_abs_diff``: the padded row (hooked, in the batch) vs the same row run alone, unpadded, through
  plain HF: padding and position ids are right.

Each is a max |diff| over every real position and the vocabulary; ``tolerance`` is ``rtol(dtype) * max(1, max
|logit|)``; ``passed`` when all three are within it. Modes: ``"error"`` refuses to write anything when a check
fails (SelfCheckError naming the check and the numbers), ``"warn"`` logs, writes and stores ``passed: False``,
``"off"`` skips the check. Cost: three forwards of at most ``2 x MAX_TOKENS`` tokens in all, once per run (per
worker): docs/performance.md.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Optional

import torch

from .errors import ConfigError, EasyRoutineError

logger = logging.getLogger(__name__)

MODES = ("error", "warn", "off")
MAX_TOKENS = 64
KEYS = ("logits_max_abs_diff", "lens_max_abs_diff", "padding_max_abs_diff")
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
_WHAT = {
    "logits_max_abs_diff": ("hooked forward logits vs a plain HF forward", "the extraction hooks changed the model's "
                            "output"),
    "lens_max_abs_diff": ("logit lens of the last layer vs the model's logits", "the architecture entry's final norm, "
                          "unembedding or logit scaling does not match the model"),
    "padding_max_abs_diff": ("a padded row vs that row run alone", "padding or position ids are handled wrongly"),
}


class SelfCheckError(EasyRoutineError, RuntimeError):
    """A self-check failed in ``self_check="error"`` mode; nothing was written."""


def check_mode(mode: Any, what: str = "self_check") -> str:
    """``mode`` if it is one of ``"error"``, ``"warn"``, ``"off"``; else ConfigError."""
    if mode not in MODES:
        raise ConfigError(f"{what}={mode!r}: use 'error' (refuse to write when a check fails), 'warn' (write and flag "
                          "the run) or 'off' (skip the check).")
    return str(mode)


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest max |diff| accepted between two computations of values of magnitude ``scale`` in ``dtype``."""
    return _RTOL.get(dtype, 1e-4) * max(1.0, float(scale) if math.isfinite(scale) else 1.0)


# ---------------------------------------------------------------------------------------------- the check
def _rows(batch: Any) -> tuple[list[torch.Tensor], str]:
    """Each row's real token ids ``[n_r]`` and the batch's padding side."""
    if not hasattr(batch, "get") or batch.get("input_ids") is None:
        raise ConfigError("the self-check needs a batch dict with 'input_ids' [batch, seq] (and 'attention_mask').")
    ids = torch.as_tensor(batch["input_ids"]).cpu()
    ids = ids[None] if ids.dim() == 1 else ids
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).cpu().reshape(ids.shape)
    used = mask.bool().any(-1)  # rows with at least one real token
    rows = [ids[r][mask[r].bool()] for r in range(ids.shape[0]) if bool(used[r])]
    if not rows:
        raise ConfigError("the self-check's batch has no real token (its attention_mask is all zeros).")
    mask = mask[used]
    side = "left" if bool((mask[:, 0] == 0).any()) else "right" if bool((mask[:, -1] == 0).any()) else ""
    return rows, side


def sample(batch: Any, tokenizer: Any = None, max_tokens: Optional[int] = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two rows of ``batch`` padded together: ``(input_ids [2, s], attention_mask [2, s], short row [n])``.

    Row 0 is the longest row's first ``s <= max_tokens`` tokens (at least 2: a 1-token row is repeated); row 1, the
    padded one, is the shortest other row's first tokens, cut to about ``s / 2`` when it is not shorter. They are
    padded on the batch's side (else the tokenizer's, else left) with the tokenizer's pad id (else 0).
    """
    max_tokens = MAX_TOKENS if max_tokens is None else int(max_tokens)
    rows, side = _rows(batch)
    i_long = max(range(len(rows)), key=lambda i: len(rows[i]))
    longest = rows[i_long][:max_tokens]
    if len(longest) < 2:
        longest = longest.repeat(2)
    others = [r for i, r in enumerate(rows) if i != i_long] or rows
    short = min(others, key=len)[:max_tokens]
    if len(short) >= len(longest):
        short = short[:max(1, len(longest) // 2)]
    side = side or getattr(tokenizer, "padding_side", None) or "left"
    pad = getattr(tokenizer, "pad_token_id", None)
    s = len(longest)
    ids = torch.full((2, s), int(pad) if pad is not None else 0, dtype=torch.long)
    mask = torch.zeros(2, s, dtype=torch.long)
    ids[0], mask[0] = longest, 1
    cols = slice(s - len(short), s) if side == "left" else slice(0, len(short))
    ids[1, cols], mask[1, cols] = short, 1
    return ids, mask, short


def _check_config(extraction_config: Any) -> Any:
    """The run's hooks, with every position kept, no reductions, logits and ``resid_out`` extracted."""
    from .config import ExtractionConfig

    if extraction_config is None:
        base: dict[str, Any] = {}
    elif isinstance(extraction_config, ExtractionConfig):
        base = extraction_config.to_dict()
    else:
        base = dict(extraction_config)
    base.update(avg=False, avg_over_example=False, save_logits=True, keep_gradient=False, extract_resid_out=True)
    return ExtractionConfig.from_dict(base)


@contextmanager
def _attention(hf_model: Any, eager: bool) -> Iterator[None]:
    """Run the plain forward with the attention the hooked one used (eager when patterns were extracted)."""
    current = hf_model.config._attn_implementation
    if not eager or current == "eager":
        yield
        return
    hf_model.set_attn_implementation("eager")
    try:
        yield
    finally:
        hf_model.set_attn_implementation(current)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


@torch.no_grad()
def run_self_check(model: Any, batch: Any, extraction_config: Any = None) -> dict[str, Any]:
    """The three checks on ``model`` (a HookedModel) over a sample of ``batch`` (``input_ids``/``attention_mask``
    ``[batch, seq]``): ``{"logits_max_abs_diff", "lens_max_abs_diff", "padding_max_abs_diff", "tolerance",
    "passed"}``; a diff that cannot be computed (different shapes) or is not finite is stored as None (and fails)."""
    from .lens import LogitLens

    ids, mask, short = sample(batch, model.hf_tokenizer)
    cfg = _check_config(extraction_config)
    held, model._persistent = model._persistent, []  # interventions change the output on purpose
    try:
        cache = model.forward({"input_ids": ids, "attention_mask": mask}, ["all"], extraction_config=cfg)
    finally:
        model._persistent = held
    hf, dev = model.hf_model, model.device
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with _attention(hf, bool(cfg.extract_attn_pattern)):
        plain = hf(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=position_ids.to(dev),
                   use_cache=False).logits.float().cpu()
    alone = hf(input_ids=short[None].to(dev), use_cache=False).logits[0].float().cpu()
    valid = cache["valid_mask"].cpu()
    hooked = cache["logits"].float().cpu()
    last = cache[f"resid_out_{model.model_config.num_hidden_layers - 1}"]
    lens = LogitLens.from_model(model).logits(last).float().cpu()
    real = mask.bool()
    diffs = {
        "logits_max_abs_diff": max(_diff(hooked[r][valid[r]], plain[r][real[r]]) for r in range(2)),
        "lens_max_abs_diff": max(_diff(lens[r][valid[r]], plain[r][real[r]]) for r in range(2)),
        "padding_max_abs_diff": _diff(hooked[1][valid[1]], alone),
    }
    dtype = next(hf.parameters()).dtype
    tol = tolerance(dtype, float(plain[real].abs().max()))
    out: dict[str, Any] = {k: (v if math.isfinite(v) else None) for k, v in diffs.items()}
    out["tolerance"] = tol
    out["passed"] = all(v is not None and v <= tol for v in (out[k] for k in KEYS))
    return out


def failures(result: dict[str, Any]) -> list[str]:
    """One line per failed check: what was compared, the numbers, and what it means."""
    tol = result.get("tolerance")
    out = []
    for key in KEYS:
        v = result.get(key)
        if v is None or tol is None or v > tol:
            what, why = _WHAT[key]
            shown = "not comparable (different shapes, or not finite)" if v is None else f"{v:.4g}"
            out.append(f"{key} ({what}) = {shown} > tolerance {tol:.3g}: {why}")
    return out


def enforce(result: Optional[dict[str, Any]], mode: str, where: str) -> None:
    """Raise SelfCheckError (``"error"``) or log a warning (``"warn"``) when ``result`` failed."""
    if result is None or result.get("passed") or mode == "off":
        return
    text = "; ".join(failures(result)) or "the check did not pass"
    if mode == "error":
        raise SelfCheckError(f"{where}: self-check failed, nothing was written: {text}. Fix the architecture entry "
                             "or the inputs; self_check='warn' writes anyway and flags the run (docs/provenance.md).")
    logger.warning("%s: self-check failed (the run is written and flagged self_check.passed=False): %s", where, text)


def worst(results: Iterable[Optional[dict[str, Any]]]) -> Optional[dict[str, Any]]:
    """The worst of several self-checks (e.g. one per worker): the largest diff of each check, the largest
    tolerance, passed only if all passed. None when there is none."""
    rs = [r for r in results if r]
    if not rs:
        return None
    out: dict[str, Any] = {}
    for key in KEYS:
        vals = [r.get(key) for r in rs]
        out[key] = None if any(v is None for v in vals) else max(vals)
    out["tolerance"] = max(float(r.get("tolerance") or 0.0) for r in rs)
    out["passed"] = all(bool(r.get("passed")) for r in rs)
    return out


# ---------------------------------------------------------------------------------------------- where it runs
class RunChecks:
    """A worker's self-checks: one per run id, on the first batch it processes for that run."""

    def __init__(self) -> None:
        self._done: dict[str, dict[str, Any]] = {}

    def once(self, run_id: str, mode: str, model: Any, batch: Any, extraction_config: Any) -> Optional[dict]:
        """The check of ``run_id`` (run now on ``batch`` if it is this worker's first); enforced per ``mode``."""
        if mode == "off":
            return None
        if run_id not in self._done:
            self._done[run_id] = run_self_check(model, batch, extraction_config)
        result = self._done[run_id]
        enforce(result, mode, f"run {run_id}, worker pid {os.getpid()}")
        return result


class _Watched:
    """The dataloader of one ``extract_cache`` call: checks the first batch before it is used and keeps each
    batch's ``input_ids``/``attention_mask``/``pivot_positions`` for the dataset fingerprint."""

    def __init__(self, model: Any, loader: Iterable[Any], mode: str, extraction_config: Any) -> None:
        self.model, self.loader, self.mode, self.cfg = model, loader, mode, extraction_config
        self.result: Optional[dict[str, Any]] = None
        self.inputs: list[dict[str, Any]] = []

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i == 0 and self.mode != "off":
                self.result = run_self_check(self.model, batch, self.cfg)
                enforce(self.result, self.mode, "extract_cache")
            if hasattr(batch, "get"):
                self.inputs.append({k: batch.get(k) for k in ("input_ids", "attention_mask", "pivot_positions")
                                    if batch.get(k) is not None})
            yield batch

    def finish(self, out: Any) -> None:
        """Add ``provenance`` (with the dataset fingerprint) and ``self_check`` to ``out["metadata"]``."""
        from .provenance import collect, dataset_fingerprint, part_fingerprint

        meta = out.get("metadata")
        if not isinstance(meta, dict):
            return
        meta["provenance"] = collect(self.model, dataset_fingerprint([part_fingerprint(self.inputs)]))
        meta["self_check"] = self.result


class _WatchedSized(_Watched):
    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]


def watch(model: Any, dataloader: Iterable[Any], mode: str, extraction_config: Any) -> _Watched:
    """Wrap ``extract_cache``'s dataloader (its length kept when it has one); call ``.finish(cache)`` at the end."""
    check_mode(mode)
    cls = _WatchedSized if hasattr(dataloader, "__len__") else _Watched
    return cls(model, dataloader, mode, extraction_config)
