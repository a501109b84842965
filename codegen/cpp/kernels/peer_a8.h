// Int8-activation kernels of the peer families (qcompile.schemes.quanto ``-a8``, qcompile.schemes.torchao
// ``int8-a8``): int8 activations x int8 weights per output channel, exact int32 sums, and every float rounding
// the peer library makes done in the activation's dtype, in the reference's order, so results equal the
// reference bit for bit.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; tensors[0] qweight int8 [N, K]; tensors[1] scales float32 [N]
// (values of the peer's dtype); mode 0 also tensors[2] input_scale float32 [1]; bias float32 [N] or NULL;
// y [M, N] in x's dtype (y_bf16 == x_bf16). Any M, N, K. ints[0] = mode. R() rounds to bfloat16 (half to even,
// as torch) when x is bfloat16 and is the identity for float32; rint rounds half to even.
//   mode 0, optimum-quanto static per tensor:   s = R(input_scale)
//       x_q = clamp(rint(R(x / s)), -128, 127)          y = R(float(acc) * R(s * R(scales[n])))
//       with a bias: y = R(y + R(bias[n]))
//   mode 1, torchao dynamic per token:          s_m = max(R(absmax(x[m]) / 127.5), 2**-23)
//       x_q = clamp(rint(x * (1 / s_m)), -128, 127)     y = R(R(float(acc) * s_m) * scales[n] + R(bias[n]))
// Tokens are taken 4 at a time against one weight row (which stays in cache); threads take output rows (each output
// is computed by one thread, so results do not depend on the thread count).

static inline float pa8_round(float v, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

static inline float pa8_clamp_rint(float v) {
    float q = nearbyintf(v);
    return q < -128.0f ? -128.0f : (q > 127.0f ? 127.0f : q);
}

// out[m] = sum_k xq[m, k] * w[k] for MT tokens (exact: |sum| <= K * 2**14 fits int32 for K < 2**17).
template <int MT>
static inline void pa8_tile(const int8_t* xq, int64_t K, const int8_t* w, int32_t* out) {
    for (int m = 0; m < MT; m++) {
        const int8_t* xr = xq + m * K;
        int32_t s = 0;
        for (int64_t k = 0; k < K; k++) s += (int32_t)xr[k] * (int32_t)w[k];
        out[m] = s;
    }
}

static int linear_peer_a8(const qc_call* c) {
    const int64_t M = c->M, K = c->K, N = c->N;
    const int bf16 = c->x_bf16, mode = (int)c->ints[0];
    const int8_t* qweight = (const int8_t*)c->tensors[0];
    const float* scales = (const float*)c->tensors[1];
    int8_t* xq = (int8_t*)scratch_alloc((size_t)(M * K));
    float* xs = (float*)scratch_alloc((size_t)M * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return 1;
    }
    const float s_in = mode == 0 ? pa8_round(((const float*)c->tensors[2])[0], bf16) : 0.0f;
    for (int64_t m = 0; m < M; m++) {
        int8_t* row = xq + m * K;
        if (mode == 0) {
            for (int64_t k = 0; k < K; k++)
                row[k] = (int8_t)pa8_clamp_rint(pa8_round(load_activation(c->x, bf16, m * K + k) / s_in, bf16));
            xs[m] = s_in;
            continue;
        }
        float absmax = 0.0f;
        for (int64_t k = 0; k < K; k++) absmax = fmaxf(absmax, fabsf(load_activation(c->x, bf16, m * K + k)));
        float scale = pa8_round(absmax / 127.5f, bf16);
        if (!(scale >= 1.1920928955078125e-07f)) scale = 1.1920928955078125e-07f;  // float32 eps = 2**-23
        const float inverse = 1.0f / scale;
        for (int64_t k = 0; k < K; k++)
            row[k] = (int8_t)pa8_clamp_rint(load_activation(c->x, bf16, m * K + k) * inverse);
        xs[m] = scale;
    }
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = 0; n < N; n++) {
        const int8_t* w = qweight + n * K;
        const float b = c->bias ? pa8_round(c->bias[n], bf16) : 0.0f;
        const float out_scale = mode == 0 ? pa8_round(s_in * pa8_round(scales[n], bf16), bf16) : 0.0f;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int64_t mt = min_i64(4, M - m0);
            int32_t d[4];
            switch (mt) {
                case 4: pa8_tile<4>(xq + m0 * K, K, w, d); break;
                case 3: pa8_tile<3>(xq + m0 * K, K, w, d); break;
                case 2: pa8_tile<2>(xq + m0 * K, K, w, d); break;
                default: pa8_tile<1>(xq + m0 * K, K, w, d); break;
            }
            for (int64_t i = 0; i < mt; i++) {
                float v;
                if (mode == 0) {
                    v = pa8_round((float)d[i] * out_scale, bf16);
                    if (c->bias) v = pa8_round(v + b, bf16);
                } else {
                    v = pa8_round((float)d[i] * xs[m0 + i], bf16) * scales[n];
                    if (c->bias) v = v + b;
                    v = pa8_round(v, bf16);
                }
                store_output(c->y, c->y_bf16, (m0 + i) * N + n, v);
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}
QC_KERNEL(linear_peer_a8, linear_peer_a8)
