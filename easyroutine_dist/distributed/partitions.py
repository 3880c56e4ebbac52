"""Datasets -> deterministic partitions (row ranges), produced lazily (workers tokenise with ``..tokenization``).

A partition is ``rows [row_start, row_stop)`` of the dataset with the id ``part_id = row_start // partition_size``
for sized datasets (so the same dataset and ``partition_size`` always give the same ids: resume relies on it).
What travels to a worker is the partition's *inputs* only: its texts, or its pre-tokenised batches. Activations
never come back through the driver.

No Ray here: this module is importable (and tested) without a cluster.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from ..errors import ConfigError
from ..storage.layout import MAX_PARTS, check_part_id
from ..tokenization import tokenize_batches  # noqa: F401 - re-exported: tokenisation lives in ..tokenization

#: the largest number of partitions one run may have (part ids are padded to 5 digits in names, up to 7)
MAX_PARTITIONS = MAX_PARTS  # 10**7 (issue 10): part ids and names go that far
#: how part fingerprints are computed (stored in the run metadata; a change refuses resuming older runs)
FINGERPRINT_VERSION = "sha256-v1"


def fingerprint_texts(texts: Sequence[str]) -> str:
    """``"sha256:<hex>"`` of a partition's prompts: each one's UTF-8 bytes, length-prefixed, in order.

    sha256 (not the crc32c of shard checksums): a fingerprint *identifies* content, and a 32-bit CRC would call one
    changed partition in four billion "the same"; hashlib also needs no extra package.
    """
    h = hashlib.sha256(b"texts\0")
    for t in texts:
        b = str(t).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return "sha256:" + h.hexdigest()


def fingerprint_batches(batches: Sequence[dict[str, Any]]) -> str:
    """``"sha256:<hex>"`` of a partition's pre-tokenised batches: for each batch, each of ``input_ids``,
    ``attention_mask`` (``[batch, seq]``) and ``pivot_positions``: name, shape and values (whole numbers as int64,
    others as float64, so the same numbers in another dtype match), batch boundaries included."""
    h = hashlib.sha256(b"token_batches\0")
    for batch in batches:
        h.update(b"\0batch")
        for name in ("input_ids", "attention_mask", "pivot_positions"):
            if batch.get(name) is None:
                continue
            t = torch.as_tensor(batch[name]).detach().cpu()
            whole = not t.is_floating_point() or bool(torch.equal(t, t.round()))  # a 0./1. mask is a 0/1 mask
            t = t.to(torch.int64) if whole else t.to(torch.float64)
            h.update(f"\0{name}{list(t.shape)}".encode())
            h.update(t.contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()


@dataclass(frozen=True)
class PartitionSpec:
    """One unit of work. Small and picklable: texts (or token-id batches ``[batch, seq]``), never activations.

    ``token_directions``: the logit-lens directions of these rows (one token id or ``(t1, t2)`` per row), if any.
    ``fingerprint``: the driver's digest of the inputs (:func:`fingerprint_texts` / :func:`fingerprint_batches`); the
    worker stores it in the part's record and a resume compares it before recomputing anything.
    """

    part_id: int
    row_start: int
    row_stop: int
    texts: Optional[list[str]] = None
    batches: Optional[list[dict[str, Any]]] = None
    token_directions: Optional[list[Any]] = None
    fingerprint: Optional[str] = None

    @property
    def rows(self) -> int:
        return self.row_stop - self.row_start


@dataclass
class DatasetPlan:
    """What the driver knows about a dataset before running: its kind, size (if sized) and a partition factory."""

    kind: str  # "texts", "hf_dataset", "text_iterable", "token_batches"
    n_rows: Optional[int]
    partition_size: int
    _source: Any = field(repr=False, default=None)
    text_column: str = "text"

    @property
    def n_partitions(self) -> Optional[int]:
        if self.n_rows is None:
            return None
        return -(-self.n_rows // self.partition_size)

    def describe(self) -> dict[str, Any]:
        """JSON description stored in the run metadata (used to refuse resuming with other data)."""
        return {"kind": self.kind, "n_rows": self.n_rows, "partition_size": self.partition_size,
                "text_column": self.text_column if self.kind == "hf_dataset" else None,
                "fingerprint": FINGERPRINT_VERSION}

    def partitions(self, token_directions: Optional[Sequence[Any]] = None) -> Iterator[PartitionSpec]:
        """Yield the partitions in order, lazily (only one partition's inputs are built at a time)."""

        def dirs(a: int, b: int) -> Optional[list[Any]]:
            if token_directions is None:
                return None
            if len(token_directions) < b:
                raise ConfigError(f"logit_lens token_directions has {len(token_directions)} entries but the dataset "
                                  f"has at least {b} rows; give one token id or (t1, t2) pair per row.")
            return [list(d) if isinstance(d, (tuple, list)) else int(d) for d in token_directions[a:b]]

        ps = self.partition_size
        if self.kind in ("texts", "hf_dataset"):
            for pid, start in enumerate(range(0, int(self.n_rows or 0), ps)):
                stop = min(start + ps, int(self.n_rows or 0))
                if self.kind == "texts":
                    texts = [str(t) for t in self._source[start:stop]]
                else:
                    texts = [str(t) for t in self._source[start:stop][self.text_column]]
                yield PartitionSpec(pid, start, stop, texts=texts, token_directions=dirs(start, stop),
                                    fingerprint=fingerprint_texts(texts))
        elif self.kind == "text_iterable":
            it = iter(self._source)
            start = 0
            for pid in itertools.count():
                chunk = [str(t) for t in itertools.islice(it, ps)]
                if not chunk:
                    return
                check_part_id(pid)
                yield PartitionSpec(pid, start, start + len(chunk), texts=chunk,
                                    token_directions=dirs(start, start + len(chunk)),
                                    fingerprint=fingerprint_texts(chunk))
                start += len(chunk)
        else:  # token_batches: whole batches, grouped until a partition holds >= partition_size rows
            start, pid, group, rows = 0, 0, [], 0
            for batch in self._source:
                b = _check_batch(batch, start + rows)
                group.append(b)
                rows += int(b["input_ids"].shape[0])
                if rows >= ps:
                    yield PartitionSpec(check_part_id(pid), start, start + rows, batches=group,
                                        token_directions=dirs(start, start + rows),
                                        fingerprint=fingerprint_batches(group))
                    start, pid, group, rows = start + rows, pid + 1, [], 0
            if group:
                yield PartitionSpec(check_part_id(pid), start, start + rows, batches=group,
                                    token_directions=dirs(start, start + rows), fingerprint=fingerprint_batches(group))


def _check_batch(batch: Any, row: int) -> dict[str, Any]:
    if not hasattr(batch, "get") or batch.get("input_ids") is None:
        raise ConfigError(f"the pre-tokenised batch starting at row {row} is a {type(batch).__name__} without "
                          "'input_ids'; give dicts with 'input_ids' [batch, seq] and 'attention_mask' [batch, seq].")
    out = {k: batch[k] for k in ("input_ids", "attention_mask", "pivot_positions") if k in batch}
    ids = torch.as_tensor(out["input_ids"])
    out["input_ids"] = ids if ids.dim() == 2 else ids.reshape(1, -1)
    if "attention_mask" in out:
        out["attention_mask"] = torch.as_tensor(out["attention_mask"]).reshape(out["input_ids"].shape)
    return out


def plan_dataset(dataset: Any, partition_size: int, text_column: str = "text") -> DatasetPlan:
    """Classify ``dataset`` and check it is usable, without reading more than its first element.

    Accepts a list/tuple of strings, a HF ``datasets.Dataset`` with a text column, an iterable of strings, or an
    iterable of pre-tokenised batches (dicts with ``input_ids``/``attention_mask`` ``[batch, seq]``).
    Raises ConfigError for an empty dataset, a bad ``partition_size`` or an unknown element type.
    """
    if isinstance(partition_size, bool) or not isinstance(partition_size, int) or partition_size < 1:
        raise ConfigError(f"partition_size={partition_size!r} must be an int >= 1 (rows per partition), e.g. 256.")
    if dataset is None or isinstance(dataset, (str, bytes)):
        raise ConfigError("dataset must be a list of strings, a datasets.Dataset with a text column, or an iterable "
                          f"of pre-tokenised batches; got {type(dataset).__name__}.")
    if hasattr(dataset, "column_names") and hasattr(dataset, "select"):  # a HF datasets.Dataset
        if text_column not in dataset.column_names:
            raise ConfigError(f"the dataset has no text column {text_column!r} (columns: {dataset.column_names}); "
                              "pass text_column=<name>.")
        return _sized(DatasetPlan("hf_dataset", len(dataset), partition_size, dataset, text_column))
    if isinstance(dataset, (list, tuple)):
        if not dataset:
            raise ConfigError("the dataset is empty; pass at least one prompt.")
        if all(isinstance(x, str) for x in dataset):
            return _sized(DatasetPlan("texts", len(dataset), partition_size, dataset))
        if all(hasattr(x, "get") for x in dataset):
            return DatasetPlan("token_batches", None, partition_size, list(dataset))
        bad = next(type(x).__name__ for x in dataset if not isinstance(x, str))
        raise ConfigError(f"the dataset list mixes strings with {bad}; pass only strings (prompts) or only "
                          "pre-tokenised batches (dicts with input_ids/attention_mask).")
    try:
        it = iter(dataset)
    except TypeError:
        raise ConfigError(f"dataset of type {type(dataset).__name__} is not iterable; pass a list of strings, a "
                          "datasets.Dataset or an iterable of pre-tokenised batches.") from None
    first = next(it, None)
    if first is None:
        raise ConfigError("the dataset is empty; pass at least one prompt.")
    rest = itertools.chain([first], it)
    if isinstance(first, str):
        return DatasetPlan("text_iterable", None, partition_size, rest)
    if hasattr(first, "get"):
        return DatasetPlan("token_batches", None, partition_size, rest)
    raise ConfigError(f"dataset elements are {type(first).__name__}; expected strings or dicts with input_ids.")


def _sized(plan: DatasetPlan) -> DatasetPlan:
    if not plan.n_rows:
        raise ConfigError("the dataset is empty; pass at least one prompt.")
    if (plan.n_partitions or 0) > MAX_PARTITIONS:
        raise ConfigError(f"{plan.n_rows} rows in partitions of {plan.partition_size} make {plan.n_partitions} "
                          f"partitions; at most {MAX_PARTITIONS} are allowed: raise partition_size.")
    return plan

