// W4A8 kernel: int4 weights per group x int8 activations quantized per token, exact integer inner sums.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight uint8 [N, Kp/2] (element 2j in the low nibble, 2j+1
// in the high one); scales / zeros float32 [N, Kp/group_size] (zeros NULL: zero_const, 8 for symmetric);
// bias float32 [N] or NULL; y [M, N] float32 or bfloat16. Kp % group_size == 0, K <= Kp.
// Per token m: x_scale = absmax(x[m]) / 127 (1 for an all-zero row), x_q = clamp(rint(x / x_scale), -127, 127)
// (round half to even; the same float32 division as the reference, so the codes match it exactly). Then
//     y[m, n] = x_scale * sum_g scale[n, g] * (sum_{k in g} u * x_q  -  zero[n, g] * sum_{k in g} x_q) + bias[n]
// with the inner sums in int32 (their lanes are scaled into float32 vector accumulators per group, and summed
// across lanes once per output). The activation copy is permuted once per call so each block of U4_BLOCK
// codes (see vec_*.h) meets its activations in order; what is left of a group after its whole blocks runs
// scalar. Tokens are processed 4 at a time; each thread takes one contiguous range of output rows (one
// sequential stream of the weight, see weight_only.h), each output computed by one thread, so results do not
// depend on the thread count.

// x -> int8 [M, Kp] (zero padded, blocks permuted), per-token scales xs [M], per-group sums xsum [M, G] (exact
// integers in float32).
static void w4a8_prepare(const void* x, int x_bf16, int64_t M, int64_t K, int64_t Kp, int64_t gs, int8_t* xq,
                         float* xs, float* xsum) {
    const int64_t G = Kp / gs;
    constexpr int HALF = U4_BLOCK / 2;
    for (int64_t m = 0; m < M; m++) {
        float absmax = 0.0f;
        for (int64_t k = 0; k < K; k++) absmax = fmaxf(absmax, fabsf(load_activation(x, x_bf16, m * K + k)));
        float scale = absmax / 127.0f;
        if (!(scale > 0.0f)) scale = 1.0f;
        xs[m] = scale;
        int8_t* row = xq + m * Kp;
        for (int64_t k = 0; k < K; k++) {
            float q = nearbyintf(load_activation(x, x_bf16, m * K + k) / scale);
            row[k] = (int8_t)(q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q));
        }
        for (int64_t k = K; k < Kp; k++) row[k] = 0;
        for (int64_t g = 0; g < G; g++) {
            int32_t s = 0;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) s += row[k];
            xsum[m * G + g] = (float)s;  // exact: |s| <= 127 * group_size
            int8_t tmp[U4_BLOCK];
            for (int64_t b = 0; b < gs / U4_BLOCK; b++) {
                int8_t* block = row + g * gs + b * U4_BLOCK;
                for (int i = 0; i < HALF; i++) {
                    tmp[i] = block[2 * i];
                    tmp[HALF + i] = block[2 * i + 1];
                }
                memcpy(block, tmp, sizeof(tmp));
            }
        }
    }
}

#if defined(__AVX512BW__)
// Two U4 blocks (32 packed bytes) as 64 codes in the activation copy's order: block 0's low then high nibbles,
// then block 1's, so one 512-bit vpdpbusd takes both.
static inline __m512i u4x2_prepare(const uint8_t* p) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    const __m256i mask = _mm256_set1_epi8(15);
    const __m256i lo = _mm256_and_si256(v, mask), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    const __m512i order = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);  // lo q0 q1, hi q0 q1, lo q2 q3, hi q2 q3
    return _mm512_permutex2var_epi64(_mm512_castsi256_si512(lo), order, _mm512_castsi256_si512(hi));
}
#endif

// One weight row against MT tokens: out[m] = sum_g scale_g * sum_{k in g} (u - zero_g) * x_q (no token scale,
// no bias). The zero points' share is taken once per row and token (zero_term); AVX-512 takes two blocks per
// 512-bit vpdpbusd.
template <int MT>
static inline void w4a8_tile(const int8_t* xq, int64_t Kp, const float* xsum, const uint8_t* wrow,
                             const float* srow, const float* zrow, float zero_const, int64_t gs, int64_t G,
                             float* out) {
    const int64_t blocks = gs / U4_BLOCK;
    const bool ragged = blocks * U4_BLOCK < gs;
    // one token: two independent chains (latency); more tokens: one chain each, so the accumulators, the float
    // totals and the unpacked codes all stay in registers
    constexpr int CH = MT == 1 ? 2 : 1;
    vu4f total[MT];
    float tails[MT];
    for (int m = 0; m < MT; m++) {
        total[m] = u4f_zero();
        tails[m] = 0.0f;
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * gs;
        vu4acc acc[MT][2];
        for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = u4_zero();
        int64_t b = 0;
#if defined(__AVX512BW__)
        if (blocks >= 2 * CH) {
            __m512i wide[MT][CH];
            for (int m = 0; m < MT; m++)
                for (int c = 0; c < CH; c++) wide[m][c] = _mm512_setzero_si512();
            for (; b + 2 * CH <= blocks; b += 2 * CH) {
                for (int c = 0; c < CH; c++) {
                    const int64_t k = k0 + (b + 2 * c) * U4_BLOCK;
                    const __m512i u = u4x2_prepare(wrow + k / 2);
                    for (int m = 0; m < MT; m++)
                        wide[m][c] = _mm512_dpbusd_epi32(wide[m][c], u, _mm512_loadu_si512(xq + m * Kp + k));
                }
            }
            for (int m = 0; m < MT; m++)
                for (int c = 0; c < CH; c++)
                    acc[m][c] = _mm256_add_epi32(_mm512_castsi512_si256(wide[m][c]),
                                                 _mm512_extracti64x4_epi64(wide[m][c], 1));
        }
#endif
        for (; b + CH <= blocks; b += CH) {
            for (int c = 0; c < CH; c++) {
                const vu4 u = u4_prepare(wrow + (k0 + (b + c) * U4_BLOCK) / 2);
                for (int m = 0; m < MT; m++) acc[m][c] = u4_dot(acc[m][c], u, xq + m * Kp + k0 + (b + c) * U4_BLOCK);
            }
        }
        for (; b < blocks; b++) {
            const vu4 u = u4_prepare(wrow + (k0 + b * U4_BLOCK) / 2);
            for (int m = 0; m < MT; m++) acc[m][0] = u4_dot(acc[m][0], u, xq + m * Kp + k0 + b * U4_BLOCK);
        }
        const float s = srow[g];
        for (int m = 0; m < MT; m++) total[m] = u4f_fma(total[m], acc[m][0], acc[m][1], s);
        if (ragged) {
            for (int m = 0; m < MT; m++) {
                int32_t tail = 0;
                for (int64_t k = k0 + blocks * U4_BLOCK; k < k0 + gs; k++)
                    tail += (int32_t)((wrow[k >> 1] >> ((k & 1) * 4)) & 15) * (int32_t)xq[m * Kp + k];
                tails[m] += s * (float)tail;
            }
        }
    }
    for (int m = 0; m < MT; m++)
        out[m] = u4f_hsum(total[m]) + tails[m] - zero_term(srow, zrow, zero_const, 0.0f, xsum + m * G, G);
}

static int linear_w4a8(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* qweight, int64_t N,
                       int64_t Kp, const float* scales, const float* zeros, float zero_const, int64_t gs,
                       const float* bias, void* y, int y_bf16, int threads) {
    const int64_t G = Kp / gs;
    int8_t* xq = (int8_t*)scratch_alloc((size_t)(M * Kp));
    float* xs = (float*)scratch_alloc((size_t)M * sizeof(float));
    float* xsum = (float*)scratch_alloc((size_t)(M * G) * sizeof(float));
    if (!xq || !xs || !xsum) {
        free(xq);
        free(xs);
        free(xsum);
        return 1;
    }
    w4a8_prepare(x, x_bf16, M, K, Kp, gs, xq, xs, xsum);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wrow = qweight + n * (Kp / 2);
        const float* srow = scales + n * G;
        const float* zrow = zeros ? zeros + n * G : nullptr;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            const int8_t* xt = xq + m0 * Kp;
            const float* st = xsum + m0 * G;
            float out[4];
            switch (mt) {
                case 4: w4a8_tile<4>(xt, Kp, st, wrow, srow, zrow, zero_const, gs, G, out); break;
                case 3: w4a8_tile<3>(xt, Kp, st, wrow, srow, zrow, zero_const, gs, G, out); break;
                case 2: w4a8_tile<2>(xt, Kp, st, wrow, srow, zrow, zero_const, gs, G, out); break;
                default: w4a8_tile<1>(xt, Kp, st, wrow, srow, zrow, zero_const, gs, G, out); break;
            }
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t i = 0; i < mt; i++) store_output(y, y_bf16, (m0 + i) * N + n, out[i] * xs[m0 + i] + b);
        }
    }
    free(xq);
    free(xs);
    free(xsum);
    return 0;
}

// Entry point (qc_abi.h). tensors: qweight, scales, zeros (absent when symmetric); ints: Kp, group_size;
// floats: zero_const (8 for symmetric int4).
static int linear_w4a8_call(const qc_call* c) {
    const float* zeros = c->n_tensors > 2 ? (const float*)c->tensors[2] : nullptr;
    return linear_w4a8(c->x, c->x_bf16, c->M, c->K, (const uint8_t*)c->tensors[0], c->N, c->ints[0],
                       (const float*)c->tensors[1], zeros, (float)c->floats[0], c->ints[1], c->bias, c->y, c->y_bf16,
                       c->threads);
}
QC_KERNEL(linear_w4a8, linear_w4a8_call)
