"""Early-exit benchmark on the embedded model. Not a test.

In one process, on prompts from ``../shared/corpus/valid.txt``:
  1. speed: full depth vs ``fixed`` at n_layer/2 with eager and with lazy fill — prefill tokens/s
     (last-position logits) and greedy decode tokens/s, and their ratios to full depth;
  2. a sweep of every training-free policy: threshold -> perplexity, top-1 agreement with full
     depth, mean exit layer, compute fraction (``minadept eval`` protocol on a slice of valid.txt),
     and prefill / decode tokens/s relative to full depth.
Writes ``bench/results/exits_sweep.{md,json,png}``.

    python bench/bench_exits.py [--eval-tokens 16384] [--prompts 6] [--prompt-tokens 64]
                                [--new-tokens 64] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minadept.engine import Engine
from minadept.evaluate import evaluate, reference_top1, sweep_settings
from minadept.settings import EngineSettings, build_engine
from minadept.model import Model

ROOT = Path(__file__).resolve().parents[1]
VALID = ROOT.parent / "shared" / "corpus" / "valid.txt"


def prompts_from_valid(tok, n, length, seed=0):
    ids = np.asarray(tok.encode(VALID.read_text(encoding="utf-8")), dtype=np.int64)
    starts = np.random.default_rng(seed).integers(0, len(ids) - length, n)
    return [ids[s:s + length] for s in starts], ids


def time_generation(engine, prompts, new_tokens):
    """Median prefill tokens/s and decode tokens/s over prompts (greedy)."""
    pre, dec = [], []
    for p in prompts:
        cache = engine.new_cache()
        t0 = time.perf_counter()
        r = engine.forward(p, cache)
        t1 = time.perf_counter()
        tok = int(np.argmax(r.logits[-1]))
        for i in range(new_tokens):
            r = engine.forward([tok], cache, step=i + 1)
            tok = int(np.argmax(r.logits[-1]))
        t2 = time.perf_counter()
        pre.append(len(p) / (t1 - t0))
        dec.append(new_tokens / (t2 - t1))
    return statistics.median(pre), statistics.median(dec)


def paired_speed(base, other, prompts, new_tokens, rounds):
    """Median (prefill, decode) tokens/s of ``base`` and ``other``, timed in alternating rounds
    so that drifts of this shared machine hit both sides alike."""
    res = {0: [], 1: []}
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            res[i].append(time_generation((base, other)[i], prompts, new_tokens))
    med = lambda xs, j: statistics.median(x[j] for x in xs)
    return (med(res[0], 0), med(res[0], 1)), (med(res[1], 0), med(res[1], 1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4, help="alternating timing rounds per comparison")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args(argv)
    threadpool_limits(args.threads)
    model = Model.load(None)
    L = model.config.n_layer
    prompts, ids = prompts_from_valid(model.tokenizer, args.prompts, args.prompt_tokens)
    full = Engine(model)
    time_generation(full, prompts[:1], 8)                  # warm-up

    print(f"model {model.path.name}: n_layer {L}, n_embd {model.config.n_embd}, vocab {model.config.vocab_size}; "
          f"{args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens, {args.threads} threads")
    speed = {"full depth": None}
    ratios = {}
    fixed = EngineSettings(exit="fixed", exit_layer=L // 2)
    for label, eng in [(f"fixed {L // 2} eager", build_engine(model, fixed)),
                       (f"fixed {L // 2} lazy", build_engine(model, fixed.with_(kv_fill="lazy")))]:
        b, o = paired_speed(full, eng, prompts, args.new_tokens, args.rounds)
        speed["full depth"] = b if speed["full depth"] is None else speed["full depth"]
        speed[label] = o
        ratios[label] = (o[0] / b[0], o[1] / b[1])
    ratios["full depth"] = (1.0, 1.0)
    base = speed["full depth"]
    print(f"\n{'setting':<18}{'prefill tok/s':>15}{'decode tok/s':>14}{'prefill x':>11}{'decode x':>10}   (x: paired with full depth)")
    for label, (p, d) in speed.items():
        print(f"{label:<18}{p:>15.1f}{d:>14.1f}{ratios[label][0]:>11.2f}{ratios[label][1]:>10.2f}")
    result = {"speed": {k: {"prefill_tokens_per_s": v[0], "decode_tokens_per_s": v[1],
                            "prefill_ratio": ratios[k][0], "decode_ratio": ratios[k][1]}
                        for k, v in speed.items()}}
    if args.no_sweep:
        print(json.dumps(result))
        return
    eval_ids = ids[: args.eval_tokens]
    ref = reference_top1(full, eval_ids)
    rows = []
    print(f"\nsweep on the first {len(eval_ids)} tokens of valid.txt")
    hdr = f"{'exit':<11}{'setting':<15}{'ppl':>9}{'agree':>8}{'exit':>7}{'compute':>9}{'prefill x':>11}{'decode x':>10}"
    print(hdr)
    for name, kw in sweep_settings(L):
        eng = build_engine(model, EngineSettings(exit=name, **kw))
        q = evaluate(eng, eval_ids, ref)
        (bp, bd), (p, d) = paired_speed(full, eng, prompts, args.new_tokens, 2)
        row = dict(exit=name, setting=",".join(f"{k}={v}" for k, v in kw.items()).replace("threshold", "tau"),
                   ppl=q["ppl"], agreement=q["agreement"], mean_exit_layer=q["mean_exit_layer"],
                   compute_fraction=q["compute_fraction"], prefill_ratio=p / bp, decode_ratio=d / bd)
        rows.append(row)
        print(f"{name:<11}{row['setting']:<15}{row['ppl']:>9.2f}{row['agreement']:>8.3f}{row['mean_exit_layer']:>7.2f}"
              f"{row['compute_fraction']:>9.3f}{row['prefill_ratio']:>11.2f}{row['decode_ratio']:>10.2f}", flush=True)
    result["sweep"] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exits_sweep.json").write_text(json.dumps(result, indent=1))
    lines = ["| exit | setting | ppl | agreement | mean exit layer | compute fraction | prefill x | decode x |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['exit']} | {r['setting']} | {r['ppl']:.2f} | {r['agreement']:.3f} | {r['mean_exit_layer']:.2f} | "
              f"{r['compute_fraction']:.3f} | {r['prefill_ratio']:.2f} | {r['decode_ratio']:.2f} |" for r in rows]
    sp = ["| setting | prefill tok/s | decode tok/s | prefill x | decode x |", "|---|---:|---:|---:|---:|"]
    sp += [f"| {k} | {v[0]:.1f} | {v[1]:.1f} | {ratios[k][0]:.2f} | {ratios[k][1]:.2f} |" for k, v in speed.items()]
    (out / "exits_sweep.md").write_text(
        f"# Early exit on {model.path.name}\n\nGenerated by `python bench/bench_exits.py` "
        f"({args.prompts} prompts x {args.prompt_tokens} tokens from valid.txt, {args.new_tokens} greedy new tokens, "
        f"{args.threads} threads; quality on the first {len(eval_ids)} tokens of valid.txt with the `minadept eval` "
        f"protocol). Ratios are relative to full depth timed in alternating rounds with each setting (medians).\n\n## Speed\n\n" + "\n".join(sp)
        + "\n\n## Sweep\n\n" + "\n".join(lines) + "\n")
    from minadept.evaluate import plot_sweep
    plot_sweep(rows, str(out / "exits_sweep.png"), title=f"{model.path.name}, valid.txt ({len(eval_ids)} tokens)")
    print(f"\nwrote {out}/exits_sweep.md, .json, .png")


if __name__ == "__main__":
    main()
