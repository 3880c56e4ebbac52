"""Where a worker's model comes from: a path/hub id, a ``"module:function"`` factory, or a callable factory.

The driver checks the source (config only, no weights) before any worker starts, so an unknown model fails in
seconds with a clear error instead of after a cluster has spun up. No Ray here.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import ConfigError, DistributedError

_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ModelSource:
    """A picklable description of how to build the worker's HookedModel.

    ``kind``: ``"pretrained"`` (``HookedModel.from_pretrained(name, **kwargs)``), ``"factory"`` (import
    ``"module:function"`` and call it with ``**kwargs``) or ``"callable"`` (call ``fn(**kwargs)``).
    """

    kind: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    fn: Optional[Callable[..., Any]] = None


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, attr = spec.split(":", 1)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model factory {spec!r}: cannot import module {module_name!r} ({exc}); make it importable "
                          "on every node (installed package or PYTHONPATH).") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"model factory {spec!r}: module {module_name!r} has no {attr!r}.")
    if not callable(obj):
        raise ConfigError(f"model factory {spec!r} is not callable.")
    return obj


def resolve_model_source(model_name: Any, model_kwargs: Optional[dict[str, Any]] = None) -> ModelSource:
    """Check ``model_name`` without loading weights; raise ConfigError / UnsupportedArchitectureError early.

    ``"smollm2"`` names the embedded SmolLM2-135M GGUF model (``easyroutine_dist.models.resolve_model``).
    """
    kwargs = dict(model_kwargs or {})
    if callable(model_name):
        name = getattr(model_name, "__qualname__", None) or type(model_name).__name__
        return ModelSource("callable", str(name), kwargs, model_name)
    if not isinstance(model_name, (str, os.PathLike)) or not str(model_name).strip():
        raise ConfigError(f"model_name={model_name!r} must be a model path or hub id, a 'module:function' factory, "
                          "or a callable returning a HookedModel.")
    name = str(model_name)
    from ..models import resolve_model, source_kwargs  # "smollm2" -> the embedded GGUF folder + gguf_file

    name, kwargs = resolve_model(name, kwargs)
    if _FACTORY_RE.match(name) and not os.path.exists(name):
        _import_factory(name)
        return ModelSource("factory", name, kwargs)
    from ..architectures import spec_for
    from ..models import load_config

    config = load_config(name, source_kwargs(kwargs))  # ConfigError in seconds for an unknown model
    spec_for(config)  # refuses unsupported architectures before any worker loads weights
    return ModelSource("pretrained", name, kwargs)


#: model kwargs that only say where or how weights are fetched and placed: they do not change the numbers, so a
#: resume may change them (another cluster shape, cache folder...)
_PLACEMENT_KWARGS = {"device_map", "max_memory", "offload_folder", "offload_state_dict", "offload_buffers",
                     "low_cpu_mem_usage", "local_files_only", "cache_dir", "force_download", "proxies",
                     "resume_download", "token", "use_auth_token", "hf_token"}


def _describe_value(value: Any) -> Any:
    """A stable JSON form of one kwarg: dtypes by name (``torch.bfloat16`` and ``"bfloat16"`` agree), configs by
    their ``to_dict()``, other objects by type (never a repr with a memory address)."""
    import torch

    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if isinstance(value, str) and value.startswith("torch."):
        return value[len("torch."):]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "to_dict"):
        try:
            return _describe_value(value.to_dict())
        except Exception:  # noqa: BLE001 - fall back to the type
            pass
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def describe_source(source: ModelSource) -> dict[str, Any]:
    """What the run metadata records about the workers' model loading, for resume to compare: the source kind,
    the factory for factories, and every loading kwarg that can change the numbers (``dtype``, ``revision``,
    ``gguf_file``, ``attn_implementation``...). Placement and secrets (``device_map``, ``token``...) are left out."""
    kwargs = {k: _describe_value(v) for k, v in sorted(source.kwargs.items()) if k not in _PLACEMENT_KWARGS}
    if "torch_dtype" in kwargs and "dtype" not in kwargs:  # the older name of the same setting
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    out: dict[str, Any] = {"kind": source.kind, "kwargs": kwargs}
    if source.kind != "pretrained":  # a folder may move between attempts; the model name is checked separately
        out["factory"] = source.name
    return out


def _gpu_kwargs(kwargs: dict[str, Any], num_gpus: float) -> dict[str, Any]:
    """Shard over exactly the GPUs Ray gave this actor (Ray sets CUDA_VISIBLE_DEVICES to them)."""
    if num_gpus <= 0 or "device_map" in kwargs:
        return kwargs
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise DistributedError(f"this worker was given {num_gpus} GPU(s) by Ray (CUDA_VISIBLE_DEVICES="
                               f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but torch sees no CUDA device; "
                               "install a CUDA build of torch on the workers or use num_gpus_per_worker=0.")
    out = dict(kwargs)
    if n == 1:
        out["device_map"] = {"": 0}
    else:
        # balanced over the visible GPUs only; 10% headroom for activations; no silent CPU offload
        out["device_map"] = "balanced"
        out.setdefault("max_memory", {i: int(torch.cuda.mem_get_info(i)[0] * 0.9) for i in range(n)})
    return out


def load_model(source: ModelSource, num_gpus: float = 0) -> Any:
    """Build the HookedModel a worker holds. Runs inside the worker process."""
    from ..hooked_model import HookedModel

    kwargs = _gpu_kwargs(source.kwargs, num_gpus)
    if source.kind == "pretrained":
        return HookedModel.from_pretrained(source.name, **kwargs)
    fn = source.fn if source.kind == "callable" else _import_factory(source.name)
    model = fn(**kwargs)
    if not isinstance(model, HookedModel):
        raise ConfigError(f"model factory {source.name!r} returned a {type(model).__name__}; it must return a "
                          "HookedModel (e.g. HookedModel(hf_model, tokenizer, model_name=...)).")
    return model
