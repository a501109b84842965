// W8A8 kernel: dynamic per-token int8 activations x int8 weights, exact int32 accumulation.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; qweight int8 [N, K]; scales float32 [N] (one per
// output channel); bias float32 [N] or NULL; y [M, N] float32 or bfloat16. Any M, N, K.
// Per token m: x_scale = absmax(x[m]) / 127 (1 when the row is all zero), x_q = clamp(rint(x / x_scale),
// -127, 127) (round half to even), then y = float(sum_k x_q * q) * x_scale * scales[n] + bias[n], the same
// operations in the same order as the reference, so float32 results match it exactly.
// The int8 dot product comes from the ISA's vi_dot over blocks of I8_BLOCK bytes (see vec_*.h); the K
// remainder runs scalar. Tokens are processed 4 at a time so each prepared weight block serves 4 tokens.

template <int MT>
static inline void w8a8_tile(const int8_t* xq, int64_t Kq, const int32_t* xsum, const int8_t* wrow, int64_t K,
                             int32_t* out) {
    const int64_t kvec = K - K % I8_BLOCK;
    vi acc[MT];
    for (int m = 0; m < MT; m++) acc[m] = vi_zero();
    for (int64_t k = 0; k < kvec; k += I8_BLOCK) {
        const vw w = w8_prepare(wrow + k);
        for (int m = 0; m < MT; m++) acc[m] = vi_dot(acc[m], w, xq + m * Kq + k);
    }
    for (int m = 0; m < MT; m++) {
        int32_t d = vi_hsum(acc[m]) - I8_OFFSET * xsum[m];
        for (int64_t k = kvec; k < K; k++) d += (int32_t)wrow[k] * (int32_t)xq[m * Kq + k];
        out[m] = d;
    }
}

static int linear_w8a8(const void* x, int x_bf16, int64_t M, int64_t K, const int8_t* qweight, int64_t N,
                       const float* scales, const float* bias, void* y, int y_bf16, int threads) {
    const int64_t Kq = (K + I8_BLOCK - 1) / I8_BLOCK * I8_BLOCK;
    const int64_t kvec = K - K % I8_BLOCK;
    int8_t* xq = (int8_t*)scratch_alloc((size_t)(M * Kq));
    float* xs = (float*)scratch_alloc((size_t)M * sizeof(float));
    int32_t* xsum = (int32_t*)scratch_alloc((size_t)M * sizeof(int32_t));
    if (!xq || !xs || !xsum) {
        free(xq);
        free(xs);
        free(xsum);
        return 1;
    }
    for (int64_t m = 0; m < M; m++) {
        float absmax = 0.0f;
        for (int64_t k = 0; k < K; k++) absmax = fmaxf(absmax, fabsf(load_activation(x, x_bf16, m * K + k)));
        float scale = absmax / 127.0f;
        if (!(scale > 0.0f)) scale = 1.0f;
        int32_t sum = 0;
        int8_t* row = xq + m * Kq;
        for (int64_t k = 0; k < K; k++) {
            float q = nearbyintf(load_activation(x, x_bf16, m * K + k) / scale);
            q = q < -127.0f ? -127.0f : (q > 127.0f ? 127.0f : q);
            row[k] = (int8_t)q;
            if (k < kvec) sum += row[k];
        }
        for (int64_t k = K; k < Kq; k++) row[k] = 0;
        xs[m] = scale;
        xsum[m] = sum;
    }
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* wrow = qweight + n * K;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            int32_t d[4];
            switch (mt) {
                case 4: w8a8_tile<4>(xq + m0 * Kq, Kq, xsum + m0, wrow, K, d); break;
                case 3: w8a8_tile<3>(xq + m0 * Kq, Kq, xsum + m0, wrow, K, d); break;
                case 2: w8a8_tile<2>(xq + m0 * Kq, Kq, xsum + m0, wrow, K, d); break;
                default: w8a8_tile<1>(xq + m0 * Kq, Kq, xsum + m0, wrow, K, d); break;
            }
            for (int64_t i = 0; i < mt; i++) {
                float v = (float)d[i] * xs[m0 + i] * scales[n];
                if (bias) v += bias[n];
                store_output(y, y_bf16, (m0 + i) * N + n, v);
            }
        }
    }
    free(xq);
    free(xs);
    free(xsum);
    return 0;
}

// Entry point (qc_abi.h). tensors: qweight int8 [N, K], scales float32 [N, 1]; no parameters.
static int linear_w8a8_call(const qc_call* c) {
    return linear_w8a8(c->x, c->x_bf16, c->M, c->K, (const int8_t*)c->tensors[0], c->N, (const float*)c->tensors[1],
                       c->bias, c->y, c->y_bf16, c->threads);
}
QC_KERNEL(linear_w8a8, linear_w8a8_call)

// The GEMM path's epilogue (codegen/cpp/integer.py: torch._int_mm gives the int32 sums): x is acc int32 [M, N]
// (x_bf16 unused), tensors: x_scale float32 [M], scales float32 [N, 1]; bias float32 [N] or NULL; y [M, N] float32
// or bfloat16. The direct kernel's epilogue in its order: y = (float)acc * x_scale[m] * scales[n] (+ bias[n]).
static int w8a8_epilogue(const qc_call* c) {
    const int64_t M = c->M, N = c->N;
    const int32_t* acc = (const int32_t*)c->x;
    const float* xs = (const float*)c->tensors[0];
    const float* ws = (const float*)c->tensors[1];
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t n = 0; n < N; n++) {
            float v = (float)acc[m * N + n] * xs[m] * ws[n];
            if (c->bias) v += c->bias[n];
            store_output(c->y, c->y_bf16, m * N + n, v);
        }
    }
    return 0;
}
QC_KERNEL(w8a8_epilogue, w8a8_epilogue)
