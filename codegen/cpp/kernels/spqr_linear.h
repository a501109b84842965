// SpQR kernels linear_spqr and dequant_spqr (described in spqr.h, whose tables and decoders they use; the build
// includes this file after spqr.h, in name order).

static inline void spqr_store(float* p, vf a) {
#if defined(__AVX512F__)
    _mm512_storeu_ps(p, a);
#elif defined(__AVX2__)
    _mm256_storeu_ps(p, a);
#else
    *p = a;
#endif
}

// acc[(i * M + t) * W ..] (W floats, in memory) += w[i * count + j] * xg[t * Kp + j] for rows i < 4, tokens t < T,
// j < count in order: one float32 chain per (row, token, lane), four rows side by side.
template <int T>
static inline void spqr_dot(const float* xg, int64_t Kp, const float* w, int64_t count, float* acc, int64_t M) {
    vf a[4][T];
    for (int i = 0; i < 4; i++)
        for (int t = 0; t < T; t++) a[i][t] = vf_load(acc + (i * M + t) * W);
    for (int64_t j = 0; j < count; j += W) {
        vf x[T];
        for (int t = 0; t < T; t++) x[t] = vf_load(xg + t * Kp + j);
        for (int i = 0; i < 4; i++) {
            const vf wv = vf_load(w + i * count + j);
            for (int t = 0; t < T; t++) a[i][t] = vf_fma(wv, x[t], a[i][t]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int t = 0; t < T; t++) spqr_store(acc + (i * M + t) * W, a[i][t]);
}

//: tiles whose tables a thread builds at a time (sc, toff, t1 and a row's weights stay in L1: 14 KB)
constexpr int64_t SPQR_CHUNK = 32;

static inline int64_t spqr_perm(const uint32_t* in_perm, int64_t j) {
    return (j & 1) ? (in_perm[j >> 1] >> 16) : (in_perm[j >> 1] & 0xffffu);
}

// out[t] += the outliers of row n times tokens m0 + t (t < mt). AVX-512: 16 outliers at a time (values from their
// float16 bits, activations gathered), one partial sum per lane and token, reduced once; else one by one in CSR order.
static inline void spqr_outliers(const int32_t* offsets, const uint32_t* col_vals, int64_t n, const float* xg,
                                 int64_t Kp, int64_t m0, int64_t mt, float* out) {
    int32_t e = offsets[n];
    const int32_t end = offsets[n + 1];
#if defined(__AVX512F__)
    if (end - e >= 8) {
        const __m512i low = _mm512_set1_epi32(0xffff), columns = _mm512_set1_epi32((int32_t)Kp);
        for (int64_t i0 = 0; i0 < mt; i0 += 4) {
            __m512 acc[4];
            const int64_t it = min_i64(4, mt - i0);
            for (int i = 0; i < 4; i++) acc[i] = _mm512_setzero_ps();
            for (int32_t e0 = e; e0 < end; e0 += 16) {
                const __mmask16 live = end - e0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (end - e0)) - 1);
                const __m512i cv = _mm512_maskz_loadu_epi32(live, col_vals + e0);
                const __m512i col = _mm512_and_si512(cv, low);
                const __mmask16 ok = _mm512_mask_cmplt_epi32_mask(live, col, columns);  // a column past Kp: none
                const __m512 v = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(cv, 16)));
                for (int i = 0; i < it; i++) {
                    const float* xm = xg + (m0 + i0 + i) * Kp;
                    const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), ok, col, xm, 4);
                    acc[i] = _mm512_mask3_fmadd_ps(v, xv, acc[i], ok);
                }
            }
            for (int i = 0; i < it; i++) out[i0 + i] += _mm512_reduce_add_ps(acc[i]);
        }
        return;
    }
#endif
    for (; e < end; e++) {
        const int64_t col = col_vals[e] & 0xffffu;
        if (col >= Kp) continue;  // no such column (the importer refuses these)
        const float v = spqr_half(col_vals[e] >> 16);
        for (int64_t i = 0; i < mt; i++) out[i] += v * xg[(m0 + i) * Kp + col];
    }
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
    const bool ph = spqr_fp16(c->ints[1]);
    int failed = 0;
    const int64_t blocks = (N + 15) / 16, chunk = min_i64(G, SPQR_CHUNK);
#pragma omp parallel num_threads(c->threads)
    {
        // per thread: sc, toff (16 per tile), t1 (64 per tile), four rows' weights (64 per tile), accumulators
        float* scratch = (float*)scratch_alloc((size_t)(chunk * 160 + 16 * M * W) * sizeof(float));
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < blocks; t++) {
            if (!scratch) continue;
            float *sc = scratch, *t1 = scratch + chunk * 32, *w = scratch + chunk * 96, *acc = scratch + chunk * 160;
            int32_t* toff = (int32_t*)(scratch + chunk * 16);
            const uint64_t* words = dense + t * G * 16;
            const int rows = (int)min_i64(16, N - t * 16);
            for (int64_t e = 0; e < 16 * M * W; e++) acc[e] = 0.0f;
            for (int64_t g0 = 0; g0 < G; g0 += chunk) {
                const int64_t g1 = min_i64(G, g0 + chunk), count = (g1 - g0) * 16;
                spqr_tables_of(ph, words, g0, g1, sc, toff, t1);
                // the next chunk's words (the next block's first ones after the last chunk), a quarter of its cache
                // lines per row of 4: the hardware prefetcher does not cross into the next page
                const char* next = (const char*)(words + g1 * 16);
                const int64_t lines = chunk * 2;  // 128 bytes a tile
                for (int r0 = 0; r0 < rows; r0 += 4) {  // rows past N (padding rows of the last block) are decoded too
                    for (int64_t l = r0 * lines / 16; l < (r0 + 4) * lines / 16; l++)
                        _mm_prefetch(next + 64 * l, _MM_HINT_T0);
#if SPQR_HAVE_FP16
                    if (ph && M == 1) {
                        spqr_fused_ph(words, r0, g0, g1, (const int32_t*)sc, toff, (const uint16_t*)t1,
                                      xg + g0 * 16, acc + r0 * W);
                        continue;
                    }
#endif
                    for (int i = 0; i < 4; i++) spqr_decode_of(ph, words, r0 + i, g0, g1, sc, toff, t1, w + i * count);
                    for (int64_t m0 = 0; m0 < M; m0 += 4) {
                        const float* x = xg + m0 * Kp + g0 * 16;
                        float* a = acc + (r0 * M + m0) * W;
                        switch (min_i64(4, M - m0)) {
                            case 4: spqr_dot<4>(x, Kp, w, count, a, M); break;
                            case 3: spqr_dot<3>(x, Kp, w, count, a, M); break;
                            case 2: spqr_dot<2>(x, Kp, w, count, a, M); break;
                            default: spqr_dot<1>(x, Kp, w, count, a, M); break;
                        }
                    }
                }
            }
            for (int r = 0; r < rows; r++) {
                const int64_t n = t * 16 + r;
                const float bias = c->bias ? c->bias[n] : 0.0f;
                for (int64_t m0 = 0; m0 < M; m0 += 16) {
                    const int64_t mt = min_i64(16, M - m0);
                    float out[16];
                    for (int64_t m = 0; m < mt; m++) out[m] = vf_hsum(vf_load(acc + (r * M + m0 + m) * W));
                    spqr_outliers(offsets, col_vals, n, xg, Kp, m0, mt, out);
                    for (int64_t m = 0; m < mt; m++) store_output(c->y, c->y_bf16, (m0 + m) * N + n, out[m] + bias);
                }
            }
        }
        free(scratch);
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
    const bool ph = spqr_fp16(c->ints[3]);
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        float* scratch = (float*)scratch_alloc((size_t)(G * 112) * sizeof(float));  // as linear_spqr, whole rows
        if (!scratch) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t t = n0 / 16; t < (n1 + 15) / 16; t++) {
            if (!scratch) continue;
            float *sc = scratch, *t1 = scratch + G * 32, *w = scratch + G * 96;
            int32_t* toff = (int32_t*)(scratch + G * 16);
            const uint64_t* words = dense + t * G * 16;
            spqr_tables_of(ph, words, 0, G, sc, toff, t1);
            for (int r = 0; r < 16; r++) {
                const int64_t n = t * 16 + r;
                if (n < n0 || n >= n1) continue;
                spqr_decode_of(ph, words, r, 0, G, sc, toff, t1, w);
                for (int32_t e = offsets[n]; e < offsets[n + 1]; e++) {
                    const int64_t col = col_vals[e] & 0xffffu;
                    if (col < Kp) w[col] += spqr_half(col_vals[e] >> 16);
                }
                for (int64_t j = 0; j < Kp; j++) store_output(c->y, c->y_bf16, (n - n0) * Kp + j, w[j]);
            }
        }
        free(scratch);
    }
    return failed;
}
QC_KERNEL(dequant_spqr, dequant_spqr_call)
