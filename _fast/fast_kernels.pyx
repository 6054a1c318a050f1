# cython: language_level=3
"""Cython twins of minadept's hot non-matmul loops (compiled to ``minadept._fast_kernels``).

Each function is a drop-in twin of a NumPy function named in its docstring and is property-tested
against it (tests/test_kernels.py). Matrix products stay in BLAS through NumPy. float32 in and
out; reductions accumulate in double. Bounds/wraparound checks are off unless the package was
built with MINADEPT_BOUNDSCHECK=1.
"""
import numpy as np
from cython.parallel import prange
cimport openmp
from libc.math cimport exp, log, sqrt, tanh

ctypedef const float[:, ::1] cmat
ctypedef const float[:, :, :] cten


def layer_norm(cmat x, const float[::1] g, const float[::1] b, double eps):
    """Twin of ``nn.layer_norm`` for x [N, C] float32 (C-contiguous rows) -> new [N, C]."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], i, j
    out_arr = np.empty((N, C), dtype=np.float32)
    cdef float[:, ::1] out = out_arr
    cdef double mean, var, d, inv
    with nogil:
        for i in range(N):
            mean = 0.0
            for j in range(C):
                mean += x[i, j]
            mean /= C
            var = 0.0
            for j in range(C):
                d = x[i, j] - mean
                var += d * d
            inv = 1.0 / sqrt(var / C + eps)
            for j in range(C):
                out[i, j] = <float>((x[i, j] - mean) * inv) * g[j] + b[j]
    return out_arr


def gelu_tanh(cmat x):
    """Twin of ``nn.gelu_tanh`` for x [N, M] float32 -> new [N, M]."""
    cdef Py_ssize_t N = x.shape[0], M = x.shape[1], i, j
    out_arr = np.empty((N, M), dtype=np.float32)
    cdef float[:, ::1] out = out_arr
    cdef double v
    with nogil:
        for i in range(N):
            for j in range(M):
                v = x[i, j]
                out[i, j] = <float>(0.5 * v * (1.0 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))))
    return out_arr


def attention(cten q, cten k, cten v, const long[::1] q_pos):
    """Twin of ``nn.attention_numpy``: causal attention of q [H, T, D] at positions q_pos [T]
    over k, v [H, S, D] (any strides, e.g. a KV-cache slice). Fused scores, mask, stable softmax
    and weighted sum, accumulated in double (compare with ``attention_numpy(..., np.float64)``);
    one OpenMP task per (head, query). Returns [H, T, D] float32."""
    cdef Py_ssize_t H = q.shape[0], T = q.shape[1], D = q.shape[2], S = k.shape[1]
    out_arr = np.zeros((H, T, D), dtype=np.float32)
    cdef float[:, :, ::1] out = out_arr
    scratch_arr = np.empty((H * T, S if S > 0 else 1), dtype=np.float64)
    acc_arr = np.empty((H * T, D if D > 0 else 1), dtype=np.float64)
    cdef double[:, ::1] scratch = scratch_arr
    cdef double[:, ::1] accd = acc_arr
    cdef Py_ssize_t job, h, t, s, d, last
    cdef double scale = 1.0 / sqrt(<double>D), m, z, acc, w
    # OpenMP threads only for very large jobs: measured at 124M decode, waking them costs more
    # than it saves and they fight OpenBLAS's spinning threads (7.8 vs 40 tokens/s).
    cdef int nt = 1 if H * T * S * D < (1 << 24) else openmp.omp_get_max_threads()
    for job in prange(H * T, nogil=True, schedule="static", num_threads=nt):
        h = job // T
        t = job % T
        last = q_pos[t]
        if last > S - 1:
            last = S - 1
        m = -1e300
        for s in range(last + 1):
            acc = 0.0
            for d in range(D):
                acc = acc + <double>q[h, t, d] * k[h, s, d]
            acc = acc * scale
            scratch[job, s] = acc
            if acc > m:
                m = acc
        z = 0.0
        for s in range(last + 1):
            w = exp(scratch[job, s] - m)
            scratch[job, s] = w
            z = z + w
        for d in range(D):
            accd[job, d] = 0.0
        for s in range(last + 1):
            w = scratch[job, s]
            for d in range(D):
                accd[job, d] += w * v[h, s, d]
        for d in range(D):
            out[h, t, d] = <float>(accd[job, d] / z)
    return out_arr


def softmax_top2(cmat logits):
    """Twin of the ``confidence``/``margin`` measures: for logits [N, V] -> (top-1 probability,
    top-1 minus top-2 probability), each [N] float32, from a stable softmax per row."""
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], i, j
    p1_arr = np.empty(N, dtype=np.float32)
    p2_arr = np.empty(N, dtype=np.float32)
    cdef float[::1] p1 = p1_arr, p2 = p2_arr
    cdef double m1, m2, z, x
    with nogil:
        for i in range(N):
            m1 = -1e300
            m2 = -1e300
            for j in range(V):
                x = logits[i, j]
                if x > m1:
                    m2 = m1
                    m1 = x
                elif x > m2:
                    m2 = x
            z = 0.0
            for j in range(V):
                z += exp(logits[i, j] - m1)
            p1[i] = <float>(1.0 / z)
            p2[i] = <float>((1.0 - exp(m2 - m1)) / z) if V > 1 else <float>(1.0 / z)
    return p1_arr, p2_arr


def cosine_rows(cmat a, cmat b):
    """Twin of the ``saturation`` measure: cosine of rows a[i], b[i] ([N, C]) -> [N] float32,
    clipped to [-1, 1]; a zero row gives 0."""
    cdef Py_ssize_t N = a.shape[0], C = a.shape[1], i, j
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
            c = ab / (sqrt(aa) * sqrt(bb)) if aa > 0 and bb > 0 else 0.0
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
