// bitsandbytes 4-bit kernels (bnb4: qcompile/schemes/bnb4.py): y = x @ w.T + bias over bitsandbytes' own state,
// blocks of B over the FLATTENED row-major weight (element f = n K + k, so a block crosses rows when K % B != 0):
//     w[f] = table[code[f]] * absmax[f / B]                                               (float32 product)
//     double quant: absmax[b] = (float)(map[absmax_code[b]] * nested_absmax[b / 256]) + nested_offset[0]
// code[f] is the HIGH nibble of qweight[f / 2] when f is even, the low nibble when f is odd. table: NF4 or
// bitsandbytes' FP4 (16 float32 values by code); map: bitsandbytes' 8-bit dynamic code (256 float32 values).
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight uint8 [ceil(N K / 2)]; absmax float32 [n_blocks], or
// with double quant uint8 [n_blocks] plus nested_absmax float32 [ceil(n_blocks / 256)] and nested_offset float32
// [1]; n_blocks = ceil(N K / B); bias float32 [N] or NULL; y [M, N] float32 or bfloat16. Any M, N, K; B a power
// of two >= 32.
//
// Parameters (qc_call.ints): [0] B, [1] table (0 NF4, 1 FP4), [2] double quant (0/1); dequant_bnb4 also [3] n0,
// [4] n1. Kernels:
//   linear_bnb4:  y as above.
//   dequant_bnb4: writes rows n0..n1 of w to `y` as float32 [n1 - n0, K] (reads no x).
//
// A row starts at flat element f0 = n K: when f0 is odd its first element is the low nibble of a byte shared with
// the row before, and the rest of the row starts on a byte. Chunks of 16 codes (8 bytes) are decoded by a table
// lookup (one vpermps on AVX-512; two vpermps and a blend on AVX2) and multiplied by their block scales (a chunk
// meets at most one block boundary, since B >= 32: a blend of two broadcasts), then FMAs over up to 4 tokens; the
// row's last K % 16 elements run scalar. The block scales of a call are decoded once (double quant) before the
// rows. A thread computes whole outputs, so results do not depend on the thread count.

// Tables as float32 bit patterns (hex floats), equal to qcompile.schemes.bnb_blockwise (tested).
static const float BNB4_NF4[16] = {
    -0x1p+0f,        -0x1.647362p-1f, -0x1.0cd66p-1f,  -0x1.94654p-2f,  -0x1.23449ap-2f, -0x1.7a6a7ep-3f,
    -0x1.74f0e2p-4f, 0x0p+0f,         0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,
    0x1.c3497p-2f,   0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f};
static const float BNB4_FP4[16] = {
    0x0p+0f,         0x1.555556p-8f,  0x1.555556p-1f,  0x1p+0f,         0x1.555556p-2f,  0x1p-1f,
    0x1.555556p-3f,  0x1p-2f,         -0x0p+0f,        -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,
    -0x1.555556p-2f, -0x1p-1f,        -0x1.555556p-3f, -0x1p-2f};
// bitsandbytes' 8-bit dynamic code, ascending
static const float BNB4_MAP[256] = {
    -0x1.fc6666p-1f,  -0x1.f53334p-1f,  -0x1.eep-1f,      -0x1.e6ccccp-1f,  -0x1.df999ap-1f,  -0x1.d86666p-1f,
    -0x1.d13334p-1f,  -0x1.cap-1f,      -0x1.c2ccccp-1f,  -0x1.bb999ap-1f,  -0x1.b46666p-1f,  -0x1.ad3334p-1f,
    -0x1.a6p-1f,      -0x1.9eccccp-1f,  -0x1.97999ap-1f,  -0x1.906666p-1f,  -0x1.893334p-1f,  -0x1.82p-1f,
    -0x1.7accccp-1f,  -0x1.73999ap-1f,  -0x1.6c6668p-1f,  -0x1.653334p-1f,  -0x1.5ep-1f,      -0x1.56ccccp-1f,
    -0x1.4f999ap-1f,  -0x1.486668p-1f,  -0x1.413334p-1f,  -0x1.3ap-1f,      -0x1.32ccccp-1f,  -0x1.2b999ap-1f,
    -0x1.246668p-1f,  -0x1.1d3334p-1f,  -0x1.16p-1f,      -0x1.0eccccp-1f,  -0x1.079998p-1f,  -0x1.006666p-1f,
    -0x1.f26664p-2f,  -0x1.e4p-2f,      -0x1.d59998p-2f,  -0x1.c73334p-2f,  -0x1.b8ccccp-2f,  -0x1.aa6666p-2f,
    -0x1.9cp-2f,      -0x1.8d9998p-2f,  -0x1.7f3334p-2f,  -0x1.70ccccp-2f,  -0x1.626666p-2f,  -0x1.54p-2f,
    -0x1.459998p-2f,  -0x1.373334p-2f,  -0x1.28ccccp-2f,  -0x1.1a6668p-2f,  -0x1.0cp-2f,      -0x1.fb3332p-3f,
    -0x1.de6666p-3f,  -0x1.c1999ap-3f,  -0x1.a4ccccp-3f,  -0x1.88p-3f,      -0x1.6b3334p-3f,  -0x1.4e6666p-3f,
    -0x1.31999ap-3f,  -0x1.14ccccp-3f,  -0x1.fp-4f,       -0x1.b66668p-4f,  -0x1.93d70ap-4f,  -0x1.8851eep-4f,
    -0x1.7ccccep-4f,  -0x1.7147aep-4f,  -0x1.65c29p-4f,   -0x1.5a3d7p-4f,   -0x1.4eb854p-4f,  -0x1.433334p-4f,
    -0x1.37ae14p-4f,  -0x1.2c28f6p-4f,  -0x1.20a3d6p-4f,  -0x1.151ebap-4f,  -0x1.09999ap-4f,  -0x1.fc28f6p-5f,
    -0x1.e51ebap-5f,  -0x1.ce147ap-5f,  -0x1.b70a3ep-5f,  -0x1.ap-5f,       -0x1.88f5c2p-5f,  -0x1.71eb86p-5f,
    -0x1.5ae146p-5f,  -0x1.43d70ap-5f,  -0x1.2ccccep-5f,  -0x1.15c29p-5f,   -0x1.fd70a4p-6f,  -0x1.cf5c2ap-6f,
    -0x1.a147aep-6f,  -0x1.733334p-6f,  -0x1.451ebap-6f,  -0x1.170a3ep-6f,  -0x1.d1eb86p-7f,  -0x1.75c29p-7f,
    -0x1.3e76c8p-7f,  -0x1.2c083p-7f,   -0x1.19999ap-7f,  -0x1.072b02p-7f,  -0x1.e978d4p-8f,  -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f,  -0x1.7ae148p-8f,  -0x1.56041ap-8f,  -0x1.3126e8p-8f,  -0x1.0c49bap-8f,  -0x1.ced914p-9f,
    -0x1.851eb8p-9f,  -0x1.3b645ap-9f,  -0x1.e353f8p-10f, -0x1.4fdf3ap-10f, -0x1.eecbfep-11f, -0x1.b3d07cp-11f,
    -0x1.78d5p-11f,   -0x1.3dd982p-11f, -0x1.02de02p-11f, -0x1.8fc506p-12f, -0x1.19ce0ap-12f, -0x1.47ae16p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840cp-16f, -0x1.040bfep-17f, -0x1.b43528p-19f,
    -0x1.27476ep-21f, 0x0p+0f,          0x1.27476ep-21f,  0x1.b43528p-19f,  0x1.040bfep-17f,  0x1.64840cp-16f,
    0x1.6f0068p-15f,  0x1.15df66p-14f,  0x1.743e96p-14f,  0x1.47ae16p-13f,  0x1.19ce0ap-12f,  0x1.8fc506p-12f,
    0x1.02de02p-11f,  0x1.3dd982p-11f,  0x1.78d5p-11f,    0x1.b3d07cp-11f,  0x1.eecbfep-11f,  0x1.4fdf3ap-10f,
    0x1.e353f8p-10f,  0x1.3b645ap-9f,   0x1.851eb8p-9f,   0x1.ced914p-9f,   0x1.0c49bap-8f,   0x1.3126e8p-8f,
    0x1.56041ap-8f,   0x1.7ae148p-8f,   0x1.9fbe76p-8f,   0x1.c49ba6p-8f,   0x1.e978d4p-8f,   0x1.072b02p-7f,
    0x1.19999ap-7f,   0x1.2c083p-7f,    0x1.3e76c8p-7f,   0x1.75c29p-7f,    0x1.d1eb86p-7f,   0x1.170a3ep-6f,
    0x1.451ebap-6f,   0x1.733334p-6f,   0x1.a147aep-6f,   0x1.cf5c2ap-6f,   0x1.fd70a4p-6f,   0x1.15c29p-5f,
    0x1.2ccccep-5f,   0x1.43d70ap-5f,   0x1.5ae146p-5f,   0x1.71eb86p-5f,   0x1.88f5c2p-5f,   0x1.ap-5f,
    0x1.b70a3ep-5f,   0x1.ce147ap-5f,   0x1.e51ebap-5f,   0x1.fc28f6p-5f,   0x1.09999ap-4f,   0x1.151ebap-4f,
    0x1.20a3d6p-4f,   0x1.2c28f6p-4f,   0x1.37ae14p-4f,   0x1.433334p-4f,   0x1.4eb854p-4f,   0x1.5a3d7p-4f,
    0x1.65c29p-4f,    0x1.7147aep-4f,   0x1.7ccccep-4f,   0x1.8851eep-4f,   0x1.93d70ap-4f,   0x1.b66668p-4f,
    0x1.fp-4f,        0x1.14ccccp-3f,   0x1.31999ap-3f,   0x1.4e6666p-3f,   0x1.6b3334p-3f,   0x1.88p-3f,
    0x1.a4ccccp-3f,   0x1.c1999ap-3f,   0x1.de6666p-3f,   0x1.fb3332p-3f,   0x1.0cp-2f,       0x1.1a6668p-2f,
    0x1.28ccccp-2f,   0x1.373334p-2f,   0x1.459998p-2f,   0x1.54p-2f,       0x1.626666p-2f,   0x1.70ccccp-2f,
    0x1.7f3334p-2f,   0x1.8d9998p-2f,   0x1.9cp-2f,       0x1.aa6666p-2f,   0x1.b8ccccp-2f,   0x1.c73334p-2f,
    0x1.d59998p-2f,   0x1.e4p-2f,       0x1.f26664p-2f,   0x1.006666p-1f,   0x1.079998p-1f,   0x1.0eccccp-1f,
    0x1.16p-1f,       0x1.1d3334p-1f,   0x1.246668p-1f,   0x1.2b999ap-1f,   0x1.32ccccp-1f,   0x1.3ap-1f,
    0x1.413334p-1f,   0x1.486668p-1f,   0x1.4f999ap-1f,   0x1.56ccccp-1f,   0x1.5ep-1f,       0x1.653334p-1f,
    0x1.6c6668p-1f,   0x1.73999ap-1f,   0x1.7accccp-1f,   0x1.82p-1f,       0x1.893334p-1f,   0x1.906666p-1f,
    0x1.97999ap-1f,   0x1.9eccccp-1f,   0x1.a6p-1f,       0x1.ad3334p-1f,   0x1.b46666p-1f,   0x1.bb999ap-1f,
    0x1.c2ccccp-1f,   0x1.cap-1f,       0x1.d13334p-1f,   0x1.d86666p-1f,   0x1.df999ap-1f,   0x1.e6ccccp-1f,
    0x1.eep-1f,       0x1.f53334p-1f,   0x1.fc6666p-1f,   0x1p+0f};

#if defined(__AVX512F__)
typedef __m512 bnb4_lut;
static inline bnb4_lut bnb4_lut_load(const float* table) { return _mm512_loadu_ps(table); }
static inline vf bnb4_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline void bnb4_store(float* p, vf v) { _mm512_storeu_ps(p, v); }
// 8 bytes -> 16 values in element order (element 2j from the HIGH nibble of byte j).
static inline void bnb4_decode16(const uint8_t* p, bnb4_lut lut, const float* table, vf* out) {
    (void)table;
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    b = _mm_unpacklo_epi8(b, b);  // b0 b0 b1 b1 .. b7 b7
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);  // lane 0: shift 4
    out[0] = _mm512_permutexvar_ps(_mm512_srlv_epi32(_mm512_cvtepu8_epi32(b), shifts), lut);  // low 4 bits index
}
// Scales of 16 elements: the first `d` lanes in the block of s0, the rest in the next one (s1).
static inline void bnb4_scales16(float s0, float s1, int64_t d, vf* out) {
    const __mmask16 first = d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << d) - 1u);
    out[0] = _mm512_mask_blend_ps(first, _mm512_set1_ps(s1), _mm512_set1_ps(s0));
}
#elif defined(__AVX2__)
typedef struct {
    __m256 lo, hi;
} bnb4_lut;
static inline bnb4_lut bnb4_lut_load(const float* table) {
    bnb4_lut lut;
    lut.lo = _mm256_loadu_ps(table);
    lut.hi = _mm256_loadu_ps(table + 8);
    return lut;
}
static inline vf bnb4_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline void bnb4_store(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline __m256 bnb4_lookup8(__m256i codes, bnb4_lut lut) {
    const __m256 lo = _mm256_permutevar8x32_ps(lut.lo, codes);  // reads the low 3 bits
    const __m256 hi = _mm256_permutevar8x32_ps(lut.hi, codes);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(codes, 28)));  // bit 3 picks
}
static inline void bnb4_decode16(const uint8_t* p, bnb4_lut lut, const float* table, vf* out) {
    (void)table;
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    b = _mm_unpacklo_epi8(b, b);
    const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    out[0] = bnb4_lookup8(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), lut);
    out[1] = bnb4_lookup8(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), shifts), lut);
}
static inline void bnb4_scales16(float s0, float s1, int64_t d, vf* out) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i left = _mm256_set1_epi32((int)(d < 16 ? d : 16));
    const __m256 a = _mm256_set1_ps(s0), b = _mm256_set1_ps(s1);
    out[0] = _mm256_blendv_ps(b, a, _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, lanes)));
    const __m256i upper = _mm256_add_epi32(lanes, _mm256_set1_epi32(8));
    out[1] = _mm256_blendv_ps(b, a, _mm256_castsi256_ps(_mm256_cmpgt_epi32(left, upper)));
}
#else
typedef const float* bnb4_lut;
static inline bnb4_lut bnb4_lut_load(const float* table) { return table; }
static inline vf bnb4_mul(vf a, vf b) { return a * b; }
static inline void bnb4_store(float* p, vf v) { *p = v; }
static inline void bnb4_decode16(const uint8_t* p, bnb4_lut lut, const float* table, vf* out) {
    (void)lut;
    for (int j = 0; j < 8; j++) {
        out[2 * j] = table[p[j] >> 4];
        out[2 * j + 1] = table[p[j] & 15];
    }
}
static inline void bnb4_scales16(float s0, float s1, int64_t d, vf* out) {
    for (int64_t i = 0; i < 16; i++) out[i] = i < d ? s0 : s1;
}
#endif

// -- block scales -------------------------------------------------------------------------------------------------
typedef struct {
    const float* scale;  // scale of block b at scale[b - first]
    int64_t first;       // first block held
    float* owned;        // scratch to free (double quant), or NULL
} bnb4_scales;

static inline int bnb4_log2(int64_t v) {
    int s = 0;
    while (((int64_t)1 << s) < v) s++;
    return s;
}

// The scales of blocks [b0, b1): absmax itself, or decoded from the double-quantized state. 1 when out of memory.
static int bnb4_block_scales(const qc_call* c, int64_t b0, int64_t b1, bnb4_scales* out) {
    out->owned = nullptr;
    out->first = 0;
    if (!c->ints[2]) {
        out->scale = (const float*)c->tensors[1];
        return 0;
    }
    const uint8_t* codes = (const uint8_t*)c->tensors[1];
    const float* nested = (const float*)c->tensors[2];
    const float offset = ((const float*)c->tensors[3])[0];
    float* scale = (float*)scratch_alloc((size_t)(b1 - b0) * sizeof(float));
    if (!scale) return 1;
#pragma omp parallel for schedule(static) num_threads(c->threads) if (b1 - b0 >= 65536)
    for (int64_t b = b0; b < b1; b++) {
        const float product = BNB4_MAP[codes[b]] * nested[b >> 8];
        scale[b - b0] = product + offset;
    }
    out->scale = scale;
    out->first = b0;
    out->owned = scale;
    return 0;
}

// -- one weight row ------------------------------------------------------------------------------------------------
// One weight row (flat start f0) against MT float32 activation rows (stride K); out[m] = sum_k x[m, k] * w[k].
template <int MT>
static inline void bnb4_tile(const float* x, int64_t K, const uint8_t* q, int64_t f0, const bnb4_scales* sc, int sh,
                             bnb4_lut lut, const float* table, float* out) {
    constexpr int V = 16 / W;
    const int64_t mask = ((int64_t)1 << sh) - 1;
    float rest[MT];
    for (int m = 0; m < MT; m++) rest[m] = 0.0f;
    int64_t k = 0;
    if (f0 & 1) {  // the low nibble of the byte the previous row ends in
        const float w0 = table[q[f0 >> 1] & 15] * sc->scale[(f0 >> sh) - sc->first];
        for (int m = 0; m < MT; m++) rest[m] = x[m * K] * w0;
        k = 1;
    }
    vf acc[MT][V];
    for (int m = 0; m < MT; m++)
        for (int i = 0; i < V; i++) acc[m][i] = vf_zero();
    const uint8_t* p = q + ((f0 + k) >> 1);
    for (; k + 16 <= K; k += 16, p += 8) {
        const int64_t f = f0 + k, b = (f >> sh) - sc->first, left = (mask + 1) - (f & mask);
        vf w[V], s[V];
        bnb4_decode16(p, lut, table, w);
        bnb4_scales16(sc->scale[b], left < 16 ? sc->scale[b + 1] : 0.0f, left, s);
        for (int i = 0; i < V; i++) {
            const vf wi = bnb4_mul(w[i], s[i]);
            for (int m = 0; m < MT; m++) acc[m][i] = vf_fma(wi, vf_load(x + m * K + k + i * W), acc[m][i]);
        }
    }
    for (; k < K; k++) {
        const int64_t f = f0 + k;
        const uint8_t byte = q[f >> 1];
        const float w = table[(f & 1) ? (byte & 15) : (byte >> 4)] * sc->scale[(f >> sh) - sc->first];
        for (int m = 0; m < MT; m++) rest[m] += x[m * K + k] * w;
    }
    for (int m = 0; m < MT; m++) {
        vf total = acc[m][0];
        for (int i = 1; i < V; i++) total = vf_add(total, acc[m][i]);
        out[m] = vf_hsum(total) + rest[m];
    }
}

// One weight row (flat start f0) as float32 [K].
static inline void bnb4_row(const uint8_t* q, int64_t f0, int64_t K, const bnb4_scales* sc, int sh, bnb4_lut lut,
                            const float* table, float* out) {
    constexpr int V = 16 / W;
    const int64_t mask = ((int64_t)1 << sh) - 1;
    int64_t k = 0;
    if (f0 & 1) {
        out[0] = table[q[f0 >> 1] & 15] * sc->scale[(f0 >> sh) - sc->first];
        k = 1;
    }
    const uint8_t* p = q + ((f0 + k) >> 1);
    for (; k + 16 <= K; k += 16, p += 8) {
        const int64_t f = f0 + k, b = (f >> sh) - sc->first, left = (mask + 1) - (f & mask);
        vf w[V], s[V];
        bnb4_decode16(p, lut, table, w);
        bnb4_scales16(sc->scale[b], left < 16 ? sc->scale[b + 1] : 0.0f, left, s);
        for (int i = 0; i < V; i++) bnb4_store(out + k + i * W, bnb4_mul(w[i], s[i]));
    }
    for (; k < K; k++) {
        const int64_t f = f0 + k;
        const uint8_t byte = q[f >> 1];
        out[k] = table[(f & 1) ? (byte & 15) : (byte >> 4)] * sc->scale[(f >> sh) - sc->first];
    }
}

// -- entry points (qc_abi.h) --------------------------------------------------------------------------------------
static int linear_bnb4_call(const qc_call* c) {
    const int64_t M = c->M, K = c->K, N = c->N, B = c->ints[0];
    const int sh = bnb4_log2(B);
    const float* table = c->ints[1] ? BNB4_FP4 : BNB4_NF4;
    const uint8_t* q = (const uint8_t*)c->tensors[0];
    bnb4_scales sc;
    if (bnb4_block_scales(c, 0, (N * K + B - 1) >> sh, &sc)) return 1;
    const float* x = (const float*)c->x;
    float* xf = nullptr;
    if (c->x_bf16) {
        xf = (float*)scratch_alloc((size_t)(M * K) * sizeof(float));
        if (!xf) {
            free(sc.owned);
            return 1;
        }
        for (int64_t i = 0; i < M * K; i++) xf[i] = load_activation(c->x, 1, i);
        x = xf;
    }
    const bnb4_lut lut = bnb4_lut_load(table);
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            const float* xt = x + m0 * K;
            float out[4];
            switch (mt) {
                case 4: bnb4_tile<4>(xt, K, q, n * K, &sc, sh, lut, table, out); break;
                case 3: bnb4_tile<3>(xt, K, q, n * K, &sc, sh, lut, table, out); break;
                case 2: bnb4_tile<2>(xt, K, q, n * K, &sc, sh, lut, table, out); break;
                default: bnb4_tile<1>(xt, K, q, n * K, &sc, sh, lut, table, out); break;
            }
            const float bias = c->bias ? c->bias[n] : 0.0f;
            for (int64_t i = 0; i < mt; i++) store_output(c->y, c->y_bf16, (m0 + i) * N + n, out[i] + bias);
        }
    }
    free(xf);
    free(sc.owned);
    return 0;
}
QC_KERNEL(linear_bnb4, linear_bnb4_call)

static int dequant_bnb4_call(const qc_call* c) {
    const int64_t K = c->K, B = c->ints[0], n0 = c->ints[3], n1 = c->ints[4];
    if (n1 <= n0) return 0;
    const int sh = bnb4_log2(B);
    const float* table = c->ints[1] ? BNB4_FP4 : BNB4_NF4;
    bnb4_scales sc;
    if (bnb4_block_scales(c, (n0 * K) >> sh, ((n1 * K - 1) >> sh) + 1, &sc)) return 1;
    const bnb4_lut lut = bnb4_lut_load(table);
    float* out = (float*)c->y;
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = n0; n < n1; n++)
        bnb4_row((const uint8_t*)c->tensors[0], n * K, K, &sc, sh, lut, table, out + (n - n0) * K);
    free(sc.owned);
    return 0;
}
QC_KERNEL(dequant_bnb4, dequant_bnb4_call)
