"""Does early exit save time? ADEPT at the shipped default against full depth, and against an
older model's full depth, on the same prompts in one process. Not a test.

Prompts: 8 passages of ``../shared/corpus/valid.txt`` (evenly spaced documents, each cut to at most
96 tokens of the new model's tokenizer at a line or word end), 128 greedy new tokens each.
Rounds alternate the order of the engines, so drifts of this shared machine hit all alike; each
round times every engine on all prompts and its figures are the round's totals (tokens / seconds);
the table gives medians over the rounds.

  1. speed (``--rounds``, >= 5): fast backend: new full depth, new ADEPT at its calibrated
     default, old full depth; NumPy backend: new full depth and new ADEPT (decode). Prefill and
     decode in tokens/s and in bytes of text per second (prompt bytes / prefill time, generated
     text's bytes / decode time);
  2. a per-token breakdown of ADEPT decode on the fast backend, before (the block-by-block Python
     loop, ``fused._decode_loop``, each piece timed through wrappers) and after (the compiled step,
     ``DecodePlan.step_adept``), each against the same tokens' blocks and LM head alone. Writes
     ``bench/results/exit_speed.{md,json}``.

    python bench/bench_exit_speed.py [--old DIR] [--new DIR] [--rounds 5] [--threads 2]

``--old`` defaults to the embedded model of git revision 341b187 (extracted with ``git show``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minadept import backend
from minadept import fused as F
from minadept.model import Model
from minadept.settings import EngineSettings, build_engine

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT.parent / "shared" / "corpus" / "valid.txt"
OLD_REV = "341b187"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "adept.safetensors", "adept.json")


def extract_model(rev: str, dest: Path) -> Path:
    """The embedded model's files at git revision ``rev``, written into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        blob = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:weights/minigpt2-stories/{name}"],
                              capture_output=True, check=True).stdout
        (dest / name).write_bytes(blob)
    return dest


def prompts(tok, n: int = 8, max_tokens: int = 96) -> list[str]:
    """n passages from evenly spaced documents of valid.txt, each the longest prefix of whole
    lines or words that encodes to at most ``max_tokens`` tokens."""
    docs = [d for d in VALID.read_text(encoding="utf-8").split("\n<|endoftext|>\n") if len(d) > 2000]
    out = []
    for d in (docs[i] for i in np.linspace(0, len(docs) - 1, n).astype(int)):
        words, text = d[:2000].split(" "), ""
        for w in words:
            nxt = f"{text} {w}" if text else w
            if len(tok.encode(nxt)) > max_tokens:
                break
            text = nxt
        out.append(text)
    return out


def time_engine(engine, texts: list[str], new_tokens: int) -> dict:
    """Totals over ``texts``: prompt tokens and bytes, prefill seconds, generated tokens and
    bytes, decode seconds (greedy)."""
    tok, t = engine.model.tokenizer, dict(pre_tok=0, pre_bytes=0, pre_s=0.0, dec_tok=0, dec_bytes=0, dec_s=0.0)
    for text in texts:
        ids = tok.encode(text)
        cache = engine.new_cache(len(ids) + new_tokens)
        t0 = time.perf_counter()
        r = engine.forward(ids, cache)
        t1 = time.perf_counter()
        out = [int(np.argmax(r.logits[-1]))]
        for i in range(new_tokens - 1):
            r = engine.forward([out[-1]], cache, step=i + 1)
            out.append(int(np.argmax(r.logits[-1])))
        t2 = time.perf_counter()
        t["pre_tok"] += len(ids)
        t["pre_bytes"] += len(text.encode())
        t["pre_s"] += t1 - t0
        t["dec_tok"] += new_tokens - 1            # the first new token comes from the prefill
        t["dec_bytes"] += len(tok.decode(out[1:]).encode())
        t["dec_s"] += t2 - t1
    return t


def speed_rounds(engines: dict, texts: list[str], new_tokens: int, rounds: int) -> dict:
    """Per engine name: medians over alternating rounds of prefill/decode tokens/s and bytes/s."""
    names, per = list(engines), {n: [] for n in engines}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            be, eng = engines[n]
            with backend.using(be):
                per[n].append(time_engine(eng, texts, new_tokens))
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {per[n][-1]['dec_tok'] / per[n][-1]['dec_s']:.0f} tok/s" for n in names), file=sys.stderr)
    med = lambda n, a, b: statistics.median(x[a] / x[b] for x in per[n])
    return {n: {"prefill_tok_s": med(n, "pre_tok", "pre_s"), "decode_tok_s": med(n, "dec_tok", "dec_s"),
                "prefill_bytes_s": med(n, "pre_bytes", "pre_s"), "decode_bytes_s": med(n, "dec_bytes", "dec_s"),
                "rounds": per[n]} for n in names}


# ----------------------------------------------------------------------------- breakdown

class Clock:
    """Seconds spent per named piece."""

    def __init__(self):
        self.s: dict[str, float] = {}

    def wrap(self, name, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.s[name] = self.s.get(name, 0.0) + time.perf_counter() - t0
        return timed


class TimedPlan:
    """A DecodePlan whose block, embed and head calls are timed (attributes pass through)."""

    def __init__(self, plan, clock: Clock):
        self._plan, self.block, self.blocks_range = plan, clock.wrap("blocks", plan.block), clock.wrap("blocks", plan.blocks_range)
        self.embed, self.head = clock.wrap("embed", plan.embed), clock.wrap("head", plan.head)

    def __getattr__(self, name):
        return getattr(self._plan, name)


def decode_tokens(engine, ids, new_tokens: int):
    """Greedy decode after prefilling ``ids``: (cache before decode, tokens fed, exit layers)."""
    cache = engine.new_cache(len(ids) + new_tokens)
    r = engine.forward(ids, cache)
    start = cache.kv.copy(), cache.length
    fed, exits = [], []
    for i in range(new_tokens):
        fed.append(int(np.argmax(r.logits[-1])))
        r = engine.forward([fed[-1]], cache, step=i + 1)
        exits.append(int(r.exit_layers[0]))
    return start, fed, exits


def replay(engine, start, fed, step_fn) -> float:
    """Seconds of ``step_fn(token, cache, step)`` over the fed tokens from the saved cache."""
    cache = engine.new_cache(start[0].shape[3])
    cache.kv[...] = start[0]
    cache.length = start[1]
    t0 = time.perf_counter()
    for i, t in enumerate(fed):
        step_fn(t, cache, i + 1)
    return time.perf_counter() - t0


def breakdown(engine, texts, new_tokens: int) -> dict:
    """Per-token microseconds of ADEPT decode on the same tokens from the same caches: ``bare``
    (embed, blocks 1..k at each token's recorded exit layer k, LM head: no exit machinery),
    ``before`` (the block-by-block Python loop, its pieces timed through wrappers) and ``after``
    (the compiled step). Each side's exit machinery is its total minus ``bare``. All inside
    ``single_threaded_blas``, as ``Engine.forward`` runs decode."""
    plan, clock = engine.model.decode_plan, Clock()
    runs = [decode_tokens(engine, engine.model.tokenizer.encode(t), new_tokens) for t in texts]
    n = sum(len(f) for _, f, _ in runs)
    timed, secs = TimedPlan(plan, clock), {"bare": 0.0, "before": 0.0, "after": 0.0}
    x, logits = np.empty(engine.config.n_embd, np.float32), np.empty(engine.config.vocab_size, np.float32)

    def bare_step(exits):
        it = iter(exits)

        def step(t, c, s):
            plan.embed(t, c.length, x)
            plan.blocks_range(0, next(it), x, c.kv, c.length)
            plan.head(x, logits)
            c.length += 1
        return step
    with backend.single_threaded_blas():
        for _ in range(2):                         # two passes: the second one counts (warm)
            clock.s.clear()
            secs = dict.fromkeys(secs, 0.0)
            for start, fed, exits in runs:
                secs["bare"] += replay(engine, start, fed, bare_step(exits))
                secs["after"] += replay(engine, start, fed, lambda t, c, s: F.decode_one(engine, t, c, s, plan))
                with timed_pieces(engine, clock):
                    secs["before"] += replay(engine, start, fed, lambda t, c, s: F._decode_loop(engine, t, c, s, timed, True))
    us = {k: 1e6 * v / n for k, v in secs.items()}
    pieces = {k: 1e6 * v / n for k, v in clock.s.items()}
    pieces["python glue"] = us["before"] - sum(pieces.values())
    return {"tokens": n, "mean_exit_layer": float(np.mean([e for _, _, ex in runs for e in ex])),
            "bare_us": us["bare"], "before_us": dict(pieces, total=us["before"], exit_machinery=us["before"] - us["bare"]),
            "after_us": {"total": us["after"], "exit_machinery": us["after"] - us["bare"]}}


class timed_pieces:
    """Wrap the engine's gate, propagation and exit map with ``clock`` inside the block."""

    def __init__(self, engine, clock):
        self.engine, self.clock = engine, clock

    def __enter__(self):
        e, c = self.engine, self.clock
        self.saved = e.policy.decide, e._propagate, e.exit_mapper
        e.policy.decide, e._propagate = c.wrap("gate", self.saved[0]), c.wrap("propagation", self.saved[1])
        e.exit_mapper = c.wrap("exit map", self.saved[2]) if self.saved[2] else None

    def __exit__(self, *exc):
        self.engine.policy.decide, self.engine._propagate, self.engine.exit_mapper = self.saved


# ----------------------------------------------------------------------------- main

def engines_for(new: Model, old: Model):
    """The timed engines: (backend, engine) by name."""
    adept = lambda: build_engine(new, EngineSettings(exit="adept"))
    full = lambda m: build_engine(m, EngineSettings())
    es = {"new full (fast)": ("fast", full(new)), "new adept (fast)": ("fast", adept()),
          "old full (fast)": ("fast", full(old)), "new full (numpy)": ("numpy", full(new)),
          "new adept (numpy)": ("numpy", adept())}
    for be, e in es.values():
        with backend.using(be):
            e.prepare()
    return es


def ratios(sp: dict) -> dict:
    """The issue's ratios from the speed table."""
    r = lambda a, b, f: sp[a][f] / sp[b][f]
    return {"adept_vs_full_decode_fast": r("new adept (fast)", "new full (fast)", "decode_tok_s"),
            "adept_vs_full_prefill_fast": r("new adept (fast)", "new full (fast)", "prefill_tok_s"),
            "adept_vs_full_decode_numpy": r("new adept (numpy)", "new full (numpy)", "decode_tok_s"),
            "adept_vs_old_full_decode_bytes": r("new adept (fast)", "old full (fast)", "decode_bytes_s"),
            "adept_vs_old_full_prefill_bytes": r("new adept (fast)", "old full (fast)", "prefill_bytes_s")}


def write(out: Path, res: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    sp, lines = res["speed"], [f"# Early exit that pays: speed ({res['settings']['rounds']} alternating rounds, "
                               f"{res['settings']['prompts']} prompts, {res['settings']['new_tokens']} new tokens, "
                               f"{res['settings']['threads']} threads)", "",
                               f"Regenerate: `python bench/bench_exit_speed.py` (new = {res['settings']['new']}, "
                               f"old = {res['settings']['old']}).", "",
                               "| engine | prefill tok/s | decode tok/s | prefill bytes/s | decode bytes/s |",
                               "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {v['prefill_tok_s']:.0f} | {v['decode_tok_s']:.1f} | {v['prefill_bytes_s']:.0f} | "
              f"{v['decode_bytes_s']:.0f} |" for n, v in sp.items()]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in res["ratios"].items()]
    b = res["breakdown"]
    lines += ["", f"## ADEPT decode, per token (µs; {b['tokens']} tokens, mean exit layer {b['mean_exit_layer']:.2f})", "",
              "Same tokens from the same caches. *bare*: embed, blocks 1..k at each token's exit layer k "
              "and the LM head, no exit machinery; each side's exit machinery is its total minus bare.", "",
              f"| | µs per token |", "|---|---:|", f"| bare (blocks + head) | {b['bare_us']:.1f} |"]
    lines += [f"| before (Python loop): {k} | {v:.1f} |" for k, v in b["before_us"].items()]
    lines += [f"| after (compiled step): {k} | {v:.1f} |" for k, v in b["after_us"].items()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new", default=str(ROOT / "weights" / "minigpt2-stories"))
    ap.add_argument("--old", default=None, help=f"old model directory (default: the embedded model at {OLD_REV})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "exit_speed"))
    args = ap.parse_args(argv)
    if not VALID.is_file():
        sys.exit(f"error: {VALID} is missing (the prompts come from it)")
    threadpool_limits(args.threads)
    old_dir = Path(args.old) if args.old else extract_model(OLD_REV, Path(tempfile.mkdtemp()) / "old")
    new, old = Model.load(args.new), Model.load(str(old_dir))
    texts = prompts(new.tokenizer, args.prompts)
    es = engines_for(new, old)
    sp = speed_rounds(es, texts, args.new_tokens, args.rounds)
    with backend.using("fast"):
        bd = breakdown(es["new adept (fast)"][1], texts, args.new_tokens)
    res = {"settings": dict(vars(args), old=args.old or f"git {OLD_REV}", prompt_tokens_max=96,
                            threads_blas=args.threads), "speed": sp, "ratios": ratios(sp), "breakdown": bd}
    write(Path(args.out), res)
    print(Path(args.out).with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
