"""Normalised values and query matching.

Everything is compared in its JSON form: tuples become lists, ExtractionConfig and Intervention become their
``to_dict()``, dict keys become strings. A query value therefore matches what was saved whatever Python type was
used on either side (a tuple matches what was saved as a tuple; an ExtractionConfig matches its dict form).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from ..errors import MetadataError


def jsonable(value: Any, what: str = "value") -> Any:
    """Convert ``value`` to plain JSON types, or raise MetadataError naming ``what``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MetadataError(f"{what} contains the non-finite float {value!r}; JSON cannot store it.")
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise MetadataError(f"{what} has a key {k!r} of type {type(k).__name__}; use strings.")
            out[k if isinstance(k, str) else json.dumps(k)] = jsonable(v, f"{what}[{k!r}]")
        return out
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return jsonable(to_dict(), what)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value), what)
    raise MetadataError(
        f"{what} is a {type(value).__name__}, which is not JSON-serialisable; store plain numbers, strings, "
        "lists and dicts (tensors belong in the activations)."
    )


def normalise(value: Any, what: str = "value") -> Any:
    """The canonical JSON form of ``value`` (round-tripped through ``json``)."""
    return json.loads(json.dumps(jsonable(value, what), allow_nan=False))


def _config_criterion(config: Any) -> dict[str, Any]:
    """The fields an extraction_config query constrains: a dict constrains its keys; a config its non-defaults."""
    if isinstance(config, dict):
        from ..config import ExtractionConfig

        unknown = sorted(set(config) - set(ExtractionConfig.__dataclass_fields__))
        if unknown:
            raise MetadataError(f"extraction_config has no field(s) {unknown}; query by ExtractionConfig fields, "
                                f"e.g. {{'extract_resid_out': True}}.")
        return normalise(config, "extraction_config")
    full = normalise(config, "extraction_config")
    try:
        default = normalise(type(config)(), "extraction_config")
    except TypeError:
        return full
    return {k: v for k, v in full.items() if default.get(k) != v}


def build_criteria(
    *,
    model_name: str | None = None,
    target_token_positions: Any = None,
    pivot_positions: Any = None,
    save_time: str | None = None,
    custom_keys: dict[str, Any] | None = None,
    extraction_config: Any = None,
    interventions: Any = None,
    tag: str | None = None,
    provenance: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Normalise query arguments once; ``None`` means "any"."""
    crit: dict[str, Any] = {}
    if model_name is not None:
        crit["model_name"] = model_name
    if target_token_positions is not None:
        crit["target_token_positions"] = normalise(target_token_positions, "target_token_positions")
    if pivot_positions is not None:
        crit["pivot_positions"] = normalise(pivot_positions, "pivot_positions")
    if save_time is not None:
        crit["save_time"] = str(save_time)
    if custom_keys is not None:
        if not isinstance(custom_keys, dict):
            raise MetadataError(f"custom_keys={custom_keys!r} must be a dict of custom metadata keys and values, "
                                "e.g. {'batch': 1}.")
        crit["custom_keys"] = normalise(custom_keys, "custom_keys")
    if extraction_config is not None:
        crit["extraction_config"] = _config_criterion(extraction_config)
    if interventions is not None:
        crit["interventions"] = normalise(interventions, "interventions")
    if tag is not None:
        crit["tag"] = tag
    if provenance is not None:
        if not isinstance(provenance, dict):
            raise MetadataError(f"provenance={provenance!r} must be a dict of provenance fields, e.g. "
                                "{'model_fingerprint': 'sha256:...'}.")
        crit["provenance"] = normalise(provenance, "provenance")
    return crit


def nested_match(have: Any, want: Any) -> bool:
    """Every key of ``want`` (recursively, for dict values) is in ``have`` with an equal value."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and nested_match(have[k], v) for k, v in want.items())
    return have == want


def matches(entry: dict[str, Any], crit: dict[str, Any]) -> bool:
    """Whether a catalog entry satisfies normalised criteria from :func:`build_criteria`."""
    for key, want in crit.items():
        if key == "save_time":
            if not (str(entry.get("save_time", "")).startswith(want) or str(entry.get("run_id", "")).startswith(want)):
                return False
        elif key == "custom_keys":
            custom = entry.get("other_metadata") or {}
            if any(k not in custom or custom[k] != v for k, v in want.items()):
                return False
        elif key == "extraction_config":
            have = entry.get("extraction_config") or {}
            if any(have.get(k) != v for k, v in want.items()):
                return False
        elif key == "interventions":
            if (entry.get("interventions") or []) != (want or []):
                return False
        elif key == "provenance":
            if not nested_match(entry.get("provenance"), want):
                return False
        elif entry.get(key) != want:
            return False
    return True


def _sub_check(field: str, items: list[tuple[str, Any]]):
    if len(items) == 1:
        (k, v), = items
        return lambda e: (e.get(field) or _EMPTY).get(k, _MISSING) == v

    def check(e: dict[str, Any]) -> bool:
        have = e.get(field) or _EMPTY
        for k, v in items:
            if have.get(k, _MISSING) != v:
                return False
        return True

    return check


def compile_criteria(crit: dict[str, Any]):
    """A fast predicate equivalent to ``matches(entry, crit)``, for filtering many entries."""
    checks = []
    for key, want in crit.items():
        if key in ("save_time", "interventions", "provenance"):
            checks.append(lambda e, k=key, w=want: matches(e, {k: w}))
        elif key == "custom_keys":
            checks.append(_sub_check("other_metadata", list(want.items())))
        elif key == "extraction_config":
            checks.append(_sub_check("extraction_config", list(want.items())))
        else:
            checks.append(lambda e, k=key, w=want: e.get(k) == w)
    if not checks:
        return lambda e: True
    if len(checks) == 1:
        return checks[0]
    # most selective first is unknown; custom keys and tags usually are, so they go first
    order = {"tag": 0, "custom_keys": 1, "save_time": 2}
    checks = [c for _, c in sorted(zip([order.get(k, 5) for k in crit], checks), key=lambda p: p[0])]

    def pred(e: dict[str, Any]) -> bool:
        for c in checks:
            if not c(e):
                return False
        return True

    return pred


_EMPTY: dict[str, Any] = {}


class _Missing:
    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__


_MISSING = _Missing()
