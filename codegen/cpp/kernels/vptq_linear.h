// VPTQ kernels linear_vptq and dequant_vptq (described in vptq.h, whose layout and index decoders they use; the
// build includes this file after vptq.h, in name order): the register forms, the per-row form, the entry points.

#if defined(__AVX2__)
// v floats of one vector row in registers: V / 16 zmm (AVX-512), then ymm, then xmm parts.
template <int V>
struct vptq_vec {
#if defined(__AVX512F__)
    static constexpr int NZ = V / 16, NY = (V % 16) / 8, NX = (V % 8) / 4;
    __m512 z[NZ > 0 ? NZ : 1];
#else
    static constexpr int NZ = 0, NY = V / 8, NX = (V % 8) / 4;
#endif
    static constexpr int REGS = NZ + NY + NX;
    __m256 y[NY > 0 ? NY : 1];
    __m128 x[NX > 0 ? NX : 1];
};

// One activation broadcast at every width.
struct vptq_bcast {
#if defined(__AVX512F__)
    __m512 z;
#endif
    __m256 y;
    __m128 x;
};

static inline vptq_bcast vptq_bcast_of(const float* a) {
    vptq_bcast b;
#if defined(__AVX512F__)
    b.z = _mm512_set1_ps(*a);
#endif
    b.y = _mm256_set1_ps(*a);
    b.x = _mm_set1_ps(*a);
    return b;
}

template <int V>
static inline void vptq_zero(vptq_vec<V>& a) {
    typedef vptq_vec<V> VV;
#if defined(__AVX512F__)
    for (int k = 0; k < VV::NZ; k++) a.z[k] = _mm512_setzero_ps();
#endif
    for (int k = 0; k < VV::NY; k++) a.y[k] = _mm256_setzero_ps();
    for (int k = 0; k < VV::NX; k++) a.x[k] = _mm_setzero_ps();
}

template <int V>
static inline vptq_vec<V> vptq_load(const float* e) {
    typedef vptq_vec<V> VV;
    VV a;
#if defined(__AVX512F__)
    for (int k = 0; k < VV::NZ; k++) a.z[k] = _mm512_loadu_ps(e + 16 * k);
#endif
    for (int k = 0; k < VV::NY; k++) a.y[k] = _mm256_loadu_ps(e + 16 * VV::NZ + 8 * k);
    for (int k = 0; k < VV::NX; k++) a.x[k] = _mm_loadu_ps(e + 16 * VV::NZ + 8 * VV::NY + 4 * k);
    return a;
}

template <int V>
static inline vptq_vec<V> vptq_add(const vptq_vec<V>& a, const vptq_vec<V>& b) {
    typedef vptq_vec<V> VV;
    VV s;
#if defined(__AVX512F__)
    for (int k = 0; k < VV::NZ; k++) s.z[k] = _mm512_add_ps(a.z[k], b.z[k]);
#endif
    for (int k = 0; k < VV::NY; k++) s.y[k] = _mm256_add_ps(a.y[k], b.y[k]);
    for (int k = 0; k < VV::NX; k++) s.x[k] = _mm_add_ps(a.x[k], b.x[k]);
    return s;
}

// acc += b * e
template <int V>
static inline void vptq_fma(const vptq_bcast& b, const vptq_vec<V>& e, vptq_vec<V>& acc) {
    typedef vptq_vec<V> VV;
#if defined(__AVX512F__)
    for (int k = 0; k < VV::NZ; k++) acc.z[k] = _mm512_fmadd_ps(b.z, e.z[k], acc.z[k]);
#endif
    for (int k = 0; k < VV::NY; k++) acc.y[k] = _mm256_fmadd_ps(b.y, e.y[k], acc.y[k]);
    for (int k = 0; k < VV::NX; k++) acc.x[k] = _mm_fmadd_ps(b.x, e.x[k], acc.x[k]);
}

template <int V>
static inline void vptq_store(float* out, const vptq_vec<V>& a) {
    typedef vptq_vec<V> VV;
#if defined(__AVX512F__)
    for (int k = 0; k < VV::NZ; k++) _mm512_storeu_ps(out + 16 * k, a.z[k]);
#endif
    for (int k = 0; k < VV::NY; k++) _mm256_storeu_ps(out + 16 * VV::NZ + 8 * k, a.y[k]);
    for (int k = 0; k < VV::NX; k++) _mm_storeu_ps(out + 16 * VV::NZ + 8 * VV::NY + 4 * k, a.x[k]);
}

#if defined(__AVX512F__)
constexpr int VPTQ_ACC = 16;  // accumulator registers a block may hold
#else
constexpr int VPTQ_ACC = 8;
#endif

// acc[r][t] += sum over the block's `count` columns of xs[t, col0 + c] * (the centroid at byte idx[r][c] of book plus
// the one at byte ridx[r][c] of res).
template <int V, int T, int RB, bool RES>
static inline void vptq_columns(vptq_vec<V> (&acc)[RB][T], const int32_t* idx, const int32_t* ridx, const float* book,
                                const float* res, const float* xs, int64_t K, int64_t count) {
    for (int64_t c = 0; c < count; c++) {
        vptq_bcast b[T];
        for (int t = 0; t < T; t++) b[t] = vptq_bcast_of(xs + t * K + c);
        for (int r = 0; r < RB; r++) {
            vptq_vec<V> e = vptq_load<V>((const float*)((const char*)book + idx[r * VPTQ_COLS + c]));
            if (RES) e = vptq_add<V>(e, vptq_load<V>((const float*)((const char*)res + ridx[r * VPTQ_COLS + c])));
            for (int t = 0; t < T; t++) vptq_fma<V>(b[t], e, acc[r][t]);
        }
    }
}

// Vector rows i0 .. i0 + RB (rows past R repeat row R - 1) for tokens t0 .. t0 + T of xs: out[(r * T + t) * V + u].
template <int V, int T, bool RES>
static void vptq_rows(const vptq_ctx& cx, const vptq_decoder& d, int64_t i0, int64_t t0, float* out) {
    constexpr int RB = VPTQ_ACC / (T * vptq_vec<V>::REGS) > 0 ? VPTQ_ACC / (T * vptq_vec<V>::REGS) : 1;
    alignas(64) int32_t idx[RB * VPTQ_COLS], ridx[RB * VPTQ_COLS];
    vptq_vec<V> acc[RB][T];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < T; t++) vptq_zero<V>(acc[r][t]);
    const float* xs = cx.xs + t0 * cx.K;
    const int64_t Kc1 = ((int64_t)1 << cx.bk) - 1;
    for (int64_t j0 = 0; j0 < cx.o; j0 += VPTQ_COLS) {  // outlier columns
        const int64_t count = min_i64(VPTQ_COLS, cx.o - j0);
        for (int r = 0; r < RB; r++) {
            const int64_t i = min_i64(i0 + r, cx.R - 1);
            for (int64_t c = 0; c < count; c++)
                idx[r * VPTQ_COLS + c] = (int32_t)(cx.p.oidx[i * cx.o + j0 + c] & Kc1) * cx.row_bytes;
        }
        vptq_columns<V, T, RB, false>(acc, idx, ridx, cx.p.obooks, NULL, xs + j0, cx.K, count);
    }
    for (int64_t c0 = 0; c0 < cx.gs; c0 += VPTQ_COLS) {
        for (int r = 0; r < RB; r++)
            vptq_decode(cx, d, min_i64(i0 + r, cx.R - 1), c0, idx + r * VPTQ_COLS, ridx + r * VPTQ_COLS);
        const int64_t count = min_i64(VPTQ_COLS, cx.gs - c0);
        if (cx.pairs)
            vptq_columns<V, T, RB, false>(acc, idx, ridx, cx.pairs, NULL, xs + cx.o + c0, cx.K, count);
        else
            vptq_columns<V, T, RB, RES>(acc, idx, ridx, cx.p.books, cx.p.res, xs + cx.o + c0, cx.K, count);
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < T; t++) vptq_store<V>(out + (r * T + t) * V, acc[r][t]);
}

template <int V, int T>
static constexpr int vptq_block_rows() {
    return VPTQ_ACC / (T * vptq_vec<V>::REGS) > 0 ? VPTQ_ACC / (T * vptq_vec<V>::REGS) : 1;
}

// y for every row block and token group with the register kernel of v = V; 1 when a scratch allocation failed.
template <int V>
static int vptq_linear_v(const qc_call* c, const vptq_ctx& cx, const float* beta) {
    const int64_t Mt = c->M, N = c->N;
    const int T = Mt == 1 ? 1 : 4, RB = T == 1 ? vptq_block_rows<V, 1>() : vptq_block_rows<V, 4>();
    const vptq_decoder d = vptq_decoder_of(cx.tb);
    const int64_t blocks = (cx.R + RB - 1) / RB;
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        float* out = (float*)scratch_alloc((size_t)RB * T * V * sizeof(float));
        if (!out) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            if (!out) continue;
            const int64_t i0 = b * RB;
            for (int64_t t0 = 0; t0 < Mt; t0 += T) {
                const bool split = cx.br && !cx.pairs;
                if (T == 1)
                    split ? vptq_rows<V, 1, true>(cx, d, i0, t0, out) : vptq_rows<V, 1, false>(cx, d, i0, t0, out);
                else
                    split ? vptq_rows<V, 4, true>(cx, d, i0, t0, out) : vptq_rows<V, 4, false>(cx, d, i0, t0, out);
                for (int64_t r = 0; r < RB && i0 + r < cx.R; r++)
                    for (int64_t t = 0; t < T && t0 + t < Mt; t++)
                        for (int64_t u = 0; u < V && (i0 + r) * V + u < N; u++) {
                            const int64_t n = (i0 + r) * V + u;
                            store_output(c->y, c->y_bf16, (t0 + t) * N + n,
                                         out[(r * T + t) * V + u] + beta[t0 + t] + (c->bias ? c->bias[n] : 0.0f));
                        }
            }
        }
        free(out);
    }
    return failed;
}
#endif

// Any v, one vector row at a time (the scalar variant, and v without a register kernel).
static void vptq_linear_any(const qc_call* c, const vptq_ctx& cx, const float* beta) {
    const int64_t Mt = c->M, N = c->N, K = cx.K, v = c->ints[0], o = cx.o, gs = cx.gs, bk = cx.bk, br = cx.br;
    const int64_t Kc = (int64_t)1 << bk, Kr = br ? ((int64_t)1 << br) : 0;
    const int tb = cx.tb;
    const vptq_parts& p = cx.p;
#pragma omp parallel for schedule(static) num_threads(c->threads)
    for (int64_t i = 0; i < cx.R; i++) {
        float acc[16 * 32];
        float vec[32];
        const uint32_t* row = p.words + i * cx.Wd;
        for (int64_t t0 = 0; t0 < Mt; t0 += 16) {
            const int64_t mt = min_i64(16, Mt - t0);
            for (int64_t e = 0; e < mt * v; e++) acc[e] = 0.0f;
            for (int64_t j = 0; j < o; j++) {
                const float* e = p.obooks + (int64_t)(p.oidx[i * o + j] & (Kc - 1)) * v;
                for (int64_t t = 0; t < mt; t++) vptq_axpy(acc + t * v, cx.xs[(t0 + t) * K + j], e, v);
            }
            for (int64_t col = 0; col < gs; col++) {
                const uint32_t entry = vptq_entry(row, col * tb, tb);
                const float* e = p.books + (int64_t)(entry & (uint32_t)(Kc - 1)) * v;
                if (br) {
                    const float* r = p.res + (int64_t)((entry >> bk) & (uint32_t)(Kr - 1)) * v;
                    for (int64_t u = 0; u < v; u++) vec[u] = e[u] + r[u];
                    e = vec;
                }
                const float* xc = cx.xs + t0 * K + o + col;
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
}

static int linear_vptq_call(const qc_call* c) {
    const int64_t Mt = c->M, K = c->K, v = c->ints[0];
    vptq_ctx cx;
    if (vptq_parts_of(c, &cx.p)) return 1;
    cx.K = K, cx.bk = (int)c->ints[1], cx.br = (int)c->ints[2], cx.o = c->ints[3], cx.R = c->ints[4];
    cx.Wd = c->ints[5], cx.gs = K - cx.o, cx.tb = cx.bk + cx.br, cx.row_bytes = (int32_t)(4 * v), cx.pairs = NULL;
    const int64_t Mp = Mt == 1 ? 1 : (Mt + 3) / 4 * 4;  // token groups of 4 (zero tokens past Mt)
    float* xs = (float*)scratch_alloc((size_t)(Mp * K + Mt) * sizeof(float));
    if (!xs) {
        free(cx.p.books);
        return 1;
    }
    float* beta = xs + Mp * K;
    const vptq_parts& p = cx.p;
    for (int64_t t = 0; t < Mp; t++) {
        if (t >= Mt) {
            for (int64_t j = 0; j < K; j++) xs[t * K + j] = 0.0f;
            continue;
        }
        float b = 0.0f;
        for (int64_t k = 0; k < K; k++) b += load_activation(c->x, c->x_bf16, t * K + k) * vptq_half(p.wbias[k]);
        beta[t] = b;
        for (int64_t j = 0; j < K; j++) {
            const int64_t src = p.perm[j];
            xs[t * K + j] = src < K ? load_activation(c->x, c->x_bf16, t * K + src) * vptq_half(p.scale[src]) : 0.0f;
        }
    }
    cx.xs = xs;
    // a small residual codebook: every (main, residual) sum once, read by the raw entry (one load a column, not two)
    float* pairs = NULL;
    const int64_t entries = (int64_t)1 << cx.tb;
    if (cx.br && entries * v * 4 <= VPTQ_PAIR_BYTES && entries <= cx.R * cx.gs) {
        pairs = (float*)scratch_alloc((size_t)(entries * v) * sizeof(float));
        if (pairs) {
            const int64_t Kc = (int64_t)1 << cx.bk;
            for (int64_t e = 0; e < entries; e++)
                for (int64_t u = 0; u < v; u++)
                    pairs[e * v + u] = p.books[(e & (Kc - 1)) * v + u] + p.res[(e >> cx.bk) * v + u];
        }
        cx.pairs = pairs;
    }
    int failed = 0;
    switch (v) {
#if defined(__AVX2__)
        case 4: failed = vptq_linear_v<4>(c, cx, beta); break;
        case 8: failed = vptq_linear_v<8>(c, cx, beta); break;
        case 12: failed = vptq_linear_v<12>(c, cx, beta); break;
        case 16: failed = vptq_linear_v<16>(c, cx, beta); break;
        case 24: failed = vptq_linear_v<24>(c, cx, beta); break;
        case 32: failed = vptq_linear_v<32>(c, cx, beta); break;
#endif
        default: vptq_linear_any(c, cx, beta); break;
    }
    free(pairs);
    free(xs);
    free(cx.p.books);
    return failed;
}
QC_KERNEL(linear_vptq, linear_vptq_call)

static int dequant_vptq_call(const qc_call* c) {
    const int64_t K = c->K, v = c->ints[0], bk = c->ints[1], br = c->ints[2], o = c->ints[3], Wd = c->ints[5];
    const int64_t n0 = c->ints[6], n1 = c->ints[7], Kc = (int64_t)1 << bk;
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
    free(p.books);
    return 0;
}
QC_KERNEL(dequant_vptq, dequant_vptq_call)
