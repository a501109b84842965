// FP4 (E2M1) kernels for mxfp4 and nvfp4 (qcompile/schemes/fp4.py, mxfp4.py, nvfp4.py): y = xq @ w.T + bias with
//     w[n, k] = e2m1(code[n, k]) * unit[n, k / group]
//     mxfp4 (kind 0): unit = 2**(scales[n, g] - 127), scales uint8 E8M0, group 32
//     nvfp4 (kind 1): unit = float(scales[n, g]) * global_scale[0], scales float8 e4m3fn bits, group 16
// and xq the prepared activation: x zero-padded to Kp, rotated by the block Hadamard of size `rotation` when it is
// set (x_p @ Hb, a fast Walsh-Hadamard transform per block, times 1/sqrt(rotation)), then with w4a4 quantized per
// token and per group by the scheme's rule and dequantized again (the values the reference multiplies).
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight uint8 [N, Kp/2] (element 2j in the low nibble of byte
// j, 2j+1 in the high one; code bit 3 = sign, bits 0-2 index {0, 0.5, 1, 1.5, 2, 3, 4, 6}); scales uint8 [N, Kp/group]
// (E8M0, or e4m3fn bits); global_scale float32 [1] (kind 1 only); bias float32 [N] or NULL; y [M, N] float32 or
// bfloat16. Constraints: Kp % group == 0, Kp % rotation == 0, group in {16, 32}, K <= Kp.
//
// Parameters (qc_call.ints): [0] kind (0 mxfp4, 1 nvfp4), [1] Kp, [2] group, [3] rotation (0: none), [4] w4a4 (0/1);
// dequant_fp4 also [5] n0, [6] n1. Kernels:
//   linear_fp4:  y as above.
//   prepare_fp4: writes xq to `y` as float32 [M, Kp] (reads no weight).
//   dequant_fp4: writes rows n0..n1 of w (the rotated basis) to `y` as float32 [n1 - n0, Kp] (reads no x).
//
// W4A4 scale rules, in float32 operations as the reference computes its scales (schemes/mxfp4.py, nvfp4.py):
//   mxfp4: e = clamp(floor(log2(amax(group))) - 2, -127, 127) (-127 for amax 0), unit = 2**e;
//   nvfp4: gx = amax(row) / 2688 (1 when that is 0), unit = e4m3(min(amax(group) / 6 / gx, 448)) * gx;
//   value = e2m1(v / unit) * unit (0 where unit is 0): nearest level, ties to the even level, saturating at 6.
// The weight decode is a 16-entry table (one vpermps on AVX-512; magnitude table plus sign bit on AVX2), times the
// block's unit, then FMAs over up to 4 tokens at once with several accumulators; a thread computes whole outputs
// (one contiguous range of rows of N each: one sequential weight stream per thread), so results do not depend
// on the thread count.

static const float FP4_VALUES[16] = {0.0f,  0.5f,  1.0f,  1.5f,  2.0f,  3.0f,  4.0f,  6.0f,
                                     -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

#if defined(__AVX512F__)
typedef __m512 fp4_lut;
static inline fp4_lut fp4_lut_load() { return _mm512_loadu_ps(FP4_VALUES); }
static inline vf fp4_mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
// 8 bytes -> the 16 values in natural order (element 2j from the low nibble of byte j).
static inline void fp4_decode16(const uint8_t* p, fp4_lut lut, vf* out) {
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    b = _mm_unpacklo_epi8(b, b);  // b0 b0 b1 b1 .. b7 b7
    const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
    const __m512i codes = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(b), shifts);
    out[0] = _mm512_permutexvar_ps(codes, lut);  // reads the low 4 bits of each index
}
#elif defined(__AVX2__)
typedef __m256 fp4_lut;
static inline fp4_lut fp4_lut_load() { return _mm256_loadu_ps(FP4_VALUES); }  // the 8 magnitudes
static inline vf fp4_mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline __m256 fp4_lookup8(__m256i codes, fp4_lut magnitudes) {
    const __m256 magnitude = _mm256_permutevar8x32_ps(magnitudes, codes);  // reads the low 3 bits
    const __m256i sign = _mm256_and_si256(_mm256_slli_epi32(codes, 28), _mm256_set1_epi32((int)0x80000000u));
    return _mm256_xor_ps(magnitude, _mm256_castsi256_ps(sign));
}
static inline void fp4_decode16(const uint8_t* p, fp4_lut lut, vf* out) {
    __m128i b = _mm_loadl_epi64((const __m128i*)p);
    b = _mm_unpacklo_epi8(b, b);
    const __m256i shifts = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    out[0] = fp4_lookup8(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(b), shifts), lut);
    out[1] = fp4_lookup8(_mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), shifts), lut);
}
#else
typedef const float* fp4_lut;
static inline fp4_lut fp4_lut_load() { return FP4_VALUES; }
static inline vf fp4_mul(vf a, vf b) { return a * b; }
static inline void fp4_decode16(const uint8_t* p, fp4_lut lut, vf* out) {
    for (int j = 0; j < 8; j++) {
        out[2 * j] = lut[p[j] & 15];
        out[2 * j + 1] = lut[p[j] >> 4];
    }
}
#endif

// -- scalar formats ---------------------------------------------------------------------------------------------
static inline float fp4_e8m0_value(uint8_t s) { return s == 255 ? NAN : ldexpf(1.0f, (int)s - 127); }

static inline float fp4_e4m3_value(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    if (e == 15 && m == 7) return NAN;
    const float magnitude = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
    return (b & 0x80) ? -magnitude : magnitude;
}

// Nearest e4m3 value of v in [0, 448] (ties to even), as torch's float -> float8_e4m3fn.
static inline float fp4_round_e4m3(float v) {
    if (v < 0.015625f) return nearbyintf(v * 512.0f) / 512.0f;  // subnormals: steps of 2**-9
    int e;
    frexpf(v, &e);  // v in [2**(e-1), 2**e): 3 mantissa bits, steps of 2**(e-4)
    return ldexpf(nearbyintf(ldexpf(v, 4 - e)), e - 4);
}

// e2m1(v) as a float: nearest of the 8 levels by magnitude (ties to the even level), saturating, sign kept.
static inline float fp4_round_e2m1(float v) {
    const float a = fabsf(v);
    const int i = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
    return copysignf(FP4_VALUES[i], v);
}

// Unit (value of one code step) of every byte of a scale tensor: 256 floats.
static void fp4_unit_table(int kind, const float* global_scale, float* table) {
    for (int b = 0; b < 256; b++)
        table[b] = kind == 0 ? fp4_e8m0_value((uint8_t)b) : fp4_e4m3_value((uint8_t)b) * global_scale[0];
}

// -- activations --------------------------------------------------------------------------------------------------
// In place, a block of h values times the normalized Sylvester Hadamard matrix (butterflies, then 1/sqrt(h)).
static void fp4_hadamard(float* v, int64_t h) {
    for (int64_t len = 1; len < h; len <<= 1)
        for (int64_t i = 0; i < h; i += 2 * len)
            for (int64_t j = i; j < i + len; j++) {
                const float a = v[j], b = v[j + len];
                v[j] = a + b;
                v[j + len] = a - b;
            }
    const float norm = (float)(1.0 / sqrt((double)h));
    for (int64_t j = 0; j < h; j++) v[j] *= norm;
}

// One row quantized per group and dequantized again (the W4A4 rule of the header).
static void fp4_quantize_row(float* row, int64_t Kp, int64_t gs, int kind) {
    float gx = 1.0f;
    if (kind == 1) {
        float amax = 0.0f;
        for (int64_t k = 0; k < Kp; k++) amax = fmaxf(amax, fabsf(row[k]));
        gx = amax / 2688.0f;
        if (!(gx > 0.0f)) gx = 1.0f;
    }
    for (int64_t k0 = 0; k0 < Kp; k0 += gs) {
        float amax = 0.0f;
        for (int64_t k = k0; k < k0 + gs; k++) amax = fmaxf(amax, fabsf(row[k]));
        float unit, inverse;
        if (kind == 0) {
            int e = -127;
            if (amax > 0.0f) {
                frexpf(amax, &e);
                e = e - 1 - 2;
                e = e < -127 ? -127 : (e > 127 ? 127 : e);
            }
            unit = ldexpf(1.0f, e);
            inverse = ldexpf(1.0f, -e);
        } else {
            float block = amax / 6.0f / gx;
            block = fp4_round_e4m3(block < 448.0f ? block : 448.0f);
            unit = block * gx;
            inverse = 0.0f;
        }
        for (int64_t k = k0; k < k0 + gs; k++) {
            if (!(unit > 0.0f))
                row[k] = 0.0f;
            else
                row[k] = fp4_round_e2m1(kind == 0 ? row[k] * inverse : row[k] / unit) * unit;
        }
    }
}

// x -> float32 [M, Kp]: zero padded, rotated, quantized as the parameters say.
static void fp4_prepare(const void* x, int x_bf16, int64_t M, int64_t K, int64_t Kp, int64_t gs, int kind,
                        int64_t rotation, int w4a4, float* xp, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (M >= 16)
    for (int64_t m = 0; m < M; m++) {
        float* row = xp + m * Kp;
        for (int64_t k = 0; k < K; k++) row[k] = load_activation(x, x_bf16, m * K + k);
        for (int64_t k = K; k < Kp; k++) row[k] = 0.0f;
        if (rotation > 1)
            for (int64_t k0 = 0; k0 < Kp; k0 += rotation) fp4_hadamard(row + k0, rotation);
        if (w4a4) fp4_quantize_row(row, Kp, gs, kind);
    }
}

// -- weights ------------------------------------------------------------------------------------------------------
// One weight row against MT prepared activation rows; out[m] = sum_k xp[m, k] * w[k] (no bias). Blocks of 16 codes;
// `shift` = log2(group / 16) maps a block to its group.
template <int MT>
static inline void fp4_tile(const float* xp, int64_t Kp, const uint8_t* wrow, const uint8_t* srow,
                            const float* units, int shift, float* out) {
    constexpr int V = 16 / W;                                // vectors per block of 16 codes
    constexpr int A = MT == 1 ? 4 : (MT == 2 ? 2 : 1);        // blocks in flight (independent accumulators)
    const fp4_lut lut = fp4_lut_load();
    const int64_t blocks = Kp / 16;
    vf acc[MT][A][V];
    for (int m = 0; m < MT; m++)
        for (int a = 0; a < A; a++)
            for (int i = 0; i < V; i++) acc[m][a][i] = vf_zero();
    int64_t b = 0;
    for (; b + A <= blocks; b += A) {
        for (int a = 0; a < A; a++) {
            vf w[V];
            fp4_decode16(wrow + (b + a) * 8, lut, w);
            const vf unit = vf_bcast(units[srow[(b + a) >> shift]]);
            const float* xb = xp + (b + a) * 16;
            for (int i = 0; i < V; i++) {
                const vf wi = fp4_mul(w[i], unit);
                for (int m = 0; m < MT; m++) acc[m][a][i] = vf_fma(wi, vf_load(xb + m * Kp + i * W), acc[m][a][i]);
            }
        }
    }
    for (; b < blocks; b++) {
        vf w[V];
        fp4_decode16(wrow + b * 8, lut, w);
        const vf unit = vf_bcast(units[srow[b >> shift]]);
        const float* xb = xp + b * 16;
        for (int i = 0; i < V; i++) {
            const vf wi = fp4_mul(w[i], unit);
            for (int m = 0; m < MT; m++) acc[m][0][i] = vf_fma(wi, vf_load(xb + m * Kp + i * W), acc[m][0][i]);
        }
    }
    for (int m = 0; m < MT; m++) {
        vf total = acc[m][0][0];
        for (int a = 0; a < A; a++)
            for (int i = (a == 0); i < V; i++) total = vf_add(total, acc[m][a][i]);
        out[m] = vf_hsum(total);
    }
}

static inline int fp4_shift(int64_t gs) { return gs == 32 ? 1 : (gs == 64 ? 2 : (gs == 128 ? 3 : 0)); }

static void fp4_rows(const float* xp, int64_t M, int64_t Kp, const uint8_t* qweight, const uint8_t* scales,
                     const float* units, int64_t gs, int64_t N, const float* bias, void* y, int y_bf16, int threads) {
    const int64_t G = Kp / gs;
    const int shift = fp4_shift(gs);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wrow = qweight + n * (Kp / 2);
        const uint8_t* srow = scales + n * G;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            const float* xt = xp + m0 * Kp;
            float out[4];
            switch (mt) {
                case 4: fp4_tile<4>(xt, Kp, wrow, srow, units, shift, out); break;
                case 3: fp4_tile<3>(xt, Kp, wrow, srow, units, shift, out); break;
                case 2: fp4_tile<2>(xt, Kp, wrow, srow, units, shift, out); break;
                default: fp4_tile<1>(xt, Kp, wrow, srow, units, shift, out); break;
            }
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t i = 0; i < mt; i++) store_output(y, y_bf16, (m0 + i) * N + n, out[i] + b);
        }
    }
}

// -- entry points (qc_abi.h) --------------------------------------------------------------------------------------
static const float* fp4_global(const qc_call* c) {
    return c->ints[0] == 1 && c->n_tensors > 2 ? (const float*)c->tensors[2] : nullptr;
}

static int fp4_prepare_call(const qc_call* c) {
    fp4_prepare(c->x, c->x_bf16, c->M, c->K, c->ints[1], c->ints[2], (int)c->ints[0], c->ints[3], (int)c->ints[4],
                (float*)c->y, c->threads);
    return 0;
}
QC_KERNEL(prepare_fp4, fp4_prepare_call)

static int linear_fp4_call(const qc_call* c) {
    const int64_t Kp = c->ints[1], gs = c->ints[2];
    float units[256];
    fp4_unit_table((int)c->ints[0], fp4_global(c), units);
    float* xp = (float*)scratch_alloc((size_t)(c->M * Kp) * sizeof(float));
    if (!xp) return 1;
    fp4_prepare(c->x, c->x_bf16, c->M, c->K, Kp, gs, (int)c->ints[0], c->ints[3], (int)c->ints[4], xp, c->threads);
    fp4_rows(xp, c->M, Kp, (const uint8_t*)c->tensors[0], (const uint8_t*)c->tensors[1], units, gs, c->N, c->bias,
             c->y, c->y_bf16, c->threads);
    free(xp);
    return 0;
}
QC_KERNEL(linear_fp4, linear_fp4_call)

static int dequant_fp4_call(const qc_call* c) {
    const int64_t Kp = c->ints[1], gs = c->ints[2], G = Kp / gs, n0 = c->ints[5], n1 = c->ints[6];
    float units[256];
    fp4_unit_table((int)c->ints[0], fp4_global(c), units);
    const uint8_t* qweight = (const uint8_t*)c->tensors[0];
    const uint8_t* scales = (const uint8_t*)c->tensors[1];
    float* out = (float*)c->y;
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* p = qweight + n * (Kp / 2);
        float* o = out + (n - n0) * Kp;
        for (int64_t j = 0; j < Kp / 2; j++) {
            const float unit = units[scales[n * G + (2 * j) / gs]];
            o[2 * j] = FP4_VALUES[p[j] & 15] * unit;
            o[2 * j + 1] = FP4_VALUES[p[j] >> 4] * unit;
        }
    }
    return 0;
}
QC_KERNEL(dequant_fp4, dequant_fp4_call)
