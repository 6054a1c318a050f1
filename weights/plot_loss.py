"""Draw the loss curve of a training run (``train_log.json`` written by train.py) to a PNG.

    python weights/plot_loss.py weights/minigpt2-stories/train_log.json weights/minigpt2-stories/loss.png
"""
import json
import math
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(log_path: str, out: str) -> None:
    log = json.load(open(log_path))
    steps, train = zip(*log["train"])
    k = 25                                        # running mean over k steps for readability
    smooth = [sum(train[max(0, i - k + 1):i + 1]) / len(train[max(0, i - k + 1):i + 1]) for i in range(len(train))]
    vs, vl = zip(*log["valid"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, train, color="0.8", lw=0.6, label="train (per step)")
    ax.plot(steps, smooth, color="C0", label=f"train ({k}-step mean)")
    ax.plot(vs, vl, "o-", color="C3", ms=3, label="held-out (64 windows of valid.txt)")
    ax.set_xlabel(f"step ({log['tokens_per_step']} tokens each)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(min(list(vl) + smooth) - 0.2, min(8.0, max(train)))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"final held-out loss {vl[-1]:.3f} (ppl {math.exp(vl[-1]):.1f})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
