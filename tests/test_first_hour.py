"""What a newcomer meets in the first hour with ``minadept generate``: the README's first command
shows early exit paying off, thread defaults that suit the model's size, a prefill figure without
one-time set-up, Ctrl-C and <|endoftext|> reported cleanly, exit marks readable on a terminal,
defaults in --help, no silent flag abbreviations, and the policy settings in the JSON summary."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli

import minadept.generate as G
from minadept import Engine, Model, backend
from minadept.cli import main
from minadept.exits.policies import make_policy

ROOT = Path(__file__).resolve().parents[1]


def _summary(stderr: str) -> dict:
    return json.loads(stderr.strip().splitlines()[-1])


def _readme_first_command() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    line = next(l for l in block.splitlines() if "minadept generate" in l)
    return shlex.split(line.split("&&")[-1].strip())


def test_readme_first_command_shows_early_exit_that_saves_compute():
    cmd = _readme_first_command()
    assert cmd[:2] == ["minadept", "generate"]
    layers = set()
    for seed in (0, 1, 2):
        r = run_cli(*cmd[1:], "--seed", str(seed), "--json")
        assert r.returncode == 0, r.stderr
        s = _summary(r.stderr)
        assert s["compute_fraction"] < 1.0, s
        layers |= set(s["exit_layers"])
        assert re.search(r"\[\d+\]", r.stdout), "no exit marks in the text"
    assert len(layers) >= 4, layers


@pytest.fixture(scope="module")
def embedded():
    return Model.load()


# ----------------------------------------------------------------------------- threads

def test_default_threads_follow_the_model_size():
    cores = backend.available_cores()
    assert backend.default_threads(27 << 20) == 1
    assert backend.default_threads(backend.SMALL_MODEL_BYTES) == 1
    assert backend.default_threads(backend.SMALL_MODEL_BYTES + 1) == cores
    assert backend.default_threads(500 << 20) == cores


def test_summary_reports_the_threads_that_ran():
    r = run_cli("generate", "Hi", "--max-new-tokens", "2", "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    assert _summary(r.stderr)["threads"] == 1              # the embedded model is 27 MB
    r = run_cli("generate", "Hi", "--max-new-tokens", "2", "--seed", "0", "--threads", "2", "--json")
    assert _summary(r.stderr)["threads"] == 2
    r = run_cli("generate", "Hi", "--max-new-tokens", "2", "--seed", "0")
    assert ", 1 thread" in r.stderr.strip().splitlines()[-1]


def test_the_default_is_applied_to_blas(monkeypatch, capsys):
    from threadpoolctl import threadpool_info
    seen = []
    real = G.generate

    def spy(*a, **k):
        seen.append({p["user_api"]: p["num_threads"] for p in threadpool_info()})
        yield from real(*a, **k)
    monkeypatch.setattr(G, "generate", spy)
    assert main(["generate", "Hi", "--max-new-tokens", "1", "--seed", "0"]) == 0
    assert seen and seen[0].get("blas") == 1


# ----------------------------------------------------------------------------- prefill figure

def test_prepare_builds_everything_a_first_pass_would(embedded, monkeypatch):
    policy = make_policy("saturation", embedded.config, threshold=0.5)
    engine = Engine(embedded, policy)
    engine.prepare()
    assert "lm_head_t" in vars(embedded) and "stacked" in vars(engine)
    if backend.kernels() is not None:
        assert vars(embedded).get("decode_plan") is not None
    import minadept.engine as E

    def no_more(*a, **k):
        raise AssertionError("built during a timed pass")
    monkeypatch.setattr(E, "StackedKV", no_more)
    monkeypatch.setattr(type(embedded), "decode_plan", property(lambda self: vars(self)["decode_plan"]))
    ids = embedded.tokenizer.encode("Once upon a time there was a fox")
    cache = engine.new_cache(len(ids) + 2)
    r = engine.forward(ids, cache)
    assert (r.exit_layers < embedded.config.n_layer).any()       # exits happened: propagation ran
    engine.forward([int(r.logits[-1].argmax())], cache, step=1)


def test_prefill_speed_excludes_set_up(monkeypatch, capsys):
    """With a clock that moves 1 s per reading and a set-up that takes 1000 s, the prefill figure
    must not include the set-up, while the time to the first token does."""
    import minadept.cli as cli
    clock = [0.0]

    def tick():
        clock[0] += 1.0
        return clock[0]

    real_prepare = Engine.prepare

    def slow_prepare(self):
        real_prepare(self)
        clock[0] += 1000.0
    monkeypatch.setattr(cli.time, "perf_counter", tick)
    monkeypatch.setattr(Engine, "prepare", slow_prepare)
    assert main(["generate", "Once upon a time", "--max-new-tokens", "3", "--seed", "0", "--json"]) == 0
    s = _summary(capsys.readouterr().err)
    assert s["prefill_tokens_per_s"] >= s["prompt_tokens"] / 2.0      # at most 2 ticks
    assert s["time_to_first_token_s"] >= 1000.0


# ----------------------------------------------------------------------------- stops

def test_ctrl_c_ends_the_line_prints_the_partial_summary_then_the_error(monkeypatch, capsys):
    real = G.generate

    def interrupted(*a, **k):
        for i, step in enumerate(real(*a, **k)):
            if i == 3:
                raise KeyboardInterrupt
            yield step
    monkeypatch.setattr(G, "generate", interrupted)
    code = main(["generate", "Once upon a time", "--max-new-tokens", "20", "--seed", "0", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert code == 130
    assert out.endswith("\n") and out.strip()
    lines = err.strip().splitlines()
    assert lines[-1] == "error: interrupted"
    assert lines[-2].startswith("prompt tokens 4, new tokens 4") and "interrupted" in lines[-2]


def test_endoftext_stop_is_reported(monkeypatch, capsys, embedded):
    eot = embedded.tokenizer.eot_id
    calls = []

    def sample(logits, settings, rng):
        calls.append(1)
        return eot if len(calls) == 3 else int(np.argmax(logits))
    monkeypatch.setattr(G, "sample", sample)
    assert main(["generate", "Once upon a time", "--max-new-tokens", "20", "--seed", "0"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("; stopped at <|endoftext|>")


# ----------------------------------------------------------------------------- marks, help, flags, JSON

def test_show_exits_tags_and_colour_with_a_legend():
    r = run_cli("generate", "Once upon a time", "--exit", "adept", "--show-exits", "tags", "--max-new-tokens", "8",
                "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert len(re.findall(r"\[\d+\]", r.stdout)) >= 4 and "\x1b[" not in r.stdout
    r = run_cli("generate", "Once upon a time", "--exit", "adept", "--show-exits", "color", "--max-new-tokens", "8",
                "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "\x1b[38;5;" in r.stdout
    legend = r.stderr.splitlines()[0]
    assert legend.startswith("exit layer:") and all(f"m{k}\x1b[0m" in legend for k in range(1, 13))


def test_help_states_the_defaults():
    out = run_cli("generate", "--help").stdout
    flat = " ".join(out.split())
    for expected in ("none (full depth, the default)", "confidence 0.9", "margin 0.8", "saturation 0.99",
                     "constant (default)", "propagate (default)", "eager (default)",
                     "tokens to generate at most (default 100)"):
        assert expected in flat, expected


@pytest.mark.parametrize("flag", ["--max-new-token", "--temp", "--show-exit"])
def test_flag_prefixes_are_not_accepted(flag):
    r = run_cli("generate", "x", flag, "3")
    assert r.returncode == 2 and "unrecognized arguments" in r.stderr


def test_generate_json_has_the_policy_settings():
    r = run_cli("generate", "Hi", "--exit", "adept", "--threshold", "0.9", "--max-new-tokens", "2", "--seed", "0",
                "--json")
    s = _summary(r.stderr)
    assert (s["exit"], s["threshold"], s["kv"], s["kv_fill"], s["exit_map"], s["kv_map"]) == \
        ("adept", 0.9, "propagate", "eager", "learned", "learned")
    r = run_cli("generate", "Hi", "--exit", "fixed", "--exit-layer", "5", "--max-new-tokens", "2", "--json")
    s = _summary(r.stderr)
    assert s["exit"] == "fixed" and s["exit_layer"] == 5 and set(s["exit_layers"]) == {5}


def test_json_reports_the_sampling_settings_and_a_seed_that_repeats_the_run():
    r = run_cli("generate", "Once upon a time", "--max-new-tokens", "12", "--json")
    s = _summary(r.stderr)
    assert (s["temperature"], s["top_k"], s["top_p"]) == (0.8, 40, 1.0) and isinstance(s["seed"], int)
    again = run_cli("generate", "Once upon a time", "--max-new-tokens", "12", "--seed", str(s["seed"]), "--json")
    assert again.stdout == r.stdout and _summary(again.stderr)["seed"] == s["seed"]


def test_decay_schedule_settings_do_not_collide_with_sampling_temperature():
    r = run_cli("generate", "Hi", "--exit", "saturation", "--schedule", "decay", "--temperature", "0",
                "--max-new-tokens", "2", "--json")
    s = _summary(r.stderr)
    assert s["temperature"] == 0.0 and s["schedule"] == "decay"
    assert s["schedule_temperature"] == 4.0 and s["schedule_horizon"] == 2


def test_more_threads_than_cores_is_an_error():
    r = run_cli("generate", "Hi", "--threads", str(backend.available_cores() + 1))
    assert r.returncode == 1
    assert r.stderr.startswith("error: --threads must be in [1, ") and r.stderr.count("\n") == 1


def test_the_json_beside_a_calibration_is_not_taken_for_it():
    json_path = Model.load().path / "adept.json"
    r = run_cli("generate", "Hi", "--exit", "adept", "--adept", json_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "not the .json written beside it" in r.stderr


def test_tokenizer_rejects_what_it_cannot_encode_or_decode(embedded):
    from minadept.errors import MinadeptError
    tok = embedded.tokenizer
    with pytest.raises(MinadeptError, match="token id out of range"):
        tok.decode([1, 99999])
    with pytest.raises(MinadeptError, match="must be integer token ids"):
        tok.decode([1.5])
    with pytest.raises(MinadeptError, match="text to encode must be a str, got int"):
        tok.encode(123)
    assert tok.decode(tok.encode("Once upon a time")) == "Once upon a time"


def test_prepare_folds_every_exit_layer_of_the_learned_kv_maps(embedded):
    from minadept.settings import EngineSettings, build_engine
    eng = build_engine(embedded, EngineSettings(exit="adept", threshold=0.5))
    eng.prepare()
    folded = dict(eng.stacked._folded)
    assert sorted(folded) == list(range(1, embedded.config.n_layer))
    ids = embedded.tokenizer.encode("Once upon a time there was a fox who lived by the sea")
    r = eng.forward(ids, eng.new_cache(len(ids)))
    assert (r.exit_layers < embedded.config.n_layer).any()
    assert all(eng.stacked._folded[k] is folded[k] for k in folded)      # nothing folded while timed


def test_compare_reports_full_depth_speeds_and_the_ratios():
    r = run_cli("generate", "Once upon a time", "--exit", "adept", "--compare", "--max-new-tokens", "12",
                "--seed", "0", "--json")
    assert r.returncode == 0, r.stderr
    s = _summary(r.stderr)
    assert s["full_depth_decode_tokens_per_s"] > 0 and s["full_depth_prefill_tokens_per_s"] > 0
    assert s["decode_speedup"] == round(s["decode_tokens_per_s"] / s["full_depth_decode_tokens_per_s"], 3)
    assert s["prefill_speedup"] == round(s["prefill_tokens_per_s"] / s["full_depth_prefill_tokens_per_s"], 3)
    human = run_cli("generate", "Once upon a time", "--exit", "adept", "--compare", "--max-new-tokens", "12",
                    "--seed", "0").stderr.strip().splitlines()[-1]
    assert human.startswith("full depth on the same prompt: prefill ") and "this run: prefill " in human
