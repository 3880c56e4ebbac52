"""What the CLI writes into a job log (``ray job logs``, ``kubectl logs``, a SLURM output file).

* :class:`JobConsole`: when its output is not a terminal, nothing is wrapped or folded at 80 columns: a run id,
  a URL or a table row stays on one line, whatever its length; rules are short.
* :func:`setup_logging`: the library's log records and run events (:mod:`easyroutine_dist.distributed.events`)
  as rich lines on a terminal, plain lines otherwise (``auto``), or ``plain`` / ``json`` on request; ``json``
  writes one JSON object per event on stdout, and nothing else goes there.
* :func:`resume_command`: the exact command line that resumes a run, from this process' own arguments.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from typing import Any, Optional

from rich.console import Console, ConsoleDimensions

LOG_CHOICES = ("auto", "plain", "json")
UNBOUNDED = 100_000  # the width of a console that writes to a file or a pipe
_FLAGS_WITH_VALUE = ("--run-id",)
_FLAGS = ("--resume", "--no-resume")


class JobConsole(Console):
    """A rich Console that never wraps when its output is not a terminal (job logs, pipes, files), whatever
    ``COLUMNS`` says; an explicit ``width`` (argument or ``console.width = ...``) is kept."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._env_width = None if kwargs.get("width") is not None else self._width  # from COLUMNS, if set

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        if not self.is_terminal and (self._width is None or self._width == self._env_width):
            return ConsoleDimensions(UNBOUNDED, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def rule(self, title: Any = "", *args: Any, **kwargs: Any) -> None:
        """A rule as wide as a terminal; in a log, the title between two short dashes."""
        if self.is_terminal:
            super().rule(title, *args, **kwargs)
            return
        from rich.text import Text

        plain = Text.from_markup(title).plain if isinstance(title, str) else str(title)
        self.print(f"-- {plain} --" if plain else "--", markup=False, highlight=False)


def json_logs() -> bool:
    """True when this command writes its events as JSON on stdout (``--log-format json``)."""
    return _STATE["format"] == "json"


_STATE: dict[str, Any] = {"format": "auto"}


def setup_logging(fmt: str = "auto", verbose: Optional[bool] = None) -> None:
    """Make ``fmt`` the format of every ``easyroutine_dist`` log record: one handler, replaced on each call.

    ``auto``: rich lines when stderr is a terminal, else ``plain``; ``plain``: one unwrapped line per record on
    stderr; ``json``: one JSON object per record on stdout. ``verbose`` (when given) sets DEBUG, else INFO."""
    from ..joblog import log_handler

    if fmt not in LOG_CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"--log-format {fmt!r} is unknown; use one of {', '.join(LOG_CHOICES)}.")
    log = logging.getLogger("easyroutine_dist")
    for h in [h for h in log.handlers if getattr(h, "_easyroutine_cli", False)]:
        log.removeHandler(h)
    if fmt == "auto" and sys.stderr.isatty():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)
    else:
        handler = log_handler("json" if fmt == "json" else "plain", stdout=fmt == "json")
    handler._easyroutine_cli = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    if verbose is not None:
        log.setLevel(logging.DEBUG if verbose else logging.INFO)
    _STATE["format"] = fmt


def _program(argv0: str) -> list[str]:
    """How this program was started, as a user can type it again."""
    name = os.path.basename(argv0)
    if name in ("__main__.py", "-c", "-m") or name.endswith(".py"):
        return [sys.executable, "-m", "easyroutine_dist.cli"]
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return [name]  # on PATH: the short name is the same program
    return [argv0]


def resume_command(run_id: str, argv: Optional[list[str]] = None) -> str:
    """This command line with ``--run-id <run_id> --resume`` in place of any ``--run-id`` / ``--resume`` it had,
    quoted for a POSIX shell."""
    argv = list(sys.argv if argv is None else argv)
    out = _program(argv[0]) if argv else ["easyroutine-dist"]
    args = iter(argv[1:])
    for arg in args:
        if arg in _FLAGS_WITH_VALUE:
            next(args, None)
            continue
        if arg in _FLAGS or arg.startswith(tuple(f"{f}=" for f in _FLAGS_WITH_VALUE)):
            continue
        out.append(arg)
    out += ["--run-id", run_id, "--resume"]
    return shlex.join(out)


__all__ = ["JobConsole", "LOG_CHOICES", "json_logs", "resume_command", "setup_logging"]
