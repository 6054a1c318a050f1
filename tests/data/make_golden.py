"""Regenerate the golden fixtures in tests/data/golden/ (needs the oracle extra:
``pip install -e ".[oracle]"``; run ``python tests/data/make_golden.py`` from the repository root).

What it writes, deterministically (fixed seeds, CPU, one thread):

- ``golden/model/``: a tiny random GPT-2 saved by transformers (``save_pretrained``): 4 layers,
  4 heads, n_embd 36 (head size 9, not a multiple of 4, so vector tails are exercised), the
  embedded model's 8192-token vocabulary, 64 positions, ``gelu_new``. LayerNorm gains and all
  biases are perturbed away from 1 / 0 so that every term of the forward matters. The tokenizer is
  not copied: the tests use weights/minigpt2-stories/tokenizer.json (its SHA-256 is recorded).
- ``golden/golden.npz``: the ORACLE, transformers' outputs on that model (see ``ORACLE KEYS``).
- ``golden/pins.npz``: REGRESSION PINS, minadept's own early-exit outputs (transformers has no
  early exit, so these only pin today's numerics against accidental change; see ``PIN KEYS``).
- ``golden/dump_fixed2_lazy.npz``: a ``minadept dump`` file (``minadept.dump.dump_arrays`` with
  ``--exit fixed --exit-layer 2 --kv-fill lazy``), a regression pin of the dump format.

Regenerate after an intended change of the model format or of minadept's early-exit numerics, and
say why in the commit.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "golden"
TOKENIZER = ROOT / "weights" / "minigpt2-stories" / "tokenizer.json"

FORMAT_VERSION = 1
SHAPE = dict(n_layer=4, n_head=4, n_embd=36, vocab_size=8192, n_positions=64, initializer_range=0.2,
             bos_token_id=0, eos_token_id=0)        # <|endoftext|> of the embedded tokenizer
SEED = 1234
PROMPT = "Once upon a time, there was a little girl named Lily."
N_NEW = 12                    # greedy continuation (transformers, its KV cache)
EXIT_LAYER = 2                # propagated K/V: blocks EXIT_LAYER+1..n_layer from h_EXIT_LAYER
#: regression pins: (name, policy, settings, fill)
PINS = [("fixed2_eager", "fixed", dict(exit_layer=2), "eager"),
        ("fixed2_lazy", "fixed", dict(exit_layer=2), "lazy"),
        ("saturation_eager", "saturation", dict(threshold=0.8), "eager"),
        ("saturation_lazy", "saturation", dict(threshold=0.8), "lazy"),
        ("confidence_eager", "confidence", dict(threshold=0.005), "eager")]
N_PIN_NEW = 8                 # greedy tokens generated under each pinned policy
PIN_COL_STRIDE = 64           # pinned prompt logits: every row, vocabulary columns 0, 64, 128, ...

# ORACLE KEYS (golden.npz), transformers fp32 unless noted:
#   format_version, shape_json (SHAPE), prompt (text), tokenizer_sha256, input_ids [T] int64
#   hidden_states [L+1, T, C]: h_0 = embeddings, h_l = output of block l; the LAST entry is BEFORE
#       ln_f (minadept's dump convention; taken with a forward hook on block L)
#   hidden_states_hf_last [T, C]: transformers' own last hidden_states entry, i.e. AFTER ln_f
#   kv [L, 2, H, T, D]: the K and V transformers' cache holds after the prompt
#   logits [T, V]
#   greedy_tokens [N_NEW] int64, greedy_step_logits [N_NEW, V] (decoding with transformers' cache),
#   greedy_text: the tokenizer's decode of prompt + greedy tokens; greedy_new_text: of the tokens
#   prop_exit_layer (k), prop_kv [L-k, 2, H, T, D]: for every prompt token exiting at layer k, the
#       K/V of blocks k+1..L from h_k, via transformers' own ``h[l].ln_1`` and ``h[l].attn.c_attn``
#   erf_hidden_states [L+1, T, C], erf_last_logits [V], erf_greedy_tokens [N_NEW]: the same weights
#       with activation_function "gelu" (exact erf GELU) in config.json
# PIN KEYS (pins.npz), minadept, for each pin name P in PINS:
#   P/policy (JSON), P/exit_layers [T], P/argmax [T], P/logits_last [V] and P/logits_cols
#   [T, V / PIN_COL_STRIDE] (prompt logits, all_logits; columns 0, 64, ...), P/kv [L, 2, H, T, D]
#   after the prefill (lazy pending entries flushed), P/tokens [N_PIN_NEW], P/token_exit_layers
#   [N_PIN_NEW] (exit layer of the pass that predicted each greedy token)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_model():
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(SEED)
    model = GPT2LMHeadModel(GPT2Config(**SHAPE)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
            elif ".ln_" in name or name.startswith("transformer.ln_f"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZER))


def forward_with_pre_ln_f(model, ids):
    """transformers' outputs plus the last block's output before ln_f (forward hook)."""
    import torch
    grab = {}
    hook = model.transformer.h[-1].register_forward_hook(
        lambda mod, args, out: grab.__setitem__("h", (out[0] if isinstance(out, tuple) else out)[0].clone()))
    try:
        with torch.no_grad():
            o = model(torch.tensor([ids]), output_hidden_states=True, use_cache=True)
    finally:
        hook.remove()
    hs = [h[0].numpy() for h in o.hidden_states]
    return o, np.stack(hs[:-1] + [grab["h"].numpy()]), hs[-1]


def greedy(model, ids, n):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import torch_greedy
    return torch_greedy(model, ids, n)


def propagated_kv(model, h_k, k):
    """K/V of blocks k+1..L for states h_k [T, C], with transformers' own modules."""
    import torch
    cfg = model.config
    H, C = cfg.n_head, cfg.n_embd
    out = []
    with torch.no_grad():
        x = torch.from_numpy(h_k)
        for l in range(k, cfg.n_layer):
            blk = model.transformer.h[l]
            qkv = blk.attn.c_attn(blk.ln_1(x))                        # [T, 3C]
            kv = qkv[:, C:].reshape(len(h_k), 2, H, C // H).permute(1, 2, 0, 3)
            out.append(kv.numpy())
    return np.stack(out)                                            # [L-k, 2, H, T, D]


def main():
    import torch
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if OUT.exists():
        shutil.rmtree(OUT)
    (OUT / "model").mkdir(parents=True)
    model = build_model()
    model.save_pretrained(OUT / "model")
    for extra in ("generation_config.json",):
        (OUT / "model" / extra).unlink(missing_ok=True)
    tok = hf_tokenizer()
    ids = tok(PROMPT)["input_ids"]
    T, L = len(ids), SHAPE["n_layer"]

    o, hidden, hf_last = forward_with_pre_ln_f(model, ids)
    with torch.no_grad():
        assert np.abs(model.transformer.ln_f(torch.from_numpy(hidden[-1])).numpy() - hf_last).max() < 1e-5
    logits = o.logits[0].numpy()
    from minadept.dump_hf import cache_kv
    kv = cache_kv(o.cache if "cache" in o else o.past_key_values, L)            # [L, 2, H, T, D]
    tokens, steps = greedy(model, ids, N_NEW)
    top2 = np.sort(steps, axis=-1)[:, -2:]
    margin = float((top2[:, 1] - top2[:, 0]).min())
    assert margin > 1e-3, f"greedy argmax decided within {margin:.3g}: choose another SEED"
    assert len(set(tokens)) >= 4, f"degenerate greedy output {tokens}"
    prop = propagated_kv(model, hidden[EXIT_LAYER], EXIT_LAYER)
    assert np.abs(prop[-1] - kv[EXIT_LAYER]).max() > 1e-2, "propagated K/V equal to the full ones: no test"

    # the same weights with the exact erf GELU
    erf_dir = OUT / "_erf"
    shutil.copytree(OUT / "model", erf_dir)
    cfg = json.loads((erf_dir / "config.json").read_text())
    cfg["activation_function"] = "gelu"
    (erf_dir / "config.json").write_text(json.dumps(cfg))
    from transformers import GPT2LMHeadModel
    erf_model = GPT2LMHeadModel.from_pretrained(erf_dir).float().eval()
    shutil.rmtree(erf_dir)
    o_erf, erf_hidden, _ = forward_with_pre_ln_f(erf_model, ids)
    erf_tokens, erf_steps = greedy(erf_model, ids, N_NEW)
    top2 = np.sort(erf_steps, axis=-1)[:, -2:]
    assert float((top2[:, 1] - top2[:, 0]).min()) > 1e-3
    assert np.abs(erf_hidden[-1] - hidden[-1]).max() > 1e-3, "erf and tanh GELU indistinguishable here"

    golden = dict(
        format_version=np.int64(FORMAT_VERSION), shape_json=np.array(json.dumps(SHAPE, sort_keys=True)),
        prompt=np.array(PROMPT), tokenizer_sha256=np.array(sha256(TOKENIZER)),
        input_ids=np.asarray(ids, np.int64), hidden_states=hidden.astype(np.float32),
        hidden_states_hf_last=hf_last.astype(np.float32), kv=kv.astype(np.float32),
        logits=logits.astype(np.float32), greedy_tokens=np.asarray(tokens, np.int64),
        greedy_step_logits=steps.astype(np.float32),
        greedy_text=np.array(tok.decode(ids + tokens)), greedy_new_text=np.array(tok.decode(tokens)),
        prop_exit_layer=np.int64(EXIT_LAYER), prop_kv=prop.astype(np.float32),
        erf_hidden_states=erf_hidden.astype(np.float32), erf_last_logits=o_erf.logits[0, -1].numpy(),
        erf_greedy_tokens=np.asarray(erf_tokens, np.int64))
    np.savez_compressed(OUT / "golden.npz", **golden)

    # ---- regression pins: minadept itself
    from minadept import backend
    from minadept.dump import dump_arrays
    from minadept.engine import Engine
    from minadept.exits.policies import make_policy
    from minadept.generate import generate
    from minadept.model import Model
    from minadept.sampling import SamplingSettings
    backend.use("numpy")
    tmp = OUT / "_with_tokenizer"
    shutil.copytree(OUT / "model", tmp)
    shutil.copyfile(TOKENIZER, tmp / "tokenizer.json")
    m = Model.load(tmp)
    shutil.rmtree(tmp)
    assert m.tokenizer.encode(PROMPT) == ids

    def run(policy, settings, fill):
        engine = Engine(m, make_policy(policy, m.config, **settings), fill=fill)
        cache = engine.new_cache()
        r = engine.forward(ids, cache, all_logits=True)
        engine.flush(cache)
        steps = list(generate(engine, ids, max_new_tokens=N_PIN_NEW, sampling=SamplingSettings(temperature=0),
                              rng=np.random.default_rng(0), eot_id=None))
        return dict(policy=np.array(json.dumps(dict(exit=policy, kv_fill=fill, **settings), sort_keys=True)),
                    exit_layers=r.exit_layers.astype(np.int64), argmax=r.logits.argmax(-1).astype(np.int64),
                    logits_last=r.logits[-1].astype(np.float32),
                    logits_cols=np.ascontiguousarray(r.logits[:, ::PIN_COL_STRIDE]).astype(np.float32),
                    kv=np.ascontiguousarray(cache.kv[:, :, :, :T]).astype(np.float32),
                    tokens=np.asarray([s.token for s in steps], np.int64),
                    token_exit_layers=np.asarray([int(s.result.exit_layers[-1]) for s in steps], np.int64))

    pins = {"format_version": np.int64(FORMAT_VERSION), "col_stride": np.int64(PIN_COL_STRIDE)}
    for name, policy, settings, fill in PINS:
        got = run(policy, settings, fill)
        if "threshold" in settings:          # no decision may sit on the threshold
            for d in (-1e-3, 1e-3):           # relative: confidence thresholds are ~1/vocab here
                near = run(policy, dict(settings, threshold=settings["threshold"] * (1 + d)), fill)
                assert np.array_equal(near["exit_layers"], got["exit_layers"]), (name, d)
                assert np.array_equal(near["token_exit_layers"], got["token_exit_layers"]), (name, d)
            assert len(set(got["exit_layers"].tolist() + got["token_exit_layers"].tolist())) >= 2, \
                f"{name}: every token exits at the same layer; choose another threshold"
        pins.update({f"{name}/{k}": v for k, v in got.items()})
    np.savez_compressed(OUT / "pins.npz", **pins)

    engine = Engine(m, make_policy("fixed", m.config, exit_layer=2), fill="lazy")
    with open(OUT / "dump_fixed2_lazy.npz", "wb") as f:      # exactly as minadept dump writes it
        np.savez(f, **dump_arrays(engine, ids))

    for p in sorted(OUT.rglob("*")):
        if p.is_file():
            print(f"{p.relative_to(ROOT)}: {p.stat().st_size / 1e3:.1f} kB")
    print("prompt ids", ids)
    print("greedy", tokens, repr(tok.decode(tokens)), f"min top-2 margin {margin:.3g}")
    for name, *_ in PINS:
        print(name, pins[f"{name}/exit_layers"].tolist(), pins[f"{name}/token_exit_layers"].tolist())


if __name__ == "__main__":
    main()
