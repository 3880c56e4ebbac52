"""Small easyroutine-shaped records: ``HookedModelConfig`` (how easyroutine scripts describe a model to load) and
``ValueWithInfo`` (a value carrying a note about it). They hold data only; see docs/compat.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["HookedModelConfig", "ValueWithInfo"]


@dataclass
class HookedModelConfig:
    """What ``HookedModel(HookedModelConfig(...))`` loads. Field names and defaults are easyroutine 1.1.5's.

    model_name: hub id or local folder. device_map: ``"balanced"``, ``"auto"``, ``"cpu"``, ``"cuda"`` or an
    explicit map (handed to transformers). torch_dtype: a ``torch.dtype`` or its name (``"bfloat16"``).
    attn_implementation: ``"custom_eager"`` (easyroutine's default, its own eager attention wrapper), ``"eager"``,
    ``"sdpa"`` ... batch_size: kept for scripts that read it back; batching is decided by the caller here.
    """

    model_name: str
    device_map: Any = "balanced"
    torch_dtype: Any = torch.bfloat16
    attn_implementation: str = "custom_eager"
    batch_size: int = 1

    def __post_init__(self) -> None:
        from .errors import ConfigError

        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ConfigError(f"HookedModelConfig.model_name must be a non-empty string, got {self.model_name!r}.")
        if isinstance(self.torch_dtype, str) and self.torch_dtype != "auto":
            dtype = getattr(torch, self.torch_dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ConfigError(f"HookedModelConfig.torch_dtype={self.torch_dtype!r} is not a torch dtype name; "
                                  "use e.g. torch.bfloat16 or 'float32'.")
            self.torch_dtype = dtype
        if not isinstance(self.batch_size, int) or isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ConfigError(f"HookedModelConfig.batch_size must be an int >= 1, got {self.batch_size!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (the dtype as its name, e.g. ``"bfloat16"``)."""
        out = dataclasses.asdict(self)
        if isinstance(self.torch_dtype, torch.dtype):
            out["torch_dtype"] = str(self.torch_dtype).removeprefix("torch.")
        return out


class ValueWithInfo:
    """A value (usually a tensor) with a note describing it, e.g. which rows an averaged pattern covers.

    ``value()`` and ``info()`` return the two parts; any other attribute is read from the value, so
    ``v.shape`` is the tensor's shape.
    """

    __slots__ = ("_value", "_info")

    def __init__(self, value: Any, info: Any) -> None:
        self._value = value
        self._info = info

    def value(self) -> Any:
        return self._value

    def info(self) -> Any:
        return self._info

    def __getattr__(self, name: str) -> Any:
        if name in ValueWithInfo.__slots__ or name.startswith("__"):
            # unset slots (while unpickling) must not recurse, and protocol hooks (__deepcopy__, __reduce_ex__ ...)
            # must be this class's, not the value's: copying a ValueWithInfo gives a ValueWithInfo
            raise AttributeError(name)
        return getattr(self._value, name)

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        return None, {"_value": self._value, "_info": self._info}

    def __setstate__(self, state: Any) -> None:
        slots = state[1] if isinstance(state, tuple) else state
        self._value, self._info = slots["_value"], slots["_info"]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ValueWithInfo):
            return NotImplemented
        same = (torch.equal(self._value, other._value) if isinstance(self._value, torch.Tensor)
                and isinstance(other._value, torch.Tensor) else self._value == other._value)
        return bool(same) and self._info == other._info

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ValueWithInfo(value={self._value!r}, info={self._info!r})"


torch.serialization.add_safe_globals([ValueWithInfo])  # a torch.save'd cache holding one loads with weights_only=True
