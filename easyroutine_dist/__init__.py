"""easyroutine_dist: provably correct activation extraction, local or on a Ray cluster."""

__version__ = "0.1.0"
