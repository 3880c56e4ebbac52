"""Storage: safetensors shards + JSON on any fsspec store (local, memory, S3), with a rebuildable catalog."""

from .catalog import Catalog
from .fs import Store, resolve
from .runs import RunHandle, RunWriter, iter_parts, load_run

__all__ = ["Catalog", "RunHandle", "RunWriter", "Store", "iter_parts", "load_run", "resolve"]
