"""Credentials on a cluster: which options are secrets, what may travel, and when a cached client is stale.

Workers and the index actor take storage credentials from *their own* environment (``AWS_*`` variables, an
instance role, a mounted profile); the driver sends them only the non-secret storage options (endpoint, region,
``anon``...). Secrets given in ``storage_options`` or ``model_kwargs`` are refused by distributed calls unless the
user opts in with ``DistributedExtractor(..., ship_credentials=True)`` (docs/cluster.md says what that costs).
No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from ..errors import ConfigError

#: storage option names that carry a secret (any nesting level, e.g. ``client_kwargs.aws_secret_access_key``)
_SECRET_NAMES = {"key", "secret", "token", "password", "passwd", "session", "credentials", "credential",
                 "access_key", "access_key_id", "secret_key", "secret_access_key", "aws_access_key_id",
                 "aws_secret_access_key", "aws_session_token", "session_token", "security_token", "account_key",
                 "sas_token", "connection_string", "client_secret", "api_key", "private_key", "auth", "headers"}
#: substrings that make any option name a secret (``refresh_token``, ``db_password``...)
_SECRET_PARTS = ("secret", "password", "passwd", "token", "credential", "private_key")
#: fsspec ``token=`` values that name a credential *mode*, not a credential (gcsfs)
_TOKEN_MODES = {"anon", "cloud", "google_default", "browser", "cache"}
#: model kwargs that carry a Hugging Face Hub token
MODEL_SECRET_NAMES = {"token", "use_auth_token", "hf_token"}
#: the environment a worker's storage client reads its credentials from (values and files are fingerprinted)
_CRED_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE",
             "AWS_DEFAULT_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_ROLE_ARN",
             "AWS_WEB_IDENTITY_TOKEN_FILE", "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY",
             "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING")
_CRED_FILES = ("AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
               "GOOGLE_APPLICATION_CREDENTIALS")

HOW_TO = ("Give the cluster its own credentials instead: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and "
          "AWS_SESSION_TOKEN) in the environment of every Ray node (exported before `ray start`, a Kubernetes Secret, "
          "the SLURM job's environment), or use an instance role / a mounted AWS profile; keep only non-secret "
          "options (endpoint_url, region, anon) in storage_options. To send these secrets through Ray anyway, pass "
          "DistributedExtractor(..., ship_credentials=True): they then enter Ray's object store, which may spill to "
          "disk (docs/cluster.md, 'Credentials').")


def _is_secret(name: str, value: Any) -> bool:
    if value is None or value is False or value == "" or value == {}:
        return False
    low = str(name).lower()
    if low == "token" and isinstance(value, str) and value in _TOKEN_MODES:
        return False
    return low in _SECRET_NAMES or any(p in low for p in _SECRET_PARTS)


def secret_paths(options: Optional[dict[str, Any]], prefix: str = "") -> list[str]:
    """Dotted names of the options in ``options`` (nested dicts included) that hold a secret, e.g.
    ``["key", "secret", "client_kwargs.aws_session_token"]``; never their values."""
    out: list[str] = []
    for name, value in (options or {}).items():
        path = f"{prefix}{name}"
        if _is_secret(str(name), value):
            out.append(path)
        elif isinstance(value, dict):
            out.extend(secret_paths(value, f"{path}."))
    return out


def public_options(options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """``options`` without any secret (nested dicts included): what may travel to workers and the index."""
    out: dict[str, Any] = {}
    for name, value in (options or {}).items():
        if _is_secret(str(name), value):
            continue
        out[name] = public_options(value) if isinstance(value, dict) else value
    return out


def check_storage_options(options: Optional[dict[str, Any]], where: str, ship: bool) -> None:
    """Refuse (ConfigError) secrets in ``options`` of storage ``where`` unless ``ship`` (the user's opt-in)."""
    found = secret_paths(options)
    if found and not ship:
        raise ConfigError(f"the storage_options of {where} hold credentials ({', '.join(found)}); a distributed run "
                          f"does not send secrets to its workers or its index. {HOW_TO}")


def check_model_kwargs(kwargs: Optional[dict[str, Any]], ship: bool) -> None:
    """Refuse (ConfigError) a Hub token in ``model_kwargs``: it would travel in every worker's creation args."""
    found = sorted(k for k, v in (kwargs or {}).items() if k in MODEL_SECRET_NAMES and v not in (None, False, ""))
    if found and not ship:
        raise ConfigError(f"model_kwargs hold a Hugging Face token ({', '.join(found)}); it would travel in every "
                          "worker's creation arguments. Set HF_TOKEN in the environment of every Ray node (or run "
                          "`hf auth login` there) instead, or pass ship_credentials=True to send it anyway.")


def credential_fingerprint(options: Optional[dict[str, Any]] = None) -> str:
    """A digest of every credential a storage client built now in this process would use: the secrets in
    ``options`` and the credential environment (variables, and the size/mtime of the files they name or
    ``~/.aws/{credentials,config}``). A cached client is stale when this changes (rotated keys). Only the digest
    leaves this function; it is kept in memory, never logged or stored."""
    h = hashlib.sha256()
    secrets = {p: _lookup(options or {}, p) for p in secret_paths(options)}
    h.update(json.dumps(secrets, sort_keys=True, default=repr).encode())
    for name in _CRED_ENV:
        h.update(f"\0{name}={os.environ.get(name, '')}".encode())
    files = [os.environ.get(n) for n in _CRED_FILES] + [os.path.expanduser("~/.aws/credentials"),
                                                          os.path.expanduser("~/.aws/config")]
    for path in files:
        if not path:
            continue
        try:
            st = os.stat(path)
            h.update(f"\0{path}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"\0{path}:-".encode())
    return h.hexdigest()


def _lookup(options: dict[str, Any], path: str) -> Any:
    value: Any = options
    for part in path.split("."):
        value = value[part]
    return value
