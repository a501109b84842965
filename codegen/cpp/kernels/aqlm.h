// AQLM kernels (qcompile/schemes/aqlm.py): y = x @ W.T + bias with
//     W[n, g*ig + j] = s[n] * sum_m C[m, codes[n, g, m] mod E, j]        E = 2**B, G = Kp / ig groups per row
//
// Shapes and dtypes: x float32 or bfloat16 [Mt, K] (K <= Kp; columns K..Kp of W meet zeros); codes int8 (B <= 8) or
// int16 (B > 8) [N, G, M], stored signed with wrap (the entry is the value mod E); codebooks float16 bits
// [M, E, 1, ig]; scales float16 bits [N]; bias float32 [N] or NULL; y [Mt, N] float32 or bfloat16.
// Constraints: Kp % ig == 0, 1 <= ig <= 32, 1 <= M <= 8, 1 <= B <= 16.
//
// Parameters (qc_call.ints): [0] Kp, [1] ig, [2] M, [3] B; dequant_aqlm also [4] n0, [5] n1. Kernels:
//   linear_aqlm:  y as above. The codebooks are converted to float32 once per call. B <= 8 (look-up tables): per
//                 token, lut[(g*M + m)*E + c] = x_g . C[m, c] (float32, x_g the token's group g), then per row
//                 y[n] = s[n] * sum_{g,m} lut[(g*M + m)*E + code[n, g, m]] + bias: the G*M codes of a row are one
//                 contiguous run, gathered 16 (AVX-512) or 8 (AVX2) at a time, or one by one (scalar). B > 8: a row's
//                 entries are summed into a float32 row of W / s[n] (ig floats per entry), dotted with every token.
//                 A thread takes whole rows of N and sums in a fixed order: results do not depend on the threads.
//   dequant_aqlm: writes rows n0..n1 of W to `y` as float32 [n1 - n0, Kp] (reads no x).

// float16 bits -> float, exact (subnormals, infinities and NaN included).
static inline float aqlm_half(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    uint32_t bits;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-08f;  // m * 2**-24
        return (h & 0x8000) ? -v : v;
    }
    bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// n float16 values -> float32 (threads share the work; the values do not depend on how).
static void aqlm_halves(const uint16_t* in, int64_t n, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= (1 << 16))
    for (int64_t i0 = 0; i0 < n; i0 += 1024) {
        const int64_t i1 = min_i64(n, i0 + 1024);
        int64_t i = i0;
#if defined(__AVX512F__)
        for (; i + 16 <= i1; i += 16)
            _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(in + i))));
#endif
        for (; i < i1; i++) out[i] = aqlm_half(in[i]);
    }
}

// Row n of W / s[n] (float32 [Kp]): the sum of its entries, group by group.
static void aqlm_row(const void* codes, int wide, int64_t n, int64_t G, int64_t nc, int64_t E, int64_t ig,
                     const float* books, float* out) {
    const int64_t J = G * nc, mask = E - 1;
    for (int64_t g = 0; g < G; g++) {
        float* o = out + g * ig;
        for (int64_t j = 0; j < ig; j++) o[j] = 0.0f;
        for (int64_t m = 0; m < nc; m++) {
            const int64_t at = n * J + g * nc + m;
            const int64_t stored = wide ? (int64_t)((const int16_t*)codes)[at] : (int64_t)((const int8_t*)codes)[at];
            const int64_t code = stored & mask;
            const float* e = books + (m * E + code) * ig;
            for (int64_t j = 0; j < ig; j++) o[j] += e[j];
        }
    }
}

// sum_j lut_t[j*E + (codes[j] & (E-1))] for j < J and T tokens (lut_t = lut + t * stride); int8 codes (B <= 8).
template <int T>
static inline void aqlm_gather(const int8_t* codes, int64_t J, int64_t E, const float* lut, int64_t stride,
                               float* out) {
    const int32_t mask = (int32_t)E - 1;
    int64_t j = 0;
    float tail[T];
    for (int t = 0; t < T; t++) tail[t] = 0.0f;
#if defined(__AVX512F__)
    __m512 acc[T];
    for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
    const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int32_t)E));
    const __m512i maskv = _mm512_set1_epi32(mask);
    for (; j < J; j += 16) {
        const __mmask16 live = J - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (J - j)) - 1);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, codes + j));
        const __m512i idx = _mm512_add_epi32(_mm512_add_epi32(_mm512_and_si512(c, maskv), lane),
                                             _mm512_set1_epi32((int32_t)(j * E)));
        for (int t = 0; t < T; t++)
            acc[t] = _mm512_add_ps(acc[t],
                                   _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, lut + t * stride, 4));
    }
    for (int t = 0; t < T; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
#elif defined(__AVX2__)
    __m256 acc[T];
    for (int t = 0; t < T; t++) acc[t] = _mm256_setzero_ps();
    const __m256i lane = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int32_t)E));
    const __m256i maskv = _mm256_set1_epi32(mask);
    for (; j + 8 <= J; j += 8) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(codes + j)));
        const __m256i idx = _mm256_add_epi32(_mm256_add_epi32(_mm256_and_si256(c, maskv), lane),
                                             _mm256_set1_epi32((int32_t)(j * E)));
        for (int t = 0; t < T; t++) acc[t] = _mm256_add_ps(acc[t], _mm256_i32gather_ps(lut + t * stride, idx, 4));
    }
    for (int t = 0; t < T; t++) {
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
        const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
        out[t] = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
    }
#else
    for (int t = 0; t < T; t++) out[t] = 0.0f;
#endif
    for (; j < J; j++) {
        const int64_t at = j * E + ((int32_t)codes[j] & mask);
        for (int t = 0; t < T; t++) tail[t] += lut[t * stride + at];
    }
    for (int t = 0; t < T; t++) out[t] += tail[t];
}

// x (token t, zero past K) -> float32 [Kw] rows, Kw >= Kp.
static void aqlm_tokens(const qc_call* c, int64_t Kw, float* xs) {
    for (int64_t t = 0; t < c->M; t++)
        for (int64_t k = 0; k < Kw; k++)
            xs[t * Kw + k] = k < c->K ? load_activation(c->x, c->x_bf16, t * c->K + k) : 0.0f;
}

static int aqlm_lut_linear(const qc_call* c, const float* books) {
    const int64_t Mt = c->M, N = c->N, Kp = c->ints[0], ig = c->ints[1], nc = c->ints[2], E = (int64_t)1 << c->ints[3];
    const int64_t G = Kp / ig, J = G * nc, stride = J * E;
    const int8_t* codes = (const int8_t*)c->tensors[0];
    const uint16_t* scales = (const uint16_t*)c->tensors[2];
    float* xs = (float*)scratch_alloc((size_t)(Mt * Kp) * sizeof(float));
    float* lut = (float*)scratch_alloc((size_t)(Mt * stride) * sizeof(float));
    if (!xs || !lut) {
        free(xs);
        free(lut);
        return 1;
    }
    aqlm_tokens(c, Kp, xs);
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t tg = 0; tg < Mt * G; tg++) {
        const int64_t t = tg / G, g = tg % G;
        const float* xg = xs + t * Kp + g * ig;
        float* l = lut + t * stride + g * nc * E;
        for (int64_t e = 0; e < nc * E; e++) {
            const float* v = books + e * ig;
            float acc = 0.0f;
            for (int64_t j = 0; j < ig; j++) acc += xg[j] * v[j];
            l[e] = acc;
        }
    }
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = 0; n < N; n++) {
        const float s = aqlm_half(scales[n]), bias = c->bias ? c->bias[n] : 0.0f;
        const int8_t* row = codes + n * J;
        for (int64_t t0 = 0; t0 < Mt; t0 += 4) {
            const int64_t mt = min_i64(4, Mt - t0);
            float out[4];
            const float* l = lut + t0 * stride;
            switch (mt) {
                case 4: aqlm_gather<4>(row, J, E, l, stride, out); break;
                case 3: aqlm_gather<3>(row, J, E, l, stride, out); break;
                case 2: aqlm_gather<2>(row, J, E, l, stride, out); break;
                default: aqlm_gather<1>(row, J, E, l, stride, out); break;
            }
            for (int64_t i = 0; i < mt; i++) store_output(c->y, c->y_bf16, (t0 + i) * N + n, out[i] * s + bias);
        }
    }
    free(xs);
    free(lut);
    return 0;
}

// out[t] = sum_k xs[t, k] * w[k] for T tokens (Kw a multiple of W).
template <int T>
static inline void aqlm_dot(const float* xs, int64_t Kw, const float* w, float* out) {
    vf acc[T];
    for (int t = 0; t < T; t++) acc[t] = vf_zero();
    for (int64_t k = 0; k < Kw; k += W) {
        const vf wk = vf_load(w + k);
        for (int t = 0; t < T; t++) acc[t] = vf_fma(wk, vf_load(xs + t * Kw + k), acc[t]);
    }
    for (int t = 0; t < T; t++) out[t] = vf_hsum(acc[t]);
}

static int aqlm_row_linear(const qc_call* c, const float* books) {
    const int64_t Mt = c->M, N = c->N, Kp = c->ints[0], ig = c->ints[1], nc = c->ints[2], B = c->ints[3];
    const int64_t G = Kp / ig, E = (int64_t)1 << B, Kw = (Kp + 15) / 16 * 16;
    const uint16_t* scales = (const uint16_t*)c->tensors[2];
    float* xs = (float*)scratch_alloc((size_t)(Mt * Kw) * sizeof(float));
    if (!xs) return 1;
    aqlm_tokens(c, Kw, xs);
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        float* w = (float*)scratch_alloc((size_t)Kw * sizeof(float));
        if (!w) {
#pragma omp atomic write
            failed = 1;
        } else {
            for (int64_t k = Kp; k < Kw; k++) w[k] = 0.0f;
        }
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!w) continue;
            aqlm_row(c->tensors[0], B > 8, n, G, nc, E, ig, books, w);
            const float s = aqlm_half(scales[n]), bias = c->bias ? c->bias[n] : 0.0f;
            for (int64_t t0 = 0; t0 < Mt; t0 += 4) {
                const int64_t mt = min_i64(4, Mt - t0);
                float out[4];
                switch (mt) {
                    case 4: aqlm_dot<4>(xs + t0 * Kw, Kw, w, out); break;
                    case 3: aqlm_dot<3>(xs + t0 * Kw, Kw, w, out); break;
                    case 2: aqlm_dot<2>(xs + t0 * Kw, Kw, w, out); break;
                    default: aqlm_dot<1>(xs + t0 * Kw, Kw, w, out); break;
                }
                for (int64_t i = 0; i < mt; i++) store_output(c->y, c->y_bf16, (t0 + i) * N + n, out[i] * s + bias);
            }
        }
        free(w);
    }
    free(xs);
    return failed;
}

// -- entry points (qc_abi.h) ----------------------------------------------------------------------------------------
static int linear_aqlm_call(const qc_call* c) {
    const int64_t ig = c->ints[1], nc = c->ints[2], B = c->ints[3];
    const int64_t count = nc * ((int64_t)1 << B) * ig;
    float* books = (float*)scratch_alloc((size_t)count * sizeof(float));
    if (!books) return 1;
    aqlm_halves((const uint16_t*)c->tensors[1], count, books, c->threads);
    const int rc = B <= 8 ? aqlm_lut_linear(c, books) : aqlm_row_linear(c, books);
    free(books);
    return rc;
}
QC_KERNEL(linear_aqlm, linear_aqlm_call)

static int dequant_aqlm_call(const qc_call* c) {
    const int64_t Kp = c->ints[0], ig = c->ints[1], nc = c->ints[2], B = c->ints[3], n0 = c->ints[4], n1 = c->ints[5];
    const int64_t count = nc * ((int64_t)1 << B) * ig;
    const uint16_t* scales = (const uint16_t*)c->tensors[2];
    float* books = (float*)scratch_alloc((size_t)count * sizeof(float));
    if (!books) return 1;
    aqlm_halves((const uint16_t*)c->tensors[1], count, books, c->threads);
    float* out = (float*)c->y;
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = n0; n < n1; n++) {
        float* row = out + (n - n0) * Kp;
        aqlm_row(c->tensors[0], B > 8, n, Kp / ig, nc, (int64_t)1 << B, ig, books, row);
        const float s = aqlm_half(scales[n]);
        for (int64_t k = 0; k < Kp; k++) row[k] *= s;
    }
    free(books);
    return 0;
}
QC_KERNEL(dequant_aqlm, dequant_aqlm_call)
