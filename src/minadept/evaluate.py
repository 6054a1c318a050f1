"""Perplexity protocol, agreement with the full model, threshold sweeps and their plot.

Protocol (``minadept eval``): the text is one token stream ``ids``; windows
``ids[s : s + n_positions + 1]`` for s = 0, n_positions, 2 n_positions, ...; the model reads the
first n_positions tokens of each window (fewer in the last) and is scored on every next token.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from .errors import MinadeptError

SWEEP = {
    "confidence": [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
    "margin": [0.3, 0.5, 0.7, 0.8, 0.9, 0.98],
    "saturation": [0.9, 0.95, 0.97, 0.98, 0.99, 0.995],
}


def read_token_stream(tokenizer, path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Encode a UTF-8 text file as one stream of ids [N] int64. Raises MinadeptError if unreadable."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinadeptError(f"text file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise MinadeptError(f"cannot read {path} as UTF-8 text ({type(e).__name__})") from None
    ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
    if max_tokens is not None:
        if max_tokens < 2:
            raise MinadeptError(f"--max-tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise MinadeptError(f"{path} has fewer than 2 tokens; nothing to score")
    return ids


def windows(ids: np.ndarray, n_positions: int):
    """Yield the protocol's windows (arrays of 2..n_positions+1 ids)."""
    for s in range(0, len(ids) - 1, n_positions):
        w = ids[s:s + n_positions + 1]
        if len(w) >= 2:
            yield w


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def reference_top1(engine_full, ids: np.ndarray) -> list[np.ndarray]:
    """Full-depth top-1 prediction [len(w)-1] for every window (for agreement)."""
    out = []
    for w in windows(ids, engine_full.config.n_positions):
        r = engine_full.forward(w[:-1], engine_full.new_cache(len(w) - 1), all_logits=True)
        out.append(r.logits.argmax(axis=-1))
    return out


def evaluate(engine, ids: np.ndarray, ref_top1: list[np.ndarray] | None = None, progress=None) -> dict:
    """Run the protocol under ``engine``. Returns ppl, tokens, nll (nats/token), and when
    ``ref_top1`` is given agreement (fraction of positions whose top-1 equals full depth's),
    plus mean_exit_layer and compute_fraction (all FLOPs incl. checks and propagation / full)."""
    return evaluate_windows(engine, windows(ids, engine.config.n_positions), ref_top1, progress)


def evaluate_windows(engine, wins, ref_top1=None, progress=None) -> dict:
    """``evaluate`` over given windows (each an id array read on all but its last token)."""
    nll = 0.0
    n = agree = 0
    exit_sum = 0
    total = full = 0
    for i, w in enumerate(wins):
        cache = engine.new_cache(len(w) - 1)
        r = engine.forward(w[:-1], cache, all_logits=True)
        lp = _log_softmax(r.logits)
        nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        n += len(w) - 1
        if ref_top1 is not None:
            agree += int((r.logits.argmax(axis=-1) == ref_top1[i]).sum())
        exit_sum += int(r.exit_layers.sum())
        total += r.total_flops
        full += r.full_flops
        if progress is not None:
            progress.update(len(w) - 1)
    out = {"ppl": math.exp(nll / n), "tokens": n, "nll": nll / n,
           "mean_exit_layer": exit_sum / n, "compute_fraction": total / full}
    if ref_top1 is not None:
        out["agreement"] = agree / n
    return out


ADEPT_SWEEP = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def sweep_settings(n_layer: int, adept: bool = False):
    """(policy name, kwargs) for every point of the default sweep (``adept`` adds the learned
    policy's thresholds, for a calibrated model)."""
    pts = [("none", {})]
    for k in range(2, n_layer, 2):
        pts.append(("fixed", {"exit_layer": k}))
    for name, taus in SWEEP.items():
        pts += [(name, {"threshold": t}) for t in taus]
    if adept:
        pts += [("adept", {"threshold": t}) for t in ADEPT_SWEEP]
    return pts


def check_plot_output(out: str) -> None:
    """Before a sweep: matplotlib is installed, it can write this file type, and the file can be
    written. Raises MinadeptError."""
    from .cli import check_writable
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise MinadeptError("--plot needs matplotlib (pip install 'minadept[plot]')") from None
    check_writable(out, "--plot")
    kinds = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in kinds:
        raise MinadeptError(f"--plot {out}: unknown image type {suffix!r} (use one of {', '.join(sorted(kinds))})")


def plot_sweep(rows: list[dict], out: str, title: str = "") -> None:
    """Quality vs compute for every policy: agreement and perplexity against compute fraction."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinadeptError("--plot needs matplotlib (pip install 'minadept[plot]')") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["exit"] for r in rows):
        pts = sorted((r for r in rows if r["exit"] == name), key=lambda r: r["compute_fraction"])
        x = [r["compute_fraction"] for r in pts]
        axes[0].plot(x, [r["agreement"] for r in pts], "o-", label=name, ms=4)
        axes[1].plot(x, [r["ppl"] for r in pts], "o-", label=name, ms=4)
    axes[0].set_ylabel("top-1 agreement with full depth")
    axes[1].set_ylabel("perplexity")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("compute fraction (FLOPs incl. checks and propagation / full depth)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _fmt_row(r: dict) -> str:
    setting = r.get("setting", "")
    return (f"{r['exit']:<11}{setting:<14}{r['ppl']:>10.3f}{r.get('agreement', 1.0):>11.4f}"
            f"{r['mean_exit_layer']:>11.2f}{r['compute_fraction']:>10.4f}")


def run_eval_command(args, make_engine) -> int:
    """``minadept eval``: one setting, or ``--sweep``. Prints a table / summary; ``--json`` puts a
    JSON object on the last stdout line."""
    from .engine import Engine
    from .model import Model

    if args.plot and not args.sweep:
        raise MinadeptError("--plot needs --sweep")
    if args.plot:
        check_plot_output(args.plot)
    model = Model.load(args.model)
    ids = read_token_stream(model.tokenizer, args.text, args.max_tokens)
    full = Engine(model)
    if not args.sweep:
        engine = make_engine(args, model)
        ref = None if args.exit == "none" else reference_top1(full, ids)
        res = evaluate(engine, ids, ref)
        res.setdefault("agreement", 1.0)
        res.update(engine.policy.settings(), kv=engine.kv, kv_fill=engine.fill)
        if args.exit == "adept":
            res.update(exit_map="learned" if engine.exit_mapper else "identity",
                       kv_map="learned" if engine.kv_maps is not None else "identity")
        if not args.json:
            print(f"perplexity {res['ppl']:.3f} over {res['tokens']} tokens "
                  f"(nll {res['nll']:.4f} nats/token)")
            if args.exit != "none":
                print(f"agreement {res['agreement']:.4f}, mean exit layer {res['mean_exit_layer']:.2f}, "
                      f"compute fraction {res['compute_fraction']:.4f}")
        print(json.dumps(res) if args.json else "", end="\n" if args.json else "")
        return 0
    ref = reference_top1(full, ids)
    rows = []
    from .exits.adept import ADEPT_FILE, adept_engine, load_adept
    from .exits.policies import make_policy
    shipped = (model.path / ADEPT_FILE).is_file()
    adept = load_adept(args.adept or model.path, model.config) if args.adept or shipped else None
    print(f"{'exit':<11}{'setting':<14}{'ppl':>10}{'agreement':>11}{'mean_exit':>11}{'compute':>10}")
    for name, kw in sweep_settings(model.config.n_layer, adept=adept is not None):
        policy = make_policy(name, model.config, adept=adept, **kw)
        if name == "adept":
            eng = adept_engine(model, policy, adept, kv_map=args.kv == "propagate", kv=args.kv, fill=args.kv_fill)
        else:
            eng = Engine(model, policy, kv=args.kv, fill=args.kv_fill)
        res = evaluate(eng, ids, ref)
        res["exit"] = name
        res["setting"] = ",".join(f"{k}={v}" for k, v in kw.items()).replace("threshold=", "tau=")
        rows.append(res)
        print(_fmt_row(res), flush=True)
    if args.plot:
        plot_sweep(rows, args.plot, title=f"{model.path.name}: {Path(args.text).name}, {len(ids)} tokens")
    if args.json:
        print(json.dumps({"sweep": rows}))
    return 0
