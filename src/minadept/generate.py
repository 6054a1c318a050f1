"""The generation loop: prefill the prompt, then decode one token at a time.

Yields one ``Step`` per new token with its exit layer and FLOPs, so callers (the CLI, benchmarks)
can stream, time and report; this module does no printing and no timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .engine import Engine, ForwardResult
from .tokenizer import token_ids
from .errors import MinadeptError
from .sampling import SamplingSettings, sample


@dataclass
class Step:
    """One generated token and the forward call that predicted it (the prompt pass for the first)."""
    token: int
    result: ForwardResult


@dataclass
class Generation:
    """Filled in as the loop runs; ``stop_reason`` is set at the end:
    "eot", "max_new_tokens" or "context_full"."""
    prompt_ids: list[int]
    tokens: list[int] = field(default_factory=list)
    prompt_result: ForwardResult | None = None
    decode_results: list[ForwardResult] = field(default_factory=list)
    stop_reason: str | None = None


def prepare_prompt(engine: Engine, prompt_ids) -> list[int]:
    """Empty prompt -> [<|endoftext|>]; a prompt longer than n_positions is an error (before any
    compute). Raises MinadeptError."""
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
        raise MinadeptError(f"prompt_ids must be a sequence of integer token ids, got {type(prompt_ids).__name__} "
                            "(encode text with model.tokenizer.encode)")
    if not isinstance(prompt_ids, (list, tuple, np.ndarray)):
        prompt_ids = list(prompt_ids)                    # any other iterable (a generator, a range ...)
    ids = token_ids(prompt_ids, engine.config.vocab_size, "prompt_ids").tolist()
    if not ids:
        tok = engine.model.tokenizer
        if tok is None:
            raise MinadeptError("empty prompt and no tokenizer to supply <|endoftext|>")
        ids = [tok.eot_id]
    n = engine.config.n_positions
    if len(ids) > n:
        raise MinadeptError(f"prompt is {len(ids)} tokens, longer than the model's context of {n} (n_positions)")
    return ids


def _check_generate_args(engine, max_new_tokens, sampling, rng, eot_id, state) -> None:
    """``generate``'s arguments, checked; raises MinadeptError naming the first bad one."""
    if not isinstance(engine, Engine):
        raise MinadeptError(f"engine must be an Engine (Engine(model, policy)), got {type(engine).__name__}")
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise MinadeptError(f"--max-new-tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingSettings):
        raise MinadeptError(f"sampling must be a SamplingSettings, got {type(sampling).__name__}")
    if not isinstance(rng, np.random.Generator):
        raise MinadeptError(f"rng must be a numpy Generator (np.random.default_rng(seed)), got {type(rng).__name__}")
    V = engine.config.vocab_size
    if eot_id is not None and (not isinstance(eot_id, (int, np.integer)) or isinstance(eot_id, bool)
                               or not 0 <= eot_id < V):
        raise MinadeptError(f"eot_id must be a token id in [0, {V}) or None, got {eot_id!r}")
    if state is not None and not isinstance(state, Generation):
        raise MinadeptError(f"state must be a Generation or None, got {type(state).__name__}")


def generate(engine: Engine, prompt_ids, *, max_new_tokens: int, sampling: SamplingSettings,
             rng: np.random.Generator, eot_id: int | None = None, state: Generation | None = None):
    """Generator of ``Step``s: prefill, then decode until ``<|endoftext|>`` (``eot_id``, which is
    yielded), ``max_new_tokens``, or a full context. Pass ``state`` to read ``stop_reason`` after.
    Raises MinadeptError for max_new_tokens < 0 or an over-long prompt."""
    _check_generate_args(engine, max_new_tokens, sampling, rng, eot_id, state)
    max_new_tokens = int(max_new_tokens)
    ids = prepare_prompt(engine, prompt_ids)
    gen = state if state is not None else Generation(prompt_ids=ids)
    gen.prompt_ids = ids
    if max_new_tokens == 0:
        gen.stop_reason = "max_new_tokens"
        return
    cache = engine.new_cache(min(engine.config.n_positions, len(ids) + max_new_tokens))
    result = engine.forward(ids, cache)
    gen.prompt_result = result
    while True:
        token = sample(result.logits[-1], sampling, rng)
        gen.tokens.append(token)
        yield Step(token=token, result=result)
        if eot_id is not None and token == eot_id:
            gen.stop_reason = "eot"
            return
        if len(gen.tokens) >= max_new_tokens:
            gen.stop_reason = "max_new_tokens"
            return
        if cache.length >= cache.n_ctx:
            gen.stop_reason = "context_full"
            return
        result = engine.forward([token], cache, step=len(gen.tokens))
        gen.decode_results.append(result)
