"""Provenance: exactly what produced a run, stored in ``metadata["provenance"]`` and queryable.

Fields (docs/provenance.md): ``package_version``, ``python``, ``torch``, ``transformers``, ``accelerate``;
``model_fingerprint`` (+ ``model_fingerprint_kind``): ``"hub"`` (repo and commit hash), ``"files"`` (config.json
bytes plus the weight files' names and sizes: no weight is read), ``"gguf"`` (the GGUF header: metadata and tensor
table, not the tensor data) or ``"memory"`` (a model built in code: its config plus parameter names, shapes and
dtypes); ``tokenizer_fingerprint`` (the serialised vocabulary, merges, normaliser, special tokens and padding side);
``dataset_fingerprint`` (over the part fingerprints of ``distributed.partitions``); ``dtype``, ``device_map``,
``attn_implementation``. Fingerprints are ``"sha256:<hex>"`` (a fingerprint identifies content, so no 32-bit CRC).
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import platform
import struct
import weakref
from typing import Any, Iterable, Optional, Sequence

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_TOKENIZER_CACHE: "weakref.WeakKeyDictionary[Any, tuple[Any, str]]" = weakref.WeakKeyDictionary()


def _digest(*chunks: bytes) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(len(c).to_bytes(8, "little"))
        h.update(c)
    return "sha256:" + h.hexdigest()


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, default=str).encode()


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, Optional[str]]:
    """Versions of this package, Python, torch, transformers and accelerate (None when not installed)."""
    from importlib import metadata

    from . import __version__

    out: dict[str, Optional[str]] = {"package_version": __version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------- model
def gguf_header_end(path: str) -> int:
    """Byte offset where a GGUF file's header (magic, version, metadata key/values, tensor table) ends.

    Parsed here, without reading tensor data (the ``gguf`` package's reader maps every tensor: seconds)."""
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic).")
        n_tensors, n_kv = struct.unpack_from("<QQ", m, 8)
        pos = 24

        def skip_string(p: int) -> int:
            (n,) = struct.unpack_from("<Q", m, p)
            return p + 8 + n

        def skip_value(p: int, vtype: int) -> int:
            if vtype in fixed:
                return p + fixed[vtype]
            if vtype == 8:
                return skip_string(p)
            if vtype == 9:
                itype, count = struct.unpack_from("<IQ", m, p)
                p += 12
                if itype in fixed:
                    return p + count * fixed[itype]
                for _ in range(count):
                    p = skip_value(p, itype)
                return p
            raise ValueError(f"{path}: unknown GGUF value type {vtype}.")

        for _ in range(n_kv):
            pos = skip_string(pos)
            (vtype,) = struct.unpack_from("<I", m, pos)
            pos = skip_value(pos + 4, vtype)
        for _ in range(n_tensors):
            pos = skip_string(pos)
            (n_dims,) = struct.unpack_from("<I", m, pos)
            pos += 4 + 8 * n_dims + 4 + 8
        return pos


def _gguf_fingerprint(path: str) -> str:
    end = gguf_header_end(path)
    with open(path, "rb") as f:
        header = f.read(end)
    return _digest(b"gguf", header, str(os.path.getsize(path)).encode())


def _files_fingerprint(folder: str) -> str:
    """config.json's bytes plus the name and size of every weight file in ``folder`` (nothing else is read)."""
    chunks = [b"files"]
    config = os.path.join(folder, "config.json")
    if os.path.isfile(config):
        with open(config, "rb") as f:
            chunks.append(f.read())
    for name in sorted(os.listdir(folder)):
        if name.endswith(_WEIGHT_SUFFIXES) and os.path.isfile(os.path.join(folder, name)):
            chunks.append(f"{name}\0{os.path.getsize(os.path.join(folder, name))}".encode())
    return _digest(*chunks)


def _hub_commit(repo: str, kwargs: dict[str, Any]) -> Optional[str]:
    """The commit hash of the hub snapshot ``from_pretrained(repo, **kwargs)`` read its config from (HF cache)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        name = f"{kwargs['subfolder']}/config.json" if kwargs.get("subfolder") else "config.json"
        found = try_to_load_from_cache(repo, name, cache_dir=kwargs.get("cache_dir"),
                                       revision=kwargs.get("revision"))
    except Exception:  # noqa: BLE001 - not a repo id, no cache: no hub fingerprint
        return None
    if not isinstance(found, str):
        return None
    parts = os.path.normpath(found).split(os.sep)
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts[:-1] else None


def model_fingerprint(name_or_path: Any, kwargs: Optional[dict[str, Any]] = None, config: Any = None
                      ) -> dict[str, Optional[str]]:
    """``{"model_fingerprint", "model_fingerprint_kind"}`` of a model loaded by ``from_pretrained(name_or_path,
    **kwargs)``: its GGUF header (``gguf_file``), its folder's files, or its hub commit (``config._commit_hash``)."""
    kwargs = kwargs or {}
    path = str(name_or_path)
    if kwargs.get("subfolder"):
        path = os.path.join(path, str(kwargs["subfolder"]))
    gguf = kwargs.get("gguf_file")
    if gguf:
        file = str(gguf) if os.path.isabs(str(gguf)) else os.path.join(path, str(gguf))
        if os.path.isfile(file):
            return {"model_fingerprint": _gguf_fingerprint(file), "model_fingerprint_kind": "gguf"}
    if os.path.isdir(path):
        return {"model_fingerprint": _files_fingerprint(path), "model_fingerprint_kind": "files"}
    commit = _hub_commit(str(name_or_path), kwargs) or getattr(config, "_commit_hash", None)
    if commit:
        return {"model_fingerprint": f"hub:{name_or_path}@{commit}", "model_fingerprint_kind": "hub"}
    return {"model_fingerprint": None, "model_fingerprint_kind": None}


def _memory_fingerprint(hf_model: Any) -> str:
    """A model built in code: its config and every parameter's name, shape and dtype (values are not hashed)."""
    cfg = hf_model.config.to_dict() if hasattr(hf_model.config, "to_dict") else {}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("transformers_version", "dtype")}
    table = [(n, list(p.shape), str(p.dtype)) for n, p in hf_model.named_parameters()]
    return _digest(b"memory", _json(cfg), _json(table))


def _model_fields(model: Any) -> dict[str, Optional[str]]:
    held = getattr(model, "load_fingerprint", None)  # set by HookedModel.from_pretrained
    if held:
        return dict(held)
    hf = model.hf_model
    found = model_fingerprint(getattr(hf, "name_or_path", "") or "", {}, hf.config)
    if found["model_fingerprint"] is None:
        return {"model_fingerprint": _memory_fingerprint(hf), "model_fingerprint_kind": "memory"}
    return found


# ---------------------------------------------------------------------------------------------- tokenizer
def tokenizer_fingerprint(tokenizer: Any) -> Optional[str]:
    """Hash of what makes a tokenizer tokenise: its serialised backend (vocabulary, merges, normaliser,
    pre-tokeniser, added tokens) or its vocabulary, its special tokens and its padding/truncation sides."""
    if tokenizer is None:
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = (len(tokenizer), id(backend))
    try:
        cached = _TOKENIZER_CACHE.get(tokenizer)
    except TypeError:
        cached = None
    if cached is not None and cached[0] == key:
        body = cached[1]
    else:
        if backend is not None:
            body = _digest(b"backend", backend.to_str().encode())
        else:
            body = _digest(b"vocab", _json(sorted(tokenizer.get_vocab().items())))
        try:
            _TOKENIZER_CACHE[tokenizer] = (key, body)
        except TypeError:
            pass
    special = {str(k): str(v) for k, v in (getattr(tokenizer, "special_tokens_map", None) or {}).items()}
    sides = {"padding_side": getattr(tokenizer, "padding_side", None),
             "truncation_side": getattr(tokenizer, "truncation_side", None),
             "pad_token_id": getattr(tokenizer, "pad_token_id", None)}
    return _digest(b"tokenizer", body.encode(), _json(special), _json(sides))


# ---------------------------------------------------------------------------------------------- dataset
class DatasetDigest:
    """A running hash over part fingerprints in part order: constant memory whatever the number of parts."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(b"dataset\0")
        self._missing = False
        self.n_parts = 0

    def add(self, part_fingerprint: Optional[str]) -> None:
        if part_fingerprint is None:
            self._missing = True
            return
        b = str(part_fingerprint).encode()
        self._h.update(len(b).to_bytes(8, "little"))
        self._h.update(b)
        self.n_parts += 1

    def value(self) -> Optional[str]:
        """``"sha256:<hex>"``, or None when a part had no fingerprint (or there was no part)."""
        return None if self._missing or not self.n_parts else "sha256:" + self._h.hexdigest()


def dataset_fingerprint(part_fingerprints: Iterable[Optional[str]]) -> Optional[str]:
    """The dataset fingerprint over the parts' fingerprints, in part order."""
    d = DatasetDigest()
    for fp in part_fingerprints:
        d.add(fp)
    return d.value()


def part_fingerprint(batches: Sequence[dict[str, Any]]) -> Optional[str]:
    """The fingerprint of one part made of pre-tokenised ``batches`` (the distributed runs' own function)."""
    if not batches:
        return None
    from .distributed.partitions import fingerprint_batches

    return fingerprint_batches(batches)


# ---------------------------------------------------------------------------------------------- all of it
def collect(model: Any, dataset_fingerprint: Optional[str] = None) -> dict[str, Any]:
    """``metadata["provenance"]`` for a run of ``model`` (a HookedModel; a name or None gives versions only)."""
    out: dict[str, Any] = dict(versions())
    out.update(model_fingerprint=None, model_fingerprint_kind=None, tokenizer_fingerprint=None,
               dataset_fingerprint=dataset_fingerprint, dtype=None, device_map=None, attn_implementation=None)
    hf = getattr(model, "hf_model", None)
    if hf is None:
        return out
    out.update(_model_fields(model))
    out["tokenizer_fingerprint"] = tokenizer_fingerprint(getattr(model, "hf_tokenizer", None))
    dtype = getattr(hf, "dtype", None)
    out["dtype"] = None if dtype is None else str(dtype).replace("torch.", "")
    device_map = getattr(hf, "hf_device_map", None)
    out["device_map"] = (json.dumps({str(k): str(v) for k, v in device_map.items()}, sort_keys=True) if device_map
                         else str(model.device))
    out["attn_implementation"] = getattr(hf.config, "_attn_implementation", None)
    return out
