"""LogitLens: project activations through the model's own final norm and unembedding, chunked and graph-free.

The correct logit lens applies the final norm to each activation with *that activation's own* statistics
(RMS, or mean/variance for LayerNorm), the norm weight as the model uses it (Gemma: ``1 + w``), the norm bias,
the unembedding (and its bias, if any), then Gemma-2/3's final-logit soft-capping ``cap * tanh(logits / cap)``.
On the last layer's ``resid_out`` this equals the model's logits. ``norm_stats="last_layernorm"`` instead reuses
the final layer's statistics (computed from ``cache["last_layernorm"]``, the input of the final norm) for every
layer, which is what easyroutine 1.1.5 did; keep it only to compare against old results.

Everything runs under ``torch.no_grad``; the unembedding is referenced, never copied per call; memory is bounded
by ``chunk_positions x chunk_vocab`` floats beyond the returned tensor. A lens saves to ``lens.safetensors`` +
``lens.json`` (local path or fsspec URL) and loads without the model.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Literal, Mapping, Optional, Sequence, Union

import torch

from .architectures import REGISTRY, ArchSpec
from .errors import ConfigError
from .lens_ops import _config_dict, _config_get, _read_param, final_norm, match_keys

NormStats = Literal["own", "last_layernorm"]
Direction = Union[int, Sequence[int]]
_FORMAT = "easyroutine_dist.logit_lens/1"
__all__ = ["LogitLens", "final_norm", "match_keys"]


class LogitLens:
    """Projects activations ``[batch, P, d]`` to vocabulary logits ``[batch, P, vocab]``.

    Args:
        unembedding_matrix: the unembedding ``[vocab, d]`` as a tensor, or the output-head module (its ``weight``
            and ``bias`` are used). Referenced, not copied.
        last_layer_norm: the model's final norm module (its weight, bias, eps are read), or None (identity).
        model_name: name recorded in saved lenses.
        model_config: HF config (or dict, or ModelShape); its ``model_type`` selects the norm formula and its
            ``final_logit_softcapping`` the soft-cap.
        norm_kind / norm_offset / eps / softcap / logit_scale: explicit overrides of what is inferred
            (``logit_scale`` multiplies the logits before the soft-cap: Cohere's ``logit_scale``, Granite's
            ``1 / logits_scaling``).
        arch: the model's ArchSpec when it is not in the registry (``from_model`` passes the model's own).
    """

    def __init__(self, unembedding_matrix: Any, last_layer_norm: Any, model_name: str, model_config: Any,
                 *, norm_kind: str | None = None, norm_offset: float | None = None, eps: float | None = None,
                 softcap: float | None | Literal["auto"] = "auto", tokenizer: Any = None,
                 chunk_positions: int = 1024, chunk_vocab: int = 16384,
                 logit_scale: float | None | Literal["auto"] = "auto", arch: ArchSpec | None = None) -> None:
        if isinstance(unembedding_matrix, torch.Tensor):
            self.W_U, self.b_U = unembedding_matrix.detach(), None
        elif isinstance(unembedding_matrix, torch.nn.Module):
            self.W_U, self.b_U = _read_param(unembedding_matrix, "weight"), _read_param(unembedding_matrix, "bias")
        else:
            raise ConfigError("LogitLens: unembedding_matrix must be a [vocab, d] tensor or the output-head module "
                              f"(e.g. hooked.get_lm_head()), got {type(unembedding_matrix).__name__}.")
        if self.W_U is None or self.W_U.dim() != 2:
            raise ConfigError("LogitLens: the unembedding must be a 2-D [vocab, d] matrix.")
        model_type = _config_get(model_config, "model_type")
        spec = arch if arch is not None else (REGISTRY.get(model_type) if model_type else None)
        if last_layer_norm is None or isinstance(last_layer_norm, torch.nn.Module):
            self.norm_weight = _read_param(last_layer_norm, "weight")
            self.norm_bias = _read_param(last_layer_norm, "bias")
            mod_eps = getattr(last_layer_norm, "variance_epsilon", getattr(last_layer_norm, "eps", None))
            inferred_kind = "layernorm" if isinstance(last_layer_norm, torch.nn.LayerNorm) else None
        else:
            raise ConfigError("LogitLens: last_layer_norm must be the final norm module "
                              f"(hooked.get_last_layernorm()) or None, got {type(last_layer_norm).__name__}.")
        self.norm_kind = norm_kind or (spec.norm_kind if spec else None) or inferred_kind or (
            "layernorm" if self.norm_bias is not None else "rms")
        self.norm_offset = float(norm_offset if norm_offset is not None else (spec.norm_offset if spec else 0.0))
        if eps is None:
            eps = mod_eps if mod_eps is not None else _config_get(model_config, spec.norm_eps_attr if spec else "",
                                                                  None)
        self.eps = float(eps if eps is not None else 1e-5)
        if softcap == "auto":
            if spec is not None and spec.softcap_attr:
                if isinstance(model_config, Mapping):
                    has = spec.softcap_attr in model_config
                else:
                    has = hasattr(model_config, spec.softcap_attr)
                if not has:
                    raise ConfigError(
                        f"LogitLens: {model_type} soft-caps its final logits, but model_config has no "
                        f"{spec.softcap_attr!r}; pass the HF config (hooked.hf_model.config) or softcap=<value>.")
                softcap = _config_get(model_config, spec.softcap_attr)
            else:
                softcap = None
        self.softcap = float(softcap) if softcap else None
        if logit_scale == "auto":
            value = _config_get(model_config, spec.logit_scale_attr) if spec and spec.logit_scale_attr else None
            logit_scale = None if value is None else (1.0 / float(value) if spec.logit_scale_op == "div"
                                                      else float(value))
        self.logit_scale = None if logit_scale is None or float(logit_scale) == 1.0 else float(logit_scale)
        self.model_name = str(model_name)
        self.model_config = _config_dict(model_config)
        self.tokenizer = tokenizer
        self.chunk_positions, self.chunk_vocab = int(chunk_positions), int(chunk_vocab)
        if self.chunk_positions < 1 or self.chunk_vocab < 1:
            raise ConfigError("LogitLens: chunk_positions and chunk_vocab must be >= 1.")

    # ------------------------------------------------------------------ construction
    def __repr__(self) -> str:
        return (f"LogitLens({self.model_name!r}, vocab={self.vocab_size}, d={self.hidden_size}, "
                f"norm={self.norm_kind}, offset={self.norm_offset}, softcap={self.softcap}, "
                f"logit_scale={self.logit_scale})")

    @classmethod
    def from_model(cls, model: Any, **kwargs: Any) -> "LogitLens":
        """The lens of a HookedModel (its final norm, unembedding, HF config and tokenizer).

        The unembedding is ``hf_model.get_output_embeddings()`` (HF's own pointer: GPT-NeoX's head is ``lm_head`` in
        transformers 5, ``embed_out`` before), falling back to ``model.get_lm_head()``."""
        head = model.hf_model.get_output_embeddings() if hasattr(model.hf_model, "get_output_embeddings") else None
        kwargs.setdefault("arch", getattr(model, "spec", None))
        return cls(head if head is not None else model.get_lm_head(), model.get_last_layernorm(), model.model_name,
                   model.hf_model.config,
                   tokenizer=getattr(model, "hf_tokenizer", None), **kwargs)

    @classmethod
    def from_model_name(cls, name_or_path: str, **kwargs: Any) -> "LogitLens":
        """Load the model (``HookedModel.from_pretrained(name_or_path, **kwargs)``), keep only the lens."""
        from .hooked_model import HookedModel

        model = HookedModel.from_pretrained(name_or_path, **kwargs)
        lens = cls.from_model(model)
        del model
        return lens

    @property
    def vocab_size(self) -> int:
        return int(self.W_U.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.W_U.shape[1])

    @property
    def device(self) -> torch.device:
        return self.W_U.device

    def to(self, device: str | torch.device) -> "LogitLens":
        """Move the lens parameters (in place) and return self."""
        for name in ("W_U", "b_U", "norm_weight", "norm_bias"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        return self

    # ------------------------------------------------------------------ save / load
    def save(self, path: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write ``lens.safetensors`` + ``lens.json`` into the folder ``path`` (local or fsspec URL)."""
        import fsspec
        from safetensors.torch import save as st_save

        tensors = {"unembedding": self.W_U}
        for name, t in (("unembedding_bias", self.b_U), ("norm_weight", self.norm_weight),
                        ("norm_bias", self.norm_bias)):
            if t is not None:
                tensors[name] = t
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        meta = {"format": _FORMAT, "model_name": self.model_name, "norm_kind": self.norm_kind,
                "eps": self.eps, "norm_offset": self.norm_offset, "softcap": self.softcap,
                "logit_scale": self.logit_scale,
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "model_config": self.model_config}
        fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        fs.makedirs(root, exist_ok=True)
        with fs.open(f"{root.rstrip('/')}/lens.safetensors", "wb") as f:
            f.write(st_save(tensors))
        with fs.open(f"{root.rstrip('/')}/lens.json", "w") as f:
            f.write(json.dumps(meta, indent=2, sort_keys=True))
        return str(path)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu",
             storage_options: dict[str, Any] | None = None, tokenizer: Any = None) -> "LogitLens":
        """A lens saved by :meth:`save`, without the model."""
        import fsspec
        from safetensors.torch import load as st_load

        fs, root = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        try:
            with fs.open(f"{root.rstrip('/')}/lens.json", "r") as f:
                meta = json.loads(f.read())
            with fs.open(f"{root.rstrip('/')}/lens.safetensors", "rb") as f:
                tensors = st_load(f.read())
        except FileNotFoundError as e:
            raise ConfigError(f"LogitLens.load: {path!r} has no lens.json/lens.safetensors; pass the folder "
                              "written by LogitLens.save.") from e
        if meta.get("format") != _FORMAT:
            raise ConfigError(f"LogitLens.load: {path!r} has format {meta.get('format')!r}, expected {_FORMAT!r}.")
        lens = cls.__new__(cls)
        lens.W_U = tensors["unembedding"].to(device)
        lens.b_U = tensors["unembedding_bias"].to(device) if "unembedding_bias" in tensors else None
        lens.norm_weight = tensors["norm_weight"].to(device) if "norm_weight" in tensors else None
        lens.norm_bias = tensors["norm_bias"].to(device) if "norm_bias" in tensors else None
        lens.norm_kind, lens.eps, lens.norm_offset = meta["norm_kind"], float(meta["eps"]), float(meta["norm_offset"])
        lens.softcap = meta["softcap"]
        lens.logit_scale = meta.get("logit_scale")
        lens.model_name, lens.model_config = meta["model_name"], meta["model_config"]
        lens.tokenizer, lens.chunk_positions, lens.chunk_vocab = tokenizer, 1024, 16384
        return lens

    # ------------------------------------------------------------------ core (chunked, no graph)
    def _normed(self, x: torch.Tensor, stats: torch.Tensor | None, apply_norm: bool) -> torch.Tensor:
        """``[n, d]`` activations -> ``[n, d]`` lens input in the unembedding's dtype and device."""
        x = x.to(self.device)
        if apply_norm:
            x = final_norm(x, self.norm_kind, self.norm_weight, self.norm_bias, self.eps, self.norm_offset,
                           None if stats is None else stats.to(self.device))
        return x.to(self.W_U.dtype)

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.softcap:
            return torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _logits(self, h: torch.Tensor, v0: int = 0, v1: int | None = None) -> torch.Tensor:
        """``[n, d] -> [n, v1 - v0]`` float32 logits for vocabulary rows ``v0:v1``."""
        v1 = self.vocab_size if v1 is None else v1
        out = (h @ self.W_U[v0:v1].t()).float()
        if self.b_U is not None:
            out = out + self.b_U[v0:v1].float()
        return self._cap(out)

    def _vocab_chunks(self) -> Iterator[tuple[int, int]]:
        for v0 in range(0, self.vocab_size, self.chunk_vocab):
            yield v0, min(v0 + self.chunk_vocab, self.vocab_size)

    def _rows(self, act: torch.Tensor, stats: torch.Tensor | None, apply_norm: bool
              ) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield ``(r0, r1, h [r1 - r0, d])`` over the flattened positions of ``act [..., d]``."""
        flat = act.reshape(-1, act.shape[-1])
        sflat = None if stats is None else stats.reshape(-1, stats.shape[-1])
        for r0 in range(0, flat.shape[0], self.chunk_positions):
            r1 = min(r0 + self.chunk_positions, flat.shape[0])
            yield r0, r1, self._normed(flat[r0:r1], None if sflat is None else sflat[r0:r1], apply_norm)

    def _check(self, act: Any, key: str) -> torch.Tensor:
        if not isinstance(act, torch.Tensor) or act.dim() < 2 or act.shape[-1] != self.hidden_size:
            shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
            raise ConfigError(f"logit lens: {key!r} has shape {shape}; the lens needs [batch, P, "
                              f"{self.hidden_size}] (d_model-wide activations such as resid_out_i or head_out).")
        return act

    def _inputs(self, activations: Any, target_key: str, norm_stats: NormStats, apply_norm: bool
                ) -> list[tuple[str, torch.Tensor, torch.Tensor | None]]:
        """(key, activation, stats or None) for every key matching ``target_key``."""
        if norm_stats not in ("own", "last_layernorm"):
            raise ConfigError(f"norm_stats={norm_stats!r}; use 'own' (correct lens) or 'last_layernorm' "
                              "(easyroutine-compatible: the final layer's statistics for every layer).")
        if isinstance(activations, torch.Tensor):
            if norm_stats != "own" and apply_norm:
                raise ConfigError("norm_stats='last_layernorm' needs the cache (with 'last_layernorm'), not a tensor.")
            return [(target_key, self._check(activations, target_key), None)]
        keys = match_keys(list(activations.keys()), target_key)
        stats = None
        if apply_norm and norm_stats == "last_layernorm":
            if "last_layernorm" not in activations:
                raise ConfigError("norm_stats='last_layernorm' needs cache['last_layernorm']; extract with "
                                  "ExtractionConfig(extract_last_layernorm=True) or use norm_stats='own'.")
            stats = self._check(activations["last_layernorm"], "last_layernorm")
        out = []
        for k in keys:
            act = self._check(activations[k], k)
            if stats is not None and stats.shape != act.shape:
                raise ConfigError(f"cache['last_layernorm'] {tuple(stats.shape)} and {k!r} {tuple(act.shape)} "
                                  "must have the same shape (same target positions) for norm_stats='last_layernorm'.")
            out.append((k, act, stats))
        return out

    @torch.no_grad()
    def logits(self, act: torch.Tensor, apply_norm: bool = True, apply_softmax: bool = False,
               stats: torch.Tensor | None = None) -> torch.Tensor:
        """``[..., d] -> [..., vocab]`` float32 logits (or probabilities), on ``act``'s device."""
        act = self._check(act, "activation") if act.dim() >= 2 else act[None]
        out = torch.empty(*act.shape[:-1], self.vocab_size, dtype=torch.float32, device=act.device)
        flat = out.view(-1, self.vocab_size)
        for r0, r1, h in self._rows(act, stats, apply_norm):
            block = torch.empty(r1 - r0, self.vocab_size, dtype=torch.float32, device=self.device)
            for v0, v1 in self._vocab_chunks():
                block[:, v0:v1] = self._logits(h, v0, v1)
            if apply_softmax:
                block = block.softmax(-1)
            flat[r0:r1] = block.to(out.device)
        return out

    @torch.no_grad()
    def compute(self, activations: Any, target_key: str,
                token_directions: Optional[Union[list[int], list[tuple[int, int]]]] = None,
                apply_norm: bool = True, apply_softmax: bool = False,
                metric: Optional[Literal["logit_diff", "accuracy"]] = "logit_diff",
                norm_stats: NormStats = "own") -> dict[str, torch.Tensor]:
        """The logit lens of every activation matching ``target_key``: ``{"logit_lens_<key>": tensor}``.

        Without ``token_directions``: ``[batch, P, vocab]`` logits (probabilities if ``apply_softmax``).
        With ``token_directions`` (one token id or one ``(t1, t2)`` pair per example, ``len == batch``):
        ``metric="logit_diff"`` gives ``[batch, P]`` (``logit[t1] - logit[t2]``, or ``logit[t]`` for a single
        token; probabilities instead of logits if ``apply_softmax``); ``metric="accuracy"`` gives a scalar: the
        fraction of (example, position) slots where ``logit[t1] > logit[t2]`` (single token: where ``t`` is the
        top-1 token). Padded slots (all-zero activations) are left out of the accuracy.
        ``norm_stats="last_layernorm"`` reproduces easyroutine (final layer's norm statistics for every key).
        """
        out: dict[str, torch.Tensor] = {}
        for key, act, stats in self._inputs(activations, target_key, norm_stats, apply_norm):
            if token_directions is None:
                out[f"logit_lens_{key}"] = self.logits(act, apply_norm, apply_softmax, stats)
            else:
                if metric not in ("logit_diff", "accuracy"):
                    raise ConfigError(f"metric={metric!r} with token_directions; use 'logit_diff' or 'accuracy'.")
                out[f"logit_lens_{key}"] = self._direction_metric(act, stats, token_directions, apply_norm,
                                                                  apply_softmax, metric)
        return out

    def _directions(self, token_directions: Sequence[Direction], batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(token_directions) != batch:
            raise ConfigError(f"token_directions has {len(token_directions)} entries but the batch has {batch} "
                              "examples; give one token id or one (t1, t2) pair per example.")
        pairs = [isinstance(d, (tuple, list)) for d in token_directions]
        if any(pairs) and not all(pairs):
            raise ConfigError("token_directions mixes single tokens and pairs; use one form for the whole batch.")
        if all(pairs) and any(len(d) != 2 for d in token_directions):
            raise ConfigError("each token_directions pair must be (t1, t2).")
        ids = torch.as_tensor([list(d) if isinstance(d, (tuple, list)) else [d] for d in token_directions])
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            raise ConfigError(f"token_directions has ids outside the vocabulary 0..{self.vocab_size - 1}.")
        return ids[:, 0], (ids[:, 1] if ids.shape[1] == 2 else None)

    def _direction_metric(self, act: torch.Tensor, stats: torch.Tensor | None, token_directions: Sequence[Direction],
                          apply_norm: bool, apply_softmax: bool, metric: str) -> torch.Tensor:
        if act.dim() == 2:
            act, stats = act[:, None], (None if stats is None else stats[:, None])
        b = act.shape[0]
        t1, t2 = self._directions(token_directions, b)
        per_row = act.reshape(b, -1, act.shape[-1]).shape[1]
        row_t1 = t1.repeat_interleave(per_row).to(self.device)
        row_t2 = None if t2 is None else t2.repeat_interleave(per_row).to(self.device)
        need_full = apply_softmax or (metric == "accuracy" and t2 is None)
        vals = []
        for r0, r1, h in self._rows(act, stats, apply_norm):
            l1 = self._token_logits(h, row_t1[r0:r1])
            l2 = None if row_t2 is None else self._token_logits(h, row_t2[r0:r1])
            if need_full:
                lse, best = self._lse_argmax(h)
                if metric == "accuracy" and t2 is None:
                    vals.append((best == row_t1[r0:r1]).float())
                    continue
                if apply_softmax:
                    l1 = (l1 - lse).exp()
                    l2 = None if l2 is None else (l2 - lse).exp()
            if metric == "accuracy":
                vals.append((l1 > l2).float())
            else:
                vals.append(l1 if l2 is None else l1 - l2)
        res = torch.cat(vals).reshape(act.shape[:-1]).to(act.device)
        if metric == "accuracy":
            valid = act.detach().abs().sum(-1) != 0
            return (res * valid).sum() / valid.sum().clamp(min=1)
        return res

    def _token_logits(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``[n, d]``, ``[n]`` -> ``[n]``: the (capped) logit of token ``ids[r]`` at row r."""
        out = (h * self.W_U[ids]).sum(-1).float()
        if self.b_U is not None:
            out = out + self.b_U[ids].float()
        return self._cap(out)

    def _lse_argmax(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunked over the vocabulary: ``logsumexp`` ``[n]`` and ``argmax`` ``[n]`` of the logits of ``h``."""
        m = torch.full((h.shape[0],), float("-inf"), device=self.device)
        s = torch.zeros(h.shape[0], device=self.device)
        best = torch.zeros(h.shape[0], dtype=torch.long, device=self.device)
        for v0, v1 in self._vocab_chunks():
            c = self._logits(h, v0, v1)
            cm, ci = c.max(-1)
            new_m = torch.maximum(m, cm)
            s = s * (m - new_m).exp() + (c - new_m[:, None]).exp().sum(-1)
            best = torch.where(cm > m, ci + v0, best)
            m = new_m
        return m + s.log(), best

    @torch.no_grad()
    def topk(self, activations_or_tensor: Any, target_key: str, k: int = 5, apply_norm: bool = True,
             norm_stats: NormStats = "own") -> dict[str, torch.Tensor]:
        """Top-k tokens of the lens, never materialising ``[batch, P, vocab]``.

        ``activations_or_tensor``: a cache/dict (``target_key`` literal or pattern) or one ``[batch, P, d]`` tensor
        (``target_key`` names it). Returns, per key, ``"logit_lens_<key>_topk_ids"`` ``[batch, P, k]`` long and
        ``"logit_lens_<key>_topk_probs"`` ``[batch, P, k]`` float32 (softmax over the full vocabulary), on the
        activation's device. Peak extra memory: ``chunk_positions x (chunk_vocab + k)`` floats.
        """
        if not 1 <= k <= self.vocab_size:
            raise ConfigError(f"topk: k={k} must be in 1..{self.vocab_size}.")
        out: dict[str, torch.Tensor] = {}
        for key, act, stats in self._inputs(activations_or_tensor, target_key, norm_stats, apply_norm):
            ids_parts, prob_parts = [], []
            for _, _, h in self._rows(act, stats, apply_norm):
                n = h.shape[0]
                m = torch.full((n,), float("-inf"), device=self.device)
                s = torch.zeros(n, device=self.device)
                top_v = torch.empty(n, 0, device=self.device)
                top_i = torch.empty(n, 0, dtype=torch.long, device=self.device)
                for v0, v1 in self._vocab_chunks():
                    c = self._logits(h, v0, v1)
                    cv, ci = c.topk(min(k, c.shape[1]), dim=-1)  # chunk top-k, then merge [n, <= 2k]
                    cv, ci = torch.cat([top_v, cv], 1), torch.cat([top_i, ci + v0], 1)
                    top_v, pos = cv.topk(min(k, cv.shape[1]), dim=-1)
                    top_i = ci.gather(1, pos)
                    new_m = torch.maximum(m, top_v[:, 0])  # online logsumexp, exp taken in place
                    s = s * (m - new_m).exp() + c.sub_(new_m[:, None]).exp_().sum(-1)
                    m = new_m
                ids_parts.append(top_i.to(act.device))
                prob_parts.append((top_v - (m + s.log())[:, None]).exp().to(act.device))
            lead = act.shape[:-1]
            out[f"logit_lens_{key}_topk_ids"] = torch.cat(ids_parts).reshape(*lead, k)
            out[f"logit_lens_{key}_topk_probs"] = torch.cat(prob_parts).reshape(*lead, k)
        return out

    @torch.no_grad()
    def logit_diff(self, activations_or_tensor: Any, target_key: str, token_directions: Sequence[Direction],
                   apply_norm: bool = True, apply_softmax: bool = False, norm_stats: NormStats = "own"
                   ) -> dict[str, torch.Tensor]:
        """``compute(..., token_directions, metric="logit_diff")``: ``{"logit_lens_<key>": [batch, P]}``."""
        return {f"logit_lens_{k}": self._direction_metric(a, s, token_directions, apply_norm, apply_softmax,
                                                          "logit_diff")
                for k, a, s in self._inputs(activations_or_tensor, target_key, norm_stats, apply_norm)}

    @torch.no_grad()
    def accuracy(self, activations_or_tensor: Any, target_key: str, token_directions: Sequence[Direction],
                 apply_norm: bool = True, norm_stats: NormStats = "own") -> dict[str, torch.Tensor]:
        """``compute(..., token_directions, metric="accuracy")``: ``{"logit_lens_<key>": scalar}``."""
        return {f"logit_lens_{k}": self._direction_metric(a, s, token_directions, apply_norm, False, "accuracy")
                for k, a, s in self._inputs(activations_or_tensor, target_key, norm_stats, apply_norm)}
