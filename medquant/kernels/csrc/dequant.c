/*
 * medquant: fused dequantization of packed codes for the CPU dense path (plain C, no torch headers).
 *
 * For every row r and column j < k of a packed row group, with g = j / ge the group of column j:
 *
 *     d = round_T(u[r, j] - z[r, g])          (float32 subtraction, rounded to the output type T)
 *     w[r, j] = round_T(d * s[r, g])          (float32 product, rounded to T)
 *
 * which is exactly what the eager torch code computes (``u.to(T)``, ``sub_(z)``, ``mul_(s)``: torch evaluates
 * bfloat16 / float16 arithmetic in float32 and rounds each result to nearest even), so the output is
 * bit-identical to it. For the usual integer zero points the first rounding changes nothing. T is float32,
 * bfloat16 (rounded on the float32 bits) or float16 (only where the compiler has _Float16).
 *
 * Codes u: the int32 words of a row read as little-endian bytes. Container layout (dense == 0): 1-, 2-, 4- or
 * 8-bit containers, 8 / c codes per byte, the lowest column in the lowest bits. Dense layout (dense == 1,
 * bits 3..7): one bit stream per row, code j at stream bits [j * bits, (j + 1) * bits); 8 codes fill
 * ``bits`` bytes. Only the first k columns are written; the padding up to K_pad is dropped.
 *
 * s and z: float32 (n, ng), one value per row and group of ge columns (the caller expands channel / tensor
 * scales: ng = 1, ge = K_pad), already rounded to T as the eager code does.
 *
 * Per row: the codes are unpacked to bytes (dense 3/5/6/7-bit streams with vpermb + vpmultishiftqb where the
 * CPU has AVX512-VBMI), then each group is dequantized: bfloat16 output of codes below 32 by a 32-entry table
 * and vpermw (AVX512BW), everything else by the arithmetic loops below, which the compiler vectorises. All
 * forms compute the same float32 operations, so every build gives the same bits.
 *
 * Rows are split over threads with OpenMP (the process's OpenMP runtime: torch's, when torch is loaded).
 * Built by medquant/kernels/native.py with -O3 -march=native (also without it: portable loops only).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MQ_BUILD_KEY
#define MQ_BUILD_KEY "unset"
#endif

#define MQ_ABI 8

#define MQ_F32 0
#define MQ_BF16 1
#define MQ_F16 2

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define MQ_HAVE_LUT 1
#else
#define MQ_HAVE_LUT 0
#endif

#if defined(__FLT16_MAX__)
#define MQ_HAVE_F16 1
#else
#define MQ_HAVE_F16 0
#endif

/* The key the library was built with (checked by the loader: a foreign or stale library is never used). */
const char *mq_build_key(void) { return MQ_BUILD_KEY; }

int mq_abi(void) { return MQ_ABI; }

int mq_has_f16(void) { return MQ_HAVE_F16; }

int mq_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as torch's scalar conversion). */
static inline uint16_t bf16_bits(float f) {
    uint32_t u = f2u(f);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return ((u & 0x7FFFFFFFu) > 0x7F800000u) ? (uint16_t)0x7FC0u : (uint16_t)r;
}

/* an unaligned, aliasing 64-bit load (the stream kernel's broadcasts) */
typedef long long long_u __attribute__((aligned(1), may_alias));

/* float16 bits -> float32 (exact: every float16 value is a float32 value): F16C's vcvtph2ps where the build has it,
 * else portable bit manipulation */
#if defined(__F16C__)
#include <immintrin.h>
static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return u2f(sign | 0x7F800000u | (m << 13)); /* inf / NaN */
    if (e != 0) return u2f(sign | ((e + 112u) << 23) | (m << 13)); /* normal: rebias 15 -> 127 */
    const float v = (float)m * (1.0f / 16777216.0f); /* subnormal: m * 2^-24, exact */
    return sign ? -v : v;
}
#endif

/* Scales and zero points of a row group, (n, ng) each, as the caller stores them: sz bit 0, s is float16 (else
 * float32); bit 1, z is float16; bit 2, z is one value for every row and group (symmetric rows: 2^(b-1)). */
typedef struct {
    const void *s, *z;
    int sz;
} mq_params;

static inline float param_s(const mq_params *p, int64_t i) {
    return (p->sz & 1) ? f16_to_f32(((const uint16_t *)p->s)[i]) : ((const float *)p->s)[i];
}

static inline float param_z(const mq_params *p, int64_t i) {
    if (p->sz & 4) i = 0;
    return (p->sz & 2) ? f16_to_f32(((const uint16_t *)p->z)[i]) : ((const float *)p->z)[i];
}

/* code j of a row stored as a stream of `bits`-bit codes, lowest bits first (every layout is one: containers of
 * 1, 2, 4 and 8 bits hold 8 / bits codes per byte, the lowest column in the lowest bits); reads no byte past
 * the code's last bit */
static inline uint32_t code_at(const uint8_t *row, int bits, int64_t j) {
    const int64_t bit = j * bits, byte = bit / 8;
    const int sh = (int)(bit % 8);
    uint32_t v = row[byte];
    if (sh + bits > 8) v |= (uint32_t)row[byte + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1u);
}

/* Dense bit stream: 8 codes of `bits` bits fill `bits` bytes (read as one little-endian integer). */
static inline __attribute__((always_inline)) void unpack_dense(const uint8_t *restrict b, const int bits,
                                                               int64_t nc, uint8_t *restrict u) {
    const uint64_t mask = (1u << bits) - 1u;
    for (int64_t t = 0; t < nc / 8; ++t) {
        const uint8_t *p = b + t * bits;
        uint64_t v = 0;
        for (int i = 0; i < bits; ++i) v |= (uint64_t)p[i] << (8 * i);
        for (int i = 0; i < 8; ++i) u[8 * t + i] = (uint8_t)((v >> (bits * i)) & mask);
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
/* The same with AVX512-VBMI, 64 codes per step: qword lane L gets the `bits` bytes of codes 8L..8L+7 (vpermb),
 * byte i of the lane the 8 bits from bit i * bits on (vpmultishiftqb), masked to `bits` bits. */
static void unpack_dense_vbmi(const uint8_t *restrict b, int bits, int64_t nc, uint8_t *restrict u) {
    uint8_t perm[64], ctrl[64];
    for (int lane = 0; lane < 8; ++lane)
        for (int i = 0; i < 8; ++i) {
            perm[8 * lane + i] = (uint8_t)(lane * bits + i);
            ctrl[8 * lane + i] = (uint8_t)(i * bits);
        }
    const __m512i vp = _mm512_loadu_si512((const void *)perm), vc = _mm512_loadu_si512((const void *)ctrl);
    const __m512i vm = _mm512_set1_epi8((char)((1 << bits) - 1));
    const __mmask64 lm = ((__mmask64)1 << (8 * bits)) - 1; /* the 8 * bits bytes of 64 codes: no over-read */
    int64_t t = 0;
    for (; t + 64 <= nc; t += 64) {
        __m512i x = _mm512_maskz_loadu_epi8(lm, b + t / 8 * bits);
        x = _mm512_multishift_epi64_epi8(vc, _mm512_permutexvar_epi8(vp, x));
        _mm512_storeu_si512((void *)(u + t), _mm512_and_si512(x, vm));
    }
    if (t < nc) unpack_dense(b + t / 8 * bits, bits, nc - t, u + t);
}
#define MQ_HAVE_VBMI 1
#else
#define MQ_HAVE_VBMI 0
#endif

/* The first nc codes of a row (nc a multiple of 8, at most K_pad) into u[0..nc). Not used for 8-bit
 * containers (the bytes are the codes). */
static void unpack_row(const uint8_t *restrict b, int bits, int dense, int64_t nc, uint8_t *restrict u) {
#if MQ_HAVE_VBMI
    /* a row of 1- or 2-bit containers is also a stream of 1- or 2-bit codes, lowest bits first (4-bit
     * containers: the compiler's vectorised loop below was measured faster) */
    if (dense || bits <= 2) {
        unpack_dense_vbmi(b, bits, nc, u);
        return;
    }
#endif
    if (dense) {
        switch (bits) { /* constant widths: the loops unroll */
        case 3: unpack_dense(b, 3, nc, u); break;
        case 5: unpack_dense(b, 5, nc, u); break;
        case 6: unpack_dense(b, 6, nc, u); break;
        default: unpack_dense(b, 7, nc, u); break;
        }
        return;
    }
    switch (bits) {
    case 4:
        for (int64_t i = 0; i < nc / 2; ++i) {
            u[2 * i] = b[i] & 15u;
            u[2 * i + 1] = b[i] >> 4;
        }
        break;
    case 2:
        for (int64_t i = 0; i < nc / 4; ++i) {
            u[4 * i] = b[i] & 3u;
            u[4 * i + 1] = (b[i] >> 2) & 3u;
            u[4 * i + 2] = (b[i] >> 4) & 3u;
            u[4 * i + 3] = b[i] >> 6;
        }
        break;
    default: /* 1 */
        for (int64_t i = 0; i < nc / 8; ++i)
            for (int j = 0; j < 8; ++j) u[8 * i + j] = (b[i] >> j) & 1u;
        break;
    }
}

static void dq_f32(const uint8_t *restrict u, int64_t n, float zf, float sf, float *restrict o) {
    for (int64_t j = 0; j < n; ++j) o[j] = ((float)u[j] - zf) * sf;
}

/* w = round((u - zf) * sf): u - zf and the product in float32, one rounding to the output type (the same
 * arithmetic as dequantizing in float32 and casting the result) */
static void dq_bf16(const uint8_t *restrict u, int64_t n, float zf, float sf, uint16_t *restrict o) {
    for (int64_t j = 0; j < n; ++j) o[j] = bf16_bits(((float)u[j] - zf) * sf);
}

#if MQ_HAVE_F16
static void dq_f16(const uint8_t *restrict u, int64_t n, float zf, float sf, _Float16 *restrict o) {
    for (int64_t j = 0; j < n; ++j) o[j] = (_Float16)(((float)u[j] - zf) * sf);
}
#endif

#if MQ_HAVE_LUT
/* Table look-up form of dq_bf16 for codes below 32 (AVX512BW): the group's outputs for all 32
 * possible codes are computed with the same float32 operations and rounding (16 lanes at a time), then each
 * code selects its output with one vpermw per 32 columns. */
static inline __m512i bf16_vec(__m512 v) { /* u32 lanes holding bf16_bits(v) */
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

static inline __m512i table_bf16(float zf, float sf) {
    const __m512 lo = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 hi = _mm512_add_ps(lo, _mm512_set1_ps(16.0f));
    const __m512 z = _mm512_set1_ps(zf), s = _mm512_set1_ps(sf);
    const __m512 d0 = _mm512_sub_ps(lo, z), d1 = _mm512_sub_ps(hi, z);
    const __m256i t0 = _mm512_cvtepi32_epi16(bf16_vec(_mm512_mul_ps(d0, s)));
    const __m256i t1 = _mm512_cvtepi32_epi16(bf16_vec(_mm512_mul_ps(d1, s)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(t0), t1, 1);
}

static void lut_bf16(const uint8_t *restrict u, int64_t n, __m512i tab, uint16_t *restrict o) {
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(u + j)));
        _mm512_storeu_si512((void *)(o + j), _mm512_permutexvar_epi16(idx, tab));
    }
    if (j < n) {
        uint16_t t[32];
        _mm512_storeu_si512((void *)t, tab);
        for (; j < n; ++j) o[j] = t[u[j] & 31u];
    }
}
#endif

/*
 * q: n rows of row_bytes bytes; s, z: (n, ng) float32 or float16 (sz: mq_params); out: n rows of out_stride
 * elements of type out_dtype
 * (MQ_F32 / MQ_BF16 / MQ_F16), columns [0, k) written. Returns 0, or a negative number for arguments it does
 * not take (nothing written then).
 */
int mq_dequant(const uint8_t *q, int64_t n, int64_t row_bytes, int bits, int dense, int64_t k, int64_t kp,
               int64_t ge, int64_t ng, const void *s, const void *z, int sz, int out_dtype, void *out,
               int64_t out_stride, int nthreads) {
    if (n < 0 || k < 0 || k > kp || ge <= 0 || ng <= 0 || ge * ng < kp || out_stride < k || sz < 0 || sz > 7)
        return -1;
    const mq_params prm = {s, z, sz};
    if (dense ? (bits < 3 || bits > 7 || kp % 8 || row_bytes * 8 != kp * bits)
              : ((bits != 1 && bits != 2 && bits != 4 && bits != 8) || kp % (32 / bits) ||
                 row_bytes * 8 != kp * bits))
        return -2;
    if (out_dtype != MQ_F32 && out_dtype != MQ_BF16 && !(out_dtype == MQ_F16 && MQ_HAVE_F16)) return -3;
    if (nthreads < 1) nthreads = 1;
    const int direct = !dense && bits == 8;
    /* codes unpacked per row: k rounded up to 8 (<= K_pad for every layout unpacked here) */
    const int64_t nc = (k + 7) / 8 * 8;
    const int lut = MQ_HAVE_LUT && out_dtype == MQ_BF16 && bits <= 5; /* codes below 32 */
    (void)lut;
    int failed = 0;

#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n > 1)
#endif
    {
        uint8_t *buf = direct ? NULL : (uint8_t *)malloc(nc > 0 ? (size_t)nc : 1);
        if (!direct && buf == NULL) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < n; ++r) {
            if (!direct && buf == NULL) continue;
            const uint8_t *row = q + r * row_bytes;
            const uint8_t *u = row;
            if (!direct) {
                unpack_row(row, bits, dense, nc, buf);
                u = buf;
            }
            for (int64_t g = 0; g < ng; ++g) {
                const int64_t c0 = g * ge;
                if (c0 >= k) break;
                const int64_t c1 = c0 + ge < k ? c0 + ge : k;
                const float sf = param_s(&prm, r * ng + g), zf = param_z(&prm, r * ng + g);
#if MQ_HAVE_LUT
                if (lut) {
                    lut_bf16(u + c0, c1 - c0, table_bf16(zf, sf), (uint16_t *)out + r * out_stride + c0);
                    continue;
                }
#endif
                if (out_dtype == MQ_BF16)
                    dq_bf16(u + c0, c1 - c0, zf, sf, (uint16_t *)out + r * out_stride + c0);
                else if (out_dtype == MQ_F32)
                    dq_f32(u + c0, c1 - c0, zf, sf, (float *)out + r * out_stride + c0);
#if MQ_HAVE_F16
                else
                    dq_f16(u + c0, c1 - c0, zf, sf, (_Float16 *)out + r * out_stride + c0);
#endif
            }
        }
        free(buf);
    }
    return failed ? -4 : 0;
}

/* Rows of x with a value that is not finite. The factored sum of the matmuls (s * (sum u x~ - z * sum x~), with
 * x~ split or scaled) makes every output of such a row NaN (inf - inf, 0 * inf, the split's inf - inf), where
 * x @ W^T in IEEE arithmetic, as torch's F.linear on the dequantized weight computes it, gives +-inf or NaN per
 * output: for x[i, j] = +inf, +inf where W[r, j] > 0, -inf where W[r, j] < 0, NaN where W[r, j] == 0 or infinities
 * of both signs meet; NaN everywhere for a NaN. Such a row is found by its group sums xs (m rows of ng, which every
 * form computes: a sum holding an infinity or a NaN is not finite, as is one of finite values that overflows), so
 * finite x costs one pass over m * ng floats; each row found is then computed again in float32 as
 *
 *     y[i, r] = sum_j x[i, j] * w[r, j],   w[r, j] = (u[r, j] - z[r, g]) * s[r, g]   (g = j / ge)
 *
 * with x itself (not x~), w the float32 dequantized weight (PackedWeight.dequantize's), products and sums in
 * float32 in column order; each weight row dequantized once and shared by the rows found, weight rows split over
 * threads. Rows of finite x are not touched. Returns 0, or -4 (no memory: y not valid). */
static __attribute__((unused)) int nonfinite_rows(int bits, const uint8_t *q, int64_t n, int64_t row_bytes,
                                                  int64_t k, int64_t ge, int64_t ng, const mq_params *prm,
                                                  const void *x, int xdtype, int64_t m, int64_t xstride,
                                                  const float *xs, void *y, int ydtype, int64_t ys, int nthreads) {
    int any = 0;
    for (int64_t e = 0; e < m * ng; ++e) any |= !isfinite(xs[e]);
    if (!any) return 0;
    int64_t *rows = (int64_t *)malloc((size_t)m * sizeof(int64_t)), nbad = 0;
    if (!rows) return -4;
    for (int64_t i = 0; i < m; ++i) {
        int bad = 0;
        for (int64_t g = 0; g < ng; ++g) bad |= !isfinite(xs[i * ng + g]);
        if (bad) rows[nbad++] = i;
    }
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && n > 1)
#endif
    {
        float *w = (float *)malloc((size_t)(k > 0 ? k : 1) * sizeof(float));
        if (w == NULL) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < n; ++r) {
            if (w == NULL) continue;
            const uint8_t *row = q + r * row_bytes;
            for (int64_t j = 0; j < k; ++j) {
                const int64_t p = r * ng + j / ge;
                w[j] = ((float)code_at(row, bits, j) - param_z(prm, p)) * param_s(prm, p);
            }
            for (int64_t b = 0; b < nbad; ++b) {
                const int64_t i = rows[b];
                float acc = 0.0f;
                if (xdtype) {
                    const uint16_t *xi = (const uint16_t *)x + i * xstride;
                    for (int64_t j = 0; j < k; ++j) acc += u2f((uint32_t)xi[j] << 16) * w[j];
                } else {
                    const float *xi = (const float *)x + i * xstride;
                    for (int64_t j = 0; j < k; ++j) acc += xi[j] * w[j];
                }
                if (ydtype)
                    ((uint16_t *)y)[i * ys + r] = bf16_bits(acc);
                else
                    ((float *)y)[i * ys + r] = acc;
            }
        }
        free(w);
    }
    free(rows);
    return failed ? -4 : 0;
}

/* ---------------------------------------------------------------------------------------------------------
 * Weight-only matmul on the packed codes (decode and small batches: the CPU backend's "native<b>" paths), gemv_run
 * (called through mq_call, at the end of this file): 4-bit containers, 8-bit containers, other widths as a bit
 * stream (gemvs_rows, below).
 *
 *     y[i, r] = sum_g s[r, g] * ( sum_{j in g} u[r, j] x~[i, j]  -  z[r, g] * sum_{j in g} x~[i, j] )
 *
 * for i < m rows of x and r < n rows of the weight, which equals sum_j x~[i, j] (u[r, j] - z[r, g]) s[r, g]:
 * the integer codes are multiplied exactly and the zero point enters once per group through the group sums of
 * x. xmode says what x~ is: 1, x rounded to bfloat16; 2 (split), hi + lo with hi = bf16(x) and
 * lo = bf16(x - hi), which is x to a relative 2^-17 (x's float32 value has 24 significant bits, hi + lo
 * 16 or more); 3 (int16, with AVX512-VNNI, every width and group layout; else as 2): per 32 columns
 * c, t = max_{j in c} |x[j]| / 32767 and x~ = t * round_half_even(x / t), the int16 values multiplied by the codes
 * with vpdpwssd, the integer sums of a unit (at most 8 * 32767 * 15 per lane) or of a stream block (at most
 * 32 * 255 * 32767) converted to float32 once and scaled by t s lane-wise (an x with a value
 * that is not finite, or 32 columns below 2^-100, runs as 2); 0, x itself. With xmode 1 or 2 and AVX512-BF16 the
 * products are bfloat16 pairs summed in
 * float32 by vdpbf16ps (codes 0..15 turned into bfloat16 by a 16-entry table; split: one product with hi and
 * one with lo per code); otherwise the codes are widened to float32 and multiplied by float32 FMA (x~ = x:
 * split on a CPU without AVX512-BF16 is exact). Products are exact either way (a code has 4 bits, x~ at most
 * 24). Sums are float32 and so is y: the output is not rounded to the activation dtype. A row of x with a value
 * that is not finite is then computed again as torch's F.linear does (nonfinite_rows, above); so in the AVX2 form.
 *
 * q: n rows of row_bytes bytes, two codes per byte (column 2t in the low nibble of byte t), kp codes per row
 * (kp even; codes beyond k multiply zeros). s, z: (n, ng) float32, or float16 per sz (mq_params; widened per
 * task of MQ_GEMV_RB rows into a per-thread float32 buffer, outside the hot loops), group g covering columns
 * [g ge, (g + 1) ge);
 * ge a multiple of 32 unless ng == 1 (channel / tensor scope: one group of kp columns). x: (m, xstride), float32
 * (xdtype 0) or bfloat16 bits (xdtype 1). y: (m, ys), float32 (ydtype 0) or bfloat16 (ydtype 1: the float32 sum
 * rounded to nearest even).
 *
 * Blocks of 64 columns: 32 bytes widened to 16-bit lanes, the low nibbles (even columns) and the high nibbles
 * (odd columns) each give 32 codes; x is permuted once per call to match (per block: its 32 even columns, then
 * its 32 odd ones). Columns j..j+31 of a block land in accumulator lanes 0..7, columns j+32..j+63 in lanes 8..15,
 * so a block whose two halves lie in different groups (ge = 32, 96, ...) is scaled lane-wise. The quad form, with
 * bfloat16 products, for whole blocks of 128 columns (q128 from the row's start) where ge is a multiple of 128, 64
 * or 32, or one group covers the row (accumulator lane e then sums columns 8e..8e+7 of the block, so its four
 * quarters are scaled by their groups): 64 bytes read as 32 16-bit lanes, lane e holding the codes of columns 4e..4e+3;
 * vpermw reads the low 5 bits of each lane (shifted by 0, 4, 8, 12) as the index into the table, whose 32 entries
 * repeat the 16 values (so the bit above the nibble needs no mask): four vectors of 32 bfloat16 codes per 128
 * columns, against x permuted to match (columns 4e, then 4e + 1, 4e + 2, 4e + 3). It saves the widening and the
 * masks of two 64-column blocks: 15-20% per call on SmolLM2's layers (2 threads). Up to 8 rows of x share each
 * decoded block. Rows of the weight are split over threads (OpenMP), 16 at a time. The other widths:
 * gemvs_rows below (blocks of 32 columns in column order).
 *
 * Returns 0, or (nothing written): -1 bad sizes, -2 bad group layout, -3 kernel not compiled in, -4 no memory.
 * mq_gemv4_caps(): bit 0 the kernel is compiled in (AVX512F + BW), bit 1 it multiplies bfloat16 pairs with
 * vdpbf16ps (AVX512-BF16), bit 2 it reads the stream widths (AVX512-VBMI + VL).
 * --------------------------------------------------------------------------------------------------------- */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define MQ_GEMV_F32 1
#else
#define MQ_GEMV_F32 0
#endif
#if MQ_GEMV_F32 && defined(__AVX512BF16__)
#define MQ_GEMV_BF16 1
#else
#define MQ_GEMV_BF16 0
#endif

#if MQ_GEMV_F32 && defined(__AVX512VNNI__)
#define MQ_GEMM_CAP 1 /* gemm_run (int16 products by vpdpwssd) */
#else
#define MQ_GEMM_CAP 0
#endif

#if MQ_GEMV_F32 && defined(__AVX512VBMI__) && defined(__AVX512VL__)
#define MQ_GEMV_STREAM 1 /* codes narrower than a byte, other than 4-bit containers, unpacked with AVX512-VBMI */
#else
#define MQ_GEMV_STREAM 0
#endif

#if !MQ_GEMV_F32 && defined(__AVX2__) && defined(__FMA__)
#define MQ_GEMV_AVX2 1 /* gemv_avx2_run: float32 FMA on every width, without AVX512 */
#else
#define MQ_GEMV_AVX2 0
#endif

/* The m rows of x in tiles of 8, then at most one tile each of 4, 2 and 1 rows: ROWS(MB) runs the matmul's body
 * (specialised for a constant MB) on rows m0..m0+MB, m0 declared here */
#define MQ_ROW_TILES(ROWS)                                                                                        \
    do {                                                                                                          \
        int64_t m0 = 0;                                                                                           \
        for (; m0 + 8 <= m; m0 += 8) ROWS(8);                                                                     \
        if (m - m0 >= 4) {                                                                                        \
            ROWS(4);                                                                                              \
            m0 += 4;                                                                                              \
        }                                                                                                         \
        if (m - m0 >= 2) {                                                                                        \
            ROWS(2);                                                                                              \
            m0 += 2;                                                                                              \
        }                                                                                                         \
        if (m - m0 >= 1) ROWS(1);                                                                                 \
    } while (0)

/* bit 3: the blocked matmul (gemm_run, mq_call's flag 16) is compiled in (AVX512-VNNI); bit 4: the matmul is
 * the AVX2 form (gemv_avx2_run: every width, float32 products or 16-bit integer x), bits 0 and 2 then set as well */
int mq_gemv4_caps(void) {
    return (MQ_GEMV_F32 | MQ_GEMV_AVX2) | (MQ_GEMV_BF16 << 1) | ((MQ_GEMV_STREAM | MQ_GEMV_AVX2) << 2) |
           (MQ_GEMM_CAP << 3) | (MQ_GEMV_AVX2 << 4) | (MQ_GEMV_AVX2 << 5);
}

#if MQ_GEMV_F32
#define MQ_GEMV_RB 16 /* weight rows per thread task */
#ifndef MQ_GEMV_PREFETCH
#define MQ_GEMV_PREFETCH 2048 /* bytes of codes prefetched ahead of the ones being read (10-20% faster from DRAM) */
#endif

/* does block b+1 start a new (group of half 0, group of half 1) pair, or is b the last block */
static inline int flush_after(const int32_t *gix, int64_t b, int64_t nblk) {
    return b + 1 == nblk || gix[2 * b + 2] != gix[2 * b] || gix[2 * b + 3] != gix[2 * b + 1];
}

/* dst[0..cnt) = the float16 values src[0..cnt) as float32 (exact); returns dst */
static float *widen_f16(float *dst, const uint16_t *src, int64_t cnt) {
    int64_t i = 0;
    for (; i + 16 <= cnt; i += 16) _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(src + i))));
    if (i < cnt) {
        const __mmask16 mk = (__mmask16)((1u << (cnt - i)) - 1u);
        _mm512_mask_storeu_ps(dst + i, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, src + i)));
    }
    return dst;
}

/* y[i, r] for rows m0..m0+mb of x: the lanes of tot summed, minus sum_g s z (group sum of x~); sr, zr: the row's
 * float32 scales and zero points (ng each) */
static inline __attribute__((always_inline)) void finish_row(
    const __m512 *tot, int64_t r, int64_t ng, const float *sr, const float *zr, const float *xs, const int mb,
    int64_t m0, void *y, int ydtype, int64_t ys) {
    for (int i = 0; i < mb; ++i) {
        const float *xsi = xs + (m0 + i) * ng;
        __m512 c = _mm512_setzero_ps();
        int64_t g = 0;
        for (; g + 16 <= ng; g += 16)
            c = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_loadu_ps(sr + g), _mm512_loadu_ps(zr + g)),
                                _mm512_loadu_ps(xsi + g), c);
        if (g < ng) {
            const __mmask16 mk = (__mmask16)((1u << (ng - g)) - 1u);
            c = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, sr + g), _mm512_maskz_loadu_ps(mk, zr + g)),
                                _mm512_maskz_loadu_ps(mk, xsi + g), c);
        }
        const float v = _mm512_reduce_add_ps(tot[i]) - _mm512_reduce_add_ps(c);
        if (ydtype)
            ((uint16_t *)y)[(m0 + i) * ys + r] = bf16_bits(v);
        else
            ((float *)y)[(m0 + i) * ys + r] = v;
    }
}

/* bytes [32 b, 32 b + 32) of a weight row (the first bytes of the tail mask when b is past the full blocks), and
 * a prefetch MQ_GEMV_PREFETCH bytes ahead: a thread's rows are contiguous, so it fetches across row ends (a hint,
 * never faults) */
static inline __attribute__((always_inline)) __m256i load_codes(const uint8_t *row, int64_t b, int64_t full,
                                                                __mmask32 tail) {
#if MQ_GEMV_PREFETCH > 0
    _mm_prefetch((const char *)(row + b * 32 + MQ_GEMV_PREFETCH), _MM_HINT_T0);
#endif
    return (b < full) ? _mm256_loadu_si256((const void *)(row + b * 32)) : _mm256_maskz_loadu_epi8(tail, row + b * 32);
}

/* the bfloat16 products' accumulators of mb rows of x (as many of acc..acc4 as gemv4_rows uses for mb: four for
 * mb <= 2, two for mb <= 4, else one) summed, scaled lane-wise by sv into tot, and cleared */
static inline __attribute__((always_inline)) void flush_bf16(__m512 *tot, __m512 *acc, __m512 *acc2, __m512 *acc3,
                                                             __m512 *acc4, const int mb, const __m512 sv) {
    for (int i = 0; i < mb; ++i) {
        const __m512 a = mb > 4 ? acc[i]
                       : mb > 2 ? _mm512_add_ps(acc[i], acc2[i])
                                : _mm512_add_ps(_mm512_add_ps(acc[i], acc2[i]), _mm512_add_ps(acc3[i], acc4[i]));
        tot[i] = _mm512_fmadd_ps(a, sv, tot[i]);
        acc[i] = acc2[i] = acc3[i] = acc4[i] = _mm512_setzero_ps();
    }
}

/* where row i's scales t of int16 x (xmode 3) for block b start in xq (rows of nblk blocks): 4-bit containers, 16
 * lanes per block of 64 columns (a 128-column unit of the quad form uses its first block's, so a row ending in two
 * blocks after its units, 64 and at most 64 columns, has a slot for each); the other widths, one per block of 32
 * columns. Row m's start is the size of xq for m rows. */
static inline int64_t xq_at(int bits, int64_t i, int64_t nblk, int64_t b) {
    return bits == 4 ? (i * nblk + b) * 16 : i * nblk + b;
}

/* rows r0..r1 of the weight against rows m0..m0+mb of x (x~ permuted per block: xp, row stride xps, as float32
 * (xf) or bfloat16 bits (xb)); xs: (m, ng) group sums of x~ */
static inline __attribute__((always_inline)) void gemv4_rows(
    const uint8_t *q, int64_t r0, int64_t r1, int64_t row_bytes, int64_t kp, int64_t ng, const float *st,
    const float *zt, int64_t zs,
    const float *xf, const uint16_t *xb, const uint16_t *xl, int64_t xps, const float *xs, const int32_t *gix,
    const float *xq, const int64_t q128, const int mb, int64_t m0, void *y, int ydtype, int64_t ys) {
    const __m512i mask4 = _mm512_set1_epi16(0x0F);
#if MQ_GEMV_BF16
    /* bfloat16 bits of 0..15, twice (vpermw reads the low 5 bits of each index) */
    const __m512i tab = _mm512_set_epi16(
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040,
        0x4000, 0x3F80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0,
        0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
#endif
    const int64_t nblk = (kp + 63) / 64, full = kp / 64;
    const __mmask32 tail = (__mmask32)((1u << ((kp % 64) / 2)) - 1u);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *row = q + r * row_bytes;
        const float *sr = st + (r - r0) * ng, *zr = zt + (r - r0) * zs;
        /* bfloat16 products: with few rows of x, each row's products go to up to four accumulators (even / odd
         * columns, hi / lo halves of split x) so consecutive vdpbf16ps do not wait on each other's results */
        __m512 tot[8], acc[8], acc2[8], acc3[8], acc4[8];
        for (int i = 0; i < mb; ++i) tot[i] = acc[i] = acc2[i] = acc3[i] = acc4[i] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblk; b += b < 2 * q128 ? 2 : 1) {
#if MQ_GEMM_CAP
            if (xq != NULL && b >= 2 * q128) { /* a block of 64 columns after the units, x as 16-bit integers */
                const __m512i w = _mm512_cvtepu8_epi16(load_codes(row, b, full, tail));
                const __m512i lo = _mm512_and_si512(w, mask4), hi = _mm512_srli_epi16(w, 4);
                const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(sr[gix[2 * b]]), _mm256_set1_ps(sr[gix[2 * b + 1]]), 1);
                for (int i = 0; i < mb; ++i) { /* lane e: columns 4e..4e+3 (2 even and 2 odd ones) */
                    const uint16_t *xi = xb + (m0 + i) * xps + b * 64;
                    __m512i e = _mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512((const void *)xi));
                    e = _mm512_dpwssd_epi32(e, hi, _mm512_load_si512((const void *)(xi + 32)));
                    tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e),
                                             _mm512_mul_ps(sv, _mm512_loadu_ps(xq + xq_at(4, m0 + i, nblk, b))), tot[i]);
                }
                continue;
            }
            if (xq != NULL) { /* the quad form's 128 columns with x as 16-bit integers (xmode 3, above) */
                const uint8_t *p = row + b * 32;
#if MQ_GEMV_PREFETCH > 0
                _mm_prefetch((const char *)(p + MQ_GEMV_PREFETCH), _MM_HINT_T0);
#endif
                const __m512i w = _mm512_loadu_si512((const void *)p);
                const __m512i c0 = _mm512_and_si512(w, mask4), c1 = _mm512_and_si512(_mm512_srli_epi16(w, 4), mask4);
                const __m512i c2 = _mm512_and_si512(_mm512_srli_epi16(w, 8), mask4), c3 = _mm512_srli_epi16(w, 12);
                const __m512 sv = _mm512_set_ps(
                    sr[gix[2 * b + 3]], sr[gix[2 * b + 3]], sr[gix[2 * b + 3]], sr[gix[2 * b + 3]],
                    sr[gix[2 * b + 2]], sr[gix[2 * b + 2]], sr[gix[2 * b + 2]], sr[gix[2 * b + 2]],
                    sr[gix[2 * b + 1]], sr[gix[2 * b + 1]], sr[gix[2 * b + 1]], sr[gix[2 * b + 1]],
                    sr[gix[2 * b]], sr[gix[2 * b]], sr[gix[2 * b]], sr[gix[2 * b]]);
                for (int i = 0; i < mb; ++i) {
                    const uint16_t *xi = xb + (m0 + i) * xps + b * 64;
                    __m512i e0 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), c0, _mm512_load_si512((const void *)xi));
                    __m512i e1 = _mm512_dpwssd_epi32(_mm512_setzero_si512(), c1,
                                                     _mm512_load_si512((const void *)(xi + 32)));
                    e0 = _mm512_dpwssd_epi32(e0, c2, _mm512_load_si512((const void *)(xi + 64)));
                    e1 = _mm512_dpwssd_epi32(e1, c3, _mm512_load_si512((const void *)(xi + 96)));
                    /* the unit's integer sums (at most 8 * 32767 * 15 per lane) once to float32, times s t */
                    tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(e0, e1)),
                                             _mm512_mul_ps(sv, _mm512_loadu_ps(xq + xq_at(4, m0 + i, nblk, b))), tot[i]);
                }
                continue;
            }
#endif
#if MQ_GEMV_BF16
            if (b < 2 * q128) { /* 128 columns, bfloat16 products (the quad form, above) */
                const uint8_t *p = row + b * 32;
#if MQ_GEMV_PREFETCH > 0
                _mm_prefetch((const char *)(p + MQ_GEMV_PREFETCH), _MM_HINT_T0);
#endif
                const __m512i w = _mm512_loadu_si512((const void *)p);
                const __m512i n0 = _mm512_permutexvar_epi16(w, tab);
                const __m512i n1 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), tab);
                const __m512i n2 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 8), tab);
                const __m512i n3 = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 12), tab);
                for (int h = 0; h < (xl != NULL ? 2 : 1); ++h) /* h 1: the low halves of split x */
                    for (int i = 0; i < mb; ++i) {
                        const uint16_t *xi = (h ? xl : xb) + (m0 + i) * xps + b * 64;
                        const __m512bh a = (__m512bh)_mm512_load_si512((const void *)xi);
                        const __m512bh c = (__m512bh)_mm512_load_si512((const void *)(xi + 32));
                        const __m512bh d = (__m512bh)_mm512_load_si512((const void *)(xi + 64));
                        const __m512bh e = (__m512bh)_mm512_load_si512((const void *)(xi + 96));
                        if (mb <= 2) {
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n0, a);
                            acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)n1, c);
                            acc3[i] = _mm512_dpbf16_ps(acc3[i], (__m512bh)n2, d);
                            acc4[i] = _mm512_dpbf16_ps(acc4[i], (__m512bh)n3, e);
                        } else if (mb <= 4) {
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n0, a);
                            acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)n1, c);
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n2, d);
                            acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)n3, e);
                        } else {
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n0, a);
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n1, c);
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n2, d);
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)n3, e);
                        }
                    }
                if (flush_after(gix, b + 1, nblk)) {
                    /* lanes 4h..4h+3 sum columns 32h..32h+31 of the unit (lane e of a product: columns 8e..8e+7):
                     * the group of half h % 2 of block b + h / 2 */
                    const __m512 sv = _mm512_set_ps(
                        sr[gix[2 * b + 3]], sr[gix[2 * b + 3]], sr[gix[2 * b + 3]], sr[gix[2 * b + 3]],
                        sr[gix[2 * b + 2]], sr[gix[2 * b + 2]], sr[gix[2 * b + 2]], sr[gix[2 * b + 2]],
                        sr[gix[2 * b + 1]], sr[gix[2 * b + 1]], sr[gix[2 * b + 1]], sr[gix[2 * b + 1]],
                        sr[gix[2 * b]], sr[gix[2 * b]], sr[gix[2 * b]], sr[gix[2 * b]]);
                    flush_bf16(tot, acc, acc2, acc3, acc4, mb, sv);
                }
                continue;
            }
#endif
            const __m256i raw = load_codes(row, b, full, tail);
            const __m512i w = _mm512_cvtepu8_epi16(raw);
            const __m512i lo = _mm512_and_si512(w, mask4), hi = _mm512_srli_epi16(w, 4);
            if (xb != NULL) {
#if MQ_GEMV_BF16
                const __m512i lob = _mm512_permutexvar_epi16(lo, tab), hib = _mm512_permutexvar_epi16(hi, tab);
                for (int i = 0; i < mb; ++i) {
                    const uint16_t *xi = xb + (m0 + i) * xps + b * 64;
                    acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)lob, (__m512bh)_mm512_load_si512((const void *)xi));
                    if (mb <= 4)
                        acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)hib,
                                                   (__m512bh)_mm512_load_si512((const void *)(xi + 32)));
                    else
                        acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)hib,
                                                  (__m512bh)_mm512_load_si512((const void *)(xi + 32)));
                }
                if (xl != NULL) /* the low halves of split x: x~ = hi + lo */
                    for (int i = 0; i < mb; ++i) {
                        const uint16_t *xi = xl + (m0 + i) * xps + b * 64;
                        const __m512bh l0 = (__m512bh)_mm512_load_si512((const void *)xi);
                        const __m512bh l1 = (__m512bh)_mm512_load_si512((const void *)(xi + 32));
                        if (mb <= 2) {
                            acc3[i] = _mm512_dpbf16_ps(acc3[i], (__m512bh)lob, l0);
                            acc4[i] = _mm512_dpbf16_ps(acc4[i], (__m512bh)hib, l1);
                        } else if (mb <= 4) {
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)lob, l0);
                            acc2[i] = _mm512_dpbf16_ps(acc2[i], (__m512bh)hib, l1);
                        } else {
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)lob, l0);
                            acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)hib, l1);
                        }
                    }
#endif
            } else {
                const __m512 la = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(lo)));
                const __m512 lb = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(lo, 1)));
                const __m512 ha = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(hi)));
                const __m512 hb = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(hi, 1)));
                for (int i = 0; i < mb; ++i) {
                    const float *xi = xf + (m0 + i) * xps + b * 64;
                    acc[i] = _mm512_fmadd_ps(la, _mm512_load_ps(xi), acc[i]);       /* half 0, even columns */
                    acc[i] = _mm512_fmadd_ps(ha, _mm512_load_ps(xi + 32), acc[i]);  /* half 0, odd columns */
                    acc2[i] = _mm512_fmadd_ps(lb, _mm512_load_ps(xi + 16), acc2[i]); /* half 1, even */
                    acc2[i] = _mm512_fmadd_ps(hb, _mm512_load_ps(xi + 48), acc2[i]); /* half 1, odd */
                }
            }
            if (flush_after(gix, b, nblk)) {
                const float s0 = sr[gix[2 * b]], s1 = sr[gix[2 * b + 1]];
                if (xb != NULL) {
                    const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
                    flush_bf16(tot, acc, acc2, acc3, acc4, mb, sv);
                } else {
                    const __m512 sv0 = _mm512_set1_ps(s0), sv1 = _mm512_set1_ps(s1);
                    for (int i = 0; i < mb; ++i) {
                        tot[i] = _mm512_fmadd_ps(acc[i], sv0, tot[i]);
                        tot[i] = _mm512_fmadd_ps(acc2[i], sv1, tot[i]);
                        acc[i] = acc2[i] = _mm512_setzero_ps();
                    }
                }
            }
        }
        finish_row(tot, r, ng, sr, zr, xs, mb, m0, y, ydtype, ys);
    }
}

/* Stream rows (every layout but 4-bit containers: 8-bit containers, one code per byte; the dense 3/5/6/7-bit bit
 * stream; 1- and 2-bit containers, which are 1- and 2-bit streams, lowest bits first): blocks of 32 columns, each
 * inside one group (groups are multiples of 32), x~ in column order, element e of a block's vectors column e.
 * Block b is the cb * 4 bytes from byte cb * 4 * b. With AVX512-VBMI, codes of fewer than 8 bits are unpacked in
 * registers:
 *   - cb <= 5 with bfloat16 products: qword lane L holds 8 bytes that contain codes 4L..4L+3, the low byte of its
 *     16-bit lane i the 8 bits from code 4L + i's first bit (vpmultishiftqb); vpermw reads that byte's low 5 bits
 *     as the index into a 32-entry table whose entry i is bfloat16(i mod 2^cb), which drops the bits above the code
 *     without a mask. The lanes' qwords: where the block lies well inside the row, 64-bit broadcasts from memory at
 *     one to three byte offsets (one for cb <= 2, two for 3, three for 5), merged lane-wise (vpblendmq); near the
 *     row's end, a masked load and vpermb. The broadcasts replace a shuffle: 26% faster on dense 3-bit rows;
 *   - otherwise: qword lane L takes the cb bytes of codes 8L..8L+7 (vpermb), byte i of the lane the 8 bits from
 *     bit i cb (vpmultishiftqb), masked to cb bits; the codes (0..255, exact in bfloat16) are widened to float32
 *     and, for bfloat16 products, packed to bfloat16 pairs (vcvtne2ps2bf16).
 * With int16 x (xq: t per row and block) the table holds i mod 2^cb as 16-bit integers, or the bytes are widened
 * to 16 bits, and each block's vpdpwssd sum is converted to float32 and scaled by s t on its own.
 * gix[2b] = gix[2b + 1] is block b's group. cb is a compile-time constant at every call (specialised bodies). */
static inline __attribute__((always_inline)) void gemvs_rows(
    const int cb, const uint8_t *q, int64_t r0, int64_t r1, int64_t row_bytes, int64_t kp, int64_t ng,
    const float *st, const float *zt, int64_t zs, const float *xf, const uint16_t *xb, const uint16_t *xl,
    int64_t xps, const float *xs,
    const int32_t *gix, const float *xq, const int mb, int64_t m0, void *y, int ydtype, int64_t ys) {
    const int64_t nblk = (kp + 31) / 32, full = kp / 32;
    const int64_t tail_bytes = ((kp % 32) * cb + 7) / 8;
    const __mmask32 tail = (__mmask32)((1ull << tail_bytes) - 1u);
#if MQ_GEMV_STREAM
    uint8_t perm[32], ctrl[32], wperm[64], wctrl[64];
    uint16_t tab16[32];
    for (int lane = 0; lane < 4; ++lane)
        for (int i = 0; i < 8; ++i) {
            perm[8 * lane + i] = (uint8_t)(lane * cb + i);
            ctrl[8 * lane + i] = (uint8_t)(i * cb);
        }
    for (int lane = 0; lane < 8; ++lane) { /* qword lane L: codes 4L..4L+3 (the word form) */
        const int first = 4 * lane * cb / 8; /* the byte holding the lane's first code bit */
        for (int i = 0; i < 8; ++i) wperm[8 * lane + i] = (uint8_t)(first + i); /* past the block: zero, unused */
        for (int i = 0; i < 4; ++i) {
            wctrl[8 * lane + 2 * i] = (uint8_t)((4 * lane + i) * cb - 8 * first);
            wctrl[8 * lane + 2 * i + 1] = 0;
        }
    }
    /* broadcast form of the word lanes (blocks with b < safe): lane L's qword from one of at most 3 source byte
     * offsets src[] (greedy: a new one where the lane's 4 codes would pass the current 8 bytes), lmask[j] the lanes
     * of source j; every offset + 8 <= 4 * 5 + 8 < 32 bytes, inside the 32 bytes `safe` keeps in the row */
    uint8_t bctrl[64];
    int nsrc = 0, src[3] = {0, 0, 0};
    __mmask8 lmask[3] = {0, 0, 0};
    if (cb <= 5)
        for (int lane = 0; lane < 8; ++lane) {
            const int bit0 = 4 * lane * cb;
            if (nsrc == 0 || bit0 + 4 * cb > 8 * src[nsrc - 1] + 64) src[nsrc++] = bit0 / 8;
            lmask[nsrc - 1] |= (__mmask8)(1u << lane);
            for (int i = 0; i < 4; ++i) {
                bctrl[8 * lane + 2 * i] = (uint8_t)((4 * lane + i) * cb - 8 * src[nsrc - 1]);
                bctrl[8 * lane + 2 * i + 1] = 0;
            }
        }
    const __m512i vbctrl = _mm512_loadu_si512((const void *)bctrl);
    for (int e = 0; e < 32; ++e) /* the code as bfloat16 (exact), or as a 16-bit integer for int16 x (xmode 3) */
        tab16[e] = xq != NULL ? (uint16_t)(e & ((1 << cb) - 1)) : (uint16_t)(f2u((float)(e & ((1 << cb) - 1))) >> 16);
    const __m256i vperm = _mm256_loadu_si256((const void *)perm), vctrl = _mm256_loadu_si256((const void *)ctrl);
    const __m512i vwperm = _mm512_loadu_si512((const void *)wperm), vwctrl = _mm512_loadu_si512((const void *)wctrl);
    const __m256i vmask = _mm256_set1_epi8((char)((1 << cb) - 1));
    const __m512i tab = _mm512_loadu_si512((const void *)tab16);
    const __mmask32 blk = (__mmask32)((1ull << (4 * cb)) - 1u);
    const int64_t safe = row_bytes >= 32 ? (row_bytes - 32) / (4 * cb) + 1 : 0; /* blocks b with 4 cb b + 32 <= row_bytes */
    const int words = cb <= 5 && xb != NULL; /* the 16-bit lane form (above) */
#else
    (void)tail_bytes;
#endif
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *row = q + r * row_bytes;
        const float *sr = st + (r - r0) * ng, *zr = zt + (r - r0) * zs;
        __m512 tot[8], acc[8], acc2[8];
        for (int i = 0; i < mb; ++i) tot[i] = acc[i] = acc2[i] = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblk; ++b) {
            __m256i raw = _mm256_setzero_si256();
            __m512bh wb;
#if !MQ_GEMV_STREAM
            (void)wb; /* set only by the stream widths' unpacking (AVX512-VBMI) */
#endif
            if (cb == 8) {
                raw = load_codes(row, b, full, tail);
            } else {
#if MQ_GEMV_STREAM
                const uint8_t *p = row + b * 4 * cb;
#if MQ_GEMV_PREFETCH > 0
                _mm_prefetch((const char *)(p + MQ_GEMV_PREFETCH), _MM_HINT_T0);
#endif
                /* a plain 32-byte load while it stays inside the row (a masked load is slower), else masked */
                const __m256i v32 = b < safe ? _mm256_loadu_si256((const void *)p)
                                             : _mm256_maskz_loadu_epi8(b < full ? blk : tail, p);
                if (words && b < safe) {
                    __m512i v = _mm512_set1_epi64(*(const long_u *)(p + src[0]));
                    if (nsrc > 1) v = _mm512_mask_blend_epi64(lmask[1], v, _mm512_set1_epi64(*(const long_u *)(p + src[1])));
                    if (nsrc > 2) v = _mm512_mask_blend_epi64(lmask[2], v, _mm512_set1_epi64(*(const long_u *)(p + src[2])));
                    wb = (__m512bh)_mm512_permutexvar_epi16(_mm512_multishift_epi64_epi8(vbctrl, v), tab);
                } else if (words) {
                    const __m512i v = _mm512_zextsi256_si512(v32);
                    wb = (__m512bh)_mm512_permutexvar_epi16(
                        _mm512_multishift_epi64_epi8(vwctrl, _mm512_permutexvar_epi8(vwperm, v)), tab);
                } else {
                    raw = _mm256_and_si256(_mm256_multishift_epi64_epi8(vctrl, _mm256_permutexvar_epi8(vperm, v32)),
                                           vmask);
                }
#endif /* without VBMI gemv_run declines every cb but 4 and 8 */
            }
#if MQ_GEMM_CAP
            if (xq != NULL) { /* x as 16-bit integers per block (xmode 3): codes as int16 pairs, vpdpwssd */
#if MQ_GEMV_STREAM
                const __m512i wi = words ? (__m512i)wb : _mm512_cvtepu8_epi16(raw);
#else
                const __m512i wi = _mm512_cvtepu8_epi16(raw);
#endif
                const float sb = sr[gix[2 * b]];
                for (int i = 0; i < mb; ++i) { /* the block's integer sum (at most 32 * 255 * 32767) times s t */
                    const __m512i e = _mm512_dpwssd_epi32(_mm512_setzero_si512(), wi, _mm512_load_si512(
                                                              (const void *)(xb + (m0 + i) * xps + b * 32)));
                    tot[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(e), _mm512_set1_ps(sb * xq[xq_at(cb, m0 + i, nblk, b)]), tot[i]);
                }
                continue;
            }
#endif
            if (xb != NULL) {
#if MQ_GEMV_BF16
#if MQ_GEMV_STREAM
                if (!words)
#endif
                    wb = _mm512_cvtne2ps_pbh(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(raw, 1))),
                                             _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(raw))));
                for (int i = 0; i < mb; ++i)
                    acc[i] = _mm512_dpbf16_ps(acc[i], wb, (__m512bh)_mm512_load_si512(
                                                          (const void *)(xb + (m0 + i) * xps + b * 32)));
                if (xl != NULL)
                    for (int i = 0; i < mb; ++i)
                        acc2[i] = _mm512_dpbf16_ps(acc2[i], wb, (__m512bh)_mm512_load_si512(
                                                              (const void *)(xl + (m0 + i) * xps + b * 32)));
#endif
            } else {
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_castsi256_si128(raw)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm256_extracti128_si256(raw, 1)));
                for (int i = 0; i < mb; ++i) {
                    const float *xi = xf + (m0 + i) * xps + b * 32;
                    acc[i] = _mm512_fmadd_ps(lo, _mm512_load_ps(xi), acc[i]);
                    acc2[i] = _mm512_fmadd_ps(hi, _mm512_load_ps(xi + 16), acc2[i]);
                }
            }
            if (flush_after(gix, b, nblk)) {
                const __m512 sv = _mm512_set1_ps(sr[gix[2 * b]]);
                for (int i = 0; i < mb; ++i) {
                    tot[i] = _mm512_fmadd_ps(_mm512_add_ps(acc[i], acc2[i]), sv, tot[i]);
                    acc[i] = acc2[i] = _mm512_setzero_ps();
                }
            }
        }
        finish_row(tot, r, ng, sr, zr, xs, mb, m0, y, ydtype, ys);
    }
}

/* float32 lanes rounded to bfloat16 values: bf16_bits lane-wise, widened back (round to nearest even; NaN ->
 * 0x7FC0) */
static inline __m512 bf16_round_v(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd),
                                 _mm512_set1_epi32((int)0xFFFF0000u));
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(r);
}

/* 16 float32 lanes holding bfloat16 values -> their 16-bit patterns, stored at o */
static inline void store_bf16_v(uint16_t *o, __m512 v) {
    _mm256_storeu_si256((__m256i *)o, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}

/* h[0..8): 128 columns of x, 16 per vector, reordered in place so that h[2f], h[2f + 1] hold columns 4e + f
 * (e = 0..31, f = 0..3): the order of the 4-bit kernel's quad form (four codes per 16-bit lane) */
static inline void quad_order(__m512 *h) {
    const __m512i iab = _mm512_set_epi32(29, 25, 21, 17, 13, 9, 5, 1, 28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i icd = _mm512_add_epi32(iab, _mm512_set1_epi32(2));
    __m512 out[8];
    for (int half = 0; half < 2; ++half) { /* columns 64 half .. 64 half + 63 */
        const __m512 *v = h + 4 * half;
        /* lanes 0-7: offset 0 (2) of each 4 columns, lanes 8-15: offset 1 (3), from 32 columns each */
        const __m512 ab0 = _mm512_permutex2var_ps(v[0], iab, v[1]), ab1 = _mm512_permutex2var_ps(v[2], iab, v[3]);
        const __m512 cd0 = _mm512_permutex2var_ps(v[0], icd, v[1]), cd1 = _mm512_permutex2var_ps(v[2], icd, v[3]);
        out[half] = _mm512_shuffle_f32x4(ab0, ab1, 0x44);
        out[2 + half] = _mm512_shuffle_f32x4(ab0, ab1, 0xEE);
        out[4 + half] = _mm512_shuffle_f32x4(cd0, cd1, 0x44);
        out[6 + half] = _mm512_shuffle_f32x4(cd0, cd1, 0xEE);
    }
    for (int j = 0; j < 8; ++j) h[j] = out[j];
}

/* 16 columns of row i of x from column j0 as float32 (zeros from column k on) */
static inline __m512 load_x16(const void *x, int xdtype, int64_t i, int64_t xstride, int64_t j0, int64_t k) {
    const int64_t left = k - j0;
    const __mmask16 mk = (__mmask16)(left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1u);
    return xdtype ? _mm512_castsi512_ps(_mm512_slli_epi32(
                        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + i * xstride + j0)), 16))
                  : _mm512_maskz_loadu_ps(mk, (const float *)x + i * xstride + j0);
}

/* The kernels' copy of x, 16 columns at a time (ng == 1, or groups of a multiple of 16 columns, so that each 16
 * lie in one group): per row, x~ (x itself, rounded to bfloat16, split into hi + lo, or with ix as 16-bit
 * integers v per 32 columns, x~ = t v, their scales t in xq at xq_at), its group sums xs, and the copy the
 * kernels read (4-bit: per block of 64 columns its 32 even columns, then its 32 odd ones, or per unit of 128 the
 * quad order; streams: column order) as float32, bfloat16 bits or int16; zeros beyond k. Returns 0, or with ix
 * -5 (a value of x not finite, or 32 columns' largest magnitude below 2^-100: the caller splits instead). */
static int prep_x(const void *x, int xdtype, int64_t m, int64_t xstride, int64_t k, int bits, int64_t bw,
                  int64_t nblk, int64_t xps, int bf16, int split, int xmode, int ix, int64_t ge, int64_t ng,
                  int64_t q128, void *xp, float *xs, float *xq) {
    const __m512i ev = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
    for (int64_t i = 0; i < m; ++i) {
        float *xsi = xs + i * ng;
        for (int64_t g = 0; g < ng; ++g) xsi[g] = 0.0f;
        __m512 gacc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nblk; b += b < 2 * q128 ? 2 : 1) {
            const int quad = b < 2 * q128, nv = quad ? 8 : (int)(bw / 16); /* 16-column chunks of this unit */
            __m512 hv[8], lv[8];
            float tq[4] = {0.0f, 0.0f, 0.0f, 0.0f}, iq[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (ix) { /* per 32 columns c: t = their largest magnitude / 32767, v = round_half_even(x / t) */
                for (int h = 0; h < (quad ? 4 : (int)(bw / 32)); ++h) {
                    const __m512 a = load_x16(x, xdtype, i, xstride, b * bw + 32 * h, k);
                    const __m512 c = load_x16(x, xdtype, i, xstride, b * bw + 32 * h + 16, k);
                    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(c)));
                    /* NaN or infinity, or a reciprocal that could overflow */
                    if (_mm512_fpclass_ps_mask(a, 0x99) || _mm512_fpclass_ps_mask(c, 0x99) ||
                        (amax > 0.0f && amax < 0x1p-100f))
                        return -5;
                    tq[h] = amax / 32767.0f, iq[h] = amax > 0.0f ? 32767.0f / amax : 0.0f;
                }
                /* lanes 4h..4h+3 of the quad form's products sum columns 32h..32h+31: their t, lane-wise; a
                 * block of 64 columns after the units (even columns, then odd): lanes 0..7 sum columns 0..31, 8..15
                 * the rest (t 0 where they lie beyond k: zero x, zero codes) */
                if (bits != 4) /* a stream block: 32 columns, one t */
                    xq[xq_at(bits, i, nblk, b)] = tq[0];
                else
                    _mm512_storeu_ps(xq + xq_at(bits, i, nblk, b),
                                     quad ? _mm512_set_ps(tq[3], tq[3], tq[3], tq[3], tq[2], tq[2], tq[2], tq[2], tq[1],
                                                          tq[1], tq[1], tq[1], tq[0], tq[0], tq[0], tq[0])
                                          : _mm512_insertf32x8(_mm512_set1_ps(tq[0]), _mm256_set1_ps(tq[1]), 1));
            }
            for (int v = 0; v < nv; ++v) {
                const int64_t j0 = b * bw + 16 * v, left = k - j0;
                __m512 val = load_x16(x, xdtype, i, xstride, j0, k), lo = _mm512_setzero_ps(), sum;
                if (ix) { /* v as float32 (exact integers), x~ = t v */
                    val = _mm512_cvtepi32_ps(_mm512_cvtps_epi32(_mm512_mul_ps(val, _mm512_set1_ps(iq[v / 2]))));
                    sum = _mm512_mul_ps(val, _mm512_set1_ps(tq[v / 2]));
                } else if (split) { /* v = hi + lo, both bfloat16 values (v - hi is exact in float32) */
                    const __m512 hi = bf16_round_v(val);
                    lo = bf16_round_v(_mm512_sub_ps(val, hi));
                    val = hi;
                    sum = _mm512_add_ps(val, lo);
                } else {
                    if (xmode == 1) val = bf16_round_v(val);
                    sum = val;
                }
                hv[v] = val, lv[v] = lo;
                if (left > 0) { /* the group sums of x~ (hi + lo: exact), flushed at each group's last chunk */
                    gacc = _mm512_add_ps(gacc, sum);
                    const int64_t g = ng > 1 ? j0 / ge : 0;
                    if (left <= 16 || (ng > 1 && (j0 + 16) / ge != g)) {
                        xsi[g] += _mm512_reduce_add_ps(gacc);
                        gacc = _mm512_setzero_ps();
                    }
                }
            }
            if (quad) { /* per 128 columns: columns 4e, then 4e + 1, 4e + 2, 4e + 3 (e = 0..31) */
                quad_order(hv);
                if (split) quad_order(lv);
            } else if (bits == 4) { /* per 64 columns: the 32 even ones, then the 32 odd ones */
                const __m512 e0 = _mm512_permutex2var_ps(hv[0], ev, hv[1]), e1 = _mm512_permutex2var_ps(hv[2], ev, hv[3]);
                const __m512 o0 = _mm512_permutex2var_ps(hv[0], od, hv[1]), o1 = _mm512_permutex2var_ps(hv[2], od, hv[3]);
                hv[0] = e0, hv[1] = e1, hv[2] = o0, hv[3] = o1;
                if (split) {
                    const __m512 f0 = _mm512_permutex2var_ps(lv[0], ev, lv[1]), f1 = _mm512_permutex2var_ps(lv[2], ev, lv[3]);
                    const __m512 p0 = _mm512_permutex2var_ps(lv[0], od, lv[1]), p1 = _mm512_permutex2var_ps(lv[2], od, lv[3]);
                    lv[0] = f0, lv[1] = f1, lv[2] = p0, lv[3] = p1;
                }
            }
            for (int v = 0; v < nv; ++v) {
                const int64_t d = i * xps + b * bw + 16 * v;
                if (ix) {
                    _mm256_storeu_si256((__m256i *)((int16_t *)xp + d), _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(hv[v])));
                } else if (bf16) {
                    store_bf16_v((uint16_t *)xp + d, hv[v]);
                    if (split) store_bf16_v((uint16_t *)xp + m * xps + d, lv[v]);
                } else {
                    _mm512_storeu_ps((float *)xp + d, hv[v]);
                }
            }
        }
    }
    return 0;
}
#endif

/* ---------------------------------------------------------------------------------------------------------
 * The weight-only matmul on CPUs with AVX2 + FMA but without AVX512F + BW (gemv_avx2_run, called by gemv_run in
 * such builds): every width (4- and 8-bit containers, 1- and 2-bit containers, the dense 3/5/6/7-bit stream),
 * every group layout gemv_run takes, the same sum as above,
 *
 *     y[i, r] = sum_g s[r, g] * ( sum_{j in g} u[r, j] x~[i, j] )  -  sum_g s[r, g] z[r, g] X[i, g],
 *     X[i, g] = sum_{j in g} x~[i, j],
 *
 * in one of two forms chosen by xmode:
 *
 * - float32 (xmode 0, 1, 2): x~ is x itself for xmode 0 and 2 (no bfloat16 products here, so split x is exact,
 *   as in an AVX512 build without AVX512-BF16) and x rounded to bfloat16 for xmode 1. Codes widened to float32
 *   (vcvtdq2ps) are exact, so each product u x~ is exact; the sums are float32 (FMA).
 * - int16 (xmode 3), as the AVX512-VNNI build: per row of x and block c of 32 columns (column 32c on, zeros past
 *   k), t = max_{j in c} |x[j]| / 32767 and x~ = t * v, v = round_half_even(x * (32767 / max |x|)) a 16-bit
 *   integer; codes widened to 16-bit integers and multiplied by v in pairs (vpmaddwd: int32 sums, at most
 *   32 * 255 * 32767 per block, exact), each block's integer sum converted to float32 once and multiplied by t
 *   (FMA). No float conversion per code: 1.24-1.38x the float32 form's speed per W4 g128 layer at M = 1 on a Zen 1
 *   CPU. An x with a value that is not finite, or a block whose largest magnitude is in (0, 2^-100), runs the
 *   float32 form with x~ = x (xmode 2).
 * - int8 (xmode 4; 4-bit containers, other widths take it as xmode 3): per row of x and activation block a of
 *   32 bpa columns (bpa = 4, or the largest of 2 and 1 dividing a group's blocks), t = max_{j in a} |x[j]| / 127,
 *   x~ = t * v with v = round_half_even(x * (127 / max |x|)) in -127..127 (x to 2^-8 of its block's largest
 *   magnitude, as llama.cpp's CPU kernels take activations); codes times v by vpmaddubsw (unsigned code bytes
 *   times signed x bytes, pairs summed in 16 bits: at most 2 * 15 * 127 per pair, 4 blocks' sums at most 15240,
 *   exact), widened by vpmaddwd against ones, converted once per activation block and scaled by t. No widening of
 *   codes at all: the kernel reads the packed bytes about as fast as the memory delivers them (avx2_rows_i8).
 *   Non-finite x, or a block in (0, 2^-100), runs the float32 form as for int16.
 *
 * Blocks of 32 columns in column order, each inside one group (groups are multiples of 32 columns, or one group
 * covers the row). A block's codes: 8-bit containers, the row's own 32 bytes; 4-bit containers, 16 bytes whose
 * low nibbles are the block's even columns and high nibbles its odd ones, kept in that order (the copy of x the
 * kernel reads holds each block's 16 even columns, then its 16 odd ones: no interleaving per block); other
 * widths, 16 codes at a time by a byte shuffle and a 16-bit multiply (stream16 below). The columns after the last
 * full block (k not a multiple of 32) are read one code at a time into a zero-filled block (in the same order).
 * Float32 form: four (up to 2 rows of x) or two accumulators of 8 lanes per row of x, so that consecutive FMAs do
 * not wait on each other; int16 form: two, alternating by block. At a group's last block the accumulators are
 * scaled by s[r, g] into the row's total. Up to 8 rows of x share each widened block. Rows of the weight are split
 * over threads (OpenMP), MQ_GEMV_RB at a time.
 * --------------------------------------------------------------------------------------------------------- */
#if MQ_GEMV_AVX2
#include <immintrin.h>
#define MQ_GEMV_RB 16
#ifndef MQ_AVX2_PREFETCH
#define MQ_AVX2_PREFETCH 1024 /* bytes of codes prefetched ahead of the ones being read (a hint, never faults) */
#endif

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* where column e (0..31) of a block sits in the kernel's order: 4-bit containers, the even columns then the odd
 * ones; other widths, column order */
static inline int avx2_pos(int bits, int e) { return bits == 4 ? (e & 1) * 16 + e / 2 : e; }

/* 32 byte codes, the block's first 16 (kernel order) in a and the rest in b, as four vectors of 8 float32 codes */
static inline __attribute__((always_inline)) void widen_bytes(__m128i a, __m128i b, __m256 *c) {
    c[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a));
    c[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8)));
    c[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
    c[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)));
}

/* 4-bit containers: the 16 bytes at p as the block's even columns (low nibbles) and odd columns (high nibbles) */
static inline __attribute__((always_inline)) void split_nib(const uint8_t *p, __m128i *lo, __m128i *hi) {
    const __m128i w = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(0x0F);
    *lo = _mm_and_si128(w, m4);
    *hi = _mm_and_si128(_mm_srli_epi16(w, 4), m4);
}

/* The in-register unpacking of a stream of `bits`-bit codes (1, 2, 3, 5, 6, 7; every layout but 4- and 8-bit
 * containers), 16 codes at a time: their 2 * bits bytes (16 bytes loaded, broadcast to both 128-bit lanes), code
 * e of the 16 in 16-bit lane e, holding the two bytes from its first bit's byte (vpshufb), shifted left by
 * 16 - bits - sh (sh: the code's first bit within that byte) by a 16-bit multiply (vpmullw, modulo 2^16: the bits
 * above the code fall off) and right by 16 - bits: the code. A code spans at most two bytes (sh + bits <= 14). */
typedef struct {
    __m256i shuf, mul;
} mq_stream16;

static mq_stream16 stream16_tables(int bits) {
    uint8_t sh[32];
    int16_t mu[16];
    for (int e = 0; e < 16; ++e) {
        const int bit = e * bits, byte = bit / 8, lane = e / 8, w = e % 8;
        sh[16 * lane + 2 * w] = (uint8_t)byte;
        sh[16 * lane + 2 * w + 1] = (uint8_t)(byte + 1);
        mu[e] = (int16_t)(uint16_t)(1u << (16 - bits - bit % 8));
    }
    mq_stream16 t;
    t.shuf = _mm256_loadu_si256((const __m256i *)sh);
    t.mul = _mm256_loadu_si256((const __m256i *)mu);
    return t;
}

/* codes 16c..16c+15 of the row as 16-bit integers, code e in lane e; a group of 16 whose 16-byte read would pass
 * the row's end is read one code at a time */
static inline __attribute__((always_inline)) __m256i stream16(const uint8_t *row, int64_t row_bytes,
                                                              const int bits, int64_t c, const mq_stream16 *t) {
    const int64_t at = c * 2 * bits;
    if (at + 16 <= row_bytes) {
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + at)));
        return _mm256_srli_epi16(_mm256_mullo_epi16(_mm256_shuffle_epi8(v, t->shuf), t->mul), 16 - bits);
    }
    uint16_t u[16];
    for (int e = 0; e < 16; ++e) u[e] = (uint16_t)code_at(row, bits, 16 * c + e);
    return _mm256_loadu_si256((const __m256i *)u);
}

/* 16 codes as 16-bit integers (stream16) as two vectors of 8 float32 codes */
static inline __attribute__((always_inline)) void widen16(__m256i v, __m256 *out) {
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)));
}

/* 8 float32 values from element i of a float16 (h) or float32 array */
static inline __m256 load8_param(const void *a, int h, int64_t i) {
#if defined(__F16C__)
    if (h) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)a + i)));
#else
    if (h) {
        float t[8];
        for (int e = 0; e < 8; ++e) t[e] = f16_to_f32(((const uint16_t *)a)[i + e]);
        return _mm256_loadu_ps(t);
    }
#endif
    return _mm256_loadu_ps((const float *)a + i);
}

/* sum_g s[r, g] z[r, g] X[g] (the zero points' term of row r against one row of group sums X), 8 groups at a time
 * (float16 scales and zero points widened by F16C) */
static inline float szx(const mq_params *p, int64_t r, int64_t ng, const float *X) {
    const int64_t o = r * ng;
    __m256 a = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= ng; g += 8) {
        const __m256 zv = (p->sz & 4) ? _mm256_set1_ps(param_z(p, 0)) : load8_param(p->z, p->sz & 2, o + g);
        a = _mm256_fmadd_ps(_mm256_mul_ps(load8_param(p->s, p->sz & 1, o + g), zv), _mm256_loadu_ps(X + g), a);
    }
    float c = 0.0f;
    for (; g < ng; ++g) c += param_s(p, o + g) * param_z(p, o + g) * X[g];
    return hsum8(a) + c;
}

/* The codes of block b as the two forms read them: c, four vectors of 8 float32 codes (float32 form), or c16, two
 * vectors of 16 16-bit codes (int16 form), in the kernel's order (avx2_pos) */
static inline __attribute__((always_inline)) void avx2_block(const int bits, const int ix, const uint8_t *row,
                                                             int64_t row_bytes, int64_t k, int64_t kb, int64_t b,
                                                             const mq_stream16 *st16, __m256 *c, __m256i *c16) {
    __m128i a, h;
    if (b < kb) {
#if MQ_AVX2_PREFETCH > 0
        _mm_prefetch((const char *)(row + b * 4 * bits + MQ_AVX2_PREFETCH), _MM_HINT_T0);
#endif
        if (bits != 4 && bits != 8) {
            c16[0] = stream16(row, row_bytes, bits, 2 * b, st16);
            c16[1] = stream16(row, row_bytes, bits, 2 * b + 1, st16);
            if (!ix) widen16(c16[0], c), widen16(c16[1], c + 2);
            return;
        }
        if (bits == 4) {
            split_nib(row + 16 * b, &a, &h);
        } else {
            a = _mm_loadu_si128((const __m128i *)(row + 32 * b));
            h = _mm_loadu_si128((const __m128i *)(row + 32 * b + 16));
        }
    } else {
        uint8_t t[32];
        memset(t, 0, sizeof t);
        for (int64_t j = 32 * b; j < k; ++j) t[avx2_pos(bits, (int)(j - 32 * b))] = (uint8_t)code_at(row, bits, j);
        a = _mm_loadu_si128((const __m128i *)t);
        h = _mm_loadu_si128((const __m128i *)(t + 16));
    }
    if (ix) {
        c16[0] = _mm256_cvtepu8_epi16(a);
        c16[1] = _mm256_cvtepu8_epi16(h);
    } else {
        widen_bytes(a, h, c);
    }
}

/* rows r0..r1 of the weight against rows m0..m0+mb of x~ (float32 form: xp, rows of xps float32; int16 form: xv,
 * rows of xps 16-bit integers, and xt, rows of nb block scales t; both in the kernel's order with zeros from
 * column k on; xs: (m, ng) group sums of x~) */
static inline __attribute__((always_inline)) void avx2_rows(
    const int bits, const int ix, const uint8_t *q, int64_t r0, int64_t r1, int64_t row_bytes, int64_t k,
    int64_t ge, int64_t ng, const mq_params *prm, const float *xp, const int16_t *xv, const float *xt,
    int64_t xps, const float *xs, const int mb, int64_t m0, void *y, int ydtype, int64_t ys) {
    const int64_t kb = k / 32; /* full blocks; the rest of the columns (< 32) in a zero-filled block */
    const int64_t nb = kb + (k % 32 ? 1 : 0), bpg = ng > 1 ? ge / 32 : nb; /* blocks per group */
    const mq_stream16 st16 = stream16_tables(bits != 4 && bits != 8 ? bits : 1);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *row = q + r * row_bytes;
        __m256 tot[8], acc[8], acc2[8], acc3[8], acc4[8];
        for (int i = 0; i < mb; ++i) tot[i] = acc[i] = acc2[i] = acc3[i] = acc4[i] = _mm256_setzero_ps();
        for (int64_t b0 = 0, g = 0; b0 < nb; b0 += bpg, ++g) {
            const int64_t b1 = b0 + bpg < nb ? b0 + bpg : nb;
            for (int64_t b = b0; b < b1; ++b) {
                __m256 c[4];
                __m256i c16[2];
                avx2_block(bits, ix, row, row_bytes, k, kb, b, &st16, c, c16);
                for (int i = 0; i < mb; ++i) {
                    if (ix) { /* the block's integer sum (exact), to float32 once, times its t */
                        const int16_t *vi = xv + (m0 + i) * xps + 32 * b;
                        const __m256i p = _mm256_add_epi32(
                            _mm256_madd_epi16(c16[0], _mm256_load_si256((const __m256i *)vi)),
                            _mm256_madd_epi16(c16[1], _mm256_load_si256((const __m256i *)(vi + 16))));
                        const __m256 t = _mm256_set1_ps(xt[(m0 + i) * nb + b]);
                        if (b & 1)
                            acc2[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), t, acc2[i]);
                        else
                            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), t, acc[i]);
                        continue;
                    }
                    const float *xi = xp + (m0 + i) * xps + 32 * b;
                    if (mb <= 2) { /* four independent chains: consecutive FMAs do not wait on each other */
                        acc[i] = _mm256_fmadd_ps(c[0], _mm256_load_ps(xi), acc[i]);
                        acc2[i] = _mm256_fmadd_ps(c[1], _mm256_load_ps(xi + 8), acc2[i]);
                        acc3[i] = _mm256_fmadd_ps(c[2], _mm256_load_ps(xi + 16), acc3[i]);
                        acc4[i] = _mm256_fmadd_ps(c[3], _mm256_load_ps(xi + 24), acc4[i]);
                    } else {
                        acc[i] = _mm256_fmadd_ps(c[0], _mm256_load_ps(xi), acc[i]);
                        acc2[i] = _mm256_fmadd_ps(c[1], _mm256_load_ps(xi + 8), acc2[i]);
                        acc[i] = _mm256_fmadd_ps(c[2], _mm256_load_ps(xi + 16), acc[i]);
                        acc2[i] = _mm256_fmadd_ps(c[3], _mm256_load_ps(xi + 24), acc2[i]);
                    }
                }
            }
            const __m256 sv = _mm256_set1_ps(param_s(prm, r * ng + g)); /* the group's blocks done */
            for (int i = 0; i < mb; ++i) {
                const __m256 a = mb <= 2 && !ix
                                     ? _mm256_add_ps(_mm256_add_ps(acc[i], acc2[i]), _mm256_add_ps(acc3[i], acc4[i]))
                                     : _mm256_add_ps(acc[i], acc2[i]);
                tot[i] = _mm256_fmadd_ps(a, sv, tot[i]);
                acc[i] = acc2[i] = acc3[i] = acc4[i] = _mm256_setzero_ps();
            }
        }
        for (int i = 0; i < mb; ++i) {
            const float v = hsum8(tot[i]) - szx(prm, r, ng, xs + (m0 + i) * ng);
            if (ydtype)
                ((uint16_t *)y)[(m0 + i) * ys + r] = bf16_bits(v);
            else
                ((float *)y)[(m0 + i) * ys + r] = v;
        }
    }
}

/* The int8 form (xmode 4 on 4-bit containers): rows r0..r1 against rows m0..m0+mb of x~ held as 8-bit integers xb
 * (kernel order, zeros from column k on) with one t per bpa blocks of 32 columns (xt, nab per row). A block's 32
 * codes are one vector of unsigned bytes (the 16 low nibbles, the even columns, then the 16 high ones), multiplied
 * with x's signed bytes by vpmaddubsw (pairs summed into 16 bits: at most 2 * 15 * 127 = 3810, so the bpa <= 4
 * blocks of an activation block sum exactly in 16 bits), then vpmaddwd by ones into 32-bit sums, converted to
 * float32 once per activation block and scaled by its t; each group's total by its scale s. */
static inline __attribute__((always_inline)) void avx2_rows_i8(
    const uint8_t *q, int64_t r0, int64_t r1, int64_t row_bytes, int64_t k, int64_t ge, int64_t ng,
    const mq_params *prm, const int8_t *xb, const float *xt, int64_t xps, int64_t bpa, const float *xs,
    const int mb, int64_t m0, void *y, int ydtype, int64_t ys) {
    const int64_t kb = k / 32, nb = kb + (k % 32 ? 1 : 0), bpg = ng > 1 ? ge / 32 : nb;
    const int64_t nab = (nb + bpa - 1) / bpa;
    const __m256i ones = _mm256_set1_epi16(1), m4 = _mm256_set1_epi8(0x0F);
    for (int64_t r = r0; r < r1; ++r) {
        const uint8_t *row = q + r * row_bytes;
        __m256 tot[8], acc[8];
        for (int i = 0; i < mb; ++i) tot[i] = acc[i] = _mm256_setzero_ps();
        for (int64_t b0 = 0, g = 0; b0 < nb; b0 += bpg, ++g) {
            const int64_t b1 = b0 + bpg < nb ? b0 + bpg : nb;
            for (int64_t a0 = b0; a0 < b1; a0 += bpa) { /* the activation blocks of the group (bpa divides bpg) */
                const int64_t a1 = a0 + bpa < b1 ? a0 + bpa : b1;
                __m256i s16[8];
                for (int i = 0; i < mb; ++i) s16[i] = _mm256_setzero_si256();
                if (a1 - a0 == 4 && a1 <= kb) { /* a whole activation block of 128 columns: unrolled */
                    const uint8_t *p = row + 16 * a0;
#if MQ_AVX2_PREFETCH > 0
                    _mm_prefetch((const char *)(p + MQ_AVX2_PREFETCH), _MM_HINT_T0);
#endif
                    __m256i c4[4];
                    for (int e = 0; e < 4; ++e) {
                        const __m128i w = _mm_loadu_si128((const __m128i *)(p + 16 * e));
                        c4[e] = _mm256_and_si256(
                            _mm256_inserti128_si256(_mm256_castsi128_si256(w), _mm_srli_epi16(w, 4), 1), m4);
                    }
                    for (int i = 0; i < mb; ++i) {
                        const int8_t *xi = xb + (m0 + i) * xps + 32 * a0;
                        const __m256i p01 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(c4[0], _mm256_load_si256((const __m256i *)xi)),
                            _mm256_maddubs_epi16(c4[1], _mm256_load_si256((const __m256i *)(xi + 32))));
                        const __m256i p23 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(c4[2], _mm256_load_si256((const __m256i *)(xi + 64))),
                            _mm256_maddubs_epi16(c4[3], _mm256_load_si256((const __m256i *)(xi + 96))));
                        s16[i] = _mm256_add_epi16(p01, p23);
                    }
                } else
                for (int64_t b = a0; b < a1; ++b) {
                    __m256i c;
                    if (b < kb) {
#if MQ_AVX2_PREFETCH > 0
                        _mm_prefetch((const char *)(row + b * 16 + MQ_AVX2_PREFETCH), _MM_HINT_T0);
#endif
                        const __m128i w = _mm_loadu_si128((const __m128i *)(row + 16 * b));
                        c = _mm256_and_si256(
                            _mm256_inserti128_si256(_mm256_castsi128_si256(w), _mm_srli_epi16(w, 4), 1), m4);
                    } else {
                        uint8_t t[32];
                        memset(t, 0, sizeof t);
                        for (int64_t j = 32 * b; j < k; ++j) t[avx2_pos(4, (int)(j - 32 * b))] = (uint8_t)code_at(row, 4, j);
                        c = _mm256_loadu_si256((const __m256i *)t);
                    }
                    for (int i = 0; i < mb; ++i)
                        s16[i] = _mm256_add_epi16(
                            s16[i], _mm256_maddubs_epi16(c, _mm256_load_si256((const __m256i *)(xb + (m0 + i) * xps + 32 * b))));
                }
                for (int i = 0; i < mb; ++i)
                    acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16[i], ones)),
                                             _mm256_set1_ps(xt[(m0 + i) * nab + a0 / bpa]), acc[i]);
            }
            const __m256 sv = _mm256_set1_ps(param_s(prm, r * ng + g));
            for (int i = 0; i < mb; ++i) {
                tot[i] = _mm256_fmadd_ps(acc[i], sv, tot[i]);
                acc[i] = _mm256_setzero_ps();
            }
        }
        for (int i = 0; i < mb; ++i) {
            const float v = hsum8(tot[i]) - szx(prm, r, ng, xs + (m0 + i) * ng);
            if (ydtype)
                ((uint16_t *)y)[(m0 + i) * ys + r] = bf16_bits(v);
            else
                ((float *)y)[(m0 + i) * ys + r] = v;
        }
    }
}

/* row i of x as float32 into xr (bfloat16 x widened; rounded to bfloat16 when rnd), zeros from column k to xps */
static inline void avx2_load_row(const void *x, int xdtype, int64_t i, int64_t xstride, int64_t k, int64_t xps,
                                 int rnd, float *xr) {
    for (int64_t j = 0; j < k; ++j) {
        float v = xdtype ? u2f((uint32_t)((const uint16_t *)x)[i * xstride + j] << 16)
                         : ((const float *)x)[i * xstride + j];
        if (rnd) v = u2f((uint32_t)bf16_bits(v) << 16);
        xr[j] = v;
    }
    for (int64_t j = k; j < xps; ++j) xr[j] = 0.0f;
}

/* the largest magnitude of v[0..n) into *amax: -5 where a value is not finite or it is in (0, 2^-100) (too small
 * to scale into integers), else 0 */
static inline int avx2_block_amax(const float *v, int64_t n, float *amax) {
    float a = 0.0f;
    for (int64_t e = 0; e < n; ++e) {
        if (!isfinite(v[e])) return -5;
        a = fabsf(v[e]) > a ? fabsf(v[e]) : a;
    }
    *amax = a;
    return a > 0.0f && a < 0x1p-100f ? -5 : 0;
}

/* the group sums of one row of x~ (column order, k columns) into out[0..ng) */
static inline void avx2_group_sums(const float *xr, int64_t k, int64_t ge, int64_t ng, float *out) {
    for (int64_t g = 0; g < ng; ++g) {
        const int64_t c0 = g * ge, c1 = c0 + ge < k ? c0 + ge : k;
        float a = 0.0f;
        for (int64_t j = c0; j < c1; ++j) a += xr[j];
        out[g] = a;
    }
}

/* x~ for the kernel, row by row (avx2_rows' xp, or xv and xt with ix), and its group sums xs; xr: a scratch row of
 * xps float32. With ix, -5 where a value of x is not finite or a block's largest magnitude is in (0, 2^-100) (the
 * caller then runs the float32 form), else 0. */
static int avx2_prep(const void *x, int xdtype, int64_t m, int64_t xstride, int64_t k, int bits, int xmode, int ix,
                     int64_t ge, int64_t ng, int64_t xps, float *xr, float *xp, int16_t *xv, float *xt, float *xs) {
    const int64_t nb = xps / 32;
    for (int64_t i = 0; i < m; ++i) {
        avx2_load_row(x, xdtype, i, xstride, k, xps, xmode == 1, xr);
        for (int64_t b = 0; b < nb; ++b) {
            float *xb = xr + 32 * b;
            if (ix) { /* t = max |x| / 32767, v = round_half_even(x * (32767 / max |x|)) (vcvtps2dq), x~ = t v */
                float amax;
                if (avx2_block_amax(xb, 32, &amax) != 0) return -5;
                const float t = amax / 32767.0f, iq = amax > 0.0f ? 32767.0f / amax : 0.0f;
                int32_t v[32];
                for (int e = 0; e < 32; e += 8) {
                    const __m256i vi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + e), _mm256_set1_ps(iq)));
                    _mm256_storeu_si256((__m256i *)(v + e), vi);
                    _mm256_storeu_ps(xb + e, _mm256_mul_ps(_mm256_cvtepi32_ps(vi), _mm256_set1_ps(t)));
                }
                for (int e = 0; e < 32; ++e) xv[i * xps + 32 * b + avx2_pos(bits, e)] = (int16_t)v[e];
                xt[i * nb + b] = t;
            } else {
                for (int e = 0; e < 32; ++e) xp[i * xps + 32 * b + avx2_pos(bits, e)] = xb[e];
            }
        }
        avx2_group_sums(xr, k, ge, ng, xs + i * ng);
    }
    return 0;
}

/* x~ for the int8 form, row by row: per activation block a of 32 bpa columns (column order from 0),
 * t = max |x| / 127, v = round_half_even(x * (127 / max |x|)) (vcvtps2dq) in -127..127, x~ = t v; xb the v in the
 * kernel's order (avx2_pos), xt the t (nab per row), xs the group sums of x~; xr a scratch row of xps float32.
 * -5 where a value of x is not finite or a block's largest magnitude is in (0, 2^-100) (the caller then runs the
 * float32 form), else 0. */
static int avx2_prep_i8(const void *x, int xdtype, int64_t m, int64_t xstride, int64_t k, int64_t ge, int64_t ng,
                        int64_t xps, int64_t bpa, float *xr, int8_t *xb, float *xt, float *xs) {
    const int64_t nb = xps / 32, nab = (nb + bpa - 1) / bpa;
    for (int64_t i = 0; i < m; ++i) {
        avx2_load_row(x, xdtype, i, xstride, k, xps, 0, xr);
        for (int64_t a = 0; a < nab; ++a) {
            const int64_t c0 = 32 * bpa * a, c1 = c0 + 32 * bpa < xps ? c0 + 32 * bpa : xps;
            float amax;
            if (avx2_block_amax(xr + c0, c1 - c0, &amax) != 0) return -5;
            const float t = amax / 127.0f, iq = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int64_t j = c0; j < c1; j += 8) {
                const __m256i vi = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + j), _mm256_set1_ps(iq)));
                int32_t v[8];
                _mm256_storeu_si256((__m256i *)v, vi);
                _mm256_storeu_ps(xr + j, _mm256_mul_ps(_mm256_cvtepi32_ps(vi), _mm256_set1_ps(t)));
                for (int e = 0; e < 8; ++e) {
                    const int64_t col = j + e, b = col / 32;
                    xb[i * xps + 32 * b + avx2_pos(4, (int)(col - 32 * b))] = (int8_t)v[e];
                }
            }
            xt[i * nab + a] = t;
        }
        avx2_group_sums(xr, k, ge, ng, xs + i * ng);
    }
    return 0;
}

static int gemv_avx2_run(int bits, const uint8_t *q, int64_t n, int64_t row_bytes, int64_t k, int64_t ge,
                         int64_t ng, const void *s, const void *z, int sz, const void *x, int xdtype, int64_t m,
                         int64_t xstride, void *y, int ydtype, int64_t ys, int xmode, int nthreads) {
    if (n == 0 || m == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    const int64_t xps = (k + 31) / 32 * 32 > 0 ? (k + 31) / 32 * 32 : 32, nb = xps / 32;
    /* xp: m rows of xps float32 (the float32 form's x~, or the int16 form's integers in its first half) */
    float *xp = (float *)aligned_alloc(32, (size_t)(m * xps) * sizeof(float));
    float *xr = (float *)malloc((size_t)xps * sizeof(float));
    float *xt = (float *)malloc((size_t)(m * nb) * sizeof(float));
    float *xs = (float *)malloc((size_t)(m * ng) * sizeof(float));
    if (!xp || !xr || !xt || !xs) {
        free(xp), free(xr), free(xt), free(xs);
        return -4;
    }
    /* xmode 4: the int8 form on 4-bit containers, x in activation blocks of bpa blocks of 32 columns (128 columns,
     * or the largest of 64 and 32 that divides a group); on other widths the int16 form */
    const int i8 = xmode == 4 && bits == 4;
    const int64_t bpa = ng == 1 || (ge / 32) % 4 == 0 ? 4 : (ge / 32) % 2 == 0 ? 2 : 1;
    if (xmode == 4 && !i8) xmode = 3;
    int ix = xmode == 3;
    int16_t *xv = (int16_t *)xp;
    int8_t *xb = (int8_t *)xp;
    const mq_params prm = {s, z, sz};
    const int64_t tasks = (n + MQ_GEMV_RB - 1) / MQ_GEMV_RB;
    /* the int8 form in a parallel region of its own: folded into the other forms' loop as one more branch per row
     * tile it ran ~20% slower (5632 x 2048 W4 g128, M = 1, Zen 1) */
    if (i8 && avx2_prep_i8(x, xdtype, m, xstride, k, ge, ng, xps, bpa, xr, xb, xt, xs) == 0) {
#define MQ_AVX2_I8(MB) avx2_rows_i8(q, r0, r1, row_bytes, k, ge, ng, &prm, xb, xt, xps, bpa, xs, MB, m0, y, ydtype, ys)
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
#endif
        for (int64_t t = 0; t < tasks; ++t) {
            const int64_t r0 = t * MQ_GEMV_RB, r1 = r0 + MQ_GEMV_RB < n ? r0 + MQ_GEMV_RB : n;
            MQ_ROW_TILES(MQ_AVX2_I8);
        }
#undef MQ_AVX2_I8
        const int fixed = nonfinite_rows(bits, q, n, row_bytes, k, ge, ng, &prm, x, xdtype, m, xstride, xs, y, ydtype,
                                         ys, nthreads);
        free(xp), free(xr), free(xt), free(xs);
        return fixed;
    }
    if (i8) xmode = 2; /* a value not finite, or a block below 2^-100: x itself, float32 products */
    if (avx2_prep(x, xdtype, m, xstride, k, bits, xmode, ix, ge, ng, xps, xr, xp, xv, xt, xs) != 0) {
        ix = 0; /* the same for the int16 form */
        avx2_prep(x, xdtype, m, xstride, k, bits, 2, 0, ge, ng, xps, xr, xp, xv, xt, xs);
    }
#define MQ_AVX2_W(B, IX, MB)                                                                                      \
    avx2_rows(B, IX, q, r0, r1, row_bytes, k, ge, ng, &prm, xp, xv, xt, xps, xs, MB, m0, y, ydtype, ys)
#define MQ_AVX2_BITS(IX, MB)                                                                                      \
    do { /* 4- and 8-bit containers: specialised bodies; the other widths share one (unpacked per row) */         \
        if (bits == 4) MQ_AVX2_W(4, IX, MB);                                                                      \
        else if (bits == 8) MQ_AVX2_W(8, IX, MB);                                                                 \
        else MQ_AVX2_W(bits, IX, MB);                                                                             \
    } while (0)
#define MQ_AVX2_ROWS(MB)                                                                                          \
    do { /* each form specialised (ix a constant in its bodies) */                                                \
        if (ix) MQ_AVX2_BITS(1, MB);                                                                              \
        else MQ_AVX2_BITS(0, MB);                                                                                 \
    } while (0)
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t r0 = t * MQ_GEMV_RB, r1 = r0 + MQ_GEMV_RB < n ? r0 + MQ_GEMV_RB : n;
        MQ_ROW_TILES(MQ_AVX2_ROWS);
    }
#undef MQ_AVX2_ROWS
#undef MQ_AVX2_BITS
#undef MQ_AVX2_W
    const int fixed = nonfinite_rows(bits, q, n, row_bytes, k, ge, ng, &prm, x, xdtype, m, xstride, xs, y, ydtype, ys,
                                     nthreads);
    free(xp), free(xr), free(xt), free(xs);
    return fixed;
}
#endif

/* the kernels of every width: bits 4 (4-bit containers, gemv4_rows), else a stream of bits-bit codes (gemvs_rows:
 * 8-bit containers, the dense 3/5/6/7-bit layout, 1- and 2-bit containers); checks, x~ prepared once per call,
 * rows split over threads */
/* the checks the weight-only matmuls (gemv_run, gemm_run) share: 0, -1 bad sizes or codes, -2 bad group layout */
static int matmul_args(int bits, int64_t n, int64_t row_bytes, int64_t k, int64_t kp, int64_t ge, int64_t ng, int sz,
                       int xdtype, int64_t m, int64_t xstride, int ydtype, int64_t ys) {
    if (bits < 1 || bits > 8 || n < 0 || m < 0 || k < 0 || k > kp || (kp * bits) % 8 || row_bytes * 8 < kp * bits ||
        ge <= 0 || ng <= 0 || ge * ng < kp || (ng - 1) * ge >= (kp > 0 ? kp : 1) || xstride < k || ys < n ||
        (xdtype != 0 && xdtype != 1) || (ydtype != 0 && ydtype != 1) || sz < 0 || sz > 7)
        return -1;
    return ng > 1 && ge % 32 ? -2 : 0;
}

static int gemv_run(int bits, const uint8_t *q, int64_t n, int64_t row_bytes, int64_t k, int64_t kp, int64_t ge,
                    int64_t ng, const void *s, const void *z, int sz, const void *x, int xdtype, int64_t m,
                    int64_t xstride, void *y, int ydtype, int64_t ys, int xmode, int nthreads) {
    if (xmode < 0 || xmode > 4) return -1;
    const int rc = matmul_args(bits, n, row_bytes, k, kp, ge, ng, sz, xdtype, m, xstride, ydtype, ys);
    if (rc) return rc;
#if MQ_GEMV_F32
    if (bits != 4 && bits != 8 && !MQ_GEMV_STREAM) return -3;
    /* xmode 3: x as 16-bit integers per 32 columns where vpdpwssd is compiled in (else, and for an x it cannot
     * scale, split). Every group layout: each 32 columns' integer sum is scaled by its own t and group scale (4-bit
     * containers: the quad form's quarters, a 64-column block's halves; a last block of 32 columns or fewer has
     * zero codes and zero x beyond kp, its missing half a t of 0) */
    const int quad_groups = ng == 1 || ge % 128 == 0 || ge == 64 || ge == 32;
    if (xmode == 4) xmode = 3; /* int8 x is the AVX2 form's; here it is taken as int16 */
    int ix = xmode == 3 && MQ_GEMM_CAP;
    if (xmode == 3 && !ix) xmode = 2;
    if (n == 0 || m == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    /* blocks of 64 columns (4-bit: even then odd columns) or 32 (streams: column order) */
    const int64_t bw = bits == 4 ? 64 : 32, nblk = (kp + bw - 1) / bw, xps = nblk * bw;
    /* 4 bytes per column of x: float32, the hi and lo bfloat16 halves of split x, or less (bfloat16, int16) */
    void *xp = aligned_alloc(64, (size_t)(m * xps) * 4);
    float *xs = (float *)malloc((size_t)(m * ng) * sizeof(float));
    float *xq = ix ? (float *)malloc((size_t)xq_at(bits, m, nblk, 0) * sizeof(float)) : NULL; /* t per 32 columns */
    int32_t *gix = (int32_t *)malloc((size_t)(2 * nblk) * sizeof(int32_t));
    /* float16 scales / zero points are widened per task of MQ_GEMV_RB rows into a per-thread float32 buffer (the
     * hot loops then read float32 as stored float32 ones are read: in place); a constant zero point is one row of
     * ng copies, read with row stride 0 */
    const int s16 = sz & 1, z16 = (sz & 2) && !(sz & 4), zone = (sz >> 2) & 1;
    const int64_t pb = MQ_GEMV_RB * ng; /* floats per buffer */
    float *pbuf = (s16 || z16 || zone) ? (float *)malloc((size_t)(nthreads * 2 * pb + ng) * sizeof(float)) : NULL;
    if (!xp || !xs || !gix || (ix && !xq) || ((s16 || z16 || zone) && !pbuf)) {
        free(xp), free(xs), free(xq), free(gix), free(pbuf);
        return -4;
    }
    float *zrow = pbuf != NULL ? pbuf + nthreads * 2 * pb : NULL;
    if (zone) {
        const mq_params prm = {s, z, sz};
        const float zc = param_z(&prm, 0);
        for (int64_t g = 0; g < ng; ++g) zrow[g] = zc;
    }
    for (int64_t b = 0; b < nblk; ++b)
        for (int h = 0; h < 2; ++h) {
            const int64_t g = (bits == 4 ? b * 64 + 32 * h : b * 32) / ge;
            gix[2 * b + h] = (int32_t)(g < ng ? g : ng - 1);
        }
    int bf16, split;
    int64_t q128;
    for (;;) {
        bf16 = ix || (xmode && MQ_GEMV_BF16); /* 16-bit x~: bfloat16 pairs (vdpbf16ps) or int16 (vpdpwssd) */
        split = !ix && bf16 && xmode == 2;    /* x~ = hi + lo, two bfloat16 products per weight */
        /* 4-bit codes with 16-bit products: full blocks of 128 columns take the quad form where its flushes stay
         * exact: blocks inside one group (flushed where the group ends), or groups of 32 / 64 columns (every two
         * consecutive 64-column blocks differ, so every unit is flushed, its lanes scaled per 32 columns); with
         * int16 x every unit is flushed (its own t), its quarters scaled by their groups: any group layout */
        q128 = bits == 4 && bf16 && (quad_groups || ix) ? kp / 128 : 0;
        /* x~ (zero beyond k), its group sums, and the kernels' copy (groups are multiples of 32: matmul_args) */
        if (!prep_x(x, xdtype, m, xstride, k, bits, bw, nblk, xps, bf16, split, xmode, ix, ge, ng, q128, xp, xs, xq))
            break;
        ix = 0, xmode = 2; /* x that 16-bit integers cannot hold: split */
    }
    const float *xqp = ix ? xq : NULL;
    const float *xf = bf16 ? NULL : (const float *)xp;
    const uint16_t *xbp = bf16 ? (const uint16_t *)xp : NULL;
    const uint16_t *xlp = split ? (const uint16_t *)xp + m * xps : NULL;
    const int64_t tasks = (n + MQ_GEMV_RB - 1) / MQ_GEMV_RB;
#define MQ_GEMVS(CB, MB) gemvs_rows(CB, q, r0, r1, row_bytes, kp, ng, st, zt, zs, xf, xbp, xlp, xps, xs, gix, xqp, MB, m0, y, ydtype, ys)
#define MQ_GEMV_ROWS(MB)                                                                                          \
    do {                                                                                                          \
        switch (bits) { /* constant widths: each body is specialised */                                          \
        case 4: gemv4_rows(q, r0, r1, row_bytes, kp, ng, st, zt, zs, xf, xbp, xlp, xps, xs, gix, xqp, q128, MB, m0, y, ydtype, ys); \
                break;                                                                                            \
        case 8: MQ_GEMVS(8, MB); break;                                                                           \
        case 1: MQ_GEMVS(1, MB); break;                                                                           \
        case 2: MQ_GEMVS(2, MB); break;                                                                           \
        case 3: MQ_GEMVS(3, MB); break;                                                                           \
        case 5: MQ_GEMVS(5, MB); break;                                                                           \
        case 6: MQ_GEMVS(6, MB); break;                                                                           \
        default: MQ_GEMVS(7, MB); break;                                                                          \
        }                                                                                                         \
    } while (0)
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && tasks > 1)
#endif
    for (int64_t t = 0; t < tasks; ++t) {
        const int64_t r0 = t * MQ_GEMV_RB, r1 = r0 + MQ_GEMV_RB < n ? r0 + MQ_GEMV_RB : n;
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        float *sb = pbuf != NULL ? pbuf + tid * 2 * pb : NULL;
        const float *st = s16 ? widen_f16(sb, (const uint16_t *)s + r0 * ng, (r1 - r0) * ng)
                              : (const float *)s + r0 * ng;
        const float *zt = zone ? zrow
                               : z16 ? widen_f16(sb + pb, (const uint16_t *)z + r0 * ng, (r1 - r0) * ng)
                                     : (const float *)z + r0 * ng;
        const int64_t zs = zone ? 0 : ng;
        MQ_ROW_TILES(MQ_GEMV_ROWS);
    }
#undef MQ_GEMV_ROWS
#undef MQ_GEMVS
    const mq_params prm = {s, z, sz};
    const int fixed = nonfinite_rows(bits, q, n, row_bytes, k, ge, ng, &prm, x, xdtype, m, xstride, xs, y, ydtype, ys,
                                     nthreads);
    free(xp), free(xs), free(xq), free(gix), free(pbuf);
    return fixed;
#elif MQ_GEMV_AVX2
    (void)kp;
    return gemv_avx2_run(bits, q, n, row_bytes, k, ge, ng, s, z, sz, x, xdtype, m, xstride, y, ydtype, ys, xmode,
                         nthreads);
#else
    (void)q, (void)row_bytes, (void)s, (void)z, (void)sz, (void)x, (void)y, (void)xmode, (void)nthreads;
    return -3;
#endif
}

/* ---------------------------------------------------------------------------------------------------------
 * Weight-only matmul for many rows of x (prefill: the CPU backend's "gemm" path). x is taken as 16-bit integers
 * per block of columns: for row i and block c (columns [c B, (c + 1) B), B the group, or 128 for channel / tensor
 * scope, or a divisor of the group of 128 / 64 / 32 columns so that sums stay within int32),
 *
 *     t[i, c] = max_{j in c} |x[i, j]| / 32767,   v[i, j] = round_half_even(x[i, j] / t[i, c]),
 *     x~[i, j] = t[i, c] * v[i, j]      (|v| <= 32767: x to 2^-16 of its block's largest magnitude)
 *
 * and
 *
 *     y[i, r] = sum_c t[i, c] s[r, g(c)] * (sum_{j in c} v[i, j] u[r, j])  -  sum_g s[r, g] z[r, g] X[i, g]
 *
 * with X[i, g] = sum_{j in g} x~[i, j]: x~ @ ((u - z) * s)^T (where every zero point of a panel is an integer in
 * 0..255, the panel holds u - z instead of u and the X term is dropped: the same sum, with one rounding less). The
 * integer sums are exact (vpdpwssd: pairs of
 * int16 products summed into int32; |v u| sums over a block of at most 128 columns stay below 2^31 for 8-bit
 * codes); each block's sum is converted to float32 once, scaled, and summed in float32. Neither the weights nor
 * the outputs are rounded to bfloat16, unlike a dense bfloat16 GEMM on dequantized weights: y is float32
 * (ydtype 0), or bfloat16 (ydtype 1, the float32 sum rounded once). Blocked for reuse:
 *   - panels of MQ_GEMM_NR = 32 weight rows, one per thread task: the rows' codes unpacked once into int16 pairs
 *     laid out [kp / 2][32] (word [p][c]: codes 2p and 2p + 1 of row c, the low half first); the panel's scales
 *     and s * z transposed to [ng][32];
 *   - tiles of up to MQ_GEMM_MR rows of x: 2 * MQ_GEMM_MR int32 accumulators of 16 lanes (lane c = weight row
 *     c); each step loads the panel's two vectors of pair p and broadcasts each x row's pair p.
 * Arguments and returns as gemv_run but for xmode (absent: x enters as above) and bits 1..8 (4 and 8: containers,
 * others a stream of bits-bit codes, lowest bits first); -3 when the build lacks AVX512-VNNI (mq_gemv4_caps() bit
 * 3), -5 (nothing written) when x has a value that is not finite (the caller's dense path then runs it).
 * --------------------------------------------------------------------------------------------------------- */
#if MQ_GEMM_CAP
#define MQ_GEMM 1
#define MQ_GEMM_NR 32

/* r[0..16) as a 16 x 16 matrix of 32-bit words, transposed in place: at each scale b = 8, 4, 2, 1 the
 * off-diagonal b x b blocks of every 2b x 2b block are swapped (rows i and i + b, i / b even, merged by two
 * vpermt2d each); tix: the two index vectors of each scale */
#define MQ_T2(I, B, LO, HI)                                                                                       \
    {                                                                                                             \
        const __m512i a_ = r[I], c_ = r[(I) + (B)];                                                               \
        r[I] = _mm512_permutex2var_epi32(a_, LO, c_);                                                             \
        r[(I) + (B)] = _mm512_permutex2var_epi32(a_, HI, c_);                                                     \
    }
static inline __attribute__((always_inline)) void transpose16(__m512i *r, const int32_t (*tix)[16]) {
    __m512i lo = _mm512_loadu_si512((const void *)tix[0]), hi = _mm512_loadu_si512((const void *)tix[1]);
    MQ_T2(0, 8, lo, hi) MQ_T2(1, 8, lo, hi) MQ_T2(2, 8, lo, hi) MQ_T2(3, 8, lo, hi)
    MQ_T2(4, 8, lo, hi) MQ_T2(5, 8, lo, hi) MQ_T2(6, 8, lo, hi) MQ_T2(7, 8, lo, hi)
    lo = _mm512_loadu_si512((const void *)tix[2]), hi = _mm512_loadu_si512((const void *)tix[3]);
    MQ_T2(0, 4, lo, hi) MQ_T2(1, 4, lo, hi) MQ_T2(2, 4, lo, hi) MQ_T2(3, 4, lo, hi)
    MQ_T2(8, 4, lo, hi) MQ_T2(9, 4, lo, hi) MQ_T2(10, 4, lo, hi) MQ_T2(11, 4, lo, hi)
    lo = _mm512_loadu_si512((const void *)tix[4]), hi = _mm512_loadu_si512((const void *)tix[5]);
    MQ_T2(0, 2, lo, hi) MQ_T2(1, 2, lo, hi) MQ_T2(4, 2, lo, hi) MQ_T2(5, 2, lo, hi)
    MQ_T2(8, 2, lo, hi) MQ_T2(9, 2, lo, hi) MQ_T2(12, 2, lo, hi) MQ_T2(13, 2, lo, hi)
    lo = _mm512_loadu_si512((const void *)tix[6]), hi = _mm512_loadu_si512((const void *)tix[7]);
    MQ_T2(0, 1, lo, hi) MQ_T2(2, 1, lo, hi) MQ_T2(4, 1, lo, hi) MQ_T2(6, 1, lo, hi)
    MQ_T2(8, 1, lo, hi) MQ_T2(10, 1, lo, hi) MQ_T2(12, 1, lo, hi) MQ_T2(14, 1, lo, hi)
}
#undef MQ_T2

/* one tile of x (tile-major int16 pairs: word [p][i] is pair p of the tile's row i; tt: [block][MQ_GEMM_MR]
 * float32 scales t) against one panel; ct: the float32 tile (MQ_GEMM_MR x 32), sum over blocks of
 * t s (codes . v). Each block is one assembly body that keeps its accumulators in registers: 12 rows
 * (gemm_tile12: 24 accumulators), and for a last tile of at most 8 or 4 rows the same body over those rows only
 * (gemm_tile8, gemm_tile4), so that the rows a tile lacks are not computed (a last tile's missing rows are zeros,
 * computed by a larger body and not stored). */
#define MQ_GEMM_MR 12
/* the block in assembly: GCC 12 spills 24 accumulators of such a loop written with intrinsics to the stack
 * (measured: 0.6x the speed); here they are zmm0..zmm(2R-1) throughout. Per pair: the panel's two vectors (zmm30,
 * zmm31), then per row two vpdpwssd that read the row's x pair from memory broadcast to the 16 lanes ({1to16}: no
 * separate broadcast instruction; 0.95-1.01x the time at M = 256 on the 1.1B model's shapes, paired, the same
 * output bits). The x pointer advances by a whole tile's pair (MQ_GEMM_MR words) whatever R is. At the end, per
 * row i: the integer sums to float32, times s * t_i, added to the float32 tile ct (fused multiply-add:
 * ct + sum * (s t_i), one rounding). 14 rows per tile (28 accumulators) measured 0.97-1.03x the time of 12: not
 * kept. */
#define MQ_Z(i) "vpxord %%zmm" #i ", %%zmm" #i ", %%zmm" #i "\n\t"
#define MQ_R(i, a, b)                                                                                             \
    "vpdpwssd " #i "*4(%[X])%{1to16%}, %%zmm30, %%zmm" #a "\n\t"                                                 \
    "vpdpwssd " #i "*4(%[X])%{1to16%}, %%zmm31, %%zmm" #b "\n\t"
#define MQ_F(i, a, b)                                                                                             \
    "vbroadcastss " #i "*4(%[T]), %%zmm29\n\t"                                                                    \
    "vmulps (%[S]), %%zmm29, %%zmm30\n\t"                                                                         \
    "vmulps 64(%[S]), %%zmm29, %%zmm31\n\t"                                                                       \
    "vcvtdq2ps %%zmm" #a ", %%zmm" #a "\n\t"                                                                      \
    "vcvtdq2ps %%zmm" #b ", %%zmm" #b "\n\t"                                                                      \
    "vfmadd213ps " #i "*128(%[C]), %%zmm30, %%zmm" #a "\n\t"                                                      \
    "vfmadd213ps " #i "*128+64(%[C]), %%zmm31, %%zmm" #b "\n\t"                                                   \
    "vmovaps %%zmm" #a ", " #i "*128(%[C])\n\t"                                                                   \
    "vmovaps %%zmm" #b ", " #i "*128+64(%[C])\n\t"
#define MQ_Z4 MQ_Z(0) MQ_Z(1) MQ_Z(2) MQ_Z(3) MQ_Z(4) MQ_Z(5) MQ_Z(6) MQ_Z(7)
#define MQ_Z8 MQ_Z4 MQ_Z(8) MQ_Z(9) MQ_Z(10) MQ_Z(11) MQ_Z(12) MQ_Z(13) MQ_Z(14) MQ_Z(15)
#define MQ_Z12 MQ_Z8 MQ_Z(16) MQ_Z(17) MQ_Z(18) MQ_Z(19) MQ_Z(20) MQ_Z(21) MQ_Z(22) MQ_Z(23)
#define MQ_R4 MQ_R(0, 0, 1) MQ_R(1, 2, 3) MQ_R(2, 4, 5) MQ_R(3, 6, 7)
#define MQ_R8 MQ_R4 MQ_R(4, 8, 9) MQ_R(5, 10, 11) MQ_R(6, 12, 13) MQ_R(7, 14, 15)
#define MQ_R12 MQ_R8 MQ_R(8, 16, 17) MQ_R(9, 18, 19) MQ_R(10, 20, 21) MQ_R(11, 22, 23)
#define MQ_F4 MQ_F(0, 0, 1) MQ_F(1, 2, 3) MQ_F(2, 4, 5) MQ_F(3, 6, 7)
#define MQ_F8 MQ_F4 MQ_F(4, 8, 9) MQ_F(5, 10, 11) MQ_F(6, 12, 13) MQ_F(7, 14, 15)
#define MQ_F12 MQ_F8 MQ_F(8, 16, 17) MQ_F(9, 18, 19) MQ_F(10, 20, 21) MQ_F(11, 22, 23)
#define MQ_GEMM_TILE(NAME, ROWS, Z, R, F)                                                                         \
    static __attribute__((noinline)) void NAME(const uint32_t *restrict P, const float *restrict sT, int64_t np,   \
                                               int64_t bp, int64_t nb, int64_t gpb, const uint32_t *restrict xt,  \
                                               const float *restrict tt, float *restrict ct) {                     \
        for (int i = 0; i < 2 * (ROWS); ++i) _mm512_store_ps(ct + i * 16, _mm512_setzero_ps());                    \
        for (int64_t c = 0; c < nb; ++c) {                                                                         \
            const int64_t p0 = c * bp, p1 = p0 + bp < np ? p0 + bp : np;                                           \
            const uint32_t *pp = P + p0 * 32, *xp = xt + p0 * MQ_GEMM_MR;                                          \
            /* block c's weight group and row scales */                                                            \
            const float *sg = sT + c / gpb * 32, *tc = tt + c * MQ_GEMM_MR;                                        \
            int64_t cnt = p1 - p0;                                                                                 \
            __asm__ volatile(Z "1:\n\t"                                                                            \
                               "vmovdqa64 (%[P]), %%zmm30\n\t"                                                     \
                               "vmovdqa64 64(%[P]), %%zmm31\n\t" R "addq $128, %[P]\n\t"                           \
                               "addq $48, %[X]\n\t"                                                                \
                               "decq %[n]\n\t"                                                                     \
                               "jnz 1b\n\t" F                                                                      \
                             : [P] "+r"(pp), [X] "+r"(xp), [n] "+r"(cnt)                                           \
                             : [S] "r"(sg), [T] "r"(tc), [C] "r"(ct)                                               \
                             : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",     \
                               "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18",    \
                               "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm29", "xmm30", "xmm31", "cc",       \
                               "memory");                                                                          \
        }                                                                                                          \
    }
MQ_GEMM_TILE(gemm_tile12, 12, MQ_Z12, MQ_R12, MQ_F12)
MQ_GEMM_TILE(gemm_tile8, 8, MQ_Z8, MQ_R8, MQ_F8)
MQ_GEMM_TILE(gemm_tile4, 4, MQ_Z4, MQ_R4, MQ_F4)
#undef MQ_GEMM_TILE
#undef MQ_Z
#undef MQ_R
#undef MQ_F
#undef MQ_Z4
#undef MQ_Z8
#undef MQ_Z12
#undef MQ_R4
#undef MQ_R8
#undef MQ_R12
#undef MQ_F4
#undef MQ_F8
#undef MQ_F12
#else
#define MQ_GEMM 0
#endif

static int gemm_run(int bits, const uint8_t *q, int64_t n, int64_t row_bytes, int64_t k, int64_t kp, int64_t ge,
                    int64_t ng, const void *s, const void *z, int sz, const void *x, int xdtype, int64_t m,
                    int64_t xstride, void *y, int ydtype, int64_t ys, int nthreads) {
    const int dense = bits == 3 || bits > 4;
    if (bits != 8 && kp % 8) return -1; /* unpack_row takes whole bytes of codes */
    const int rc = matmul_args(bits, n, row_bytes, k, kp, ge, ng, sz, xdtype, m, xstride, ydtype, ys);
    if (rc) return rc;
#if MQ_GEMM
    if (n == 0 || m == 0) return 0;
    if (nthreads < 1) nthreads = 1;
    const mq_params prm = {s, z, sz};
    /* columns per block: the group, or 128 / 64 / 32 of it (integer sums below 2^31); 128 for one group */
    const int64_t B = ng == 1 ? 128 : ge % 128 == 0 ? 128 : ge % 64 == 0 ? 64 : 32;
    const int64_t np = (kp + 1) / 2, bp = B / 2, nb = (np + bp - 1) / bp; /* pairs, per block, blocks */
    const int64_t gpb = ng == 1 ? nb : ge / B;                            /* blocks per group */
    const int64_t tiles = (m + MQ_GEMM_MR - 1) / MQ_GEMM_MR;
    const int64_t tw = np * MQ_GEMM_MR; /* words per tile of x */
    uint32_t *xt = (uint32_t *)aligned_alloc(64, (size_t)(tiles * tw + 16) * 4);
    float *tt = (float *)malloc((size_t)(tiles * nb * MQ_GEMM_MR) * sizeof(float));
    float *xs = (float *)malloc((size_t)(m * ng) * sizeof(float));
    if (!xt || !tt || !xs) {
        free(xt), free(tt), free(xs);
        return -4;
    }
    /* x as int16 per block (tile-major pairs; zero beyond k and in a last tile's missing rows), the scales t,
     * and the group sums X of x~ */
    int bad = 0;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && m > 1) reduction(| : bad)
#endif
    for (int64_t i = 0; i < tiles * MQ_GEMM_MR; ++i) {
        uint32_t *h = xt + i / MQ_GEMM_MR * tw + i % MQ_GEMM_MR;
        float *ti = tt + i / MQ_GEMM_MR * nb * MQ_GEMM_MR + i % MQ_GEMM_MR;
        float *xsi = i < m ? xs + i * ng : NULL;
        if (xsi)
            for (int64_t g = 0; g < ng; ++g) xsi[g] = 0.0f;
        int16_t v16[128] __attribute__((aligned(64)));
        const int64_t nv_row = i < m ? k : 0; /* columns of this row that hold x (the rest are zeros) */
        for (int64_t c = 0; c < nb; ++c) {
            const int64_t j0 = c * B, j1 = j0 + B < 2 * np ? j0 + B : 2 * np;
            const int64_t nv = nv_row <= j0 ? 0 : nv_row - j0 < j1 - j0 ? nv_row - j0 : j1 - j0;
            __m512 row[8] = {0}, mx = _mm512_setzero_ps();
            __mmask16 odd = 0;
            for (int v = 0; v < 8 && 16 * v < j1 - j0; ++v) {
                const int64_t left = nv - 16 * v;
                const __mmask16 mk = (__mmask16)(left >= 16 ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1u);
                const int64_t at = i * xstride + j0 + 16 * v;
                row[v] = xdtype ? _mm512_castsi512_ps(_mm512_slli_epi32(
                                      _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + at)), 16))
                                : _mm512_maskz_loadu_ps(mk, (const float *)x + at);
                odd |= _mm512_fpclass_ps_mask(row[v], 0x99); /* NaN or infinity */
                mx = _mm512_max_ps(mx, _mm512_abs_ps(row[v]));
            }
            const float amax = _mm512_reduce_max_ps(mx);
            /* below 2^-100 the reciprocal could overflow: such a block (and a non-finite x) goes to the dense path */
            if (odd || (amax > 0.0f && amax < 0x1p-100f)) bad = 1;
            const float t = amax / 32767.0f, inv = amax > 0.0f && !bad ? 32767.0f / amax : 0.0f;
            ti[c * MQ_GEMM_MR] = t;
            __m512i isum = _mm512_setzero_si512();
            const __m512 iv = _mm512_set1_ps(inv);
            for (int v = 0; v < 8 && 16 * v < j1 - j0; ++v) {
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(row[v], iv)); /* round half to even */
                isum = _mm512_add_epi32(isum, q);
                _mm256_store_si256((__m256i *)(v16 + 16 * v), _mm512_cvtsepi32_epi16(q));
            }
            const uint32_t *w16 = (const uint32_t *)v16;
            for (int64_t pp = 0; pp < (j1 - j0) / 2; ++pp) h[(j0 / 2 + pp) * MQ_GEMM_MR] = w16[pp];
            if (xsi) xsi[ng > 1 ? c / gpb : 0] += t * (float)_mm512_reduce_add_epi32(isum);
        }
    }
    if (bad) {
        free(xt), free(tt), free(xs);
        return -5;
    }
    const int64_t panels = (n + MQ_GEMM_NR - 1) / MQ_GEMM_NR;
    const int64_t ur = (2 * np + 31) / 32 * 32; /* bytes per unpacked row: whole blocks of 16 pairs */
    int32_t tix[8][16];                         /* transpose16's permutations */
    for (int b = 8, t = 0; b >= 1; b /= 2, ++t)
        for (int e = 0; e < 16; ++e) {
            const int src = (e / b) % 2 ? 16 : 0, base = e / (2 * b) * 2 * b + e % b;
            tix[2 * t][e] = src + base;
            tix[2 * t + 1][e] = src + base + b;
        }
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && panels > 1)
#endif
    {
        uint8_t *u = (uint8_t *)malloc((size_t)(MQ_GEMM_NR * ur));
        uint32_t *P = (uint32_t *)aligned_alloc(64, (size_t)(np * MQ_GEMM_NR) * 4 + 64);
        float *sT = (float *)aligned_alloc(64, (size_t)(2 * ng * MQ_GEMM_NR) * 4 + 64), *szT = sT + ng * MQ_GEMM_NR;
        float *ct = (float *)aligned_alloc(64, (size_t)(MQ_GEMM_MR * MQ_GEMM_NR) * 4);
        int16_t *zi = (int16_t *)malloc((size_t)(MQ_GEMM_NR * ng) * sizeof(int16_t)); /* integer zero points */
        const int ok = u && P && sT && ct && zi;
        if (!ok) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t t = 0; t < panels; ++t) {
            if (!ok) continue;
            const int64_t n0 = t * MQ_GEMM_NR, nr = n - n0 < MQ_GEMM_NR ? n - n0 : MQ_GEMM_NR;
            /* fold: every zero point of the panel is an integer in 0..255 (symmetric rows: 2^(b-1); asymmetric rows
             * as medquant quantizes them), so the panel holds u - z exactly (-255..255 in int16) and the zero-point
             * term needs no float32 correction; else (1-bit symmetric z = 1/2, other zero points) the panel holds
             * u and the term sum_g s z X is subtracted at the end */
            int fold = 1;
            for (int c = 0; c < MQ_GEMM_NR; ++c) { /* the rows' codes, one row of ur bytes each (zeros past kp) */
                const int64_t r = n0 + c;
                uint8_t *uc = u + c * ur;
                if (c < nr) {
                    const uint8_t *row = q + r * row_bytes;
                    if (bits == 8) memcpy(uc, row, (size_t)kp);
                    else unpack_row(row, bits, dense, kp, uc);
                    memset(uc + kp, 0, (size_t)(ur - kp));
                    for (int64_t g = 0; g < ng; ++g) {
                        const float sf = param_s(&prm, r * ng + g), zf = param_z(&prm, r * ng + g);
                        sT[g * MQ_GEMM_NR + c] = sf;
                        szT[g * MQ_GEMM_NR + c] = sf * zf;
                        if (zf >= 0.0f && zf <= 255.0f && zf == nearbyintf(zf)) zi[c * ng + g] = (int16_t)zf;
                        else fold = 0;
                    }
                } else {
                    memset(uc, 0, (size_t)ur);
                    for (int64_t g = 0; g < ng; ++g) {
                        sT[g * MQ_GEMM_NR + c] = szT[g * MQ_GEMM_NR + c] = 0.0f;
                        zi[c * ng + g] = 0;
                    }
                }
            }
            /* the panel: blocks of 16 rows x 16 pairs, each row's codes widened to int16 (16 pairs = 16 words),
             * transposed in registers so that vector j holds pair p + j of the 16 rows */
            for (int64_t p = 0; p < np; p += 16)
                for (int h = 0; h < MQ_GEMM_NR / 16; ++h) {
                    __m512i rw[16];
#pragma GCC unroll 16
                    for (int i = 0; i < 16; ++i)
                        rw[i] = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const void *)(u + (16 * h + i) * ur + 2 * p)));
                    if (fold) { /* the 32 columns from 2p lie in one group (groups are multiples of 32) */
                        const int64_t g = ng > 1 ? 2 * p / ge : 0;
#pragma GCC unroll 16
                        for (int i = 0; i < 16; ++i)
                            rw[i] = _mm512_sub_epi16(rw[i], _mm512_set1_epi16(zi[(16 * h + i) * ng + g]));
                    }
                    transpose16(rw, tix);
                    const int64_t left = np - p;
#pragma GCC unroll 16
                    for (int j = 0; j < 16; ++j)
                        if (j < left) _mm512_store_si512((void *)(P + (p + j) * MQ_GEMM_NR + 16 * h), rw[j]);
                }
            const __mmask16 k0 = (__mmask16)(nr >= 16 ? 0xFFFF : (1u << nr) - 1u);
            const __mmask16 k1 = (__mmask16)(nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : (1u << (nr - 16)) - 1u);
            for (int64_t m0 = 0; m0 < m; m0 += MQ_GEMM_MR) {
                const int mb = m - m0 < MQ_GEMM_MR ? (int)(m - m0) : MQ_GEMM_MR;
                const uint32_t *xti = xt + m0 / MQ_GEMM_MR * tw;
                const float *tti = tt + m0 / MQ_GEMM_MR * nb * MQ_GEMM_MR;
                if (mb > 8) gemm_tile12(P, sT, np, bp, nb, gpb, xti, tti, ct);
                else if (mb > 4) gemm_tile8(P, sT, np, bp, nb, gpb, xti, tti, ct);
                else gemm_tile4(P, sT, np, bp, nb, gpb, xti, tti, ct);
                for (int i = 0; i < mb; ++i) {
                    const float *xsi = xs + (m0 + i) * ng;
                    __m512 v0 = _mm512_load_ps(ct + i * 32), v1 = _mm512_load_ps(ct + i * 32 + 16);
                    for (int64_t g = 0; g < (fold ? 0 : ng); ++g) {
                        const __m512 xg = _mm512_set1_ps(-xsi[g]);
                        v0 = _mm512_fmadd_ps(xg, _mm512_load_ps(szT + g * 32), v0);
                        v1 = _mm512_fmadd_ps(xg, _mm512_load_ps(szT + g * 32 + 16), v1);
                    }
                    if (ydtype) {
                        float tmp[32];
                        _mm512_storeu_ps(tmp, v0), _mm512_storeu_ps(tmp + 16, v1);
                        uint16_t *yr = (uint16_t *)y + (m0 + i) * ys + n0;
                        for (int64_t c = 0; c < nr; ++c) yr[c] = bf16_bits(tmp[c]);
                    } else {
                        float *yr = (float *)y + (m0 + i) * ys + n0;
                        _mm512_mask_storeu_ps(yr, k0, v0);
                        if (k1) _mm512_mask_storeu_ps(yr + 16, k1, v1);
                    }
                }
            }
        }
        free(u), free(P), free(sT), free(ct), free(zi);
    }
    free(xt), free(tt), free(xs);
    return failed ? -4 : 0;
#else
    (void)dense, (void)q, (void)s, (void)z, (void)x, (void)y, (void)nthreads;
    return -3;
#endif
}

/* One entry point for both matmuls with the weight's arguments in one array, so that a caller binding them once
 * passes 8 arguments per call instead of 19 (a decode step makes one call per layer, where marshalling each
 * argument from Python costs about 0.1 us):
 *   h[0] q, h[1] n, h[2] row_bytes, h[3] k, h[4] kp, h[5] ge, h[6] ng, h[7] s, h[8] z, h[9] sz, h[10] bits
 * (pointers as integers); h[10] 1..8, the width codes are stored in (4 and 8: containers, others a bit stream);
 * flags: bit 0 xdtype, bit 1 ydtype, bits 2-3 xmode (gemv_run), bit 4 the blocked form (gemm_run: xmode ignored),
 * bit 5 xmode 4 (int8 x: the AVX2 form's int8 form on 4-bit containers; elsewhere as xmode 3).
 * The same returns as the function called (-3 also for a stream width in a build without AVX512-VBMI,
 * mq_gemv4_caps() bit 2). */
int mq_call(const int64_t *h, const void *x, int64_t m, int64_t xstride, void *y, int64_t ys, int flags,
            int nthreads) {
    const int bits = (int)h[10], xdtype = flags & 1, ydtype = (flags >> 1) & 1;
    const int xmode = flags & 32 ? 4 : (flags >> 2) & 3;
    const uint8_t *q = (const uint8_t *)(intptr_t)h[0];
    const void *s = (const void *)(intptr_t)h[7], *z = (const void *)(intptr_t)h[8];
    if (flags & 16)
        return gemm_run(bits, q, h[1], h[2], h[3], h[4], h[5], h[6], s, z, (int)h[9], x, xdtype, m, xstride, y,
                        ydtype, ys, nthreads);
    return gemv_run(bits, q, h[1], h[2], h[3], h[4], h[5], h[6], s, z, (int)h[9], x, xdtype, m, xstride, y, ydtype,
                    ys, xmode, nthreads);
}
