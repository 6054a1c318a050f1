"""Issue 3: a 20-step smoke run of weights/train.py on a small slice of text produces a Hugging Face
GPT-2 directory that minadept loads and that transformers agrees with. weights/train.py needs torch:
these run under the ``oracle`` marker (the oracle extra) and need the shared corpus."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import shared_corpus

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.oracle


@pytest.mark.smoke
def test_train_smoke_20_steps(tmp_path):
    CORPUS = shared_corpus("train.txt", "valid.txt")
    out = tmp_path / "m"
    cmd = [sys.executable, str(ROOT / "weights" / "train.py"), "--train", str(CORPUS / "train.txt"),
           "--valid", str(CORPUS / "valid.txt"), "--out", str(out), "--steps", "20",
           "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--n-positions", "32",
           "--vocab-size", "300", "--batch-size", "4", "--max-train-bytes", "200000", "--max-valid-bytes", "50000",
           "--eval-every", "10", "--eval-windows", "4", "--checkpoint-every", "10", "--seed", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "train_log.json").read_text())
    assert len(log["train"]) == 20 and log["tokens_seen"] == 20 * 4 * 32
    losses = [l for _, l in log["train"]]
    assert losses[-1] < losses[0], losses                 # it learns something in 20 steps
    assert [s for s, _ in log["valid"]] == [10, 20]

    # resume: 5 more steps continue from the checkpoint instead of starting over
    proc = subprocess.run(cmd[:cmd.index("--steps") + 1] + ["25"] + cmd[cmd.index("--steps") + 2:] + ["--resume"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed at step 20" in proc.stderr
    assert len(json.loads((out / "train_log.json").read_text())["train"]) == 25

    # the output is a model both minadept and transformers read, and they agree
    import torch
    from transformers import GPT2LMHeadModel

    from minadept.engine import Engine
    from minadept.model import Model
    m = Model.load(out)
    ids = m.tokenizer.encode("Once upon a time there was a little dog.")
    ours = Engine(m).forward(ids, Engine(m).new_cache(), all_logits=True).logits
    with torch.no_grad():
        ref = GPT2LMHeadModel.from_pretrained(out).eval()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()


@pytest.mark.smoke
def test_early_exit_fine_tune_lowers_the_intermediate_loss(tmp_path):
    """--init continues from a checkpoint; --exit-loss-weight adds the loss of exiting after an
    intermediate block (LayerSkip-style). From the same start, seed and batches, a run with the
    exit loss ends with a lower held-out loss at layer 1 than a run without it."""
    CORPUS = shared_corpus("train.txt", "valid.txt")
    base = [sys.executable, str(ROOT / "weights" / "train.py"), "--train", str(CORPUS / "train.txt"),
            "--valid", str(CORPUS / "valid.txt"), "--batch-size", "4", "--max-train-bytes", "200000",
            "--max-valid-bytes", "50000", "--eval-windows", "4", "--seed", "3"]
    start = tmp_path / "start"
    proc = subprocess.run(base + ["--out", str(start), "--steps", "10", "--n-layer", "2", "--n-head", "2",
                                  "--n-embd", "32", "--n-positions", "32", "--vocab-size", "300"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by_layer = {}
    for w in ("0", "3"):
        out = tmp_path / f"w{w}"
        proc = subprocess.run(base + ["--out", str(out), "--init", str(start), "--steps", "15", "--lr", "3e-3",
                                      "--warmup", "1", "--eval-every", "15", "--exit-loss-weight", w],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        log = json.loads((out / "train_log.json").read_text())
        assert (out / "tokenizer.json").read_bytes() == (start / "tokenizer.json").read_bytes()
        (step, losses), = log["valid_by_layer"]
        assert step == 15 and len(losses) == 2 and losses[-1] == log["valid"][-1][1]
        by_layer[w] = losses
    assert by_layer["3"][0] < by_layer["0"][0], by_layer

    proc = subprocess.run(base + ["--out", str(tmp_path / "x"), "--init", str(tmp_path), "--steps", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no tokenizer.json" in proc.stderr
    for w in ("nan", "inf", "-1"):
        proc = subprocess.run(base + ["--out", str(tmp_path / "x"), "--init", str(start), "--steps", "1",
                                      "--exit-loss-weight", w], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "--exit-loss-weight must be a finite number" in proc.stderr, w
    # a failed --init (model and tokenizer vocabularies differ) is one line and leaves --out alone
    (tmp_path / "mix").mkdir()
    for name in ("model.safetensors", "config.json"):
        (tmp_path / "mix" / name).write_bytes((start / name).read_bytes())
    (tmp_path / "mix" / "tokenizer.json").write_bytes(
        (ROOT / "weights" / "minigpt2-stories" / "tokenizer.json").read_bytes())
    keep = (tmp_path / "w3" / "tokenizer.json").read_bytes()
    proc = subprocess.run(base + ["--out", str(tmp_path / "w3"), "--init", str(tmp_path / "mix"), "--steps", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--init model has vocab 300, tokenizer 8192" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "w3" / "tokenizer.json").read_bytes() == keep
