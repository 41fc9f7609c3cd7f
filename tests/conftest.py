"""Shared fixtures. Tests never download: the Hub is switched to offline mode before anything imports it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.support.tiny_models import TinyPair, make_tiny_pair, make_tiny_tokenizer  # noqa: E402


@pytest.fixture
def tiny_pair(tmp_path: Path) -> Callable[..., TinyPair]:
    """Factory: ``tiny_pair(family="llama", seed=0, shard="post", scale=0.01, dtype=None)`` -> :class:`TinyPair`,
    saved under this test's ``tmp_path`` (see :func:`tests.support.tiny_models.make_tiny_pair`)."""

    def make(family: str = "llama", **kwargs) -> TinyPair:
        return make_tiny_pair(tmp_path, family, **kwargs)

    return make


@pytest.fixture
def llama_pair(tiny_pair) -> TinyPair:
    """An untied tiny Llama pre/post pair; the post directory is sharded."""
    return tiny_pair("llama")


@pytest.fixture
def tiny_tokenizer(tmp_path: Path):
    """The tiny tokenizer of :func:`tests.support.tiny_models.make_tiny_tokenizer`, also saved to
    ``tmp_path / "tokenizer"``."""
    return make_tiny_tokenizer(tmp_path / "tokenizer")


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache in offline mode: fill it with :func:`tests.support.tiny_models.make_fake_hub_repo`; returns
    its path.

    ``HF_HUB_CACHE`` / ``HF_HUB_OFFLINE`` are set in the environment and in ``huggingface_hub.constants`` (which
    reads them once, at import).
    """
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread for every test: tiny models run fastest so, and two threads crawl on a busy two-core machine.

    Processes a test starts set their own (``OMP_NUM_THREADS=1``); a test about thread counts sets them itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
