"""Distributed extraction on a Ray cluster: the only package of easyroutine_dist that imports ray.

* :class:`DistributedExtractor` (driver) schedules partitions over :class:`ExtractionWorker` actors, each holding
  one HookedModel; workers write shards straight to storage and the driver commits the run.
* :class:`MetadataIndex` (a named detached actor) answers ``ActivationLoader.query`` while a cluster is
  reachable; importing this package registers it as a storage query provider.
"""

from ..storage.layout import new_run_id as _new_run_id
from ..tokenization import tokenize_batches
from .extractor import DistributedExtractor, DistributedRun
from .index import INDEX_NAME, INDEX_NAMESPACE, MetadataIndex, get_index, index_reachable
from .models import ModelSource, resolve_model_source
from .partitions import PartitionSpec, plan_dataset
from .worker import ExtractionWorker


def new_run_id() -> str:
    """A fresh run id to pass as ``extract(..., run_id=...)`` so that an interrupted run can be resumed."""
    return _new_run_id()[0]


__all__ = ["DistributedExtractor", "DistributedRun", "ExtractionWorker", "INDEX_NAME", "INDEX_NAMESPACE",
           "MetadataIndex", "ModelSource", "PartitionSpec", "get_index", "index_reachable", "new_run_id",
           "plan_dataset", "resolve_model_source", "tokenize_batches"]
