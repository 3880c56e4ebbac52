"""What ActivationSaver / ActivationLoader / QueryResult do so that easyroutine scripts keep working
(see docs/compat.md): Path locations on local disk, custom metadata at the top level of ``metadata.json``,
``load()`` giving back the kind of object that was saved, and no empty folders left by a rename."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch

from ..cache import ActivationCache
from ..errors import ConfigError
from . import layout
from .fs import Store, resolve

ENV_VAR = "ACTIVATION_BASE_DIR"
#: run metadata key recording what ``save`` was given: "tensor", "dict" or "cache"
SAVED_AS = "saved_as"
#: keys the library writes into a run's metadata or catalog entry; custom keys never shadow them at the top level
RESERVED_KEYS = frozenset({
    "model_name", "target_token_positions", "pivot_positions", "interventions", "extraction_config",
    "other_metadata", "tag", "model_config", "schema_version", "run_id", "experiment_name", "save_time",
    "saved_at_unix", SAVED_AS, "distributed", "imported_from", "n_parts", "n_keys", "n_rows",
})


def location(store: Store, path_or_url: str) -> Union[Path, str]:
    """A user-facing location: a ``Path`` on local disk, the URL string elsewhere (``s3://...``)."""
    return Path(path_or_url) if store.is_local else path_or_url


def env_store(storage_options: Any = None) -> Store:
    """The store at ``$ACTIVATION_BASE_DIR``; ConfigError (a ValueError) when it is unset or empty."""
    base = os.environ.get(ENV_VAR)
    if not base:
        raise ConfigError(f"{ENV_VAR} is not set: export it (a local folder or an s3:// URL), e.g. "
                          f"`export {ENV_VAR}=/data/activations`, or pass base_dir to the constructor.")
    return resolve(base, storage_options)


def model_name_of(model: Any) -> Any:
    """The model name from a string, a HookedModel (``.model_name``) or an easyroutine-style object whose
    ``.config.model_name`` holds it; None stays None."""
    if model is None or isinstance(model, str):
        return model
    name = getattr(model, "model_name", None)
    if name is None:
        name = getattr(getattr(model, "config", None), "model_name", None)
    return name


def saved_as(activations: Any) -> str:
    """What kind of object a run was saved from, so that loading gives the same kind back."""
    if isinstance(activations, torch.Tensor):
        return "tensor"
    if isinstance(activations, dict):
        return "dict"
    return "cache"


def with_top_level_custom_keys(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` plus a top-level copy of every ``other_metadata`` key that is not a library key (easyroutine
    writes custom keys at the top level of ``metadata.json``); ``other_metadata`` itself stays whole."""
    out = dict(meta)
    for key, value in (meta.get("other_metadata") or {}).items():
        if key not in RESERVED_KEYS and key not in out:
            out[key] = value
    return out


def as_saved(cache: ActivationCache, meta: dict[str, Any]) -> Any:
    """A loaded run as the kind of object it was saved from: the tensor, a plain dict, or the cache."""
    kind = meta.get(SAVED_AS)
    if kind == "tensor" and list(cache.keys()) == ["activations"]:
        return cache["activations"]
    if kind == "dict":
        return {k: cache[k] for k in cache.keys()}
    return cache


def prune_empty_experiment(store: Store, experiment: str) -> None:
    """Remove the now-empty folders of ``experiment`` (model folders, the experiment folder and its catalog
    folder) on local disk. Folders that still hold anything (e.g. an uncommitted run) are kept."""
    if not store.is_local:
        return  # object stores have no folders to leave behind
    layout.check_experiment(experiment)
    for top in (store.path(experiment), store.path(layout.CATALOG_DIR, experiment)):
        if not os.path.isdir(top):
            continue
        for dirpath, _dirnames, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)  # only succeeds when empty
            except OSError:
                continue


def _get_exp_name(self: Any) -> str:
    return self.experiment_name


def _set_exp_name(self: Any, name: str) -> None:
    self.experiment_name = layout.check_experiment(name)


#: ``exp_name``: easyroutine's attribute name for ``experiment_name`` (same value, checked when set)
exp_name_alias = property(_get_exp_name, _set_exp_name, doc="easyroutine's name for ``experiment_name``.")
