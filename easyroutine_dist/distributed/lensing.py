"""The remote logit lens: config checking and the per-partition reduction workers run next to the activations.

Stored per matched key (``<key>`` e.g. ``resid_out_2``):
* ``logit_lens_<key>_topk_ids``   ``[rows, P, k]`` int64 and ``logit_lens_<key>_topk_probs`` ``[rows, P, k]`` float32
  (``LogitLens.topk``: softmax over the whole vocabulary, never materialising ``[rows, P, vocab]``);
* with ``token_directions`` (one token id or ``(t1, t2)`` per row): ``logit_lens_<key>_logit_diff`` ``[rows, P]``
  (``LogitLens.compute(..., metric="logit_diff")``), and with ``metric="accuracy"`` also
  ``logit_lens_<key>_correct`` ``[rows, P]`` (1.0 where ``t1`` beats ``t2``, or ``t`` is the top-1 token), whose
  mean over non-padded slots is ``LogitLens.compute(..., metric="accuracy")``.
No Ray here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import torch

from ..errors import ConfigError, refuse_unknown

_ALLOWED = {"target_key", "top_k", "apply_norm", "apply_softmax", "token_directions", "metric", "norm_stats",
            "keep_activations"}


def check_lens_config(cfg: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Validate a ``logit_lens={...}`` option; return it with defaults filled (``token_directions`` kept aside).

    Keys: ``target_key`` (required; literal or pattern like ``"resid_out_{i}"``), ``top_k`` (5), ``apply_norm``
    (True), ``apply_softmax`` (False), ``token_directions`` (None or one entry per dataset row), ``metric``
    (``"logit_diff"`` or ``"accuracy"``), ``norm_stats`` (``"own"`` or ``"last_layernorm"``),
    ``keep_activations`` (True: also store the activations the lens read).
    """
    if cfg is None:
        return None
    if not isinstance(cfg, dict):
        raise ConfigError(f"logit_lens must be a dict like {{'target_key': 'resid_out_{{i}}', 'top_k': 5}}, "
                          f"got {type(cfg).__name__}.")
    refuse_unknown(cfg, _ALLOWED, "logit_lens", "option(s)")
    out = {"top_k": 5, "apply_norm": True, "apply_softmax": False, "token_directions": None,
           "metric": "logit_diff", "norm_stats": "own", "keep_activations": True, **cfg}
    problems = []
    if not isinstance(out.get("target_key"), str) or not out["target_key"]:
        problems.append("target_key must be a cache key or pattern, e.g. 'resid_out_{i}'")
    if isinstance(out["top_k"], bool) or not isinstance(out["top_k"], int) or out["top_k"] < 1:
        problems.append(f"top_k={out['top_k']!r} must be an int >= 1")
    if out["metric"] not in ("logit_diff", "accuracy"):
        problems.append(f"metric={out['metric']!r} must be 'logit_diff' or 'accuracy'")
    if out["norm_stats"] not in ("own", "last_layernorm"):
        problems.append(f"norm_stats={out['norm_stats']!r} must be 'own' or 'last_layernorm'")
    dirs = out["token_directions"]
    if dirs is not None and (isinstance(dirs, (str, bytes)) or not hasattr(dirs, "__len__")):
        problems.append("token_directions must be a list with one token id or (t1, t2) pair per dataset row")
    if problems:
        raise ConfigError("logit_lens: " + "; ".join(problems) + ".")
    return out


def lens_metadata(cfg: dict[str, Any]) -> dict[str, Any]:
    """The JSON form stored in run metadata: directions are summarised (count + sha256), not copied."""
    meta = {k: v for k, v in cfg.items() if k != "token_directions"}
    dirs = cfg.get("token_directions")
    if dirs is not None:
        body = json.dumps([list(d) if isinstance(d, (tuple, list)) else int(d) for d in dirs]).encode()
        meta["token_directions"] = {"count": len(dirs), "sha256": hashlib.sha256(body).hexdigest()}
    return meta


def needed_keys(cfg: dict[str, Any], available: list[str]) -> list[str]:
    """Keys of a stored part the lens reads (matched target keys, plus ``last_layernorm`` when asked)."""
    from ..lens import match_keys

    keys = match_keys(available, cfg["target_key"])
    if cfg["norm_stats"] == "last_layernorm":
        keys.append("last_layernorm")
    return keys


@torch.no_grad()
def apply_lens(lens: Any, cache: Any, cfg: dict[str, Any], directions: Optional[list[Any]]) -> dict[str, torch.Tensor]:
    """Run the lens on one partition's activations ``{key: [rows, P, d]}``; return the tensors to store."""
    out: dict[str, torch.Tensor] = {}
    common = {"apply_norm": cfg["apply_norm"], "norm_stats": cfg["norm_stats"]}
    top = lens.topk(cache, cfg["target_key"], k=cfg["top_k"], **common)
    out.update({k: v.cpu() for k, v in top.items()})
    if directions is not None:
        res = lens.compute(cache, cfg["target_key"], token_directions=directions, metric="logit_diff",
                           apply_softmax=cfg["apply_softmax"], **common)
        for name, diff in res.items():  # name: "logit_lens_<key>"
            out[f"{name}_logit_diff"] = diff.float().cpu()
            if cfg["metric"] == "accuracy":
                single = not isinstance(directions[0], (list, tuple))
                if single:
                    ids = torch.as_tensor(directions).reshape(-1, *([1] * (diff.dim() - 1)))
                    top1 = lens.topk(cache, name[len("logit_lens_"):], k=1, **common)
                    first = next(iter(top1.values()))[..., 0].cpu()
                    out[f"{name}_correct"] = (first == ids).float()
                else:
                    out[f"{name}_correct"] = (diff > 0).float().cpu()
    return out
