# cython: language_level=3
"""Cython twins of minadept's hot non-matmul array loops (compiled to ``minadept._kernels``).

Each function is a drop-in twin of a NumPy function named in its docstring and is property-tested
against it (tests/test_kernels.py). Matrix products stay in BLAS, through NumPy. float32 in and
out; reductions accumulate in double. The row primitives (``ln_row``, ``exp_approx``, ``gelu1``,
``attend_one``) live in ``common.pxi``, shared with the fused decode step (``decode.pyx``).
Bounds/wraparound checks are off unless the package was built with MINADEPT_BOUNDSCHECK=1.
"""
import numpy as np
from cython.parallel import prange
cimport openmp
from libc.math cimport exp

ctypedef const float[:, ::1] cmat

include "common.pxi"


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
    with nogil:
        for i in range(N):
            out[i] = adept_logit_row(&h[i, 0], &h_prev[i, 0], C, &w[0], b, eps)
    return out_arr



# ----------------------------------------------------------------------------- half-precision weights

#: The float16 conversion compiled in: "f16c" (the hardware instruction, when the compiler targets
#: a CPU that has it) or "scalar" (the portable integer conversion). bfloat16 is always a shift.
HALF_CONVERSION = MINADEPT_HALF_CONVERSION.decode()
#: Weight codes of the half-precision kernels (``halfprec.KINDS``).
KIND_FLOAT16, KIND_BFLOAT16 = W_F16, W_BF16
#: ``half_matmul`` takes at most this many rows.
HALF_MAX_ROWS = HMAX_ROWS


def _whole(name, v):
    """``v`` as a Python int when it is an integer (int or NumPy integer, not bool), else TypeError:
    a float is never truncated."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"half kernels: {name} must be an integer, got {type(v).__name__} {v!r}")
    return int(v)


def _kind(kind):
    kind = _whole("kind", kind)
    if kind != W_F16 and kind != W_BF16:
        raise ValueError(f"half kernels: kind must be {W_F16} (float16) or {W_BF16} (bfloat16), got {kind}")
    return kind


def half_gemv(const uint16_t[:, ::1] W not None, kind, const float[::1] x not None, float[::1] y not None,
              float beta=0.0, threads=1, long split_min=0):
    """In place: y [N] = W [N, K] @ x [K] + beta * y, i.e. ``x @ W.T``, W half-precision bit
    patterns (uint16, row-major [out, in]: each output's K weights contiguous; ``kind`` 1 float16,
    2 bfloat16), converted in registers, products and sums in float32 in half.h's order (the fused
    decode step's product). ``threads`` > 1 splits the outputs over that many OpenMP threads
    (whatever OMP_NUM_THREADS says) when W has at least ``split_min`` weights; the result is the
    same. Twin: ``W.astype(float64) @ x``. Raises ValueError for mismatched lengths or x and y
    sharing memory, TypeError for a kind or thread count that is not an integer."""
    cdef Py_ssize_t N = W.shape[0], K = W.shape[1], j
    cdef int kd = _kind(kind), nt = max(1, _whole("threads", threads))
    if x.shape[0] != K or y.shape[0] != N:
        raise ValueError(f"half_gemv: W is [{N}, {K}] ([out, in]), x has {x.shape[0]} values, y {y.shape[0]}")
    if K and N and <const char*>&x[0] < <const char*>(&y[0] + N) and <const char*>&y[0] < <const char*>(&x[0] + K):
        raise ValueError("half_gemv: x and y share memory (y is written while x is read)")
    if N == 0:
        return
    if K == 0:                                  # empty sums
        for j in range(N):
            y[j] = 0.0 if beta == 0.0 else beta * y[j]
        return
    with nogil:
        hgemv_par(&W[0, 0], kd, <int>K, <int>N, &x[0], &y[0], beta, split_min, nt)


def half_matmul(const float[:, ::1] X not None, const uint16_t[:, ::1] W not None, kind, threads=0,
                long split_min=1 << 19):
    """X [R, K] float32 @ W.T -> new [R, N] float32, W [N, K] half-precision bit patterns
    ([out, in]), for R <= HALF_MAX_ROWS: each row's sums bit-identical to ``half_gemv``'s (each
    weight row converted once and dotted with every row of X, so W is read from memory once: a
    short prefill, and a prompt's LM head, without an upcast copy of W). The outputs are split
    over ``threads`` OpenMP threads (0: as many as OpenMP may use now) when W has at least
    ``split_min`` weights. Raises ValueError for mismatched shapes or too many rows, MemoryError
    when its scratch (threads x K floats) cannot be allocated, TypeError for a kind or thread
    count that is not an integer."""
    cdef Py_ssize_t R = X.shape[0], N = W.shape[0], K = W.shape[1]
    cdef int rc, kd = _kind(kind), th = _whole("threads", threads)
    if X.shape[1] != K or R > HMAX_ROWS:
        raise ValueError(f"half_matmul: X is [{R}, {X.shape[1]}] (at most {HMAX_ROWS} rows), W [{N}, {K}] ([out, in])")
    out_arr = np.zeros((R, N), dtype=np.float32)
    if R == 0 or N == 0 or K == 0:
        return out_arr
    cdef float[:, ::1] out = out_arr
    cdef int nt = th if th > 0 else openmp.omp_get_max_threads()
    with nogil:
        rc = hgemm_par(&W[0, 0], kd, K, N, &X[0, 0], R, &out[0, 0], split_min, nt)
    if rc != 0:
        raise MemoryError("half_matmul: no memory for the converted weight rows")
    return out_arr


def half_to_float32(bits_arr, kind):
    """Half-precision bit patterns (a uint16 ndarray, any shape, C-contiguous) -> new float32 array
    of the same shape, exactly for every non-NaN value (the compiled-in float16 conversion, or the
    bfloat16 shift; F16C quiets a signalling NaN, which checked weights never hold). Raises
    TypeError for anything but an ndarray, ValueError for another dtype or layout."""
    cdef int kd = _kind(kind)
    if not isinstance(bits_arr, np.ndarray):
        raise TypeError(f"half_to_float32: need a uint16 ndarray, got {type(bits_arr).__name__}")
    cdef const uint16_t[::1] bits = bits_arr.reshape(-1)
    out_arr = np.empty(bits_arr.shape, dtype=np.float32)
    cdef float[::1] out = out_arr.reshape(-1)
    cdef Py_ssize_t n = bits.shape[0]
    if n:
        with nogil:
            mdt_half_run(&bits[0], &out[0], n, kd)
    return out_arr


def f16_to_float32_portable(const uint16_t[::1] bits):
    """float16 bit patterns [n] -> new float32 [n] through the portable conversion (the path of a
    build without F16C), whatever this build uses."""
    out_arr = np.empty(bits.shape[0], dtype=np.float32)
    cdef float[::1] out = out_arr
    if bits.shape[0]:
        with nogil:
            mdt_f16_run_portable(&bits[0], &out[0], bits.shape[0])
    return out_arr
