// Int4 unpack for the W4A8 kernels, shared by the AVX2 and AVX-512 variants (both compile with -mavx2):
// 16 packed bytes -> 32 unsigned codes in one 256-bit vector, the 16 low nibbles (elements 0, 2, .., 30) first,
// then the 16 high nibbles (elements 1, 3, .., 31).
constexpr int U4_BLOCK = 32;  // elements per step
typedef __m256i vu4;
typedef __m256i vu4acc;
static inline vu4 u4_prepare(const uint8_t* p) {
    const __m128i v = _mm_loadu_si128((const __m128i*)p);
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i lo = _mm_and_si128(v, mask), hi = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
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
