"""Perplexity protocol, agreement with the full model, threshold sweeps and their plot.

Protocol (``minadept eval``): the text is one token stream ``ids``; windows
``ids[s : s + n_positions + 1]`` for s = 0, n_positions, 2 n_positions, ...; the model reads the
first n_positions tokens of each window (fewer in the last) and is scored on every next token.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import MinadeptError



EOT = "<|endoftext|>"


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents. Raises MinadeptError if it is missing or unreadable."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinadeptError(f"text file not found: {path}") from None
    except (UnicodeDecodeError, IsADirectoryError, PermissionError) as e:
        raise MinadeptError(f"cannot read {path} as UTF-8 text ({type(e).__name__})") from None


def read_token_stream(tokenizer, path: str | Path, max_tokens: int | None = None) -> np.ndarray:
    """Encode a UTF-8 text file as one stream of ids [N] int64. Raises MinadeptError if unreadable."""
    ids = np.asarray(tokenizer.encode(read_text(path)), dtype=np.int64)
    if max_tokens is not None:
        if max_tokens < 2:
            raise MinadeptError(f"--max-tokens must be >= 2, got {max_tokens}")
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise MinadeptError(f"{path} has fewer than 2 tokens; nothing to score")
    return ids


def byte_chunks(text: str, max_bytes: int) -> list[str]:
    """The bits-per-byte protocol's chunks: the text split into documents at ``<|endoftext|>``
    (blank lines around the separator dropped), each document into chunks of at most
    ``max_bytes`` UTF-8 bytes cut at line ends; a longer line is cut at its last space before the
    limit (at the limit, on a character boundary, when it has none)."""
    chunks = []
    for doc in text.split(EOT):
        doc, cur = doc.strip("\n"), ""
        for line in doc.splitlines(keepends=True):
            for piece in _split_line(line, max_bytes):
                if cur and len((cur + piece).encode("utf-8")) > max_bytes:
                    chunks.append(cur)
                    cur = ""
                cur += piece
        if cur.strip():
            chunks.append(cur)
    return chunks


def _split_line(line: str, max_bytes: int) -> list[str]:
    out = []
    while len(line.encode("utf-8")) > max_bytes:
        head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")     # whole characters
        cut = head.rfind(" ")
        cut = cut + 1 if cut > 0 else len(head)
        out.append(line[:cut])
        line = line[cut:]
    return out + [line]


def chunk_windows(tokenizer, chunks: list[str], n_positions: int, max_tokens: int | None = None):
    """Windows ``[<|endoftext|>] + tokens(chunk)`` (every chunk token scored with only the
    separator before it) and the UTF-8 bytes they cover; up to ``max_tokens`` scored tokens.
    Raises MinadeptError for a chunk longer than the context."""
    wins, n_bytes, n_tokens = [], 0, 0
    for chunk in chunks:
        ids = tokenizer.encode(chunk)
        if len(ids) > n_positions:
            raise MinadeptError(f"a chunk of {len(chunk.encode('utf-8'))} bytes is {len(ids)} tokens, more than "
                                f"the context of {n_positions} (n_positions): use a smaller --chunk-bytes")
        if max_tokens is not None and n_tokens + len(ids) > max_tokens:
            break
        wins.append(np.asarray([tokenizer.eot_id] + ids, dtype=np.int64))
        n_bytes += len(chunk.encode("utf-8"))
        n_tokens += len(ids)
    if not wins:
        raise MinadeptError("no chunk to score (empty text, or --max-tokens below the first chunk)")
    return wins, n_bytes


def bits_per_byte(res: dict, n_bytes: int) -> float:
    """ΣNLL / (ln 2 · Σbytes) of an ``evaluate`` result over text of ``n_bytes`` bytes."""
    return res["nll"] * res["tokens"] / (math.log(2) * n_bytes)


def _as_windows(data, n_positions: int):
    """A token stream [N] (the perplexity protocol's windows) or a list of windows as they are."""
    return data if isinstance(data, list) else windows(data, n_positions)


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
    return full_depth_pass(engine_full, ids)[1]


def full_depth_pass(engine_full, ids: np.ndarray, progress=None) -> tuple[dict, list[np.ndarray]]:
    """One full-depth pass of the protocol: its ``evaluate`` result (ppl, tokens, nll, ...,
    agreement 1.0) and the top-1 prediction of every window (the reference for agreement), so
    the baseline perplexity costs no second pass."""
    top1: list[np.ndarray] = []
    res = evaluate_windows(engine_full, _as_windows(ids, engine_full.config.n_positions), progress=progress,
                           _top1_out=top1)
    res["agreement"] = 1.0
    return res, top1


def evaluate(engine, ids, ref_top1: list[np.ndarray] | None = None, progress=None) -> dict:
    """Run the protocol under ``engine`` over a token stream ``ids`` [N] (or a list of windows,
    e.g. ``chunk_windows``). Returns ppl, tokens, nll (nats/token), and when
    ``ref_top1`` is given agreement (fraction of positions whose top-1 equals full depth's),
    plus mean_exit_layer and compute_fraction (all FLOPs incl. checks and propagation / full)."""
    return evaluate_windows(engine, _as_windows(ids, engine.config.n_positions), ref_top1, progress)


def evaluate_windows(engine, wins, ref_top1=None, progress=None, _top1_out: list | None = None) -> dict:
    """``evaluate`` over given windows (each an id array read on all but its last token).
    ``_top1_out``, a list, receives every window's top-1 predictions (see ``full_depth_pass``)."""
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
        if ref_top1 is not None or _top1_out is not None:
            top1 = r.logits.argmax(axis=-1)
            if ref_top1 is not None:
                agree += int((top1 == ref_top1[i]).sum())
            if _top1_out is not None:
                _top1_out.append(top1)
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


def sweep_settings(n_layer: int, adept: bool = False) -> list:
    """(policy name, settings) for every point of the default sweep: full depth, a fixed exit at
    every second layer, each threshold policy's ``PolicySpec.sweep`` (``adept`` adds the learned
    policy's, for a calibrated model)."""
    from .exits.policies import POLICIES
    pts = [("none", {})] + [("fixed", {"exit_layer": k}) for k in range(2, n_layer, 2)]
    for name, spec in POLICIES.items():
        if spec.sweep and (name != "adept" or adept):
            pts += [(name, {"threshold": t}) for t in spec.sweep]
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


def _plain(v: float, _pos=None) -> str:
    """Tick label without powers of ten or offsets: 0.5, 1, 1.5, 676."""
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:g}"


def _tau(r: dict) -> float | None:
    """A row's threshold τ (``threshold`` key or ``tau=X`` in its setting), None if it has none."""
    if r.get("threshold") is not None:
        return float(r["threshold"])
    m = re.search(r"tau=([0-9.]+)", str(r.get("setting", "")))
    return float(m.group(1)) if m else None


def plot_sweep(rows: list[dict], out: str | None, title: str = ""):
    """Quality vs compute for every policy: agreement and perplexity against compute fraction.
    Full depth (the ``none`` row, if any) is a large black star drawn on top; each threshold
    policy's points carry their τ. Writes ``out`` (if given) and returns the (closed) Figure.
    Raises MinadeptError without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinadeptError("--plot needs matplotlib (pip install 'minadept[plot]')") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    _set_scales(axes, [r["ppl"] for r in rows])   # first: label placement needs the final transforms
    labels = _plot_policies(axes, rows)
    _plot_full_depth(axes, rows)
    axes[0].set_ylabel("top-1 agreement with full depth")
    axes[1].set_ylabel("perplexity")
    for ax in axes:
        ax.axvline(1.0, color="black", lw=0.8, ls=":", zorder=1)
        ax.set_xlabel("compute fraction (FLOPs incl. checks and propagation / full depth; log scale)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()   # final layout before the τ labels are placed in display coordinates
    _place_labels(fig, axes, labels)
    if out is not None:
        fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig


_KEYS = ("agreement", "ppl")


def _set_scales(axes, ppl: list[float]) -> None:
    """Log compute axes with plain ticks; a log perplexity axis only over more than a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, NullLocator
    for ax in axes:
        # Log-scaled compute axis: the LM-head policies (confidence, margin) cost up to ~3.5x
        # full depth, which on a linear axis squeezes every point below 1 (where the savings
        # are) into a corner and leaves an empty band between 1 and ~3. A log axis puts equal
        # cost ratios at equal distances (half and double the cost lie equally far from 1),
        # gives the sub-1 region its fair share, and unlike a broken axis needs no gap chosen
        # in advance (LM-head points can land anywhere from ~0.4 to ~3.5 depending on τ/text).
        ax.set_xscale("log")
        ax.set_xmargin(0.06)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain))
        ax.xaxis.set_minor_locator(NullLocator())
    if ppl and max(ppl) > 10 * min(ppl):
        axes[1].set_yscale("log")
        axes[1].yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
        axes[1].yaxis.set_minor_formatter(NullFormatter())
    axes[1].yaxis.set_major_formatter(FuncFormatter(_plain))


def _plot_policies(axes, rows: list[dict]) -> list:
    """One line per policy (full depth apart); returns the τ labels to place as (axes, point,
    text, colour). Points that coincide (e.g. every τ that never exits) share one label."""
    labels = []
    for name in (n for n in dict.fromkeys(r["exit"] for r in rows) if n != "none"):
        pts = sorted((r for r in rows if r["exit"] == name), key=lambda r: r["compute_fraction"])
        x = [r["compute_fraction"] for r in pts]
        for ax, key in zip(axes, _KEYS):
            (line,) = ax.plot(x, [r.get(key, 1.0) for r in pts], "o-", label=name, ms=4, zorder=3)
            groups: dict[tuple, list[float]] = {}
            for r in pts:
                if _tau(r) is not None:
                    groups.setdefault((r["compute_fraction"], r.get(key, 1.0)), []).append(_tau(r))
            for xy, taus in groups.items():
                taus = sorted(taus)
                text = (f"τ={taus[0]:g}–{taus[-1]:g}" if len(taus) > 2
                        else "τ=" + "/".join(f"{t:g}" for t in taus))
                labels.append((ax, xy, text, line.get_color()))
    return labels


def _plot_full_depth(axes, rows: list[dict]) -> None:
    for r in (r for r in rows if r["exit"] == "none"):
        for ax, key in zip(axes, _KEYS):
            ax.plot([r["compute_fraction"]], [r.get(key, 1.0)], "*", color="black", ms=15, mec="white",
                    mew=0.8, zorder=10, label="none (full depth)")
            ax.annotate("full depth", (r["compute_fraction"], r.get(key, 1.0)), xytext=(0, 10),
                        textcoords="offset points", ha="center", fontsize=8, fontweight="bold", zorder=11)


def _place_labels(fig, axes, labels: list) -> None:
    """Put each τ label at the first offset where it overlaps no earlier label and stays inside
    its axes horizontally (measured with the renderer, in display coordinates)."""
    renderer = fig.canvas.get_renderer()
    candidates = [(4, 3), (4, -10), (-4, 3), (-4, -10), (4, 12), (-4, 12), (4, -19), (-4, -19)]
    placed = {ax: [t.get_window_extent(renderer) for t in ax.texts] for ax in axes}   # "full depth"
    for ax, xy, text, colour in labels:
        ann = ax.annotate(text, xy, xytext=candidates[0], textcoords="offset points", fontsize=6,
                          color=colour, va="bottom")
        box = ax.get_window_extent(renderer)
        for dx, dy in candidates:
            ann.xyann = (dx, dy)
            ann.set_horizontalalignment("left" if dx > 0 else "right")
            bb = ann.get_window_extent(renderer)
            if bb.x0 >= box.x0 and bb.x1 <= box.x1 and not any(bb.overlaps(o) for o in placed[ax]):
                break
        placed[ax].append(bb)


def format_row(r: dict) -> str:
    """One row of the sweep table (``SWEEP_HEADER``)."""
    setting = r.get("setting", "")
    return (f"{r['exit']:<11}{setting:<14}{r['ppl']:>10.3f}{r.get('agreement', 1.0):>11.4f}"
            f"{r['mean_exit_layer']:>11.2f}{r['compute_fraction']:>10.4f}")


SWEEP_HEADER = f"{'exit':<11}{'setting':<14}{'ppl':>10}{'agreement':>11}{'mean_exit':>11}{'compute':>10}"
