// SpQR kernels (qcompile/schemes/spqr.py): y = x @ W.T + bias with W in transformers' / spqr_quant's packed layout.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; dense_weights int64 [ceil(N/16) * Kp/16 * 16]: word
// (t * Kp/16 + g) * 16 + i is row 16t + i of tile (t, g): bits 0-2 qs, 3-5 qz, 6+3c..8+3c the code of column
// 16g + c, 54-61 byte i/2 of the tile's second-order word (float16 ss, zs, sz, zz in bits 0-15, 16-31, 32-47,
// 48-63); row_offsets int32 [N + 1] (CSR); col_vals int32 [nnz]: float16 value in bits 16-31, permuted column in
// bits 0-15; in_perm int32 [Kp/2]: perm[2i] in bits 0-15, perm[2i+1] in bits 16-31; bias float32 [N] or NULL;
// y [M, N] float32 or bfloat16. Constraints: Kp % 16 == 0, K <= Kp <= 65536.
//
// Weight (every step a float16 operation, round to nearest even, as spqr_quant's __hsub / __hmul):
//     scale = h(ss * h(qs - sz)),  zero = h(zs * h(qz - zz)),  D[r, j] = h(scale * h(q - zero))
//     y[m, n] = sum_j D[n, j] * x[m, perm[j]] + sum over row n's outliers (j, v) of v * x[m, perm[j]] + bias[n]
// (x[m, f] = 0 for f >= K). Products and differences of float16 values are exact in double, so h() below rounds
// each exact result once.
//
// Parameters (qc_call.ints): [0] Kp; dequant_spqr also [1] n0, [2] n1. Kernels:
//   linear_spqr:  gathers xg[m, j] = x[m, perm[j]] once per call (float32 [M, Kp]); threads take blocks of 16 rows:
//                 each tile's statistics are rebuilt once from its 16 words, then each row is decoded (per tile row
//                 the 8 values its codes can take, then one lookup per weight) into a float32 buffer, dotted with
//                 every token (up to 4 at once) and its outliers added, so results do not depend on the thread count.
//   dequant_spqr: writes rows n0..n1 of D plus the outliers (permuted column order) to `y`, float32 or bfloat16
//                 (y_bf16) [n1 - n0, Kp] (reads no x).

// IEEE half bits -> float, exact (subnormals, infinities, NaN).
static inline float spqr_half(uint32_t h) {
    const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t u;
    if (exp == 0) {
        float v = (float)man * (1.0f / 16777216.0f);  // man * 2^-24
        return sign ? -v : v;
    }
    if (exp == 31)
        u = sign | 0x7f800000u | (man << 13);
    else
        u = sign | ((exp + 112) << 23) | (man << 13);
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// v rounded to the nearest float16 (ties to even), as a double; beyond float16's range: +-inf.
static inline double spqr_h(double v) {
    if (v == 0.0 || v != v) return v;
    const double a = fabs(v);
    if (a >= 65520.0) return copysign(INFINITY, v);
    uint64_t bits;
    memcpy(&bits, &a, 8);
    int q = (int)((bits >> 52) & 0x7ff) - 1023 - 10;  // the quantum of 11 significant bits: 2^(floor(log2 a) - 10)
    if (q < -24) q = -24;                             // subnormal quantum
    // a + 2^(q+52) has a unit in the last place of 2^q, so the addition rounds a to a multiple of 2^q, to nearest
    // even (the default rounding mode); the subtraction is exact
    const uint64_t magic_bits = (uint64_t)(q + 52 + 1023) << 52;
    double magic;
    memcpy(&magic, &magic_bits, 8);
    return copysign((a + magic) - magic, v);
}

// The float16 statistics (ss, zs, sz, zz) of the G tiles of one tile row (16 words per tile).
static void spqr_tile_stats(const uint64_t* words, int64_t G, double* st) {
    for (int64_t g = 0; g < G; g++) {
        const uint64_t* t = words + g * 16;
        uint64_t s = 0;
        for (int r = 0; r < 16; r++) s |= ((t[r] >> 54) & 0xffu) << (8 * (r / 2));
        for (int i = 0; i < 4; i++) st[4 * g + i] = (double)spqr_half((uint32_t)((s >> (16 * i)) & 0xffffu));
    }
}

// Row r (0..15) of a tile row -> out[Kp] float32 (permuted column order, dense part only).
static void spqr_row(const uint64_t* words, int r, const double* st, int64_t G, float* out) {
    for (int64_t g = 0; g < G; g++) {
        const uint64_t w = words[g * 16 + r];
        const double* s4 = st + 4 * g;
        const double scale = spqr_h(s4[0] * spqr_h((double)(w & 7u) - s4[2]));
        const double zero = spqr_h(s4[1] * spqr_h((double)((w >> 3) & 7u) - s4[3]));
        float lut[8];
        for (int q = 0; q < 8; q++) lut[q] = (float)spqr_h(scale * spqr_h((double)q - zero));
        float* o = out + g * 16;
        for (int c = 0; c < 16; c++) o[c] = lut[(w >> (6 + 3 * c)) & 7u];
    }
}

template <int T>
static inline void spqr_dot(const float* xg, int64_t Kp, const float* w, float* out) {
    vf acc[T];
    for (int t = 0; t < T; t++) acc[t] = vf_zero();
    for (int64_t j = 0; j < Kp; j += W) {
        const vf wv = vf_load(w + j);
        for (int t = 0; t < T; t++) acc[t] = vf_fma(wv, vf_load(xg + t * Kp + j), acc[t]);
    }
    for (int t = 0; t < T; t++) out[t] = vf_hsum(acc[t]);
}

static inline int64_t spqr_perm(const uint32_t* in_perm, int64_t j) {
    return (j & 1) ? (in_perm[j >> 1] >> 16) : (in_perm[j >> 1] & 0xffffu);
}

static int linear_spqr_call(const qc_call* c) {
    const int64_t M = c->M, N = c->N, K = c->K, Kp = c->ints[0], G = Kp / 16;
    const uint64_t* dense = (const uint64_t*)c->tensors[0];
    const int32_t* offsets = (const int32_t*)c->tensors[1];
    const uint32_t* col_vals = (const uint32_t*)c->tensors[2];
    const uint32_t* in_perm = (const uint32_t*)c->tensors[3];
    float* xg = (float*)scratch_alloc((size_t)(M * Kp) * sizeof(float));
    if (!xg) return 1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < Kp; j++) {
            const int64_t f = spqr_perm(in_perm, j);
            xg[m * Kp + j] = f < K ? load_activation(c->x, c->x_bf16, m * K + f) : 0.0f;
        }
    int failed = 0;
    const int64_t blocks = (N + 15) / 16;
#pragma omp parallel num_threads(c->threads)
    {
        float* w = (float*)scratch_alloc((size_t)Kp * sizeof(float));
        double* st = (double*)scratch_alloc((size_t)G * 4 * sizeof(double));
        if (!w || !st) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < blocks; t++) {
            if (!w || !st) continue;
            const uint64_t* words = dense + t * G * 16;
            spqr_tile_stats(words, G, st);
            for (int r = 0; r < 16 && t * 16 + r < N; r++) {
                const int64_t n = t * 16 + r;
                spqr_row(words, r, st, G, w);
                const float bias = c->bias ? c->bias[n] : 0.0f;
                for (int64_t m0 = 0; m0 < M; m0 += 4) {
                    const int64_t mt = min_i64(4, M - m0);
                    float out[4];
                    switch (mt) {
                        case 4: spqr_dot<4>(xg + m0 * Kp, Kp, w, out); break;
                        case 3: spqr_dot<3>(xg + m0 * Kp, Kp, w, out); break;
                        case 2: spqr_dot<2>(xg + m0 * Kp, Kp, w, out); break;
                        default: spqr_dot<1>(xg + m0 * Kp, Kp, w, out); break;
                    }
                    for (int32_t e = offsets[n]; e < offsets[n + 1]; e++) {
                        const int64_t col = col_vals[e] & 0xffffu;
                        if (col >= Kp) continue;  // no such column (the importer refuses these)
                        const float v = spqr_half(col_vals[e] >> 16);
                        for (int64_t i = 0; i < mt; i++) out[i] += v * xg[(m0 + i) * Kp + col];
                    }
                    for (int64_t i = 0; i < mt; i++) store_output(c->y, c->y_bf16, (m0 + i) * N + n, out[i] + bias);
                }
            }
        }
        free(w);
        free(st);
    }
    free(xg);
    return failed;
}
QC_KERNEL(linear_spqr, linear_spqr_call)

static int dequant_spqr_call(const qc_call* c) {
    const int64_t Kp = c->ints[0], G = Kp / 16, n0 = c->ints[1], n1 = c->ints[2];
    const uint64_t* dense = (const uint64_t*)c->tensors[0];
    const int32_t* offsets = (const int32_t*)c->tensors[1];
    const uint32_t* col_vals = (const uint32_t*)c->tensors[2];
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        float* w = (float*)scratch_alloc((size_t)Kp * sizeof(float));
        double* st = (double*)scratch_alloc((size_t)G * 4 * sizeof(double));
        if (!w || !st) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = n0 / 16; t < (n1 + 15) / 16; t++) {
            if (!w || !st) continue;
            const uint64_t* words = dense + t * G * 16;
            spqr_tile_stats(words, G, st);
            for (int r = 0; r < 16; r++) {
                const int64_t n = t * 16 + r;
                if (n < n0 || n >= n1) continue;
                spqr_row(words, r, st, G, w);
                for (int32_t e = offsets[n]; e < offsets[n + 1]; e++) {
                    const int64_t col = col_vals[e] & 0xffffu;
                    if (col < Kp) w[col] += spqr_half(col_vals[e] >> 16);
                }
                for (int64_t j = 0; j < Kp; j++) store_output(c->y, c->y_bf16, (n - n0) * Kp + j, w[j]);
            }
        }
        free(w);
        free(st);
    }
    return failed;
}
QC_KERNEL(dequant_spqr, dequant_spqr_call)
