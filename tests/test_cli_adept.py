"""``minadept calibrate`` and ``--exit adept`` on the embedded model: the shipped policy
file fits its budget and loads, calibration runs end to end from the CLI, bad settings are
one-line errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from minadept.checkpoint import default_model_dir
from minadept.exits.adept import ADEPT_FILE, AdeptParams, load_adept, save_adept
from minadept.model import Model

from helpers import TEXT, shared_corpus

#: stands for an existing text file in the argument lists below (written per test)
TEXT_FILE = "@TEXT_FILE@"


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "minadept", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(r):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    return r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr


def test_shipped_policy_loads_and_fits_the_budget():
    model = Model.load()
    p = load_adept(model.path / ADEPT_FILE, model.config)
    assert p.n_params <= 0.15 * model.n_params, (p.n_params, model.n_params)
    assert 0 < p.threshold <= 1
    size = sum(f.stat().st_size for f in default_model_dir().iterdir() if f.is_file())
    assert size < 80e6, size


def test_generate_with_adept_reports_exits():
    r = cli("generate", "Once upon a time", "--exit", "adept", "--temperature", "0",
            "--max-new-tokens", "24", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stderr.strip().splitlines()[-1])
    assert len(s["exit_layers"]) >= 1 and all(1 <= k <= 12 for k in s["exit_layers"])
    assert s["compute_fraction"] is not None


def test_identity_mappers_change_the_predictions():
    """Same policy and threshold; the learned exit map must matter when tokens exit."""
    outs = []
    for m in ("learned", "identity"):
        r = cli("generate", "Once upon a time", "--exit", "adept", "--threshold", "0.5",
                "--temperature", "0", "--max-new-tokens", "16", "--exit-map", m, "--json")
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert outs[0] != outs[1]


@pytest.mark.parametrize("args, msg", [
    (["generate", "x", "--exit", "adept", "--adept", "/nonexistent/adept.safetensors"], "no calibrated ADEPT policy"),
    (["generate", "x", "--exit-map", "identity"], "--exit-map works only with --exit adept"),
    (["generate", "x", "--exit", "adept", "--kv-map", "sometimes"], "--kv-map must be learned or identity"),
    (["generate", "x", "--exit", "adept", "--threshold", "1.5"], "--threshold must be in [0, 1]"),
    (["calibrate", "--text", "/nonexistent.txt"], "text file not found"),
    (["calibrate", "--text", TEXT_FILE, "--max-tokens", "10"], "--max-tokens must be at least 5120"),
    (["calibrate", "--text", TEXT_FILE, "--cost-weight", "-1"], "--cost-weight"),
    (["calibrate", "--text", TEXT_FILE, "--out", "/nonexistent/dir/x.safetensors"], "output directory does not exist"),
    (["calibrate", "--text", TEXT_FILE], "ships inside the minadept package"),
    (["calibrate", "--text", TEXT_FILE, "--kv-rank", "0"], "--kv-rank must be >= 1"),
    (["calibrate", "--text", TEXT_FILE, "--out", "/tmp/adept.json"], "--out must name a .safetensors file"),
    (["calibrate", "--text", TEXT_FILE, "--out", str(default_model_dir() / "model.safetensors")],
     "refusing to overwrite model weights"),
    (["calibrate", "--text", TEXT_FILE, "--out", "/tmp/" + "x" * 300 + ".safetensors"], "bad --out"),
    (["eval", "--text", TEXT_FILE, "--sweep", "--exit", "adept"], "--exit has no effect with --sweep"),
    (["eval", "--text", TEXT_FILE, "--sweep", "--threshold", "0.5"], "--threshold has no effect with --sweep"),
    (["generate", "x", "--exit", "adept", "--kv", "oracle", "--kv-map", "learned"], "--kv-map learned works only with --kv propagate"),
    (["generate", "x", "--exit", "adept", "--adept", ""], "--adept is empty"),
    (["dump", "--prompt", "x", "--out", "/tmp"], "--out is a directory"),
])
def test_bad_adept_settings_are_one_line_errors(args, msg, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text((TEXT + "\n") * 100, encoding="utf-8")
    r = cli(*[str(text) if a == TEXT_FILE else a for a in args])
    assert one_error_line(r), r.stderr
    assert msg in r.stderr, r.stderr


def test_policy_file_of_another_shape_is_one_line_error(tmp_path):
    L, C = 4, 16
    bad = AdeptParams(np.zeros((L - 1, C, C), np.float32), np.zeros((L - 1, C), np.float32),
                      np.zeros((3, C, 2), np.float32), np.zeros((3, 2, C), np.float32),
                      np.zeros((3, C), np.float32), np.zeros((L - 1, C + 2), np.float32),
                      np.zeros(L - 1, np.float32), threshold=0.9)
    path = tmp_path / "other.safetensors"
    save_adept(bad, path)
    r = cli("generate", "x", "--exit", "adept", "--adept", str(path))
    assert one_error_line(r), r.stderr
    assert "tensor 'exit_w' has shape (3, 16, 16)" in r.stderr


def test_calibrate_command_end_to_end(tmp_path, shared_corpus_dir):
    text = tmp_path / "calib.txt"
    text.write_text((shared_corpus_dir / "train.txt").read_text(encoding="utf-8")[:40000], encoding="utf-8")
    out = tmp_path / "adept.safetensors"
    r = cli("calibrate", "--text", str(text), "--max-tokens", "5120", "--out", str(tmp_path), "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "default threshold" in r.stdout
    model = Model.load()
    p = load_adept(out, model.config)
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["seed"] == 3 and info["calibration_tokens"] == 16 * 256
    assert p.threshold in [row["tau"] for row in info["threshold_search"]["rows"]]
    assert info["threshold"] == p.threshold
    assert info["target_met"] == ("warning: no threshold" not in r.stderr)
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    for ref in (out, tmp_path):                  # the file or its directory
        r = cli("eval", "--text", str(text), "--max-tokens", "600", "--exit", "adept", "--adept", str(ref),
                "--kv-map", "identity", "--json")
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout.strip().splitlines()[-1])
        assert res["exit"] == "adept" and res["threshold"] == p.threshold
        assert res["exit_map"] == "learned" and res["kv_map"] == "identity"


def test_eval_sweep_includes_the_calibrated_policy(shared_corpus_dir):
    valid = shared_corpus_dir / "valid.txt"
    r = cli("eval", "--text", str(valid), "--max-tokens", "300", "--sweep", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout.strip().splitlines()[-1])["sweep"]
    adept = [row for row in rows if row["exit"] == "adept"]
    assert len(adept) >= 3
    assert all(0 < row["compute_fraction"] < 1.05 for row in adept)
