"""Bad or extreme values that used to reach a traceback or a silently wrong result: tiny
temperatures, reference dumps after early exits, tau = 1 under every schedule, bfloat16 tensors
typed by ml_dtypes. Runs on the embedded model (shipped with the package) and NumPy-built models."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import run_cli

from minadept import Engine, Model
from minadept.dump import dump_arrays
from minadept.exits.adept import ADEPT_FILE, adept_engine, load_adept
from minadept.exits.policies import make_policy
from minadept.generate import generate
from minadept.sampling import SamplingSettings, allowed_probs


@pytest.fixture(scope="module")
def embedded():
    return Model.load()


@pytest.fixture(scope="module")
def adept_params(embedded):
    return load_adept(embedded.path / ADEPT_FILE, embedded.config)


# ----------------------------------------------------------------------------- temperature

@pytest.mark.parametrize("temperature", [5e-324, 1e-310, 1e-300, 1e-30, 1e-8])
def test_tiny_temperature_puts_all_mass_on_the_top_logit(temperature):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(1000) * 5).astype(np.float32)
    p = allowed_probs(logits, SamplingSettings(temperature=temperature, top_k=None))
    assert np.isfinite(p).all()
    assert p[int(np.argmax(logits))] == 1.0 and p.sum() == 1.0


def test_tiny_temperature_splits_mass_over_tied_top_logits():
    logits = np.array([1.0, 3.0, -2.0, 3.0], np.float32)
    p = allowed_probs(logits, SamplingSettings(temperature=1e-310, top_k=None))
    assert p.tolist() == [0.0, 0.5, 0.0, 0.5]


def test_cli_tiny_temperature_generates_the_greedy_text():
    args = ["generate", "Once upon a time", "--max-new-tokens", "5", "--seed", "0"]
    tiny = run_cli(*args, "--temperature", "1e-310")
    greedy = run_cli(*args, "--temperature", "0")
    assert tiny.returncode == 0, tiny.stderr
    assert "Traceback" not in tiny.stderr
    assert tiny.stdout == greedy.stdout


# ----------------------------------------------------------------------------- dumps after exits

def _engines(model, adept):
    """(label, engine) for every policy under every KV mode, with settings that exit tokens."""
    cfg = model.config
    policies = [("fixed3", dict(name="fixed", exit_layer=3)), ("confidence", dict(name="confidence", threshold=0.2)),
                ("margin", dict(name="margin", threshold=0.1)), ("saturation", dict(name="saturation", threshold=0.6)),
                ("adept", dict(name="adept", threshold=0.5)), ("none", dict(name="none"))]
    modes = [("propagate", "eager"), ("propagate", "lazy"), ("propagate-loop", "eager"), ("oracle", "eager")]
    for label, kw in policies:
        name = kw.pop("name")
        for kv, fill in modes:
            policy = make_policy(name, cfg, adept=adept, **kw)
            if name == "adept":
                eng = adept_engine(model, policy, adept, kv_map=kv == "propagate", kv=kv, fill=fill)
            else:
                eng = Engine(model, policy, kv=kv, fill=fill)
            yield f"{label}/{kv}/{fill}", eng


def test_dump_keeps_the_promises_of_the_format_table(embedded, adept_params):
    ids = embedded.tokenizer.encode("Once upon a time there was a little girl who lived in a village.")
    T, L = len(ids), embedded.config.n_layer
    p = embedded.params
    exited_somewhere = set()
    for label, eng in _engines(embedded, adept_params):
        d = dump_arrays(eng, ids)
        for key in ("hidden_states", "logits", "kv"):
            assert np.isfinite(d[key]).all(), f"{label}: {key} has non-finite entries"
        hs, ex = d["hidden_states"], d["exit_layers"]
        assert hs.shape == (L + 1, T, embedded.config.n_embd) and ex.shape == (T,)
        assert ((1 <= ex) & (ex <= L)).all(), label
        np.testing.assert_allclose(hs[0], p.wte[ids] + p.wpe[:T], rtol=0, atol=1e-6, err_msg=label)
        for t in range(T):
            k = int(ex[t])
            later = hs[k + 1:, t]
            assert (later == hs[k, t]).all(), f"{label}: token {t} exited at {k} but later entries differ from h_{k}"
        # a token that exited keeps K/V at every deeper layer, none left at zero
        for t in np.flatnonzero(ex < L):
            assert (np.abs(d["kv"][ex[t]:, :, :, t]).max(axis=(-1, -2)) > 0).all(), f"{label}: token {t} K/V zero"
        assert json.loads(str(d["policy"]))["kv"] == label.split("/")[1]
        if (ex < L).any():
            exited_somewhere.add(label.split("/")[0])
    assert exited_somewhere >= {"fixed3", "confidence", "margin", "saturation", "adept"}, exited_somewhere


def test_dump_cli_fixed_exit_has_no_uninitialised_states(tmp_path, embedded):
    out = tmp_path / "f.npz"
    r = run_cli("dump", "--prompt", "Once upon a time", "--exit", "fixed", "--exit-layer", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    d = np.load(out)
    hs = d["hidden_states"]
    assert np.isfinite(hs).all()
    assert (hs[4:] == hs[3][None]).all()
    assert (d["exit_layers"] == 3).all()


# ----------------------------------------------------------------------------- tau = 1

@pytest.mark.parametrize("schedule", ["constant", "decay"])
@pytest.mark.parametrize("name", ["confidence", "margin", "saturation", "adept"])
def test_threshold_one_never_exits_under_any_schedule(embedded, adept_params, name, schedule):
    policy = make_policy(name, embedded.config, threshold=1.0, schedule=schedule, horizon=24, adept=adept_params)
    eng = (adept_engine(embedded, policy, adept_params) if name == "adept" else Engine(embedded, policy))
    ids = embedded.tokenizer.encode("Once upon a time")
    steps = list(generate(eng, ids, max_new_tokens=24, sampling=SamplingSettings(temperature=0),
                          rng=np.random.default_rng(0)))
    layers = [int(x) for s in steps for x in s.result.exit_layers]
    assert layers and set(layers) == {embedded.config.n_layer}
    assert sum(int(s.result.check_flops.sum()) for s in steps) == 0


def test_cli_confidence_threshold_one_decay_stays_at_full_depth():
    r = run_cli("generate", "Once upon a time", "--exit", "confidence", "--threshold", "1", "--schedule", "decay",
                "--temperature", "0", "--max-new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stderr.strip().splitlines()[-1])
    assert set(s["exit_layers"]) == {12} and s["compute_fraction"] == 1.0


def test_decay_schedule_below_one_does_exit(embedded):
    """The decaying threshold still decays (tokens exit) when tau < 1."""
    policy = make_policy("saturation", embedded.config, threshold=0.8, schedule="decay", horizon=24)
    ids = embedded.tokenizer.encode("Once upon a time")
    steps = list(generate(Engine(embedded, policy), ids, max_new_tokens=24, sampling=SamplingSettings(temperature=0),
                          rng=np.random.default_rng(0)))
    assert min(int(s.result.exit_layers[-1]) for s in steps) < embedded.config.n_layer


# ----------------------------------------------------------------------------- bfloat16 via ml_dtypes

def test_bf16_checkpoint_loads_while_ml_dtypes_is_imported(tmp_path, embedded):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import shutil

    from safetensors.numpy import load_file, save_file
    src = embedded.path
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(src / name, tmp_path / name)
    tensors = load_file(str(src / "model.safetensors"))
    save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    m = Model.load(tmp_path)
    want = tensors["transformer.wte.weight" if "transformer.wte.weight" in tensors else "wte.weight"]
    rounded = want.astype(ml_dtypes.bfloat16).astype(np.float32)      # ml_dtypes' own rounding
    assert m.params.wte.dtype == np.float32
    assert np.array_equal(m.params.wte, rounded)
    assert not np.array_equal(m.params.wte, want)                      # really bf16, not a copy


def test_unsupported_dtype_is_a_one_line_error(tmp_path, embedded):
    import shutil

    from safetensors.numpy import load_file, save_file
    for name in ("config.json", "tokenizer.json"):
        shutil.copyfile(embedded.path / name, tmp_path / name)
    tensors = load_file(str(embedded.path / "model.safetensors"))
    key = next(k for k in tensors if k.endswith("wte.weight"))
    tensors[key] = tensors[key].astype(np.int32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = run_cli("generate", "x", "--model", tmp_path, "--max-new-tokens", "1")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "wte.weight" in r.stderr and "int32" in r.stderr


@pytest.mark.parametrize("t", ["0", None, True, [1.0]])
def test_temperature_of_another_type_is_named_as_such(t):
    from minadept.errors import MinadeptError
    with pytest.raises(MinadeptError, match="--temperature must be a number, got"):
        SamplingSettings(temperature=t)
