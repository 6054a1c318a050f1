"""Public Python entry points reject inputs of the wrong shape, type or range with a one-line
MinadeptError naming the argument (instead of truncating floats, flattening 2-D ids, accepting a
cache of another model ...), and integer inputs of every NumPy integer type keep working with the
same results as a plain list of ints. NumPy-built models only (tests/randmodel.py)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from minadept import Engine, Model
from minadept.cache import KVCache
from minadept.errors import MinadeptError
from minadept.exits.adept import load_adept
from minadept.exits.policies import make_policy
from minadept.generate import generate, prepare_prompt
from minadept.sampling import SamplingSettings

from randmodel import random_model

L, V, N_POS = 4, 97, 64
MODEL = random_model(n_layer=L, vocab_size=V, n_positions=N_POS, seed=3)
OTHER = {"n_layer": random_model(n_layer=3, vocab_size=V, n_positions=N_POS),
         "n_head": random_model(n_layer=L, n_head=4, vocab_size=V, n_positions=N_POS),
         "head_dim": random_model(n_layer=L, n_head=2, n_embd=16, vocab_size=V, n_positions=N_POS)}
PROMPT = [5, 17, 3, 96, 0, 42, 8]
GREEDY = SamplingSettings(temperature=0)


def _raises(fn, fragment):
    with pytest.raises(MinadeptError) as e:
        fn()
    msg = str(e.value)
    assert fragment in msg, msg
    assert "\n" not in msg
    return msg


def _gen(*args, **kw):
    kw = {"max_new_tokens": 3, "sampling": GREEDY, "rng": np.random.default_rng(0), **kw}
    return list(generate(*args, **kw))


# ----------------------------------------------------------------------------- Engine.forward

@pytest.mark.parametrize("ids,fragment", [
    ([1.7, 2.0], "ids must be integer token ids"),
    (np.array([1.0, 2.0]), "ids must be integer token ids"),
    (np.array([1.0, 2.0], np.float32), "ids must be integer token ids"),
    ([True, False], "ids must be integer token ids"),
    ([1, True], "ids must be integer token ids"),
    (np.array([1, 0], bool), "ids must be integer token ids"),
    (["1", "2"], "ids must be integer token ids"),
    ([1, None], "ids must be integer token ids"),
    ([2 ** 70], "ids must be integer token ids"),
    ("12", "ids must be a 1-D sequence of token ids"),
    (None, "ids must be a 1-D sequence of token ids"),
    (5, "ids must be a 1-D sequence of token ids"),
    (np.zeros((2, 3), np.int64), "ids must be a 1-D sequence of token ids"),
    ([[1, 2], [3, 4]], "ids must be a 1-D sequence of token ids"),
    ([[1, 2], [3]], "ids must be a 1-D sequence of token ids"),
    ([], "no tokens to run"),
    (np.array([], np.int64), "no tokens to run"),
    ([-1], "token id out of range [0, 97)"),
    ([3, V], "token id out of range [0, 97)"),
    (np.array([2 ** 63 + 5], np.uint64), "token id out of range [0, 97)"),
])
def test_forward_rejects_bad_ids(ids, fragment):
    eng = Engine(MODEL)
    cache = eng.new_cache(16)
    _raises(lambda: eng.forward(ids, cache), fragment)
    assert cache.length == 0


@pytest.mark.parametrize("ids", [[1.0], [True], np.array([[3]]), [-1], [V]])
def test_forward_rejects_bad_single_token(ids):
    """The decode (one token) path checks the same things as prefill."""
    eng = Engine(MODEL)
    cache = eng.new_cache(16)
    eng.forward(PROMPT, cache)
    with pytest.raises(MinadeptError):
        eng.forward(ids, cache)
    assert cache.length == len(PROMPT)


@pytest.mark.parametrize("which", sorted(OTHER))
def test_forward_rejects_a_cache_of_another_model_shape(which):
    eng = Engine(MODEL)
    cache = Engine(OTHER[which]).new_cache(16)
    msg = _raises(lambda: eng.forward(PROMPT, cache), "cache is for another model shape")
    assert which in msg


@pytest.mark.parametrize("cache,fragment", [
    (None, "cache must be a KVCache"),
    (np.zeros((L, 2, 2, 16, 16), np.float32), "cache must be a KVCache"),
    ({}, "cache must be a KVCache"),
])
def test_forward_rejects_a_non_cache(cache, fragment):
    _raises(lambda: Engine(MODEL).forward(PROMPT, cache), fragment)


@pytest.mark.parametrize("kw,fragment", [
    (dict(all_logits="yes"), "all_logits must be a bool"),
    (dict(all_logits="False"), "all_logits must be a bool"),
    (dict(all_logits=None), "all_logits must be a bool"),
    (dict(all_logits=np.array([True, False])), "all_logits must be a bool"),
    (dict(record_hidden="no"), "record_hidden must be a bool"),
    (dict(record_hidden=[1]), "record_hidden must be a bool"),
    (dict(step=-1), "step must be an integer >= 0"),
    (dict(step=1.5), "step must be an integer >= 0"),
    (dict(step="2"), "step must be an integer >= 0"),
    (dict(step=True), "step must be an integer >= 0"),
    (dict(step=None), "step must be an integer >= 0"),
])
def test_forward_rejects_bad_options(kw, fragment):
    eng = Engine(MODEL)
    _raises(lambda: eng.forward(PROMPT, eng.new_cache(16), **kw), fragment)


INT_FORMS = [
    ("tuple", tuple),
    ("range-like list of np.int64", lambda ids: [np.int64(i) for i in ids]),
    ("list of np.int32", lambda ids: [np.int32(i) for i in ids]),
    ("int64 array", lambda ids: np.array(ids, np.int64)),
    ("int32 array", lambda ids: np.array(ids, np.int32)),
    ("int16 array", lambda ids: np.array(ids, np.int16)),
    ("uint8 array", lambda ids: np.array(ids, np.uint8)),
    ("uint64 array", lambda ids: np.array(ids, np.uint64)),
    ("non-contiguous int64", lambda ids: np.repeat(np.array(ids, np.int64), 2)[::2]),
]


@pytest.mark.parametrize("name,form", INT_FORMS, ids=[n for n, _ in INT_FORMS])
@pytest.mark.parametrize("all_logits", [True, False, np.bool_(True)])
def test_integer_id_types_give_identical_logits(name, form, all_logits):
    eng = Engine(MODEL)
    want = eng.forward(PROMPT, eng.new_cache(16), all_logits=bool(all_logits))
    got = eng.forward(form(PROMPT), eng.new_cache(16), all_logits=all_logits)
    np.testing.assert_array_equal(got.logits, want.logits)
    np.testing.assert_array_equal(got.exit_layers, want.exit_layers)


@pytest.mark.parametrize("token", [7, np.int64(7), np.int32(7), np.uint8(7)])
@pytest.mark.parametrize("wrap", [list, lambda t: np.array(t)])
def test_integer_types_on_the_decode_path(token, wrap):
    eng = Engine(MODEL, make_policy("fixed", MODEL.config, exit_layer=np.int64(2)))
    ref_cache, cache = eng.new_cache(16), eng.new_cache(16)
    eng.forward(PROMPT, ref_cache)
    eng.forward(np.array(PROMPT, np.int32), cache)
    want = eng.forward([7], ref_cache, step=1)
    got = eng.forward(wrap([token]), cache, step=np.int64(1))
    np.testing.assert_array_equal(got.logits, want.logits)
    np.testing.assert_array_equal(cache.kv, ref_cache.kv)


# ----------------------------------------------------------------------------- Engine(...), new_cache

@pytest.mark.parametrize("args,kw,fragment", [
    (("not a model",), {}, "model must be a minadept Model"),
    ((None,), {}, "model must be a minadept Model"),
    ((MODEL, "confidence"), {}, "policy must be an exit Policy"),
    ((MODEL, 0.9), {}, "policy must be an exit Policy"),
    ((MODEL,), dict(kv=["propagate"]), "unknown --kv"),
    ((MODEL,), dict(kv=np.array(["propagate"])), "unknown --kv"),
    ((MODEL,), dict(fill=None), "unknown --kv-fill"),
    ((MODEL,), dict(exit_mapper="identity"), "exit_mapper must be callable"),
    ((MODEL,), dict(kv_maps="maps"), "kv_maps must be an AdeptParams"),
    ((MODEL,), dict(mapper_flops=5), "mapper_flops must be a pair of integers"),
    ((MODEL,), dict(mapper_flops=(1.5, 0)), "mapper_flops must be a pair of integers"),
    ((MODEL,), dict(mapper_flops=(1, 2, 3)), "mapper_flops must be a pair of integers"),
])
def test_engine_rejects_bad_arguments(args, kw, fragment):
    _raises(lambda: Engine(*args, **kw), fragment)


@pytest.mark.parametrize("n_ctx", [3.5, 16.0, "16", True, [16]])
def test_new_cache_rejects_a_non_integer_size(n_ctx):
    _raises(lambda: Engine(MODEL).new_cache(n_ctx), "cache size must be an integer")


@pytest.mark.parametrize("n_ctx", [16, np.int64(16), np.int32(16), None])
def test_new_cache_accepts_integer_sizes(n_ctx):
    eng = Engine(MODEL)
    c = eng.new_cache(n_ctx)
    n = N_POS if n_ctx is None else 16
    assert isinstance(c, KVCache) and c.n_ctx == n and c.length == 0
    eng.forward([1] * n, c)                               # exactly n positions fit ...
    assert c.length == n
    _raises(lambda: eng.forward([1], c), "context")      # ... and not one more


# ----------------------------------------------------------------------------- generate / prepare_prompt

@pytest.mark.parametrize("kw,fragment", [
    (dict(max_new_tokens=2.5), "--max-new-tokens must be an integer >= 0"),
    (dict(max_new_tokens="3"), "--max-new-tokens must be an integer >= 0"),
    (dict(max_new_tokens=True), "--max-new-tokens must be an integer >= 0"),
    (dict(max_new_tokens=None), "--max-new-tokens must be an integer >= 0"),
    (dict(max_new_tokens=-1), "--max-new-tokens must be"),
    (dict(sampling=None), "sampling must be a SamplingSettings"),
    (dict(sampling={"temperature": 0}), "sampling must be a SamplingSettings"),
    (dict(rng=0), "rng must be a numpy Generator"),
    (dict(rng=np.random.RandomState(0)), "rng must be a numpy Generator"),
    (dict(rng=None), "rng must be a numpy Generator"),
    (dict(eot_id=V), "eot_id must be a token id in [0, 97)"),
    (dict(eot_id=-1), "eot_id must be a token id in [0, 97)"),
    (dict(eot_id=3.0), "eot_id must be a token id in [0, 97)"),
    (dict(eot_id="50256"), "eot_id must be a token id in [0, 97)"),
    (dict(eot_id=True), "eot_id must be a token id in [0, 97)"),
    (dict(state=[]), "state must be a Generation"),
])
def test_generate_rejects_bad_arguments(kw, fragment):
    _raises(lambda: _gen(Engine(MODEL), PROMPT, **kw), fragment)


def test_generate_rejects_a_non_engine():
    _raises(lambda: _gen(MODEL, PROMPT), "engine must be an Engine")


@pytest.mark.parametrize("prompt,fragment", [
    ([1.7, 2], "prompt_ids must be integer token ids"),
    (np.array([1.0, 2.0]), "prompt_ids must be integer token ids"),
    ([1, True], "prompt_ids must be integer token ids"),
    (["1", "2"], "prompt_ids must be integer token ids"),
    ([1, None], "prompt_ids must be integer token ids"),
    ("Once upon a time", "prompt_ids must be a sequence of integer token ids"),
    (b"12", "prompt_ids must be a sequence of integer token ids"),
    (7, "prompt_ids must be a sequence of integer token ids"),
    (np.zeros((2, 2), np.int64), "prompt_ids must be a 1-D sequence of token ids"),
    ([-1, 3], "token id out of range [0, 97)"),
    ([3, V], "token id out of range [0, 97)"),
])
def test_prompt_ids_are_checked(prompt, fragment):
    _raises(lambda: prepare_prompt(Engine(MODEL), prompt), fragment)
    _raises(lambda: _gen(Engine(MODEL), prompt), fragment)


@pytest.mark.parametrize("name,form", INT_FORMS + [("generator", lambda ids: (i for i in ids))],
                         ids=[n for n, _ in INT_FORMS] + ["generator"])
def test_generate_with_integer_prompt_types_matches_the_list_call(name, form):
    eng = Engine(MODEL)
    want = [s.token for s in _gen(eng, PROMPT, max_new_tokens=5, eot_id=None)]
    got = [s.token for s in _gen(eng, form(PROMPT), max_new_tokens=np.int64(5), eot_id=np.int32(96))]
    if 96 in want:
        want = want[:want.index(96) + 1]
    assert got == want
    ids = prepare_prompt(eng, form(PROMPT))
    assert ids == PROMPT and all(type(i) is int for i in ids)


# ----------------------------------------------------------------------------- Model.load, load_adept

@pytest.mark.parametrize("source,fragment", [
    (5, "model source must be"),
    (3.5, "model source must be"),
    (["gpt2"], "model source must be"),
    (b"gpt2", "model source must be"),
    ("", "model source must be"),
])
def test_model_load_rejects_a_non_path(source, fragment):
    _raises(lambda: Model.load(source), fragment)


def test_model_load_rejects_a_non_bool_tokenizer(tmp_path):
    _raises(lambda: Model.load(tmp_path, tokenizer="no"), "tokenizer must be a bool")


@pytest.mark.parametrize("path", [5, None, 2.0, ["adept.safetensors"]])
def test_load_adept_rejects_a_non_path(path):
    _raises(lambda: load_adept(path, MODEL.config), "ADEPT policy path must be")


@pytest.mark.parametrize("config", [None, {"n_layer": 4}, MODEL])
def test_load_adept_rejects_a_non_config(tmp_path, config):
    _raises(lambda: load_adept(tmp_path, config), "config must be a GPT2Config")


def test_load_adept_still_accepts_str_and_pathlike(tmp_path):
    for p in (tmp_path, str(tmp_path), os.fspath(tmp_path)):
        _raises(lambda: load_adept(p, MODEL.config), "no calibrated ADEPT policy")


# ----------------------------------------------------------------------------- make_policy

@pytest.mark.parametrize("name,kw,fragment", [
    ("confidence", dict(threshold="0.9"), "--threshold must be a number in [0, 1]"),
    ("confidence", dict(threshold=True), "--threshold must be a number in [0, 1]"),
    ("confidence", dict(threshold=[0.9]), "--threshold must be a number in [0, 1]"),
    ("fixed", dict(exit_layer=3.5), "--exit-layer must be an integer in [1, 4]"),
    ("fixed", dict(exit_layer=2.0), "--exit-layer must be an integer in [1, 4]"),
    ("fixed", dict(exit_layer="2"), "--exit-layer must be an integer in [1, 4]"),
    ("fixed", dict(exit_layer=True), "--exit-layer must be an integer in [1, 4]"),
    ("margin", dict(min_exit_layer=1.5), "--min-exit-layer must be an integer in [1, 4]"),
    ("margin", dict(min_exit_layer="2"), "--min-exit-layer must be an integer in [1, 4]"),
    ("saturation", dict(schedule=["decay"]), "unknown threshold schedule"),
    ("saturation", dict(schedule="decay", horizon=2.5), "horizon must be an integer >= 1"),
    ("saturation", dict(schedule="decay", horizon="128"), "horizon must be an integer >= 1"),
    ("adept", dict(adept="adept.safetensors"), "adept must be an AdeptParams"),
    (["confidence"], {}, "exit policy name must be a str"),
    (None, {}, "exit policy name must be a str"),
    (3, {}, "exit policy name must be a str"),
])
def test_make_policy_rejects_bad_types(name, kw, fragment):
    _raises(lambda: make_policy(name, MODEL.config, **kw), fragment)


def test_make_policy_rejects_a_non_config():
    _raises(lambda: make_policy("confidence", MODEL), "config must be a GPT2Config")


@pytest.mark.parametrize("name,kw", [
    ("fixed", dict(exit_layer=np.int64(2))),
    ("fixed", dict(exit_layer=np.int32(4))),
    ("confidence", dict(threshold=1)),
    ("confidence", dict(threshold=np.float32(0.5), min_exit_layer=np.int64(2))),
    ("margin", dict(threshold=np.float64(0.3), schedule="decay", horizon=np.int64(16))),
    ("saturation", dict(threshold=0)),
])
def test_make_policy_accepts_numeric_types(name, kw):
    """NumPy scalars behave exactly as the plain Python number: same exits and logits."""
    pol = make_policy(name, MODEL.config, **kw)
    plain = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in kw.items()}
    a = Engine(MODEL, pol).forward(PROMPT, Engine(MODEL).new_cache(16), all_logits=True)
    b = Engine(MODEL, make_policy(name, MODEL.config, **plain)).forward(PROMPT, Engine(MODEL).new_cache(16),
                                                                       all_logits=True)
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
    np.testing.assert_array_equal(a.logits, b.logits)
    if name == "fixed":
        assert (a.exit_layers == int(kw["exit_layer"])).all()
