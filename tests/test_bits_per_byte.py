"""The bits-per-byte protocol (``eval --chunk-bytes N``): documents split at <|endoftext|>, chunks
of at most N bytes cut at line ends, each scored after <|endoftext|> alone; bits per byte =
total NLL / (ln 2 * bytes). Checked against the chunking invariants and an independent
computation with ``reference.forward``."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

from minadept import Model
from minadept import reference as R
from minadept.evaluate import byte_chunks

TEXT = ("Once upon a time there was a little fox.\nShe lived by the sea, where the waves were loud.\n"
        "Every morning she ran along the sand and looked for shells.\n<|endoftext|>\n"
        "The old baker opened his shop before dawn. He kneaded the dough by lamplight "
        "and listened to the rain on the roof, humming a song his mother had taught him long ago.\n"
        "Then the first customers came.\n")

words = st.text(alphabet=st.sampled_from(list("abcdé日🙂 ")), min_size=0, max_size=30)
lines = st.lists(words, min_size=1, max_size=8).map(lambda ws: "\n".join(ws))


@settings(deadline=None, max_examples=150)
@given(docs=st.lists(lines, min_size=1, max_size=4), n=st.integers(16, 64))
def test_chunks_keep_every_byte_in_order_and_respect_the_limit(docs, n):
    text = "\n<|endoftext|>\n".join(docs)
    chunks = byte_chunks(text, n)
    assert all(len(c.encode("utf-8")) <= n for c in chunks)
    kept = [d.strip("\n") for d in docs if d.strip("\n").strip()]
    assert "".join(chunks) == "".join(kept)           # nothing lost, nothing added, order kept
    for c in chunks:
        assert "<|endoftext|>" not in c


def test_chunks_are_cut_at_line_ends_and_long_lines_at_a_space():
    chunks = byte_chunks(TEXT, 100)
    assert chunks[0] == "Once upon a time there was a little fox.\nShe lived by the sea, where the waves were loud.\n"
    assert chunks[1] == "Every morning she ran along the sand and looked for shells."
    long = [c for c in chunks if c.startswith("The old baker")][0]
    assert long.endswith(" ") and len(long.encode()) <= 100     # an over-long line cut at its last space


def test_bits_per_byte_equals_an_independent_computation(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = run_cli("eval", "--text", f, "--chunk-bytes", "100", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    m = Model.load()
    nll, n_bytes = 0.0, 0
    for chunk in byte_chunks(TEXT, 100):
        ids = [m.tokenizer.eot_id] + m.tokenizer.encode(chunk)
        z = R.forward(m, ids[:-1]).astype(np.float64)
        lp = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(ids) - 1), ids[1:]].sum()
        n_bytes += len(chunk.encode("utf-8"))
    assert res["bytes"] == n_bytes == sum(len(c.encode()) for c in byte_chunks(TEXT, 100))
    assert res["bits_per_byte"] == pytest.approx(nll / (math.log(2) * n_bytes), rel=1e-5)
    assert res["full_depth_bits_per_byte"] == res["bits_per_byte"]


def test_policy_run_reports_both_and_the_sweep_has_bits_per_byte(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text(TEXT, encoding="utf-8")
    r = run_cli("eval", "--text", f, "--chunk-bytes", "100", "--exit", "fixed", "--exit-layer", "4", "--json")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    full = json.loads(run_cli("eval", "--text", f, "--chunk-bytes", "100", "--json").stdout.strip().splitlines()[-1])
    assert res["full_depth_bits_per_byte"] == pytest.approx(full["bits_per_byte"], rel=1e-9)
    assert res["bits_per_byte"] != res["full_depth_bits_per_byte"]
    r = run_cli("eval", "--text", f, "--chunk-bytes", "100", "--sweep", "--json")
    rows = json.loads(r.stdout.strip().splitlines()[-1])["sweep"]
    assert rows[0]["exit"] == "none" and rows[0]["bits_per_byte"] == pytest.approx(full["bits_per_byte"], rel=1e-9)
    assert all(row["bytes"] == full["bytes"] for row in rows)


@pytest.mark.parametrize("args, msg", [
    (["--chunk-bytes", "8"], "--chunk-bytes must be >= 16"),
    (["--chunk-bytes", "100000"], "use a smaller --chunk-bytes"),
    (["--chunk-bytes", "100", "--max-tokens", "1"], "no chunk to score"),
])
def test_bad_chunk_settings_are_one_line_errors(tmp_path, args, msg):
    f = tmp_path / "t.txt"
    f.write_text(TEXT + "The fox ran along the beach. " * 200 + "\n", encoding="utf-8")   # one long document
    r = run_cli("eval", "--text", f, *args)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and msg in r.stderr, r.stderr
