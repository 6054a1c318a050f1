"""``minadept eval`` output on the embedded model: the full-depth baseline and an explained
agreement beside a policy's figures, singular "1 token", a clean stderr when not on a terminal (the
progress bar is for terminals only), and the sweep plot (full-depth marker, τ labels, axis scales
with plain tick labels, a title counting the scored tokens)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "minadept", *args, "--threads", "1"],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A few paragraphs of English (the repository's README)."""
    p = tmp_path_factory.mktemp("eval") / "readme.txt"
    p.write_text(README.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    return p


def test_policy_json_has_full_depth_ppl_equal_to_exit_none(text_file):
    r = cli("eval", "--text", str(text_file), "--max-tokens", "300", "--exit", "fixed", "--exit-layer", "6", "--json")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    base = cli("eval", "--text", str(text_file), "--max-tokens", "300", "--exit", "none", "--json")
    assert base.returncode == 0 and base.stderr == "", base.stderr
    none = json.loads(base.stdout.strip().splitlines()[-1])
    assert res["tokens"] == none["tokens"] == 299
    assert res["full_depth_ppl"] == pytest.approx(none["ppl"], rel=1e-12)
    assert res["ppl"] != pytest.approx(none["ppl"], rel=1e-6)          # exiting at 6 of 12 changes it
    for key in ("ppl", "tokens", "nll", "agreement", "mean_exit_layer", "compute_fraction", "exit", "exit_layer"):
        assert key in res                                                # nothing removed
    assert res["mean_exit_layer"] == 6 and 0 < res["agreement"] < 1


def test_policy_human_output_explains_agreement_and_prints_baseline(text_file):
    r = cli("eval", "--text", str(text_file), "--max-tokens", "300", "--exit", "fixed", "--exit-layer", "6")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    j = cli("eval", "--text", str(text_file), "--max-tokens", "300", "--exit", "fixed", "--exit-layer", "6", "--json")
    res = json.loads(j.stdout.strip().splitlines()[-1])
    out = r.stdout
    assert f"perplexity {res['ppl']:.3f} over 299 tokens" in out
    assert f"full-depth perplexity {res['full_depth_ppl']:.3f}" in out
    assert f"agreement {res['agreement']:.4f} (share of positions whose top-1 token equals full depth's)" in out


def test_one_token_is_singular(text_file):
    r = cli("eval", "--text", str(text_file), "--max-tokens", "2")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert re.search(r"over 1 token \(", r.stdout), r.stdout
    assert "1 tokens" not in r.stdout
    r = cli("eval", "--text", str(text_file), "--max-tokens", "3")
    assert re.search(r"over 2 tokens \(", r.stdout), r.stdout


def test_progress_bar_only_on_a_terminal(text_file):
    """stderr is a pty: the tqdm bar (tokens) shows; the captured runs above keep stderr empty."""
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import select
    import struct
    import termios
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # 0 columns: tqdm prints nothing
    chunks = []
    try:
        p = subprocess.Popen([sys.executable, "-m", "minadept", "eval", "--text", str(text_file), "--max-tokens",
                              "300", "--exit", "fixed", "--exit-layer", "6", "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=slave)
        while True:      # read while it runs (Linux drops pty data once the writer has gone)
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                chunks.append(os.read(master, 65536))
            elif p.poll() is not None:
                break
        p.communicate(timeout=60)
    finally:
        os.close(slave)
        os.close(master)
    err = b"".join(chunks).decode("utf-8", "replace")
    assert p.returncode == 0
    assert "/598" in err and "tok" in err, err       # two passes (full depth + policy) of 299 tokens


def _rows():
    def row(exit, setting, ppl, agreement, cf):
        return dict(exit=exit, setting=setting, ppl=ppl, agreement=agreement, compute_fraction=cf,
                    mean_exit_layer=6.0, tokens=99, nll=6.0)
    return [row("none", "", 676.6, 1.0, 1.0),
            row("fixed", "exit_layer=6", 628.8, 0.69, 0.676),
            row("saturation", "tau=0.9", 664.2, 0.41, 0.471),
            row("saturation", "tau=0.99", 672.3, 0.85, 0.793),
            row("confidence", "tau=0.5", 693.9, 0.95, 3.388),
            row("confidence", "tau=0.8", 676.6, 1.0, 3.481),
            row("confidence", "tau=0.9", 676.6, 1.0, 3.481)]


def test_plot_sweep_marks_full_depth_labels_tau_and_uses_plain_ticks(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.ticker import LogFormatter

    from minadept.evaluate import plot_sweep
    png = tmp_path / "p.png"
    fig = plot_sweep(_rows(), str(png), title="t")
    assert png.stat().st_size > 10_000
    ax_agree, ax_ppl = fig.axes[:2]
    for ax, y in ((ax_agree, 1.0), (ax_ppl, 676.6)):
        # full depth: one large marker, drawn on top of everything else, labelled
        stars = [l for l in ax.lines if l.get_marker() == "*"]
        assert len(stars) == 1
        star = stars[0]
        assert list(star.get_xdata()) == [1.0] and list(star.get_ydata()) == [y]
        assert star.get_markersize() > max(l.get_markersize() for l in ax.lines if l is not star)
        assert star.get_zorder() > max(l.get_zorder() for l in ax.lines if l is not star)
        assert "full depth" in star.get_label()
        texts = [t.get_text() for t in ax.texts]
        assert "full depth" in texts
        # τ labels; coinciding points (0.8, 0.9) share one label
        assert {"τ=0.9", "τ=0.99", "τ=0.5", "τ=0.8/0.9"} <= set(texts), texts
        assert not any("exit_layer" in t for t in texts)
        # compute axis: log scale, plain labels, no minor ticks
        assert ax.get_xscale() == "log"
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert "1" in labels and "0.5" in labels and "3" in labels, labels
        assert not any("10^" in t or "times" in t for t in labels), labels
        assert len(ax.xaxis.get_minorticklocs()) == 0
    # narrow perplexity range (< 10x): linear axis with plain labels
    assert ax_ppl.get_yscale() == "linear"
    assert not isinstance(ax_ppl.yaxis.get_major_formatter(), (LogFormatter,))
    ylabels = [t.get_text() for t in ax_ppl.get_yticklabels() if t.get_text()]
    assert ylabels and all(re.fullmatch(r"[0-9.]+", t) for t in ylabels), ylabels
    assert fig._suptitle.get_text() == "t"
    # a range over 10x goes log, still with plain labels and no minor-tick labels
    rows = _rows() + [dict(exit="margin", setting="tau=0.3", ppl=20000.0, agreement=0.1, compute_fraction=3.1,
                           mean_exit_layer=1.0, tokens=99, nll=9.9)]
    fig = plot_sweep(rows, None)
    ax_ppl = fig.axes[1]
    assert ax_ppl.get_yscale() == "log"
    fig.canvas.draw()
    ylabels = [t.get_text() for t in ax_ppl.get_yticklabels() if t.get_text()]
    assert ylabels and all(re.fullmatch(r"[0-9.]+", t) for t in ylabels), ylabels
    assert not [t.get_text() for t in ax_ppl.yaxis.get_minorticklabels() if t.get_text()]


def test_sweep_plot_title_counts_scored_tokens(text_file, tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from minadept import cli as cli_mod
    from minadept import evaluate as ev
    figs = []
    real = ev.plot_sweep

    def spy(rows, out, title=""):
        figs.append((rows, real(rows, out, title=title)))
        return figs[-1][1]

    monkeypatch.setattr(ev, "plot_sweep", spy)
    png = tmp_path / "s.png"
    assert cli_mod.main(["eval", "--text", str(text_file), "--max-tokens", "12", "--sweep", "--plot", str(png),
                         "--json", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])["sweep"]
    assert {r["tokens"] for r in rows} == {11}
    assert "none" in [r["exit"] for r in rows] and rows[0]["agreement"] == 1.0
    (_, fig), = figs
    title = fig._suptitle.get_text()
    assert re.search(r"\b11 scored tokens\b", title), title
    assert "12 tokens" not in title
    assert png.stat().st_size > 10_000
