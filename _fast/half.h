/* Half-precision (IEEE float16 and bfloat16) to float32 conversion of runs of values, for the
 * half-precision weight kernels of common.pxi (the GEMV of the fused decode step, the upcast of a
 * matrix for prefill). Both conversions are exact: every float16 and bfloat16 value is a float32.
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

/* The GEMV's inner loop: acc[0:n] += x[0] W[0, 0:n] + x[1] W[1, 0:n] + ... + x[R-1] W[R-1, 0:n]
 * for R (<= 8) rows of half-precision weights W (bit patterns, rows ldw values apart), each row
 * converted to float32 in registers; for every j the R products are added to acc[j] one after
 * the other (r = 0, 1, ...), in float32. The caller passes R = 8 as a constant for the bulk of
 * the rows, so that the compiler unrolls the row loop and keeps acc[j] in a register across it.
 *
 * float16 with F16C: 16 columns per step (AVX-512F) or 8 (AVX), vcvtph2ps then FMA: GCC 12 does
 * not vectorise a _Float16 -> float conversion, so this one loop is written with intrinsics.
 * bfloat16, and float16 without F16C: a plain C loop over the columns that GCC vectorises (the
 * conversion is integer shifts, masks and selects). */
static inline void mdt_axpy_rows(const uint16_t* w, ptrdiff_t ldw, const float* x, int R, float* acc,
                                 ptrdiff_t n, int kind) {
    ptrdiff_t j = 0;
    int r;
    if (kind == 2) {
        for (j = 0; j < n; j++) {
            float a = acc[j];
            for (r = 0; r < R; r++)
                a += x[r] * mdt_bf16_to_f32(w[r * ldw + j]);
            acc[j] = a;
        }
        return;
    }
#if defined(__F16C__)
#if defined(__AVX512F__)
    for (; j + 16 <= n; j += 16) {
        __m512 a = _mm512_loadu_ps(acc + j);
        for (r = 0; r < R; r++)
            a = _mm512_fmadd_ps(_mm512_set1_ps(x[r]),
                                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(w + r * ldw + j))), a);
        _mm512_storeu_ps(acc + j, a);
    }
#endif
    for (; j + 8 <= n; j += 8) {
        __m256 a = _mm256_loadu_ps(acc + j);
        for (r = 0; r < R; r++)
#if defined(__FMA__)
            a = _mm256_fmadd_ps(_mm256_set1_ps(x[r]),
                                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + r * ldw + j))), a);
#else
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_set1_ps(x[r]),
                              _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(w + r * ldw + j)))));
#endif
        _mm256_storeu_ps(acc + j, a);
    }
    for (; j < n; j++) {
        float a = acc[j];
        for (r = 0; r < R; r++)
            a += x[r] * _cvtsh_ss(w[r * ldw + j]);
        acc[j] = a;
    }
#else
    for (j = 0; j < n; j++) {
        float a = acc[j];
        for (r = 0; r < R; r++)
            a += x[r] * mdt_f16_to_f32_portable(w[r * ldw + j]);
        acc[j] = a;
    }
#endif
}

/* The portable float16 conversion of a run (for tests: the path of a build without F16C). */
static inline void mdt_f16_run_portable(const uint16_t* src, float* dst, ptrdiff_t n) {
    ptrdiff_t j;
    for (j = 0; j < n; j++)
        dst[j] = mdt_f16_to_f32_portable(src[j]);
}

#endif
