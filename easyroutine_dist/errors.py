"""One small exception hierarchy. Messages name the thing, the rule it broke, and the fix."""

from __future__ import annotations

from typing import Iterable


class EasyRoutineError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(EasyRoutineError, ValueError):
    """An ExtractionConfig, Intervention or other user setting is invalid."""


class PositionError(EasyRoutineError, ValueError):
    """A target_token_positions spec is malformed or out of range for a row."""


class UnsupportedArchitectureError(EasyRoutineError, ValueError):
    """The model's architecture (or a config feature) is not in the registry."""


class StorageError(EasyRoutineError):
    """Storage is unreachable, corrupted, or an operation would damage saved runs."""


class CorruptShardError(StorageError):
    """A shard's bytes do not match the sha256 recorded at save time."""


class MetadataError(EasyRoutineError, ValueError):
    """Metadata is not JSON-serialisable or a name would escape the base directory."""


class DistributedError(EasyRoutineError):
    """A distributed run cannot start or cannot complete."""


class UnsafeArchiveError(StorageError):
    """A file to import needs more than the allowlisted classes to unpickle (or is malformed); it was not loaded."""


def refuse_unknown(given: Iterable[str], allowed: Iterable[str], what: str, noun: str = "keys") -> None:
    """Raise ConfigError naming the names of ``given`` (a mapping's keys) that ``allowed`` lacks, and the allowed
    ones; nothing when every name is known."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ConfigError(f"{what} has unknown {noun} {unknown}; allowed: {sorted(allowed)}.")
