"""CLI of the early-exit engine and the reference dump, on the embedded model:
the dump agrees with transformers; --show-exits shows varied exit layers; invalid policy settings
are one-line errors."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play in the park."


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minadept", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.oracle
def test_dump_matches_transformers(tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    from minadept.checkpoint import default_model_dir
    out = tmp_path / "ref.npz"
    r = cli("dump", "--prompt", PROMPT, "--out", str(out))
    assert r.returncode == 0, r.stderr
    d = np.load(out)
    assert int(d["format_version"]) == 1
    ids = d["input_ids"]
    T = len(ids)
    hf = GPT2LMHeadModel.from_pretrained(default_model_dir()).eval()
    cfg = hf.config
    with torch.no_grad():
        o = hf(torch.tensor(ids)[None], output_hidden_states=True, use_cache=True)
    assert d["hidden_states"].shape == (cfg.n_layer + 1, T, cfg.n_embd)
    assert d["logits"].shape == (T, cfg.vocab_size) and d["logits"].dtype == np.float32
    assert d["kv"].shape == (cfg.n_layer, 2, cfg.n_head, T, cfg.n_embd // cfg.n_head)
    assert (d["exit_layers"] == cfg.n_layer).all()
    hs = [h[0].numpy() for h in o.hidden_states]
    for l in range(cfg.n_layer):                 # transformers' last entry is after ln_f; ours before
        diff = np.abs(d["hidden_states"][l] - hs[l]).max()
        assert diff < 1e-4, f"hidden_states[{l}] max diff {diff}"
    ln_f = hf.transformer.ln_f
    with torch.no_grad():
        last = ln_f(torch.from_numpy(d["hidden_states"][-1])).numpy()
    assert np.abs(last - hs[-1]).max() < 1e-4
    assert np.abs(d["logits"] - o.logits[0].numpy()).max() < 1e-4
    cache = o.past_key_values
    for l in range(cfg.n_layer):
        k = cache.layers[l].keys[0].numpy() if hasattr(cache, "layers") else cache[l][0][0].numpy()
        v = cache.layers[l].values[0].numpy() if hasattr(cache, "layers") else cache[l][1][0].numpy()
        assert np.abs(d["kv"][l, 0] - k).max() < 1e-4, f"K of layer {l + 1}"
        assert np.abs(d["kv"][l, 1] - v).max() < 1e-4, f"V of layer {l + 1}"


def test_dump_with_policy_records_exits_and_propagated_kv(tmp_path):
    from minadept.engine import Engine
    from minadept.exits.propagate import propagate_kv
    from minadept.model import Model
    out = tmp_path / "ee.npz"
    r = cli("dump", "--prompt", PROMPT, "--out", str(out), "--exit", "fixed", "--exit-layer", "4",
            "--kv-fill", "lazy")
    assert r.returncode == 0, r.stderr
    d = np.load(out)
    assert (d["exit_layers"] == 4).all()
    pol = json.loads(str(d["policy"]))
    assert pol["exit"] == "fixed" and pol["exit_layer"] == 4 and pol["kv_fill"] == "lazy"
    m = Model.load(None)
    L = m.config.n_layer
    kv = propagate_kv(m, d["hidden_states"][4], 4)
    np.testing.assert_allclose(d["kv"][4:], kv, rtol=1e-5, atol=1e-5)
    expect = Engine(m).predict(d["hidden_states"][4], 4)
    np.testing.assert_allclose(d["logits"], expect, rtol=1e-5, atol=1e-5)


def test_show_exits_varies_layers():
    """The issue's command: ``generate "Once upon a time" --exit confidence --threshold 0.9
    --show-exits`` (default 100 new tokens, sampling; seed fixed here) exits different tokens at
    different layers."""
    r = cli("generate", "Once upon a time", "--exit", "confidence", "--threshold", "0.9",
            "--show-exits", "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    marks = [int(x.split(",")[-1]) for x in re.findall(r"\[([\d,]+)\]", r.stdout)]
    assert len(marks) >= 10, r.stdout
    assert len(set(marks)) >= 3, marks
    s = json.loads(r.stderr.strip().splitlines()[-1])
    assert s["compute_fraction"] > 0
    assert s["mean_exit_layer"] < 12 and len(s["exit_layers"]) == s["new_tokens"]


@pytest.mark.parametrize("args,needle", [
    (["--exit", "confidence", "--threshold", "1.5"], "--threshold"),
    (["--exit", "margin", "--threshold", "-0.2"], "--threshold"),
    (["--exit", "confidence", "--threshold", "nan"], "--threshold"),
    (["--exit", "fixed", "--exit-layer", "0"], "--exit-layer"),
    (["--exit", "fixed", "--exit-layer", "99"], "--exit-layer"),
    (["--exit", "saturation", "--min-exit-layer", "99"], "--min-exit-layer"),
    (["--exit", "fixed"], "--exit-layer"),
    (["--exit", "confidence", "--kv", "oracle", "--kv-fill", "lazy"], "lazy"),
    (["--exit", "confidence", "--kv", "copy"], "--kv"),
    (["--exit", "whatever"], "exit policy"),
])
def test_invalid_policy_settings_one_line(args, needle):
    r = cli("generate", "hello", "--max-new-tokens", "2", *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert needle in lines[0], lines[0]


def test_eval_policy_json_and_sweep_plot(tmp_path):
    """``eval`` with a policy adds agreement, mean exit layer and compute fraction; ``--sweep``
    covers every training-free policy and ``--plot`` writes the PNG."""
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a little dog named Max. He liked to run in the park "
                    "with his friend Sam, and every day they played until the sun went down.\n" * 4,
                    encoding="utf-8")
    r = cli("eval", "--text", str(text), "--exit", "fixed", "--exit-layer", "6", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["mean_exit_layer"] == 6 and 0 < res["compute_fraction"] < 1 and 0 <= res["agreement"] <= 1
    png = tmp_path / "s.png"
    r = cli("eval", "--text", str(text), "--sweep", "--plot", str(png), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])["sweep"]
    assert {row["exit"] for row in rows} == {"none", "fixed", "confidence", "margin", "saturation", "adept"}  # adept: the shipped calibration
    assert png.stat().st_size > 10_000
