"""Nothing a user owns is overwritten, and output problems are reported before the long work:
``calibrate``'s ``--out``/``--force``, the shipped calibration, ``eval --sweep --plot`` and
``dump --out`` checked before computing, and calibration text that is too short refused."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import cli_env, run_cli
from randmodel import random_model

from minadept.checkpoint import default_model_dir

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [default_model_dir() / "adept.safetensors", default_model_dir() / "adept.json"]


def _digest(paths):
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def _one_error(r, code=None):
    lines = r.stderr.strip().splitlines()
    ok = len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return ok and (code is None or r.returncode == code)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """A 3-layer random GPT-2 with the embedded tokenizer and a 16-token context, saved in HF
    layout, so that a real calibration takes a second."""
    from safetensors.numpy import save_file
    d = tmp_path_factory.mktemp("small")
    m = random_model(n_layer=3, n_head=2, n_embd=32, vocab_size=8192, n_positions=16, seed=5)
    p, t = m.params, {}
    t["transformer.wte.weight"], t["transformer.wpe.weight"] = p.wte, p.wpe
    t["transformer.ln_f.weight"], t["transformer.ln_f.bias"] = p.ln_f_g, p.ln_f_b
    names = {"ln_1.weight": "ln_1_g", "ln_1.bias": "ln_1_b", "attn.c_attn.weight": "c_attn_w",
             "attn.c_attn.bias": "c_attn_b", "attn.c_proj.weight": "attn_c_proj_w",
             "attn.c_proj.bias": "attn_c_proj_b", "ln_2.weight": "ln_2_g", "ln_2.bias": "ln_2_b",
             "mlp.c_fc.weight": "c_fc_w", "mlp.c_fc.bias": "c_fc_b", "mlp.c_proj.weight": "mlp_c_proj_w",
             "mlp.c_proj.bias": "mlp_c_proj_b"}
    for i, blk in enumerate(p.h):
        for hf, field in names.items():
            t[f"transformer.h.{i}.{hf}"] = getattr(blk, field)
    save_file(t, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(dict(model_type="gpt2", n_layer=3, n_head=2, n_embd=32,
                                                   vocab_size=8192, n_positions=16)))
    shutil.copyfile(default_model_dir() / "tokenizer.json", d / "tokenizer.json")
    return d


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("text") / "calib.txt"
    f.write_text((ROOT / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    return f


# ----------------------------------------------------------------------------- calibrate --out

def test_calibrate_without_out_refuses_the_packaged_model(text_file):
    before = _digest(SHIPPED)
    r = run_cli("calibrate", "--text", text_file)
    assert _one_error(r, 1), r.stderr
    assert "--out" in r.stderr and "ships inside the minadept package" in r.stderr
    assert _digest(SHIPPED) == before


def test_shipped_calibration_needs_explicit_out_and_force(text_file):
    before = _digest(SHIPPED)
    for out in (str(default_model_dir()), str(SHIPPED[0])):
        r = run_cli("calibrate", "--text", text_file, "--out", out)
        assert _one_error(r, 1), r.stderr
        assert "already exists; pass --force" in r.stderr
    assert _digest(SHIPPED) == before


def test_calibrate_twice_into_the_same_place_needs_force(small_dir, text_file, tmp_path):
    out = tmp_path / "calib"                       # does not exist, no .safetensors suffix: a directory
    args = ["calibrate", "--text", text_file, "--model", small_dir, "--max-tokens", "512", "--kv-rank", "2"]
    r = run_cli(*args, "--out", out)
    assert r.returncode == 0, r.stderr
    written = [out / "adept.safetensors", out / "adept.json"]
    assert all(p.is_file() for p in written)
    first = _digest(written)
    r = run_cli(*args, "--out", out)
    assert _one_error(r, 1), r.stderr
    assert "already exists; pass --force" in r.stderr
    assert _digest(written) == first
    r = run_cli(*args, "--out", out, "--force", "--seed", "7")
    assert r.returncode == 0, r.stderr
    assert _digest(written) != first                # really rewritten (another seed)
    # without --out, a model outside the package gets its calibration beside it, once
    model_copy = shutil.copytree(small_dir, tmp_path / "model")
    r = run_cli(*args[:3], "--model", model_copy, *args[5:])
    assert r.returncode == 0 and (model_copy / "adept.safetensors").is_file(), r.stderr
    r = run_cli(*args[:3], "--model", model_copy, *args[5:])
    assert _one_error(r, 1) and "--force" in r.stderr


def test_calibrate_creates_nested_out_directory_and_removes_it_on_failure(small_dir, text_file, tmp_path,
                                                                          monkeypatch, capsys):
    out = tmp_path / "a" / "b"
    r = run_cli("calibrate", "--text", text_file, "--model", small_dir, "--max-tokens", "512", "--kv-rank", "2",
                "--out", out)
    assert r.returncode == 0 and (out / "adept.safetensors").is_file(), r.stderr
    # a failure after the directory was made leaves nothing behind
    import minadept.exits.calibrate as cal
    from minadept.cli import main
    from minadept.errors import MinadeptError

    def fail(*a, **k):
        raise MinadeptError("calibration failed")
    monkeypatch.setattr(cal, "calibrate", fail)
    code = main(["calibrate", "--text", str(text_file), "--model", str(small_dir), "--max-tokens", "512",
                 "--out", str(tmp_path / "c" / "d")])
    assert code == 1 and "calibration failed" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("out, msg", [
    ("{file}/sub", "is a file, not a directory"),
    ("{file}/x.safetensors", "output directory does not exist"),
    ("/proc/minadept-x.safetensors", "cannot write"),
    ("x.json", "must name a .safetensors file or a directory"),
    ("{file}-cal.npz", "looks like a file name"),
    ("", "--out is empty"),
])
def test_unusable_calibrate_out_fails_before_any_work(small_dir, text_file, tmp_path, out, msg):
    f = tmp_path / "plain-file"
    f.write_text("x")
    r = run_cli("calibrate", "--text", text_file, "--model", small_dir, "--max-tokens", "512",
                "--out", out.format(file=f))
    assert _one_error(r, 1), r.stderr
    assert msg in r.stderr
    assert "full-depth states" not in r.stderr     # no progress bar: nothing was computed


def test_too_little_calibration_text_is_refused_with_the_reason(small_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a fox. " * 8)
    r = run_cli("calibrate", "--text", short, "--model", small_dir, "--out", tmp_path / "o")
    assert _one_error(r, 1), r.stderr
    assert "calibration text is too short" in r.stderr and "longer text" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_cli("calibrate", "--text", short, "--model", small_dir, "--max-tokens", "100")
    assert _one_error(r, 1) and "--max-tokens must be at least 320" in r.stderr, r.stderr


# ----------------------------------------------------------------------------- eval --plot, dump --out

@pytest.fixture()
def no_matplotlib(tmp_path):
    """An environment in which ``import matplotlib`` fails, as on a machine without the extra."""
    block = tmp_path / "block" / "matplotlib"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('matplotlib is not installed')\n")
    return cli_env(PYTHONPATH=str(tmp_path / "block"))


def test_sweep_plot_without_matplotlib_fails_before_the_sweep(small_dir, text_file, tmp_path, no_matplotlib):
    r = run_cli("eval", "--text", text_file, "--model", small_dir, "--sweep", "--plot", tmp_path / "s.png",
                env=no_matplotlib)
    assert _one_error(r, 1), r.stderr
    assert "--plot needs matplotlib" in r.stderr
    assert r.stdout == ""                           # no sweep row was printed


@pytest.mark.parametrize("plot, msg", [
    ("/nonexistent-dir/s.png", "output directory does not exist"),
    ("{dir}", "is a directory"),
    ("{dir}/s.notanimage", "unknown image type"),
])
def test_sweep_plot_to_a_bad_path_fails_before_the_sweep(small_dir, text_file, tmp_path, plot, msg):
    pytest.importorskip("matplotlib")
    r = run_cli("eval", "--text", text_file, "--model", small_dir, "--sweep", "--plot", plot.format(dir=tmp_path))
    assert _one_error(r, 1), r.stderr
    assert msg in r.stderr and r.stdout == ""


def test_dump_to_a_bad_path_fails_before_running(small_dir, tmp_path):
    r = run_cli("dump", "--prompt", "hello", "--model", small_dir, "--out", tmp_path / "missing" / "d.npz")
    assert _one_error(r, 1) and "output directory does not exist" in r.stderr, r.stderr
    r = run_cli("dump", "--prompt", "hello", "--model", small_dir, "--out", tmp_path)
    assert _one_error(r, 1) and "is a directory" in r.stderr, r.stderr
    r = run_cli("dump", "--prompt", "hello", "--model", small_dir, "--out", tmp_path / "d.npz")
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "d.npz")["logits"].shape[1] == 8192
