"""NumPy vs Cython backend on the embedded model, full depth and with early exit.
Not a test: one process, same prompts, the two backends alternate; prints tokens/s and ratios.

    python bench/bench_backends.py [--prompts 4] [--prompt-tokens 64] [--new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minadept import backend
from minadept.exits.adept import load_adept
from minadept.model import Model
from minadept.settings import EngineSettings, build_engine

VALID = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "valid.txt"


def generate_greedy(engine, prompt, n_new):
    cache = engine.new_cache()
    t0 = time.perf_counter()
    r = engine.forward(prompt, cache)
    t1 = time.perf_counter()
    toks = [int(np.argmax(r.logits[-1]))]
    for i in range(n_new - 1):
        r = engine.forward([toks[-1]], cache, step=i + 1)
        toks.append(int(np.argmax(r.logits[-1])))
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), (n_new - 1) / (t2 - t1), toks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if backend._load_fast() is None:
        raise SystemExit("error: the compiled kernels (minadept._kernels, minadept._decode) are not built (pip install -e .)")
    threadpool_limits(args.threads)
    m = Model.load(None)
    L = m.config.n_layer
    ids = np.asarray(m.tokenizer.encode(VALID.read_text(encoding="utf-8")[:400000]), dtype=np.int64)
    starts = np.random.default_rng(0).integers(0, len(ids) - args.prompt_tokens, args.prompts)
    prompts = [ids[s:s + args.prompt_tokens] for s in starts]
    ap = load_adept(m.path, m.config)
    settings = {"full depth": lambda: build_engine(m),
                f"adept {ap.threshold:g}": lambda: build_engine(m, EngineSettings(exit="adept"), adept=ap),
                "confidence 0.9": lambda: build_engine(m, EngineSettings(exit="confidence", threshold=0.9)),
                f"fixed {L // 2}": lambda: build_engine(m, EngineSettings(exit="fixed", exit_layer=L // 2))}
    rows = {}
    for label, mk in settings.items():
        res = {b: {"pre": [], "dec": [], "toks": []} for b in ("numpy", "fast")}
        for rep in range(args.repeats + 1):                       # first round is warm-up
            for b in ("numpy", "fast") if rep % 2 == 0 else ("fast", "numpy"):
                backend.use(b)
                eng = mk()
                for p in prompts:
                    pre, dec, toks = generate_greedy(eng, p, args.new_tokens)
                    if rep:
                        res[b]["pre"].append(pre)
                        res[b]["dec"].append(dec)
                    res[b]["toks"].append(toks)
        same = res["numpy"]["toks"] == res["fast"]["toks"]
        rows[label] = {b: (statistics.median(res[b]["pre"]), statistics.median(res[b]["dec"])) for b in res}
        rows[label]["same_tokens"] = same
    print(f"embedded {m.path.name}, {args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} greedy "
          f"new tokens, {args.threads} threads, median over {args.repeats} rounds")
    print(f"{'setting':<16}{'numpy pre':>11}{'fast pre':>10}{'x':>6}{'numpy dec':>11}{'fast dec':>10}{'x':>6}  same tokens")
    for label, r in rows.items():
        (np_, nd), (fp, fd) = r["numpy"], r["fast"]
        print(f"{label:<16}{np_:>11.1f}{fp:>10.1f}{fp / np_:>6.2f}{nd:>11.1f}{fd:>10.1f}{fd / nd:>6.2f}  {r['same_tokens']}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
