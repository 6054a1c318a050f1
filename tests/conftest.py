"""Session-scoped checkpoint fixtures (built once with transformers under a temporary directory)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import TINY, CheckpointFactory  # noqa: E402


@pytest.fixture(scope="session")
def factory(tmp_path_factory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def tiny(factory):
    """Tiny plain checkpoint (3 layers, 4 heads, n_embd 64, GPT-2 vocab, 128 positions)."""
    return factory.get("tiny", shape=TINY)


@pytest.fixture(scope="session")
def tiny_model(tiny):
    return tiny.model


@pytest.fixture(scope="session")
def short_ctx(factory):
    """Tiny checkpoint with only 16 positions (context-length errors and context-full stops)."""
    return factory.get("short", shape=dict(TINY, n_positions=16), seed=1)
