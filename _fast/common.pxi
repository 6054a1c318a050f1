# Row primitives shared by ``kernels.pyx`` (the array kernels) and ``decode.pyx`` (the fused
# decode step): textually included by both (``include "common.pxi"``), so there is one source copy
# and each module compiles its own inlinable copy (a call across modules could not be inlined or
# vectorised). Each is covered by an array kernel's property test (tests/test_kernels.py) and used by
# ``DecodePlan`` (tests/test_fused.py):
#
# - ``ln_row``: LayerNorm of one row (``layer_norm``; the block's ln_1/ln_2 and ln_f)
# - ``exp_approx``: vectorisable single-precision e^x (every softmax and GELU)
# - ``gelu1``: GELU, tanh form, of one value (``gelu_tanh``; the block's MLP)
# - ``attend_one``: one query's causal attention over a K/V run (``attention``; the block's heads)
# - ``adept_logit_row``: the learned exit policy's logit of one state (``adept_logit``; the gate)
from libc.math cimport INFINITY, log, sqrt


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



cdef inline double adept_logit_row(const float* h, const float* h_prev, Py_ssize_t C, const float* w,
                                   double b, double eps) noexcept nogil:
    """The learned exit policy's logit of one state h [C] after block k (h_prev [C] after block
    k-1), weights w [C + 2]: ``(h - mean) / sd . w[:C] + log(sd) w[C] + cos(h, h_prev) w[C+1] + b``,
    sd = sqrt(var + eps). Two passes over the row in double, no temporaries."""
    cdef Py_ssize_t j
    cdef double s = 0.0, hh = 0.0, hp = 0.0, pp = 0.0, x, y, d, mu, var = 0.0, dw = 0.0, sd, cos
    for j in range(C):                       # pass 1: mean and the cosine's sums
        x = h[j]
        y = h_prev[j]
        s += x
        hh += x * x
        hp += x * y
        pp += y * y
    mu = s / C
    for j in range(C):                       # pass 2: centred variance and (h - mu) . w
        d = h[j] - mu
        var += d * d
        dw += d * w[j]
    sd = sqrt(var / C + eps)
    cos = hp / (sqrt(hh) * sqrt(pp)) if hh > 0 and pp > 0 else 0.0
    return dw / sd + log(sd) * w[C] + cos * w[C + 1] + b


# ----------------------------------------------------------------------------- half-precision weights
#
# Half-precision matrices are kept [out, in] (each output's weights contiguous; ``halfprec``), and
# every output is one dot product (half.h, ``mdt_dot_*``), computed wholly by one thread:
# - ``hgemv_par``: y = x @ W^T + beta y, W float16 or bfloat16 [N, K] (``half_gemv``; the fused
#   decode step's products when the model is loaded with --dtype float16/bfloat16)
# - ``hgemm_par``: X @ W^T for a few rows X (``half_matmul``; a short prefill, a prompt's LM head)
#
# The conversions are exact and every product and sum is float32, in one order (half.h) whatever
# the kernel, the number of rows or of threads: ``half_gemv`` and every row of ``half_matmul`` give
# bit-identical sums. They compute what float32 arithmetic on the upcast matrix computes, up to
# the order of the sums.
from libc.stdint cimport uint16_t
from libc.stdlib cimport free, malloc

cdef extern from "half.h" nogil:
    const char* MINADEPT_HALF_CONVERSION
    void mdt_half_run(const uint16_t* src, float* dst, Py_ssize_t n, int kind)
    void mdt_f16_run_portable(const uint16_t* src, float* dst, Py_ssize_t n)
    float mdt_dot_half(const uint16_t* w, const float* x, Py_ssize_t n, int kind)
    float mdt_dot_f32(const float* w, const float* x, Py_ssize_t n)

cdef enum:
    W_F32 = 0            # weight codes: float32 (BLAS), float16, bfloat16 (bit patterns, uint16)
    W_F16 = 1
    W_BF16 = 2
    HROW_GRAIN = 16      # a thread's share of the outputs is a multiple of this many rows
    HMAX_ROWS = 64       # rows of X in ``half_matmul`` at most


cdef inline void hgemv_rows(const uint16_t* W, int kind, Py_ssize_t K, Py_ssize_t n0, Py_ssize_t n1,
                            const float* x, float* y, float beta) noexcept nogil:
    """y[n] = W[n, :] . x + beta * y[n] for n0 <= n < n1, W [N, K] half-precision bit patterns
    (``kind`` W_F16 or W_BF16) read row after row. beta 0: y is not read (as BLAS)."""
    cdef Py_ssize_t n
    if beta == 0.0:
        for n in range(n0, n1):
            y[n] = mdt_dot_half(W + n * K, x, K, kind)
    else:
        for n in range(n0, n1):
            y[n] = mdt_dot_half(W + n * K, x, K, kind) + beta * y[n]


cdef inline Py_ssize_t hshare(Py_ssize_t N, int nt) noexcept nogil:
    """Outputs per thread when N outputs are split over nt threads: a multiple of HROW_GRAIN."""
    return ((N + nt - 1) // nt + HROW_GRAIN - 1) // HROW_GRAIN * HROW_GRAIN


cdef void hgemv_par(const uint16_t* W, int kind, int K, int N, const float* x, float* y, float beta,
                    long split_min, int nt) noexcept nogil:
    """``hgemv_rows`` over all N outputs, split into ``nt`` contiguous ranges of W's rows (each
    thread streams one contiguous part of the matrix), one per OpenMP thread, when nt > 1 and W
    has at least ``split_min`` weights. Each output is one thread's dot product: the result does
    not depend on the split."""
    cdef int p
    cdef Py_ssize_t per, a, b
    if nt <= 1 or <long>K * N < split_min:
        hgemv_rows(W, kind, K, 0, N, x, y, beta)
        return
    per = hshare(N, nt)
    for p in prange(nt, num_threads=nt, schedule="static"):
        a = p * per
        b = a + per
        if b > N:
            b = N
        if a < b:
            hgemv_rows(W, kind, K, a, b, x, y, beta)


cdef void hgemm_rows(const uint16_t* W, int kind, Py_ssize_t K, Py_ssize_t N, Py_ssize_t n0, Py_ssize_t n1,
                     const float* X, Py_ssize_t R, float* Y, float* wrow) noexcept nogil:
    """Y[:, n] = X [R, K] @ W[n, :] for n0 <= n < n1 (Y [R, N] row-major), W [N, K] half-precision:
    each weight row is converted once into ``wrow`` [K] and dotted with every row of X
    (``mdt_dot_f32``, the same sums as ``mdt_dot_half``), so W streams from memory once."""
    cdef Py_ssize_t n, r
    for n in range(n0, n1):
        mdt_half_run(W + n * K, wrow, K, kind)
        for r in range(R):
            Y[r * N + n] = mdt_dot_f32(wrow, X + r * K, K)


cdef int hgemm_par(const uint16_t* W, int kind, Py_ssize_t K, Py_ssize_t N, const float* X,
                   Py_ssize_t R, float* Y, long split_min, int nt) noexcept nogil:
    """``hgemm_rows`` over all N outputs, split into ``nt`` ranges of W's rows over the OpenMP
    threads when nt > 1 and W has at least ``split_min`` weights (the split changes no sum).
    Returns -1 when its scratch (nt x K floats) cannot be allocated, else 0."""
    cdef int p
    cdef Py_ssize_t per, a, b
    if nt <= 1 or <long>K * N < split_min:
        nt = 1
    cdef float* wrows = <float*>malloc(nt * K * sizeof(float) + sizeof(float))
    if wrows == NULL:
        return -1
    if nt == 1:
        hgemm_rows(W, kind, K, N, 0, N, X, R, Y, wrows)
    else:
        per = hshare(N, nt)
        for p in prange(nt, num_threads=nt, schedule="static"):
            a = p * per
            b = a + per
            if b > N:
                b = N
            if a < b:
                hgemm_rows(W, kind, K, N, a, b, X, R, Y, wrows + p * K)
    free(wrows)
    return 0
