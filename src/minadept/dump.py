"""The reference dump: one prompt's ids, hidden states, logits, exit layers and KV cache in an .npz
that other implementations test against (format documented in the README, versioned)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import MinadeptError

FORMAT_VERSION = 1


def dump_arrays(engine, ids) -> dict:
    """Run ``ids`` as one prefill under ``engine`` (all logits) and collect the dump arrays.

    Returns format_version, input_ids [T] int64, hidden_states [n_layer+1, T, C] float32 (h_0 =
    embeddings, then each block's output, the last *before* ln_f; a token that exited at layer k
    keeps h_k in later entries), logits [T, V] float32, kv [n_layer, 2, n_head, T, head_dim]
    float32 (as the engine left it, lazily pending entries filled), exit_layers [T] int64 and
    policy (JSON text of the policy settings).
    """
    cfg = engine.config
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > cfg.n_positions:
        raise MinadeptError(f"prompt is {len(ids)} tokens, longer than the model's context of {cfg.n_positions} (n_positions)")
    cache = engine.new_cache()
    r = engine.forward(ids, cache, all_logits=True, record_hidden=True)
    engine.flush(cache)
    T = len(ids)
    settings = engine.settings()
    return {
        "format_version": np.int64(FORMAT_VERSION),
        "input_ids": ids,
        "hidden_states": r.hidden.astype(np.float32),
        "logits": r.logits.astype(np.float32),
        "kv": np.ascontiguousarray(cache.kv[:, :, :, :T, :]),
        "exit_layers": r.exit_layers.astype(np.int64),
        "policy": np.array(json.dumps(settings, sort_keys=True)),
    }


def write_dump(engine, prompt: str, out: str) -> None:
    """Tokenize ``prompt`` (empty -> <|endoftext|>) and write ``dump_arrays`` to ``out``."""
    tok = engine.model.tokenizer
    ids = tok.encode(prompt) or [tok.eot_id]
    arrays = dump_arrays(engine, ids)
    path = Path(out)
    if path.parent and not path.parent.exists():
        raise MinadeptError(f"output directory does not exist: {path.parent}")
    if path.is_dir():
        raise MinadeptError(f"--out is a directory, expected a file name: {path}")
    try:
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise MinadeptError(f"cannot write {path}: {e.strerror or e}") from None
