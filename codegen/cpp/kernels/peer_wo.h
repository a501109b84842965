// Kernels of the peer formats that no other family's kernel reads: linear_peer_wo (weight-only quanto ``int2``
// grids, quanto / torchao ``fp8``) and linear_peer_fp8a8 (torchao ``fp8-a8``, at the end of this file).
//
// linear_peer_wo: y[m, n] = sum_k x[m, k] * w[n, k] + bias[n], every weight w[n, k]
// decoded exactly as the reference (PeerScheme.dequantize_as) decodes it for the activation's dtype; only the
// order of the float32 sums differs from the reference's GEMM.
//
// Shapes and dtypes: x float32 or bfloat16 [M, K]; bias float32 [N] or NULL; y [M, N] in x's dtype. Any M, N, K.
// ints[0] = format, ints[1] = Kp (padded K), ints[2] = group size, ints[3] = the peer's dtype (0 float32,
// 1 bfloat16, 2 float16). P() rounds to the peer's dtype and A() to the activation's (identity for float32),
// half to even.
//   format 0, quanto 2-bit (MaxOptimizer, asymmetric): tensors[0] qweight uint8 [N, Kp / 4] (element 4j + i in
//       bits 2i .. 2i+1 of byte j), tensors[1] scales float32 [N, Kp / gs], tensors[2] zeros float32 [N, Kp / gs]
//       (code units). Per group g: shift = P(zeros * scale); float32 activations: w = scale * u - shift in
//       float32; bfloat16 ones: w = A(P(P(scale * u) - shift)). Padding columns (k >= K) meet zero activations.
//   format 1, fp8 per row: tensors[0] qweight float8 e4m3 (fn) [N, K], tensors[1] scales float32 [N];
//       w = A(e4m3(q) * scale[n]) (Kp = K).
// Each thread decodes one weight row at a time into a float32 buffer (a 4-entry table per 2-bit group; e4m3 16 codes
// at a time from their bits on AVX-512, a 256-entry table elsewhere) and takes its dot product with every token (activations converted to float32 once per call);
// threads take output rows, each output is computed by one thread, so results do not depend on the thread count.

// v rounded to float16 precision (half to even), kept in float32; |v| must stay within float16's range.
static inline float pwo_round_fp16(float v) {
    if (fabsf(v) < 6.103515625e-05f) return nearbyintf(v * 16777216.0f) * 5.9604644775390625e-08f;  // 2**-14, 2**24
    uint32_t u;
    memcpy(&u, &v, 4);
    u = (u + 0xfffu + ((u >> 13) & 1u)) & ~0x1fffu;
    memcpy(&v, &u, 4);
    return v;
}

// v rounded to dtype (0 float32, 1 bfloat16, 2 float16), kept in float32.
static inline float pwo_round(float v, int dtype) {
    if (dtype == 1) return bf16_to_float(float_to_bf16(v));
    if (dtype == 2) return pwo_round_fp16(v);
    return v;
}

// float8 e4m3fn byte -> float: sign, 4 exponent bits (bias 7), 3 mantissa bits; 0x7f / 0xff are NaN.
static inline float pwo_e4m3(uint8_t b) {
    const int e = (b >> 3) & 15, m = b & 7;
    float v;
    if ((b & 0x7f) == 0x7f)
        v = NAN;
    else if (e == 0)
        v = ldexpf((float)m, -9);
    else
        v = ldexpf((float)(8 + m), e - 10);
    return (b & 0x80) ? -v : v;
}

// sum_k a[k] * b[k] in float32, W lanes at a time with four accumulators, the tail scalar.
static inline float pwo_dot(const float* a, const float* b, int64_t n) {
    vf acc0 = vf_zero(), acc1 = vf_zero(), acc2 = vf_zero(), acc3 = vf_zero();
    int64_t k = 0;
    for (; k + 4 * W <= n; k += 4 * W) {
        acc0 = vf_fma(vf_load(a + k), vf_load(b + k), acc0);
        acc1 = vf_fma(vf_load(a + k + W), vf_load(b + k + W), acc1);
        acc2 = vf_fma(vf_load(a + k + 2 * W), vf_load(b + k + 2 * W), acc2);
        acc3 = vf_fma(vf_load(a + k + 3 * W), vf_load(b + k + 3 * W), acc3);
    }
    for (; k + W <= n; k += W) acc0 = vf_fma(vf_load(a + k), vf_load(b + k), acc0);
    float s = vf_hsum(vf_add(vf_add(acc0, acc1), vf_add(acc2, acc3)));
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

// Row n of the weight, decoded into w [Kp] (see the header comment).
static inline void pwo_decode_row(const qc_call* c, int64_t n, int64_t Kp, int64_t gs, const float* e4m3,
                                  float* w) {
    const int act = c->x_bf16 ? 1 : 0, peer = (int)c->ints[3];
    if (c->ints[0] == 1) {
        const uint8_t* q = (const uint8_t*)c->tensors[0] + n * Kp;
        const float s = ((const float*)c->tensors[1])[n];
        int64_t k = 0;
#if defined(__AVX512F__)
        // 16 codes at a time: the e4m3 bits placed into a float32's (normal codes), m * 2^-9 (exponent 0), NaN
        // (0x7f, 0xff), then times the scale and, for bfloat16 activations, rounded to nearest even as
        // float_to_bf16 does: the values pwo_e4m3 and pwo_round give, bit for bit
        const __m512 vs = _mm512_set1_ps(s);
        for (; k + 16 <= Kp; k += 16) {
            const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + k)));
            const __m512i e = _mm512_and_si512(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(15));
            const __m512i m = _mm512_and_si512(b, _mm512_set1_epi32(7));
            const __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
            const __m512i normal = _mm512_or_si512(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(120)), 23),
                                                   _mm512_slli_epi32(m, 20));
            __m512 v = _mm512_castsi512_ps(normal);
            const __mmask16 zero_exp = _mm512_cmpeq_epi32_mask(e, _mm512_setzero_si512());
            v = _mm512_mask_mov_ps(v, zero_exp, _mm512_mul_ps(_mm512_cvtepi32_ps(m), _mm512_set1_ps(0.001953125f)));
            const __mmask16 nan = _mm512_cmpeq_epi32_mask(_mm512_and_si512(b, _mm512_set1_epi32(0x7f)),
                                                          _mm512_set1_epi32(0x7f));
            v = _mm512_mask_mov_ps(v, nan, _mm512_set1_ps(NAN));
            v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
            v = _mm512_mul_ps(v, vs);
            if (act) {  // float_to_bf16: NaN kept quiet (| 0x40 in the high half), else + 0x7fff + odd bit, truncated
                const __m512i u = _mm512_castps_si512(v);
                const __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                    _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
                const __mmask16 is_nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                                 _mm512_set1_epi32(0x7f800000));
                const __m512i quiet = _mm512_or_si512(u, _mm512_set1_epi32(0x400000));
                const __m512i out = _mm512_mask_mov_epi32(rounded, is_nan, quiet);
                v = _mm512_castsi512_ps(_mm512_and_si512(out, _mm512_set1_epi32((int)0xffff0000u)));
            }
            _mm512_storeu_ps(w + k, v);
        }
#endif
        for (; k < Kp; k++) w[k] = pwo_round(e4m3[q[k]] * s, act);
        return;
    }
    const int64_t G = Kp / gs;
    const uint8_t* q = (const uint8_t*)c->tensors[0] + n * (Kp / 4);
    const float* scales = (const float*)c->tensors[1] + n * G;
    const float* zeros = (const float*)c->tensors[2] + n * G;
    for (int64_t g = 0; g < G; g++) {
        const float s = scales[g], shift = pwo_round(zeros[g] * s, peer);
        float lut[4];
        for (int u = 0; u < 4; u++)
            lut[u] = act ? pwo_round(pwo_round(pwo_round(s * (float)u, peer) - shift, peer), act)
                         : s * (float)u - shift;
        float* wg = w + g * gs;
        const uint8_t* qg = q + g * (gs / 4);
        for (int64_t j = 0; j < gs / 4; j++) {
            const uint8_t b = qg[j];
            wg[4 * j] = lut[b & 3];
            wg[4 * j + 1] = lut[(b >> 2) & 3];
            wg[4 * j + 2] = lut[(b >> 4) & 3];
            wg[4 * j + 3] = lut[b >> 6];
        }
    }
}

static int linear_peer_wo(const qc_call* c) {
    const int64_t M = c->M, K = c->K, N = c->N, Kp = c->ints[1], gs = c->ints[2];
    float* xp = (float*)scratch_alloc((size_t)(M * Kp) * sizeof(float));
    if (!xp) return 1;
    float e4m3[256];
    for (int b = 0; b < 256; b++) e4m3[b] = pwo_e4m3((uint8_t)b);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k = 0; k < K; k++) xp[m * Kp + k] = load_activation(c->x, c->x_bf16, m * K + k);
        for (int64_t k = K; k < Kp; k++) xp[m * Kp + k] = 0.0f;
    }
    int failed = 0;
#pragma omp parallel num_threads(c->threads) reduction(| : failed)
    {
        float* w = (float*)scratch_alloc((size_t)Kp * sizeof(float));
        if (!w) failed = 1;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!w) continue;  // every thread takes part in the loop; the call then returns 1
            pwo_decode_row(c, n, Kp, gs, e4m3, w);
            const float b = c->bias ? pwo_round(c->bias[n], c->x_bf16) : 0.0f;
            for (int64_t m = 0; m < M; m++) {
                float v = pwo_dot(xp + m * Kp, w, Kp);
                if (c->bias) v += b;
                store_output(c->y, c->y_bf16, m * N + n, v);
            }
        }
        free(w);
    }
    free(xp);
    return failed;
}
QC_KERNEL(linear_peer_wo, linear_peer_wo)

// linear_peer_fp8a8, torchao Float8DynamicActivationFloat8WeightConfig (PerRow), as qcompile.schemes.torchao's
// reference computes it. x float32 or bfloat16 [M, K]; tensors[0] qweight float8 e4m3 (fn) [N, K]; tensors[1]
// scales float32 [N]; bias float32 [N] or NULL; y [M, N] in x's dtype. Any M, N, K. A() rounds to the activation's
// dtype (identity for float32), half to even:
//     s_m = A(absmax(x[m]) / 448), 1 when 0        x_q = e4m3(clamp(x / s_m, -448, 448))   (half to even)
//     y   = A((float32(sum_k x_q * q) * s_m) * scales[n] + A(bias[n]))
// The products of e4m3 values are exact; only the order of the float32 sums differs from the reference's GEMM.
// Activations are quantized once per call; threads take output rows (results do not depend on the thread count).

// The e4m3 value nearest to v (half to even) for |v| <= 448, in float32.
static inline float pwo_to_e4m3(float v) {
    const float a = fabsf(v);
    float q;
    if (a < 0.015625f) {  // below 2**-6: subnormal steps of 2**-9
        q = nearbyintf(a * 512.0f) * 0.001953125f;
    } else {
        int e;
        frexpf(a, &e);  // a = f * 2**e, f in [0.5, 1): 3 mantissa bits leave steps of 2**(e - 4)
        q = ldexpf(nearbyintf(ldexpf(a, 4 - e)), e - 4);
    }
    return v < 0.0f ? -q : q;
}

static int linear_peer_fp8a8(const qc_call* c) {
    const int64_t M = c->M, K = c->K, N = c->N;
    const int act = c->x_bf16 ? 1 : 0;
    const uint8_t* qweight = (const uint8_t*)c->tensors[0];
    const float* scales = (const float*)c->tensors[1];
    float* xq = (float*)scratch_alloc((size_t)(M * K) * sizeof(float));
    float* xs = (float*)scratch_alloc((size_t)M * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return 1;
    }
    float e4m3[256];
    for (int b = 0; b < 256; b++) e4m3[b] = pwo_e4m3((uint8_t)b);
    for (int64_t m = 0; m < M; m++) {
        float absmax = 0.0f;
        for (int64_t k = 0; k < K; k++) absmax = fmaxf(absmax, fabsf(load_activation(c->x, c->x_bf16, m * K + k)));
        float s = pwo_round(absmax / 448.0f, act);
        if (!(s > 0.0f)) s = 1.0f;
        xs[m] = s;
        for (int64_t k = 0; k < K; k++) {
            float v = load_activation(c->x, c->x_bf16, m * K + k) / s;
            v = v < -448.0f ? -448.0f : (v > 448.0f ? 448.0f : v);
            xq[m * K + k] = pwo_to_e4m3(v);
        }
    }
    int failed = 0;
#pragma omp parallel num_threads(c->threads) reduction(| : failed)
    {
        float* w = (float*)scratch_alloc((size_t)K * sizeof(float));
        if (!w) failed = 1;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (!w) continue;  // every thread takes part in the loop; the call then returns 1
            const uint8_t* q = qweight + n * K;
            for (int64_t k = 0; k < K; k++) w[k] = e4m3[q[k]];
            const float b = c->bias ? pwo_round(c->bias[n], act) : 0.0f;
            for (int64_t m = 0; m < M; m++) {
                float v = pwo_dot(xq + m * K, w, K) * xs[m] * scales[n];
                if (c->bias) v += b;
                store_output(c->y, c->y_bf16, m * N + n, v);
            }
        }
        free(w);
    }
    free(xq);
    free(xs);
    return failed;
}
QC_KERNEL(linear_peer_fp8a8, linear_peer_fp8a8)
