"""Early-exit classification on SST-2 and AG News (../shared/classify/): accuracy vs compute and
measured texts/s vs full depth, for each stopping rule over a sweep, without and with the
engine's token-level exits in the prefill (``--exit adept --kv-fill lazy``).

Per dataset and token-exit setting: features of a seeded training sample at every layer (both
poolings), probes fitted with ``classify.train_probes`` (L2 and each rule's threshold chosen on
its 20% held-out slice, never on the test split), the test split traced once (a rule's stop layer
and prediction depend only on the layers up to it, so every threshold's accuracy and FLOPs come
from one trace; ``tests/test_classify.py`` checks that this equals running the rule). Wall time is
measured on a seeded subsample of the test split, one text at a time as ``minadept classify``
runs: full depth (all blocks, all tokens, last-layer probe) and every timed point in alternating
rounds, in one process, 1 BLAS thread.

Writes bench/results/classification.{md,json,png}. The datasets carry research-only terms: they
are read from ../shared/classify/ and nothing fitted on them is written into the repository
(probes go to a temporary directory and are discarded). Usage: python bench/bench_classify.py
[--quick]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from minadept import Model, backend
from minadept import classify as K
from minadept.settings import EngineSettings, build_engine

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "classify"
OUT = HERE / "results"
SIZES = {"sst2": dict(train=3000, test=None, timing=150), "ag_news": dict(train=2500, test=1500, timing=100)}
CONFIGS = {"none": EngineSettings(), "adept-lazy": EngineSettings(exit="adept", kv_fill="lazy")}
ROUNDS = 2
SWEEP_TIMED = 3                  # extra timed thresholds per rule (no token exits)


def sample(texts, labels, n, seed):
    if n is None or n >= len(texts):
        return texts, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(texts))[:n])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def bootstrap_drop(correct_full, correct_rule, n=2000, seed=0):
    """95% interval of the paired accuracy drop (points), resampling test examples."""
    rng = np.random.default_rng(seed)
    d = correct_full.astype(np.float64) - correct_rule.astype(np.float64)
    idx = rng.integers(0, len(d), size=(n, len(d)))
    m = 100 * d[idx].mean(axis=1)
    return [round(float(np.percentile(m, 2.5)), 2), round(float(np.percentile(m, 97.5)), 2)]


def time_points(model, probes_by_cfg, engines, ids, points):
    """Full depth and every point (cfg, rule), interleaved text by text (for each text: full
    depth, then every point, in an order rotated per text), in ROUNDS rounds, so that a busy
    machine's drift hits both sides alike. Returns seconds for full depth and per point, summed."""
    full_engine = engines["none"]
    t_full, t = 0.0, {p: 0.0 for p in points}
    clock = time.perf_counter
    for r in range(ROUNDS):
        for n, i in enumerate(ids):
            t0 = clock()
            K.full_depth_ids(full_engine, probes_by_cfg["none"], i)
            t_full += clock() - t0
            for j in range(len(points)):
                cfg, rule = points[(j + n + r) % len(points)]
                e, pr = engines[cfg], probes_by_cfg[cfg]
                t0 = clock()
                K.classify_ids(e, pr, i, rule)
                t[(cfg, rule)] += clock() - t0
    return t_full, t


def run_dataset(name, model, engines, quick):
    sz = dict(SIZES[name])
    if quick:
        sz = dict(train=300, test=150, timing=40)
    tr_t, tr_y = K.read_tsv(DATA / name / "train.tsv")
    te_t, te_y = K.read_tsv(DATA / name / "test.tsv")
    tr_t, tr_y = sample(tr_t, tr_y, sz["train"], 0)
    te_t, te_y = sample(te_t, te_y, sz["test"], 1)
    labels = K.sorted_labels(tr_y)
    y = K.label_indices(te_y, labels)
    L = model.config.n_layer
    out = {"n_train": len(tr_t), "n_test": len(te_t), "n_test_total": sum(1 for _ in open(DATA / name / "test.tsv")) - 1,
           "n_timing": sz["timing"], "labels": labels, "configs": {}}
    probes_by_cfg, test_probs, test_spent, base_flops, test_feats = {}, {}, {}, {}, {}
    def register(cfg, pr, te_spent, te_ntok, c):
        """Test probabilities, the sweep and the held-out thresholds of probes ``pr``."""
        probs = K.probe_probs(pr, test_feats[cfg.split("/")[0]][pr.pooling])
        probes_by_cfg[cfg], test_probs[cfg], test_spent[cfg] = pr, probs, te_spent
        base = np.array([K.full_flops_of(model.config, n, pr) for n in te_ntok], np.float64)
        base_flops[cfg] = float(base.sum())
        c.update(thresholds=pr.info["thresholds"], l2=pr.info["l2"], sweep={})
        for kind in ("layer", "max-prob", "entropy", "patience"):
            rows = []
            for v in K.threshold_grid(kind, L, len(labels)):
                r = K.Rule(kind, v)
                stop, pred = K.simulate(r, probs)
                rows.append({"value": v, "test_acc": round(100 * float((pred == y).mean()), 2),
                             "mean_stop_layer": round(float(stop.mean()), 3),
                             "compute_fraction": round(float(K.rule_flops(r, stop, te_spent, pr).sum() / base.sum()), 4)})
            c["sweep"][kind] = rows
        out["configs"][cfg] = c

    for cfg, engine in engines.items():
        t0 = time.perf_counter()
        traced = K.trace_texts(engine, tr_t)
        te_feats, te_spent, te_ntok, te_trunc = K.trace_texts(engine, te_t)
        test_feats[cfg] = te_feats
        by_pool = {m: K.train_probes(model, engine, CONFIGS[cfg].as_dict(), tr_t, tr_y, pooling=m, traced=traced)
                   for m in K.POOLINGS}
        auto = max(K.POOLINGS, key=lambda m: (by_pool[m].info["heldout_mean_acc"][m], m == "mean"))
        c = {"pooling": auto, "trace_s": round(time.perf_counter() - t0, 1), "test_truncated": int(te_trunc),
             "train_truncated": int(traced[3]), "mean_test_tokens": round(float(te_ntok.mean()), 1),
             "heldout_mean_acc": {m: by_pool[m].info["heldout_mean_acc"][m] for m in K.POOLINGS},
             "test_acc_by_layer": {m: [round(100 * float((K.probe_probs(by_pool[m], te_feats[m])[:, l].argmax(1) == y).mean()), 2)
                                       for l in range(L)] for m in K.POOLINGS}}
        register(cfg, by_pool[auto], te_spent, te_ntok, c)
        if cfg == "none":              # the other pooling, where depth may matter (secondary analysis)
            other = [m for m in K.POOLINGS if m != auto][0]
            register(f"none/{other}", by_pool[other], te_spent, te_ntok, {"pooling": other})
        print(f"{name} {cfg}: traced in {c['trace_s']} s, pooling {auto}, held-out thresholds {c['thresholds']}",
              file=sys.stderr, flush=True)
    # probes fitted without token exits, read on features taken with them (the mismatch)
    if "adept-lazy" in engines:
        mis = K.probe_probs(probes_by_cfg["none"], test_feats["adept-lazy"][probes_by_cfg["none"].pooling])
        out["no_exit_probes_on_exit_features_acc_by_layer"] = [round(100 * float((mis[:, l].argmax(1) == y).mean()), 2) for l in range(L)]

    # timed points: every rule's chosen threshold (every config), static best, a few sweep points
    points = []
    for cfg in out["configs"]:
        for kind, v in out["configs"][cfg]["thresholds"].items():
            if v is not None:
                points.append((cfg, K.Rule(kind, v)))
    for kind in ("max-prob", "entropy", "patience"):
        grid = K.threshold_grid(kind, L, len(labels))
        for v in np.array(grid)[np.linspace(0, len(grid) - 1, SWEEP_TIMED + 2).astype(int)[1:-1]]:
            p = ("none", K.Rule(kind, v.item()))
            if p not in points:
                points.append(p)
    ids = [K.encode(model.tokenizer, t, model.config.n_positions, warn=False)
           for t in sample(te_t, te_y, sz["timing"], 2)[0]]
    engine_of = {cfg: engines[cfg.split("/")[0]] for cfg in out["configs"]}
    t_full, t = time_points(model, probes_by_cfg, engine_of, ids, points)
    out["full_texts_per_s"] = round(ROUNDS * len(ids) / t_full, 2)
    base_of = lambda cfg: cfg if "/" in cfg else "none"          # the family's full-depth probe
    timed = []
    for (cfg, rule), s in t.items():
        stop, pred = K.simulate(rule, test_probs[cfg])
        full_correct = test_probs[base_of(cfg)][:, -1].argmax(1) == y
        timed.append({"config": cfg, "rule": str(rule), "kind": rule.kind, "value": rule.value,
                      "test_acc": round(100 * float((pred == y).mean()), 2),
                      "texts_per_s": round(ROUNDS * len(ids) / s, 2), "speedup_measured": round(t_full / s, 3),
                      "mean_stop_layer": round(float(stop.mean()), 3),
                      "compute_fraction": round(float(K.rule_flops(rule, stop, test_spent[cfg], probes_by_cfg[cfg]).sum()
                                                      / base_flops[cfg]), 4),
                      "drop_points": round(100 * float(full_correct.mean()) - 100 * float((pred == y).mean()), 2),
                      "drop_ci95": bootstrap_drop(full_correct, pred == y)})
    out["timed"] = timed
    out.update(family(out, timed, test_probs, y, [c for c in out["configs"] if "/" not in c], "none"))
    for cfg in [c for c in out["configs"] if "/" in c]:
        out[f"pooling_{out['configs'][cfg]['pooling']}_no_token_exits"] = family(out, timed, test_probs, y, [cfg], cfg)
    return out


def family(out, timed, test_probs, y, cfgs, base):
    """full_acc, layer1_acc, static_best, chosen (per rule and best) and the target verdict of
    the configs ``cfgs`` against the full-depth probe of ``base``."""
    f = {"full_acc": round(100 * float((test_probs[base][:, -1].argmax(1) == y).mean()), 2),
         "layer1_acc": round(100 * float((test_probs[base][:, 0].argmax(1) == y).mean()), 2)}
    f["depth_matters"] = bool(f["full_acc"] - f["layer1_acc"] >= 3)
    chosen = {}
    for cfg in cfgs:
        for row in timed:
            if row["config"] == cfg and out["configs"][cfg]["thresholds"].get(row["kind"]) == row["value"]:
                chosen[f"{cfg}/{row['kind']}"] = row
    static = chosen.get(f"{base}/layer")
    f["static_best"] = None if static is None else {"layer": int(static["value"]), "test_acc": static["test_acc"],
                                                    "speedup_measured": static["speedup_measured"],
                                                    "drop_points": static["drop_points"], "drop_ci95": static["drop_ci95"]}
    rules = {k: {"rule": r["kind"], "config": r["config"], "threshold": r["value"], "test_acc": r["test_acc"],
                 "drop_points": r["drop_points"], "drop_ci95": r["drop_ci95"], "speedup_measured": r["speedup_measured"],
                 "mean_stop_layer": r["mean_stop_layer"], "compute_fraction": r["compute_fraction"]}
             for k, r in chosen.items() if r["kind"] != "layer"}
    best = max(rules, key=lambda k: rules[k]["speedup_measured"]) if rules else None
    f["chosen"] = {"per_rule": rules, "best": dict(rules[best], key=best) if best else None}
    b = f["chosen"]["best"]
    f["target_met"] = (None if not f["depth_matters"] else
                       bool(b and b["drop_points"] <= 1 and b["speedup_measured"] >= 3
                            and (static is None or b["speedup_measured"] > static["speedup_measured"])))
    return f


def write_md(res, path):
    lines = ["# Early-exit classification (`bench/bench_classify.py`)", "",
             "Embedded minigpt2-stories (12 layers, n_embd 192) as a frozen feature extractor; one linear probe per layer; "
             "thresholds chosen on the 20% held-out slice of the training sample (drop <= 1 point), never on test. "
             "`none`: no token exits; `adept-lazy`: the engine's ADEPT token exits in the prefill, lazy K/V fill. "
             "Compute fraction: FLOPs (blocks, token-exit checks, K/V propagation, probes) over full depth (all blocks on all "
             "tokens + the last-layer probe). Speed-up: measured wall time of full depth over the rule, same texts, "
             f"interleaved text by text with full depth, {ROUNDS} rounds, 1 thread, one text at a time.", ""]
    for name, d in res["datasets"].items():
        lines += [f"## {name}", "",
                  f"train sample {d['n_train']}, test {d['n_test']} of {d['n_test_total']}, timed on {d['n_timing']} test texts; "
                  f"full-depth probe {d['full_acc']}%, layer-1 probe {d['layer1_acc']}% -> depth "
                  + ("matters" if d["depth_matters"] else "does **not** matter (< 3 points)") + f"; full depth {d['full_texts_per_s']} texts/s.", ""]
        for cfg, c in d["configs"].items():
            if "/" in cfg:
                continue
            lines.append(f"- `{cfg}`: pooling {c['pooling']} (held-out mean acc over layers: "
                         + ", ".join(f"{m} {a}" for m, a in c["heldout_mean_acc"].items()) + "); test acc by layer "
                         + ", ".join(f"{m}: {' '.join(str(a) for a in accs)}" for m, accs in c["test_acc_by_layer"].items()))
        if "no_exit_probes_on_exit_features_acc_by_layer" in d:
            lines.append("- probes fitted without token exits read on features with them (test acc by layer): "
                         + " ".join(map(str, d["no_exit_probes_on_exit_features_acc_by_layer"])))
        lines += ["", "| config | rule | test acc | drop (95% CI) | mean stop layer | compute | texts/s | speed-up |",
                  "|---|---|---:|---|---:|---:|---:|---:|"]
        for r in d["timed"]:
            lines.append(f"| {r['config']} | {r['rule']} | {r['test_acc']} | {r['drop_points']} ({r['drop_ci95'][0]}, {r['drop_ci95'][1]}) "
                         f"| {r['mean_stop_layer']} | {r['compute_fraction']} | {r['texts_per_s']} | {r['speedup_measured']}x |")
        b, s = d["chosen"]["best"], d["static_best"]
        lines += ["", f"static_best: {s}", "", f"chosen (best): {b}", "", f"target met: {d['target_met']}", ""]
        for key in [k for k in d if k.startswith("pooling_")]:
            f = d[key]
            lines += [f"### {key} (secondary: the other pooling, no token exits)", "",
                      f"full-depth probe {f['full_acc']}%, layer-1 probe {f['layer1_acc']}% -> depth "
                      + ("matters" if f["depth_matters"] else "does not matter"), "",
                      f"static_best: {f['static_best']}", "", f"chosen (best): {f['chosen']['best']}", "",
                      f"target met: {f['target_met']}", ""]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["datasets"])
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 9), squeeze=False)
    marks = {"layer": "s", "max-prob": "o", "entropy": "^", "patience": "D"}
    for j, name in enumerate(names):
        d = res["datasets"][name]
        ax = axes[0, j]
        for cfg, c in d["configs"].items():
            for kind, rows in c["sweep"].items():
                ax.plot([r["compute_fraction"] for r in rows], [r["test_acc"] for r in rows], marker=marks[kind],
                        ls="-" if cfg == "none" else "--", ms=3, label=f"{kind} ({cfg})")
        ax.axhline(d["full_acc"], color="k", lw=0.8, label="full depth")
        ax.set_xlabel("compute fraction (FLOPs / full depth)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: accuracy vs compute (sweep)")
        ax.legend(fontsize=6)
        ax = axes[1, j]
        for r in d["timed"]:
            ax.scatter(r["speedup_measured"], r["test_acc"], marker=marks[r["kind"]],
                       color={"none": "C0", "adept-lazy": "C1"}.get(r["config"], "C2"))
            ax.annotate(r["rule"], (r["speedup_measured"], r["test_acc"]), fontsize=5)
        ax.axhline(d["full_acc"], color="k", lw=0.8)
        ax.axvline(1, color="k", lw=0.5)
        ax.set_xlabel("measured speed-up vs full depth (x)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name}: measured (blue: no token exits, orange: adept-lazy, green: other pooling)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny samples (smoke run; writes to /tmp)")
    ap.add_argument("--datasets", default="sst2,ag_news")
    ap.add_argument("--replot", action="store_true", help="redraw the PNG from the JSON only")
    args = ap.parse_args()
    if args.replot:
        plot(json.loads((OUT / "classification.json").read_text()), OUT / "classification.png")
        return 0
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (the classification data sets are not in the repository)", file=sys.stderr)
        return 0
    threadpool_limits(1)
    backend.use()
    model = Model.load()
    engines = {cfg: build_engine(model, st) for cfg, st in CONFIGS.items()}
    for e in engines.values():
        e.prepare()
    res = {"model": "minigpt2-stories", "threads": 1, "rounds": ROUNDS, "backend": backend.active(),
           "datasets": {}}
    out_dir = Path("/tmp/bench_classify_quick") if args.quick else OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in args.datasets.split(","):
        res["datasets"][name] = run_dataset(name, model, engines, args.quick)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        (out_dir / "classification.json").write_text(json.dumps(res, indent=1) + "\n")
        write_md(res, out_dir / "classification.md")
        print(f"{name} done at {res['wall_s']} s", file=sys.stderr, flush=True)
    plot(res, out_dir / "classification.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
