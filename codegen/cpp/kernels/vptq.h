// VPTQ kernels (qcompile/schemes/vptq.py): y = x @ W.T + bias with, for the R = ceil(N / v) vector rows,
//     Q[i*v + u, o + c] = C[idx(i, c), u] + Cr[ridx(i, c), u]        (c < gs = K - o main columns, u < v)
//     Q[i*v + u, j]     = Co[oidx[i, j], u]                           (j < o outlier columns)
//     W[n, perm[j]]     = Q[n, j] * scale[perm[j]] + wbias[perm[j]]
// so y[t, n] = sum_j xs[t, j] * Q[n, j] + beta[t] + bias[n] with xs[t, j] = x[t, perm[j]] * scale[perm[j]] and
// beta[t] = sum_k x[t, k] * wbias[k].
//
// Shapes and dtypes (tensors in the scheme's order; the optional ones only when present): indices int32 [R, Wd]
// (per vector row a little-endian bitstream of uint32 words: main column c's tb-bit entry starts at bit c*tb, main
// index in its low bk bits, residual index in the br bits above); centroids float16 bits [Kc, v]; res_centroids
// float16 bits [Kr, v] (br > 0); outlier_indices int16 [R, o] (uint16 bits; o > 0); outlier_centroids float16 bits
// [Kc, v] (o > 0); weight_scale, weight_bias float16 bits [K]; perm int16 [K] (uint16 bits). x float32 or bfloat16
// [Mt, K]; bias float32 [N] or NULL; y [Mt, N] float32 or bfloat16. Kc = 2**bk, Kr = 2**br, tb = bk + br <= 32.
// Out-of-range values cannot read outside the tensors: an outlier index is taken modulo Kc, a perm entry >= K reads
// a zero activation (dequant_vptq: writes nothing).
//
// Parameters (qc_call.ints): [0] v, [1] bk, [2] br (0: no residual), [3] o, [4] R, [5] Wd; dequant_vptq also [6] n0,
// [7] n1. Kernels:
//   linear_vptq:  y as above (decode sizes). The codebooks are converted to float32 once per call, xs and beta once
//                 per call. A thread takes whole vector rows (v outputs) and, column by column, adds xs[t, j] times
//                 the column's centroid (v floats; AVX-512 / AVX2 lanes when v is a multiple of 16 / 8) into the v
//                 outputs of up to 16 tokens; sums run in a fixed order: results do not depend on the threads.
//   dequant_vptq: writes rows n0..n1 of W to `y` as float32 [n1 - n0, K] (reads no x).

// float16 bits -> float, exact (subnormals, infinities and NaN included).
static inline float vptq_half(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-08f;  // m * 2**-24
        return (h & 0x8000) ? -v : v;
    }
    const uint32_t bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void vptq_halves(const uint16_t* in, int64_t n, float* out) {
    for (int64_t i = 0; i < n; i++) out[i] = vptq_half(in[i]);
}

// The tb-bit entry starting at bit `pos` of a row's bitstream.
static inline uint32_t vptq_entry(const uint32_t* row, int64_t pos, int tb) {
    const int64_t w = pos >> 5;
    const int sh = (int)(pos & 31);
    uint64_t bits = row[w];
    if (sh + tb > 32) bits |= (uint64_t)row[w + 1] << 32;
    return (uint32_t)((bits >> sh) & ((((uint64_t)1) << tb) - 1));
}

// acc[u] += a * e[u] for u < v.
static inline void vptq_axpy(float* acc, float a, const float* e, int64_t v) {
    int64_t u = 0;
#if defined(__AVX512F__)
    const __m512 a16 = _mm512_set1_ps(a);
    for (; u + 16 <= v; u += 16)
        _mm512_storeu_ps(acc + u, _mm512_fmadd_ps(a16, _mm512_loadu_ps(e + u), _mm512_loadu_ps(acc + u)));
#endif
#if defined(__AVX2__)
    const __m256 a8 = _mm256_set1_ps(a);
    for (; u + 8 <= v; u += 8)
        _mm256_storeu_ps(acc + u, _mm256_fmadd_ps(a8, _mm256_loadu_ps(e + u), _mm256_loadu_ps(acc + u)));
#endif
    for (; u < v; u++) acc[u] += a * e[u];
}

// The packed tensors of one call, with the codebooks as float32.
struct vptq_parts {
    const uint32_t* words;
    const uint16_t *oidx, *scale, *wbias, *perm;
    float *books, *res, *obooks;
};

static int vptq_parts_of(const qc_call* c, vptq_parts* p) {
    const int64_t v = c->ints[0], Kc = (int64_t)1 << c->ints[1], br = c->ints[2], o = c->ints[3];
    const int64_t Kr = br ? ((int64_t)1 << br) : 0;
    int at = 2;
    p->words = (const uint32_t*)c->tensors[0];
    const uint16_t* res16 = br ? (const uint16_t*)c->tensors[at++] : NULL;
    p->oidx = o ? (const uint16_t*)c->tensors[at++] : NULL;
    const uint16_t* out16 = o ? (const uint16_t*)c->tensors[at++] : NULL;
    p->scale = (const uint16_t*)c->tensors[at++];
    p->wbias = (const uint16_t*)c->tensors[at++];
    p->perm = (const uint16_t*)c->tensors[at++];
    const int64_t count = (Kc + Kr + (o ? Kc : 0)) * v;
    p->books = (float*)scratch_alloc((size_t)count * sizeof(float));
    if (!p->books) return 1;
    vptq_halves((const uint16_t*)c->tensors[1], Kc * v, p->books);
    p->res = p->books + Kc * v;
    if (br) vptq_halves(res16, Kr * v, p->res);
    p->obooks = p->res + Kr * v;
    if (o) vptq_halves(out16, Kc * v, p->obooks);
    return 0;
}

static int linear_vptq_call(const qc_call* c) {
    const int64_t Mt = c->M, N = c->N, K = c->K, v = c->ints[0], bk = c->ints[1], br = c->ints[2], o = c->ints[3];
    const int64_t R = c->ints[4], Wd = c->ints[5], gs = K - o, Kc = (int64_t)1 << bk;
    const int64_t Kr = br ? ((int64_t)1 << br) : 0;
    const int tb = (int)(bk + br);
    vptq_parts p;
    if (vptq_parts_of(c, &p)) return 1;
    float* xs = (float*)scratch_alloc((size_t)(Mt * K + Mt) * sizeof(float));
    if (!xs) {
        free(p.books);
        return 1;
    }
    float* beta = xs + Mt * K;
    for (int64_t t = 0; t < Mt; t++) {
        float b = 0.0f;
        for (int64_t k = 0; k < K; k++) b += load_activation(c->x, c->x_bf16, t * K + k) * vptq_half(p.wbias[k]);
        beta[t] = b;
        for (int64_t j = 0; j < K; j++) {
            const int64_t src = p.perm[j];
            xs[t * K + j] = src < K ? load_activation(c->x, c->x_bf16, t * K + src) * vptq_half(p.scale[src]) : 0.0f;
        }
    }
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t i = 0; i < R; i++) {
        float acc[16 * 32];
        float vec[32];
        const uint32_t* row = p.words + i * Wd;
        for (int64_t t0 = 0; t0 < Mt; t0 += 16) {
            const int64_t mt = min_i64(16, Mt - t0);
            for (int64_t e = 0; e < mt * v; e++) acc[e] = 0.0f;
            for (int64_t j = 0; j < o; j++) {
                const float* e = p.obooks + (int64_t)(p.oidx[i * o + j] & (Kc - 1)) * v;
                for (int64_t t = 0; t < mt; t++) vptq_axpy(acc + t * v, xs[(t0 + t) * K + j], e, v);
            }
            for (int64_t col = 0; col < gs; col++) {
                const uint32_t entry = vptq_entry(row, col * tb, tb);
                const float* e = p.books + (int64_t)(entry & (uint32_t)(Kc - 1)) * v;
                if (br) {
                    const float* r = p.res + (int64_t)((entry >> bk) & (uint32_t)(Kr - 1)) * v;
                    for (int64_t u = 0; u < v; u++) vec[u] = e[u] + r[u];
                    e = vec;
                }
                const float* xc = xs + t0 * K + o + col;
                for (int64_t t = 0; t < mt; t++) vptq_axpy(acc + t * v, xc[t * K], e, v);
            }
            for (int64_t t = 0; t < mt; t++)
                for (int64_t u = 0; u < v && i * v + u < N; u++) {
                    const int64_t n = i * v + u;
                    store_output(c->y, c->y_bf16, (t0 + t) * N + n,
                                 acc[t * v + u] + beta[t0 + t] + (c->bias ? c->bias[n] : 0.0f));
                }
        }
    }
    free(xs);
    free(p.books);
    return 0;
}
QC_KERNEL(linear_vptq, linear_vptq_call)

static int dequant_vptq_call(const qc_call* c) {
    const int64_t K = c->K, v = c->ints[0], bk = c->ints[1], br = c->ints[2], o = c->ints[3], Wd = c->ints[5];
    const int64_t n0 = c->ints[6], n1 = c->ints[7], gs = K - o, Kc = (int64_t)1 << bk;
    const int64_t Kr = br ? ((int64_t)1 << br) : 0;
    const int tb = (int)(bk + br);
    vptq_parts p;
    if (vptq_parts_of(c, &p)) return 1;
    float* out = (float*)c->y;
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t n = n0; n < n1; n++) {
        const int64_t i = n / v, u = n % v;
        const uint32_t* row = p.words + i * Wd;
        float* w = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k++) w[k] = 0.0f;
        for (int64_t j = 0; j < K; j++) {
            const int64_t dst = p.perm[j];
            if (dst >= K) continue;
            float q;
            if (j < o) {
                q = p.obooks[(int64_t)(p.oidx[i * o + j] & (Kc - 1)) * v + u];
            } else {
                const uint32_t entry = vptq_entry(row, (j - o) * tb, tb);
                q = p.books[(int64_t)(entry & (uint32_t)(Kc - 1)) * v + u];
                if (br) q += p.res[(int64_t)((entry >> bk) & (uint32_t)(Kr - 1)) * v + u];
            }
            w[dst] = q * vptq_half(p.scale[dst]) + vptq_half(p.wbias[dst]);
        }
    }
    (void)gs;
    free(p.books);
    return 0;
}
QC_KERNEL(dequant_vptq, dequant_vptq_call)
