"""minadept against committed reference outputs (llm.c style), without torch.

``tests/data/golden/`` holds a tiny random GPT-2 saved by transformers and, made by
``tests/data/make_golden.py`` (oracle extra):

- ``golden.npz``, the ORACLE: transformers' hidden states, K/V cache, logits, greedy continuation
  (tokens, per-step logits, decoded text), the K/V of skipped layers computed with transformers'
  own ``ln_1`` / ``c_attn`` modules from an exit state, and the same weights under the exact erf
  GELU. minadept must reproduce these within the tolerances below.
- ``pins.npz`` and ``dump_fixed2_lazy.npz``, REGRESSION PINS: minadept's own early-exit outputs and
  a ``minadept dump`` file. transformers has no early exit, so these are not an oracle: they pin
  today's numerics and the dump format against accidental change (regenerate on purpose).

Tolerances are the constants below (float32 on both sides; measured differences are ~4e-6 on the
logits, so each leaves room for BLAS and kernel round-off but not for a wrong formula).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import cli_env, max_abs, minadept_greedy, run_cli

from minadept import backend
from minadept.checkpoint import default_model_dir
from minadept.dump import FORMAT_VERSION, dump_arrays
from minadept.engine import Engine
from minadept.exits.policies import make_policy
from minadept.exits.propagate import propagate_kv, propagate_kv_loop
from minadept.generate import generate
from minadept.model import Model
from minadept.sampling import SamplingSettings

GOLDEN = Path(__file__).resolve().parent / "data" / "golden"
REGENERATE = "regenerate with: pip install -e '.[oracle]' && python tests/data/make_golden.py"

#: logits (|logits| <= 6) vs transformers, prompt and every greedy step; measured <= 4e-6
LOGITS_ATOL = 1e-4
#: hidden states and K/V (|values| <= 5) vs transformers; measured <= 3.4e-6
STATE_ATOL = 5e-5
#: propagated K/V vs transformers' ln_1 + c_attn applied to the same exit state; measured 1e-6
PROP_ATOL = 1e-5
#: regression pins: minadept today vs minadept when the pins were made (either backend)
PIN_ATOL = 2e-5

BACKENDS = ["numpy"] + (["fast"] if backend._load_fast() is not None else [])


@pytest.fixture(params=BACKENDS)
def kernels(request):
    """Run the test under each available backend (NumPy reference, compiled kernels)."""
    backend.use(request.param)
    yield request.param
    backend.use(None)


@pytest.fixture(scope="module")
def golden():
    g = dict(np.load(GOLDEN / "golden.npz"))
    assert int(g["format_version"]) == 1, f"unknown golden format {g['format_version']}; {REGENERATE}"
    return g


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, golden):
    """The golden checkpoint plus the embedded model's tokenizer (not duplicated in tests/data)."""
    tok = default_model_dir() / "tokenizer.json"
    assert hashlib.sha256(tok.read_bytes()).hexdigest() == str(golden["tokenizer_sha256"]), \
        f"weights/minigpt2-stories/tokenizer.json changed since the fixtures were made; {REGENERATE}"
    d = tmp_path_factory.mktemp("golden") / "model"
    shutil.copytree(GOLDEN / "model", d)
    shutil.copyfile(tok, d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return Model.load(model_dir)


def ids_of(golden):
    return golden["input_ids"].tolist()


# ----------------------------------------------------------------------------- oracle: transformers

def test_fixture_matches_its_model(golden, model):
    cfg = model.config
    L, H, C, V = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size
    T = len(golden["input_ids"])
    assert json.loads(str(golden["shape_json"]))["n_embd"] == C and C // H == 9   # head size not a multiple of 4
    assert golden["hidden_states"].shape == (L + 1, T, C)
    assert golden["kv"].shape == (L, 2, H, T, C // H)
    assert golden["logits"].shape == (T, V)
    assert golden["greedy_step_logits"].shape == (len(golden["greedy_tokens"]), V)
    k = int(golden["prop_exit_layer"])
    assert golden["prop_kv"].shape == (L - k, 2, H, T, C // H)
    assert model.tokenizer.encode(str(golden["prompt"])) == ids_of(golden)


def test_logits_match_transformers(golden, model, kernels):
    engine = Engine(model)
    got = engine.forward(ids_of(golden), engine.new_cache(), all_logits=True).logits
    d = max_abs(got, golden["logits"])
    print(f"[{kernels}] max |logits - transformers| = {d:.3g}")
    assert got.shape == golden["logits"].shape and got.dtype == np.float32
    assert d <= LOGITS_ATOL, f"[{kernels}] prompt logits vs transformers: max abs diff {d:.3g}"


def test_hidden_states_and_kv_match_transformers(golden, model, kernels):
    """Every hidden state (the last one before ln_f, as in minadept's dump; transformers' own last
    entry is after ln_f and is checked through ln_f) and every layer's K and V."""
    from minadept.model import final_norm
    d = dump_arrays(Engine(model), ids_of(golden))
    for l, (ours, ref) in enumerate(zip(d["hidden_states"], golden["hidden_states"])):
        diff = max_abs(ours, ref)
        assert diff <= STATE_ATOL, f"[{kernels}] hidden_states[{l}] vs transformers: max abs diff {diff:.3g}"
    diff = max_abs(final_norm(model.params, d["hidden_states"][-1], model.config), golden["hidden_states_hf_last"])
    assert diff <= STATE_ATOL, f"[{kernels}] ln_f(h_L) vs transformers' last hidden state: {diff:.3g}"
    for l in range(model.config.n_layer):
        for j, name in enumerate("KV"):
            diff = max_abs(d["kv"][l, j], golden["kv"][l, j])
            assert diff <= STATE_ATOL, f"[{kernels}] {name} of layer {l + 1} vs transformers: {diff:.3g}"


def test_greedy_tokens_step_logits_and_text_match_transformers(golden, model, kernels):
    ids = ids_of(golden)
    ref = golden["greedy_tokens"].tolist()
    tokens, steps = minadept_greedy(model, ids, len(ref))
    d = max_abs(steps, golden["greedy_step_logits"])
    assert tokens == ref, f"[{kernels}] greedy tokens differ (step logits max diff {d:.3g}):\nours {tokens}\nref  {ref}"
    assert d <= LOGITS_ATOL, f"[{kernels}] per-step decode logits vs transformers: max abs diff {d:.3g}"
    tok = model.tokenizer
    assert tok.decode(ids + tokens) == str(golden["greedy_text"])
    assert tok.decode(tokens) == str(golden["greedy_new_text"])
    stream = tok.stream()
    assert "".join(stream.step(t) for t in tokens) + stream.finish() == str(golden["greedy_new_text"])


def test_propagated_kv_matches_transformers_modules(golden, model):
    """K/V of the skipped blocks k+1..L from the exit state h_k: minadept's batched propagation and
    its per-layer twin against transformers' own ``h[l].ln_1`` and ``h[l].attn.c_attn``, on the
    same h_k (transformers' hidden state)."""
    k, L = int(golden["prop_exit_layer"]), model.config.n_layer
    h_k = golden["hidden_states"][k]
    for fn in (propagate_kv, propagate_kv_loop):
        got = fn(model, h_k, k)
        assert got.shape == golden["prop_kv"].shape, fn.__name__
        d = max_abs(got, golden["prop_kv"])
        assert d <= PROP_ATOL, f"{fn.__name__} vs transformers ln_1 + c_attn: max abs diff {d:.3g}"


def test_engine_cache_after_an_exit_matches_transformers(golden, model, kernels):
    """Every prompt token exits at k (``fixed``): the engine's cache holds transformers' K/V below k
    and transformers-module propagated K/V from k+1 on, eager and lazy (after a flush)."""
    k = int(golden["prop_exit_layer"])
    for fill in ("eager", "lazy"):
        engine = Engine(model, make_policy("fixed", model.config, exit_layer=k), fill=fill)
        cache = engine.new_cache()
        r = engine.forward(ids_of(golden), cache, all_logits=True)
        engine.flush(cache)
        T = len(golden["input_ids"])
        assert (r.exit_layers == k).all()
        d_low = max_abs(cache.kv[:k, :, :, :T], golden["kv"][:k])
        d_prop = max_abs(cache.kv[k:, :, :, :T], golden["prop_kv"])
        assert d_low <= STATE_ATOL, f"[{kernels}/{fill}] K/V of blocks 1..{k}: {d_low:.3g}"
        assert d_prop <= STATE_ATOL, f"[{kernels}/{fill}] propagated K/V of blocks {k + 1}..: {d_prop:.3g}"


def test_exact_erf_gelu_matches_transformers(golden, model_dir, tmp_path, kernels):
    """The same weights with ``activation_function: gelu`` (exact erf GELU in transformers)."""
    d = tmp_path / "erf"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["activation_function"] = "gelu"
    (d / "config.json").write_text(json.dumps(cfg))
    m = Model.load(d)
    assert m.config.gelu == "erf"
    ids = ids_of(golden)
    dump = dump_arrays(Engine(m), ids)
    for l, (ours, ref) in enumerate(zip(dump["hidden_states"], golden["erf_hidden_states"])):
        diff = max_abs(ours, ref)
        assert diff <= STATE_ATOL, f"[{kernels}] erf GELU hidden_states[{l}]: max abs diff {diff:.3g}"
    diff = max_abs(dump["logits"][-1], golden["erf_last_logits"])
    assert diff <= LOGITS_ATOL, f"[{kernels}] erf GELU last logits: max abs diff {diff:.3g}"
    tokens, _ = minadept_greedy(m, ids, len(golden["erf_greedy_tokens"]))
    assert tokens == golden["erf_greedy_tokens"].tolist()


# ----------------------------------------------------------------------------- regression pins (minadept)

@pytest.fixture(scope="module")
def pins():
    p = dict(np.load(GOLDEN / "pins.npz"))
    assert int(p["format_version"]) == 1
    return p


PIN_NAMES = ["fixed2_eager", "fixed2_lazy", "saturation_eager", "saturation_lazy", "confidence_eager"]


@pytest.mark.parametrize("name", PIN_NAMES)
def test_early_exit_regression_pins(golden, pins, model, name, kernels):
    """REGRESSION PIN, not an oracle: exit layers exactly, and logits / K/V within PIN_ATOL of
    minadept's outputs when the pins were made, under the same policy and fill."""
    settings = json.loads(str(pins[f"{name}/policy"]))
    policy, fill = settings.pop("exit"), settings.pop("kv_fill")
    engine = Engine(model, make_policy(policy, model.config, **settings), fill=fill)
    ids = ids_of(golden)
    cache = engine.new_cache()
    r = engine.forward(ids, cache, all_logits=True)
    engine.flush(cache)
    T, stride = len(ids), int(pins["col_stride"])
    assert r.exit_layers.tolist() == pins[f"{name}/exit_layers"].tolist(), f"[{kernels}] {name}: prompt exit layers"
    assert r.logits.argmax(-1).tolist() == pins[f"{name}/argmax"].tolist()
    for key, got in (("logits_last", r.logits[-1]), ("logits_cols", r.logits[:, ::stride]),
                     ("kv", cache.kv[:, :, :, :T])):
        d = max_abs(got, pins[f"{name}/{key}"])
        assert d <= PIN_ATOL, f"[{kernels}] {name}: {key} moved from the pin by {d:.3g}"
    steps = list(generate(engine, ids, max_new_tokens=len(pins[f"{name}/tokens"]),
                          sampling=SamplingSettings(temperature=0), rng=np.random.default_rng(0), eot_id=None))
    assert [s.token for s in steps] == pins[f"{name}/tokens"].tolist(), f"[{kernels}] {name}: greedy tokens"
    assert [int(s.result.exit_layers[-1]) for s in steps] == pins[f"{name}/token_exit_layers"].tolist()


def test_pins_exercise_early_exit(pins):
    """The pinned settings are not degenerate: the threshold policies exit at several layers."""
    for name in ("saturation_eager", "confidence_eager"):
        layers = set(pins[f"{name}/exit_layers"].tolist()) | set(pins[f"{name}/token_exit_layers"].tolist())
        assert len(layers) >= 3, (name, layers)
    # eager and lazy fill end with the same cache (lazy entries flushed)
    assert max_abs(pins["saturation_eager/kv"], pins["saturation_lazy/kv"]) <= PIN_ATOL


DUMP_DTYPES = {"format_version": np.int64, "input_ids": np.int64, "hidden_states": np.float32,
               "logits": np.float32, "kv": np.float32, "exit_layers": np.int64}


def check_dump_format(d, L, H, D, C, V, T):
    assert set(d) == set(DUMP_DTYPES) | {"policy"}, sorted(d)
    for key, dt in DUMP_DTYPES.items():
        assert d[key].dtype == dt, (key, d[key].dtype)
    assert d["format_version"].shape == () and int(d["format_version"]) == FORMAT_VERSION == 1
    assert d["input_ids"].shape == (T,) and d["exit_layers"].shape == (T,)
    assert d["hidden_states"].shape == (L + 1, T, C)
    assert d["logits"].shape == (T, V)
    assert d["kv"].shape == (L, 2, H, T, D)
    assert d["policy"].dtype.kind == "U" and d["policy"].shape == ()


def test_dump_format_pin(golden, model, kernels):
    """REGRESSION PIN of the ``minadept dump`` format (keys, dtypes, shapes, format_version, policy
    record) and of its values under ``--exit fixed --exit-layer 2 --kv-fill lazy``; its K/V are also
    checked against the transformers oracle (blocks 1..2 from the cache, 3..4 propagated)."""
    pinned = dict(np.load(GOLDEN / "dump_fixed2_lazy.npz"))
    cfg = model.config
    L, H, C, V, T = cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, len(golden["input_ids"])
    check_dump_format(pinned, L, H, C // H, C, V, T)
    assert json.loads(str(pinned["policy"])) == {"exit": "fixed", "exit_layer": 2, "kv": "propagate",
                                                 "kv_fill": "lazy"}
    assert pinned["input_ids"].tolist() == ids_of(golden) and (pinned["exit_layers"] == 2).all()
    now = dump_arrays(Engine(model, make_policy("fixed", cfg, exit_layer=2), fill="lazy"), ids_of(golden))
    check_dump_format(now, L, H, C // H, C, V, T)
    assert str(now["policy"]) == str(pinned["policy"])
    assert now["exit_layers"].tolist() == pinned["exit_layers"].tolist()
    for key in ("hidden_states", "logits", "kv"):
        d = max_abs(now[key], pinned[key])
        assert d <= PIN_ATOL, f"[{kernels}] dump {key} moved from the pin by {d:.3g}"
    # exited tokens keep h_2 in the later entries; K/V agree with the oracle
    assert np.array_equal(now["hidden_states"][3], now["hidden_states"][2])
    assert max_abs(now["hidden_states"][:3], golden["hidden_states"][:3]) <= STATE_ATOL
    assert max_abs(now["kv"][:2], golden["kv"][:2]) <= STATE_ATOL
    assert max_abs(now["kv"][2:], golden["prop_kv"]) <= STATE_ATOL


def test_dump_command_writes_the_pinned_format(golden, model_dir, tmp_path):
    out = tmp_path / "d.npz"
    r = run_cli("dump", "--model", model_dir, "--prompt", str(golden["prompt"]), "--out", out,
                "--exit", "fixed", "--exit-layer", "2", "--kv-fill", "lazy", env=cli_env())
    assert r.returncode == 0, r.stderr
    got, pinned = dict(np.load(out)), dict(np.load(GOLDEN / "dump_fixed2_lazy.npz"))
    assert set(got) == set(pinned)
    for key in pinned:
        assert got[key].dtype == pinned[key].dtype and got[key].shape == pinned[key].shape, key
    assert str(got["policy"]) == str(pinned["policy"]) and np.array_equal(got["input_ids"], pinned["input_ids"])
    d = max_abs(got["logits"], pinned["logits"])
    assert d <= PIN_ATOL, f"dump command logits moved from the pin by {d:.3g}"
