"""ADEPT learned policy vs the training-free exits on the embedded model. Not a test.

Needs the calibrated ``adept.safetensors`` next to the embedded model (``minadept calibrate``;
calibration text: part of ``../shared/corpus/train.txt``). In one process:

  1. quality vs compute on a slice of ``../shared/corpus/valid.txt`` (``minadept eval`` protocol)
     for ``adept`` (threshold grid + the stored default), ``confidence``, ``margin``,
     ``saturation`` and ``fixed`` (every layer): perplexity, top-1 agreement with full depth, mean
     exit layer, compute fraction (FLOPs incl. each policy's own checks and propagation / full);
     counts where ``adept`` dominates (higher agreement and lower ppl at <= compute);
  2. mappers vs identity at the default threshold: exit prediction and K/V propagation separately
     (and the ``oracle`` K/V upper bound);
  3. speed at the default threshold: prefill and greedy decode tokens/s vs full depth, timed in
     alternating rounds on the same prompts (eager and lazy K/V fill);
  4. with ``--full-valid``: held-out perplexity over all of valid.txt, full depth vs the default.
Writes ``bench/results/adept_sweep.{md,json,png}``.

    python bench/bench_adept.py [--eval-tokens 32768] [--prompts 4] [--prompt-tokens 128]
                                [--new-tokens 64] [--rounds 3] [--threads 2] [--full-valid]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from threadpoolctl import threadpool_limits

from bench_exits import paired_speed, prompts_from_valid, time_generation
from minadept import backend
from minadept.engine import Engine
from minadept.evaluate import evaluate, plot_sweep, reference_top1
from minadept.exits.adept import ADEPT_FILE, load_adept
from minadept.exits.policies import POLICIES
from minadept.model import Model
from minadept.settings import EngineSettings, build_engine

ROOT = Path(__file__).resolve().parents[1]
ADEPT_TAUS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99]


def adept_engine(model, params, tau, exit_map=True, kv_map=True, fill="eager", kv="propagate"):
    st = EngineSettings(exit="adept", threshold=tau, exit_map=None if exit_map else "identity",
                        kv_map=None if kv_map else "identity", kv=kv, kv_fill=fill)
    return build_engine(model, st, adept=params)


def dominates(a, b):
    """a strictly better in agreement and perplexity at equal or lower compute."""
    return (a["agreement"] > b["agreement"] and a["ppl"] < b["ppl"]
            and a["compute_fraction"] <= b["compute_fraction"])


def dominance(rows):
    """For every training-free policy: the adept points that dominate at least one of its points,
    and the adept points that dominate a point of every training-free policy."""
    ad = [r for r in rows if r["exit"] == "adept"]
    others = sorted({r["exit"] for r in rows} - {"adept", "none"})
    per = {p: [a["setting"] for a in ad if any(dominates(a, b) for b in rows if b["exit"] == p)] for p in others}
    every = [a["setting"] for a in ad if all(any(dominates(a, b) for b in rows if b["exit"] == p) for p in others)]
    return per, every


def quality_row(name, setting, q):
    return dict(exit=name, setting=setting, ppl=q["ppl"], agreement=q["agreement"],
                mean_exit_layer=q["mean_exit_layer"], compute_fraction=q["compute_fraction"])


def fmt(r):
    return (f"| {r['exit']} | {r['setting']} | {r['ppl']:.2f} | {r['agreement']:.3f} | "
            f"{r['mean_exit_layer']:.2f} | {r['compute_fraction']:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-valid", action="store_true", help="also score all of valid.txt at the default")
    ap.add_argument("--speed-only", action="store_true",
                    help="re-time speed only; reuse the quality results of the existing adept_sweep.json")
    ap.add_argument("--ablation-only", action="store_true",
                    help="re-run the mapper ablation only; reuse the rest of the existing adept_sweep.json")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    threadpool_limits(args.threads)
    model = Model.load(None)
    cfg, L = model.config, model.config.n_layer
    params = load_adept(model.path / ADEPT_FILE, cfg)
    tau0 = params.threshold
    prompts, ids = prompts_from_valid(model.tokenizer, args.prompts, args.prompt_tokens)
    eval_ids = ids[: args.eval_tokens]
    full = Engine(model)
    out = Path(args.out)
    if args.speed_only or args.ablation_only:
        old = json.loads((out / "adept_sweep.json").read_text())
        rows, ablation, whole = old["sweep"], old["mapper_ablation"], old["whole_valid"]
        eval_ids = ids[: old["eval_tokens"]]
        if args.ablation_only:
            ablation = mapper_ablation(model, params, eval_ids, reference_top1(full, eval_ids))
    else:
        rows, ablation, whole = quality(model, params, full, ids, eval_ids, args.full_valid)
    per, every = dominance(rows)
    if args.ablation_only:
        speed, mean_gen_exit = old["speed"], old["greedy_decode_mean_exit_layer"]
    else:
        speed, mean_gen_exit = timing(model, params, full, prompts, args)
    write(out, model, params, args, eval_ids, rows, per, every, ablation, speed, mean_gen_exit, whole)


def quality(model, params, full, ids, eval_ids, full_valid):
    cfg, L, tau0 = model.config, model.config.n_layer, params.threshold
    ref = reference_top1(full, eval_ids)
    full_q = evaluate(full, eval_ids, ref)
    print(f"model {model.path.name}; adept default threshold {tau0} "
          f"(calibrated on {params.info.get('calibration_tokens')} tokens of train.txt); "
          f"quality on the first {len(eval_ids)} tokens of valid.txt: full-depth ppl {full_q['ppl']:.3f}", flush=True)

    # 1. sweep
    rows = [quality_row("none", "", full_q)]
    settings = [("adept", dict(threshold=t)) for t in sorted(set(ADEPT_TAUS) | {tau0})]
    settings += [("fixed", dict(exit_layer=k)) for k in range(1, L)]
    settings += [(name, dict(threshold=t)) for name, spec in POLICIES.items() if name != "adept"
                 for t in spec.sweep]
    for name, kw in settings:
        if name == "adept":
            eng = adept_engine(model, params, kw["threshold"])
        else:
            eng = build_engine(model, EngineSettings(exit=name, **kw))
        setting = ",".join(f"{k}={v}" for k, v in kw.items()).replace("threshold", "tau")
        rows.append(quality_row(name, setting, evaluate(eng, eval_ids, ref)))
        print(fmt(rows[-1]), flush=True)

    # 2. mappers vs identity
    ablation = mapper_ablation(model, params, eval_ids, ref)

    # 4. whole valid.txt
    whole = None
    if full_valid:
        f = evaluate(full, ids)
        a = evaluate(adept_engine(model, params, tau0), ids)
        whole = dict(tokens=f["tokens"], full_ppl=f["ppl"], adept_ppl=a["ppl"],
                     ppl_increase=a["ppl"] / f["ppl"] - 1, compute_fraction=a["compute_fraction"],
                     mean_exit_layer=a["mean_exit_layer"])
        print(f"all of valid.txt ({f['tokens']} tokens): full ppl {f['ppl']:.3f}, adept {a['ppl']:.3f} "
              f"(+{whole['ppl_increase']:.1%}), compute {a['compute_fraction']:.3f}", flush=True)
    return rows, ablation, whole


def mapper_ablation(model, params, eval_ids, ref, taus=None):
    """Exit map and K/V map each learned vs identity at the default threshold and at 0.8 (where
    tokens exit earlier and skip more layers), plus the oracle-K/V upper bound."""
    rows = []
    for tau in taus or (params.threshold, 0.8):
        for label, kw in [("learned exit map + learned K/V map", {}),
                          ("identity exit map + learned K/V map", dict(exit_map=False)),
                          ("learned exit map + identity K/V map", dict(kv_map=False)),
                          ("identity exit map + identity K/V map", dict(exit_map=False, kv_map=False)),
                          ("learned exit map + oracle K/V (upper bound)", dict(kv_map=False, kv="oracle"))]:
            q = evaluate(adept_engine(model, params, tau, **kw), eval_ids, ref)
            rows.append(quality_row("adept", f"tau={tau}: {label}", q))
            print(fmt(rows[-1]), flush=True)
    return rows


def timing(model, params, full, prompts, args):
    """3. speed at the default threshold, paired with full depth; mean exit of greedy decode."""
    tau0 = params.threshold
    time_generation(full, prompts[:1], 8)
    speed = []
    for tau, fill in [(tau0, "eager"), (tau0, "lazy"), (0.9, "eager"), (0.8, "eager"), (0.7, "eager")]:
        eng = adept_engine(model, params, tau, fill=fill)
        time_generation(eng, prompts[:1], 8)        # warm-up (folds the K/V maps of the exit layers used)
        (bp, bd), (p, d) = paired_speed(full, eng, prompts, args.new_tokens, args.rounds)
        speed.append(dict(setting=f"adept tau={tau} {fill}", full_prefill=bp, full_decode=bd,
                          prefill=p, decode=d, prefill_ratio=p / bp, decode_ratio=d / bd))
        print(f"speed tau={tau} {fill}: prefill {p:.0f} vs {bp:.0f} tok/s = {p / bp:.2f}x, "
              f"decode {d:.1f} vs {bd:.1f} tok/s = {d / bd:.2f}x", flush=True)
    gen_exits = []
    eng = adept_engine(model, params, tau0)
    for pr in prompts:                               # exit layers of the greedy decode steps
        cache = eng.new_cache()
        r = eng.forward(pr, cache)
        tok = int(r.logits[-1].argmax())
        for i in range(args.new_tokens):
            r = eng.forward([tok], cache, step=i + 1)
            gen_exits.append(int(r.exit_layers[-1]))
            tok = int(r.logits[-1].argmax())
    return speed, sum(gen_exits) / len(gen_exits)


def write(out, model, params, args, eval_ids, rows, per, every, ablation, speed, mean_gen_exit, whole):
    tau0 = params.threshold
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = dict(threshold=tau0, eval_tokens=len(eval_ids), sweep=rows, dominance=per,
                  dominates_every_policy=every, mapper_ablation=ablation, speed=speed,
                  greedy_decode_mean_exit_layer=mean_gen_exit, whole_valid=whole, adept_info=params.info)
    (out / "adept_sweep.json").write_text(json.dumps(result, indent=1))
    head = "| exit | setting | ppl | agreement | mean exit layer | compute fraction |\n|---|---|---:|---:|---:|---:|"
    md = [f"# ADEPT vs training-free exits on {model.path.name}", "",
          f"Generated by `python bench/bench_adept.py` ({args.threads} threads, {backend.active()} backend). Quality on the first "
          f"{len(eval_ids)} tokens of valid.txt (`minadept eval` protocol); the policy and mappers were "
          f"calibrated on {params.info.get('calibration_tokens')} tokens of train.txt "
          f"(`minadept calibrate`, seed {params.info.get('seed')}, cost weight {params.info.get('cost_weight')}); "
          f"default threshold {tau0}. Compute fraction counts each policy's own exit checks and K/V propagation.",
          "", "## Sweep", "", head, *map(fmt, rows), "",
          "## Dominance", "", "adept settings that dominate (higher agreement and lower perplexity at equal or "
          "lower compute) at least one point of each training-free policy:", ""]
    md += [f"- {p}: {len(v)} ({', '.join(v) or 'none'})" for p, v in per.items()]
    md += ["", f"- a point of every training-free policy at once: {len(every)} ({', '.join(every) or 'none'})", "",
           "## Mappers vs identity (same policy and threshold)", "", head, *map(fmt, ablation), "",
           f"## Speed at the default threshold and below it ({args.prompts} prompts x {args.prompt_tokens} tokens, "
           f"{args.new_tokens} greedy new tokens, alternating rounds with full depth, medians)", "",
           "| setting | prefill tok/s (full) | decode tok/s (full) | prefill x | decode x |", "|---|---:|---:|---:|---:|"]
    md += [f"| {s['setting']} | {s['prefill']:.0f} ({s['full_prefill']:.0f}) | {s['decode']:.1f} ({s['full_decode']:.1f}) | "
           f"{s['prefill_ratio']:.2f} | {s['decode_ratio']:.2f} |" for s in speed]
    md += ["", f"Mean exit layer of the greedy decode steps: {mean_gen_exit:.2f}."]
    if whole:
        md += ["", f"All of valid.txt ({whole['tokens']} tokens): full depth ppl {whole['full_ppl']:.3f}, adept "
               f"{whole['adept_ppl']:.3f} ({whole['ppl_increase']:+.1%}), compute fraction {whole['compute_fraction']:.3f}, "
               f"mean exit layer {whole['mean_exit_layer']:.2f}."]
    (out / "adept_sweep.md").write_text("\n".join(md) + "\n")
    plot_sweep([r for r in rows if r["exit"] != "none"], str(out / "adept_sweep.png"),
               title=f"{model.path.name}: valid.txt ({len(eval_ids)} tokens)")
    print(f"wrote {out}/adept_sweep.md, .json, .png")


if __name__ == "__main__":
    main()
