"""Session-scoped checkpoint fixtures and the ``oracle`` marker.

Checkpoints are written with NumPy (no torch). Tests marked ``oracle`` compare against a live
transformers model; they need the oracle extra (``pip install -e ".[oracle]"``) and are skipped,
with that reason, when torch or transformers is missing.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# In CI (CI set, as .ci/run's runner sets it) hypothesis draws the same examples on every run: a
# submission passes or fails on its code, not on the luck of the draw. Locally it keeps exploring.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hypothesis_settings.load_profile("ci")

from helpers import TINY, CheckpointFactory  # noqa: E402

ORACLE_MODULES = ("torch", "transformers")


def pytest_collection_modifyitems(config, items):
    missing = [m for m in ORACLE_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return
    skip = pytest.mark.skip(reason=f"needs the oracle extra ({' and '.join(missing)} not installed): "
                                   "pip install -e '.[oracle]'")
    for item in items:
        if item.get_closest_marker("oracle"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def factory(tmp_path_factory) -> CheckpointFactory:
    """NumPy-written checkpoints (no torch)."""
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def torch_factory(tmp_path_factory) -> CheckpointFactory:
    """Checkpoints saved by transformers, each with its transformers model (oracle tests only)."""
    return CheckpointFactory(tmp_path_factory.mktemp("torch-checkpoints"), torch=True)


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


@pytest.fixture
def shared_corpus_dir():
    """``../shared/corpus`` beside the repository; the test is skipped, naming it, when absent."""
    from helpers import shared_corpus
    return shared_corpus("train.txt", "valid.txt")
