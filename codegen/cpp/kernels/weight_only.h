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

// Entry point (qc_abi.h). tensors: qweight, scales, zeros (absent for symmetric schemes: n_tensors == 2);
// ints: bits, Kp, group_size; floats: zero_const. linear_wo_bf16 (weight_only_bf16.h) and dequant_wo
// (weight_only_dequant.h) take the same tensors.
static const float* wo_zeros(const qc_call* c) { return c->n_tensors > 2 ? (const float*)c->tensors[2] : nullptr; }

static int linear_wo_call(const qc_call* c) {
    return linear_wo(c->x, c->x_bf16, c->M, c->K, c->tensors[0], (int)c->ints[0], c->N, c->ints[1],
                     (const float*)c->tensors[1], wo_zeros(c), (float)c->floats[0], c->ints[2], c->bias, c->y,
                     c->y_bf16, c->threads);
}
QC_KERNEL(linear_wo, linear_wo_call)
