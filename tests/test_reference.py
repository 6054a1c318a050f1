"""The plain reference forward (``minadept.reference.forward``): it equals transformers (through
the committed golden fixture, and live under the oracle marker), and the engine with no exit
policy equals it bit for bit on the NumPy backend and within 1e-4 on the compiled one."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from randmodel import random_model

from minadept import Engine, Model, backend
from minadept import reference as R

GOLDEN = Path(__file__).parent / "data" / "golden"


def _engine_logits(model, ids, name):
    with backend.using(name):
        e = Engine(model)
        return e.forward(ids, e.new_cache(len(ids)), all_logits=True).logits


def test_reference_forward_matches_the_transformers_fixture():
    golden = np.load(GOLDEN / "golden.npz")
    model = Model.load(GOLDEN / "model", tokenizer=False)
    got = R.forward(model, golden["input_ids"])
    d = float(np.abs(got - golden["logits"]).max())
    assert d <= 1e-4, f"reference.forward vs transformers: max abs diff {d:.3g}"


@settings(deadline=None, max_examples=15)
@given(shape=st.sampled_from([(2, 2, 16), (3, 4, 36), (4, 3, 48), (2, 5, 40)]), T=st.integers(1, 30),
       seed=st.integers(0, 2**16))
def test_engine_without_exits_equals_the_reference_bit_for_bit(shape, T, seed):
    n_layer, n_head, n_embd = shape                       # head sizes 8, 9, 16, 8
    model = random_model(n_layer=n_layer, n_head=n_head, n_embd=n_embd, seed=seed)
    ids = np.random.default_rng(seed).integers(0, model.config.vocab_size, T)
    want = R.forward(model, ids)
    got = _engine_logits(model, ids, "numpy")
    assert np.array_equal(got, want), f"max abs diff {np.abs(got - want).max():.3g}"


def test_engine_on_the_fast_backend_is_within_1e4_of_the_reference():
    try:
        backend.select("fast")
    except Exception:
        pytest.skip("the compiled extension is not built")
    model = Model.load()
    ids = model.tokenizer.encode("Once upon a time there was a little fox who lived by the sea.")
    d = float(np.abs(_engine_logits(model, ids, "fast") - R.forward(model, ids)).max())
    assert d <= 1e-4, f"fast engine vs reference: max abs diff {d:.3g}"


def test_reference_never_consults_the_backend():
    src = (Path(R.__file__)).read_text(encoding="utf-8")
    assert "backend" not in src.split('"""', 2)[2], "reference.py must be plain NumPy"


@pytest.mark.oracle
def test_reference_forward_matches_transformers_live():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=500, n_positions=64,
                                     initializer_range=0.1)).eval()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        ref.save_pretrained(d)
        model = Model.load(d, tokenizer=False)
    ids = np.random.default_rng(0).integers(0, 500, 40)
    with torch.no_grad():
        want = ref(torch.tensor([ids.tolist()])).logits[0].numpy()
    d = float(np.abs(R.forward(model, ids) - want).max())
    assert d <= 1e-4, f"reference.forward vs transformers: max abs diff {d:.3g}"


@pytest.mark.parametrize("ids, msg", [([-1], "token id out of range"), ([99999], "token id out of range"),
                                      ([1.5], "must be integer token ids"), ([], "takes 1 to {n}"),
                                      ("n + 1 ids", "takes 1 to {n}")])
def test_reference_forward_rejects_bad_ids(ids, msg):
    """Bad ids, and none or more than the context (n_positions of the embedded model), are errors."""
    from minadept.errors import MinadeptError
    model = Model.load()
    n = model.config.n_positions
    ids = list(range(n + 1)) if ids == "n + 1 ids" else ids
    with pytest.raises(MinadeptError, match=msg.format(n=n)):
        R.forward(model, ids)
