"""One engine for the plain model and every exit policy: prefill and decode with token-level exits.

``Engine.forward(ids, cache)`` runs the tokens ``ids`` at positions ``cache.length ...`` through the
blocks layer by layer. Only still-active tokens are computed at each layer (their q/k/v, attention
over all earlier positions, MLP); after block k an exit policy may retire some of them, and their
K/V at deeper layers comes from propagation (eager, lazy, or the ``oracle`` ablation that runs the
skipped blocks for real). Prefill (many tokens) and decode (one token) are the same call. With the
``none`` policy nothing exits and the logits equal ``reference.forward`` (bit for bit on the NumPy
backend). On the fast backend a single token goes through ``fused.decode_one`` instead of the
layer loop: the same decisions, propagation and accounting, one compiled call per block.

The layer loop (``_layer_loop``) holds the exit logic: the active set, the policy call
(``_exit_step``) and eager or lazy propagation; running a block (``_block``), counting its FLOPs
(``_Pass.count_block``, the ``oracle`` mode included) and recording hidden states are named
steps. Accounting is returned as data (FLOPs per token by kind); callers measure wall time.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from . import backend
from . import model as M
from .cache import KVCache
from .errors import MinadeptError
from .exits.policies import ExitState, NoExit, Policy
from .exits.propagate import StackedKV, propagate_kv_loop, write_propagated
from .flops import block_flops, full_forward_flops, head_flops, kv_layer_flops
from .tokenizer import token_ids

KV_MODES = ("propagate", "propagate-loop", "oracle")
FILL_MODES = ("eager", "lazy")


@dataclass
class ForwardResult:
    """What one ``Engine.forward`` call produced. T = tokens in the call, P = predicted tokens."""
    logits: np.ndarray            # [P, V] float32: all T tokens (all_logits) or the last one
    exit_layers: np.ndarray       # [T] int, 1..n_layer (n_layer = full depth)
    block_flops: np.ndarray       # [T] int64: blocks run for the token
    check_flops: np.ndarray       # [T] int64: exit checks for the token
    head_flops: np.ndarray        # [T] int64: LM head (+ exit map) for its prediction (0 if not predicted or
                                  #            reused from a check)
    propagation_flops: int        # K/V propagation done during this call (eager or lazy fills)
    full_flops: int               # full depth, same tokens and predictions
    hidden: np.ndarray | None = None   # [n_layer+1, T, C] if record_hidden (exited rows frozen)

    @property
    def total_flops(self) -> int:
        return int(self.block_flops.sum() + self.check_flops.sum() + self.head_flops.sum()
                   + self.propagation_flops)


def _freeze_exited(hidden: np.ndarray, exit_layers: np.ndarray) -> None:
    """Recorded states [n_layer+1, T, C], in place: a token that exited at layer k holds h_k in
    every later entry (the dump format's promise), whatever ran after its exit (the ``oracle`` KV
    mode runs the skipped blocks; a pass whose tokens all exited early stops recording)."""
    for k in np.unique(exit_layers):
        cols = np.flatnonzero(exit_layers == k)
        hidden[k + 1:, cols] = hidden[k, cols][None]


def _check_engine_args(model, policy, kv, fill, exit_mapper, kv_maps, mapper_flops) -> None:
    """``Engine``'s arguments, checked; raises MinadeptError naming the first bad one."""
    from .exits.adept import AdeptParams
    if not isinstance(model, M.Model):
        raise MinadeptError(f"model must be a minadept Model (Model.load(...)), got {type(model).__name__}")
    if policy is not None and not isinstance(policy, Policy):
        raise MinadeptError(f"policy must be an exit Policy (make_policy(...)) or None, got {type(policy).__name__}")
    if exit_mapper is not None and not callable(exit_mapper):
        raise MinadeptError(f"exit_mapper must be callable (k, h) -> h' or None, got {type(exit_mapper).__name__}")
    if kv_maps is not None and not isinstance(kv_maps, AdeptParams):
        raise MinadeptError(f"kv_maps must be an AdeptParams (load_adept(...)) or None, got {type(kv_maps).__name__}")
    if (not isinstance(mapper_flops, (tuple, list)) or len(mapper_flops) != 2
            or not all(isinstance(f, (int, np.integer)) and not isinstance(f, bool) and f >= 0
                       for f in mapper_flops)):
        raise MinadeptError(f"mapper_flops must be a pair of integers >= 0 (exit map, K/V map), got {mapper_flops!r}")
    if not isinstance(kv, str) or kv not in KV_MODES:
        raise MinadeptError(f"unknown --kv {kv!r} (expected one of {', '.join(KV_MODES)})")
    if not isinstance(fill, str) or fill not in FILL_MODES:
        raise MinadeptError(f"unknown --kv-fill {fill!r} (expected eager or lazy)")
    if fill == "lazy" and kv != "propagate":
        raise MinadeptError(f"--kv-fill lazy works only with --kv propagate, not --kv {kv}")
    if kv_maps is not None and kv != "propagate":
        raise MinadeptError(f"learned K/V maps work only with --kv propagate, not --kv {kv}")


def _check_forward_args(config, cache, all_logits, record_hidden, step) -> None:
    """``Engine.forward``'s options, checked; raises MinadeptError naming the first bad one."""
    if not isinstance(cache, KVCache):
        raise MinadeptError(f"cache must be a KVCache (from Engine.new_cache), got {type(cache).__name__}")
    L, shape = config.n_layer, cache.kv.shape
    if (shape[0], shape[2], shape[4]) != (L, config.n_head, config.head_dim):
        raise MinadeptError(f"cache is for another model shape (n_layer {shape[0]}, n_head {shape[2]}, "
                            f"head_dim {shape[4]}); this model has n_layer {L}, n_head {config.n_head}, "
                            f"head_dim {config.head_dim}")
    if not isinstance(all_logits, (bool, np.bool_)):
        raise MinadeptError(f"all_logits must be a bool, got {type(all_logits).__name__} {all_logits!r}")
    if not isinstance(record_hidden, (bool, np.bool_)):
        raise MinadeptError(f"record_hidden must be a bool, got {type(record_hidden).__name__} {record_hidden!r}")
    if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
        raise MinadeptError(f"step must be an integer >= 0, got {step!r}")


class Engine:
    """Runs a ``Model`` under an exit ``policy`` with a KV mode for skipped layers.

    kv: ``propagate`` (batched, decoupled), ``propagate-loop`` (its per-layer twin) or ``oracle``
    (run the skipped blocks to get true K/V; CALM's upper bound). fill: ``eager`` (propagate at
    exit) or ``lazy`` (fill layer l's pending K/V when a later token reaches layer l; only with
    ``propagate``). ``exit_mapper(k, h) -> h'`` is a hook for a learned exit map and ``kv_maps``
    (an ``AdeptParams``) holds learned K/V maps, folded into the propagation weights
    (``StackedKV``); None is the identity. ``mapper_flops`` = (FLOPs per exit-map application,
    extra FLOPs per propagated layer) per token, added to the accounting
    (``AdeptParams.mapper_flops()``).

    Raises MinadeptError for an unknown mode or an impossible combination.
    """

    def __init__(self, model: M.Model, policy: Policy | None = None, *, kv: str = "propagate",
                 fill: str = "eager", exit_mapper=None, kv_maps=None, mapper_flops=(0, 0)):
        _check_engine_args(model, policy, kv, fill, exit_mapper, kv_maps, mapper_flops)
        self.model, self.config = model, model.config
        self.policy = policy or NoExit()
        self.kv, self.fill = kv, fill
        self.exit_mapper, self.kv_maps = exit_mapper, kv_maps
        self.exit_map_flops = int(mapper_flops[0]) if exit_mapper is not None else 0
        self.kv_map_flops = int(mapper_flops[1]) if kv_maps is not None else 0

    @cached_property
    def stacked(self) -> StackedKV:
        """The folded propagation weights (``--kv propagate``), built on the first exit: a plain
        full-depth engine never pays for them."""
        return StackedKV(self.model, self.kv_maps)

    @cached_property
    def exit_plan(self):
        """The compiled exits of the fused decode step (``fused.adept_exit_plan``), or None."""
        from .fused import adept_exit_plan
        return adept_exit_plan(self)

    def new_cache(self, n_ctx: int | None = None) -> KVCache:
        """An empty KV cache for ``n_ctx`` positions (default n_positions). Size it to what a run
        needs: first-touching a large fresh cache costs real time (measured 70 ms of a 190 ms
        124M prefill for a 1024-position cache)."""
        n = self.config.n_positions if n_ctx is None else n_ctx
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool):
            raise MinadeptError(f"cache size must be an integer in [1, {self.config.n_positions}] "
                                f"(n_positions), got {n!r}")
        if not 1 <= n <= self.config.n_positions:
            raise MinadeptError(f"cache size must be in [1, {self.config.n_positions}] (n_positions), got {n}")
        return KVCache(self.config, n)

    def settings(self) -> dict:
        """The exit policy and KV settings, as JSON summaries and dumps report them; ``dtype``
        when the model's weights are half precision (absent: float32)."""
        s = dict(self.policy.settings(), kv=self.kv, kv_fill=self.fill)
        if s.get("exit") == "adept":
            s.update(exit_map="learned" if self.exit_mapper is not None else "identity",
                     kv_map="learned" if self.kv_maps is not None else "identity")
        if self.model.dtype != "float32":
            s["dtype"] = self.model.dtype
        return s

    def prepare(self) -> None:
        """Build what the engine otherwise creates on first use (the LM head copy, the fused
        decode step on the fast backend, the folded propagation weights of a policy that can
        exit) and run one token through once (BLAS threads start, first-touch page faults), so
        that timings taken after it measure steady-state prefill and decode. Optional."""
        _ = self.model.lm_head_t
        if backend.kernels() is not None:
            _ = self.model.decode_plan
        if self.kv == "propagate" and not isinstance(self.policy, NoExit):
            for k in range(self.policy.min_exit_layer, self.config.n_layer):
                self.stacked.weights(k)          # learned K/V maps are folded per exit layer
            if backend.kernels() is not None:
                _ = self.exit_plan
        self.forward([0], self.new_cache(1))

    # -- predictions ------------------------------------------------------------------------
    def predict(self, h: np.ndarray, layer: int) -> np.ndarray:
        """Exit prediction of states h [N, C] taken after block ``layer``: LM head of
        ``ln_f(mapper(h))`` -> [N, V]. At the last layer (or with no mapper) ln_f(h) exactly."""
        if self.exit_mapper is not None and layer < self.config.n_layer:
            h = self.exit_mapper(layer, h)
        return M.lm_head(self.model, M.final_norm(self.model.params, h, self.config))

    # -- propagation ------------------------------------------------------------------------
    def _propagate(self, cache: KVCache, h: np.ndarray, positions: np.ndarray, exit_layer: int) -> int:
        """Fill blocks exit_layer+1..n_layer for tokens exiting with states h [N, C] (eagerly, or
        mark them pending for lazy fill); returns the FLOPs spent."""
        n_blocks = self.config.n_layer - exit_layer
        if n_blocks == 0 or h.shape[0] == 0:
            return 0
        if self.fill == "lazy":
            cache.pending[exit_layer:, positions] = True
            cache.exit_state[positions] = h
            cache.exit_at[positions] = exit_layer
            return 0
        if self.kv == "propagate-loop":
            kv = propagate_kv_loop(self.model, h, exit_layer)
        else:
            kv = self.stacked.propagate(h, exit_layer)
        write_propagated(cache, exit_layer + 1, positions, kv)
        return int(n_blocks * h.shape[0] * (kv_layer_flops(self.config) + self.kv_map_flops))

    def fill_pending(self, cache: KVCache, block: int, end: int) -> int:
        """Lazy fill: compute block ``block``'s (1..n_layer) pending K/V for positions < end, in one
        product per exit layer (one in all with identity maps); returns the FLOPs spent."""
        idx = np.flatnonzero(cache.pending[block - 1, :end])
        if idx.size == 0:
            return 0
        kv = self.stacked.propagate_block(cache.exit_state[idx], cache.exit_at[idx], block)
        write_propagated(cache, block, idx, kv)
        cache.pending[block - 1, idx] = False
        return int(idx.size * (kv_layer_flops(self.config) + self.kv_map_flops))

    def flush(self, cache: KVCache) -> int:
        """Fill every pending entry (before dumping or comparing caches). Returns FLOPs spent."""
        return sum(self.fill_pending(cache, b, cache.length) for b in range(1, self.config.n_layer + 1))

    # -- accounting shared by the layer loop and the fused single-token path -------------------
    def _checking(self, step: int) -> bool:
        """Whether exit checks run at generated-token index ``step``."""
        return not (isinstance(self.policy, NoExit) or self.policy.never_exits(step))

    def _check_flops(self, exit_layers: np.ndarray, checking: bool) -> np.ndarray:
        """Exit-check FLOPs [T] int64: a token is checked after every block from min_exit_layer up
        to its exit (at most L-1)."""
        if not checking:
            return np.zeros(len(exit_layers), dtype=np.int64)
        L, first = self.config.n_layer, max(1, self.policy.min_exit_layer)     # checks run after blocks 1..
        n_checks = np.clip(np.minimum(exit_layers, L - 1) - first + 1, 0, None)
        return n_checks * self.policy.check_flops(self.config)

    def _head_cost(self, exit_layers: np.ndarray) -> np.ndarray:
        """LM-head FLOPs of predicting tokens that exit at ``exit_layers`` (plus the exit map
        below the last layer)."""
        return head_flops(self.config) + np.where(exit_layers < self.config.n_layer, self.exit_map_flops, 0)

    def _predictions(self, rows, check_logits, exit_layers, h_exit):
        """Logits [len(rows), V] of the predicted rows, reusing logits an exit check already
        computed; returns them with the per-token LM-head FLOPs [T] of the rows computed here."""
        logits = np.empty((len(rows), self.config.vocab_size), np.float32)
        head_f = np.zeros(len(exit_layers), dtype=np.int64)
        todo = np.array([i for i, r in enumerate(rows) if int(r) not in check_logits], dtype=np.int64)
        for i, r in enumerate(rows):
            if int(r) in check_logits:
                logits[i] = check_logits[int(r)]
        for k in np.unique(exit_layers[rows[todo]]):          # one LM-head product per exit layer
            sel = todo[exit_layers[rows[todo]] == k]
            logits[sel] = self.predict(h_exit[rows[sel]], int(k))
        head_f[rows[todo]] = self._head_cost(exit_layers[rows[todo]])
        return logits, head_f

    # -- the forward pass --------------------------------------------------------------------
    def forward(self, ids, cache: KVCache, *, all_logits: bool = False, step: int = 0,
                record_hidden: bool = False) -> ForwardResult:
        """Run ``ids`` [T] (int) at positions cache.length..cache.length+T-1 and advance the cache.

        ``all_logits``: predict every token (evaluation), else only the last (generation).
        ``step``: generated-token index passed to threshold schedules (0 for the prompt).
        ``record_hidden``: return every layer's states in ``hidden`` (exited tokens frozen at h_k).
        Raises MinadeptError for bad arguments, tokens that do not fit in the cache or an id out
        of range.
        """
        _check_forward_args(self.config, cache, all_logits, record_hidden, step)
        ids = token_ids(ids, self.config.vocab_size)
        if ids.size == 0:
            raise MinadeptError("no tokens to run")
        if cache.length + len(ids) > cache.n_ctx:
            raise MinadeptError(f"{cache.length + len(ids)} tokens do not fit in the context of {cache.n_ctx} (n_positions)")
        if len(ids) == 1 and not record_hidden and self.kv != "oracle" and backend.kernels() is not None:
            plan = self.model.decode_plan
            if plan is not None:
                from .fused import decode_one
                with plan.lock, backend.single_threaded_blas():   # one step at a time per model
                    return decode_one(self, int(ids[0]), cache, step, plan)
        return self._layer_loop(ids, cache, all_logits, step, record_hidden)

    def _layer_loop(self, ids: np.ndarray, cache: KVCache, all_logits: bool, step: int,
                    record_hidden: bool) -> ForwardResult:
        """``forward`` block by block over the still-active tokens, any number of them."""
        cfg, L = self.config, self.config.n_layer
        p = _Pass.start(self, ids, cache.length, record_hidden)
        checking = self._checking(step)
        # Generation predicts the last token only: at block L the others need their K/V (for later
        # tokens) but not the attention output and MLP, which would feed nothing. Skipped there;
        # the FLOP accounting still counts whole blocks (the model's nominal cost).
        trim_last = not (all_logits or record_hidden or p.oracle)
        for _ in self._blocks(p, cache, step, checking, all_logits, trim_last):
            pass
        p.h_exit[p.active] = p.h[p.active]
        if record_hidden:
            _freeze_exited(p.hidden, p.exit_layers)
        cache.length = p.end
        rows = np.arange(len(ids)) if all_logits else np.array([len(ids) - 1])
        logits, head_f = self._predictions(rows, p.check_logits, p.exit_layers, p.h_exit)
        return ForwardResult(logits=logits, exit_layers=p.exit_layers, block_flops=p.blocks_f,
                             check_flops=self._check_flops(p.exit_layers, checking), head_flops=head_f,
                             propagation_flops=p.prop_f, hidden=p.hidden,
                             full_flops=full_forward_flops(cfg, len(ids), len(rows), start=int(p.pos[0])))

    def _blocks(self, p: "_Pass", cache: KVCache, step: int, checking: bool, all_logits: bool, trim_last: bool):
        """Blocks 1..n_layer over the pass ``p``, each followed by its exit step; yields the layer
        number after each and stops once no token runs (callers may stop earlier, e.g. to end an
        input at a layer)."""
        L = self.config.n_layer
        for layer, blk in enumerate(self.model.params.h, start=1):
            run = p.everyone if p.oracle else p.active
            if run.size == 0:
                return
            if self.fill == "lazy":
                p.prop_f += self.fill_pending(cache, layer, p.end)
            x, x_new, q, k, v = self._block(blk, layer, p, run, cache, trim_last and layer == L)
            if checking and self.policy.min_exit_layer <= layer < L and p.active.size:
                self._exit_step(p, layer, x, x_new, (q, k, v), step, all_logits, cache)
            yield layer

    def _block(self, blk, layer: int, p: "_Pass", run: np.ndarray, cache: KVCache, trim: bool):
        """Block ``layer`` for the tokens ``run``: q/k/v, the cache write, the rest of the block
        (only for the predicted token when ``trim``), the FLOP count and the hidden-state record.
        Returns (x, x_new, q, k, v): the block's input and output rows of ``run``, and its q/k/v."""
        cfg, T = self.config, len(p.pos)
        x = p.h[run] if run.size < T else p.h
        q, k, v = M.qkv(blk, x, cfg)                                    # [H, R, D] each
        M.write_kv(cache.kv[layer - 1], p.pos[run], k, v)
        keys, values = cache.keys(layer - 1, p.end), cache.values(layer - 1, p.end)
        if trim:
            j = np.flatnonzero(run == T - 1)
            x_new = x
            x_new[j] = M.block_rest(blk, x[j], q[:, j], keys, values, p.pos[run[j]], cfg)
        else:
            x_new = M.block_rest(blk, x, q, keys, values, p.pos[run], cfg)
        p.count_block(block_flops(cfg, p.pos[run] + 1), run)
        if run.size < T:
            p.h[run] = x_new
        else:
            p.h = x_new
        if p.hidden is not None:
            p.hidden[layer] = p.h
        return x, x_new, q, k, v

    def _exit_step(self, p: "_Pass", layer: int, x, x_new, qkv, step: int, all_logits: bool,
                   cache: KVCache) -> None:
        """The policy's decision after block ``layer`` for the active tokens; exiting tokens are
        retired with their state h_k, their check logits kept, their deeper K/V propagated."""
        r = p.active if p.oracle else slice(None)   # rows of this layer's arrays for active tokens
        q, k, v = qkv
        state = ExitState(layer=layer, h=x_new[r], h_prev=x[r], q=q[:, r], k=k[:, r], v=v[:, r],
                          positions=p.pos[p.active], step=step,
                          predict=lambda hh: self.predict(hh, layer))
        mask, logits = self.policy.decide(state)
        if not mask.any():
            return
        out = p.active[mask]
        p.exit_layers[out] = layer
        p.h_exit[out] = p.h[out]
        if logits is not None:
            last = len(p.pos) - 1
            for i, row in zip(np.flatnonzero(mask), out):
                if all_logits or row == last:
                    p.check_logits[int(row)] = logits[i]
        if not p.oracle:
            p.prop_f += self._propagate(cache, p.h[out], p.pos[out], layer)
        p.active = p.active[~mask]


@dataclass
class _Pass:
    """The running state of one layer-loop pass over T tokens."""
    pos: np.ndarray                 # [T] absolute positions
    end: int                        # cache length after the pass
    h: np.ndarray                   # [T, C] residual stream (exited rows keep h_k)
    h_exit: np.ndarray              # [T, C] each token's state at its exit layer
    exit_layers: np.ndarray         # [T] int64, n_layer until a token exits
    blocks_f: np.ndarray            # [T] int64 block FLOPs
    active: np.ndarray              # indices of tokens not yet exited
    everyone: np.ndarray            # arange(T)
    oracle: bool                    # --kv oracle: exited tokens keep running (their FLOPs count as propagation)
    hidden: np.ndarray | None       # [n_layer+1, T, C] when recording
    prop_f: int = 0
    check_logits: dict = None       # token row -> logits [V] an exit check computed

    @classmethod
    def start(cls, engine: Engine, ids: np.ndarray, p0: int, record_hidden: bool) -> "_Pass":
        cfg, T = engine.config, len(ids)
        pos = np.arange(p0, p0 + T)
        h = M.embed(engine.model.params, ids, pos)                          # [T, C]
        hidden = np.empty((cfg.n_layer + 1, T, cfg.n_embd), np.float32) if record_hidden else None
        if hidden is not None:
            hidden[0] = h
        return cls(pos=pos, end=p0 + T, h=h, h_exit=np.empty_like(h),
                   exit_layers=np.full(T, cfg.n_layer, dtype=np.int64), blocks_f=np.zeros(T, dtype=np.int64),
                   active=np.arange(T), everyone=np.arange(T), oracle=engine.kv == "oracle", hidden=hidden,
                   check_logits={})

    def count_block(self, cost: np.ndarray, run: np.ndarray) -> None:
        """Add one block's FLOPs [len(run)] of the tokens ``run``: to the block count of active
        tokens, to propagation for exited tokens the ``oracle`` mode keeps running."""
        T = len(self.pos)
        if self.oracle and self.active.size < T:
            is_active = np.zeros(T, bool)
            is_active[self.active] = True
            self.blocks_f[self.active] += cost[is_active]
            self.prop_f += int(cost[~is_active].sum())
        else:
            self.blocks_f[run] += cost
