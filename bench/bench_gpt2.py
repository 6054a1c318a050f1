#!/usr/bin/env python
"""Benchmark: minadept vs Hugging Face transformers on a GPT-2 124M-shaped model, CPU, batch 1, fp32.

Builds random GPT-2 124M-shaped weights (fixed seed) with transformers, saves them with
``save_pretrained`` into a temporary directory, loads that directory in minadept, and runs
transformers and minadept -- on both backends side by side when the Cython extension is built
(``MINADEPT_BACKEND=numpy|fast`` runs one) -- in this same process on the same random prompt:

* prefill: one pass over the P prompt tokens that fills the KV cache and yields the logits of the
  LAST prompt position only (minadept: ``Engine.forward``, which returns only the last row;
  transformers: ``model(ids, use_cache=True, logits_to_keep=1)``, as ``generate()`` does).
  Reported as P / time.
* decode: the N-1 subsequent single-token greedy steps with the KV cache (the first new token
  comes from the prefill logits). Reported as (N-1) / time.

Both sides use the same thread count (``torch.set_num_threads`` and ``threadpoolctl`` for NumPy's
BLAS). Each side is warmed up once; then the R timed repeats alternate sides (so background load
hits both alike) and the BEST (minimum time) repeat of each phase is reported, with the median
alongside. The greedy tokens of both sides are compared and the result printed.

This is a benchmark, not a test: it always exits 0 unless something crashes; read the table.

    python bench/bench_gpt2.py                       # 2 threads, 128 + 128 tokens, 3 repeats
    python bench/bench_gpt2.py --threads 1 --repeats 5 --json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

#: (decode, prefill) minadept tok/s over transformers': the project's targets for the NumPy reference and
#: the Cython backend.
TARGETS = {"numpy": (1.6, 0.9), "fast": (2.0, 1.1)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="threads for torch and NumPy's BLAS (default 2)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="random prompt length (default 128)")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy tokens to generate (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per side; best is reported (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and prompt (default 0)")
    p.add_argument("--attn", default=None,
                   help="transformers attn_implementation, e.g. eager or sdpa (default: what GPT2LMHeadModel "
                        "picks, sdpa in transformers 5.x; printed)")
    p.add_argument("--json", action="store_true", help="print a JSON dict of the results as the last line")
    a = p.parse_args(argv)
    if a.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode needs at least one step)")
    if a.prompt_tokens < 1 or a.prompt_tokens + a.new_tokens > 1024:
        p.error("need 1 <= --prompt-tokens and --prompt-tokens + --new-tokens <= 1024")
    if a.repeats < 1 or a.threads < 1:
        p.error("--repeats and --threads must be >= 1")
    return a


def build_checkpoint(out_dir: str, seed: int, attn: str | None):
    """Random GPT-2 124M-shaped weights saved to ``out_dir``; returns the transformers model (eval)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    kw = {} if attn is None else {"attn_implementation": attn}
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024, **kw)
    model = GPT2LMHeadModel(cfg)
    model.eval()
    model.save_pretrained(out_dir)
    return model


# ----------------------------------------------------------------------------- one generation each

def run_minadept(engine, prompt: np.ndarray, n_new: int):
    """Greedy generation; returns (tokens [n_new], prefill seconds, decode seconds, last prefill logits)."""
    cache = engine.new_cache(len(prompt) + n_new)  # sized like generate(); allocated outside the timed region
    toks = []
    t0 = time.perf_counter()
    r = engine.forward(prompt, cache)
    t1 = time.perf_counter()
    logits0 = r.logits[-1]
    tok = int(np.argmax(logits0))
    toks.append(tok)
    t2 = time.perf_counter()
    for _ in range(n_new - 1):
        r = engine.forward(np.array([tok]), cache)
        tok = int(np.argmax(r.logits[-1]))
        toks.append(tok)
    t3 = time.perf_counter()
    return toks, t1 - t0, t3 - t2, logits0


def cache_kwarg(model) -> str:
    """The name of the KV-cache argument/output: ``cache`` in recent transformers 5.x (where
    ``past_key_values`` is a deprecated alias), ``past_key_values`` before."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def run_transformers(model, prompt_t, n_new: int, kv_name: str):
    """Greedy generation reusing the KV cache (past_key_values); same return as run_minadept."""
    import torch
    toks = []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=prompt_t, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past = getattr(out, kv_name)
        logits0 = out.logits[0, -1].numpy().copy()
        tok = out.logits[0, -1].argmax().view(1, 1)
        toks.append(int(tok))
        t2 = time.perf_counter()
        for _ in range(n_new - 1):
            out = model(input_ids=tok, use_cache=True, logits_to_keep=1, **{kv_name: past})
            past = getattr(out, kv_name)
            tok = out.logits[0, -1].argmax().view(1, 1)
            toks.append(int(tok))
        t3 = time.perf_counter()
    return toks, t1 - t0, t3 - t2, logits0


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch
    import transformers
    from threadpoolctl import threadpool_info, threadpool_limits

    from minadept.engine import Engine
    from minadept.model import Model

    torch.set_num_threads(args.threads)
    limiter = threadpool_limits(args.threads)      # NumPy's BLAS (and torch's OpenMP) for the whole run
    blas = [f"{i['internal_api']} {i.get('version')} ({i['num_threads']} thr)"
            for i in threadpool_info() if i["user_api"] == "blas"]

    P, N, R = args.prompt_tokens, args.new_tokens, args.repeats
    with tempfile.TemporaryDirectory(prefix="minadept-bench-") as d:
        hf = build_checkpoint(d, args.seed, args.attn)
        m = Model.load(d, tokenizer=False)
    engine = Engine(m)
    from minadept import backend
    # both backends side by side when the extension is built, unless MINADEPT_BACKEND picks one
    picked = os.environ.get("MINADEPT_BACKEND", "auto").lower()
    backends = ["numpy", "fast"] if picked == "auto" and backend._load_fast() is not None else [backend.active()]
    kv_name = cache_kwarg(hf)
    attn_impl = getattr(hf.config, "_attn_implementation", None)
    prompt = np.random.default_rng(args.seed).integers(0, m.config.vocab_size, size=P, dtype=np.int64)
    prompt_t = torch.from_numpy(prompt).view(1, -1)

    print(f"GPT-2 124M-shaped random weights (seed {args.seed}), batch 1, fp32, "
          f"{P} prompt + {N} new tokens, {args.threads} thread(s), {R} repeat(s) after 1 warm-up")
    print(f"minadept backends: {', '.join(backends)} (MINADEPT_BACKEND=numpy|fast runs one)")
    print(f"numpy {np.__version__} [{'; '.join(blas) or 'no BLAS info'}], torch {torch.__version__} "
          f"({torch.get_num_threads()} thr), transformers {transformers.__version__}, "
          f"transformers attn_implementation={attn_impl}, KV cache passed as `{kv_name}`")

    def on(b):
        backend.use(b)
        return run_minadept(engine, prompt, N)

    sides = {f"minadept {b}": (lambda b=b: on(b)) for b in backends}
    sides["transformers"] = lambda: run_transformers(hf, prompt_t, N, kv_name)
    results = {name: fn() for name, fn in sides.items()}          # warm-up (also gives the tokens)
    times = {name: {"prefill": [], "decode": []} for name in sides}
    for _ in range(R):
        for name, fn in sides.items():                             # alternate sides each repeat
            gc.collect()
            toks, tp, td, _ = fn()
            times[name]["prefill"].append(tp)
            times[name]["decode"].append(td)
            if toks != results[name][0]:
                print(f"warning: {name} tokens changed between runs", file=sys.stderr)

    rate = {}
    for name in sides:
        bp, bd = min(times[name]["prefill"]), min(times[name]["decode"])
        mp, md = statistics.median(times[name]["prefill"]), statistics.median(times[name]["decode"])
        rate[name] = {"prefill_tok_s": P / bp, "decode_tok_s": (N - 1) / bd,
                      "prefill_tok_s_median": P / mp, "decode_tok_s_median": (N - 1) / md,
                      "prefill_s": times[name]["prefill"], "decode_s": times[name]["decode"]}
    th, l_h = results["transformers"][0], results["transformers"][3]
    top2 = np.sort(l_h)[-2:]
    per = {}
    print()
    for b in backends:
        name, r, t = f"minadept {b}", rate[f"minadept {b}"], rate["transformers"]
        tm = results[name][0]
        first_diff = next((i for i, (x, y) in enumerate(zip(tm, th)) if x != y), None)
        target_d, target_p = TARGETS[b]
        per[b] = {"tokens_identical": tm == th, "first_difference": first_diff,
                  "prefill_logits_max_abs_diff": float(np.max(np.abs(results[name][3] - l_h))),
                  "ratio_prefill": r["prefill_tok_s"] / t["prefill_tok_s"],
                  "ratio_decode": r["decode_tok_s"] / t["decode_tok_s"],
                  "ratio_prefill_median": r["prefill_tok_s_median"] / t["prefill_tok_s_median"],
                  "ratio_decode_median": r["decode_tok_s_median"] / t["decode_tok_s_median"],
                  "target_decode": target_d, "target_prefill": target_p}
        per[b]["target_decode_met"] = per[b]["ratio_decode"] >= target_d
        per[b]["target_prefill_met"] = per[b]["ratio_prefill"] >= target_p
        print(f"{name}: greedy tokens identical to transformers: {tm == th}"
              + ("" if tm == th else f" (first difference at new token {first_diff})")
              + f"; prefill last-position logits max |diff| {per[b]['prefill_logits_max_abs_diff']:.3e}"
              f" (transformers top-1 margin {top2[1] - top2[0]:.3e})")
    print()
    print(f"best of {R} (median in brackets); prefill = {P} tokens, decode = {N - 1} single-token steps")
    print(f"{'side':<18}{'prefill tok/s':>24}{'decode tok/s':>24}")
    for name in sides:
        r = rate[name]
        print(f"{name:<18}{r['prefill_tok_s']:>12.1f} [{r['prefill_tok_s_median']:>8.1f}]"
              f"{r['decode_tok_s']:>14.2f} [{r['decode_tok_s_median']:>7.2f}]")
    for b, q in per.items():
        print(f"{'ratio ' + b + '/t':<18}{q['ratio_prefill']:>12.3f} [{q['ratio_prefill_median']:>8.3f}]"
              f"{q['ratio_decode']:>14.3f} [{q['ratio_decode_median']:>7.3f}]")
    for b, q in per.items():
        print(f"targets ({b} backend): decode >= {q['target_decode']}x -> "
              f"{'met' if q['target_decode_met'] else 'MISSED'}; prefill >= {q['target_prefill']}x -> "
              f"{'met' if q['target_prefill_met'] else 'MISSED'} (best-of-{R})")

    if args.json:
        print(json.dumps({
            "threads": args.threads, "prompt_tokens": P, "new_tokens": N, "repeats": R, "seed": args.seed,
            "statistic": "best", "attn_implementation": attn_impl, "minadept_backends": backends,
            "versions": {"numpy": np.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}, "blas": blas,
            "rates": rate, "per_backend": per,
        }))
    del limiter
    return 0


if __name__ == "__main__":
    sys.exit(main())
