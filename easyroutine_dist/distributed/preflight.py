"""Checks a driver can make before any worker starts, without writing anything: storage reachability (read-only),
the model's tokenizer, and ``target_token_positions`` against a tokenised sample of the dataset.

No Ray here; nothing is written. Used by the CLI's ``extract`` (before Ray starts) and by :mod:`.plan`.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from ..errors import PositionError, StorageError
from ..tokenization import load_tokenizer, tokenize_batches  # the one home of tokenisation (re-exported here)


def probe_storage(saver: Any, shared: bool = False) -> None:
    """Before any worker starts: ConfigError when the saver's storage is a local folder on a cluster of several
    nodes not declared ``shared`` (:func:`.placement.check_local_base_dir`), StorageError when it cannot be
    reached (:func:`check_storage`); a local base folder is then created."""
    from .placement import check_local_base_dir

    check_local_base_dir(saver.store, shared)
    check_storage(saver)
    if saver.store.is_local:
        os.makedirs(saver.store.root, exist_ok=True)


def check_storage(saver: Any) -> None:
    """StorageError when ``saver``'s storage cannot be reached or (local disk) written; reads only.

    Local: the base folder, or its nearest existing parent, must be a writable folder. Object stores: the bucket
    must exist and the base prefix must be listable with the credentials of this process."""
    from ..storage.fs import exists, list_names

    store = saver.store
    where = store.url(store.root)
    try:
        if store.is_local:
            path = os.path.abspath(store.root)
            while not os.path.exists(path) and os.path.dirname(path) != path:
                path = os.path.dirname(path)
            if not os.path.isdir(path):
                raise StorageError(f"storage {where!r}: {path!r} is a file, not a folder; pick another base_dir.")
            if not os.access(path, os.W_OK | os.X_OK):
                raise StorageError(f"storage {where!r} is not writable ({path!r} refuses writes); pick a writable "
                                   "base_dir.")
        elif store.protocol != "memory":
            bucket = store.root.split("/", 1)[0]
            if not exists(store, bucket):
                raise StorageError(f"bucket {bucket!r} at {store.url(bucket)} does not exist or is not accessible; "
                                   "create it or fix the endpoint/credentials (storage_options, AWS_* env vars).")
            list_names(store, store.root)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any client error here means unreachable storage
        raise StorageError(f"storage {where} is unreachable ({type(exc).__name__}: {exc}); check the endpoint and "
                           "credentials.") from None


def sample_texts(dataset_plan: Any, n: int) -> Optional[list[str]]:
    """The first ``n`` prompts of a sized text dataset (a list or a datasets.Dataset), without consuming anything;
    None for iterables and pre-tokenised batches."""
    src = getattr(dataset_plan, "_source", None)
    if dataset_plan.kind == "texts":
        return [str(t) for t in src[:n]]
    if dataset_plan.kind == "hf_dataset":
        return [str(t) for t in src[:n][dataset_plan.text_column]]
    return None


def _resolve(specs: Sequence[Any], mask: Any, seed: int, row_offset: int) -> Any:
    from ..positions import resolve_positions

    return resolve_positions(list(specs), mask, None, seed=seed, row_offset=row_offset)


def check_positions_on_sample(tokenizer: Any, texts: Sequence[str], specs: Sequence[Any], batch_size: int,
                              position_seed: int = 0, tokenizer_kwargs: Optional[dict[str, Any]] = None,
                              first_row: int = 0) -> int:
    """Resolve ``specs`` on ``texts`` (dataset rows ``first_row, first_row + 1, ...``) tokenised as the workers do
    (batches of ``batch_size``, left padding); raise PositionError naming the dataset row, its length and the spec
    when a row cannot take them. Returns the rows checked."""
    row = first_row
    for batch in tokenize_batches(tokenizer, list(texts), batch_size, tokenizer_kwargs):
        mask = batch["attention_mask"]
        try:
            _resolve(specs, mask, position_seed, row)
        except PositionError:
            for r in range(mask.shape[0]):  # which row: resolve them one at a time
                try:
                    _resolve(specs, mask[r:r + 1], position_seed, row + r)
                except PositionError as exc:
                    n = int(mask[r].sum())
                    text = str(texts[row - first_row + r])
                    raise PositionError(f"dataset row {row + r} ({n} tokens: {text[:40]!r}"
                                        f"{'...' if len(text) > 40 else ''}): "
                                        f"{str(exc).replace(' in batch row 0', '')}") from None
            raise
        row += int(mask.shape[0])
    return row


__all__ = ["check_positions_on_sample", "check_storage", "load_tokenizer", "sample_texts"]
