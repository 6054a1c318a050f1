"""Interpolated bigram baseline for the embedded model's model card.

Fits P(w | v) = lam * c(v, w) / c(v) + (1 - lam) * P_uni(w) (P_uni add-one smoothed) on the
training text, tokenized with the embedded model's tokenizer as one stream (as ``minadept eval``
does), chooses lam on the last 5% of the training stream, and reports the perplexity on the
held-out file over every token after the first.

    python weights/bigram_baseline.py --train ../shared/corpus/train.txt \
        --valid ../shared/corpus/valid.txt --tokenizer weights/minigpt2-stories/tokenizer.json
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def encode(tok, path: str) -> np.ndarray:
    return np.asarray(tok.encode(Path(path).read_text(encoding="utf-8")).ids, dtype=np.int64)


def fit(ids: np.ndarray, V: int):
    """Bigram counts as a sparse dict keyed v*V+w, context counts c(v), add-one unigram."""
    keys, counts = np.unique(ids[:-1] * V + ids[1:], return_counts=True)
    ctx = np.bincount(ids[:-1], minlength=V).astype(np.float64)
    uni = (np.bincount(ids, minlength=V) + 1.0) / (len(ids) + V)
    return keys, counts.astype(np.float64), ctx, uni


def log_probs(model, ids: np.ndarray, V: int, lam: float) -> np.ndarray:
    keys, counts, ctx, uni = model
    q = ids[:-1] * V + ids[1:]
    i = np.searchsorted(keys, q)
    i = np.minimum(i, len(keys) - 1)
    c = np.where(keys[i] == q, counts[i], 0.0)
    c_v = ctx[ids[:-1]]
    p_bi = np.divide(c, c_v, out=np.zeros_like(c), where=c_v > 0)
    return np.log(lam * p_bi + (1 - lam) * uni[ids[1:]])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True)
    ap.add_argument("--valid", required=True)
    ap.add_argument("--tokenizer", required=True)
    args = ap.parse_args(argv)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(args.tokenizer)
    V = tok.get_vocab_size()
    train, valid = encode(tok, args.train), encode(tok, args.valid)
    cut = int(len(train) * 0.95)
    dev_model = fit(train[:cut], V)
    lams = np.linspace(0.05, 0.95, 19)
    dev_nll = [-log_probs(dev_model, train[cut:], V, l).mean() for l in lams]
    lam = float(lams[int(np.argmin(dev_nll))])
    nll = -log_probs(fit(train, V), valid, V, lam).mean()
    print(json.dumps({"lambda": lam, "valid_tokens_scored": int(len(valid) - 1),
                      "valid_nll": float(nll), "valid_ppl": math.exp(nll)}))


if __name__ == "__main__":
    main()
