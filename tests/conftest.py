"""Shared fixtures: tiny models built in code, and the path to the shared WikiText-2 data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WIKITEXT_TEST = SHARED_DATA / "wikitext-2" / "test.txt"


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M from the embedded GGUF (converted once into the cache, then loaded in seconds)."""
    from attnsparse.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved default tiny Llama with the character tokenizer, loadable by path (read-only for tests)."""
    from attnsparse.tiny import save_tiny

    return Path(save_tiny(str(tmp_path_factory.mktemp("tiny") / "model")))


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a shared 2-core machine a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
