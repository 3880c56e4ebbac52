"""Read easyroutine's ``tensor.pt`` files without running pickle code, and turn them into tensors + JSON.

easyroutine saved activations with ``torch.save`` (a pickle). They are read here with torch's ``weights_only``
unpickler, which only builds torch's own tensor types and the classes allowlisted below, each mapped to a
stand-in class of this module that holds data and has no behaviour:

* ``easyroutine.interpretability.activation_cache.ActivationCache`` (its state: the ``cache`` dict),
* ``easyroutine.interpretability.activation_cache.ValueWithInfo`` (a value and its note),
* ``easyroutine.interpretability.interventions.Intervention`` and
  ``easyroutine.interpretability.hooked_model.ExtractionConfig`` (dataclass fields, kept as JSON),
* ``re._compile``: the ActivationCache's ``valid_keys`` regexes; mapped to a function returning the pattern text.

Before loading, the file's pickle is scanned statically (nothing executed) and any other global is refused with
:class:`UnsafeArchiveError` naming the file and the globals.
"""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import UnsafeArchiveError

LEGACY_CACHE = "easyroutine.interpretability.activation_cache.ActivationCache"
LEGACY_VALUE_WITH_INFO = "easyroutine.interpretability.activation_cache.ValueWithInfo"
LEGACY_INTERVENTION = "easyroutine.interpretability.interventions.Intervention"
LEGACY_EXTRACTION_CONFIG = "easyroutine.interpretability.hooked_model.ExtractionConfig"
LEGACY_PATTERN = "re._compile"


class LegacyCache:
    """Stands in for easyroutine's ActivationCache while unpickling: keeps the pickled state dict only."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not isinstance(state.get("cache"), dict):
            raise pickle.UnpicklingError("an easyroutine ActivationCache without a 'cache' dict")
        self.state = state


class LegacyValueWithInfo:
    """Stands in for easyroutine's ValueWithInfo (two slots, filled by the unpickler)."""

    __slots__ = ("_value", "_info")


class LegacyRecord:
    """Stands in for an easyroutine dataclass (Intervention, ExtractionConfig): its fields as a dict."""

    kind = "record"

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"an easyroutine {self.kind} without a field dict")
        self.fields = dict(state)


class LegacyIntervention(LegacyRecord):
    kind = "Intervention"


class LegacyExtractionConfig(LegacyRecord):
    kind = "ExtractionConfig"


def _pattern_text(pattern: Any, flags: Any = 0) -> Any:
    """Replaces ``re._compile`` while unpickling: the regex text, never compiled."""
    return pattern


ALLOWLIST: list[tuple[Any, str]] = [
    (LegacyCache, LEGACY_CACHE),
    (LegacyValueWithInfo, LEGACY_VALUE_WITH_INFO),
    (LegacyIntervention, LEGACY_INTERVENTION),
    (LegacyExtractionConfig, LEGACY_EXTRACTION_CONFIG),
    (_pattern_text, LEGACY_PATTERN),
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_globals(path: Path) -> None:
    """Scan ``path``'s pickle without executing it; UnsafeArchiveError unless every global is allowlisted."""
    with torch.serialization.safe_globals(ALLOWLIST):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except ValueError as exc:
            raise UnsafeArchiveError(f"{path}: not a torch.save checkpoint ({exc}); easyroutine 1.1.5 wrote "
                                     "torch.save zip files, anything else is refused.") from None
        except Exception as exc:  # noqa: BLE001 - malformed pickle or opcode the scanner does not know
            raise UnsafeArchiveError(f"{path}: its pickle cannot be scanned safely ({type(exc).__name__}: {exc}); "
                                     "refused, nothing was loaded.") from None
    if unsafe:
        raise UnsafeArchiveError(
            f"{path}: refused, its pickle needs {sorted(unsafe)}, which are not among the classes easyroutine "
            f"stores ({[name for _, name in ALLOWLIST]}); it was not loaded. Remove it from the folder to import "
            "the other runs, or re-save it with easyroutine as tensors/dicts/ActivationCache.")


def safe_load(path: Path) -> Any:
    """The object in an easyroutine ``tensor.pt``, scanned first (:func:`check_globals`), then loaded with
    torch's weights-only unpickler and the allowlist (:func:`weights_only_load`).

    Tensors come back on the CPU. Raises UnsafeArchiveError (nothing executed) for anything else.
    """
    check_globals(path)
    return weights_only_load(path)


def weights_only_load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` with only the allowlist added: torch's restricted unpickler, never
    a full one. A refusal raises UnsafeArchiveError, naming the globals the file needs when a scan can tell."""
    with torch.serialization.safe_globals(ALLOWLIST):
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, TypeError, AttributeError, ValueError, EOFError) as exc:
            why = f"{type(exc).__name__}: {exc}"
    check_globals(path)  # raises with the names of what the file needs, when that is why
    raise UnsafeArchiveError(f"{path}: refused by the weights-only unpickler ({why}); nothing was loaded.")


def to_object(value: Any) -> Any:
    """What a weights-only load gave, with each stand-in replaced by ours: an easyroutine ActivationCache ->
    an :class:`~easyroutine_dist.cache.ActivationCache` with the same keys, a ValueWithInfo -> ours, an
    Intervention / ExtractionConfig -> a dict of its fields. Tensors, containers and plain values are kept."""
    if isinstance(value, LegacyCache):
        from ..cache import ActivationCache

        out = ActivationCache()
        for key, item in value.state["cache"].items():
            out[key] = to_object(item)
        return out
    if isinstance(value, LegacyValueWithInfo):
        from ..compat import ValueWithInfo

        return ValueWithInfo(to_object(getattr(value, "_value", None)), to_object(getattr(value, "_info", None)))
    if isinstance(value, LegacyRecord):
        return {k: to_object(v) for k, v in value.fields.items()}
    if isinstance(value, dict):
        out_dict = value.copy()  # the same mapping type (OrderedDict stays ordered)
        for key in out_dict:
            out_dict[key] = to_object(out_dict[key])
        return out_dict
    if isinstance(value, list):
        return [to_object(v) for v in value]
    if type(value) is tuple:
        return tuple(to_object(v) for v in value)
    return value


def _describe_tensor(t: torch.Tensor) -> dict[str, Any]:
    data = t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return {"tensor_shape": list(t.shape), "dtype": str(t.dtype), "sha256": hashlib.sha256(data).hexdigest()}


def _record_json(value: Any, where: str) -> Any:
    """JSON form of a metadata value: records become their fields, tuples lists, tensors a description."""
    if isinstance(value, LegacyRecord):
        return {k: _record_json(v, f"{where}.{k}") for k, v in value.fields.items()}
    if isinstance(value, torch.Tensor):
        return _describe_tensor(value)
    if isinstance(value, (list, tuple)):
        return [_record_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): _record_json(v, f"{where}[{k!r}]") for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsafeArchiveError(f"{where} holds a {type(value).__name__}, which cannot be stored as JSON.")


def _has_tensor(value: Any) -> bool:
    if isinstance(value, (torch.Tensor, LegacyValueWithInfo)):
        return True
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensor(v) for v in value)
    return False


def _split(key: str, value: Any, tensors: dict, info: dict, notes: dict, where: str) -> None:
    """Put ``value`` under ``key``: tensors in ``tensors``, the rest as JSON in ``info``. A container holding
    tensors is split into one key per leaf (``key.0``, ``key.name``), listed in ``notes["split_keys"]``."""
    if key in tensors or key in info:
        raise UnsafeArchiveError(f"{where}: the key {key!r} would be stored twice (a split container's leaf has "
                                 "the name of another key).")
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous()
    elif isinstance(value, LegacyValueWithInfo):
        notes.setdefault("value_info", {})[key] = _record_json(getattr(value, "_info", None), f"{where}.info")
        _split(key, getattr(value, "_value", None), tensors, info, notes, f"{where}.value")
    elif isinstance(value, (dict, list, tuple)) and _has_tensor(value):
        items = value.items() if isinstance(value, dict) else enumerate(value)
        leaves = notes.setdefault("split_keys", {}).setdefault(key, [])
        for sub, v in items:
            leaf = f"{key}.{sub}"
            leaves.append(leaf)
            _split(leaf, v, tensors, info, notes, f"{where}[{sub!r}]")
    else:
        info[key] = _record_json(value, where)


def to_payload(obj: Any, where: str) -> tuple[str, Any]:
    """``(saved_as, payload)`` for storage: a tensor, or ``(tensors, JSON info)`` from a dict or an
    easyroutine ActivationCache. ValueWithInfo notes go to ``info["value_info"]`` and split containers to
    ``info["split_keys"]``. UnsafeArchiveError for anything else (e.g. a bare list)."""
    if isinstance(obj, torch.Tensor):
        return "tensor", obj.detach().to("cpu").contiguous()
    if isinstance(obj, LegacyCache):
        kind, entries = "cache", obj.state["cache"]
    elif isinstance(obj, dict):
        kind, entries = "dict", obj
    else:
        raise UnsafeArchiveError(f"{where} holds a {type(obj).__name__}; only tensors, dicts and easyroutine "
                                 "ActivationCaches can be imported.")
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for key, value in entries.items():
        if not isinstance(key, str):
            raise UnsafeArchiveError(f"{where} has a key {key!r} that is not a string.")
        _split(key, value, tensors, info, notes, f"{where}[{key!r}]")
    clash = sorted(set(notes) & (set(info) | set(tensors)))
    if clash:
        raise UnsafeArchiveError(f"{where} already has keys {clash}, which the import uses for its notes.")
    info.update(notes)
    return kind, (tensors, info)
