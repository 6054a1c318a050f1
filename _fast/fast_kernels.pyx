# cython: language_level=3
"""Cython twins of minadept's hot non-matmul loops (compiled to ``minadept._fast_kernels``).

Each function is a drop-in twin of a NumPy function named in its docstring and is property-tested
against it (tests/test_kernels.py). Matrix products stay in BLAS: through NumPy in the array
kernels, and through SciPy's BLAS interface for Cython (``scipy.linalg.cython_blas``) in the
fused single-token decode step (``DecodePlan``), which must not pay Python per product. float32 in
and out; reductions accumulate in double. Bounds/wraparound checks are off unless the package was
built with MINADEPT_BOUNDSCHECK=1.
"""
import threading

import numpy as np
from cython.parallel import prange
cimport openmp
from libc.math cimport INFINITY, exp, expf, log, sqrt
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport sgemv as blas_sgemv

ctypedef const float[:, ::1] cmat


# ----------------------------------------------------------------------------- row primitives
# Each is used by an array kernel below (and so covered by its property test) and by DecodePlan.

cdef inline void ln_row(const float* x, const float* g, const float* b, float* out, Py_ssize_t C,
                        double eps) noexcept nogil:
    """LayerNorm of one row x [C] -> out [C] (may alias x). Mean and centred variance in double,
    each as four partial sums (vectorised)."""
    cdef Py_ssize_t j
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0, mean, var, d0, d1, d2, d3, inv
    j = 0
    while j + 4 <= C:
        s0 = s0 + x[j]
        s1 = s1 + x[j + 1]
        s2 = s2 + x[j + 2]
        s3 = s3 + x[j + 3]
        j = j + 4
    while j < C:
        s0 = s0 + x[j]
        j = j + 1
    mean = ((s0 + s1) + (s2 + s3)) / C
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    j = 0
    while j + 4 <= C:
        d0 = x[j] - mean
        d1 = x[j + 1] - mean
        d2 = x[j + 2] - mean
        d3 = x[j + 3] - mean
        s0 = s0 + d0 * d0
        s1 = s1 + d1 * d1
        s2 = s2 + d2 * d2
        s3 = s3 + d3 * d3
        j = j + 4
    while j < C:
        d0 = x[j] - mean
        s0 = s0 + d0 * d0
        j = j + 1
    var = ((s0 + s1) + (s2 + s3)) / C
    inv = 1.0 / sqrt(var + eps)
    for j in range(C):
        out[j] = <float>((x[j] - mean) * inv) * g[j] + b[j]


cdef union f32bits:
    float f
    int i


cdef inline float exp_approx(float x) noexcept nogil:
    """e^x in single precision: Cody-Waite range reduction and Cephes' ``expf`` polynomial
    (within 2 ulp of e^x on [-87, 88]; e^-87 down to -104, where single precision underflows to 0;
    inf above 88.72; NaN stays NaN). Branch-free, so that GCC vectorises the loops calling it;
    libm's ``expf`` is a scalar call."""
    cdef float t, n, r, p, x0 = x
    cdef f32bits bits
    x = <float>88.0 if x > <float>88.0 else x
    x = -<float>87.0 if x < -<float>87.0 else x
    t = x * <float>1.44269504088896341 + <float>12582912.0          # 1.5 * 2^23: rounds x / ln 2 to an integer n
    n = t - <float>12582912.0
    r = x - n * <float>0.693359375
    r = r + n * <float>2.12194440e-4
    p = <float>1.9875691500e-4
    p = p * r + <float>1.3981999507e-3
    p = p * r + <float>8.3334519073e-3
    p = p * r + <float>4.1665795894e-2
    p = p * r + <float>1.6666665459e-1
    p = p * r + <float>5.0000001201e-1
    p = p * r * r + r + <float>1.0
    bits.f = t
    bits.i = (bits.i - 0x4B400000 + 127) << 23      # 2^n from the integer bits of t
    p = p * bits.f
    p = INFINITY if x0 > <float>88.72 else p          # beyond float range: inf and 0, as exp does
    return <float>0.0 if x0 < -<float>103.98 else p


cdef inline float gelu1(float v) noexcept nogil:
    """GELU (tanh form) of one value: 0.5 v (1 + tanh(u)) = v / (1 + exp(-2u)),
    u = sqrt(2/pi) (v + 0.044715 v^3), in single precision with ``exp_approx``."""
    return v / (<float>1.0 + exp_approx(-<float>1.5957691216057308 * (v + <float>0.044715 * v * v * v)))


cdef inline void attend_one(const float* q, const float* k, const float* v, Py_ssize_t ks,
                            Py_ssize_t vs, Py_ssize_t n, Py_ssize_t D, double scale,
                            double* w, double* acc, float* out) noexcept nogil:
    """One query q [D] over keys/values k, v [n, D] (row strides ks, vs in floats, rows
    contiguous): stable softmax of scale * q.k, weighted sum of v -> out [D]. Scores and sums in
    double (four partial sums per dot product break the add chain); the exponentials of the
    differences to the maximum in single precision (``exp_approx``, vectorised). w [n], acc [D]
    are scratch."""
    cdef Py_ssize_t s, d
    cdef double m = -1e300, z = 0.0, a0, a1, a2, a3, x
    cdef const float* kr
    cdef const float* vr
    for s in range(n):
        kr = k + s * ks
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        a3 = 0.0
        d = 0
        while d + 4 <= D:
            a0 = a0 + <double>q[d] * kr[d]
            a1 = a1 + <double>q[d + 1] * kr[d + 1]
            a2 = a2 + <double>q[d + 2] * kr[d + 2]
            a3 = a3 + <double>q[d + 3] * kr[d + 3]
            d = d + 4
        while d < D:
            a0 = a0 + <double>q[d] * kr[d]
            d = d + 1
        x = ((a0 + a1) + (a2 + a3)) * scale
        w[s] = x
        if x > m:
            m = x
    for s in range(n):                                   # vectorised exponentials
        w[s] = exp_approx(<float>(w[s] - m))
    for s in range(n):
        z = z + w[s]
    for d in range(D):
        acc[d] = 0.0
    for s in range(n):
        vr = v + s * vs
        x = w[s]
        for d in range(D):
            acc[d] = acc[d] + x * vr[d]
    for d in range(D):
        out[d] = <float>(acc[d] / z)


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


# ----------------------------------------------------------------------------- array kernels

def layer_norm(cmat x, const float[::1] g, const float[::1] b, double eps):
    """Twin of ``nn.layer_norm`` for x [N, C] float32 (C-contiguous rows) -> new [N, C]."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i
    if g.shape[0] != C or b.shape[0] != C:
        raise ValueError(f"layer_norm: x has {C} values per row, g {g.shape[0]}, b {b.shape[0]}")
    out_arr = np.empty((N, C), dtype=np.float32)
    cdef float[:, ::1] out = out_arr
    if N == 0 or C == 0:
        return out_arr
    with nogil:
        for i in range(N):
            ln_row(&x[i, 0], &g[0], &b[0], &out[i, 0], C, eps)
    return out_arr


def gelu_tanh(cmat x):
    """Twin of ``nn.gelu_tanh`` for x [N, M] float32 -> new [N, M]."""
    cdef Py_ssize_t N = x.shape[0], M = x.shape[1], i, j
    out_arr = np.empty((N, M), dtype=np.float32)
    cdef float[:, ::1] out = out_arr
    with nogil:
        for i in range(N):
            for j in range(M):
                out[i, j] = gelu1(x[i, j])
    return out_arr


def attention(const float[:, :, :] q, const float[:, :, :] k, const float[:, :, :] v,
              const long[::1] q_pos):
    """Twin of ``nn.attention_numpy``: causal attention of q [H, T, D] at positions q_pos [T]
    over k, v [H, S, D] (any strides, e.g. a KV-cache slice; copied if a row is not contiguous). Fused
    scores, mask, stable softmax and weighted sum, accumulated in double (compare with
    ``attention_numpy(..., np.float64)``); one OpenMP task per (head, query) for large jobs.
    Returns [H, T, D] float32."""
    cdef Py_ssize_t H = q.shape[0], T = q.shape[1], D = q.shape[2], S = k.shape[1]
    if k.shape[0] != H or v.shape[0] != H or k.shape[2] != D or v.shape[2] != D or v.shape[1] != S \
            or q_pos.shape[0] != T:
        raise ValueError(f"attention: q {tuple(q.shape)[:3]}, k {tuple(k.shape)[:3]}, v {tuple(v.shape)[:3]} "
                         f"and {q_pos.shape[0]} positions do not match")
    out_arr = np.zeros((H, T, D), dtype=np.float32)
    if H == 0 or T == 0 or D == 0 or S == 0:
        return out_arr
    cdef float[:, :, ::1] out = out_arr
    if k.strides[2] != 4 or v.strides[2] != 4:
        return attention(q, np.ascontiguousarray(k), np.ascontiguousarray(v), q_pos)
    qc_arr = np.ascontiguousarray(q)
    cdef const float[:, :, ::1] qc = qc_arr
    scratch_arr = np.empty((H * T, S), dtype=np.float64)
    acc_arr = np.empty((H * T, D), dtype=np.float64)
    cdef double[:, ::1] scratch = scratch_arr
    cdef double[:, ::1] accd = acc_arr
    cdef Py_ssize_t job, h, t, last
    cdef Py_ssize_t ks = k.strides[1] // 4, vs = v.strides[1] // 4
    cdef double scale = 1.0 / sqrt(<double>D)
    # OpenMP threads only for very large jobs: measured at 124M decode, waking them costs more
    # than it saves and they fight OpenBLAS's spinning threads (7.8 vs 40 tokens/s).
    cdef int nt = 1 if H * T * S * D < (1 << 24) else openmp.omp_get_max_threads()
    for job in prange(H * T, nogil=True, schedule="static", num_threads=nt):
        h = job // T
        t = job % T
        last = q_pos[t]
        if last > S - 1:
            last = S - 1
        attend_one(&qc[h, t, 0], &k[h, 0, 0], &v[h, 0, 0], ks, vs, last + 1, D, scale,
                   &scratch[job, 0], &accd[job, 0], &out[h, t, 0])
    return out_arr


def softmax_top2(cmat logits):
    """Twin of the ``confidence``/``margin`` measures: for logits [N, V] -> (top-1 probability,
    top-1 minus top-2 probability), each [N] float32, from a stable softmax per row (vectorised
    single-precision exponentials, summed in double)."""
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], i, j
    p1_arr = np.empty(N, dtype=np.float32)
    p2_arr = np.empty(N, dtype=np.float32)
    e_arr = np.empty(max(V, 1), dtype=np.float32)
    cdef float[::1] p1 = p1_arr, p2 = p2_arr
    cdef float[::1] ev = e_arr
    cdef float* e
    cdef float m1, m2, x
    cdef double z
    cdef const float* row
    e = &ev[0]
    with nogil:
        for i in range(N):
            row = &logits[i, 0]
            m1 = -INFINITY
            m2 = -INFINITY
            for j in range(V):
                x = row[j]
                if x > m1:
                    m2 = m1
                    m1 = x
                elif x > m2:
                    m2 = x
            for j in range(V):
                e[j] = exp_approx(row[j] - m1)
            z = 0.0
            for j in range(V):
                z += e[j]
            p1[i] = <float>(1.0 / z)
            p2[i] = <float>((1.0 - exp(<double>m2 - m1)) / z) if V > 1 else <float>(1.0 / z)
    return p1_arr, p2_arr


def causal_softmax(scores_arr, const long[::1] q_pos, double scale):
    """Twin of the masked softmax in ``nn.attention_numpy``, in place: raw scores q.k [H, T, S]
    float32 -> for each (head, query t) the softmax of ``scale * scores`` over keys s <= q_pos[t],
    and 0 for s > q_pos[t]. Differences to the row maximum in double, exponentials vectorised in
    single precision, sums in double. Single-threaded on purpose: prefill interleaves it with
    multi-threaded BLAS products, and a second thread pool spinning between them costs more than
    it saves."""
    cdef float[:, :, ::1] scores = scores_arr
    cdef Py_ssize_t H = scores.shape[0], T = scores.shape[1], S = scores.shape[2], h, t, s, last
    if q_pos.shape[0] != T:
        raise ValueError(f"causal_softmax: {q_pos.shape[0]} query positions for {T} queries")
    if scale <= 0:
        raise ValueError("causal_softmax: scale must be positive")
    cdef float* p
    cdef float m
    cdef double z
    cdef float inv
    with nogil:
        for h in range(H):
            for t in range(T):
                p = &scores[h, t, 0]
                last = q_pos[t]
                if last > S - 1:
                    last = S - 1
                m = p[0]
                for s in range(1, last + 1):
                    if p[s] > m:
                        m = p[s]
                for s in range(last + 1):
                    p[s] = exp_approx(<float>((<double>p[s] - m) * scale))
                z = 0.0
                for s in range(last + 1):
                    z += p[s]
                inv = <float>(1.0 / z)
                for s in range(last + 1):
                    p[s] = p[s] * inv
                for s in range(last + 1, S):
                    p[s] = 0.0
    return scores_arr


def cosine_rows(cmat a, cmat b):
    """Twin of the ``saturation`` measure: cosine of rows a[i], b[i] ([N, C]) -> [N] float32,
    clipped to [-1, 1]; a zero row gives 0."""
    cdef Py_ssize_t N = a.shape[0], C = a.shape[1], i, j
    if b.shape[0] != N or b.shape[1] != C:
        raise ValueError("cosine_rows: a and b must have the same shape")
    out_arr = np.empty(N, dtype=np.float32)
    cdef float[::1] out = out_arr
    cdef double ab, aa, bb, c
    with nogil:
        for i in range(N):
            ab = 0.0
            aa = 0.0
            bb = 0.0
            for j in range(C):
                ab += <double>a[i, j] * b[i, j]
                aa += <double>a[i, j] * a[i, j]
                bb += <double>b[i, j] * b[i, j]
            c = 0.0 if aa == 0 or bb == 0 else ab / (sqrt(aa) * sqrt(bb))   # NaN stays NaN
            out[i] = <float>(1.0 if c > 1.0 else (-1.0 if c < -1.0 else c))
    return out_arr


def adept_logit(cmat h, cmat h_prev, const float[::1] w, double b, double eps):
    """Twin of ``exits.adept.adept_logit_numpy``: the learned exit policy's logit for states
    h [N, C] after block k and h_prev [N, C] after block k-1, with weights w [C + 2] and bias b
    -> [N] float64: ``(h - mean) / sd . w[:C] + log(sd) w[C] + cos(h, h_prev) w[C+1] + b``,
    sd = sqrt(var + eps). One pass over each row, no temporaries (the ADEPT gating check)."""
    cdef Py_ssize_t N = h.shape[0], C = h.shape[1], i, j
    if h_prev.shape[0] != N or h_prev.shape[1] != C or w.shape[0] != C + 2:
        raise ValueError("adept_logit: shapes do not match")
    out_arr = np.empty(N, dtype=np.float64)
    cdef double[::1] out = out_arr
    cdef double s, x, y, d, dw, var, hp, hh, pp, mu, sd, cos
    with nogil:
        for i in range(N):
            s = 0.0
            hh = 0.0
            hp = 0.0
            pp = 0.0
            for j in range(C):                       # pass 1: mean and the cosine's sums
                x = h[i, j]
                y = h_prev[i, j]
                s += x
                hh += x * x
                hp += x * y
                pp += y * y
            mu = s / C
            var = 0.0
            dw = 0.0
            for j in range(C):                       # pass 2: centred variance and (h - mu) . w
                d = h[i, j] - mu
                var += d * d
                dw += d * w[j]
            sd = sqrt(var / C + eps)
            cos = hp / (sqrt(hh) * sqrt(pp)) if hh > 0 and pp > 0 else 0.0
            out[i] = dw / sd + log(sd) * w[C] + cos * w[C + 1] + b
    return out_arr


# ----------------------------------------------------------------------------- fused decode step

cdef struct BlockW:
    const float* ln_1_g
    const float* ln_1_b
    const float* c_attn_w
    const float* c_attn_b
    const float* attn_c_proj_w
    const float* attn_c_proj_b
    const float* ln_2_g
    const float* ln_2_b
    const float* c_fc_w
    const float* c_fc_b
    const float* mlp_c_proj_w
    const float* mlp_c_proj_b


cdef const float* _ptr(list keep, arr, tuple shape, str name) except NULL:
    """Pointer to a float32 C-contiguous copy-or-view of ``arr`` (kept alive in ``keep``)."""
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if a.shape != shape:
        raise ValueError(f"DecodePlan: {name} has shape {a.shape}, expected {shape}")
    keep.append(a)
    cdef const float[::1] m = a.reshape(-1)
    return &m[0]


cdef class DecodePlan:
    """The fused single-token decode step of one GPT-2 (twin of ``model.qkv`` + ``model.write_kv``
    + ``model.block_rest`` for T = 1, and of ``final_norm`` + ``lm_head``; see
    ``minadept/fused.py``). Holds pointers to the model's float32 weights and per-step scratch;
    every matrix-vector product is one BLAS ``sgemv``, everything else is C, so a block costs one
    Python call. The plan's scratch (and ``q``/``k``/``v``) is shared by all its calls, and the
    threaded loops release the GIL: threads sharing a plan must hold ``lock`` for a whole step
    (``Engine`` does).

    blocks: n_layer tuples of the 12 ``checkpoint.Block`` arrays in field order; lm_head_t [C, V].
    split_min: products with at least this many weights are split over the OpenMP threads;
    attn_split_min: attention is split by heads over them from this many H * keys * D values.
    """
    cdef BlockW* blocks
    cdef readonly int n_layer, n_embd, n_head, head_dim, n_inner, vocab_size, n_positions
    cdef double eps, scale
    cdef public long split_min, attn_split_min
    cdef int n_threads
    cdef const float* wte
    cdef const float* wpe
    cdef const float* ln_f_g
    cdef const float* ln_f_b
    cdef const float* lm_head_t
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
                  long split_min=1 << 21, long attn_split_min=1 << 16):
        cdef int L = len(blocks), l
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
        F = 4 * C
        self.wte = _ptr(self.keep, wte, (V, C), "wte")
        self.wpe = _ptr(self.keep, wpe, (self.n_positions, C), "wpe")
        self.ln_f_g = _ptr(self.keep, ln_f_g, (C,), "ln_f.weight")
        self.ln_f_b = _ptr(self.keep, ln_f_b, (C,), "ln_f.bias")
        self.lm_head_t = _ptr(self.keep, lm_head_t, (C, V), "lm_head (transposed)")
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
            self.blocks[l].c_attn_w = _ptr(self.keep, b[2], shapes[2], f"h.{l}.attn.c_attn.weight")
            self.blocks[l].c_attn_b = _ptr(self.keep, b[3], shapes[3], f"h.{l}.attn.c_attn.bias")
            self.blocks[l].attn_c_proj_w = _ptr(self.keep, b[4], shapes[4], f"h.{l}.attn.c_proj.weight")
            self.blocks[l].attn_c_proj_b = _ptr(self.keep, b[5], shapes[5], f"h.{l}.attn.c_proj.bias")
            self.blocks[l].ln_2_g = _ptr(self.keep, b[6], shapes[6], f"h.{l}.ln_2.weight")
            self.blocks[l].ln_2_b = _ptr(self.keep, b[7], shapes[7], f"h.{l}.ln_2.bias")
            self.blocks[l].c_fc_w = _ptr(self.keep, b[8], shapes[8], f"h.{l}.mlp.c_fc.weight")
            self.blocks[l].c_fc_b = _ptr(self.keep, b[9], shapes[9], f"h.{l}.mlp.c_fc.bias")
            self.blocks[l].mlp_c_proj_w = _ptr(self.keep, b[10], shapes[10], f"h.{l}.mlp.c_proj.weight")
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
        self._gemv(bw.c_attn_w, <int>C, <int>(3 * C), self.a_p, self.qkv_p, 1.0)
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
        self._gemv(bw.attn_c_proj_w, <int>C, <int>C, self.o_p, x, 1.0)       # x += o @ c_proj
        ln_row(x, bw.ln_2_g, bw.ln_2_b, self.a_p, C, self.eps)
        memcpy(self.f_p, bw.c_fc_b, F * sizeof(float))
        self._gemv(bw.c_fc_w, <int>C, <int>F, self.a_p, self.f_p, 1.0)
        for j in range(F):
            self.f_p[j] = gelu1(self.f_p[j])
        for j in range(C):
            x[j] += bw.mlp_c_proj_b[j]
        self._gemv(bw.mlp_c_proj_w, <int>F, <int>C, self.f_p, x, 1.0)        # x += gelu(..) @ c_proj

    cdef inline void _gemv(self, const float* W, int K, int N, const float* x, float* y,
                           float beta) noexcept nogil:
        """y = x @ W + beta * y with this plan's split threshold, threads and partial sums."""
        gemv_par(W, K, N, x, y, beta, self.split_min, self.n_threads, self.parts_p)

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
        cdef Py_ssize_t j, C = self.n_embd
        for j in range(C):
            x[j] = self.wte[token * C + j] + self.wpe[pos * C + j]

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
        ln_row(&x[0], self.ln_f_g, self.ln_f_b, self.a_p, self.n_embd, self.eps)
        self._gemv(self.lm_head_t, self.n_embd, self.vocab_size, self.a_p, &logits[0], 0.0)
