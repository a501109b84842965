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
// 16 packed bytes -> 32 unsigned codes (low nibbles = even elements first, then the high nibbles) against 32
// signed activations in the same order, with the 256-bit vpdpbusd (AVX512-VL + VNNI): exact int32 sums.
constexpr int U4_BLOCK = 32;
typedef __m256i vu4;
typedef __m256i vu4acc;
static inline vu4 u4_prepare(const uint8_t* p) {
    const __m128i v = _mm_loadu_si128((const __m128i*)p);
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
static inline vu4acc u4_dot(vu4acc acc, vu4 u, const int8_t* x) {
    return _mm256_dpbusd_epi32(acc, u, _mm256_loadu_si256((const __m256i*)x));
}
static inline vu4acc u4_zero() { return _mm256_setzero_si256(); }
// A group's int32 lanes (exact in float32) scaled into a float accumulator; one horizontal sum per row.
typedef __m256 vu4f;
static inline vu4f u4f_zero() { return _mm256_setzero_ps(); }
static inline vu4f u4f_fma(vu4f total, vu4acc a, vu4acc b, float s) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a, b)), _mm256_set1_ps(s), total);
}
static inline float u4f_hsum(vu4f t) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
