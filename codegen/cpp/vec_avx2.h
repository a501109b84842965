// AVX2 + FMA vectors: 8 float lanes. int8 dot products use the vpmaddubsw sign trick (see vi_dot).

constexpr int W = 8;
typedef __m256 vf;

static inline vf vf_zero() { return _mm256_setzero_ps(); }
static inline vf vf_load(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vf_bcast(float v) { return _mm256_set1_ps(v); }
static inline vf vf_add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vf_fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vf_hsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// 8 packed bytes -> lo = 8 low nibbles (elements 0, 2, .., 14), hi = 8 high nibbles (elements 1, 3, .., 15).
static inline void u4_block(const uint8_t* p, vf& lo, vf& hi) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
}

static inline vf s8_block(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}

// -- int8 x int8 dot products (W8A8) --------------------------------------------------------------------
// vpmaddubsw multiplies u8 by s8 and adds pairs into saturating int16. With a = |w| (<= 128 as u8) and
// b = sign(x, w) (x in [-127, 127]) a pair is at most 2 * 128 * 127 = 32512 < 32767: never saturates, exact.
constexpr int I8_BLOCK = 32;
constexpr int32_t I8_OFFSET = 0;
typedef __m256i vi;
struct vw {
    __m256i abs_w, w;
};
static inline vi vi_zero() { return _mm256_setzero_si256(); }
static inline vw w8_prepare(const int8_t* p) {
    __m256i w = _mm256_loadu_si256((const __m256i*)p);
    return vw{_mm256_abs_epi8(w), w};
}
static inline vi vi_dot(vi acc, vw w, const int8_t* x) {
    __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)x), w.w);
    __m256i pairs = _mm256_maddubs_epi16(w.abs_w, xs);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
static inline int32_t vi_hsum(vi a) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

// -- int4 x int8 dot products (W4A8) --------------------------------------------------------------------
// The codes (u4_avx2.h) are the u8 operand of vpmaddubsw against 32 signed activations permuted to the same
// order. A pair is at most 2 * 15 * 127 = 3810, so the int16 step is exact.
#include "u4_avx2.h"
static inline vu4acc u4_dot(vu4acc acc, vu4 u, const int8_t* x) {
    const __m256i pairs = _mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i*)x));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
