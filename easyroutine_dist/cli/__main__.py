"""``python -m easyroutine_dist.cli``."""

from . import app

app()
