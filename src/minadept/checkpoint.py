"""Find a GPT-2 model (directory, Hugging Face id, or the embedded default) and read its weights.

Handles the variations real HF checkpoints show: keys with or without the ``transformer.`` prefix,
``attn.bias`` / ``attn.masked_bias`` buffers present or not, ``lm_head.weight`` present or tied to
``wte``, fp32 / fp16 tensors (bf16 converted exactly), and sharded files
(``model.safetensors.index.json``). Every tensor's shape is checked against the config.

Weights are float32, unless loaded with a half-precision ``dtype`` (``halfprec``): then the four
matrices of each block and the LM head are rounded to it (``HalfMatrix`` when kept so).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import halfprec
from .config import GPT2Config
from .errors import MinadeptError

DEFAULT_MODEL_NAME = "minigpt2-stories"
_HUB_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "vocab.json", "merges.txt"]


@dataclass(frozen=True)
class Block:
    """Weights of one transformer block ``h.<i>`` (Conv1D weights ``[in, out]``), float32; the four
    matrices are ``halfprec.HalfMatrix`` in a model kept in half precision."""
    ln_1_g: np.ndarray            # [C]
    ln_1_b: np.ndarray            # [C]
    c_attn_w: np.ndarray          # [C, 3C]  (q | k | v columns)
    c_attn_b: np.ndarray          # [3C]
    attn_c_proj_w: np.ndarray     # [C, C]
    attn_c_proj_b: np.ndarray     # [C]
    ln_2_g: np.ndarray            # [C]
    ln_2_b: np.ndarray            # [C]
    c_fc_w: np.ndarray            # [C, 4C]
    c_fc_b: np.ndarray            # [4C]
    mlp_c_proj_w: np.ndarray      # [4C, C]
    mlp_c_proj_b: np.ndarray      # [C]


@dataclass(frozen=True)
class Params:
    """All GPT-2 weights, float32 C-contiguous. ``lm_head`` is ``wte`` itself when tied. In a
    model loaded with a half-precision dtype, ``wte``, an untied ``lm_head`` and the blocks' four
    matrices hold rounded values, as ``halfprec.HalfMatrix`` on the fast backend (see
    ``load_params``)."""
    wte: np.ndarray               # [V, C]
    wpe: np.ndarray               # [n_positions, C]
    h: tuple                      # n_layer x Block
    ln_f_g: np.ndarray            # [C]
    ln_f_b: np.ndarray            # [C]
    lm_head: np.ndarray           # [V, C]


# HF tensor name suffix -> (Block field, shape as a function of C)
_BLOCK_TENSORS = {
    "ln_1.weight": ("ln_1_g", lambda C: (C,)),
    "ln_1.bias": ("ln_1_b", lambda C: (C,)),
    "attn.c_attn.weight": ("c_attn_w", lambda C: (C, 3 * C)),
    "attn.c_attn.bias": ("c_attn_b", lambda C: (3 * C,)),
    "attn.c_proj.weight": ("attn_c_proj_w", lambda C: (C, C)),
    "attn.c_proj.bias": ("attn_c_proj_b", lambda C: (C,)),
    "ln_2.weight": ("ln_2_g", lambda C: (C,)),
    "ln_2.bias": ("ln_2_b", lambda C: (C,)),
    "mlp.c_fc.weight": ("c_fc_w", lambda C: (C, 4 * C)),
    "mlp.c_fc.bias": ("c_fc_b", lambda C: (4 * C,)),
    "mlp.c_proj.weight": ("mlp_c_proj_w", lambda C: (4 * C, C)),
    "mlp.c_proj.bias": ("mlp_c_proj_b", lambda C: (C,)),
}


# ----------------------------------------------------------------------------- finding a model

def default_model_dir() -> Path:
    """The embedded default model shipped in ``weights/`` (package ``minadept.weights``)."""
    env = os.environ.get("MINADEPT_DEFAULT_MODEL")
    if env:
        return Path(env)
    return packaged_weights_dir() / DEFAULT_MODEL_NAME


def packaged_weights_dir() -> Path:
    """The folder of the package ``minadept.weights`` (the embedded model's home, in site-packages
    or, for an editable install, the repository's ``weights/``): files there are part of the
    installed package, not the user's to overwrite."""
    from importlib.resources import files
    return Path(str(files("minadept.weights")))


def resolve_model(source: str | os.PathLike | None) -> Path:
    """Return a local directory for ``source``: None (embedded default), a directory, or a
    Hugging Face model id (``gpt2``, ``distilgpt2``, ``openai-community/gpt2-medium`` ...)
    fetched with ``huggingface_hub`` when installed and online.

    Raises MinadeptError when the directory is missing or the id cannot be resolved.
    """
    if source is None:
        path = default_model_dir()
        if not (path / "config.json").is_file():
            raise MinadeptError(f"the embedded default model is missing at {path}; pass --model DIR")
        return path
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists():
        raise MinadeptError(f"model path is not a directory: {source}")
    if not _HUB_ID.match(text):
        raise MinadeptError(f"model directory not found: {source}")
    return _from_hub(text)


def _from_hub(repo_id: str) -> Path:
    how = (f"download config.json, model.safetensors and tokenizer.json (or vocab.json + merges.txt) "
           f"of {repo_id!r} into a directory and pass --model DIR")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MinadeptError(f"model {repo_id!r} is not a local directory and huggingface_hub is not "
                            f"installed (pip install 'minadept[hub]'), or {how}") from None
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=_HUB_FILES))
    except Exception as e:  # offline, unknown id, gated repo: all end the same way for the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinadeptError(f"cannot fetch model {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: "
                            f"{reason[:160]}); check the id and your connection, or {how}") from None


# ----------------------------------------------------------------------------- reading tensors

def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise MinadeptError(f"{index} is not a valid safetensors index ({e})") from None
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(model_dir.glob("*.safetensors"))
    if found:
        return found
    raise MinadeptError(f"no model.safetensors (or model.safetensors.index.json) in {model_dir}")


def _bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 exactly: bf16 is the top half of an fp32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_file(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise MinadeptError(f"missing weights file {path}")
    out = {}
    try:
        with safe_open(str(path), framework="np") as f:
            for key in f.keys():
                try:
                    out[key] = _widen_bf16(f.get_tensor(key))
                except (SafetensorError, TypeError, ValueError) as e:
                    if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
                        out[key] = _read_bf16(path, key)
                    else:
                        raise
    except SafetensorError as e:
        raise MinadeptError(f"{path} is not a readable safetensors file ({e})") from None
    except OSError as e:
        raise MinadeptError(f"cannot read {path} ({e})") from None
    return out


def _read_bf16(path: Path, key: str) -> np.ndarray:
    """Read one BF16 tensor from a safetensors file by its header offsets (NumPy has no bf16)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        info = header[key]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        raw = np.frombuffer(f.read(end - start), dtype="<u2")
    if raw.size != int(np.prod(info["shape"])):
        raise MinadeptError(f"{path}: tensor {key} is truncated")
    return _bf16_to_f32(raw).reshape(info["shape"])


def read_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint, keys with any ``transformer.`` prefix stripped."""
    tensors: dict[str, np.ndarray] = {}
    for path in _safetensor_files(model_dir):
        for key, value in _read_file(path).items():
            tensors[key.removeprefix("transformer.")] = value
    return tensors


def _widen_bf16(t: np.ndarray) -> np.ndarray:
    """bfloat16 typed by an extension (safetensors returns ``ml_dtypes.bfloat16`` arrays, kind 'V',
    whenever ml_dtypes is imported, e.g. by jax or TensorFlow) -> float32 exactly, from its bits;
    any other array unchanged."""
    if t.dtype.name == "bfloat16" and t.dtype.itemsize == 2:
        return _bf16_to_f32(np.ascontiguousarray(t).view(np.uint16))
    return t


def _as_float32(name: str, t: np.ndarray) -> np.ndarray:
    """A tensor as float32, C-contiguous (NumPy floats by value, extension bfloat16 exactly).
    Raises MinadeptError for any other dtype."""
    t = _widen_bf16(t)
    if t.dtype.kind == "f":
        return np.ascontiguousarray(t, dtype=np.float32)
    raise MinadeptError(f"weights: tensor {name} has dtype {t.dtype}, expected float32, float16 or bfloat16")


def _take(tensors: dict, name: str, shape: tuple, half: tuple | None = None, transposed: bool = False):
    """Tensor ``name`` checked (present, ``shape``, finite) as float32, or with ``half`` =
    (dtype, keep) rounded to that half-precision type (``halfprec.weight``, ``transposed``
    storage). Raises MinadeptError naming the tensor."""
    if name not in tensors:
        raise MinadeptError(f"weights: missing tensor {name} (expected shape {list(shape)})")
    t = tensors[name]
    if tuple(t.shape) != tuple(shape):
        raise MinadeptError(f"weights: tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    if half is not None:
        t = _widen_bf16(t)
        if t.dtype.kind != "f":
            _as_float32(name, t)                        # raises: not a float tensor
        src = t if t.dtype in (np.float16, np.float32) else t.astype(np.float32)
        return halfprec.weight(name, src, half[0], half[1], transposed)
    t = _as_float32(name, t)
    if not np.isfinite(t).all():
        raise MinadeptError(f"weights: tensor {name} has NaN or infinite values")
    return t


def params_from_tensors(tensors: dict[str, np.ndarray], config: GPT2Config, dtype: str = "float32",
                        keep_half: bool = False) -> Params:
    """Check every tensor against ``config`` and assemble Params: float32, except with a
    half-precision ``dtype`` the blocks' four matrices and an untied LM head, rounded to it and
    kept as ``HalfMatrix`` when ``keep_half`` (else upcast again; ``halfprec``).

    Raises MinadeptError naming the tensor: expected and found shape, NaN or infinite values,
    values beyond the half-precision type's range.
    """
    C, V = config.n_embd, config.vocab_size
    half = None if halfprec.check_dtype(dtype) == "float32" else (dtype, keep_half)
    wte = _take(tensors, "wte.weight", (V, C), half, transposed=True)
    wpe = _take(tensors, "wpe.weight", (config.n_positions, C))
    blocks = []
    for i in range(config.n_layer):
        fields = {field: _take(tensors, f"h.{i}.{suffix}", shape(C),
                               half if field in halfprec.MATRIX_FIELDS else None)
                  for suffix, (field, shape) in _BLOCK_TENSORS.items()}
        blocks.append(Block(**fields))
    def outside(key):                                   # h.<i>.* with i not a block index
        i = key.split(".")[1] if key.count(".") >= 1 else ""
        return not i.isdigit() or int(i) >= config.n_layer
    extra = sorted(k for k in tensors if k.startswith("h.") and outside(k))
    if extra:
        raise MinadeptError(f"weights: tensor {extra[0]} is not in a block h.0 .. h.{config.n_layer - 1} (n_layer={config.n_layer})")
    return Params(wte=wte, wpe=wpe, h=tuple(blocks),
                  ln_f_g=_take(tensors, "ln_f.weight", (C,)), ln_f_b=_take(tensors, "ln_f.bias", (C,)),
                  lm_head=_lm_head(tensors, config, wte, half))


def _lm_head(tensors: dict, config: GPT2Config, wte, half: tuple | None):
    """``lm_head.weight`` [V, C], or ``wte`` itself when tied (not stored, or stored equal to the
    checkpoint's ``wte.weight``); with ``half`` an untied head is rounded like ``wte``."""
    V, C = config.vocab_size, config.n_embd
    if "lm_head.weight" not in tensors:
        if config.tie_word_embeddings:
            return wte
        raise MinadeptError(f"weights: missing tensor lm_head.weight (expected shape {[V, C]})")
    head = None
    if config.tie_word_embeddings:
        head = _take(tensors, "lm_head.weight", (V, C))
        if np.array_equal(head, wte if half is None else _take(tensors, "wte.weight", (V, C))):
            return wte
    if half is None:
        return head if head is not None else _take(tensors, "lm_head.weight", (V, C))
    return _take(tensors, "lm_head.weight", (V, C), half, transposed=True)


def round_params(params: Params, dtype: str, keep_half: bool) -> Params:
    """float32 ``params`` with ``wte``, the blocks' four matrices and an untied LM head rounded to
    the half-precision ``dtype`` as ``load_params`` does (a tied head stays ``wte``). Raises
    MinadeptError naming a tensor beyond the type's range."""
    from dataclasses import replace
    half = {field: suffix for suffix, (field, _) in _BLOCK_TENSORS.items() if field in halfprec.MATRIX_FIELDS}
    blocks = tuple(replace(b, **{f: halfprec.weight(f"h.{i}.{suffix}", np.asarray(getattr(b, f)), dtype, keep_half)
                                 for f, suffix in half.items()}) for i, b in enumerate(params.h))
    wte = halfprec.weight("wte.weight", np.asarray(params.wte), dtype, keep_half, transposed=True)
    head = wte
    if params.lm_head is not params.wte:
        head = halfprec.weight("lm_head.weight", np.asarray(params.lm_head), dtype, keep_half, transposed=True)
    return replace(params, wte=wte, h=blocks, lm_head=head)


def load_params(model_dir: Path, config: GPT2Config, dtype: str = "float32", keep_half: bool = False) -> Params:
    """Read and check the safetensors weights of ``model_dir`` (see module docstring and
    ``params_from_tensors`` for ``dtype`` and ``keep_half``)."""
    return params_from_tensors(read_tensors(model_dir), config, dtype, keep_half)
