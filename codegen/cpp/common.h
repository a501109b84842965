// Helpers shared by every ISA variant. Included inside each variant's namespace (qc_scalar, qc_avx2, ...),
// so every function here has one copy per ISA and the linker can never mix them up. No STL here: a
// template instantiated under AVX-512 flags could otherwise be picked for the scalar variant.

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// Round to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN).
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load_activation(const void* x, int x_bf16, int64_t i) {
    return x_bf16 ? bf16_to_float(((const uint16_t*)x)[i]) : ((const float*)x)[i];
}

static inline void store_output(void* y, int y_bf16, int64_t i, float v) {
    if (y_bf16)
        ((uint16_t*)y)[i] = float_to_bf16(v);
    else
        ((float*)y)[i] = v;
}

static inline void* scratch_alloc(size_t bytes) {
    void* p = nullptr;
    if (posix_memalign(&p, 64, bytes < 64 ? 64 : bytes) != 0) return nullptr;
    return p;
}

static inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// sum_g scale[g] * (zero[g] - shift) * xsum[g] over one weight row's G groups (zero NULL: zero_const for every
// group), W groups at a time: the zero points' share of one output of the group-wise kernels, taken once per row
// and token instead of once per group.
static inline float zero_term(const float* scale, const float* zero, float zero_const, float shift, const float* xsum,
                              int64_t G) {
    vf acc = vf_zero();
    const vf vneg = vf_bcast(-shift), vconst = vf_bcast(zero_const - shift);
    int64_t g = 0;
    for (; g + W <= G; g += W) {
        const vf z = zero ? vf_add(vf_load(zero + g), vneg) : vconst;
        acc = vf_fma(vf_fma(vf_load(scale + g), z, vf_zero()), vf_load(xsum + g), acc);
    }
    float sum = vf_hsum(acc);
    for (; g < G; g++) sum += scale[g] * ((zero ? zero[g] : zero_const) - shift) * xsum[g];
    return sum;
}
