// W4A16 with bfloat16 activations on CPUs with AVX512-BF16 (linear_wo_bf16): the same sums with vdpbf16ps, which
// multiplies 32 bfloat16 pairs into 16 float32 lanes per instruction. Codes become bfloat16 (u - 8) through a
// 32-word table (vpermw; exact: small integers), products are exact in float32 and summed in float32, so
//     y = sum_g scale_g * (sum_{k in g} (u_k - 8) x_k  -  (zero_g - 8) * sum_{k in g} x_k)
// is the float arithmetic of linear_wo (weight_only.h) up to the order of the float32 additions (the zero share is
// zero_term). Each block of 64 activations is stored as its 32 even-indexed values, then its 32 odd ones, to meet
// the low / high nibbles of 32 packed bytes.
// Needs group_size % 64 == 0 (the row chooses linear_wo otherwise); other ISA variants forward to linear_wo.
#if defined(__AVX512BW__)
#define QC_BF16DP __attribute__((target("avx512bf16")))

static void wo_prepare_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t Kp, int64_t gs, uint16_t* xp,
                            float* xsum) {
    const int64_t G = Kp / gs;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t* row = x + m * K;
        uint16_t* out = xp + m * Kp;
        for (int64_t b = 0; b < Kp; b += 64)
            for (int i = 0; i < 32; i++) {
                const int64_t k = b + 2 * i;
                out[b + i] = k < K ? row[k] : 0;
                out[b + 32 + i] = k + 1 < K ? row[k + 1] : 0;
            }
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = g * gs; k < min_i64((g + 1) * gs, K); k++) s += bf16_to_float(row[k]);
            xsum[m * G + g] = s;
        }
    }
}

template <int MT>
QC_BF16DP static inline void wo_tile_bf16(const uint16_t* xp, int64_t Kp, const uint8_t* wrow, const float* srow,
                                          const float* zrow, float zero_const, int64_t gs, int64_t G,
                                          const float* xsum, float* out) {
    constexpr int ACC = MT == 1 ? 4 : (MT == 2 ? 2 : 1);
    const __m512i table = _mm512_set_epi16(  // bfloat16 of u - 8 for u = 31..0 (codes use 0..15)
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0,
        (short)0xbf80, (short)0xc000, (short)0xc040, (short)0xc080, (short)0xc0a0, (short)0xc0c0, (short)0xc0e0,
        (short)0xc100);
    const __m512i mask = _mm512_set1_epi16(15);
    const int64_t blocks = gs / 64;
    __m512 total[MT];
    for (int m = 0; m < MT; m++) total[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * gs;
        __m512 acc[ACC][MT];
        for (int a = 0; a < ACC; a++)
            for (int m = 0; m < MT; m++) acc[a][m] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b += ACC) {
            for (int a = 0; a < ACC && b + a < blocks; a++) {
                const int64_t k = k0 + (b + a) * 64;
                const __m512i bytes = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(wrow + k / 2)));
                const __m512i lo = _mm512_permutexvar_epi16(_mm512_and_si512(bytes, mask), table);
                const __m512i hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(bytes, 4), table);
                for (int m = 0; m < MT; m++) {
                    const uint16_t* xb = xp + m * Kp + k;
                    acc[a][m] = _mm512_dpbf16_ps(acc[a][m], (__m512bh)lo, (__m512bh)_mm512_loadu_si512(xb));
                    acc[a][m] = _mm512_dpbf16_ps(acc[a][m], (__m512bh)hi, (__m512bh)_mm512_loadu_si512(xb + 32));
                }
            }
        }
        const __m512 vs = _mm512_set1_ps(srow[g]);
        for (int m = 0; m < MT; m++) {
            __m512 sum = acc[0][m];
            for (int a = 1; a < ACC; a++) sum = _mm512_add_ps(sum, acc[a][m]);
            total[m] = _mm512_fmadd_ps(sum, vs, total[m]);
        }
    }
    for (int m = 0; m < MT; m++)
        out[m] = _mm512_reduce_add_ps(total[m]) - zero_term(srow, zrow, zero_const, 8.0f, xsum + m * G, G);
}

static int linear_wo_bf16(const qc_call* c) {
    const int64_t M = c->M, K = c->K, N = c->N, Kp = c->ints[1], gs = c->ints[2], G = Kp / gs;
    const float* scales = (const float*)c->tensors[1];
    const float* zeros = c->n_tensors > 2 ? (const float*)c->tensors[2] : nullptr;
    const float zero_const = (float)c->floats[0];
    uint16_t* xp = (uint16_t*)scratch_alloc((size_t)(M * Kp) * sizeof(uint16_t));
    float* xsum = (float*)scratch_alloc((size_t)(M * G) * sizeof(float));
    if (!xp || !xsum) {
        free(xp);
        free(xsum);
        return 1;
    }
    wo_prepare_bf16((const uint16_t*)c->x, M, K, Kp, gs, xp, xsum);
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wrow = (const uint8_t*)c->tensors[0] + n * (Kp / 2);
        const float* srow = scales + n * G;
        const float* zrow = zeros ? zeros + n * G : nullptr;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            const uint16_t* xt = xp + m0 * Kp;
            const float* st = xsum + m0 * G;
            float out[4];
            switch (mt) {
                case 4: wo_tile_bf16<4>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
                case 3: wo_tile_bf16<3>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
                case 2: wo_tile_bf16<2>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
                default: wo_tile_bf16<1>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
            }
            const float b = c->bias ? c->bias[n] : 0.0f;
            for (int64_t i = 0; i < mt; i++) store_output(c->y, c->y_bf16, (m0 + i) * N + n, out[i] + b);
        }
    }
    free(xp);
    free(xsum);
    return 0;
}
#endif

#if !defined(__AVX512BW__)
static int linear_wo_bf16(const qc_call* c) { return linear_wo_call(c); }
#endif
// tensors, ints, floats as linear_wo; bits 4, x bfloat16, group_size % 64 == 0 (see above).
QC_KERNEL(linear_wo_bf16, linear_wo_bf16)
