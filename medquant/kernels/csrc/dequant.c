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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef MQ_BUILD_KEY
#define MQ_BUILD_KEY "unset"
#endif

#define MQ_ABI 1

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

static inline float bf16_round(float f) { return u2f((uint32_t)bf16_bits(f) << 16); }

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

static void dq_bf16(const uint8_t *restrict u, int64_t n, float zf, float sf, uint16_t *restrict o) {
    for (int64_t j = 0; j < n; ++j) o[j] = bf16_bits(bf16_round((float)u[j] - zf) * sf);
}

/* zf an integer of magnitude <= 256: u - zf (|.| <= 256, an integer) is exact in bfloat16 and float16, so
 * its rounding is the identity and is skipped */
static void dq_bf16_int(const uint8_t *restrict u, int64_t n, float zf, float sf, uint16_t *restrict o) {
    for (int64_t j = 0; j < n; ++j) o[j] = bf16_bits(((float)u[j] - zf) * sf);
}

#if MQ_HAVE_F16
static void dq_f16(const uint8_t *restrict u, int64_t n, float zf, float sf, _Float16 *restrict o) {
    for (int64_t j = 0; j < n; ++j) {
        float d = (float)(_Float16)((float)u[j] - zf);
        o[j] = (_Float16)(d * sf);
    }
}

static void dq_f16_int(const uint8_t *restrict u, int64_t n, float zf, float sf, _Float16 *restrict o) {
    for (int64_t j = 0; j < n; ++j) o[j] = (_Float16)(((float)u[j] - zf) * sf);
}
#endif

static inline int small_int(float z) { return z >= -256.0f && z <= 256.0f && z == (float)(int)z; }

#if MQ_HAVE_LUT
/* Table look-up form of dq_bf16 / dq_bf16_int for codes below 32 (AVX512BW): the group's outputs for all 32
 * possible codes are computed with the same float32 operations and rounding (16 lanes at a time), then each
 * code selects its output with one vpermw per 32 columns. */
static inline __m512i bf16_vec(__m512 v) { /* u32 lanes holding bf16_bits(v) */
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

static inline __m512 bf16_round_vec(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_vec(v), 16)); }

static inline __m512i table_bf16(float zf, float sf, int zi) {
    const __m512 lo = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 hi = _mm512_add_ps(lo, _mm512_set1_ps(16.0f));
    const __m512 z = _mm512_set1_ps(zf), s = _mm512_set1_ps(sf);
    __m512 d0 = _mm512_sub_ps(lo, z), d1 = _mm512_sub_ps(hi, z);
    if (!zi) {
        d0 = bf16_round_vec(d0);
        d1 = bf16_round_vec(d1);
    }
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
 * q: n rows of row_bytes bytes; s, z: (n, ng) float32; out: n rows of out_stride elements of type out_dtype
 * (MQ_F32 / MQ_BF16 / MQ_F16), columns [0, k) written. Returns 0, or a negative number for arguments it does
 * not take (nothing written then).
 */
int mq_dequant(const uint8_t *q, int64_t n, int64_t row_bytes, int bits, int dense, int64_t k, int64_t kp,
               int64_t ge, int64_t ng, const float *s, const float *z, int out_dtype, void *out,
               int64_t out_stride, int nthreads) {
    if (n < 0 || k < 0 || k > kp || ge <= 0 || ng <= 0 || ge * ng < kp || out_stride < k) return -1;
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
                const float sf = s[r * ng + g], zf = z[r * ng + g];
                const int zi = small_int(zf);
#if MQ_HAVE_LUT
                if (lut) {
                    lut_bf16(u + c0, c1 - c0, table_bf16(zf, sf, zi), (uint16_t *)out + r * out_stride + c0);
                    continue;
                }
#endif
                if (out_dtype == MQ_BF16)
                    (zi ? dq_bf16_int : dq_bf16)(u + c0, c1 - c0, zf, sf, (uint16_t *)out + r * out_stride + c0);
                else if (out_dtype == MQ_F32)
                    dq_f32(u + c0, c1 - c0, zf, sf, (float *)out + r * out_stride + c0);
#if MQ_HAVE_F16
                else
                    (zi ? dq_f16_int : dq_f16)(u + c0, c1 - c0, zf, sf, (_Float16 *)out + r * out_stride + c0);
#endif
            }
        }
        free(buf);
    }
    return failed ? -4 : 0;
}
