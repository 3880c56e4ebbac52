"""HookedModel: an HF causal LM plus hooks that extract (and change) activations, padding-aware and batched."""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from .architectures import ArchSpec, ModelShape, spec_for
from .cache import ActivationCache
from .config import ExtractionConfig
from .errors import ConfigError
from .hooked_compat import (DeviceName, EasyroutineMembers, hf_load_kwargs, logit_gradient, rename_avg_patterns,
                            running_mean)
from .extraction import (Extractor, Gathered, check_config, example_sums, reduce_patterns, reduce_positions,
                         to_host)
from .intervention_spec import Intervention
from .models import source_kwargs
from .positions import resolve_positions, spec_key, validate_specs
from .slots import (LAYOUT_KEY, PATTERN_AXES, PATTERN_COL_VALID_KEY, PATTERN_ROW_VALID_KEY, POS, VALID_KEY,
                    SlotLayout, groups_of, mapping_of, relayout)

logger = logging.getLogger(__name__)


class HookedModel(EasyroutineMembers):
    """A HuggingFace causal LM that returns ActivationCaches.

    Attributes: ``hf_model``, ``hf_tokenizer``, ``model_name``, ``model_config`` (a ModelShape with
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``hidden_size``, ``head_dim``).
    ``HookedModel(HookedModelConfig(model_name=...))`` loads as easyroutine does (``from_pretrained``).
    """

    def __init__(self, hf_model: Any, hf_tokenizer: Any = None, model_name: str | None = None) -> None:
        from .compat import HookedModelConfig

        if isinstance(hf_model, HookedModelConfig):
            cfg = hf_model
            loaded = type(self).from_pretrained(cfg.model_name, device_map=cfg.device_map, torch_dtype=cfg.torch_dtype,
                                                attn_implementation=cfg.attn_implementation,
                                                batch_size=cfg.batch_size)
            self.__dict__.update(loaded.__dict__)
            self.config = cfg
            return
        self.batch_size = 1
        self.spec: ArchSpec = spec_for(hf_model.config, hf_model)  # registry, or inferred from the module tree
        self.hf_model = hf_model.eval()
        self.hf_tokenizer = hf_tokenizer
        self.model_name = model_name or getattr(hf_model.config, "_name_or_path", None) or hf_model.config.model_type
        self.model_config = ModelShape.from_config(hf_model.config)
        self._persistent: list[Intervention] = []
        self._accepts_logits_to_keep: bool | None = None
        if self.spec.inferred:  # accepted by proof only: the load-time oracles (infer_arch), else refused
            from .infer_arch import prove

            prove(self)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, device_map: Any = None, dtype: Any = None,
                        attn_implementation: str | None = None, **hf_kwargs: Any) -> "HookedModel":
        """Load a supported causal LM from a local folder or hub id; extra kwargs (e.g. ``gguf_file``,
        ``max_memory``, ``offload_folder``) pass through to transformers. The architecture is checked from the
        config before any weight is loaded. ``"smollm2"`` loads the embedded SmolLM2-135M-Instruct (GGUF); an
        unknown name raises ConfigError in seconds (``easyroutine_dist.models.load_config``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .models import load_config, resolve_model

        hf_kwargs = dict(hf_kwargs)
        batch_size = int(hf_kwargs.pop("batch_size", None) or 1)  # easyroutine's keywords
        torch_dtype = hf_kwargs.pop("torch_dtype", None)
        dtype = torch_dtype if dtype is None else dtype
        name_or_path, hf_kwargs = resolve_model(str(name_or_path), hf_kwargs)  # "smollm2" -> GGUF folder + file
        config = load_config(name_or_path, hf_kwargs)
        spec_for(config)
        kwargs = hf_load_kwargs(device_map=device_map, dtype=dtype, attn_implementation=attn_implementation,
                                **hf_kwargs)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, **source_kwargs(hf_kwargs))
        except (OSError, ValueError, TypeError) as exc:  # a weights-only folder: inputs must then be token ids
            logger.warning("no tokenizer found for %s (%s); pass input_ids to forward", name_or_path, exc)
            tokenizer = None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        gguf = hf_kwargs.get("gguf_file")
        name = str(gguf).rsplit(".gguf", 1)[0] if gguf else str(name_or_path)
        hooked = cls(model, tokenizer, model_name=name)
        hooked.batch_size = batch_size
        from .provenance import model_fingerprint

        hooked.load_fingerprint = model_fingerprint(name_or_path, hf_kwargs, config)  # provenance: which files
        return hooked

    # ------------------------------------------------------------------ easyroutine accessors
    def get_tokenizer(self) -> Any:
        return self.hf_tokenizer

    def get_lm_head(self) -> torch.nn.Module:
        return self.hf_model.get_submodule(self.spec.unembed)

    def get_last_layernorm(self) -> torch.nn.Module:
        return self.hf_model.get_submodule(self.spec.final_norm)

    @property
    def device(self) -> DeviceName:
        """Where inputs go: the device of the input embedding (CPU when it is offloaded). A device name torch
        accepts (``t.to(model.device)``); ``model.device()`` returns it as a ``torch.device`` (easyroutine)."""
        device_map = getattr(self.hf_model, "hf_device_map", None)
        if device_map:
            for path, dev in device_map.items():
                if self.spec.embed.startswith(path) or path == "":
                    return DeviceName("cpu" if dev in ("cpu", "disk") else dev if isinstance(dev, str) else f"cuda:{dev}")
        return DeviceName(self.hf_model.get_input_embeddings().weight.device)

    # ------------------------------------------------------------------ interventions
    def register_interventions(self, interventions: list[Intervention]) -> None:
        """Apply ``interventions`` to every later forward until ``clean_interventions``."""
        from .interventions import validate_interventions

        validate_interventions(interventions, self)
        self._persistent.extend(interventions)

    def clean_interventions(self) -> None:
        self._persistent = []

    # ------------------------------------------------------------------ forward
    def _prepare(self, inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            inputs = {"input_ids": inputs}
        if not hasattr(inputs, "get") or inputs.get("input_ids") is None:
            raise ConfigError("inputs must be a dict (or BatchEncoding) with 'input_ids' [batch, seq], "
                              "e.g. tokenizer(texts, return_tensors='pt', padding=True).")
        ids = torch.as_tensor(inputs["input_ids"])
        if ids.dim() == 1:
            ids = ids[None]
        if ids.numel() == 0:
            raise ConfigError("inputs['input_ids'] is empty; pass at least one prompt of at least one token.")
        vocab = self.model_config.vocab_size
        if bool((ids < 0).any()) or bool((ids >= vocab).any()):
            raise ConfigError(f"inputs['input_ids'] holds ids outside [0, {vocab}) (min {int(ids.min())}, max "
                              f"{int(ids.max())}); tokenize with this model's own tokenizer.")
        mask = inputs.get("attention_mask")
        if mask is None:
            pad = getattr(self.hf_tokenizer, "pad_token_id", None)
            eos = getattr(self.hf_tokenizer, "eos_token_id", None)
            if ids.shape[0] > 1 and pad is not None and pad != eos and bool((ids == pad).any()):
                raise ConfigError(
                    f"inputs contain the pad token id {pad} but no 'attention_mask'; pass the mask the tokenizer "
                    "returns (tokenizer(..., padding=True, return_tensors='pt')) so padding is not read as text.")
            mask = torch.ones_like(ids)
        mask = torch.as_tensor(mask).reshape(ids.shape).long()
        return ids, mask

    def _module_device(self, path: str) -> torch.device:
        """Where module ``path`` runs: its ``hf_device_map`` entry (CPU for offloaded ones), else its parameters'."""
        device_map = getattr(self.hf_model, "hf_device_map", None)
        if device_map:
            best = max((p for p in device_map if p == "" or path == p or path.startswith(p + ".")), key=len,
                       default=None)
            if best is not None:
                dev = device_map[best]
                if dev in ("cpu", "disk"):
                    return torch.device("cpu")
                return torch.device(dev if isinstance(dev, str) else f"cuda:{dev}")
        module = self.hf_model.get_submodule(path)
        param = next(module.parameters(), None)
        return param.device if param is not None and param.device.type != "meta" else self.device

    def _logits_to_keep(self, gathered: Gathered, save_logits: bool) -> dict[str, Any]:
        """``logits_to_keep`` for the HF forward: the target positions ``[batch, P]`` when logits are saved, else the
        last position only, so no ``[batch, seq, vocab]`` tensor is ever made. Empty when the model lacks it."""
        if self._accepts_logits_to_keep is None:
            import inspect

            self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(self.hf_model.forward).parameters
        if not self._accepts_logits_to_keep:
            return {}
        if not save_logits:
            return {"logits_to_keep": 1}
        return {"logits_to_keep": gathered.on(self._module_device(self.spec.final_norm))[0]}

    @contextmanager
    def _attention(self, eager: bool) -> Iterator[None]:
        """Switch to eager attention (which returns weights) for one call only."""
        current = self.hf_model.config._attn_implementation
        if not eager or current == "eager":
            yield
            return
        self.hf_model.set_attn_implementation("eager")
        try:
            yield
        finally:
            self.hf_model.set_attn_implementation(current)

    def forward(self, inputs: Any, target_token_positions: list = ["all"], pivot_positions: Any = None,
                extraction_config: ExtractionConfig = ExtractionConfig(), interventions: list | None = None,
                external_cache: ActivationCache | None = None, batch_idx: int | None = None,
                move_to_cpu: bool = False, vocabulary_index: Any = None, *, position_seed: int = 0,
                row_offset: int = 0, dict_token_index: Any = None) -> ActivationCache:
        """Run the model on ``inputs`` (``input_ids``/``attention_mask`` ``[batch, seq]``) and extract.

        Every activation is ``[batch, P, ...]`` where P is the target positions of all requested groups
        concatenated; ``cache["mapping_index"]`` maps each group to its slots and ``cache["token_dict"]`` to the
        positions within each unpadded prompt. Left and right padding give the same result as unpadded prompts.
        ``cache["valid_mask"]`` ``[batch, P]`` is False on the padded slots of variable-width groups (zeros), and
        ``cache["slot_layout"]`` says where each group lives so caches concatenate exactly (see ``slots``).
        Random specs draw from ``position_seed`` and each row's dataset index ``row_offset + r``.
        ``vocabulary_index`` (a token id, or one per row; needs ``extract_embed`` and ``keep_gradient``) adds
        ``input_embeddings_gradients`` ``[batch, P, d]``: the gradient of that token's logit at each row's last real
        token with respect to the input embeddings (easyroutine's meaning). With ``avg_over_example`` patterns are
        stored as ``avg_pattern_L{l}H{h}``; with an ``external_cache`` and ``batch_idx`` they are a running mean over
        batches. ``dict_token_index`` is accepted for easyroutine scripts and unused (docs/compat.md).
        """
        cfg = extraction_config
        sites = check_config(cfg, self.spec, self.model_config)
        keys = [key for key, _ in sites]
        specs = validate_specs(list(target_token_positions))
        all_interventions = list(self._persistent) + list(interventions or [])
        if all_interventions:
            from .interventions import validate_interventions

            validate_interventions(all_interventions, self)
        ids, mask = self._prepare(inputs)
        resolved = resolve_positions(specs, mask, pivot_positions, seed=position_seed, row_offset=row_offset)
        rows = resolved
        if cfg.attn_pattern_row_positions is not None:
            rows = resolve_positions(validate_specs(list(cfg.attn_pattern_row_positions)), mask, pivot_positions,
                                     seed=position_seed, row_offset=row_offset)
        gathered = Gathered(resolved.index, resolved.valid, rows.index, rows.valid)
        device = self.device
        ids, mask_d = ids.to(device), mask.to(device)
        position_ids = (mask_d.cumsum(-1) - 1).clamp(min=0)
        want_patterns = any(k.startswith("pattern_") for k in keys) or any(
            iv.activation.startswith("pattern_") for iv in all_interventions)
        extractor = Extractor(self.hf_model, self.spec, self.model_config, sites, gathered,
                              detach=not cfg.keep_gradient)
        grad = torch.enable_grad() if cfg.keep_gradient else torch.no_grad()
        with ExitStack() as stack, grad, self._attention(want_patterns):
            if all_interventions:
                from .interventions import register_intervention_hooks

                register_intervention_hooks(stack, self, all_interventions, mask, pivot_positions)
            extractor.register(stack)
            keep = {} if vocabulary_index is not None else self._logits_to_keep(gathered, cfg.save_logits)
            output = self.hf_model(input_ids=ids, attention_mask=mask_d, position_ids=position_ids, use_cache=False,
                                   **keep)
        out: dict[str, Any] = extractor.out
        if "input_embeddings" in out and cfg.keep_gradient and out["input_embeddings"].requires_grad:
            out["input_embeddings"].retain_grad()
        if vocabulary_index is not None:
            out["input_embeddings_gradients"] = logit_gradient(out.get("input_embeddings"), output.logits, mask_d,
                                                               vocabulary_index)
        if cfg.save_logits:
            if keep:  # the model computed only the target positions' logits: [batch, P, vocab]
                logits = Gathered.zero_padding(output.logits, gathered.on(output.logits.device)[1], gathered.all_valid)
            else:
                logits = gathered.take(output.logits)
            out["logits"] = logits if cfg.keep_gradient else logits.detach()
        if cfg.save_input_ids:
            out["input_ids"] = gathered.take(ids)
        if move_to_cpu and not cfg.keep_gradient:
            out = to_host(out)
        elif move_to_cpu:
            out = {k: v.cpu() if isinstance(v, torch.Tensor) and not v.requires_grad else v for k, v in out.items()}
        layout, masks = self._layout(out, cfg, rows, resolved)
        # position of each pattern row within its unpadded prompt (for the "baseline_ratio" reduction)
        row_abs = (mask.long().cumsum(-1) - 1).gather(1, rows.index.to(mask.device))
        reduce_patterns(out, cfg, rows.mapping_index, resolved.mapping_index, row_abs, rows.valid, resolved.valid)
        reduce_positions(out, cfg, layout, masks)
        result = {k: out[k] for k in keys + [k for k in ("input_embeddings_gradients", "logits", "input_ids") if k in out]}
        if cfg.avg_over_example:
            result = rename_avg_patterns(result, layout)
        cache = external_cache if external_cache is not None else ActivationCache()
        for key, value in result.items():
            old = cache.get(key) if external_cache is not None and batch_idx and cfg.avg_over_example else None
            cache[key] = value if old is None else running_mean(old, value, int(batch_idx))
        for key, m in masks.items():
            cache[key] = m  # built on the host
        cache["mapping_index"] = mapping_of(layout.axes[POS])
        cache["token_dict"] = resolved.token_dict
        cache[LAYOUT_KEY] = layout.to_json()
        if batch_idx is not None:
            cache["batch_idx"] = batch_idx
        return cache

    __call__ = forward

    @staticmethod
    def _layout(out: dict[str, Any], cfg: ExtractionConfig, rows: Any, cols: Any
                ) -> tuple[SlotLayout, dict[str, torch.Tensor]]:
        """The slot layout of one forward's outputs and their validity masks ``{name: [batch, slots]}``."""
        layout = SlotLayout({POS: groups_of(cols.mapping_index)})
        masks = {VALID_KEY: cols.valid}
        patterns = [k for k in out if k.startswith("pattern_")]
        layout.add_keys([k for k in out if k not in patterns] + [VALID_KEY])
        if patterns and cfg.attn_pattern_avg == "none":
            layout.axes[PATTERN_AXES[0]] = groups_of(rows.mapping_index)
            layout.axes[PATTERN_AXES[1]] = groups_of(cols.mapping_index)
            layout.add_keys(patterns, PATTERN_AXES)
            layout.add_keys([PATTERN_ROW_VALID_KEY], PATTERN_AXES[:1])
            layout.add_keys([PATTERN_COL_VALID_KEY], PATTERN_AXES[1:])
            masks[PATTERN_ROW_VALID_KEY] = rows.valid
            masks[PATTERN_COL_VALID_KEY] = cols.valid
        return layout, masks

    # ------------------------------------------------------------------ datasets
    def extract_cache(self, dataloader: Iterable[dict[str, Any]], target_token_positions: list,
                      extraction_config: ExtractionConfig = ExtractionConfig(), interventions: list | None = None,
                      batch_saver: Callable[[dict[str, Any]], dict[str, Any] | None] = lambda batch: None,
                      move_to_cpu_after_forward: bool = True, *, position_seed: int = 0, row_offset: int = 0,
                      self_check: str = "off", register_aggregation: tuple[str, Callable[[Any, Any], Any]] | None = None,
                      on_batch: Callable[[ActivationCache], None] | None = None,
                      **forward_kwargs: Any) -> ActivationCache:
        """Forward every batch of ``dataloader`` (any iterable, generators included) and concatenate the caches
        along the batch axis in linear time, in one slot layout. Each batch may carry ``pivot_positions``;
        ``batch_saver(batch)`` returns extra per-batch fields to keep. ``row_offset`` is the dataset index of the
        first row (random position specs draw per dataset row, see ``positions``). With ``avg_over_example`` the
        result is ``[1, ...]``: the mean over every row of every batch that is real at each slot (patterns as
        ``avg_pattern_L{l}H{h}``). A batch's ``vocabulary_index`` asks for ``input_embeddings_gradients`` (see
        ``forward``); ``register_aggregation=(prefix, fn)`` registers ``fn(old, new)`` on the result cache.
        ``on_batch(cache)`` (not with ``avg_over_example``) takes each batch's cache as it completes instead of
        keeping it: the result then holds only the metadata (workers stream batches to storage).
        Adds ``cache["metadata"]``, with ``provenance`` and, unless ``self_check="off"``, the self-check of the
        first batch (``"error"`` raises SelfCheckError before that batch runs when it fails; docs/provenance.md)."""
        from .selfcheck import watch

        dataloader = watched = watch(self, dataloader, self_check, extraction_config)
        specs = validate_specs(list(target_token_positions))  # malformed specs fail before the first batch
        cfg = extraction_config
        per_batch_cfg = ExtractionConfig.from_dict({**cfg.to_dict(), "avg_over_example": False}) \
            if isinstance(cfg, ExtractionConfig) and cfg.avg_over_example else cfg
        parts: list[ActivationCache] = []
        mean = _ExampleMean() if per_batch_cfg is not cfg else None
        total = len(dataloader) if hasattr(dataloader, "__len__") else None
        n_rows = n_batches = 0
        for batch in tqdm(dataloader, total=total, desc="extract_cache", unit="batch", disable=None):
            pivots = batch.get("pivot_positions") if hasattr(batch, "get") else None
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
            cache = self.forward(inputs, target_token_positions, pivot_positions=pivots,
                                 extraction_config=per_batch_cfg, interventions=interventions,
                                 move_to_cpu=move_to_cpu_after_forward, position_seed=position_seed,
                                 row_offset=row_offset + n_rows, vocabulary_index=batch.get("vocabulary_index")
                                 if hasattr(batch, "get") else None, **forward_kwargs)
            ids = torch.as_tensor(inputs["input_ids"])
            n_rows += int(ids.shape[0]) if ids.dim() > 1 else 1
            n_batches += 1
            if mean is not None:
                mean.add(cache)
                continue
            extra = batch_saver(batch)
            if extra:
                for k, v in extra.items():
                    cache[k] = v if isinstance(v, torch.Tensor) else [v]
            if on_batch is not None:
                on_batch(cache)  # streamed: this batch is not kept
                continue
            parts.append(cache)
        if not n_batches:
            raise ConfigError("extract_cache got an empty dataloader; pass at least one batch.")
        if mean is not None:
            out = mean.result()
        else:
            out = ActivationCache()
            if register_aggregation is not None:
                out.register_aggregation(*register_aggregation)
            for part in parts:
                out.cat(part)
        out["metadata"] = {
            "model_name": self.model_name,
            "model_config": self.model_config.to_dict(),
            "target_token_positions": [spec_key(s) for s in specs],
            "extraction_config": extraction_config.to_dict(),
            "interventions": [iv.to_dict() for iv in (list(self._persistent) + list(interventions or []))],
            "position_seed": int(position_seed),
            "n_examples": n_rows,
            "n_batches": n_batches,
        }
        watched.finish(out)  # provenance (with the dataset fingerprint) and self_check
        return out

    # ------------------------------------------------------------------ generation helpers
    def predict(self, k: int = 10, **forward_kwargs: Any) -> dict[str, float] | list[dict[str, float]]:
        """Top-k next-token probabilities at the last position: ``{token string: prob}`` (a list for batch > 1)."""
        forward_kwargs["target_token_positions"] = ["last"]
        forward_kwargs["extraction_config"] = ExtractionConfig(save_logits=True)
        cache = self.forward(**forward_kwargs)
        probs = cache["logits"][:, -1].float().softmax(-1)
        top = probs.topk(k, dim=-1)
        out = [{self.hf_tokenizer.decode([int(i)]): float(p) for i, p in zip(ix, pv)}
               for ix, pv in zip(top.indices, top.values)]
        return out[0] if len(out) == 1 else out

    def generate(self, inputs: Any, interventions: list | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """``hf_model.generate`` with optional interventions applied at every step. Returns token ids."""
        ids, mask = self._prepare(inputs)
        with ExitStack() as stack, torch.no_grad():
            ivs = list(self._persistent) + list(interventions or [])
            if ivs:
                from .interventions import register_intervention_hooks, validate_interventions

                validate_interventions(ivs, self)
                register_intervention_hooks(stack, self, ivs, mask, None)
            return self.hf_model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                          **generate_kwargs)



class _ExampleMean:
    """Running mean over the rows of many batches, per slot, over real slots only (float64 sums, merged layouts)."""

    def __init__(self) -> None:
        self.layout: SlotLayout | None = None
        self.sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.info: dict[str, Any] = {}
        self.firsts: dict[str, tuple[torch.Tensor, SlotLayout]] = {}
        self.token_dict: dict[str, list[Any]] = {}

    def add(self, cache: ActivationCache) -> None:
        layout = cache.layout()
        masks = {k: cache[k] for k in (VALID_KEY, PATTERN_ROW_VALID_KEY, PATTERN_COL_VALID_KEY) if k in cache}
        tensors = {k: cache[k] for k in cache.tensor_keys() if k not in masks}
        for k, v in tensors.items():  # token ids have no mean: keep the first row, as a forward does
            if not v.is_floating_point() and k not in self.firsts:
                self.firsts[k] = (v[:1], layout)
        new = example_sums({k: v for k, v in tensors.items() if v.is_floating_point()}, layout, masks)
        for k, m in masks.items():
            new[k] = (m.any(0, keepdim=True).double(), torch.ones(1, *m.shape[1:], dtype=torch.float64))
        merged = layout if self.layout is None else self.layout.merge(layout)
        for key, (total, count) in new.items():
            total, count = relayout(total, key, layout, merged), relayout(count, key, layout, merged)
            if key in self.sums:
                old_t, old_c = (relayout(t, key, self.layout, merged) for t in self.sums[key])
                total, count = total + old_t, count + old_c
            self.sums[key] = (total, count)
            self.dtypes.setdefault(key, cache[key].dtype)
        self.layout = merged
        self.info = {k: cache[k] for k in cache.keys() if k not in cache.tensor_keys() and k != "token_dict"}
        for spec, per_row in (cache.get("token_dict") or {}).items():
            self.token_dict.setdefault(spec, []).extend(per_row)

    def result(self) -> ActivationCache:
        out = ActivationCache()
        if self.layout is None:
            raise ConfigError("extract_cache with avg_over_example saw no batch to average; pass at least one batch.")
        for new, key in rename_avg_patterns({k: k for k in self.sums}, self.layout).items():
            total, count = self.sums[key]
            dtype = self.dtypes[key]
            if dtype == torch.bool:
                out[new] = total > 0
            else:
                out[new] = (total / count.clamp(min=1)).to(dtype)
        for k, v in self.info.items():
            out[k] = v
        out[LAYOUT_KEY] = self.layout.to_json()
        out["mapping_index"] = mapping_of(self.layout.axes[POS])
        for key, (first, layout) in self.firsts.items():
            out[key] = relayout(first, key, layout, self.layout)
        out["token_dict"] = self.token_dict
        return out
