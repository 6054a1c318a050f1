"""Quality/compute frontier of two models, OLD and NEW, on the same text. Not a test.

For each model (each with its own tokenizer, on the same byte chunks of the text; the
``minadept eval --chunk-bytes N`` protocol, so the full-depth bits per byte equal that command's):

  1. full depth: bits per byte (ΣNLL / (ln 2 · Σbytes)), perplexity, tokens scored, bytes;
  2. ``fixed`` exit at every layer k = 1..n_layer (identity exit map, as ``minadept eval
     --exit fixed --exit-layer k``): bits per byte, top-1 agreement with full depth, compute
     fraction (the engine's FLOPs incl. checks and propagation / full depth's);
  3. ``adept`` at every threshold of the grid plus the model's calibrated default: the same and
     the mean exit layer;
  4. the KL-oracle bound: from one full-depth pass recording every layer's state, each token
     exits at the shallowest layer k whose mapped prediction p_k = softmax(head(ln_f(map_k(h_k))))
     has KL(p_L || p_k) <= kappa (nats); kappa is bisected so that bits per byte = full depth +
     the project's budget log2(1.05) · 0.2495 ≈ 0.0176. Its compute fraction uses the engine's
     FLOP conventions (k blocks + LM head + exit map below L + K/V propagation to the L-k skipped
     layers, no exit checks). It is computed on full-depth states, so it ignores what the
     propagated K/V of exited tokens do to later tokens: a bound for the exit decisions only;
  5. a check: at each fixed layer's compute fraction, adept's bits per byte linearly
     interpolated over its sweep (sorted by compute), and whether it is below fixed's.

Writes ``OUT.md`` and ``OUT.json`` (default ``bench/results/frontier``).

    python bench/bench_frontier.py [--old DIR] [--new DIR] [--text FILE] [--chunk-bytes 512]
                                   [--max-bytes N] [--out bench/results/frontier] [--threads 1]

Without ``--old`` the model files of git revision 341b187 (weights/minigpt2-stories/) are
extracted with ``git show`` into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from minadept import backend
from minadept.engine import Engine
from minadept.errors import MinadeptError
from minadept.evaluate import bits_per_byte, byte_chunks, chunk_windows, evaluate_windows, full_depth_pass, read_text
from minadept.exits.adept import ADEPT_FILE, load_adept
from minadept.flops import block_flops, head_flops, kv_layer_flops
from minadept.model import Model
from minadept.settings import EngineSettings, build_engine

ROOT = Path(__file__).resolve().parents[1]
OLD_REV = "341b187"
MODEL_PATH = "weights/minigpt2-stories"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", ADEPT_FILE)
ADEPT_TAUS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.96, 0.97, 0.98, 0.99]
BUDGET_BPB = math.log2(1.05) * 0.2495     # bits/byte: +5% perplexity at 0.2495 tokens per byte
ORACLE_NOTE = ("computed on full-depth hidden states: it ignores the effect of exited tokens' "
               "propagated K/V on later tokens, and counts no exit-check cost")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (sizes in bytes); exits with a usage message for a bad value."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", default=None, help=f"OLD model directory (default: {MODEL_PATH}/ at git {OLD_REV})")
    ap.add_argument("--new", default=str(ROOT / MODEL_PATH), help="NEW model directory")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "corpus" / "valid.txt"), help="UTF-8 text")
    ap.add_argument("--chunk-bytes", type=int, default=512, help="bits-per-byte protocol chunk size (bytes)")
    ap.add_argument("--max-bytes", type=int, default=0, help="use only the first N bytes of the text (0 = all)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "frontier"), help="writes OUT.md, OUT.json")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads")
    ap.add_argument("--only", choices=("OLD", "NEW"), default=None,
                    help="measure one model and write only OUT.json (to run OLD and NEW as two processes)")
    ap.add_argument("--combine", nargs=2, metavar=("OLD.json", "NEW.json"), default=None,
                    help="write OUT.md/.json from two --only runs instead of measuring")
    args = ap.parse_args(argv)
    if args.chunk_bytes < 16:
        ap.error(f"--chunk-bytes must be >= 16, got {args.chunk_bytes}")
    if args.max_bytes < 0:
        ap.error(f"--max-bytes must be >= 0, got {args.max_bytes}")
    return args


def load_text(path: str, max_bytes: int) -> str:
    """The text (all of it, or its first ``max_bytes`` bytes, less a UTF-8 character cut at the
    end). Exits with a one-line message when the file is missing or not UTF-8."""
    if not Path(path).is_file():
        sys.exit(f"error: text file not found: {path}")
    if max_bytes == 0:
        try:
            return read_text(path)
        except MinadeptError as e:
            sys.exit(f"error: {e}")
    data = Path(path).read_bytes()[:max_bytes]
    for cut in range(4):                          # a UTF-8 character is at most 4 bytes
        try:
            return data[:len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    sys.exit(f"error: cannot read {path} as UTF-8 text")


def extract_old(rev: str, dest: Path) -> tuple[Path, str]:
    """Write the model files of ``rev`` (``MODEL_PATH``) into ``dest`` with ``git show``; returns
    (dest, the full commit hash)."""
    git = ["git", "-C", str(ROOT)]
    full = subprocess.run(git + ["rev-parse", f"{rev}^{{commit}}"], check=True, capture_output=True,
                          text=True).stdout.strip()
    for name in MODEL_FILES:
        blob = subprocess.run(git + ["show", f"{full}:{MODEL_PATH}/{name}"], check=True, capture_output=True)
        (dest / name).write_bytes(blob.stdout)
    return dest, full


def progress(total: int, desc: str) -> tqdm:
    """A progress bar over scored tokens, on stderr."""
    return tqdm(total=total, unit="tok", desc=desc, leave=False, file=sys.stderr, mininterval=2.0)


def point(res: dict, n_bytes: int, full_bpb: float, **extra) -> dict:
    """One frontier point from an ``evaluate`` result: bits/byte, its difference to full depth
    (bits/byte), agreement (fraction), compute fraction (FLOPs / full depth's), mean exit layer."""
    bpb = bits_per_byte(res, n_bytes)
    return dict(extra, bits_per_byte=bpb, delta_bits_per_byte=bpb - full_bpb, agreement=res.get("agreement", 1.0),
                compute_fraction=res["compute_fraction"], mean_exit_layer=res["mean_exit_layer"],
                ppl=res["ppl"], tokens=res["tokens"])


def run_full(model, wins, n_bytes: int, n_tok: int, label: str) -> tuple[dict, list]:
    """Full depth: its row (bits/byte, perplexity, nats/token, tokens, bytes) and the top-1
    predictions of every window (the agreement reference)."""
    with progress(n_tok, f"{label} full depth") as bar:
        res, ref = full_depth_pass(Engine(model), wins, progress=bar)
    row = point(res, n_bytes, bits_per_byte(res, n_bytes), setting="full depth")
    row.update(nll=res["nll"], bytes=n_bytes)
    return row, ref


def run_policy(model, settings: EngineSettings, wins, ref, n_bytes, full_bpb, desc, adept=None, **extra) -> dict:
    """One policy over the windows (``evaluate_windows``), as a frontier point."""
    n_tok = sum(len(w) - 1 for w in wins)
    with progress(n_tok, desc) as bar:
        res = evaluate_windows(build_engine(model, settings, adept=adept), wins, ref, progress=bar)
    row = point(res, n_bytes, full_bpb, **extra)
    tqdm.write(f"{desc}: {row['bits_per_byte']:.4f} bits/byte ({row['delta_bits_per_byte']:+.4f}), agreement "
               f"{row['agreement']:.4f}, compute {row['compute_fraction']:.4f}, mean exit {row['mean_exit_layer']:.2f}",
               file=sys.stderr)
    return row


def run_sweeps(model, params, wins, ref, n_bytes, full_bpb, label) -> tuple[list, list]:
    """(fixed rows for k = 1..n_layer, adept rows for every threshold of the grid and the
    calibrated default, in increasing threshold)."""
    L = model.config.n_layer
    fixed = [run_policy(model, EngineSettings(exit="fixed", exit_layer=k), wins, ref, n_bytes, full_bpb,
                        f"{label} fixed {k}", setting=f"fixed k={k}", exit_layer=k) for k in range(1, L + 1)]
    adept = []
    for tau in sorted(set(ADEPT_TAUS) | {params.threshold}):
        st = EngineSettings(exit="adept", threshold=tau)
        adept.append(run_policy(model, st, wins, ref, n_bytes, full_bpb, f"{label} adept tau={tau:g}", adept=params,
                                setting=f"adept tau={tau:g}", threshold=tau, default=tau == params.threshold))
    return fixed, adept


def _log_softmax(z: np.ndarray) -> np.ndarray:
    """Log-probabilities (nats) of logits z [N, V], in float64."""
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _window_tables(full: Engine, mapped, w: np.ndarray, ref_top1: np.ndarray):
    """One window, full depth with every layer's state: KL(p_L || p_k) [L, T] (nats; row L-1 is
    k = L, zero), NLL of the true next token [L, T] (nats), top-1 equal to full depth's [L, T]
    and the window's full-depth FLOPs. p_k uses the learned exit map (``mapped.predict``)."""
    L, T = full.config.n_layer, len(w) - 1
    r = full.forward(w[:-1], full.new_cache(T), all_logits=True, record_hidden=True)
    rows, target = np.arange(T), w[1:]
    lp_full = _log_softmax(r.logits)
    p_full = np.exp(lp_full)
    kl, nll, agree = np.zeros((L, T)), np.empty((L, T)), np.ones((L, T), bool)
    for k in range(1, L):
        logits = mapped.predict(r.hidden[k], k)
        lp = _log_softmax(logits)
        kl[k - 1] = (p_full * (lp_full - lp)).sum(axis=-1)
        nll[k - 1] = -lp[rows, target]
        agree[k - 1] = logits.argmax(axis=-1) == ref_top1
    nll[L - 1] = -lp_full[rows, target]
    return kl, nll, agree, r.full_flops


def oracle_tables(model, params, wins, ref, label: str) -> dict:
    """Per scored token and layer: ``kl`` [L, N] (nats), ``nll`` [L, N] (nats), ``agree`` [L, N]
    (bool), ``pos`` [N] (position in its window) and ``full_flops`` (int, full depth's FLOPs)."""
    full = Engine(model)
    mapped = build_engine(model, EngineSettings(exit="adept"), adept=params)     # for its predict()
    parts, pos, full_flops = [], [], 0
    with progress(sum(len(w) - 1 for w in wins), f"{label} oracle") as bar:
        for w, top1 in zip(wins, ref):
            kl, nll, agree, ff = _window_tables(full, mapped, w, top1)
            parts.append((kl, nll, agree))
            pos.append(np.arange(len(w) - 1))
            full_flops += ff
            bar.update(len(w) - 1)
    kl, nll, agree = (np.concatenate(a, axis=1) for a in zip(*parts))
    return dict(kl=kl, nll=nll, agree=agree, pos=np.concatenate(pos), full_flops=full_flops)


def oracle_flops(cfg, params, exits: np.ndarray, pos: np.ndarray) -> int:
    """FLOPs of tokens at window positions ``pos`` [N] exiting at ``exits`` [N] (1..L), by the
    engine's conventions: k blocks attending pos+1 keys, the LM head, below L the exit map and
    the K/V propagation to the L-k skipped layers (no exit checks)."""
    L = cfg.n_layer
    exit_map, kv_extra = params.mapper_flops()
    blocks = exits * block_flops(cfg, pos + 1)
    below = exits < L
    extra = np.where(below, exit_map + (L - exits) * (kv_layer_flops(cfg) + kv_extra), 0)
    return int(blocks.sum() + head_flops(cfg) * len(exits) + extra.sum())


def oracle_at(tab: dict, kappa: float, n_bytes: int) -> dict:
    """Every token exits at the shallowest k with KL <= kappa (nats), else at L: bits/byte, mean
    exit layer and agreement (fraction) of those exits."""
    L, n = tab["kl"].shape
    ok = tab["kl"][:L - 1] <= kappa
    exits = np.where(ok.any(axis=0), ok.argmax(axis=0) + 1, L)
    cols = np.arange(n)
    return dict(exits=exits, bits_per_byte=float(tab["nll"][exits - 1, cols].sum()) / (math.log(2) * n_bytes),
                mean_exit_layer=float(exits.mean()), agreement=float(tab["agree"][exits - 1, cols].mean()))


def oracle_bound(model, params, tab: dict, n_bytes: int, full_bpb: float, iters: int = 60) -> dict:
    """Bisection on kappa (nats) in [0, max KL] for bits/byte = full + ``BUDGET_BPB``; reports the
    largest kappa found within the budget with its bits/byte, mean exit layer, agreement and
    compute fraction (FLOPs / full depth's). bits/byte need not be monotone in kappa: bisection
    finds one crossing."""
    target = full_bpb + BUDGET_BPB
    lo, hi = 0.0, float(tab["kl"].max()) * (1 + 1e-9) + 1e-12
    if oracle_at(tab, hi, n_bytes)["bits_per_byte"] <= target:
        lo = hi                                    # every token at layer 1 is within the budget
    for _ in range(iters if lo < hi else 0):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if oracle_at(tab, mid, n_bytes)["bits_per_byte"] <= target else (lo, mid)
    at = oracle_at(tab, lo, n_bytes)
    cf = oracle_flops(model.config, params, at.pop("exits"), tab["pos"]) / tab["full_flops"]
    full_check = float(tab["nll"][-1].sum()) / (math.log(2) * n_bytes)
    return dict(at, setting="KL-oracle bound", kappa_nats=lo, target_bits_per_byte=target,
                budget_bits_per_byte=BUDGET_BPB, delta_bits_per_byte=at["bits_per_byte"] - full_bpb,
                compute_fraction=cf, full_depth_bits_per_byte_from_states=full_check, note=ORACLE_NOTE)


def interp_check(fixed: list, adept: list) -> list:
    """For each fixed layer: adept's bits/byte linearly interpolated in compute fraction (over the
    sweep sorted by compute) at fixed's compute fraction, and whether it is below fixed's
    (None outside the sweep's compute range)."""
    pts = sorted((a["compute_fraction"], a["bits_per_byte"]) for a in adept)
    xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    out = []
    for f in fixed:
        x = f["compute_fraction"]
        inside = xs[0] <= x <= xs[-1]
        y = float(np.interp(x, xs, ys)) if inside else None
        out.append(dict(exit_layer=f["exit_layer"], compute_fraction=x, fixed_bits_per_byte=f["bits_per_byte"],
                        adept_bits_per_byte_interp=y, adept_below=None if y is None else bool(y < f["bits_per_byte"])))
    return out


def evaluate_model(label: str, model_dir, source: str, text: str, chunk_bytes: int) -> dict:
    """Every measurement of one model on ``text`` (its own tokenizer, the same byte chunks);
    ``source`` names the model in the output."""
    model = Model.load(str(model_dir))
    params = load_adept(Path(model_dir) / ADEPT_FILE, model.config)
    wins, n_bytes = chunk_windows(model.tokenizer, byte_chunks(text, chunk_bytes), model.config.n_positions)
    n_tok = sum(len(w) - 1 for w in wins)
    tqdm.write(f"{label}: {source}, {len(wins)} chunks, {n_tok} tokens, {n_bytes} bytes", file=sys.stderr)
    full, ref = run_full(model, wins, n_bytes, n_tok, label)
    tqdm.write(f"{label} full depth: {full['bits_per_byte']:.4f} bits/byte, ppl {full['ppl']:.3f}", file=sys.stderr)
    fixed, adept = run_sweeps(model, params, wins, ref, n_bytes, full["bits_per_byte"], label)
    tab = oracle_tables(model, params, wins, ref, label)
    oracle = oracle_bound(model, params, tab, n_bytes, full["bits_per_byte"])
    tqdm.write(f"{label} oracle: kappa {oracle['kappa_nats']:.4g} nats, {oracle['bits_per_byte']:.4f} bits/byte, "
               f"compute {oracle['compute_fraction']:.4f}, mean exit {oracle['mean_exit_layer']:.2f}", file=sys.stderr)
    return dict(source=source, dir=str(model_dir), n_layer=model.config.n_layer, n_embd=model.config.n_embd,
                vocab_size=model.config.vocab_size, adept_threshold=params.threshold, full=full, fixed=fixed,
                adept=adept, oracle=oracle, check=interp_check(fixed, adept))


def _fmt_row(r: dict, name: str) -> str:
    """One Markdown row: bits/byte, Δ (bits/byte), agreement, compute fraction, mean exit layer."""
    return (f"| {name} | {r['bits_per_byte']:.4f} | {r['delta_bits_per_byte']:+.4f} | {r['agreement']:.4f} | "
            f"{r['compute_fraction']:.4f} | {r['mean_exit_layer']:.2f} |")


def md_model(label: str, m: dict) -> list[str]:
    """The Markdown table of one model: full, fixed 1..L, adept thresholds, oracle bound."""
    f, o = m["full"], m["oracle"]
    lines = [f"## {label}: {m['source']}", "",
             f"{f['tokens']} tokens scored over {f['bytes']} bytes; full depth {f['bits_per_byte']:.4f} bits/byte, "
             f"perplexity {f['ppl']:.3f}; calibrated adept threshold {m['adept_threshold']:g}.", "",
             "| setting | bits/byte | Δ vs full | agreement | compute fraction | mean exit layer |",
             "|---|---:|---:|---:|---:|---:|", _fmt_row(f, "full depth")]
    lines += [_fmt_row(r, f"fixed k={r['exit_layer']}") for r in m["fixed"]]
    lines += [_fmt_row(r, f"adept τ={r['threshold']:g}" + (" (default)" if r["default"] else "")) for r in m["adept"]]
    lines += [_fmt_row(o, f"KL-oracle bound, κ={o['kappa_nats']:.4g} nats"), "",
              f"Oracle bound: exit at the shallowest layer whose learned-map prediction has KL(p_L ‖ p_k) ≤ κ; κ "
              f"bisected for bits/byte = full + {BUDGET_BPB:.4f} (target {o['target_bits_per_byte']:.4f}); "
              f"{ORACLE_NOTE}.", ""]
    return lines


def md_check(models: dict) -> list[str]:
    """The interpolation check: per fixed layer and model, adept's interpolated bits/byte at the
    fixed layer's compute fraction and whether it is below fixed's."""
    labels = list(models)
    head = "| k | " + " | ".join(f"{x} compute | {x} fixed | {x} adept (interp.) | {x} adept below?" for x in labels)
    lines = ["## Check: adept against fixed at equal compute", "",
             "adept's bits/byte linearly interpolated in compute fraction over its sweep (sorted by compute) at each "
             "fixed layer's compute fraction; n/a outside the sweep's compute range.", "",
             head + " |", "|---:|" + "---:|---:|---:|---|" * len(labels)]
    for i in range(len(models[labels[0]]["check"])):
        cells = []
        for x in labels:
            c = models[x]["check"][i] if i < len(models[x]["check"]) else None
            if c is None:
                cells.append(" | | | ")
                continue
            y = "n/a" if c["adept_bits_per_byte_interp"] is None else f"{c['adept_bits_per_byte_interp']:.4f}"
            below = "n/a" if c["adept_below"] is None else ("yes" if c["adept_below"] else "no")
            cells.append(f"{c['compute_fraction']:.4f} | {c['fixed_bits_per_byte']:.4f} | {y} | {below}")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_outputs(out: str, result: dict, argv: list[str]) -> None:
    """Write ``out``.json (every number) and ``out``.md (the tables)."""
    s = result["settings"]
    cmd = "python bench/bench_frontier.py" + "".join(" " + shlex.quote(a) for a in argv)
    md = ["# Quality/compute frontier: OLD against NEW", "",
          f"Generated by `{cmd}` (regenerate with the same command; {s['threads']} thread(s), {s['backend']} "
          f"backend, {s['seconds']:.0f} s). Text `{s['text']}`"
          + (f" (its first {s['max_bytes']} bytes)" if s["max_bytes"] else "")
          + f", {s['bytes']} bytes scored in chunks of at most {s['chunk_bytes']} bytes (the `minadept eval --chunk-bytes {s['chunk_bytes']}` protocol; each model "
          f"with its own tokenizer). OLD: {s['old']}. NEW: {s['new']}. Compute fraction: the engine's FLOPs "
          "(blocks, exit checks, exit map, LM head, K/V propagation) over full depth's; Δ in bits/byte.", ""]
    for label, m in result["models"].items():
        md += md_model(label, m)
    md += md_check(result["models"])
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    Path(out + ".md").write_text("\n".join(md), encoding="utf-8")
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)


def main(argv=None) -> None:
    """Measure OLD then NEW on the same text and write ``--out``.md/.json."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.combine:
        parts = [json.loads(Path(f).read_text()) for f in args.combine]
        settings = dict(parts[1]["settings"], old=parts[0]["settings"]["old"],
                        old_git_revision=parts[0]["settings"]["old_git_revision"],
                        seconds=parts[0]["settings"]["seconds"] + parts[1]["settings"]["seconds"],
                        note="OLD and NEW measured as two --only processes at once, one thread each")
        models = {**parts[0]["models"], **parts[1]["models"]}
        write_outputs(args.out, dict(settings=settings, models=models), argv)
        return
    text = load_text(args.text, args.max_bytes)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="frontier-old-") as tmp, threadpool_limits(args.threads):
        old_dir, rev = (Path(args.old), None) if args.old else extract_old(OLD_REV, Path(tmp))
        old_desc = f"`{MODEL_PATH}/` at git {rev}" if rev else f"`{args.old}`"
        todo = [(n, d, desc) for n, d, desc in (("OLD", old_dir, old_desc), ("NEW", Path(args.new), f"`{args.new}`"))
                if args.only in (None, n)]
        try:
            models = {name: evaluate_model(name, d, desc, text, args.chunk_bytes) for name, d, desc in todo}
        except MinadeptError as e:
            sys.exit(f"error: {e}")
    settings = dict(text=args.text, chunk_bytes=args.chunk_bytes, max_bytes=args.max_bytes,
                    text_bytes=len(text.encode("utf-8")), bytes=next(iter(models.values()))["full"]["bytes"],
                    old=old_desc, old_git_revision=rev, new=f"`{args.new}`",
                    threads=args.threads, backend=backend.active(), adept_taus=ADEPT_TAUS,
                    budget_bits_per_byte=BUDGET_BPB, seconds=time.perf_counter() - t0)
    if args.only:
        Path(args.out).with_suffix(".json").write_text(json.dumps(dict(settings=settings, models=models), indent=1))
        return
    write_outputs(args.out, dict(settings=settings, models=models), argv)

if __name__ == "__main__":
    main()
