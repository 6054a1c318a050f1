"""The CLI as a user runs it (``python -m minadept`` in a subprocess, offline): every bad input
ends with exit status != 0 and exactly one ``error: ...`` line on stderr naming the problem; good
edge cases (empty prompt, a full context, ``--json``) work."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers import EOT_ID, TEXT, cli_env, copy_checkpoint, edit_config, run_cli


def assert_one_line_error(proc, *needles):
    err = proc.stderr
    assert proc.returncode != 0, f"exit status 0 for an error case; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].strip(), f"expected exactly one stderr line, got {lines!r}"
    assert err.endswith("\n")
    assert lines[0].startswith("error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), f"{n!r} not named in {lines[0]!r}"
    assert proc.stdout == "", f"unexpected stdout {proc.stdout!r}"
    return lines[0]


def gen(model_dir, *extra, prompt="Hello", env=None, input=None):
    return run_cli("generate", prompt, "--model", model_dir, *extra, env=env, input=input)


# ----------------------------------------------------------------------------- broken model dirs

@pytest.fixture(scope="module")
def broken(tiny, tmp_path_factory):
    """Broken copies of the tiny checkpoint, by name."""
    root = tmp_path_factory.mktemp("broken")
    src = tiny.path
    weights = (src / "model.safetensors").read_bytes()
    dirs = {}

    def weightless(name):
        d = root / name
        d.mkdir()
        for f in ("config.json", "vocab.json", "merges.txt"):
            shutil.copyfile(src / f, d / f)
        dirs[name] = d
        return d

    weightless("no-weights")
    (weightless("truncated") / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (weightless("truncated-header") / "model.safetensors").write_bytes(weights[:6])
    (weightless("garbage") / "model.safetensors").write_bytes(
        np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes())
    (weightless("empty-file") / "model.safetensors").write_bytes(b"")

    d = dirs["no-tokenizer"] = root / "no-tokenizer"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(src / f, d / f)

    edit_config(copy_checkpoint(src, root / "n_embd"), n_embd=32)
    dirs["n_embd"] = root / "n_embd"
    edit_config(copy_checkpoint(src, root / "n_positions"), n_positions=64)
    dirs["n_positions"] = root / "n_positions"
    edit_config(copy_checkpoint(src, root / "n_layer"), n_layer=4)
    dirs["n_layer"] = root / "n_layer"

    d = dirs["no-config"] = root / "no-config"
    shutil.copytree(src, d)
    (d / "config.json").unlink()
    d = dirs["bad-json"] = root / "bad-json"
    shutil.copytree(src, d)
    (d / "config.json").write_text("{not json")
    dirs["root"] = root
    return dirs


def test_missing_directory(broken):
    missing = broken["root"] / "does-not-exist"
    line = assert_one_line_error(gen(missing), "not found")
    assert str(missing) in line


def test_model_path_is_a_file(tiny):
    assert_one_line_error(gen(tiny.path / "config.json"), "not a directory")


def test_directory_without_tokenizer(broken):
    assert_one_line_error(gen(broken["no-tokenizer"]), "tokenizer", "vocab.json")


def test_missing_config(broken):
    assert_one_line_error(gen(broken["no-config"]), "config.json")


def test_invalid_config_json(broken):
    assert_one_line_error(gen(broken["bad-json"]), "config.json", "JSON")


def test_missing_weights(broken):
    assert_one_line_error(gen(broken["no-weights"]), "model.safetensors")


@pytest.mark.parametrize("name", ["truncated", "truncated-header", "garbage", "empty-file"])
def test_unreadable_weights(broken, name):
    line = assert_one_line_error(gen(broken[name]), "model.safetensors")
    assert str(broken[name] / "model.safetensors") in line


def test_shape_mismatch_names_tensor_and_both_shapes(broken):
    line = assert_one_line_error(gen(broken["n_embd"]), "wte.weight", "[50257, 64]", "[50257, 32]")
    assert "shape" in line


def test_position_table_mismatch(broken):
    assert_one_line_error(gen(broken["n_positions"]), "wpe.weight", "[128, 64]", "[64, 64]")


def test_config_with_more_layers_than_weights(broken):
    assert_one_line_error(gen(broken["n_layer"]), "h.3.", "missing")


def test_unknown_model_id_offline(tmp_path):
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    line = assert_one_line_error(gen("no-such-org-zz9/no-such-model-zz9", env=env), "no-such-org-zz9/no-such-model-zz9")
    assert "hub" in line.lower() or "offline" in line.lower()


# ----------------------------------------------------------------------------- bad settings

def test_prompt_longer_than_context(short_ctx):
    line = assert_one_line_error(gen(short_ctx.path, prompt=TEXT), "16", "context")
    assert "prompt" in line


@pytest.mark.parametrize("value", ["-1", "nan", "-0.5", "inf"])
def test_bad_temperature(tiny, value):
    assert_one_line_error(gen(tiny.path, "--temperature", value), "--temperature")


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
def test_bad_top_p(tiny, value):
    assert_one_line_error(gen(tiny.path, "--top-p", value), "--top-p")


@pytest.mark.parametrize("value", ["0", "-3"])
def test_bad_top_k(tiny, value):
    assert_one_line_error(gen(tiny.path, "--top-k", value), "--top-k")


def test_negative_max_new_tokens(tiny):
    assert_one_line_error(gen(tiny.path, "--max-new-tokens", "-1"), "--max-new-tokens")


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "abc"], "--temperature"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--max-new-tokens", "1.5"], "--max-new-tokens"),
])
def test_argument_errors_are_one_line(tiny, args, needle):
    assert_one_line_error(gen(tiny.path, *args), needle)


def test_missing_command():
    assert_one_line_error(run_cli(), "command")


def test_bad_settings_fail_before_loading_the_model(broken):
    """Setting errors are reported even with a model that would fail to load (checked first)."""
    assert_one_line_error(gen(broken["garbage"], "--top-k", "0"), "--top-k")


# ----------------------------------------------------------------------------- good edge cases

def _greedy_text(model, prompt_ids, n):
    from helpers import minadept_greedy
    toks, _ = minadept_greedy(model, prompt_ids, n)
    return toks, model.tokenizer.decode(toks)


def test_empty_prompt_starts_from_endoftext(tiny, tiny_model):
    p = gen(tiny.path, "--max-new-tokens", "6", "--temperature", "0", "--json", prompt="")
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    summary = json.loads(p.stderr.splitlines()[-1])
    assert summary["prompt_tokens"] == 1 and summary["new_tokens"] == 6
    toks, text = _greedy_text(tiny_model, [EOT_ID], 6)
    assert p.stdout == text + "\n"


def test_json_summary_is_last_stderr_line(tiny, tiny_model):
    prompt = "The quick brown fox"
    p = gen(tiny.path, "--max-new-tokens", "7", "--temperature", "0", "--json", prompt=prompt)
    assert p.returncode == 0, p.stderr
    lines = p.stderr.splitlines()
    assert lines, "no stderr"
    s = json.loads(lines[-1])
    assert isinstance(s, dict)
    for key in ("prompt_tokens", "new_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in s, f"{key} missing from {s}"
    ids = tiny_model.tokenizer.encode(prompt)
    assert s["prompt_tokens"] == len(ids) == 4
    assert s["new_tokens"] == 7
    assert isinstance(s["prefill_tokens_per_s"], (int, float)) and s["prefill_tokens_per_s"] > 0
    assert isinstance(s["decode_tokens_per_s"], (int, float)) and s["decode_tokens_per_s"] > 0
    _, text = _greedy_text(tiny_model, ids, 7)
    assert p.stdout == text + "\n"


def test_prompt_from_stdin(tiny, tiny_model):
    p = gen(tiny.path, "--max-new-tokens", "3", "--temperature", "0", prompt="-", input="Once upon a time")
    assert p.returncode == 0, p.stderr
    _, text = _greedy_text(tiny_model, tiny_model.tokenizer.encode("Once upon a time"), 3)
    assert p.stdout == text + "\n"


def test_negative_seed_is_a_one_line_error(tiny):
    assert_one_line_error(gen(tiny.path, "--seed", "-1"), "--seed")


def test_seeded_sampling_is_reproducible(tiny):
    args = ("--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "50", "--seed", "7")
    a, b = gen(tiny.path, *args), gen(tiny.path, *args)
    assert a.returncode == b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    # and it is the text the Python API samples with the same seed (an independent driver)
    import numpy as np
    from minadept import Engine, Model
    from minadept.generate import generate
    from minadept.sampling import SamplingSettings
    model = Model.load(tiny.path)
    steps = generate(Engine(model), model.tokenizer.encode("Hello"), max_new_tokens=8,
                     sampling=SamplingSettings(temperature=1.0, top_k=50), rng=np.random.default_rng(7),
                     eot_id=model.tokenizer.eot_id)
    assert a.stdout == model.tokenizer.decode([s.token for s in steps]) + "\n"
    other = gen(tiny.path, *args[:-1], "8")
    assert other.stdout != a.stdout, "another seed gave the same text"


def test_generation_that_fills_the_context_stops_and_says_so(short_ctx):
    model = short_ctx.model
    prompt = "Hello world, this is"
    ids = model.tokenizer.encode(prompt)
    n_pos = model.config.n_positions
    assert n_pos == 16 and len(ids) < n_pos
    p = gen(short_ctx.path, "--max-new-tokens", "100", "--temperature", "0", "--json", prompt=prompt)
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    assert any("context" in l and "full" in l for l in lines[:-1]), lines
    s = json.loads(lines[-1])
    assert s["stop_reason"] == "context_full"
    # every position is used; the last token is predicted from the full 16-token context
    assert s["prompt_tokens"] + s["new_tokens"] - 1 == n_pos, s
    _, text = _greedy_text(model, ids, s["new_tokens"])
    assert p.stdout == text + "\n"
    # without --json the message is still there and the exit status is 0
    q = gen(short_ctx.path, "--max-new-tokens", "100", "--temperature", "0", prompt=prompt)
    assert q.returncode == 0 and any("context" in l and "full" in l for l in q.stderr.splitlines())


def test_prompt_exactly_filling_the_context_generates_one_token(short_ctx):
    tok = short_ctx.model.tokenizer
    prompt = tok.decode([262] * 16)          # " the" x 16
    assert tok.encode(prompt) == [262] * 16
    p = gen(short_ctx.path, "--max-new-tokens", "5", "--temperature", "0", "--json", prompt=prompt)
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stderr.splitlines()[-1])
    assert s["prompt_tokens"] == 16 and s["new_tokens"] == 1 and s["stop_reason"] == "context_full"
