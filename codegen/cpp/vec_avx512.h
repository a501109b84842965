// AVX-512 (F/BW/VL/VNNI) vectors: 16 float lanes. int8 dot products use vpdpbusd (see vi_dot).

constexpr int W = 16;
typedef __m512 vf;

static inline vf vf_zero() { return _mm512_setzero_ps(); }
static inline vf vf_load(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vf_bcast(float v) { return _mm512_set1_ps(v); }
static inline vf vf_add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vf_hsum(vf a) { return _mm512_reduce_add_ps(a); }

// 16 packed bytes -> lo = 16 low nibbles (elements 0, 2, .., 30), hi = 16 high nibbles (elements 1, .., 31).
static inline void u4_block(const uint8_t* p, vf& lo, vf& hi) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

static inline vf s8_block(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}

// -- int8 x int8 dot products (W8A8) --------------------------------------------------------------------
// vpdpbusd multiplies u8 by s8 (4 pairs per int32 lane, exact). The weight is made unsigned with w + 128
// (xor 0x80), so a block yields sum(w * x) + 128 * sum(x); the caller subtracts 128 * sum(x) per token.
constexpr int I8_BLOCK = 64;
constexpr int32_t I8_OFFSET = 128;
typedef __m512i vi;
typedef __m512i vw;
static inline vi vi_zero() { return _mm512_setzero_si512(); }
static inline vw w8_prepare(const int8_t* p) {
    return _mm512_xor_si512(_mm512_loadu_si512((const void*)p), _mm512_set1_epi8((char)0x80));
}
static inline vi vi_dot(vi acc, vw w, const int8_t* x) {
    return _mm512_dpbusd_epi32(acc, w, _mm512_loadu_si512((const void*)x));
}
static inline int32_t vi_hsum(vi a) { return _mm512_reduce_add_epi32(a); }

// -- int4 x int8 dot products (W4A8) --------------------------------------------------------------------
// The codes (u4_avx2.h) against 32 signed activations in the same order, with the 256-bit vpdpbusd
// (AVX512-VL + VNNI): exact int32 sums.
#include "u4_avx2.h"
static inline vu4acc u4_dot(vu4acc acc, vu4 u, const int8_t* x) {
    return _mm256_dpbusd_epi32(acc, u, _mm256_loadu_si256((const __m256i*)x));
}
