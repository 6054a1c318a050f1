#!/usr/bin/env python
"""Hand-written mutation testing for minadept (a script, not a test module: pytest does not
collect it; see tests/README.md, "Mutation testing").

Each mutant is one small, realistic bug: (file under src/minadept, an exact snippet that occurs
exactly once in it, its replacement, the test files / node ids that target it, a description).
For every mutant the runner takes a scratch copy of ``src/`` (with the compiled ``.so`` modules),
applies the one replacement, runs

    python -m pytest -x -q -p no:cacheprovider <targets>

with ``PYTHONPATH=<copy>/src`` (so both the test process and any ``python -m minadept``
subprocess the tests start import the mutant, not the editable install) and restores the file.

Results: ``killed`` (a test failed), ``survived`` (every targeted test passed), ``error`` (the
mutated module does not import: counted as killed, reported separately), ``timeout``.

    python tests/mutation.py                # every mutant, summary table
    python tests/mutation.py --list         # list (and validate) the mutants
    python tests/mutation.py --only 12 40   # some mutants by id
    python tests/mutation.py --jobs 2 --json out.json

``MINADEPT_BACKEND`` is ``numpy`` for the test process (fast to run, exercises the NumPy layer
loop everywhere) except for mutants marked ``fast`` (``fused.py``, the compiled decode path).
Tests that pick their backend themselves (``test_engine.py`` runs both) still do.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
T = "tests/"


@dataclass
class Mutant:
    file: str                  # relative to src/minadept
    old: str                   # exact snippet, occurs exactly once
    new: str
    targets: list
    desc: str
    backend: str = "numpy"     # MINADEPT_BACKEND of the test process
    id: int = 0
    result: str = ""
    seconds: float = 0.0
    detail: str = ""


def m(file, old, new, targets, desc, backend="numpy"):
    """A mutant; ``tests/test_mutants.py`` (the tests written for survivors) targets every mutant
    of the library modules, last, so the existing tests get the first chance."""
    if file != "cli.py":
        targets = [*targets, "test_mutants.py"]
    return Mutant(file, old, new, [t if t.startswith(T) else T + t for t in targets], desc, backend)


ENG = "engine.py"
FUS = "fused.py"
POL = "exits/policies.py"
PRO = "exits/propagate.py"
ADE = "exits/adept.py"
CAL = "exits/calibrate.py"
GEN = "generate.py"
SAM = "sampling.py"
CAC = "cache.py"
TOK = "tokenizer.py"
DMP = "dump.py"
REF = "reference.py"
SET = "settings.py"

CHECK = ["test_check.py::test_identical_dumps_pass", "test_check.py::test_kv_of_an_exited_token_left_at_zero",
         "test_check.py::test_other_format_versions_are_refused"]
E_TESTS = ["test_engine.py", "test_behaviours.py", "test_golden.py"]
FLOP_TESTS = ["test_engine.py::test_accounting_adds_up", "test_engine.py::test_none_accounting_equals_analytic_gpt2_forward",
              "test_behaviours.py", "test_adept.py", "test_fused.py"]

MUTANTS = [
    # ------------------------------------------------------------------ engine.py
    m(ENG, "hidden[k + 1:, cols] = hidden[k, cols][None]", "hidden[k + 2:, cols] = hidden[k, cols][None]",
      ["test_golden.py", "test_engine.py", "test_behaviours.py", *CHECK],
      "hidden states frozen one layer late after an exit"),
    m(ENG, "if record_hidden:\n            _freeze_exited(p.hidden, p.exit_layers)",
      "if False:\n            _freeze_exited(p.hidden, p.exit_layers)",
      ["test_golden.py", "test_engine.py", "test_behaviours.py", *CHECK],
      "hidden states not frozen after exit"),
    m(ENG, "        cache.length = p.end\n", "        pass\n", ["test_engine.py", "test_properties.py"],
      "missing cache.length update in the layer loop"),
    m(ENG, "n_blocks = self.config.n_layer - exit_layer", "n_blocks = self.config.n_layer - exit_layer - 1",
      E_TESTS, "propagation skips when one block is left (n_blocks off by one)"),
    m(ENG, "write_propagated(cache, exit_layer + 1, positions, kv)", "write_propagated(cache, exit_layer, positions, kv)",
      E_TESTS, "propagated K/V written one block too low (overwrites the exit block)"),
    m(ENG, "cache.pending[exit_layer:, positions] = True", "cache.pending[exit_layer + 1:, positions] = True",
      E_TESTS, "lazy fill: first skipped block never marked pending"),
    m(ENG, "        cache.pending[block - 1, idx] = False\n", "", E_TESTS + ["test_adept.py"],
      "lazy fill: pending mask not cleared (refilled again and again)"),
    m(ENG, "p.prop_f += self.fill_pending(cache, layer, p.end)", "p.prop_f += self.fill_pending(cache, layer, int(p.pos[0]))",
      E_TESTS, "lazy fill misses tokens that exited earlier in the same prefill"),
    m(ENG, "for b in range(1, self.config.n_layer + 1))", "for b in range(1, self.config.n_layer))",
      ["test_golden.py", "test_engine.py", "test_behaviours.py", *CHECK],
      "flush never fills the last block"),
    m(ENG, "np.minimum(exit_layers, L - 1) - first + 1",
      "np.minimum(exit_layers, L) - first + 1", FLOP_TESTS,
      "check FLOPs count a check at the last layer"),
    m(ENG, "np.minimum(exit_layers, L - 1) - first + 1",
      "np.minimum(exit_layers, L - 1) - first", FLOP_TESTS,
      "check FLOPs off by one below min_exit_layer"),
    m(ENG, "np.where(exit_layers < self.config.n_layer, self.exit_map_flops, 0)",
      "np.where(exit_layers <= self.config.n_layer, self.exit_map_flops, 0)", FLOP_TESTS,
      "exit-map FLOPs counted at full depth too"),
    m(ENG, "if all_logits or row == last:", "if all_logits:", FLOP_TESTS + E_TESTS,
      "generation recomputes the LM head instead of reusing the check logits"),
    m(ENG, "for i, row in zip(np.flatnonzero(mask), out):", "for i, row in zip(range(len(out)), out):",
      E_TESTS + ["test_adept.py"], "exit logits reused from the wrong row"),
    m(ENG, "p.h_exit[p.active] = p.h[p.active]", "p.h_exit[:] = p.h", E_TESTS,
      "oracle mode predicts exited tokens from their final state"),
    m(ENG, "h_prev=x[r]", "h_prev=x_new[r]", E_TESTS, "saturation compares h_k with itself"),
    m(ENG, "k=k[:, r], v=v[:, r]", "k=v[:, r], v=k[:, r]", E_TESTS + ["test_adept.py"],
      "K and V swapped in the ExitState handed to policies"),
    m(ENG, "self.policy.min_exit_layer <= layer < L", "self.policy.min_exit_layer < layer < L", E_TESTS,
      "first check one layer after min_exit_layer"),
    m(ENG, "self.policy.min_exit_layer <= layer < L", "1 <= layer < L", E_TESTS, "min_exit_layer ignored"),
    m(ENG, "trim_last and layer == L)", "trim_last and layer == L - 1)", E_TESTS + ["test_properties.py"],
      "last-layer trim applied one block early"),
    m(ENG, "M.write_kv(cache.kv[layer - 1], p.pos[run], k, v)", "M.write_kv(cache.kv[layer - 1], p.pos[run], v, k)",
      ["test_engine.py", "test_properties.py"], "K and V swapped in the cache write"),
    m(ENG, "p.count_block(block_flops(cfg, p.pos[run] + 1), run)", "p.count_block(block_flops(cfg, p.pos[run]), run)",
      FLOP_TESTS, "block FLOPs count one key too few"),
    m(ENG, "if self.oracle and self.active.size < T:", "if False:", FLOP_TESTS + ["test_engine.py"],
      "oracle mode counts exited tokens' blocks as blocks, not propagation"),
    m(ENG, "pos = np.arange(p0, p0 + T)", "pos = np.arange(T)", ["test_engine.py", "test_properties.py"],
      "positions ignore the cache offset"),
    m(ENG, "return not (isinstance(self.policy, NoExit) or self.policy.never_exits(step))",
      "return not (isinstance(self.policy, NoExit) or self.policy.never_exits(0))", ["test_behaviours.py", "test_engine.py"],
      "never_exits asked about step 0 instead of the real step"),
    m(ENG, "positions=p.pos[p.active], step=step,", "positions=p.pos[p.active], step=0,", ["test_behaviours.py"],
      "wrong step passed to the threshold schedule (layer loop)"),
    m(ENG, "full_flops=full_forward_flops(cfg, len(ids), len(rows), start=int(p.pos[0]))",
      "full_flops=full_forward_flops(cfg, len(ids), len(rows), start=0)", FLOP_TESTS + ["test_engine.py"],
      "full-depth FLOPs ignore the cache offset"),
    m(ENG, "if cache.length + len(ids) > cache.n_ctx:", "if cache.length + len(ids) >= cache.n_ctx:",
      ["test_properties.py", "test_behaviours.py"], "context check rejects an exactly full context"),
    m(ENG, "self.exit_map_flops = int(mapper_flops[0]) if exit_mapper is not None else 0",
      "self.exit_map_flops = int(mapper_flops[0])", ["test_adept.py", "test_behaviours.py"],
      "exit-map FLOPs counted with the identity exit map"),
    m(ENG, "if self.exit_mapper is not None and layer < self.config.n_layer:", "if self.exit_mapper is not None:",
      ["test_adept.py", "test_behaviours.py"], "exit mapper applied at the last layer"),
    m(TOK, "arr.min() < 0 or arr.max() >= vocab_size", "arr.min() < 0 or arr.max() > vocab_size",
      ["test_api_inputs.py"], "token id == vocab_size accepted"),
    # ------------------------------------------------------------------ fused.py (fast path)
    m(FUS, "start = 0 if engine.fill == \"lazy\" else max(0, min(first, L) - 1)",
      "start = 0 if engine.fill == \"lazy\" else max(0, min(first, L))", ["test_fused.py", "test_behaviours.py"],
      "fused decode skips the check at min_exit_layer", "fast"),
    m(FUS, "if layer >= L or layer < first:", "if layer > L or layer < first:", ["test_fused.py", "test_behaviours.py"],
      "fused decode checks at the last layer", "fast"),
    m(FUS, "engine._propagate(cache, h.copy(), np.array([p]), layer)", "engine._propagate(cache, h, np.array([p]), layer)",
      ["test_fused.py", "test_behaviours.py"], "exit state passed as a view of the working buffer", "fast"),
    m(FUS, "    cache.length = p + 1\n    exit_layers = np.array([exit_layer])", "    exit_layers = np.array([exit_layer])",
      ["test_fused.py", "test_properties.py"], "fused decode: missing cache.length update", "fast"),
    m(FUS, "exit_layer * block_flops(cfg, p + 1)", "exit_layer * block_flops(cfg, p)", ["test_fused.py"],
      "fused decode: block FLOPs one key short", "fast"),
    m(FUS, "check_logits = None if logits is None else logits[0]", "check_logits = None",
      ["test_fused.py"], "fused decode recomputes the head instead of reusing check logits", "fast"),
    m(FUS, "propagation_flops=prop_f, full_flops=full_forward_flops(cfg, 1, 1, start=p)",
      "propagation_flops=prop_f, full_flops=full_forward_flops(cfg, 1, 1, start=0)", ["test_fused.py"],
      "fused decode: full FLOPs ignore the position", "fast"),
    m(FUS, "positions=np.array([p]), step=step,", "positions=np.array([p]), step=0,",
      ["test_fused.py", "test_behaviours.py"], "fused decode: wrong step passed to schedules", "fast"),
    m(FUS, "prop_f += engine.fill_pending(cache, layer, p + 1)", "prop_f += engine.fill_pending(cache, layer, p)",
      ["test_fused.py", "test_behaviours.py"], "fused lazy fill excludes the current position", "fast"),
    m(FUS, "if engine.exit_mapper is not None and layer < engine.config.n_layer:", "if engine.exit_mapper is not None:",
      ["test_fused.py", "test_behaviours.py"], "fused: exit mapper applied at the last layer", "fast"),
    # ------------------------------------------------------------------ cache.py
    m(CAC, "return self.kv[layer, 1, :, :end]", "return self.kv[layer, 0, :, :end]", ["test_engine.py"],
      "values() returns the keys"),
    m(CAC, "self.pending = np.zeros((config.n_layer, n_ctx), dtype=bool)",
      "self.pending = np.ones((config.n_layer, n_ctx), dtype=bool)", E_TESTS,
      "a fresh cache starts with every entry pending"),
    m(CAC, "self.kv = np.zeros(", "self.kv = np.empty(", ["test_engine.py", "test_golden.py", "test_properties.py"],
      "cache left uninitialised"),
    # ------------------------------------------------------------------ exits/propagate.py
    m(PRO, "n[None] * g[:, None, :] + b[:, None, :]                         # [M, N, C]",
      "n[None] * g[:, None, :]                         # [M, N, C]", ["test_engine.py"],
      "propagate_kv drops the ln_1 bias"),
    m(PRO, "@ blk.c_attn_w[:, C:] + blk.c_attn_b[C:]", "@ blk.c_attn_w[:, C:]", ["test_engine.py", "test_behaviours.py"],
      "propagate_kv_loop drops the c_attn bias"),
    m(PRO, "return g[:, None] * w_kv, b @ w_kv + b_kv", "return g[:, None] * w_kv, b @ w_kv", E_TESTS,
      "StackedKV drops the c_attn bias"),
    m(PRO, "if blk > k + 1:", "if blk >= k + 1:", ["test_adept.py", "test_behaviours.py"],
      "learned K/V map applied to the block that reads h_k itself"),
    m(PRO, "n = normalize(h, self.config.layer_norm_epsilon)                     # [N, C]",
      "n = h                     # [N, C]", E_TESTS, "StackedKV skips the LayerNorm normalisation"),
    m(PRO, "return self.propagate(h, block - 1, block)", "return self.propagate(h, 0, block)", E_TESTS,
      "lazy fill reads block weights relative to exit layer 0"),
    m(PRO, "kv.reshape(M, N, 2, cfg.n_head, cfg.head_dim).transpose(0, 2, 3, 1, 4)",
      "kv.reshape(M, N, cfg.n_head, 2, cfg.head_dim).transpose(0, 3, 2, 1, 4)", E_TESTS,
      "K/V heads interleaved in the cache layout"),
    # ------------------------------------------------------------------ exits/policies.py
    m(POL, "return score > self.schedule(state.step), logits", "return score >= self.schedule(state.step), logits",
      ["test_engine.py", "test_behaviours.py"], "threshold compared with >= instead of >"),
    m(POL, "0.1 * math.exp(-self.temperature * step / max(1, self.horizon))",
      "0.1 * math.exp(-self.temperature * (step + 1) / max(1, self.horizon))", ["test_behaviours.py"],
      "decay schedule one step ahead"),
    m(POL, "        if self.tau >= 1.0:\n            return 1.0\n", "", ["test_behaviours.py", "test_engine.py"],
      "decay with tau = 1 dips below 1"),
    m(POL, "return self.schedule(step) >= 1.0", "return self.schedule(step) > 1.0", ["test_engine.py", "test_behaviours.py"],
      "never_exits false at tau = 1 (checks run for nothing)"),
    m(POL, "return top2[:, 1], top2[:, 1] - top2[:, 0]", "return top2[:, 0], top2[:, 1] - top2[:, 0]",
      ["test_kernels.py", "test_engine.py", "test_behaviours.py"], "softmax_top2 (NumPy) returns the second best"),
    m(POL, "return 6 * config.n_embd", "return 4 * config.n_embd", FLOP_TESTS, "saturation check FLOPs wrong"),
    m(POL, "np.where((aa == 0) | (bb == 0), 0.0, ab / (np.sqrt(aa) * np.sqrt(bb)))",
      "ab / (np.sqrt(aa) * np.sqrt(bb))", ["test_kernels.py", "test_behaviours.py", "test_engine.py"],
      "cosine_rows divides by zero for a zero row"),
    m(POL, "cut = math.log(tau / (1.0 - tau))", "cut = math.log((1.0 - tau) / tau)", ["test_adept.py"],
      "ADEPT cut on the logit has the wrong sign"),
    m(POL, "return 2 * (config.n_embd + 2) + 10 * config.n_embd", "return 2 * (config.n_embd + 2)",
      ["test_adept.py", "test_behaviours.py"], "ADEPT check FLOPs leave out the features"),
    m(POL, "first = 1 if min_exit_layer is None else min_exit_layer", "first = 1",
      ["test_behaviours.py", "test_engine.py"], "make_policy ignores min_exit_layer"),
    m(POL, "if exit_layer is not None and not (1 <= exit_layer <= L):", "if exit_layer is not None and not (1 <= exit_layer < L):",
      ["test_engine.py", "test_api_inputs.py", "test_cli_exits.py"], "--exit-layer n_layer rejected"),
    m(POL, "np.full(len(state.h), state.layer == self.exit_layer)", "np.full(len(state.h), state.layer >= self.exit_layer)",
      E_TESTS, "fixed policy exits at or after K"),
    m(POL, "return backend.softmax_top2(logits)[self.which], logits", "return backend.softmax_top2(logits)[self.which], None",
      FLOP_TESTS, "LM-head measures do not hand their logits back"),
    m(POL, "name, which = \"margin\", 1", "name, which = \"margin\", 0", ["test_engine.py", "test_behaviours.py", "test_golden.py"],
      "margin measures the top-1 probability"),
    # ------------------------------------------------------------------ exits/adept.py
    m(ADE, "return before + (block - k - 2)", "return before + (block - k - 1)", ["test_adept.py"],
      "pair_index off by one"),
    m(ADE, "return np.concatenate([d / sd, np.log(sd), cos[:, None]], axis=-1)",
      "return np.concatenate([d / sd, sd, cos[:, None]], axis=-1)", ["test_adept.py"],
      "policy features use sd instead of log sd"),
    m(ADE, "return h @ self.exit_w[k - 1] + self.exit_b[k - 1]", "return h @ self.exit_w[k - 1]",
      ["test_adept.py", "test_behaviours.py"], "exit map drops its bias"),
    m(ADE, "np.log(sd) * w[C] + cos * w[C + 1] + b", "cos * w[C] + np.log(sd) * w[C + 1] + b",
      ["test_adept.py", "test_kernels.py"], "ADEPT logit (NumPy) swaps the two scalar feature weights"),
    m(ADE, "sd = np.sqrt((d * d).mean(axis=-1) + eps)", "sd = np.sqrt((d * d).mean(axis=-1))",
      ["test_adept.py", "test_kernels.py"], "ADEPT logit (NumPy) drops the LayerNorm epsilon"),
    m(ADE, "return 2 * C * C, 0", "return C * C, 0", ["test_adept.py"], "exit-map FLOPs halved"),
    m(ADE, "if not 0.0 <= tau <= 1.0:", "if not 0.0 < tau <= 1.0:", ["test_adept.py", "test_cli_adept.py"],
      "a stored threshold of 0 is rejected"),
    m(ADE, "kv_maps=params if kv_map else None", "kv_maps=None", ["test_adept.py", "test_behaviours.py"],
      "adept_engine drops the learned K/V maps"),
    # ------------------------------------------------------------------ exits/calibrate.py
    m(CAL, "A[np.diag_indices_from(A)] += lam", "pass", ["test_adept.py"], "ridge penalty dropped"),
    m(CAL, "return U[:-1] >= best_deeper[1:]", "return U[:-1] > best_deeper[1:]", ["test_adept.py"],
      "a tie in reward does not prefer the exit"),
    m(CAL, "cost_weight * np.arange(1, L + 1)[:, None] / L", "cost_weight * np.arange(0, L)[:, None] / L",
      ["test_adept.py"], "cost C_k counted from 0"),
    m(CAL, "T[k, a:b] = -(pf * (lf - lk)).sum(-1)", "T[k, a:b] = (pf * (lf - lk)).sum(-1)", ["test_adept.py"],
      "exit quality has the wrong sign (+KL)"),
    m(CAL, "p = pair_index(k, l + 1, L)                                   # H[l] enters block l+1",
      "p = pair_index(k, l, L)", ["test_adept.py"], "K/V map fitted for the wrong block"),
    m(CAL, "pb[k - 1] = 20.0 if t[0] else -20.0", "pb[k - 1] = -20.0 if t[0] else 20.0", ["test_adept.py"],
      "constant policy layer with the wrong sign"),
    m(CAL, "else max(rows, key=lambda r: r[\"tau\"])", "else min(rows, key=lambda r: r[\"tau\"])",
      ["test_adept.py", "test_outputs.py"], "no tau meets the target: the least conservative is stored"),
    # ------------------------------------------------------------------ generate.py
    m(GEN, "        yield Step(token=token, result=result)\n        if eot_id is not None and token == eot_id:\n"
           "            gen.stop_reason = \"eot\"\n            return\n",
      "        if eot_id is not None and token == eot_id:\n            gen.stop_reason = \"eot\"\n            return\n"
      "        yield Step(token=token, result=result)\n", ["test_behaviours.py"], "eot not yielded"),
    m(GEN, "if len(gen.tokens) >= max_new_tokens:", "if len(gen.tokens) > max_new_tokens:", ["test_behaviours.py"],
      "one token more than max_new_tokens"),
    m(GEN, "if cache.length >= cache.n_ctx:", "if cache.length > cache.n_ctx:", ["test_behaviours.py"],
      "context_full not detected"),
    m(GEN, "step=len(gen.tokens))", "step=len(gen.tokens) - 1)", ["test_behaviours.py"],
      "decode passes the previous step to schedules"),
    m(GEN, "engine.new_cache(min(engine.config.n_positions, len(ids) + max_new_tokens))",
      "engine.new_cache(min(engine.config.n_positions, len(ids) + max_new_tokens - 1))",
      ["test_behaviours.py", "test_api_inputs.py", "test_properties.py"], "cache sized one position smaller"),
    m(GEN, "if len(ids) > n:", "if len(ids) >= n:", ["test_behaviours.py", "test_api_inputs.py", "test_properties.py",
                                                     "test_cli_errors.py"], "a prompt of exactly n_positions rejected"),
    m(GEN, "token = sample(result.logits[-1], sampling, rng)", "token = sample(result.logits[0], sampling, rng)",
      ["test_behaviours.py", "test_api_inputs.py"], "samples from the first logits row"),
    # ------------------------------------------------------------------ sampling.py
    m(SAM, "z = np.where(z < kth, -np.inf, z)", "z = np.where(z <= kth, -np.inf, z)", ["test_properties.py"],
      "top-k drops the k-th token"),
    m(SAM, "if s.top_k is not None and s.top_k < z.size:", "if s.top_k is not None and s.top_k <= z.size:",
      ["test_properties.py"], "top-k == vocab size goes through the cut"),
    m(SAM, "keep = int(np.searchsorted(cum, s.top_p) + 1)", "keep = int(np.searchsorted(cum, s.top_p))",
      ["test_properties.py"], "top-p keeps one token too few"),
    m(SAM, "keep = int(np.searchsorted(cum, s.top_p) + 1)", "keep = int(np.searchsorted(cum, s.top_p, side=\"right\") + 1)",
      ["test_properties.py"], "top-p boundary: a prefix with mass exactly top_p keeps one more"),
    m(SAM, "p = np.exp(z - z.max())", "p = np.exp((z - z.max()) / s.temperature)", ["test_properties.py"],
      "temperature applied twice"),
    m(SAM, "if self.top_k is not None and self.top_k < 1:", "if self.top_k is not None and self.top_k < 0:",
      ["test_properties.py", "test_api_inputs.py", "test_cli_errors.py"], "top_k = 0 accepted"),
    # ------------------------------------------------------------------ dump.py
    m(DMP, "\"format_version\": np.int64(FORMAT_VERSION)", "\"format_version\": np.int32(FORMAT_VERSION)",
      ["test_golden.py", *CHECK], "dump format_version dtype int32"),
    m(DMP, "FORMAT_VERSION = 1", "FORMAT_VERSION = 2", ["test_golden.py", *CHECK], "dump format version bumped"),
    m(DMP, "\"kv\": np.ascontiguousarray(cache.kv[:, :, :, :T, :])", "\"kv\": np.ascontiguousarray(cache.kv)",
      ["test_golden.py", *CHECK], "dump writes the whole padded cache"),
    m(DMP, "    engine.flush(cache)\n", "", ["test_golden.py", *CHECK], "dump does not flush lazy K/V"),
    m(DMP, "\"hidden_states\": r.hidden.astype(np.float32)", "\"hidden_states\": r.hidden.astype(np.float16)",
      ["test_golden.py", *CHECK], "dump hidden states in float16"),
    m(DMP, "ids = tok.encode(prompt) or [tok.eot_id]", "ids = tok.encode(prompt)",
      ["test_golden.py", *CHECK, "test_outputs.py"], "dump of an empty prompt has no <|endoftext|>"),
    m(DMP, "cache = engine.new_cache()", "cache = engine.new_cache(max(1, len(ids)))", ["test_golden.py", *CHECK],
      "dump sizes its cache to the prompt"),
    # ------------------------------------------------------------------ reference.py
    m(REF, "future = np.arange(S)[None, :] > q_pos[:, None]", "future = np.arange(S)[None, :] >= q_pos[:, None]",
      ["test_reference.py", "test_golden.py"], "causal mask hides the token itself"),
    m(REF, "1.0 / np.sqrt(q.shape[-1])", "1.0 / q.shape[-1]", ["test_reference.py", "test_golden.py"],
      "attention scaled by 1/D instead of 1/sqrt(D)"),
    m(REF, "    y = normalize(x, eps)\n    y *= g\n    y += b\n", "    y = normalize(x, eps)\n    y *= g\n",
      ["test_reference.py", "test_golden.py"], "layer_norm drops its bias"),
    m(REF, "(scores.shape[1] > 1 or q_pos[0] < S - 1)", "(scores.shape[1] > 1 or q_pos[0] < S)",
      ["test_reference.py", "test_golden.py", "test_engine.py"], "decode always builds the (empty) causal mask"),
    # ------------------------------------------------------------------ settings.py
    m(SET, "use_kv_map = settings.kv_map != \"identity\" and settings.kv == \"propagate\"",
      "use_kv_map = settings.kv_map != \"identity\"", ["test_adept.py", "test_behaviours.py", "test_cli_adept.py"],
      "learned K/V maps passed with --kv oracle / propagate-loop"),
    m(SET, "exit_mapper=adept.exit_map if settings.exit_map != \"identity\" else None", "exit_mapper=adept.exit_map",
      ["test_adept.py", "test_behaviours.py", "test_cli_adept.py"], "--exit-map identity ignored"),
    # ------------------------------------------------------------------ CLI canary (subprocess sees the mutant)
    m("cli.py", "print(f\"error: {e}\", file=sys.stderr)\n        return 2 if",
      "print(f\"failure: {e}\", file=sys.stderr)\n        return 2 if",
      ["test_cli_errors.py"],
      "CANARY: CLI error prefix changed (only subprocess tests can see it)"),
    # ------------------------------------------------------------------ the compiled ADEPT step (fused.py)
    m(FUS, "    cache.length = p + 1\n    exit_layers = np.array([k])", "    exit_layers = np.array([k])",
      ["test_fused.py"], "compiled ADEPT step: missing cache.length update", "fast"),
    m(FUS, "prop_f = (L - k) * (kv_layer_flops(cfg)", "prop_f = (L - k - 1) * (kv_layer_flops(cfg)",
      ["test_fused.py"], "compiled ADEPT step: propagation FLOPs one layer short", "fast"),
    m(FUS, "cut = math.log(tau / (1.0 - tau)) if tau > 0.0 else -math.inf",
      "cut = math.log(tau / (1.0 - tau)) if tau > 0.0 else 0.0", ["test_fused.py"],
      "compiled ADEPT step: tau 0 does not exit everything", "fast"),
    m(FUS, "plan.step_adept(ep, token, p, cache.kv, engine.policy.min_exit_layer, cut, logits[0])",
      "plan.step_adept(ep, token, p, cache.kv, engine.policy.min_exit_layer + 1, cut, logits[0])", ["test_fused.py"],
      "compiled ADEPT step: no check at min_exit_layer", "fast"),
    m(FUS, "or engine.fill != \"eager\":", ":", ["test_fused.py"],
      "compiled ADEPT step used with lazy fill", "fast"),
    # half precision (--dtype): rounding, storage layout, the tied head, the few-rows route
    m("halfprec.py", "    r += np.uint32(0x7FFF)\n", "    r += np.uint32(0x8000)\n", ["test_dtype.py"],
      "bfloat16 rounds ties up, not to even"),
    m("halfprec.py", "    if not transposed:\n        bits = np.ascontiguousarray(bits.T).T\n", "",
      ["test_dtype.py"], "block matrices kept [in, out], not the kernels' [out, in]", "fast"),
    m("checkpoint.py", "    head = wte\n    if params.lm_head is not params.wte:", "    head = params.lm_head\n    if params.lm_head is not params.wte:",
      ["test_dtype.py"], "with_dtype leaves the tied LM head float32", "fast"),
    m("halfprec.py", "            if big > FLOAT16_MAX:", "            if big > 2 * FLOAT16_MAX:", ["test_dtype.py"],
      "float16 range check lets 65504 < |x| <= 131008 through (to inf)"),
    m("model.py", "        wte = p.wte.bits if isinstance(p.wte, halfprec.HalfMatrix) else p.wte",
      "        wte = p.wte.float32() if isinstance(p.wte, halfprec.HalfMatrix) else p.wte", ["test_dtype.py"],
      "decode plan gets a float32 upcast of a half wte", "fast"),
]
for i, mu in enumerate(MUTANTS, 1):
    mu.id = i


def validate(mu: Mutant) -> str | None:
    """None if the mutant applies (its snippet occurs exactly once), else the reason."""
    path = SRC / "minadept" / mu.file
    if not path.is_file():
        return f"no file {path}"
    n = path.read_text().count(mu.old)
    if n != 1:
        return f"snippet occurs {n} times in {mu.file}"
    if mu.old == mu.new:
        return "replacement equals the original"
    return None


def make_copy(root: Path) -> Path:
    """A scratch copy of src/ (with the compiled modules), no bytecode caches."""
    dst = root / "src"
    shutil.copytree(SRC, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return dst


def child_env(copy_src: Path, backend: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy_src) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"        # no stale bytecode between mutants of one copy
    env["MINADEPT_BACKEND"] = backend
    for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[v] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def check_import_path(copy_src: Path) -> None:
    """The copy, not the editable install, must be what ``import minadept`` finds."""
    r = subprocess.run([sys.executable, "-c", "import minadept, minadept._kernels as k; print(minadept.__file__); print(k.__file__)"],
                       env=child_env(copy_src, "numpy"), capture_output=True, text=True, cwd=ROOT)
    lines = r.stdout.split()
    if r.returncode != 0 or not lines or not all(l.startswith(str(copy_src)) for l in lines):
        sys.exit(f"mutation: PYTHONPATH={copy_src} does not import the copy: {r.stdout!r} {r.stderr[-500:]!r}")


def _run(cmd, env, timeout):
    """(returncode or None on timeout, output tail). The child is its own process group."""
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        return p.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return None, out


def run_mutant(mu: Mutant, copy_src: Path, timeout: float) -> Mutant:
    path = copy_src / "minadept" / mu.file
    original = path.read_text()
    assert original.count(mu.old) == 1, f"mutant {mu.id}: snippet occurs {original.count(mu.old)} times"
    t0 = time.monotonic()
    try:
        path.write_text(original.replace(mu.old, mu.new, 1))
        env = child_env(copy_src, mu.backend)
        module = "minadept." + mu.file[:-3].replace("/", ".")
        rc, out = _run([sys.executable, "-c", f"import {module}"], env, 60)
        if rc != 0:
            mu.result, mu.detail = "error", (out or "").strip().splitlines()[-1:] and out.strip().splitlines()[-1]
            return mu
        rc, out = _run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *mu.targets],
                       env, timeout)
        lines = (out or "").strip().splitlines()
        if rc is None:
            mu.result = "timeout"
        elif rc == 0:
            mu.result = "survived"
        elif rc == 1:
            mu.result = "killed"
            failed = [l for l in lines if l.startswith("FAILED") or l.startswith("ERROR")]
            mu.detail = (failed[0] if failed else lines[-1] if lines else "")[:200]
        else:
            mu.result = "error"
            mu.detail = f"pytest exit status {rc}: " + (lines[-1] if lines else "")
    finally:
        path.write_text(original)
        mu.seconds = round(time.monotonic() - t0, 1)
    return mu


def print_table(mutants) -> None:
    print(f"{'id':>3}  {'file':<20} {'result':<9} {'s':>6}  description")
    for mu in mutants:
        print(f"{mu.id:>3}  {mu.file:<20} {mu.result:<9} {mu.seconds:>6.1f}  {mu.desc}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", type=int, nargs="+", help="mutant ids to run")
    ap.add_argument("--list", action="store_true", help="list and validate the mutants, run nothing")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (one src copy each)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per mutant")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    chosen = [mu for mu in MUTANTS if not args.only or mu.id in args.only]
    bad = [(mu.id, r) for mu in chosen if (r := validate(mu))]
    if args.list:
        for mu in chosen:
            print(f"{mu.id:>3}  {mu.file:<20} [{mu.backend}] {mu.desc}\n       targets: {' '.join(mu.targets)}")
        print(f"{len(chosen)} mutants over {len({mu.file for mu in chosen})} files")
    for i, r in bad:
        print(f"mutant {i}: INVALID: {r}", file=sys.stderr)
    if bad or args.list:
        return 1 if bad else 0

    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="minadept-mut-") as tmp:
        copies = [make_copy(Path(tmp) / f"w{j}") for j in range(max(1, args.jobs))]
        check_import_path(copies[0])
        print(f"{len(chosen)} mutants, {len(copies)} job(s); PYTHONPATH copy imports verified", flush=True)
        if len(copies) == 1:
            for mu in chosen:
                run_mutant(mu, copies[0], args.timeout)
                print(f"  #{mu.id:<3} {mu.result:<9} {mu.seconds:6.1f}s  {mu.file}: {mu.desc}", flush=True)
        else:
            import queue
            import threading
            q: queue.Queue = queue.Queue()
            for mu in chosen:
                q.put(mu)
            lock = threading.Lock()

            def worker(copy_src):
                while True:
                    try:
                        mu = q.get_nowait()
                    except queue.Empty:
                        return
                    run_mutant(mu, copy_src, args.timeout)
                    with lock:
                        print(f"  #{mu.id:<3} {mu.result:<9} {mu.seconds:6.1f}s  {mu.file}: {mu.desc}", flush=True)

            threads = [threading.Thread(target=worker, args=(c,)) for c in copies]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    wall = time.monotonic() - t_start

    print()
    print_table(chosen)
    counts = {k: sum(mu.result == k for mu in chosen) for k in ("killed", "error", "survived", "timeout")}
    print(f"\n{len(chosen)} mutants: {counts['killed']} killed, {counts['error']} error (killed: does not import "
          f"or pytest error), {counts['survived']} survived, {counts['timeout']} timeout; wall {wall:.0f} s, "
          f"{len(copies)} job(s)")
    for mu in chosen:
        if mu.result in ("survived", "timeout"):
            print(f"  {mu.result.upper()} #{mu.id} {mu.file}: {mu.desc}")
    if args.json:
        Path(args.json).write_text(json.dumps({"wall_seconds": round(wall, 1), "jobs": len(copies), "counts": counts,
                                               "mutants": [asdict(mu) for mu in chosen]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
