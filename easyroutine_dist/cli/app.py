"""The typer app every command registers on: plain help (types without ``<bool>``), one-line errors, ``--verbose``.

Exit codes: 0 done; 1 the job itself failed (a cluster refused us, a run could not complete) or ``verify`` found
problems; 2 the input was refused before anything started (ConfigError, PositionError, MetadataError,
StorageError, a missing file, bad JSON/YAML): one ``error: ...`` line on stderr, the traceback only with ``-v``.
"""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any, NoReturn

import typer
from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from .output import JobConsole, setup_logging  # noqa: E402

console = JobConsole()  # in a job log (not a terminal) nothing is wrapped: run ids, URLs and tables stay whole
STATE: dict[str, Any] = {"verbose": False}


def err_console() -> Console:
    """A console on the current stderr (a new one per call: test runners swap ``sys.stderr``)."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


def _expected() -> tuple[type[BaseException], ...]:
    import yaml

    from ..errors import EasyRoutineError

    return (EasyRoutineError, OSError, json.JSONDecodeError, yaml.YAMLError)


def exit_code(exc: BaseException) -> int:
    """1 for a job that failed once started (DistributedError), 2 for refused input."""
    from ..errors import DistributedError

    return 1 if isinstance(exc, DistributedError) else 2


def one_line(exc: BaseException) -> str:
    """The error's message on at most two lines (what, the rule, the fix), with its type when it is not ours."""
    from ..errors import EasyRoutineError

    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    if not isinstance(exc, EasyRoutineError):
        text = f"{type(exc).__name__}: {text}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:1]) + ("\n  " + " ".join(lines[1:])[:500] if len(lines) > 1 else "")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    err_console().print(f"error: {message}", markup=False)
    raise typer.Exit(code)


def report(exc: BaseException) -> NoReturn:
    """Print an expected error as one line (and its traceback with ``--verbose``); exit 1 or 2."""
    if STATE["verbose"]:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    fail(one_line(exc), exit_code(exc))


def _plain_types(params: list[Any], ctx: Any) -> None:
    """Show option types as TEXT/INTEGER/PATH, and none for on/off flags (typer's default is ``<bool>``)."""
    for param in params:
        if getattr(param, "is_flag", False) or getattr(param, "is_bool_flag", False):
            label = None
        else:
            try:
                raw = str(param.display_type(ctx)).strip("<>")
            except Exception:  # noqa: BLE001 - help formatting only
                raw = "text"
            raw = raw.replace("list[", "").replace("]", "")
            label = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "path": "PATH", "bool": None}.get(raw, raw)
        param.display_type_rich = (lambda ctx=None, value=label: value)


class Command(TyperCommand):
    """A command whose expected errors print one line and whose help shows plain types."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except _expected() as exc:
            report(exc)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_types(self.get_params(ctx), ctx)
        super().format_help(ctx, formatter)


class Group(TyperGroup):
    """The top-level group: plain types in its help too."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _plain_types(self.get_params(ctx), ctx)
        super().format_help(ctx, formatter)


app = typer.Typer(cls=Group, add_completion=False, no_args_is_help=True, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False,
                  help="Extract activations from HF transformers on a Ray cluster, find them again, run the lens, "
                       "check an archive. Errors print one line (exit 2: input refused, exit 1: the job failed); "
                       "--verbose shows their traceback.")


def command(name: str | None = None, **kwargs: Any) -> Any:
    """``app.command`` with the one-line-error :class:`Command` class."""
    return app.command(name, cls=Command, **kwargs)


@app.callback()
def _setup(verbose: bool = typer.Option(False, "--verbose", "-v",
                                        help="Debug logging, and the traceback of any error. Default: off.")) -> None:
    """Log the library's INFO lines and run events (e.g. 'run <id> started ...; resume it with: ...') on stderr, so
    a job that dies still leaves the run id to resume in its log: rich lines on a terminal, plain unwrapped lines
    otherwise (``extract --log-format`` picks plain or JSON)."""
    STATE["verbose"] = bool(verbose)
    setup_logging("auto", bool(verbose))
