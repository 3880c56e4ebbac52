"""``easyroutine-dist``: a thin command line over the library. Parse, check, call, print.

One module per command group: :mod:`.extract` (extract, ``--dry-run``), :mod:`.runs` (query, verify, index,
import-easyroutine), :mod:`.lens` (logit-lens), :mod:`.demo`; :mod:`.app` holds the typer app, the one-line
error handling and the help formatting. The console script is ``easyroutine_dist.cli:app``.
"""

from . import extract as _extract, runs as _runs, lens as _lens, demo as _demo  # noqa: F401, I001 (command order)
from .app import app, console
from .demo import DEMO_PROMPTS
from .lens import load_tokenizer, show_lens

__all__ = ["DEMO_PROMPTS", "app", "console", "load_tokenizer", "show_lens"]
