# cython: language_level=3
"""The fused single-token decode step of GPT-2, ``DecodePlan`` (compiled to ``minadept._decode``).

A whole block for one token in one Python call: layer norms, the four matrix-vector products
(BLAS ``sgemv`` through SciPy's BLAS interface for Cython, ``scipy.linalg.cython_blas``, so no
Python between them; split over OpenMP threads for large models), the K/V write, attention over
the cache and GELU. Twin of the NumPy layer loop, property-tested in tests/test_fused.py. The row
primitives (``ln_row``, ``exp_approx``, ``gelu1``, ``attend_one``) live in ``common.pxi``, shared
with the array kernels (``kernels.pyx``). float32 in and out; reductions accumulate in double.
A model loaded with a half-precision dtype (float16, bfloat16) gives the plan its four block
matrices and LM head as bit patterns: their products run the half-precision GEMV of
``common.pxi`` (``hgemv_par``: converted in registers, summed in float32; tests/test_dtype.py).
Bounds/wraparound checks are off unless the package was built with MINADEPT_BOUNDSCHECK=1.
"""
import threading

import numpy as np
from cython.parallel import prange
cimport openmp
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemv as blas_sgemv

include "common.pxi"

cdef class ExitPlan


# ----------------------------------------------------------------------------- BLAS sgemv, OpenMP row split

cdef inline void gemv(const float* W, int K, int N, int lda, const float* x, float* y,
                      float beta) noexcept nogil:
    """y [N] = x [K] @ W [K, N] + beta * y, W row-major [in, out] as Conv1D stores it, rows
    ``lda`` floats apart (BLAS sees the column-major [N, K] matrix W^T)."""
    cdef char tr = b'N'
    cdef int inc = 1
    cdef float one = 1.0
    blas_sgemv(&tr, &N, &K, &one, <float*>W, &lda, <float*>x, &inc, &beta, y, &inc)


cdef void gemv_par(const float* W, int K, int N, const float* x, float* y, float beta,
                   long split_min, int n_threads, float* parts) noexcept nogil:
    """``gemv``, split over the OpenMP threads (at most ``n_threads``) when the matrix has at least
    ``split_min`` weights: decode is bandwidth-bound, and two cores stream more than one. Each
    thread takes a contiguous block of W's rows (the input dimension; measured 4-7% faster than
    column blocks at 124M) into its own partial sum in ``parts`` [n_threads, N], then the parts
    are added to beta * y."""
    cdef int nt = openmp.omp_get_max_threads(), p, k0, kk, chunk, j
    if nt > n_threads:
        nt = n_threads
    if nt <= 1 or <long>K * N < split_min:
        gemv(W, K, N, N, x, y, beta)
        return
    chunk = (K + nt - 1) // nt
    for p in prange(nt, num_threads=nt, schedule="static"):
        k0 = p * chunk
        kk = K - k0 if K - k0 < chunk else chunk
        if kk > 0:
            gemv(W + <long>k0 * N, kk, N, N, x + k0, parts + <long>p * N, 0.0)
        else:
            memset(parts + <long>p * N, 0, N * sizeof(float))
    if beta == 0.0:                             # as BLAS: y is not read (it may hold NaN)
        for j in prange(N, num_threads=nt, schedule="static"):
            y[j] = reduce_parts(parts, nt, N, j)
    else:
        for j in prange(N, num_threads=nt, schedule="static"):
            y[j] = beta * y[j] + reduce_parts(parts, nt, N, j)


cdef inline float reduce_parts(const float* parts, int nt, int N, int j) noexcept nogil:
    cdef float acc = parts[j]
    cdef int p
    for p in range(1, nt):
        acc = acc + parts[<long>p * N + j]
    return acc



# ----------------------------------------------------------------------------- fused decode step

cdef struct BlockW:
    const float* ln_1_g
    const float* ln_1_b
    const void* c_attn_w              # the four matrices: float32, or half-precision bit patterns
    const float* c_attn_b
    const void* attn_c_proj_w
    const float* attn_c_proj_b
    const float* ln_2_g
    const float* ln_2_b
    const void* c_fc_w
    const float* c_fc_b
    const void* mlp_c_proj_w
    const float* mlp_c_proj_b


cdef const float* _ptr(list keep, arr, tuple shape, str name) except NULL:
    """Pointer to a float32 C-contiguous copy-or-view of ``arr`` (kept alive in ``keep``)."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if a.shape != shape:
        raise ValueError(f"DecodePlan: {name} has shape {a.shape}, expected {shape}")
    keep.append(a)
    cdef const float[::1] m = a.reshape(-1)
    return &m[0]


#: weight type names -> codes (``W_F32``, ``W_F16``, ``W_BF16`` of common.pxi)
WEIGHT_KINDS = {"float32": W_F32, "float16": W_F16, "bfloat16": W_BF16}
#: The float16 conversion compiled in ("f16c" or "scalar"; see half.h).
HALF_CONVERSION = MINADEPT_HALF_CONVERSION.decode()


cdef const void* _wptr(list keep, arr, tuple shape, str name, int kind) except NULL:
    """Pointer to a weight matrix of ``shape`` [in, out]: float32 (as ``_ptr``), or for a
    half-precision ``kind`` the array itself, which must be uint16 bit patterns of the transposed
    shape [out, in], C-contiguous (the layout ``halfprec`` keeps: each output's weights
    contiguous): it is read in place, never converted or copied (a half model keeps no float32
    copy)."""
    if kind == W_F32:
        return _ptr(keep, arr, shape, name)
    want = (shape[1], shape[0])
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint16 or not arr.flags.c_contiguous \
            or arr.shape != want:
        raise ValueError(f"DecodePlan: {name} must be C-contiguous uint16 bit patterns of shape {want} "
                         f"([out, in]), got {type(arr).__name__} {getattr(arr, 'dtype', '')} "
                         f"{getattr(arr, 'shape', '')}")
    keep.append(arr)
    cdef const uint16_t[::1] m = arr.reshape(-1)
    return &m[0]


cdef class DecodePlan:
    """The fused single-token decode step of one GPT-2 (twin of ``model.qkv`` + ``model.write_kv``
    + ``model.block_rest`` for T = 1, and of ``final_norm`` + ``lm_head``; see
    ``minadept/fused.py``). Holds pointers to the model's weights and per-step scratch; every
    matrix-vector product is one BLAS ``sgemv`` (or, for half-precision weights, one ``hgemv_par``),
    everything else is C, so a block costs one Python call. The plan's scratch (and ``q``/``k``/``v``) is shared by all its calls, and the
    threaded loops release the GIL: threads sharing a plan must hold ``lock`` for a whole step
    (``Engine`` does).

    blocks: n_layer tuples of the 12 ``checkpoint.Block`` arrays in field order; lm_head_t [C, V].
    wdtype: "float32", or "float16" / "bfloat16": the four block matrices and the LM head are then
    uint16 bit patterns of that type, transposed ([out, in]: the block matrices [3C, C], [C, C],
    [4C, C], [C, 4C] and the head [V, C]; ``HalfMatrix.bits.T``), read in place; their products
    convert in registers and accumulate in float32 (``hgemv_par``). Everything else is float32 in
    every case.
    split_min: products with at least this many weights are split over the OpenMP threads;
    attn_split_min: attention is split by heads over them from this many H * keys * D values.
    """
    cdef BlockW* blocks
    cdef readonly int n_layer, n_embd, n_head, head_dim, n_inner, vocab_size, n_positions
    cdef double eps, scale
    cdef public long split_min, attn_split_min
    cdef int n_threads
    cdef const void* wte                   # [V, C] rows: float32, or bit patterns of wkind
    cdef const float* wpe
    cdef const float* ln_f_g
    cdef const float* ln_f_b
    cdef const void* lm_head_t
    cdef readonly int wkind                # W_F32, W_F16 or W_BF16: the matrices' type
    cdef list keep
    cdef readonly object qkv, q, k, v      # [3C] buffer of the last block run; q/k/v [H, 1, D] views
    cdef readonly object lock              # hold it for a whole step when threads share the plan
    cdef float* qkv_p
    cdef float* a_p
    cdef float* o_p
    cdef float* f_p
    cdef double* w_p
    cdef float* parts_p
    cdef double* acc_p

    def __cinit__(self, list blocks, wte, wpe, ln_f_g, ln_f_b, lm_head_t, int n_head, double eps,
                  long split_min=1 << 21, long attn_split_min=1 << 16, str wdtype="float32"):
        cdef int L = len(blocks), l, kind
        V, C = wte.shape
        if L == 0 or C % n_head:
            raise ValueError("DecodePlan: need n_layer >= 1 and n_embd divisible by n_head")
        self.n_layer, self.n_embd, self.n_head, self.vocab_size = L, C, n_head, V
        self.head_dim, self.n_inner, self.n_positions = C // n_head, 4 * C, wpe.shape[0]
        self.eps, self.scale = eps, 1.0 / sqrt(<double>(C // n_head))
        self.split_min, self.attn_split_min = split_min, attn_split_min
        self.n_threads = max(1, openmp.omp_get_num_procs(), openmp.omp_get_max_threads())
        self.keep = []
        self.lock = threading.Lock()
        if wdtype not in WEIGHT_KINDS:
            raise ValueError(f"DecodePlan: wdtype must be one of {', '.join(WEIGHT_KINDS)}, got {wdtype!r}")
        self.wkind = kind = WEIGHT_KINDS[wdtype]
        F = 4 * C
        if kind == W_F32:
            self.wte = _ptr(self.keep, wte, (V, C), "wte")
        else:                                                      # rows [V, C]: _wptr's [out, in] of (C, V)
            self.wte = _wptr(self.keep, wte, (C, V), "wte", kind)
        self.wpe = _ptr(self.keep, wpe, (self.n_positions, C), "wpe")
        self.ln_f_g = _ptr(self.keep, ln_f_g, (C,), "ln_f.weight")
        self.ln_f_b = _ptr(self.keep, ln_f_b, (C,), "ln_f.bias")
        self.lm_head_t = _wptr(self.keep, lm_head_t, (C, V), "lm_head (transposed)", kind)
        self.blocks = <BlockW*>malloc(L * sizeof(BlockW))
        if self.blocks == NULL:
            raise MemoryError()
        shapes = [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,), (C, F), (F,), (F, C), (C,)]
        for l in range(L):
            b = blocks[l]
            if len(b) != 12:
                raise ValueError("DecodePlan: a block needs 12 arrays")
            self.blocks[l].ln_1_g = _ptr(self.keep, b[0], shapes[0], f"h.{l}.ln_1.weight")
            self.blocks[l].ln_1_b = _ptr(self.keep, b[1], shapes[1], f"h.{l}.ln_1.bias")
            self.blocks[l].c_attn_w = _wptr(self.keep, b[2], shapes[2], f"h.{l}.attn.c_attn.weight", kind)
            self.blocks[l].c_attn_b = _ptr(self.keep, b[3], shapes[3], f"h.{l}.attn.c_attn.bias")
            self.blocks[l].attn_c_proj_w = _wptr(self.keep, b[4], shapes[4], f"h.{l}.attn.c_proj.weight", kind)
            self.blocks[l].attn_c_proj_b = _ptr(self.keep, b[5], shapes[5], f"h.{l}.attn.c_proj.bias")
            self.blocks[l].ln_2_g = _ptr(self.keep, b[6], shapes[6], f"h.{l}.ln_2.weight")
            self.blocks[l].ln_2_b = _ptr(self.keep, b[7], shapes[7], f"h.{l}.ln_2.bias")
            self.blocks[l].c_fc_w = _wptr(self.keep, b[8], shapes[8], f"h.{l}.mlp.c_fc.weight", kind)
            self.blocks[l].c_fc_b = _ptr(self.keep, b[9], shapes[9], f"h.{l}.mlp.c_fc.bias")
            self.blocks[l].mlp_c_proj_w = _wptr(self.keep, b[10], shapes[10], f"h.{l}.mlp.c_proj.weight", kind)
            self.blocks[l].mlp_c_proj_b = _ptr(self.keep, b[11], shapes[11], f"h.{l}.mlp.c_proj.bias")
        H, D = n_head, C // n_head
        self.qkv = np.zeros(3 * C, dtype=np.float32)
        self.q = self.qkv[:C].reshape(H, 1, D)
        self.k = self.qkv[C:2 * C].reshape(H, 1, D)
        self.v = self.qkv[2 * C:].reshape(H, 1, D)
        scratch = [np.zeros(C, np.float32), np.zeros(C, np.float32), np.zeros(F, np.float32),
                   np.zeros(self.n_threads * max(self.n_positions, 1), np.float64),
                   np.zeros(self.n_threads * D, np.float64)]
        self.keep.extend(scratch)
        parts = np.zeros(self.n_threads * max(V, F, 3 * C), np.float32)     # split products' partial sums
        self.keep.append(parts)
        cdef float[::1] m_parts = parts
        self.parts_p = &m_parts[0]
        cdef float[::1] m_qkv = self.qkv, m_a = scratch[0], m_o = scratch[1], m_f = scratch[2]
        cdef double[::1] m_w = scratch[3], m_acc = scratch[4]
        self.qkv_p, self.a_p, self.o_p, self.f_p = &m_qkv[0], &m_a[0], &m_o[0], &m_f[0]
        self.w_p, self.acc_p = &m_w[0], &m_acc[0]

    def __dealloc__(self):
        free(self.blocks)

    cdef void _block(self, int l, float* x, float* kv_l, Py_ssize_t n_ctx, Py_ssize_t pos) noexcept nogil:
        """Block l+1 for one token at ``pos``: x [C] in place; K/V written into kv_l, the layer's
        cache [2, H, n_ctx, D]."""
        cdef const BlockW* bw = &self.blocks[l]
        cdef Py_ssize_t C = self.n_embd, H = self.n_head, D = self.head_dim, F = self.n_inner, h, j
        cdef Py_ssize_t plane = H * n_ctx * D
        cdef float* kh
        cdef float* vh
        cdef int nt, tid
        ln_row(x, bw.ln_1_g, bw.ln_1_b, self.a_p, C, self.eps)
        memcpy(self.qkv_p, bw.c_attn_b, 3 * C * sizeof(float))
        self._wgemv(bw.c_attn_w, <int>C, <int>(3 * C), self.a_p, self.qkv_p, 1.0)
        nt = openmp.omp_get_max_threads()
        if nt > self.n_threads:
            nt = self.n_threads
        if nt < 2 or H * (pos + 1) * D < self.attn_split_min:
            nt = 1
        for h in prange(H, num_threads=nt, schedule="static"):   # per head: write K/V, attend
            tid = openmp.omp_get_thread_num()
            kh = kv_l + h * n_ctx * D
            vh = kv_l + plane + h * n_ctx * D
            memcpy(kh + pos * D, self.qkv_p + C + h * D, D * sizeof(float))
            memcpy(vh + pos * D, self.qkv_p + 2 * C + h * D, D * sizeof(float))
            attend_one(self.qkv_p + h * D, kh, vh, D, D, pos + 1, D, self.scale,
                       self.w_p + tid * self.n_positions, self.acc_p + tid * D, self.o_p + h * D)
        for j in range(C):
            x[j] += bw.attn_c_proj_b[j]
        self._wgemv(bw.attn_c_proj_w, <int>C, <int>C, self.o_p, x, 1.0)      # x += o @ c_proj
        ln_row(x, bw.ln_2_g, bw.ln_2_b, self.a_p, C, self.eps)
        memcpy(self.f_p, bw.c_fc_b, F * sizeof(float))
        self._wgemv(bw.c_fc_w, <int>C, <int>F, self.a_p, self.f_p, 1.0)
        for j in range(F):
            self.f_p[j] = gelu1(self.f_p[j])
        for j in range(C):
            x[j] += bw.mlp_c_proj_b[j]
        self._wgemv(bw.mlp_c_proj_w, <int>F, <int>C, self.f_p, x, 1.0)       # x += gelu(..) @ c_proj

    cdef inline void _gemv(self, const float* W, int K, int N, const float* x, float* y,
                           float beta) noexcept nogil:
        """y = x @ W + beta * y with this plan's split threshold, threads and partial sums."""
        gemv_par(W, K, N, x, y, beta, self.split_min, self.n_threads, self.parts_p)

    cdef inline void _wgemv(self, const void* W, int K, int N, const float* x, float* y,
                            float beta) noexcept nogil:
        """``_gemv`` for one of the model's weight matrices, in the plan's weight type: BLAS for
        float32, the half-precision kernel (``hgemv_par``) for float16 / bfloat16."""
        if self.wkind == W_F32:
            gemv_par(<const float*>W, K, N, x, y, beta, self.split_min, self.n_threads, self.parts_p)
        else:
            hgemv_par(<const uint16_t*>W, self.wkind, K, N, x, y, beta, self.split_min,
                      min(openmp.omp_get_max_threads(), self.n_threads))

    cdef float* _layer_cache(self, float[:, :, :, :, ::1] kv, int l, Py_ssize_t pos) except NULL:
        if kv.shape[0] != self.n_layer or kv.shape[1] != 2 or kv.shape[2] != self.n_head \
                or kv.shape[4] != self.head_dim:
            raise ValueError("DecodePlan: the KV cache does not match the model")
        if not (0 <= pos < kv.shape[3]) or pos >= self.n_positions:
            raise ValueError(f"DecodePlan: position {pos} is outside the cache")
        if not (0 <= l < self.n_layer):
            raise ValueError(f"DecodePlan: no block {l}")
        return &kv[l, 0, 0, 0, 0]

    def embed(self, Py_ssize_t token, Py_ssize_t pos, float[::1] x):
        """x [C] = wte[token] + wpe[pos] (twin of ``model.embed``)."""
        if not (0 <= token < self.vocab_size and 0 <= pos < self.n_positions) or x.shape[0] != self.n_embd:
            raise ValueError("DecodePlan.embed: token, position or buffer out of range")
        self._embed(token, pos, &x[0])

    cdef void _embed(self, Py_ssize_t token, Py_ssize_t pos, float* x) noexcept nogil:
        """x [C] = wte[token] + wpe[pos], a half-precision row converted exactly first."""
        cdef Py_ssize_t j, C = self.n_embd
        if self.wkind == W_F32:
            for j in range(C):
                x[j] = (<const float*>self.wte)[token * C + j] + self.wpe[pos * C + j]
        else:
            mdt_half_run(<const uint16_t*>self.wte + token * C, x, C, self.wkind)
            for j in range(C):
                x[j] = x[j] + self.wpe[pos * C + j]

    def block(self, int l, float[::1] x, float[::1] x_prev, float[:, :, :, :, ::1] kv, Py_ssize_t pos):
        """Run block l+1 (0-based ``l``) for one token at ``pos``: copies x [C] into x_prev [C],
        updates x in place, writes the token's K/V of that block into kv [n_layer, 2, H, n_ctx,
        D] and leaves its q|k|v in ``self.qkv``. Attends to positions 0..pos of the cache."""
        cdef float* kv_l = self._layer_cache(kv, l, pos)
        if x.shape[0] != self.n_embd or x_prev.shape[0] != self.n_embd:
            raise ValueError("DecodePlan.block: x and x_prev must have n_embd values")
        memcpy(&x_prev[0], &x[0], self.n_embd * sizeof(float))
        self._block(l, &x[0], kv_l, kv.shape[3], pos)

    def blocks_range(self, int l0, int l1, float[::1] x, float[:, :, :, :, ::1] kv, Py_ssize_t pos):
        """Blocks l0+1..l1 (0-based l0 <= l < l1) for one token, as repeated ``block`` calls."""
        cdef int l
        if x.shape[0] != self.n_embd:
            raise ValueError("DecodePlan.blocks_range: x must have n_embd values")
        for l in range(l0, l1):
            self._block(l, &x[0], self._layer_cache(kv, l, pos), kv.shape[3], pos)

    def head(self, const float[::1] x, float[::1] logits):
        """logits [V] = ln_f(x [C]) @ lm_head^T (twin of ``final_norm`` + ``lm_head``)."""
        if x.shape[0] != self.n_embd or logits.shape[0] != self.vocab_size:
            raise ValueError("DecodePlan.head: x must have n_embd values and logits vocab_size")
        self._head(&x[0], &logits[0])

    cdef void _head(self, const float* x, float* logits) noexcept nogil:
        ln_row(x, self.ln_f_g, self.ln_f_b, self.a_p, self.n_embd, self.eps)
        self._wgemv(self.lm_head_t, self.n_embd, self.vocab_size, self.a_p, logits, 0.0)

    def step_adept(self, ExitPlan ep, Py_ssize_t token, Py_ssize_t pos, float[:, :, :, :, ::1] kv,
                   int first, double cut, float[::1] logits):
        """One whole decode step of a token under ADEPT's learned exits, in one call: embed, then
        blocks 1..L, the gate after each block k with first <= k < L (exit when the policy's logit
        ``adept_logit_row`` > ``cut`` = log(tau / (1 - tau))); at an exit, the K/V of blocks k+1..L
        from h_k by the folded propagation weights of ``ep`` written into ``kv`` at ``pos``, then
        the exit map (if any) and the LM head into logits [V]. Twin of ``fused.decode_one``'s loop
        with ``Adept.decide``, ``Engine._propagate`` (eager, ``StackedKV``) and ``predict_one``.
        Returns the exit layer (n_layer for none)."""
        cdef Py_ssize_t C = self.n_embd, n_ctx = kv.shape[3]
        cdef int L = self.n_layer, l, k = self.n_layer
        cdef float* kv_l[64]
        if ep.n_layer != L or ep.n_embd != C:
            raise ValueError("DecodePlan.step_adept: the exit plan is for another model")
        if logits.shape[0] != self.vocab_size:
            raise ValueError("DecodePlan.step_adept: logits must have vocab_size values")
        if L > 64:
            raise ValueError("DecodePlan.step_adept: at most 64 layers")
        if not (0 <= token < self.vocab_size):
            raise ValueError("DecodePlan.step_adept: token out of range")
        for l in range(L):
            kv_l[l] = self._layer_cache(kv, l, pos)
        for l in range(max(first, 1) - 1, L - 1):
            if not ep.ready[l]:
                raise ValueError(f"DecodePlan.step_adept: exit layer {l + 1} has no weights")
        cdef float* x = ep.x_p
        cdef float* xp = ep.xprev_p
        with nogil:
            self._embed(token, pos, x)
            for l in range(L):
                memcpy(xp, x, C * sizeof(float))
                self._block(l, x, kv_l[l], n_ctx, pos)
                if l + 1 >= first and l + 1 < L:
                    if adept_logit_row(x, xp, C, ep.pw[l], ep.pb[l], 1e-5) > cut:
                        k = l + 1
                        break
            if k < L:
                self._propagate(ep, k, x, kv_l, n_ctx, pos)
                if ep.ew[k - 1] != NULL:
                    memcpy(ep.hm_p, ep.eb[k - 1], C * sizeof(float))
                    self._gemv(ep.ew[k - 1], <int>C, <int>C, x, ep.hm_p, 1.0)
                    x = ep.hm_p
            self._head(x, &logits[0])
        return k

    cdef void _propagate(self, ExitPlan ep, int k, const float* h, float** kv_l, Py_ssize_t n_ctx,
                         Py_ssize_t pos) noexcept nogil:
        """K/V of blocks k+1..L of a token that exited at k with state h [C]: y = normalize(h) @ A_k
        + d_k (one product over all skipped blocks), scattered into each block's cache row."""
        cdef Py_ssize_t C = self.n_embd, H = self.n_head, D = self.head_dim, m, s, hd, j
        cdef int M = self.n_layer - k, N = <int>(2 * C * M)
        cdef double mean = 0.0, var = 0.0, inv, t
        for j in range(C):
            mean += h[j]
        mean /= C
        for j in range(C):
            t = h[j] - mean
            var += t * t
        inv = 1.0 / sqrt(var / C + self.eps)
        for j in range(C):
            ep.n_p[j] = <float>((h[j] - mean) * inv)
        memcpy(ep.y_p, ep.d[k - 1], N * sizeof(float))
        gemv(ep.A[k - 1], <int>C, N, N, ep.n_p, ep.y_p, 1.0)
        for m in range(M):                    # block k+1+m: K then V, heads in order
            for s in range(2):
                for hd in range(H):
                    memcpy(kv_l[k + m] + (s * H + hd) * n_ctx * D + pos * D,
                           ep.y_p + m * 2 * C + s * C + hd * D, D * sizeof(float))


cdef class ExitPlan:
    """ADEPT's learned exits in the form ``DecodePlan.step_adept`` runs: per exit layer k
    (1..L-1, index k-1) the policy's weights w [C + 2] and bias, the exit map (W [C, C], b [C], or
    None for the identity) and the folded propagation weights (A_k [C, (L-k) 2C], d_k [(L-k) 2C],
    ``propagate.StackedKV.weights``; None for a layer no token exits at). float32 copies are kept
    alive here; the scratch is the plan's own, so hold the DecodePlan's lock for a step."""
    cdef readonly int n_layer, n_embd
    cdef list keep
    cdef const float** pw
    cdef double* pb
    cdef const float** ew
    cdef const float** eb
    cdef const float** A
    cdef const float** d
    cdef bint* ready
    cdef float* x_p
    cdef float* xprev_p
    cdef float* hm_p
    cdef float* n_p
    cdef float* y_p

    def __cinit__(self, int n_layer, int n_embd, policy_w, policy_b, exit_w, exit_b, list A, list d):
        cdef int L = n_layer, C = n_embd, k
        if L < 1 or C < 1 or len(A) != L - 1 or len(d) != L - 1:
            raise ValueError("ExitPlan: need n_layer - 1 propagation weights")
        self.n_layer, self.n_embd, self.keep = L, C, []
        self.pw = <const float**>malloc(max(L, 1) * sizeof(float*))
        self.ew = <const float**>malloc(max(L, 1) * sizeof(float*))
        self.eb = <const float**>malloc(max(L, 1) * sizeof(float*))
        self.A = <const float**>malloc(max(L, 1) * sizeof(float*))
        self.d = <const float**>malloc(max(L, 1) * sizeof(float*))
        self.pb = <double*>malloc(max(L, 1) * sizeof(double))
        self.ready = <bint*>malloc(max(L, 1) * sizeof(bint))
        if not (self.pw and self.ew and self.eb and self.A and self.d and self.pb and self.ready):
            raise MemoryError()
        pb = np.asarray(policy_b, dtype=np.float64).reshape(-1)
        if pb.shape[0] != L - 1:
            raise ValueError(f"ExitPlan: policy_b has {pb.shape[0]} values, expected {L - 1}")
        for k in range(L - 1):
            self.pw[k] = _ptr(self.keep, policy_w[k], (C + 2,), f"policy_w[{k}]")
            self.pb[k] = pb[k]
            if exit_w is None:
                self.ew[k] = NULL
                self.eb[k] = NULL
            else:
                self.ew[k] = _ptr(self.keep, exit_w[k], (C, C), f"exit_w[{k}]")
                self.eb[k] = _ptr(self.keep, exit_b[k], (C,), f"exit_b[{k}]")
            self.ready[k] = A[k] is not None
            if A[k] is None:
                self.A[k] = NULL
                self.d[k] = NULL
            else:
                self.A[k] = _ptr(self.keep, A[k], (C, 2 * C * (L - 1 - k)), f"A[{k}]")
                self.d[k] = _ptr(self.keep, d[k], (2 * C * (L - 1 - k),), f"d[{k}]")
        scratch = [np.zeros(C, np.float32) for _ in range(4)] + [np.zeros(max(1, 2 * C * (L - 1)), np.float32)]
        self.keep.extend(scratch)
        cdef float[::1] m0 = scratch[0], m1 = scratch[1], m2 = scratch[2], m3 = scratch[3], m4 = scratch[4]
        self.x_p, self.xprev_p, self.hm_p, self.n_p, self.y_p = &m0[0], &m1[0], &m2[0], &m3[0], &m4[0]

    def __dealloc__(self):
        free(self.pw)
        free(self.ew)
        free(self.eb)
        free(self.A)
        free(self.d)
        free(self.pb)
        free(self.ready)
