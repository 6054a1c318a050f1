"""Unit tests: config parsing, the NumPy math against float64 references (and, with the oracle
extra, against torch), the checkpoint loader's checks and its checkpoint variants."""
from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest

from helpers import TINY, add_tokenizer, bf16_to_f32, max_abs, round_bf16, write_safetensors

from minadept import backend
from minadept import reference as R
from minadept.checkpoint import params_from_tensors, read_tensors, resolve_model
from minadept.config import ACTIVATIONS, GPT2Config
from minadept.errors import MinadeptError
from minadept.model import Model
from minadept.tokenizer import Tokenizer

oracle = pytest.mark.oracle

BASE = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=50257, n_positions=128)


# ----------------------------------------------------------------------------- config

@pytest.mark.parametrize("act,form", [("gelu_new", "tanh"), ("gelu_pytorch_tanh", "tanh"),
                                      ("gelu_fast", "tanh"), ("gelu", "erf")])
def test_activation_names_map_to_gelu_form(act, form):
    cfg = GPT2Config.from_dict(dict(BASE, activation_function=act))
    assert cfg.gelu == form and cfg.activation_function == act
    assert R.GELU[cfg.gelu] is (R.gelu_tanh if form == "tanh" else R.gelu_erf)


def test_activation_map_is_exactly_the_supported_set():
    """Each supported name gives the right function, checked at x = 1 against values known to
    more digits than float32 holds: exact GELU(1) = Phi(1) = 0.8413447461, tanh form 0.8411919906."""
    assert set(ACTIVATIONS) == {"gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu"}
    want = {"tanh": 0.8411919906, "erf": 0.8413447461}
    for act in ACTIVATIONS:
        cfg = GPT2Config.from_dict(dict(BASE, activation_function=act))
        got = float(R.GELU[cfg.gelu](np.array([1.0], np.float32))[0])
        expect = want["erf" if act == "gelu" else "tanh"]
        assert abs(got - expect) < 2e-7, (act, got, expect)


@pytest.mark.parametrize("act", ["relu", "silu", "swish", "quick_gelu", "tanh", "GELU", ""])
def test_unknown_activation_is_an_error(act):
    with pytest.raises(MinadeptError, match=re.escape(repr(act))):
        GPT2Config.from_dict(dict(BASE, activation_function=act))


def test_config_defaults_and_unknown_keys():
    cfg = GPT2Config.from_dict(dict(BASE, some_future_key=1, n_inner=None))
    assert cfg.activation_function == "gelu_new" and cfg.gelu == "tanh"
    assert cfg.layer_norm_epsilon == 1e-5 and cfg.tie_word_embeddings is True
    assert cfg.head_dim == 16


def test_config_from_transformers_config_json(tiny):
    cfg = GPT2Config.from_json(tiny.path / "config.json")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.n_positions) == \
        (TINY["n_layer"], TINY["n_head"], TINY["n_embd"], TINY["vocab_size"], TINY["n_positions"])
    assert cfg.gelu == "tanh" and cfg.tie_word_embeddings


@pytest.mark.parametrize("change,needle", [
    ({"n_layer": None}, "n_layer"),
    ({"n_embd": 63}, "divisible"),
    ({"n_head": 0}, "n_head"),
    ({"n_layer": True}, "n_layer"),
    ({"vocab_size": 1.5}, "vocab_size"),
    ({"model_type": "llama"}, "model_type"),
    ({"n_inner": 100}, "n_inner"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"reorder_and_upcast_attn": True}, "reorder_and_upcast_attn"),
    ({"scale_attn_weights": False}, "scale_attn_weights"),
    ({"layer_norm_epsilon": "abc"}, "layer_norm_epsilon"),
    ({"layer_norm_epsilon": -1.0}, "layer_norm_epsilon"),
    ({"layer_norm_epsilon": float("nan")}, "layer_norm_epsilon"),
    ({"layer_norm_epsilon": [1e-5]}, "layer_norm_epsilon"),
])
def test_bad_configs_are_errors(change, needle):
    d = dict(BASE)
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(MinadeptError, match=needle):
        GPT2Config.from_dict(d)


def test_config_file_errors(tmp_path):
    with pytest.raises(MinadeptError, match="missing"):
        GPT2Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MinadeptError, match="JSON object"):
        GPT2Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(MinadeptError, match="not valid JSON"):
        GPT2Config.from_json(tmp_path / "config.json")


# ----------------------------------------------------------------------------- math

@pytest.fixture(scope="module")
def xs():
    rng = np.random.default_rng(0)
    return np.concatenate([np.linspace(-12, 12, 200_001, dtype=np.float32),
                           rng.normal(0, 3, 100_000).astype(np.float32),
                           np.array([0.0, -0.0, 1e-30, -1e-30, 1e-8], np.float32)])


@pytest.fixture(scope="module")
def gelu_erf64(xs):
    """Exact GELU x * Phi(x) of the float32 inputs, in float64 with math.erf."""
    x = xs.astype(np.float64)
    return x * 0.5 * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in x]))


def gelu_tanh64(x):
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


#: exact-erf GELU against float64: measured 4.6e-7 (float32 ulp at |x| = 12 is 9.5e-7)
GELU_ERF_ATOL = 1e-6
#: tanh GELU against float64
GELU_TANH_ATOL = 1e-6


def test_gelu_erf_matches_float64_reference(xs, gelu_erf64):
    ours = R.gelu_erf(xs)
    assert ours.dtype == np.float32 and ours.shape == xs.shape
    d = max_abs(ours, gelu_erf64)
    assert d <= GELU_ERF_ATOL, f"gelu_erf vs float64 math.erf GELU: max abs diff {d:.3g}"


@oracle
def test_gelu_erf_and_torch_gelu_both_match_float64(xs, gelu_erf64):
    """torch's vectorised fp32 GELU is itself ~1.1e-6 from float64 on AVX-512 machines, so both are
    compared with the float64 reference rather than with each other."""
    import torch
    ref = torch.nn.functional.gelu(torch.from_numpy(xs)).numpy()
    d_ours, d_torch = max_abs(R.gelu_erf(xs), gelu_erf64), max_abs(ref, gelu_erf64)
    assert d_ours <= GELU_ERF_ATOL, f"gelu_erf vs float64: {d_ours:.3g}"
    assert d_torch <= 2e-6, f"torch gelu vs float64: {d_torch:.3g}"


def test_erf_is_accurate():
    x = np.linspace(-6, 6, 20001)
    ref = np.array([math.erf(v) for v in x])
    d = float(np.abs(R.erf(x.astype(np.float32)).astype(np.float64) - ref).max())
    assert d <= 3e-7, f"erf: max abs diff {d:.3g}"


def test_gelu_tanh_matches_float64_reference(xs):
    ours = backend.gelu(xs, "tanh")
    assert ours.dtype == np.float32
    d = max_abs(ours, gelu_tanh64(xs))
    assert d <= GELU_TANH_ATOL, f"gelu_tanh vs float64 tanh formula: max abs diff {d:.3g}"


@oracle
def test_gelu_tanh_matches_torch_tanh_gelu(xs):
    import torch
    ours = backend.gelu(xs, "tanh")
    ref = torch.nn.functional.gelu(torch.from_numpy(xs), approximate="tanh").numpy()
    d = float(np.abs(ours - ref).max())
    assert d <= 2e-6, f"gelu_tanh vs torch approximate='tanh': max abs diff {d:.3g}"


def test_gelu_forms_really_differ(xs):
    assert np.abs(R.gelu_erf(xs) - backend.gelu(xs, "tanh")).max() > 1e-4


LN_CASES = [((7, 64), 0.0, 1e-5), ((3, 5, 768), 0.0, 1e-5), ((4, 64), 100.0, 1e-5), ((2, 32), 0.0, 1e-3)]


def _ln_inputs(shape, offset):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=shape) * 2 + offset).astype(np.float32)
    g = rng.normal(size=shape[-1]).astype(np.float32)
    b = rng.normal(size=shape[-1]).astype(np.float32)
    return x, g, b


@pytest.mark.parametrize("shape,offset,eps", LN_CASES)
def test_layer_norm_matches_float64(shape, offset, eps):
    x, g, b = _ln_inputs(shape, offset)
    x64 = x.astype(np.float64)
    mu = x64.mean(-1, keepdims=True)
    var = ((x64 - mu) ** 2).mean(-1, keepdims=True)          # biased, as GPT-2 / torch
    ref = (x64 - mu) / np.sqrt(var + eps) * g + b
    ours = backend.layer_norm(x, g, b, eps)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    d = max_abs(ours, ref)
    assert d <= 2e-5, f"layer_norm vs float64: max abs diff {d:.3g}"


@oracle
@pytest.mark.parametrize("shape,offset,eps", LN_CASES)
def test_layer_norm_matches_torch(shape, offset, eps):
    import torch
    x, g, b = _ln_inputs(shape, offset)
    ours = backend.layer_norm(x, g, b, eps)
    ref = torch.nn.functional.layer_norm(torch.from_numpy(x), (shape[-1],), torch.from_numpy(g),
                                         torch.from_numpy(b), eps).numpy()
    d = float(np.abs(ours - ref).max())
    assert d <= 2e-5, f"layer_norm vs torch: max abs diff {d:.3g}"


def _attn_inputs():
    rng = np.random.default_rng(2)
    return tuple(rng.normal(size=(4, 9, 16)).astype(np.float32) for _ in range(3))


def test_causal_attention_matches_float64():
    q, k, v = _attn_inputs()
    H, T, D = q.shape
    s = np.einsum("htd,hsd->hts", q.astype(np.float64), k.astype(np.float64)) / math.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ v.astype(np.float64)
    ours = backend.attention(q, k, v, np.arange(T))
    d = max_abs(ours, ref)
    assert d <= 1e-5, f"attention vs float64 softmax(q k^T / sqrt(d)) v: max abs diff {d:.3g}"
    part = backend.attention(q[:, 5:], k, v, np.arange(5, T))     # decode / chunked prefill
    d = max_abs(part, ref[:, 5:])
    assert d <= 1e-5, f"attention of a suffix vs float64: max abs diff {d:.3g}"


@oracle
def test_causal_attention_matches_torch_sdpa():
    import torch
    q, k, v = _attn_inputs()
    T = q.shape[1]
    ours = backend.attention(q, k, v, np.arange(T))
    ref = torch.nn.functional.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)),
                                                           is_causal=True).numpy()
    d = float(np.abs(ours - ref).max())
    assert d <= 1e-5, f"attention vs torch sdpa: max abs diff {d:.3g}"
    part = backend.attention(q[:, 5:], k, v, np.arange(5, T))
    d = float(np.abs(part - ref[:, 5:]).max())
    assert d <= 1e-5, f"attention of a suffix vs torch: max abs diff {d:.3g}"


# ----------------------------------------------------------------------------- loader

def _tensors(tiny):
    return read_tensors(tiny.path)


def test_prefix_stripped_and_tied_lm_head_when_absent(tiny):
    t = _tensors(tiny)
    assert "wte.weight" in t and not any(k.startswith("transformer.") for k in t)
    assert "lm_head.weight" not in t
    cfg = tiny.model.config
    p = params_from_tensors(t, cfg)
    assert p.lm_head is p.wte
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in (p.wte, p.wpe, p.h[0].c_attn_w))
    assert np.array_equal(p.wte, tiny.tensors["transformer.wte.weight"])
    assert np.array_equal(p.h[1].c_attn_w, tiny.tensors["transformer.h.1.attn.c_attn.weight"])


def test_missing_tensor_names_tensor_and_expected_shape(tiny):
    t = _tensors(tiny)
    del t["h.1.mlp.c_fc.weight"]
    with pytest.raises(MinadeptError, match=re.escape("h.1.mlp.c_fc.weight (expected shape [64, 256])")):
        params_from_tensors(t, tiny.model.config)
    t = _tensors(tiny)
    del t["ln_f.bias"]
    with pytest.raises(MinadeptError, match=re.escape("ln_f.bias (expected shape [64])")):
        params_from_tensors(t, tiny.model.config)


def test_wrong_shape_names_tensor_and_both_shapes(tiny):
    t = _tensors(tiny)
    t["h.0.attn.c_attn.weight"] = t["h.0.attn.c_attn.weight"].T.copy()
    with pytest.raises(MinadeptError, match=re.escape("h.0.attn.c_attn.weight has shape [192, 64], expected [64, 192]")):
        params_from_tensors(t, tiny.model.config)


def test_non_float_tensor_is_an_error(tiny):
    t = _tensors(tiny)
    t["wpe.weight"] = t["wpe.weight"].astype(np.int32)
    with pytest.raises(MinadeptError, match="wpe.weight.*dtype"):
        params_from_tensors(t, tiny.model.config)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_are_an_error(tiny, bad):
    """A checkpoint with NaN/inf weights (e.g. a diverged training run) is refused by name, not
    turned into NaN logits."""
    t = _tensors(tiny)
    t["h.1.mlp.c_proj.weight"] = t["h.1.mlp.c_proj.weight"].copy()
    t["h.1.mlp.c_proj.weight"][3, 5] = bad
    with pytest.raises(MinadeptError, match=re.escape("h.1.mlp.c_proj.weight has NaN or infinite values")):
        params_from_tensors(t, tiny.model.config)


def test_layers_beyond_n_layer_are_an_error(tiny):
    cfg = tiny.model.config
    fewer = GPT2Config(n_layer=cfg.n_layer - 1, n_head=cfg.n_head, n_embd=cfg.n_embd,
                       vocab_size=cfg.vocab_size, n_positions=cfg.n_positions)
    with pytest.raises(MinadeptError, match=f"h.{cfg.n_layer - 1}.*n_layer={cfg.n_layer - 1}"):
        params_from_tensors(_tensors(tiny), fewer)
    odd = dict(_tensors(tiny), **{"h.extra_thing": np.zeros(3, np.float32)})   # not h.<int>.*
    with pytest.raises(MinadeptError, match="h.extra_thing"):
        params_from_tensors(odd, cfg)


def test_lm_head_explicit_equal_is_tied_and_different_is_used(tiny):
    cfg = tiny.model.config
    t = _tensors(tiny)
    t["lm_head.weight"] = t["wte.weight"].copy()
    p = params_from_tensors(t, cfg)
    assert p.lm_head is p.wte
    other = np.random.default_rng(0).normal(size=t["wte.weight"].shape).astype(np.float32)
    t["lm_head.weight"] = other
    untied = GPT2Config(**{**cfg.__dict__, "tie_word_embeddings": False})
    p = params_from_tensors(t, untied)
    assert np.array_equal(p.lm_head, other) and p.lm_head is not p.wte
    del t["lm_head.weight"]
    with pytest.raises(MinadeptError, match=re.escape("lm_head.weight (expected shape [50257, 64])")):
        params_from_tensors(t, untied)


def test_fp16_tensors_are_widened_exactly(tiny):
    t = {k: v.astype(np.float16) for k, v in _tensors(tiny).items()}
    p = params_from_tensors(t, tiny.model.config)
    assert p.h[0].c_fc_w.dtype == np.float32
    assert np.array_equal(p.h[0].c_fc_w, t["h.0.mlp.c_fc.weight"].astype(np.float32))


def test_bf16_file_is_converted_exactly(tmp_path):
    """Every finite bf16 bit pattern (a stride through all 65536, plus zeros, infinities, the
    smallest subnormal and 1.0) widens to the float32 with those 16 bits on top."""
    bits = np.concatenate([np.arange(0, 65536, 7, dtype=np.uint16),
                           np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x3F80], np.uint16)])
    bits = bits[~(((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0))]      # drop NaNs
    ones = np.full(6, 0x3F80, np.uint16)
    write_safetensors(tmp_path / "model.safetensors", {"transformer.x": ("BF16", bits.shape, bits.tobytes()),
                                                       "y": ("BF16", (3, 2), ones.tobytes())})
    t = read_tensors(tmp_path)
    assert set(t) == {"x", "y"}
    assert t["x"].dtype == np.float32 and t["y"].shape == (3, 2)
    expect = (bits.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(t["x"], expect)
    assert t["x"][-1] == 1.0 and np.isinf(t["x"][-4]) and t["x"][-2] == 2.0 ** -133
    assert np.array_equal(t["y"], np.ones((3, 2), np.float32))


def test_bf16_rounding_helper_rounds_to_nearest_even():
    """The test suite's own fp32 -> bf16 rounding (used to write bf16 checkpoints)."""
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -7, 1.0 + 2 ** -8 + 2 ** -20, -2.5],
                 np.float32)
    # 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0); 1 + 3 * 2^-8 ties up to 1 + 2^-6
    assert bf16_to_f32(round_bf16(x)).tolist() == [1.0, 1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7, 1.0 + 2 ** -7, -2.5]
    assert round_bf16(np.float32(1.0)).item() == 0x3F80


def test_index_naming_a_missing_shard(tiny, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny.path, d)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    weight_map = {"wte.weight": "model-00001-of-00002.safetensors", "wpe.weight": "model-00002-of-00002.safetensors"}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(MinadeptError, match="model-00002-of-00002.safetensors"):
        Model.load(d)
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(MinadeptError, match="index"):
        Model.load(d)


def test_resolve_model(tiny, tmp_path):
    assert resolve_model(tiny.path) == tiny.path
    assert resolve_model(str(tiny.path)) == tiny.path
    with pytest.raises(MinadeptError, match="not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(MinadeptError, match="not a directory"):
        resolve_model(tiny.path / "config.json")


def test_model_load_without_tokenizer(tiny):
    m = Model.load(tiny.path, tokenizer=False)
    assert m.tokenizer is None and m.config.n_layer == TINY["n_layer"]
    from minadept.engine import Engine
    ids = [464, 2068, 7586]
    a = Engine(m).forward(ids, Engine(m).new_cache(), all_logits=True).logits
    b = Engine(tiny.model).forward(ids, Engine(tiny.model).new_cache(), all_logits=True).logits
    np.testing.assert_array_equal(a, b)                  # the same weights, only no tokenizer


# ----------------------------------------------------------------------------- checkpoint variants

def _all_params(p):
    yield "wte", p.wte
    yield "wpe", p.wpe
    yield "ln_f_g", p.ln_f_g
    yield "ln_f_b", p.ln_f_b
    for i, blk in enumerate(p.h):
        for f in blk.__dataclass_fields__:
            yield f"h.{i}.{f}", getattr(blk, f)


def test_variants_load_to_the_same_weights(factory):
    """Variants of one seed are the same model: legacy (prefix-less names, attn.bias buffers),
    sharded and an explicit lm_head equal to wte load bit-identical parameters to plain, with the
    LM head tied; fp16 / bf16 files load exactly plain rounded to fp16 / bf16 (round to nearest
    even); gelu only changes the activation; untied keeps its own LM head."""
    base = factory.get("tiny", shape=TINY).model
    assert base.params.lm_head is base.params.wte and base.config.gelu == "tanh"
    for v in ("legacy", "sharded", "lm_head_tied", "gelu"):
        m = factory.get("tiny", shape=TINY, variant=v).model
        assert m.params.lm_head is m.params.wte, f"{v}: lm_head equal to wte must be tied"
        for (name, a), (_, b) in zip(_all_params(m.params), _all_params(base.params)):
            assert a.dtype == np.float32 and np.array_equal(a, b), (v, name)
        assert m.config.gelu == ("erf" if v == "gelu" else "tanh"), v
    for v, rounded in (("fp16", lambda a: a.astype(np.float16).astype(np.float32)),
                       ("bf16", lambda a: bf16_to_f32(round_bf16(a)))):
        m = factory.get("tiny", shape=TINY, variant=v).model
        changed = 0
        for (name, a), (_, b) in zip(_all_params(m.params), _all_params(base.params)):
            assert a.dtype == np.float32 and np.array_equal(a, rounded(b)), (v, name)
            changed += not np.array_equal(a, b)
        assert changed > 0, f"{v}: rounding changed nothing, the variant is not a real {v} file"
    untied = factory.get("tiny", shape=TINY, variant="lm_head_untied")
    p = untied.model.params
    assert p.lm_head is not p.wte and np.array_equal(p.lm_head, untied.tensors["lm_head.weight"])
    assert np.array_equal(p.wte, untied.tensors["transformer.wte.weight"])


def test_variant_files_have_the_layout_they_claim(factory):
    from safetensors.numpy import load_file
    legacy = load_file(str(factory.get("tiny", shape=TINY, variant="legacy").path / "model.safetensors"))
    assert "wte.weight" in legacy and "h.0.attn.bias" in legacy and "h.2.attn.masked_bias" in legacy
    assert not any(k.startswith("transformer.") for k in legacy)
    sharded = factory.get("tiny", shape=TINY, variant="sharded").path
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and not (sharded / "model.safetensors").exists()
    with open(factory.get("tiny", shape=TINY, variant="bf16").path / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


@pytest.mark.parametrize("variant", ["legacy", "sharded", "lm_head_tied"])
def test_same_weights_give_identical_logits(factory, variant):
    from minadept.engine import Engine
    ids = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    ref = Engine(factory.get("tiny", shape=TINY).model)
    got = Engine(factory.get("tiny", shape=TINY, variant=variant).model)
    a = ref.forward(ids, ref.new_cache(), all_logits=True).logits
    b = got.forward(ids, got.new_cache(), all_logits=True).logits
    assert np.array_equal(a, b)


# ----------------------------------------------------------------------------- tokenizer files

@oracle
def test_tokenizer_json_and_vocab_merges_agree(tiny, tmp_path):
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(tiny.path).save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for f in ("vocab.json", "merges.txt"):
        (tmp_path / f).unlink(missing_ok=True)
    a, b = Tokenizer.from_dir(tmp_path), tiny.model.tokenizer
    text = "Hello world! <|endoftext|> Grüße 🙂 日本語  spaces\n\ttabs"
    assert a.encode(text) == b.encode(text)
    assert a.decode(a.encode(text)) == text and a.eot_id == b.eot_id == 50256


def test_corrupt_tokenizer_is_an_error(tmp_path):
    add_tokenizer(tmp_path)
    (tmp_path / "vocab.json").write_text("{broken")
    with pytest.raises(MinadeptError, match="tokenizer"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(MinadeptError, match="no tokenizer"):
        Tokenizer.from_dir((tmp_path / "empty").mkdir() or tmp_path / "empty")
