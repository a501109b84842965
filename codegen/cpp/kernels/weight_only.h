// Weight-only kernels (W8A16, W4A16): y[m, n] = sum_k x[m, k] * w[n, k] + bias[n],
// w[n, k] = (u[n, k] - zero[n, g]) * scale[n, g] with g = k / group_size.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight int8 [N, Kp] (bits 8) or uint8 [N, Kp/2] (bits 4,
// element 2j in the low nibble, 2j+1 in the high one); scales / zeros float32 [N, Kp/group_size] (zeros NULL:
// zero_const for every group, 8 for symmetric int4, 0 for symmetric int8); bias float32 [N] or NULL.
// Constraints: Kp % group_size == 0, K <= Kp (padding columns meet zero activations), any M, N.
//
// Per group the kernel accumulates sum_k u * x in float32 and applies the group once:
//     y = sum_g scale_g * (sum_{k in g} u_k x_k  -  zero_g * sum_{k in g} x_k)
// The per-group activation sums are computed once per call, so the inner loop is unpack + convert + FMA, and
// the zero points' share (sum_g scale_g zero_g sum_{k in g} x_k) is one W-wide dot product per output (zero_term).
// 4-bit blocks of 2W codes unpack into W low nibbles (even elements) and W high nibbles (odd elements):
// the activation copy is permuted once per call to match (within each group, per block of 2W: the
// even-indexed values, then the odd-indexed ones). Whatever is left of a group after its whole blocks runs
// scalar in natural order. Rows of x are processed in tiles of up to 4 so each unpacked weight block
// serves 4 tokens. Each thread takes one contiguous range of output rows (schedule(static)), so it reads one
// sequential stream of the weight that the hardware prefetchers follow (interleaved chunks of 32 rows read
// 20-40 % slower at one token); each output is computed by one thread, so results do not depend on the thread
// count.

// x -> float32 [M, Kp] (zero padded, 4-bit blocks permuted), xsum [M, G] per-group sums.
static void wo_prepare(const void* x, int x_bf16, int64_t M, int64_t K, int64_t Kp, int64_t gs, int bits,
                       float* xp, float* xsum) {
    const int64_t G = Kp / gs;
    for (int64_t m = 0; m < M; m++) {
        float* row = xp + m * Kp;
        for (int64_t k = 0; k < K; k++) row[k] = load_activation(x, x_bf16, m * K + k);
        for (int64_t k = K; k < Kp; k++) row[k] = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float s = 0.0f;
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) s += row[k];
            xsum[m * G + g] = s;
        }
        if (bits != 4 || W == 1) continue;
        float tmp[2 * W];
        for (int64_t g = 0; g < G; g++) {
            for (int64_t b = 0; b < gs / (2 * W); b++) {
                float* block = row + g * gs + b * 2 * W;
                for (int i = 0; i < W; i++) {
                    tmp[i] = block[2 * i];
                    tmp[W + i] = block[2 * i + 1];
                }
                memcpy(block, tmp, sizeof(tmp));
            }
        }
    }
}

// One weight row against MT activation rows; out[m] = sum_k x[m, k] * w[k] (no bias).
// FMA latency exceeds its throughput, so each token keeps ACC independent accumulators (more when MT is small).
template <int MT, int BITS>
static inline void wo_tile(const float* xp, int64_t Kp, const uint8_t* wrow, const float* srow,
                           const float* zrow, float zero_const, int64_t gs, int64_t G, const float* xsum,
                           float* out) {
    constexpr int64_t BLOCK = BITS == 4 ? 2 * W : W;
    constexpr int ACC = MT == 1 ? 4 : (MT == 2 ? 2 : 1);  // independent accumulator pairs per token
    const int64_t blocks = gs / BLOCK;
    const bool ragged = blocks * BLOCK < gs;  // codes left to the scalar loop in every group
    vf total[MT];
    float correction[MT];
    for (int m = 0; m < MT; m++) {
        total[m] = vf_zero();
        correction[m] = 0.0f;
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * gs;
        vf acc[ACC][MT][2];
        float tail[MT];
        for (int a = 0; a < ACC; a++)
            for (int m = 0; m < MT; m++) acc[a][m][0] = acc[a][m][1] = vf_zero();
        for (int m = 0; m < MT; m++) tail[m] = 0.0f;
        int64_t b = 0;
        if (BITS == 4) {
            const uint8_t* p = wrow + k0 / 2;
            for (; b + ACC <= blocks; b += ACC) {
                for (int a = 0; a < ACC; a++) {
                    vf lo, hi;
                    u4_block(p + (b + a) * W, lo, hi);
                    const float* xb = xp + k0 + (b + a) * 2 * W;
                    for (int m = 0; m < MT; m++) {
                        acc[a][m][0] = vf_fma(lo, vf_load(xb + m * Kp), acc[a][m][0]);
                        acc[a][m][1] = vf_fma(hi, vf_load(xb + m * Kp + W), acc[a][m][1]);
                    }
                }
            }
            for (; b < blocks; b++) {
                vf lo, hi;
                u4_block(p + b * W, lo, hi);
                const float* xb = xp + k0 + b * 2 * W;
                for (int m = 0; m < MT; m++) {
                    acc[0][m][0] = vf_fma(lo, vf_load(xb + m * Kp), acc[0][m][0]);
                    acc[0][m][1] = vf_fma(hi, vf_load(xb + m * Kp + W), acc[0][m][1]);
                }
            }
            for (int64_t k = k0 + blocks * BLOCK; k < k0 + gs; k++) {
                const float u = (float)((wrow[k >> 1] >> ((k & 1) * 4)) & 15);
                for (int m = 0; m < MT; m++) tail[m] += u * xp[m * Kp + k];
            }
        } else {
            const int8_t* p = (const int8_t*)wrow + k0;
            for (; b + 2 * ACC <= blocks; b += 2 * ACC) {
                for (int a = 0; a < 2 * ACC; a++) {
                    const vf w = s8_block(p + (b + a) * W);
                    const float* xb = xp + k0 + (b + a) * W;
                    for (int m = 0; m < MT; m++)
                        acc[a / 2][m][a % 2] = vf_fma(w, vf_load(xb + m * Kp), acc[a / 2][m][a % 2]);
                }
            }
            for (; b < blocks; b++) {
                const vf w = s8_block(p + b * W);
                const float* xb = xp + k0 + b * W;
                for (int m = 0; m < MT; m++) acc[0][m][0] = vf_fma(w, vf_load(xb + m * Kp), acc[0][m][0]);
            }
            for (int64_t k = blocks * BLOCK; k < gs; k++) {
                const float u = (float)p[k];
                for (int m = 0; m < MT; m++) tail[m] += u * xp[m * Kp + k0 + k];
            }
        }
        const float s = srow[g];
        const vf vs = vf_bcast(s);
        for (int m = 0; m < MT; m++) {
            vf lo = acc[0][m][0], hi = acc[0][m][1];
            for (int a = 1; a < ACC; a++) {
                lo = vf_add(lo, acc[a][m][0]);
                hi = vf_add(hi, acc[a][m][1]);
            }
            const vf sum = vf_add(lo, hi);
            total[m] = vf_fma(sum, vs, total[m]);
            if (ragged) correction[m] += s * tail[m];
        }
    }
    const bool zeroed = zrow || zero_const != 0.0f;  // symmetric int8 has no zero points
    for (int m = 0; m < MT; m++)
        out[m] = vf_hsum(total[m]) + correction[m] -
                 (zeroed ? zero_term(srow, zrow, zero_const, 0.0f, xsum + m * G, G) : 0.0f);
}

// One token against WO_ROWS weight rows at once (rows n .. n + WO_ROWS - 1, `row_bytes` apart): each activation
// vector loaded serves every row. Long rows' float32 activations no longer stay in L1 while the weights stream
// past, and wo_tile<1> re-reads them from L2 for every row: one thread read int8 weights at 35 GB/s with K = 4096
// but 12 GB/s with K = 11008; this tile reads 38 GB/s there. One accumulator per row (the rows give the
// independent chains); the same sums as wo_tile up to the order of the float32 additions.
constexpr int WO_ROWS = 16;
// From this many bytes of float32 activations (a row of K) one-token calls take WO_ROWS rows a pass.
constexpr int64_t WO_LONG_ROW_BYTES = 24 << 10;

template <int BITS>
static inline void wo_rows_tile(const float* xp, const uint8_t* wrow, int64_t row_bytes, const float* srow,
                                const float* zrow, float zero_const, int64_t gs, int64_t G, const float* xsum,
                                float* out) {
    constexpr int64_t BLOCK = BITS == 4 ? 2 * W : W;
    const int64_t blocks = gs / BLOCK;
    const bool ragged = blocks * BLOCK < gs;
    vf total[WO_ROWS];
    float correction[WO_ROWS];
    for (int r = 0; r < WO_ROWS; r++) {
        total[r] = vf_zero();
        correction[r] = 0.0f;
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t k0 = g * gs;
        vf acc[WO_ROWS];
        for (int r = 0; r < WO_ROWS; r++) acc[r] = vf_zero();
        for (int64_t b = 0; b < blocks; b++) {
            if (BITS == 4) {
                const float* xb = xp + k0 + b * 2 * W;
                const vf xlo = vf_load(xb), xhi = vf_load(xb + W);
                for (int r = 0; r < WO_ROWS; r++) {
                    vf lo, hi;
                    u4_block(wrow + r * row_bytes + k0 / 2 + b * W, lo, hi);
                    acc[r] = vf_fma(hi, xhi, vf_fma(lo, xlo, acc[r]));
                }
            } else {
                const vf xv = vf_load(xp + k0 + b * W);
                for (int r = 0; r < WO_ROWS; r++)
                    acc[r] = vf_fma(s8_block((const int8_t*)wrow + r * row_bytes + k0 + b * W), xv, acc[r]);
            }
        }
        for (int r = 0; r < WO_ROWS; r++) {
            const float s = srow[r * G + g];
            total[r] = vf_fma(acc[r], vf_bcast(s), total[r]);
            if (ragged) {
                const uint8_t* w = wrow + r * row_bytes;
                float tail = 0.0f;
                for (int64_t k = k0 + blocks * BLOCK; k < k0 + gs; k++) {
                    const float u = BITS == 4 ? (float)((w[k >> 1] >> ((k & 1) * 4)) & 15) : (float)((const int8_t*)w)[k];
                    tail += u * xp[k];
                }
                correction[r] += s * tail;
            }
        }
    }
    const bool zeroed = zrow || zero_const != 0.0f;
    for (int r = 0; r < WO_ROWS; r++)
        out[r] = vf_hsum(total[r]) + correction[r] -
                 (zeroed ? zero_term(srow + r * G, zrow ? zrow + r * G : nullptr, zero_const, 0.0f, xsum, G) : 0.0f);
}

template <int BITS>
static void wo_rows(const float* xp, const float* xsum, int64_t M, int64_t Kp, const uint8_t* qweight,
                    int64_t N, const float* scales, const float* zeros, float zero_const, int64_t gs,
                    const float* bias, void* y, int y_bf16, int threads) {
    const int64_t G = Kp / gs;
    const int64_t row_bytes = BITS == 4 ? Kp / 2 : Kp;
    if (M == 1 && Kp * (int64_t)sizeof(float) > WO_LONG_ROW_BYTES) {  // one token, long rows: WO_ROWS rows a pass
        const int64_t tiles = N / WO_ROWS;
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t t = 0; t < tiles + N % WO_ROWS; t++) {
            const int64_t n = t < tiles ? t * WO_ROWS : tiles * WO_ROWS + (t - tiles);
            const int rows = t < tiles ? WO_ROWS : 1;
            float out[WO_ROWS];
            if (rows == WO_ROWS)
                wo_rows_tile<BITS>(xp, qweight + n * row_bytes, row_bytes, scales + n * G, zeros ? zeros + n * G : nullptr,
                                   zero_const, gs, G, xsum, out);
            else
                wo_tile<1, BITS>(xp, Kp, qweight + n * row_bytes, scales + n * G, zeros ? zeros + n * G : nullptr,
                                 zero_const, gs, G, xsum, out);
            for (int r = 0; r < rows; r++) store_output(y, y_bf16, n + r, out[r] + (bias ? bias[n + r] : 0.0f));
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t* wrow = qweight + n * row_bytes;
        const float* srow = scales + n * G;
        const float* zrow = zeros ? zeros + n * G : nullptr;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            const float* xt = xp + m0 * Kp;
            const float* st = xsum + m0 * G;
            float out[4];
            switch (mt) {
                case 4: wo_tile<4, BITS>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
                case 3: wo_tile<3, BITS>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
                case 2: wo_tile<2, BITS>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
                default: wo_tile<1, BITS>(xt, Kp, wrow, srow, zrow, zero_const, gs, G, st, out); break;
            }
            const float b = bias ? bias[n] : 0.0f;
            for (int64_t i = 0; i < mt; i++) store_output(y, y_bf16, (m0 + i) * N + n, out[i] + b);
        }
    }
}

static int linear_wo(const void* x, int x_bf16, int64_t M, int64_t K, const void* qweight, int bits, int64_t N,
                     int64_t Kp, const float* scales, const float* zeros, float zero_const, int64_t gs,
                     const float* bias, void* y, int y_bf16, int threads) {
    const int64_t G = Kp / gs;
    float* xp = (float*)scratch_alloc((size_t)(M * Kp) * sizeof(float));
    float* xsum = (float*)scratch_alloc((size_t)(M * G) * sizeof(float));
    if (!xp || !xsum) {
        free(xp);
        free(xsum);
        return 1;
    }
    wo_prepare(x, x_bf16, M, K, Kp, gs, bits, xp, xsum);
    const uint8_t* w = (const uint8_t*)qweight;
    if (bits == 4)
        wo_rows<4>(xp, xsum, M, Kp, w, N, scales, zeros, zero_const, gs, bias, y, y_bf16, threads);
    else
        wo_rows<8>(xp, xsum, M, Kp, w, N, scales, zeros, zero_const, gs, bias, y, y_bf16, threads);
    free(xp);
    free(xsum);
    return 0;
}

// W4A16 with bfloat16 activations on CPUs with AVX512-BF16 (linear_wo_bf16): the same sums with vdpbf16ps, which
// multiplies 32 bfloat16 pairs into 16 float32 lanes per instruction. Codes become bfloat16 (u - 8) through a
// 32-word table (vpermw; exact: small integers), products are exact in float32 and summed in float32, so
//     y = sum_g scale_g * (sum_{k in g} (u_k - 8) x_k  -  (zero_g - 8) * sum_{k in g} x_k)
// is the float arithmetic of linear_wo up to the order of the float32 additions (the zero share is zero_term). Each block of 64 activations is
// stored as its 32 even-indexed values, then its 32 odd ones, to meet the low / high nibbles of 32 packed bytes.
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

// Rows n0..n1 of the weight as float32, or bfloat16 when `out_bf16` [n1 - n0, K]: the reference's values
// ((u - zero) * scale in float32), rounded to nearest even for bfloat16 (the reference's `.to(x.dtype)`), so the
// GEMM that follows multiplies exactly what the reference multiplies. AVX-512: a 4-bit group first makes the 16
// values (u - zero) * scale in a register, so unpacking is one table lookup per 16 / 32 codes (vpermps / vpermw).
static inline void wo_store(float* o32, uint16_t* o16, int64_t k, float v) {
    if (o16)
        o16[k] = float_to_bf16(v);
    else
        o32[k] = v;
}

#if defined(__AVX512BW__)
// Round 16 finite floats to bfloat16 (nearest even), as 16 words.
static inline __m256i wo_bf16x16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16));
}
#endif

// `count` codes of one 4-bit group (count may be odd only at the row's end): ((float)u - z) * s through a table of
// the 16 values, built in registers.
static void dq4_group(const uint8_t* p, int64_t count, float z, float s, float* o32, uint16_t* o16) {
    int64_t k = 0;
#if defined(__AVX512BW__)
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 values = _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_set1_ps(z)), _mm512_set1_ps(s));
    if (o16) {
        const __m512i table = _mm512_castsi256_si512(wo_bf16x16(values));  // codes index words 0-15 only
        const __m512i shifts = _mm512_set1_epi32(4 << 16);                 // words 0, 4, 0, 4, ...: low nibble first
        const __m512i mask = _mm512_set1_epi16(15);
        for (; k + 32 <= count; k += 32) {
            const __m128i b = _mm_loadu_si128((const __m128i*)(p + k / 2));
            const __m256i pairs = _mm256_set_m128i(_mm_unpackhi_epi8(b, b), _mm_unpacklo_epi8(b, b));
            const __m512i codes = _mm512_and_si512(_mm512_srlv_epi16(_mm512_cvtepu8_epi16(pairs), shifts), mask);
            _mm512_storeu_si512((void*)(o16 + k), _mm512_permutexvar_epi16(codes, table));
        }
    } else {
        const __m512i shifts = _mm512_set1_epi64(4LL << 32);  // dwords 0, 4, 0, 4, ...
        const __m512i mask = _mm512_set1_epi32(15);
        for (; k + 16 <= count; k += 16) {
            const __m128i b = _mm_loadl_epi64((const __m128i*)(p + k / 2));
            const __m512i codes = _mm512_and_si512(
                _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts), mask);
            _mm512_storeu_ps(o32 + k, _mm512_permutexvar_ps(codes, values));
        }
    }
#endif
    for (; k < count; k++) wo_store(o32, o16, k, ((float)((p[k >> 1] >> ((k & 1) * 4)) & 15) - z) * s);
}

// `count` int8 codes of one group: ((float)q - z) * s.
static void dq8_group(const int8_t* q, int64_t count, float z, float s, float* o32, uint16_t* o16) {
    int64_t k = 0;
#if defined(__AVX512BW__)
    const __m512 vz = _mm512_set1_ps(z), vs = _mm512_set1_ps(s);
    for (; k + 16 <= count; k += 16) {
        const __m512 v = _mm512_mul_ps(
            _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(q + k)))), vz), vs);
        if (o16)
            _mm256_storeu_si256((__m256i*)(o16 + k), wo_bf16x16(v));
        else
            _mm512_storeu_ps(o32 + k, v);
    }
#endif
    for (; k < count; k++) wo_store(o32, o16, k, ((float)q[k] - z) * s);
}

static int dequant_wo(const void* qweight, int bits, int64_t N, int64_t Kp, int64_t K, const float* scales,
                      const float* zeros, float zero_const, int64_t gs, int64_t n0, int64_t n1, void* out,
                      int out_bf16, int threads) {
    (void)N;
    const int64_t G = Kp / gs;
    const int64_t row_bytes = bits == 4 ? Kp / 2 : Kp;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t* wrow = (const uint8_t*)qweight + n * row_bytes;
        float* o32 = out_bf16 ? nullptr : (float*)out + (n - n0) * K;
        uint16_t* o16 = out_bf16 ? (uint16_t*)out + (n - n0) * K : nullptr;
        for (int64_t g = 0; g < G; g++) {
            const float s = scales[n * G + g];
            const float z = zeros ? zeros[n * G + g] : zero_const;
            const int64_t k0 = g * gs, k1 = min_i64(k0 + gs, K);
            if (k1 <= k0) break;
            float* g32 = o32 ? o32 + k0 : nullptr;
            uint16_t* g16 = o16 ? o16 + k0 : nullptr;
            if (bits == 4) {  // k0 is even: the group starts on a byte
                dq4_group(wrow + k0 / 2, k1 - k0, z, s, g32, g16);
            } else {
                dq8_group((const int8_t*)wrow + k0, k1 - k0, z, s, g32, g16);
            }
        }
    }
    return 0;
}

// Entry points (qc_abi.h). tensors: qweight, scales, zeros (absent for symmetric schemes: n_tensors == 2);
// ints: bits, Kp, group_size (dequant_wo also n0, n1); floats: zero_const. dequant_wo writes `y` as float32
// [n1 - n0, K] (bfloat16 when y_bf16) and reads no activation.
static const float* wo_zeros(const qc_call* c) { return c->n_tensors > 2 ? (const float*)c->tensors[2] : nullptr; }

static int linear_wo_call(const qc_call* c) {
    return linear_wo(c->x, c->x_bf16, c->M, c->K, c->tensors[0], (int)c->ints[0], c->N, c->ints[1],
                     (const float*)c->tensors[1], wo_zeros(c), (float)c->floats[0], c->ints[2], c->bias, c->y,
                     c->y_bf16, c->threads);
}
QC_KERNEL(linear_wo, linear_wo_call)

#if !defined(__AVX512BW__)
static int linear_wo_bf16(const qc_call* c) { return linear_wo_call(c); }
#endif
// tensors, ints, floats as linear_wo; bits 4, x bfloat16, group_size % 64 == 0 (see above).
QC_KERNEL(linear_wo_bf16, linear_wo_bf16)

static int dequant_wo_call(const qc_call* c) {
    return dequant_wo(c->tensors[0], (int)c->ints[0], c->N, c->ints[1], c->K, (const float*)c->tensors[1],
                      wo_zeros(c), (float)c->floats[0], c->ints[2], c->ints[3], c->ints[4], c->y, c->y_bf16, c->threads);
}
QC_KERNEL(dequant_wo, dequant_wo_call)
