/* Half-precision (IEEE float16 and bfloat16) to float32 conversion of runs of values, for the
 * half-precision weight kernels of common.pxi (the GEMV of the fused decode step, the upcast of a
 * matrix for prefill), and those kernels' dot product (mdt_dot_f32, mdt_dot_f16, mdt_dot_bf16).
 * Both conversions are exact: every float16 and bfloat16 value is a float32.
 *
 * float16: chosen at compile time. With F16C (x86; -march=native on a CPU that has it) the
 * hardware instruction vcvtph2ps, 16 values per instruction with AVX-512F, 8 with AVX; without it
 * a portable, branch-free integer conversion that the compiler vectorises (no subnormal floating
 * point operand, so no slow microcode path). MINADEPT_HALF_CONVERSION names the one compiled in.
 * The portable one is always compiled (mdt_f16_to_f32_portable) so that tests can check it.
 *
 * bfloat16: the top 16 bits of a float32; the conversion is a 16-bit shift (vectorised by GCC).
 */
#ifndef MINADEPT_HALF_H
#define MINADEPT_HALF_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#define MINADEPT_HALF_CONVERSION "f16c"
#else
#define MINADEPT_HALF_CONVERSION "scalar"
#endif

static inline float mdt_bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t mdt_f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* float16 bits -> float32, exactly, with integer operations and selects only: exponent and
 * mantissa moved into place and the exponent re-biased (15 -> 127); infinities and NaNs get the
 * float32 exponent 255; subnormals are built as 2^-14 (1 + m / 1024) and 2^-14 is subtracted
 * (exact, and no operand is subnormal). */
static inline float mdt_f16_to_f32_portable(uint16_t h) {
    uint32_t em = ((uint32_t)h & 0x7fffu) << 13;
    uint32_t e = em & 0x0f800000u;
    uint32_t u = em + ((127u - 15u) << 23);
    u += (e == 0x0f800000u) ? ((128u - 16u) << 23) : 0u;
    u += (e == 0u) ? (1u << 23) : 0u;
    float f = mdt_bits_f32(u);
    float g = f - 6.103515625e-05f;
    f = (e == 0u) ? g : f;
    return mdt_bits_f32(mdt_f32_bits(f) | (((uint32_t)h & 0x8000u) << 16));
}

static inline float mdt_bf16_to_f32(uint16_t b) { return mdt_bits_f32((uint32_t)b << 16); }

/* dst[0:n] = float16 src[0:n] as float32 (the compiled-in conversion). */
static inline void mdt_f16_run(const uint16_t* src, float* dst, ptrdiff_t n) {
    ptrdiff_t j = 0;
#if defined(__F16C__)
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16)
        _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + j))));
#endif
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + j))));
    for (; j < n; j++)
        dst[j] = _cvtsh_ss(src[j]);
#else
    for (; j < n; j++)
        dst[j] = mdt_f16_to_f32_portable(src[j]);
#endif
}

/* dst[0:n] = bfloat16 src[0:n] as float32. */
static inline void mdt_bf16_run(const uint16_t* src, float* dst, ptrdiff_t n) {
    ptrdiff_t j;
    for (j = 0; j < n; j++)
        dst[j] = mdt_bf16_to_f32(src[j]);
}

/* kind 1: float16, 2: bfloat16 (the codes of common.pxi). */
static inline void mdt_half_run(const uint16_t* src, float* dst, ptrdiff_t n, int kind) {
    if (kind == 2)
        mdt_bf16_run(src, dst, n);
    else
        mdt_f16_run(src, dst, n);
}

/* The kernels' dot product: sum over k < n of w[k] x[k], w one row of a weight matrix kept
 * [out, in] (each output's n weights contiguous, so a matrix-vector product reads the matrix as one
 * sequential stream: measured about twice the memory throughput of reading [in, out] column
 * panels), x float32. Every weight is converted exactly and every product and sum is float32, in
 * one fixed order for all three weight types, so the float32 twin (mdt_dot_f32, used on a row
 * converted once for several x) gives bit-identical sums:
 *   lanes 0..63 each sum k = lane, lane + 64, ... over the whole blocks of 64; then blocks of 16
 *   into lanes 0..15; lanes l, l+16, l+32, l+48 are added ((0 + 1) + (2 + 3)); the 16 results are
 *   reduced pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1); the last n % 16 products are added in order.
 * With AVX-512F and F16C the lanes are four zmm registers, with AVX2, F16C and FMA eight ymm
 * registers (the two macro bodies below differ only in register width); the portable loop keeps
 * them in an array that GCC vectorises, in the same order, a product and a sum fused where the
 * CPU has FMA (MDT_MAC). */
/* a + b c: one fused operation where the CPU has FMA (never contracted differently in different
 * kernels), else a product then a sum (nothing to contract). */
#if defined(__FP_FAST_FMAF)
#define MDT_MAC(a, b, c) fmaf((b), (c), (a))
#else
#define MDT_MAC(a, b, c) ((a) + (b) * (c))
#endif

#define MDT_DOT_KINDS(X) X(f32, float, mdt_ld_f32) X(f16, uint16_t, mdt_ld_f16) X(bf16, uint16_t, mdt_ld_bf16)

static inline float mdt_ld_f32(const float* p) { return *p; }
static inline float mdt_ld_bf16(const uint16_t* p) { return mdt_bf16_to_f32(*p); }
#if defined(__F16C__)
static inline float mdt_ld_f16(const uint16_t* p) { return _cvtsh_ss(*p); }
#else
static inline float mdt_ld_f16(const uint16_t* p) { return mdt_f16_to_f32_portable(*p); }
#endif

static inline float mdt_reduce16(float* s) {
    int h, l;
    for (h = 8; h >= 1; h >>= 1)
        for (l = 0; l < h; l++)
            s[l] = s[l] + s[l + h];
    return s[0];
}

/* mdt_reduce16 of 16 lanes held in registers (lo = lanes 0..7, hi = 8..15), the same pairs. */
#if defined(__AVX__)
static inline float mdt_yreduce16(__m256 lo, __m256 hi) {
    __m256 s8 = _mm256_add_ps(lo, hi);                                     /* l + (l + 8) */
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));   /* + 4 */
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                     /* + 2 */
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));       /* + 1 */
}
#endif

#if defined(__AVX512F__) && defined(__F16C__)
static inline float mdt_zreduce16(__m512 a) {
    return mdt_yreduce16(_mm512_castps512_ps256(a),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
static inline __m512 mdt_zld_f32(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 mdt_zld_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
static inline __m512 mdt_zld_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#define MDT_DOT_DEF(NAME, T, LD)                                                                  \
static inline float mdt_dot_##NAME(const T* w, const float* x, ptrdiff_t n) {                     \
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                   \
    float t;                                                                                      \
    ptrdiff_t k = 0;                                                                              \
    for (; k + 64 <= n; k += 64) {                                                                \
        a0 = _mm512_fmadd_ps(mdt_zld_##NAME(w + k), _mm512_loadu_ps(x + k), a0);                  \
        a1 = _mm512_fmadd_ps(mdt_zld_##NAME(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);        \
        a2 = _mm512_fmadd_ps(mdt_zld_##NAME(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);        \
        a3 = _mm512_fmadd_ps(mdt_zld_##NAME(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);        \
    }                                                                                             \
    for (; k + 16 <= n; k += 16)                                                                  \
        a0 = _mm512_fmadd_ps(mdt_zld_##NAME(w + k), _mm512_loadu_ps(x + k), a0);                  \
    t = mdt_zreduce16(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));               \
    for (; k < n; k++)                                                                            \
        t = MDT_MAC(t, LD(w + k), x[k]);                                                                 \
    return t;                                                                                     \
}
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
/* AVX2: the 64 lanes as eight ymm registers, the same order. */
static inline __m256 mdt_yld_f32(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 mdt_yld_f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256 mdt_yld_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#define MDT_DOT_DEF(NAME, T, LD)                                                                  \
static inline float mdt_dot_##NAME(const T* w, const float* x, ptrdiff_t n) {                     \
    __m256 a[8];                                                                                  \
    float t;                                                                                      \
    ptrdiff_t k = 0;                                                                              \
    int l;                                                                                        \
    for (l = 0; l < 8; l++)                                                                       \
        a[l] = _mm256_setzero_ps();                                                               \
    for (; k + 64 <= n; k += 64)                                                                  \
        for (l = 0; l < 8; l++)                                                                   \
            a[l] = _mm256_fmadd_ps(mdt_yld_##NAME(w + k + 8 * l), _mm256_loadu_ps(x + k + 8 * l), a[l]); \
    for (; k + 16 <= n; k += 16)                                                                  \
        for (l = 0; l < 2; l++)                                                                   \
            a[l] = _mm256_fmadd_ps(mdt_yld_##NAME(w + k + 8 * l), _mm256_loadu_ps(x + k + 8 * l), a[l]); \
    t = mdt_yreduce16(_mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[4], a[6])),       \
                      _mm256_add_ps(_mm256_add_ps(a[1], a[3]), _mm256_add_ps(a[5], a[7])));      \
    for (; k < n; k++)                                                                            \
        t = MDT_MAC(t, LD(w + k), x[k]);                                                                 \
    return t;                                                                                     \
}
#else
#define MDT_DOT_DEF(NAME, T, LD)                                                                  \
static inline float mdt_dot_##NAME(const T* w, const float* x, ptrdiff_t n) {                     \
    float a[64], s[16], t;                                                                        \
    ptrdiff_t k = 0;                                                                              \
    int l;                                                                                        \
    for (l = 0; l < 64; l++)                                                                      \
        a[l] = 0.0f;                                                                              \
    for (; k + 64 <= n; k += 64)                                                                  \
        for (l = 0; l < 64; l++)                                                                  \
            a[l] = MDT_MAC(a[l], LD(w + k + l), x[k + l]);                                               \
    for (; k + 16 <= n; k += 16)                                                                  \
        for (l = 0; l < 16; l++)                                                                  \
            a[l] = MDT_MAC(a[l], LD(w + k + l), x[k + l]);                                               \
    for (l = 0; l < 16; l++)                                                                      \
        s[l] = (a[l] + a[l + 16]) + (a[l + 32] + a[l + 48]);                                      \
    t = mdt_reduce16(s);                                                                          \
    for (; k < n; k++)                                                                            \
        t = MDT_MAC(t, LD(w + k), x[k]);                                                                 \
    return t;                                                                                     \
}
#endif
MDT_DOT_KINDS(MDT_DOT_DEF)

/* kind 1: float16, 2: bfloat16. */
static inline float mdt_dot_half(const uint16_t* w, const float* x, ptrdiff_t n, int kind) {
    return kind == 2 ? mdt_dot_bf16(w, x, n) : mdt_dot_f16(w, x, n);
}

/* The portable float16 conversion of a run (for tests: the path of a build without F16C). */
static inline void mdt_f16_run_portable(const uint16_t* src, float* dst, ptrdiff_t n) {
    ptrdiff_t j;
    for (j = 0; j < n; j++)
        dst[j] = mdt_f16_to_f32_portable(src[j]);
}

#endif
