"""``minadept check``: identical dumps pass; deliberately broken ports fail at the layer and token
where they part from the reference; unusable input is one line and status 2. The oracle tests
run ``dump`` against ``dump --engine transformers`` (the one-minute self-test of the README)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import TINY, copy_checkpoint, edit_config, prompt_ids, run_cli

from minadept.check import (DEFAULT_ATOL, DEFAULT_RTOL, CheckInputError, compare, load_dump)
from minadept.dump import FORMAT_VERSION, dump_arrays
from minadept.engine import Engine
from minadept.exits.policies import make_policy
from minadept.model import Model, lm_head

T = 24


def _save(path, arrays):
    np.savez(path, **arrays)
    return path


def _edit_weights(model_dir, fn):
    from safetensors.numpy import load_file, save_file
    st = model_dir / "model.safetensors"
    t = fn(dict(load_file(str(st))))
    save_file(t, str(st), metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ids(tiny_model):
    return prompt_ids(tiny_model.tokenizer, T)


@pytest.fixture(scope="module")
def ref(tiny_model, ids):
    return dump_arrays(Engine(tiny_model), ids)


@pytest.fixture(scope="module")
def ref_file(ref, tmp_path_factory):
    return _save(tmp_path_factory.mktemp("check") / "ref.npz", ref)


def _broken_port(tiny, tmp_path, ids, *, weights=None, config=None):
    """minadept's own engine run on a modified copy of the tiny checkpoint: a port with a bug."""
    d = copy_checkpoint(tiny.path, tmp_path / "broken")
    if weights is not None:
        _edit_weights(d, weights)
    if config is not None:
        edit_config(d, **config)
    return dump_arrays(Engine(Model.load(d)), ids)


def _check(ref_file, cand, tmp_path, *extra):
    cand_file = _save(tmp_path / "cand.npz", cand)
    return run_cli("check", ref_file, cand_file, *extra)


def _first(r):
    s = json.loads(r.stdout)
    return s["first_beyond"]


# ----------------------------------------------------------------------------- passing

def test_identical_dumps_pass(ref_file):
    r = run_cli("check", ref_file, ref_file)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("PASS"), r.stdout
    assert f"atol {DEFAULT_ATOL:g}, rtol {DEFAULT_RTOL:g}" in r.stdout
    assert "greedy tokens  24/24 agree" in r.stdout and "exit layers    24/24 agree" in r.stdout
    j = run_cli("check", ref_file, ref_file, "--json")
    assert j.returncode == 0 and json.loads(j.stdout)["ok"] is True


def test_fp32_sized_noise_passes_and_tolerance_flags_it(ref, ref_file, tmp_path):
    """Differences of a few fp32 roundings of each token's scale pass; --rtol 0 --atol 0 shows them."""
    rng = np.random.default_rng(0)
    cand = dict(ref)
    for k in ("hidden_states", "logits", "kv"):
        a = ref[k]
        cand[k] = (a * (1 + rng.uniform(-3e-7, 3e-7, a.shape))).astype(np.float32)
    assert _check(ref_file, cand, tmp_path).returncode == 0
    assert _check(ref_file, cand, tmp_path, "--rtol", "0", "--atol", "0").returncode == 1


# ----------------------------------------------------------------------------- broken ports

def test_transposed_c_proj_parts_at_its_layer(tiny, ids, ref_file, tmp_path):
    """attn.c_proj of block 2 used transposed (a square weight: no shape error to catch it)."""
    def transpose(t):
        k = "transformer.h.1.attn.c_proj.weight"
        t[k] = np.ascontiguousarray(t[k].T)
        return t
    r = _check(ref_file, _broken_port(tiny, tmp_path, ids, weights=transpose), tmp_path, "--json")
    assert r.returncode == 1, r.stderr
    assert _first(r) | {"excess": None} == {"array": "hidden_states", "layer": 2, "token": 0, "excess": None}
    table = _check(ref_file, _broken_port(tiny, tmp_path / "b", ids, weights=transpose), tmp_path)
    assert table.returncode == 1
    assert "FAIL: the candidate parts from the reference at layer 2 (hidden_states), token 0" in table.stdout


def test_missing_final_norm_parts_at_the_logits(tiny_model, ref, ref_file, tmp_path):
    """A port that feeds the last hidden state to the LM head without ln_f."""
    cand = dict(ref, logits=lm_head(tiny_model, ref["hidden_states"][-1]).astype(np.float32))
    r = _check(ref_file, cand, tmp_path, "--json")
    assert r.returncode == 1
    f = _first(r)
    assert (f["array"], f["layer"], f["token"]) == ("logits", None, 0)
    s = json.loads(r.stdout)
    assert all(row["first_token_beyond"] is None for row in s["rows"] if row["array"] != "logits")


def test_erf_gelu_instead_of_tanh_parts_at_layer_1(tiny, ids, ref_file, tmp_path):
    """GPT-2's GELU is the tanh form; a port with the exact erf form drifts from the first MLP on."""
    cand = _broken_port(tiny, tmp_path, ids, config={"activation_function": "gelu"})
    r = _check(ref_file, cand, tmp_path, "--json")
    assert r.returncode == 1
    f = _first(r)
    assert (f["array"], f["layer"], f["token"]) == ("hidden_states", 1, 0)
    assert f["excess"] < 1e3                    # a small error, still well beyond fp32 noise


def test_off_by_one_positions_part_at_the_embedding(tiny, ids, ref_file, tmp_path):
    """A port that numbers positions from 1 (wpe[t + 1] for token t)."""
    def shift(t):
        w = t["transformer.wpe.weight"]
        t["transformer.wpe.weight"] = np.ascontiguousarray(np.concatenate([w[1:], w[:1]]))
        return t
    r = _check(ref_file, _broken_port(tiny, tmp_path, ids, weights=shift), tmp_path, "--json")
    assert r.returncode == 1
    f = _first(r)
    assert (f["array"], f["layer"], f["token"]) == ("hidden_states", 0, 0)


def test_kv_of_an_exited_token_left_at_zero(tiny_model, ids, tmp_path):
    """Every token exits at layer 2 of 3 (K/V of layer 3 filled lazily by propagation); a port that
    never fills token 5's entry leaves zeros there: check names layer 3, token 5."""
    cfg = tiny_model.config
    ref = dump_arrays(Engine(tiny_model, make_policy("fixed", cfg, exit_layer=2), fill="lazy"), ids)
    assert (ref["exit_layers"] == 2).all() and np.abs(ref["kv"][2, :, :, 5]).max() > 0
    ref_file = _save(tmp_path / "ref_exit.npz", ref)
    kv = ref["kv"].copy()
    kv[2, :, :, 5] = 0
    r = _check(ref_file, dict(ref, kv=kv), tmp_path, "--json")
    assert r.returncode == 1
    f = _first(r)
    assert (f["array"], f["layer"], f["token"]) == ("K", 3, 5)
    s = json.loads(r.stdout)
    v3 = next(row for row in s["rows"] if row["array"] == "V" and row["layer"] == 3)
    assert v3["first_token_beyond"] == 5


def test_exit_layer_and_greedy_disagreement_fail(ref, ref_file, tmp_path):
    ex = ref["exit_layers"].copy()
    ex[7] = 1
    r = _check(ref_file, dict(ref, exit_layers=ex), tmp_path)
    assert r.returncode == 1 and "exit layers differ first at token 7" in r.stdout
    logits = ref["logits"].copy()
    t = 3
    logits[t, (int(np.argmax(logits[t])) + 1) % logits.shape[1]] = logits[t].max() + 1e-3 * np.abs(logits[t]).max()
    r = _check(ref_file, dict(ref, logits=logits), tmp_path, "--json")
    s = json.loads(r.stdout)
    assert r.returncode == 1 and s["greedy_tokens"]["first_difference"] == t and s["first_beyond"]["token"] == t


# ----------------------------------------------------------------------------- unusable input: status 2

def _one_line_status_2(r, needle):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]
    assert r.stdout == ""


def test_malformed_inputs_are_one_line_status_2(ref, ref_file, tmp_path):
    text = tmp_path / "text.npz"
    text.write_text("not a zip")
    _one_line_status_2(run_cli("check", ref_file, text), "cannot read as .npz")
    _one_line_status_2(run_cli("check", tmp_path / "absent.npz", ref_file), "no such file")
    _one_line_status_2(run_cli("check", ref_file, tmp_path), "is a directory")
    other = _save(tmp_path / "other.npz", {"x": np.zeros(3)})
    _one_line_status_2(run_cli("check", ref_file, other), "not a minadept dump")
    missing = _save(tmp_path / "missing.npz", {k: v for k, v in ref.items() if k != "kv"})
    _one_line_status_2(run_cli("check", ref_file, missing), "missing array kv")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **dict(ref, policy=np.array([{"exit": "none"}], dtype=object)))
    _one_line_status_2(run_cli("check", ref_file, pickled), "malformed")
    bad_kv = _save(tmp_path / "bad_kv.npz", dict(ref, kv=ref["kv"][:, :, :, :-1]))
    _one_line_status_2(run_cli("check", ref_file, bad_kv), "kv has shape")
    bad_exit = _save(tmp_path / "bad_exit.npz", dict(ref, exit_layers=np.zeros(T, np.int64)))
    _one_line_status_2(run_cli("check", ref_file, bad_exit), "exit_layers[0] = 0")


@pytest.mark.parametrize("version,needle", [(0, "no longer supported"), (FORMAT_VERSION + 1, "newer")])
def test_other_format_versions_are_refused(ref, ref_file, tmp_path, version, needle):
    f = _save(tmp_path / "v.npz", dict(ref, format_version=np.int64(version)))
    _one_line_status_2(run_cli("check", f, ref_file), needle)
    _one_line_status_2(run_cli("check", ref_file, f), f"format_version {version}")


def test_mismatched_shapes_and_ids_are_refused(tiny_model, factory, ids, ref, ref_file, tmp_path):
    from helpers import TINY2
    two = factory.get("tiny2", shape=TINY2)
    other = _save(tmp_path / "two_layers.npz", dump_arrays(Engine(two.model), ids))
    _one_line_status_2(run_cli("check", ref_file, other), "shape mismatch")
    _one_line_status_2(run_cli("check", ref_file, other), "n_layer 3")
    shorter = _save(tmp_path / "short.npz", dump_arrays(Engine(tiny_model), ids[:-1]))
    _one_line_status_2(run_cli("check", ref_file, shorter), "tokens 24")
    ids2 = list(ids)
    ids2[9] = (ids2[9] + 1) % 50257
    _one_line_status_2(run_cli("check", ref_file, _save(tmp_path / "ids.npz", dump_arrays(Engine(tiny_model), ids2))),
                       "input_ids differ at token 9")
    with pytest.raises(CheckInputError, match="tolerances"):
        compare(load_dump(ref_file), load_dump(ref_file), rtol=-1)


# ----------------------------------------------------------------------------- no torch in the runtime

def test_check_and_dump_never_import_torch(ref_file, tmp_path):
    code = ("import sys; from minadept.cli import main; "
            f"rc = main(['check', {str(ref_file)!r}, {str(ref_file)!r}]); "
            "assert rc == 0; bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_engine_transformers_without_the_oracle_extra_is_one_line(tiny, tmp_path):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from minadept.cli import main; "
            f"sys.exit(main(['dump', '--engine', 'transformers', '--model', {str(tiny.path)!r}, "
            f"'--prompt', 'hi', '--out', {str(tmp_path / 'x.npz')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "oracle extra" in lines[0] and "pip install" in lines[0], r.stderr
    assert not (tmp_path / "x.npz").exists()


def test_engine_transformers_refuses_exit_flags(tiny, tmp_path):
    r = run_cli("dump", "--engine", "transformers", "--model", tiny.path, "--prompt", "hi",
                "--out", tmp_path / "x.npz", "--exit", "fixed", "--exit-layer", "2")
    assert r.returncode == 1 and "--exit has no effect with --engine transformers" in r.stderr


# ----------------------------------------------------------------------------- the self-test (oracle)

def _self_test(tmp_path, model_args, prompt):
    a, b = tmp_path / "minadept.npz", tmp_path / "transformers.npz"
    r = run_cli("dump", *model_args, "--prompt", prompt, "--out", a, timeout=600)
    assert r.returncode == 0, r.stderr
    r = run_cli("dump", "--engine", "transformers", *model_args, "--prompt", prompt, "--out", b, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip().splitlines() == [f"wrote {b} (transformers, full depth)"], r.stderr
    d = np.load(b)
    pol = json.loads(str(d["policy"]))
    assert pol["engine"] == "transformers" and (d["exit_layers"] == d["kv"].shape[0]).all()
    r = run_cli("check", a, b)
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.mark.oracle
def test_self_test_on_a_tiny_checkpoint(torch_factory, tmp_path):
    ck = torch_factory.get("tiny", shape=TINY)
    _self_test(tmp_path, ["--model", ck.path], "The quick brown fox jumps over the lazy dog.")


@pytest.mark.oracle
def test_self_test_on_the_embedded_model(tmp_path):
    _self_test(tmp_path, [], "Once upon a time, there was a little girl named Lily. She loved to play in the park.")


@pytest.mark.oracle
@pytest.mark.slow
def test_self_test_on_a_random_124m_checkpoint(tmp_path):
    import torch
    from helpers import add_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    d = tmp_path / "gpt2-124m-random"
    GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval().save_pretrained(d)
    add_tokenizer(d)
    _self_test(tmp_path, ["--model", d], "The quick brown fox jumps over the lazy dog. In the early years of the "
                                         "twentieth century, physicists in Vienna argued about light.")
