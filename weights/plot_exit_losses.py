"""Draw the held-out loss of exiting after every block over training (``valid_by_layer`` of one or
more ``train_log.json`` files written by train.py, stages drawn one after the other) to a PNG.

    python weights/plot_exit_losses.py OUT.png LOG.json [LOG.json ...]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, logs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset, curves, bounds = 0, {}, []
    for path in logs:
        log = json.load(open(path))
        rows = log.get("valid_by_layer", [])
        for step, losses in rows:
            for k, v in enumerate(losses, start=1):
                curves.setdefault(k, []).append(((offset + step * log["tokens_per_step"]) / 1e6, v))
        offset += log["settings"]["steps"] * log["tokens_per_step"]
        bounds.append(offset / 1e6)
    cmap = plt.get_cmap("viridis")
    L = max(curves)
    for k, pts in curves.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "o-", ms=2, lw=1, color=cmap((k - 1) / max(1, L - 1)),
                label=f"exit after block {k}" if k in (1, L // 2, L - 1, L) else None)
    for b in bounds[:-1]:
        ax.axvline(b, color="0.6", ls="--", lw=0.8)
    ax.set_xlabel("million tokens since the start of the first log shown (dashed: next stage; each\n"
                  "stage's held-out windows are its own context length, so levels across a line differ)")
    ax.set_ylabel("held-out cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("held-out loss of exiting after each block (identity exit map), by training stage")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
