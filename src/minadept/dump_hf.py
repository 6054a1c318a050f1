"""``minadept dump --engine transformers``: the reference dump (same format as ``dump.py``) written
from Hugging Face transformers at full depth, as an independent second opinion for ``minadept check``.

torch and transformers are imported here, inside the functions, and only for this engine: the rest
of minadept never imports them. Without them the command fails with one line naming the
``oracle`` extra.
"""
from __future__ import annotations

import json

import numpy as np

from .errors import MinadeptError

ORACLE_HINT = "pip install 'minadept[oracle]' (or pip install -e '.[oracle]' in a checkout)"


def _import_oracle():
    try:
        import torch
        import transformers
    except ImportError as e:
        raise MinadeptError(f"--engine transformers needs the oracle extra (torch and transformers; "
                            f"{getattr(e, 'name', None) or e} is missing): {ORACLE_HINT}") from None
    transformers.utils.logging.set_verbosity_error()          # no progress bars or notices on stderr
    transformers.utils.logging.disable_progress_bar()
    return torch, transformers


def load_hf_model(path):
    """transformers' GPT2LMHeadModel from the local directory ``path``, in float32, eval mode."""
    torch, transformers = _import_oracle()
    try:
        model = transformers.GPT2LMHeadModel.from_pretrained(str(path), dtype=torch.float32,
                                                             attn_implementation="eager")
    except TypeError:                        # transformers 4.x: torch_dtype, not dtype
        model = transformers.GPT2LMHeadModel.from_pretrained(str(path), torch_dtype=torch.float32,
                                                             attn_implementation="eager")
    except (OSError, ValueError) as e:
        raise MinadeptError(f"transformers cannot load {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    return model.float().eval()


def cache_kv(cache, L: int) -> np.ndarray:
    """[L, 2, H, T, D] from transformers' KV cache (Cache objects, or legacy tuples)."""
    out = []
    for l in range(L):
        if hasattr(cache, "layers"):
            k, v = cache.layers[l].keys[0], cache.layers[l].values[0]
        else:
            k, v = cache[l][0][0], cache[l][1][0]
        out.append(np.stack([k.float().numpy(), v.float().numpy()]))
    return np.stack(out)


def dump_arrays_transformers(hf_model, ids, threads: int | None = None) -> dict:
    """The dump arrays (keys and layout of ``dump.dump_arrays``) of one full-depth transformers
    forward pass over ``ids``: hidden_states from ``output_hidden_states`` with the last entry
    replaced by the input of ``ln_f`` (transformers' own last entry is after ``ln_f``), K/V from
    its cache, every exit layer = n_layer, and a policy naming the engine."""
    import torch
    import transformers

    from .dump import FORMAT_VERSION
    cfg = hf_model.config
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > cfg.n_positions:
        raise MinadeptError(f"prompt is {len(ids)} tokens, longer than the model's context of {cfg.n_positions} (n_positions)")
    if threads is not None:
        torch.set_num_threads(threads)
    grab = {}
    hook = hf_model.transformer.ln_f.register_forward_pre_hook(
        lambda mod, args: grab.__setitem__("pre_ln_f", args[0][0].detach().clone()))
    try:
        with torch.no_grad():
            o = hf_model(torch.from_numpy(ids)[None], output_hidden_states=True, use_cache=True)
    finally:
        hook.remove()
    L = cfg.n_layer
    hs = [h[0].float().numpy() for h in o.hidden_states]
    if len(hs) != L + 1:
        raise MinadeptError(f"transformers returned {len(hs)} hidden states, expected n_layer + 1 = {L + 1}")
    hidden = np.stack(hs[:-1] + [grab["pre_ln_f"].float().numpy()]).astype(np.float32)
    cache = o["cache"] if "cache" in o else o.past_key_values      # transformers 5.x renamed it
    policy = {"engine": "transformers", "transformers_version": transformers.__version__,
              "torch_version": torch.__version__, "exit": "none", "kv": "full",
              "activation_function": cfg.activation_function}
    return {
        "format_version": np.int64(FORMAT_VERSION),
        "input_ids": ids,
        "hidden_states": hidden,
        "logits": o.logits[0].float().numpy().astype(np.float32),
        "kv": np.ascontiguousarray(cache_kv(cache, L).astype(np.float32)),
        "exit_layers": np.full(len(ids), L, dtype=np.int64),
        "policy": np.array(json.dumps(policy, sort_keys=True)),
    }


def write_dump_transformers(source, prompt: str, out: str, threads: int | None = None) -> None:
    """Tokenize ``prompt`` with minadept's tokenizer of the model (empty -> <|endoftext|>), so
    that both engines see the same ids, run transformers and write the dump to ``out``."""
    from pathlib import Path

    from .checkpoint import resolve_model
    from .tokenizer import Tokenizer
    _import_oracle()                      # the one-line hint before any other work
    path = resolve_model(source)
    tok = Tokenizer.from_dir(path)
    ids = tok.encode(prompt) or [tok.eot_id]
    arrays = dump_arrays_transformers(load_hf_model(path), ids, threads=threads)
    out = Path(out)
    try:
        with open(out, "wb") as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise MinadeptError(f"cannot write {out}: {e.strerror or e}") from None
