// Scalar "vectors" of one lane: the portable variant, and the reference the wider ones are checked against.

constexpr int W = 1;  // float lanes per vector
typedef float vf;

static inline vf vf_zero() { return 0.0f; }
static inline vf vf_load(const float* p) { return *p; }
static inline vf vf_bcast(float v) { return v; }
static inline vf vf_add(vf a, vf b) { return a + b; }
static inline vf vf_fma(vf a, vf b, vf c) { return a * b + c; }
static inline float vf_hsum(vf a) { return a; }

// W packed bytes -> 2W codes: lo = low nibbles (elements 2j), hi = high nibbles (elements 2j+1).
static inline void u4_block(const uint8_t* p, vf& lo, vf& hi) {
    lo = (float)(p[0] & 15);
    hi = (float)(p[0] >> 4);
}

// W signed int8 codes -> float.
static inline vf s8_block(const int8_t* p) { return (float)p[0]; }

// -- int8 x int8 dot products (W8A8) --------------------------------------------------------------------
constexpr int I8_BLOCK = 1;          // bytes of K per step
constexpr int32_t I8_OFFSET = 0;     // the dot product of a block returns sum(w * x) + I8_OFFSET * sum(x)
typedef int32_t vi;
typedef int8_t vw;
static inline vi vi_zero() { return 0; }
static inline vw w8_prepare(const int8_t* p) { return *p; }
static inline vi vi_dot(vi acc, vw w, const int8_t* x) { return acc + (int32_t)w * (int32_t)x[0]; }
static inline int32_t vi_hsum(vi a) { return a; }

// -- int4 x int8 dot products (W4A8) --------------------------------------------------------------------
// One packed byte: elements 2j (low nibble) and 2j+1 (high nibble), in natural order.
constexpr int U4_BLOCK = 2;
typedef int32_t vu4acc;
struct vu4 {
    int32_t lo, hi;
};
static inline vu4 u4_prepare(const uint8_t* p) { return vu4{p[0] & 15, p[0] >> 4}; }
static inline vu4acc u4_dot(vu4acc acc, vu4 u, const int8_t* x) {
    return acc + u.lo * (int32_t)x[0] + u.hi * (int32_t)x[1];
}
static inline vu4acc u4_zero() { return 0; }
typedef float vu4f;
static inline vu4f u4f_zero() { return 0.0f; }
static inline vu4f u4f_fma(vu4f total, vu4acc a, vu4acc b, float s) { return (float)(a + b) * s + total; }
static inline float u4f_hsum(vu4f t) { return t; }
