"""Shared fixtures. Unit tests use a tiny random Llama with the real SmolLM2 tokenizer (so chat formatting is the
real one); a few integration tests use the real default model (converted once into the cache)."""
from __future__ import annotations

import os

import pytest
import torch

# One thread: several test processes share 2 cores here, and OpenMP spin-waiting makes oversubscription slow.
torch.set_num_threads(int(os.environ.get("UNLEARNKIT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tokenizer():
    from unlearnkit.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def make_tiny_model(tokenizer):
    """Factory: a tiny random-initialised Llama-architecture model sharing the real tokenizer's vocabulary."""
    from unlearnkit.models import tiny_llama

    def make(layers: int = 4, hidden: int = 32, seed: int = 0, kv_heads: int | None = None):
        return tiny_llama(vocab_size=len(tokenizer), hidden=hidden, layers=layers, heads=4, seed=seed,
                          kv_heads=kv_heads)

    return make


@pytest.fixture
def tiny_model(make_tiny_model):
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, make_tiny_model, tokenizer):
    """A tiny model saved in HF format (safetensors + tokenizer), for CLI tests."""
    from unlearnkit.models import save_model

    path = tmp_path_factory.mktemp("models") / "tiny"
    save_model(make_tiny_model(), tokenizer, path)
    return path


@pytest.fixture(scope="session")
def real_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session. Do not train it in place."""
    from unlearnkit.models import load_model

    return load_model(dtype="fp32", device="cpu")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a command gets as far as loading model weights."""
    import unlearnkit.models

    def refuse(*a, **k):
        raise AssertionError("model weights were loaded before the input was checked")

    monkeypatch.setattr(unlearnkit.models, "load_model", refuse)
