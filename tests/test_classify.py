"""Early-exit classification (``minadept.classify``, ``minadept probe-train`` / ``classify``):
the NumPy logistic regression, the probe file, the layer loop against ``Engine.forward``, the
stopping rules against their simulation, and one-line errors for bad input."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from minadept import Model
from minadept import classify as K
from minadept.cli import main
from minadept.errors import MinadeptError
from minadept.settings import EngineSettings, build_engine

SENT = Path(__file__).resolve().parent.parent / "weights" / "minigpt2-stories" / "sentiment"
SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "classify"


@pytest.fixture(scope="module")
def model():
    return Model.load()


@pytest.fixture(scope="module")
def probes(model):
    return K.load_probes(SENT, model)


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- logistic regression

def test_logreg_recovers_direction_and_loss_decreases():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 12))
    w = rng.normal(size=12)
    y = (X @ w + 0.2 * rng.normal(size=3000) > 0).astype(int)
    W, b, losses = K.fit_logreg(X, y, 2, 1e-3)
    d = W[:, 1] - W[:, 0]
    assert d @ w / np.linalg.norm(d) / np.linalg.norm(w) > 0.99
    assert np.all(np.diff(losses) <= 0) and losses[-1] < 0.5 * losses[0]


def test_logreg_multinomial_recovers_directions():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(4000, 8))
    Wt = rng.normal(size=(8, 4)) * 3
    y = (X @ Wt + rng.gumbel(size=(4000, 4))).argmax(1)       # samples of softmax(X Wt)
    W, b, losses = K.fit_logreg(X, y, 4, 1e-4)
    centred = lambda M: M - M.mean(axis=1, keepdims=True)     # softmax is shift invariant
    a, t = centred(W).ravel(), centred(Wt).ravel()
    assert a @ t / np.linalg.norm(a) / np.linalg.norm(t) > 0.97
    assert np.all(np.diff(losses) <= 0)


# ----------------------------------------------------------------------------- probe file

def test_probes_round_trip(tmp_path, probes, model):
    K.save_probes(probes, tmp_path)
    back = K.load_probes(tmp_path / K.PROBE_FILE, model)
    for name in ("W", "b", "mean", "scale"):
        assert np.array_equal(getattr(back, name), getattr(probes, name))
    assert (back.labels, back.pooling, back.exit_settings, back.model_sha256, back.info) == \
           (probes.labels, probes.pooling, probes.exit_settings, probes.model_sha256, probes.info)
    assert json.loads((tmp_path / K.PROBE_JSON).read_text())["labels"] == probes.labels


def test_probes_for_another_model_is_one_line_error(tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(SENT.parent, other, ignore=shutil.ignore_patterns("sentiment"))
    from safetensors.numpy import load_file, save_file
    t = load_file(str(other / "model.safetensors"))
    k = sorted(t)[0]
    t[k] = t[k] + np.float32(1e-3)
    save_file(t, str(other / "model.safetensors"))
    with pytest.raises(MinadeptError, match="fitted on another model: sha256 of model.safetensors"):
        K.load_probes(SENT, Model.load(str(other)))
    code, out, err = run(["classify", "--model", str(other), "--probes", str(SENT), "a happy day"], capsys)
    assert code == 1 and err.count("\n") == 1 and "another model" in err


# ----------------------------------------------------------------------------- the layer loop and the rules

SETTINGS = [EngineSettings(), EngineSettings(exit="adept"), EngineSettings(exit="adept", kv_fill="lazy"),
            EngineSettings(exit="saturation", threshold=0.9, kv="oracle")]


@pytest.mark.parametrize("st", SETTINGS, ids=lambda s: f"{s.exit}-{s.kv}-{s.kv_fill}")
def test_layer_states_equal_engine_forward(model, st):
    engine = build_engine(model, st)
    ids = K.encode(model.tokenizer, "The little dog was sad, then the sun came out and he played.", 256)
    ref = engine.forward(ids, engine.new_cache(len(ids)), record_hidden=True)
    got = [(l, h.copy(), f) for l, h, f in K.layer_states(engine, ids)]
    assert [l for l, _, _ in got] == list(range(1, model.config.n_layer + 1))
    for l, h, _ in got:
        assert np.array_equal(h, ref.hidden[l]), l
    flops = [f for _, _, f in got]
    assert flops == sorted(flops)
    if st.kv_fill == "eager":              # the engine's own accounting, without the LM head
        assert flops[-1] == ref.total_flops - int(ref.head_flops.sum())


def test_stop_full_is_the_last_layer_probe(model, probes):
    engine = build_engine(model, EngineSettings())
    for text in ["The cake was yummy.", "She lost her toy and cried.", "A dog, a cat and a very long day at the park."]:
        ids = K.encode(model.tokenizer, text, 256)
        hidden = engine.forward(ids, engine.new_cache(len(ids)), record_hidden=True).hidden
        p = probes.probs(12, K.pool(hidden[12], probes.pooling))
        r = K.classify_ids(engine, probes, ids, K.Rule("full"))
        f = K.full_depth_ids(engine, probes, ids)
        assert r.label == f.label == int(p.argmax()) and r.stop_layer == 12
        assert np.array_equal(r.probs, p) and np.array_equal(f.probs, p)
        assert f.flops == f.full_flops


@pytest.mark.parametrize("st", SETTINGS[:3], ids=lambda s: f"{s.exit}-{s.kv_fill}")
def test_rules_equal_their_simulation(model, probes, st):
    engine = build_engine(model, st)
    texts = K.read_tsv(SENT / "test.tsv")[0][:8]
    feats, spent, _, _ = K.trace_texts(engine, texts, (probes.pooling,))
    probs = K.probe_probs(probes, feats[probes.pooling])
    for rule in [K.Rule("full"), K.Rule("layer", 3), K.Rule("max-prob", 0.9), K.Rule("entropy", 0.3),
                 K.Rule("patience", 1), K.Rule("patience", 3)]:
        stop, pred = K.simulate(rule, probs)
        flops = K.rule_flops(rule, stop, spent, probes)
        for i, t in enumerate(texts):
            r = K.classify_ids(engine, probes, K.encode(model.tokenizer, t, 256), rule)
            assert (r.stop_layer, r.label, r.flops) == (stop[i], pred[i], flops[i]), (rule, i)


def test_rule_semantics():
    p = np.array([[0.6, 0.4], [0.95, 0.05], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9]])[None]
    p = np.concatenate([p, np.tile(p[:, -1:], (1, 7, 1))], axis=1)      # 12 layers
    assert K.simulate(K.Rule("max-prob", 0.9), p)[0][0] == 2
    assert K.simulate(K.Rule("patience", 1), p)[0][0] == 1
    assert K.simulate(K.Rule("patience", 3), p)[0][0] == 5                 # layers 3, 4, 5 agree
    assert K.simulate(K.Rule("entropy", 0.3), p)[0][0] == 2
    assert K.simulate(K.Rule("full"), p)[0][0] == 12


# ----------------------------------------------------------------------------- command line

def test_readme_example(capsys):
    code, out, err = run(["classify", "The puppy was happy and played in the sun.",
                          "The boy was sad and cried all night.", "--stop", "patience"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("positive\t") and lines[1].startswith("negative\t")
    assert "compute fraction" in lines[-1] and "texts/s" in lines[-1]
    code, out, err = run(["classify", "--data", str(SENT / "test.tsv"), "--stop", "max-prob", "--json"], capsys)
    s = json.loads(out.splitlines()[-1])
    assert code == 0 and s["texts"] == 30 and s["accuracy"] >= 70 and 0 < s["compute_fraction"] < 1


def test_probe_train_cli(tmp_path, capsys):
    data = tmp_path / "d.tsv"
    rows = (SENT / "train.tsv").read_text().splitlines()
    data.write_text("\n".join(rows[:61]) + "\n")
    code, out, err = run(["probe-train", "--data", str(data), "--out", str(tmp_path / "p"), "--json",
                          "--exit", "adept", "--kv-fill", "lazy"], capsys)
    assert code == 0, err
    s = json.loads(out.splitlines()[-1])
    assert s["n_examples"] == 60 and s["pooling"] in ("mean", "last") and s["exit"]["exit"] == "adept"
    code, out, err = run(["classify", "--probes", str(tmp_path / "p"), "--json", "a happy day"], capsys)
    assert code == 0 and json.loads(out)["exit"] == "adept"        # the probes' token exits by default
    code, out, err = run(["probe-train", "--data", str(data), "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and "--force" in err


@pytest.mark.parametrize("content,message", [
    ("sentence\tlabel\nhello\tpositive\n", "header 'text<TAB>label'"),
    ("hello\tpositive\n", "header 'text<TAB>label'"),
    ("text\tlabel\nhello\tjoyful\n", "unknown label(s) 'joyful'"),
    ("text\tlabel\n \tpositive\n", "line 2: empty text"),
    ("text\tlabel\nhello\n", "line 2: expected 'text<TAB>label'"),
])
def test_bad_tsv_is_one_line_error(tmp_path, capsys, content, message):
    f = tmp_path / "bad.tsv"
    f.write_text(content)
    code, out, err = run(["classify", "--data", str(f)], capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv,message", [
    (["--stop", "bogus", "a happy day"], "unknown --stop rule"),
    (["--stop", "max-prob:1.5", "a happy day"], "threshold must be in [0, 1]"),
    (["--stop", "entropy:-0.1", "a happy day"], "threshold must be in [0, 1]"),
    (["--stop", "max-prob:x", "a happy day"], "not a number"),
    (["--stop", "patience:0", "a happy day"], "patience must be in"),
    (["--stop", "patience:1.5", "a happy day"], "must be an integer"),
    (["--stop", "layer:13", "a happy day"], "layer must be in 1..12"),
    (["--stop", "full:3", "a happy day"], "takes no value"),
    ([" "], "empty text"),
    ([], "give TEXT... or --data"),
])
def test_bad_cli_input_is_one_line_error(capsys, argv, message):
    code, out, err = run(["classify"] + argv, capsys)
    assert code == 1 and err.count("\n") == 1 and message in err, err


def test_probe_train_bad_data(tmp_path, capsys):
    f = tmp_path / "one.tsv"
    f.write_text("text\tlabel\n" + "".join(f"a happy day {i}\tpositive\n" for i in range(20)))
    code, out, err = run(["probe-train", "--data", str(f), "--out", str(tmp_path / "p")], capsys)
    assert code == 1 and "at least 2 labels" in err


def test_long_text_is_truncated_with_a_warning(model, capsys):
    n = model.config.n_positions
    long = "the happy dog ran " * 200
    with pytest.warns(RuntimeWarning, match=f"truncated to the context of {n}"):
        ids = K.encode(model.tokenizer, long, n)
    assert len(ids) == n
    code, out, err = run(["classify", long], capsys)
    assert code == 0 and err.startswith("warning: text of") and "truncated" in err


# ----------------------------------------------------------------------------- the research data sets

def test_shared_data_reads_when_present():
    if not (SHARED / "sst2" / "test.tsv").exists():
        pytest.skip(f"{SHARED} not found (evaluation-only data, never in the repository)")
    texts, labels = K.read_tsv(SHARED / "sst2" / "test.tsv")
    assert len(texts) == 872 and set(labels) == {"0", "1"}


def test_probe_train_bad_holdout_fails_before_running(tmp_path, capsys):
    code, out, err = run(["probe-train", "--data", str(SENT / "train.tsv"), "--out", str(tmp_path / "p"),
                          "--holdout", "1.5"], capsys)
    assert code == 1 and "--holdout must be in (0, 1)" in err and not (tmp_path / "p").exists()


@pytest.mark.parametrize("st", [dict(exit="adept", threshold=0.5), dict(exit="adept", threshold=0.5, kv_fill="lazy"),
                                dict(exit="saturation", threshold=0.8, kv="oracle", min_exit_layer=3), dict()])
def test_layer_states_flops_at_the_last_layer_equal_the_engines(st):
    """Run to the end, the running FLOP count equals a full forward's blocks + checks + propagation."""
    from minadept import Model
    from minadept.classify import layer_states
    from minadept.settings import EngineSettings, build_engine
    m = Model.load()
    ids = [m.tokenizer.eot_id] + m.tokenizer.encode("The puppy was happy and played in the sun all day long.")
    eng = build_engine(m, EngineSettings(**st))
    layer, h, flops = list(layer_states(eng, ids))[-1]
    r = eng.forward(ids, eng.new_cache(len(ids)), all_logits=True, record_hidden=True)
    assert layer == m.config.n_layer and np.array_equal(h, r.hidden[-1])
    assert flops == int(r.block_flops.sum() + r.check_flops.sum() + r.propagation_flops)
