"""easyroutine's ``interpretability.tools.logit_lens`` import path (re-export of easyroutine_dist.lens)."""

from ...lens import LogitLens

__all__ = ["LogitLens"]
