"""The Intervention record (easyroutine's dataclass). Applying it lives in interventions.py."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch

InterventionType = Literal[
    "full", "columns", "rows", "grid", "columns_pre_softmax", "rows_pre_softmax", "grid_pre_softmax"
]


@dataclass
class Intervention:
    """One change to an activation during the forward pass.

    type: ``"full"`` replaces/scales the activation at ``token_positions``; ``"columns"``, ``"rows"``, ``"grid"``
        (and their ``_pre_softmax`` forms) act on an attention pattern ``pattern_L{i}H{h}``.
    activation: a cache key, e.g. ``"resid_out_3"``, ``"head_out_L2H1"``, ``"pattern_L1H0"``.
    token_positions: positions in the extraction position language (``["last"]``, ``[3]``, ``[(0, 4)]`` ...).
    patching_values: ``"ablation"`` (multiply by ``multiplication_value``), ``"steering"`` with a vector in
        ``steering_vector`` (added), or a tensor ``[batch, n_positions, d]`` / ``[n_positions, d]`` / ``[d]`` that
        replaces the activation at those positions.
    """

    type: str
    activation: str
    token_positions: list
    patching_values: Union[None, torch.Tensor, str] = None
    multiplication_value: float = 0.0
    apply_softmax: bool = False
    steering_vector: Union[None, torch.Tensor] = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable description; tensors are described by shape, dtype and sha256, not stored."""

        def describe(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                data = v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
                return {"tensor_shape": list(v.shape), "dtype": str(v.dtype), "sha256": hashlib.sha256(data).hexdigest()}
            return v

        return {
            "type": self.type,
            "activation": self.activation,
            "token_positions": [list(p) if isinstance(p, tuple) else p for p in self.token_positions],
            "patching_values": describe(self.patching_values),
            "multiplication_value": self.multiplication_value,
            "apply_softmax": self.apply_softmax,
            "steering_vector": describe(self.steering_vector),
        }
