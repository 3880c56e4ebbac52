"""easyroutine-compatible ActivationSaver / ActivationLoader / QueryResult (see docs/storage_format.md)."""

from ..storage.api import ActivationLoader, ActivationSaver, QueryResult

__all__ = ["ActivationSaver", "ActivationLoader", "QueryResult"]
