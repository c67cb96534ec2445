"""Test-wide guards: offline Hugging Face, no network beyond loopback, quiet tokenizers."""

import os
import socket
import tempfile

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Tests never read or fill the user's digest cache (~/.cache/hallu/digests).
os.environ["HALLU_CACHE_DIR"] = tempfile.mkdtemp(prefix="hallu-test-cache-")

_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        raise OSError(f"tests may not reach the network (tried {address!r})")
    return _real_connect(self, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    if hasattr(socket, "AF_UNIX"):
        monkeypatch.setattr(socket.socket, "connect", _loopback_only)
    yield
