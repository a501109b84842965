// GGUF kernels over many rows and tokens (the blocks, their decoders and the activation preparation are in gguf.h,
// which also gives the shapes, dtypes and parameters). A thread decodes weight rows into its scratch (K int8 + K/8
// floats per row) and runs every token against them: one row at a time for one token, GGUF_NR rows (4 with AVX-512,
// 2 otherwise) for more, tokens 4 at a time. Kernels:
//   linear_gguf:    the exact float form: sum_e (ds * s[e]) * x[e] in float32 FMAs, minus sum_c dm[c] * (the sum of
//                   x over the 16 elements c). Up to 8 tokens of the 32-element types (Q4_0 .. Q8_0, IQ4_NL) take
//                   the register form of kernels/gguf_gemv.h instead (AVX2, AVX-512).
//   linear_gguf_q8: llama.cpp's form (ggml_vec_dot_<type>_q8_0 / _q8_K): per token and block of QA = QK activations
//                   (32, or 256 as Q8_K), dx = amax / 127 (float32), xq = clamp(rint(x / dx), -127, 127) (round half
//                   to even; 0 where amax is 0; dx NaN where the block holds a NaN or infinity); then y = sum over
//                   groups of 4 elements of (ds * dx) * (sum s * xq), minus sum_c dm[c] * dx * (sum of xq over c):
//                   the integer sums are exact (AVX-512 VNNI vpdpbusd on
//                   s + 128 with -128 * sum(xq) as the start value; AVX2 vpmaddubsw on |s| and sign(xq, s), pairs at
//                   most 2 * 128 * 127; scalar int32), the scales are applied in float32. Up to 4 tokens of Q4_0,
//                   Q4_1 and Q8_0 take kernels/gguf_gemv.h's register form on AVX-512 (the same integer sums).
//   dequant_gguf:   rows n0..n1 of w [n1 - n0, K]: float32 bit for bit gguf_blocks.dequantize, or bfloat16 (y_bf16)
//                   rounded to nearest even as torch's .to(torch.bfloat16) (reads no x).
// Each thread takes one contiguous range of output rows (one sequential stream of blocks, see gguf_gemv.h); each
// output is computed by one thread, so results do not depend on the thread count.

// -- NR decoded rows against MT tokens -------------------------------------------------------------------------------
// The scratch holds NR rows (s [NR][Kq], ds and dm [NR][Kq / 16]); each activation vector loaded serves NR rows and
// each weight vector MT tokens. One token (decode) takes one row at a time with independent accumulators over K (the
// scratch stays in L1); more tokens take GGUF_NR rows: 4 with AVX-512 (16 accumulators), 2 otherwise.
constexpr int GGUF_NR = W == 16 ? 4 : 2;

// Float form: out[r][m] = sum_e (ds * s[e]) * xf[m, e] - sum_c dm[c] * xsum[m, c] (no bias).
template <int NR, int MT, bool MIN>
static inline void gguf_tile_f(const int8_t* s, const float* ds, const float* dm, int64_t Kq, const float* xf,
                               const float* xsum, float (*out)[4]) {
    constexpr int V = 16 / W;                  // vectors per 16 elements
    constexpr int A = NR * MT == 1 ? 4 : 1;    // independent accumulators (FMA latency)
    const int64_t C = Kq / 16;                 // a multiple of 4
    vf acc[A][NR][MT];
    for (int a = 0; a < A; a++)
        for (int r = 0; r < NR; r++)
            for (int m = 0; m < MT; m++) acc[a][r][m] = vf_zero();
    for (int64_t c0 = 0; c0 < C; c0 += A) {
        for (int a = 0; a < A; a++) {
            const int64_t c = c0 + a;
            for (int i = 0; i < V; i++) {
                const int64_t k = c * 16 + i * W;
                vf w[NR];
                for (int r = 0; r < NR; r++) w[r] = gguf_mul(s8_block(s + r * Kq + k), vf_bcast(ds[r * C + c]));
                for (int m = 0; m < MT; m++) {
                    const vf xv = vf_load(xf + m * Kq + k);
                    for (int r = 0; r < NR; r++) acc[a][r][m] = vf_fma(w[r], xv, acc[a][r][m]);
                }
            }
        }
    }
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MT; m++) {
            vf total = acc[0][r][m];
            for (int a = 1; a < A; a++) total = vf_add(total, acc[a][r][m]);
            out[r][m] = vf_hsum(total) - (MIN ? gguf_dot(dm + r * C, xsum + m * C, C) : 0.0f);
        }
}

// Int8 form: out[r][m] = sum over groups of 4 elements of float(sum s * xq) * (ds * dx) - sum_c dm[c] * xs16[m, c].
#if defined(__AVX512F__)
constexpr bool GGUF_LANE_SUMS = true;  // gguf_prepare_q8 fills x4
// 64 elements g: vpdpbusd of s + 128 (uint8) with xq, started at -128 * sum(xq): exact int32 sums of 4 products.
template <int NR, int MT>
static inline void gguf_q8_step(const int8_t* s, const float* ds, int64_t Kq, const int8_t* xq, const float* dxl,
                                const int32_t* x4, int64_t g, __m512 (*acc)[MT]) {
    const int64_t L = Kq / 4, C = Kq / 16;
    const __m512i lane = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512i su[NR];
    __m512 ls[NR];
    for (int r = 0; r < NR; r++) {
        su[r] = _mm512_xor_si512(_mm512_loadu_si512((const void*)(s + r * Kq + 64 * g)), _mm512_set1_epi8((char)0x80));
        ls[r] = _mm512_permutexvar_ps(lane, _mm512_castps128_ps512(_mm_loadu_ps(ds + r * C + 4 * g)));
    }
    for (int m = 0; m < MT; m++) {
        const __m512i xv = _mm512_loadu_si512((const void*)(xq + m * Kq + 64 * g));
        const __m512i start = _mm512_loadu_si512((const void*)(x4 + m * L + 16 * g));
        const __m512 dx = _mm512_loadu_ps(dxl + m * L + 16 * g);
        for (int r = 0; r < NR; r++) {
            const __m512i dp = _mm512_dpbusd_epi32(start, su[r], xv);
            acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(ls[r], dx), acc[r][m]);
        }
    }
}
#elif defined(__AVX2__)
constexpr bool GGUF_LANE_SUMS = false;
// 32 elements g: vpmaddubsw of |s| with sign(xq, s), pairs at most 2 * 128 * 127 (no saturation), then vpmaddwd.
template <int NR, int MT>
static inline void gguf_q8_step(const int8_t* s, const float* ds, int64_t Kq, const int8_t* xq, const float* dxl,
                                const int32_t*, int64_t g, __m256 (*acc)[MT]) {
    const int64_t L = Kq / 4, C = Kq / 16;
    __m256i sv[NR], magnitude[NR];
    __m256 ls[NR];
    for (int r = 0; r < NR; r++) {
        sv[r] = _mm256_loadu_si256((const __m256i*)(s + r * Kq + 32 * g));
        magnitude[r] = _mm256_abs_epi8(sv[r]);
        ls[r] = _mm256_permutevar8x32_ps(
            _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64((const __m128i*)(ds + r * C + 2 * g)))),
            _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
    }
    for (int m = 0; m < MT; m++) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + m * Kq + 32 * g));
        const __m256 dx = _mm256_loadu_ps(dxl + m * L + 8 * g);
        for (int r = 0; r < NR; r++) {
            const __m256i pairs = _mm256_maddubs_epi16(magnitude[r], _mm256_sign_epi8(xv, sv[r]));
            const __m256i dp = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dp), _mm256_mul_ps(ls[r], dx), acc[r][m]);
        }
    }
}
#else
constexpr bool GGUF_LANE_SUMS = false;
// 4 elements g: int32 sums.
template <int NR, int MT>
static inline void gguf_q8_step(const int8_t* s, const float* ds, int64_t Kq, const int8_t* xq, const float* dxl,
                                const int32_t*, int64_t g, float (*acc)[MT]) {
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MT; m++) {
            int32_t dp = 0;
            for (int i = 0; i < 4; i++) dp += (int32_t)s[r * Kq + 4 * g + i] * (int32_t)xq[m * Kq + 4 * g + i];
            acc[r][m] += (float)dp * (ds[r * (Kq / 16) + g / 4] * dxl[m * (Kq / 4) + g]);
        }
}
#endif

template <int NR, int MT, bool MIN>
static inline void gguf_tile_q(const int8_t* s, const float* ds, const float* dm, int64_t Kq, const int8_t* xq,
                               const float* dxl, const int32_t* x4, const float* xs16, float (*out)[4]) {
    constexpr int A = NR * MT == 1 ? 2 : 1;  // independent accumulators (FMA latency)
    constexpr int E = W == 1 ? 4 : 4 * W;    // elements per step
    const int64_t C = Kq / 16, G = Kq / E;
    vf acc[A][NR][MT];
    for (int a = 0; a < A; a++)
        for (int r = 0; r < NR; r++)
            for (int m = 0; m < MT; m++) acc[a][r][m] = vf_zero();
    int64_t g = 0;
    for (; g + A <= G; g += A)
        for (int a = 0; a < A; a++) gguf_q8_step<NR, MT>(s, ds, Kq, xq, dxl, x4, g + a, acc[a]);
    for (; g < G; g++) gguf_q8_step<NR, MT>(s, ds, Kq, xq, dxl, x4, g, acc[0]);
    for (int r = 0; r < NR; r++)
        for (int m = 0; m < MT; m++) {
            vf total = acc[0][r][m];
            for (int a = 1; a < A; a++) total = vf_add(total, acc[a][r][m]);
            out[r][m] = vf_hsum(total) - (MIN ? gguf_dot(dm + r * C, xs16 + m * C, C) : 0.0f);
        }
}

// -- kernels ---------------------------------------------------------------------------------------------------------
// One type: its block geometry and its row decoder (the only per-type code; the drivers below are shared).
typedef void (*gguf_row_decoder)(const uint8_t* row, int64_t nb, int8_t* s, float* ds, float* dm);
struct gguf_type {
    int64_t qk, bytes;
    bool min;
    gguf_row_decoder decode;
};

template <class T>
static gguf_type gguf_type_of() {
    return gguf_type{T::QK, T::BYTES, T::MIN, &gguf_decode_row<T>};
}

// The activations as the tiles read them (gguf_prepare_f / gguf_prepare_q8), and the call's output.
struct gguf_acts {
    const float *xf, *dxl, *xs;
    const int8_t* xq;
    const int32_t* x4;
    const float* bias;
    void* y;
    int y_bf16;
};

// The tiles of one form for the NR decoded rows n0.. (`rows` of them real) against every token (MT = 4, then the
// rest); adds the bias and stores.
template <int NR, bool Q8, bool MIN>
static void gguf_rows_tokens(const int8_t* s, const float* ds, const float* dm, int64_t M, int64_t Kq,
                             const gguf_acts& a, int64_t n0, int64_t rows, int64_t N) {
    const int64_t C = Kq / 16;
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mt = min_i64(4, M - m0);
        float out[NR][4];
        const float* st = MIN ? a.xs + m0 * C : nullptr;
        if (Q8) {
            const int8_t* xt = a.xq + m0 * Kq;
            const float* lt = a.dxl + m0 * (Kq / 4);
            const int32_t* ct = a.x4 ? a.x4 + m0 * (Kq / 4) : nullptr;
            if constexpr (NR == 1) {
                gguf_tile_q<1, 1, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out);
            } else {
                switch (mt) {
                    case 4: gguf_tile_q<NR, 4, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                    case 3: gguf_tile_q<NR, 3, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                    case 2: gguf_tile_q<NR, 2, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                    default: gguf_tile_q<NR, 1, MIN>(s, ds, dm, Kq, xt, lt, ct, st, out); break;
                }
            }
        } else {
            const float* xt = a.xf + m0 * Kq;
            if constexpr (NR == 1) {
                gguf_tile_f<1, 1, MIN>(s, ds, dm, Kq, xt, st, out);
            } else {
                switch (mt) {
                    case 4: gguf_tile_f<NR, 4, MIN>(s, ds, dm, Kq, xt, st, out); break;
                    case 3: gguf_tile_f<NR, 3, MIN>(s, ds, dm, Kq, xt, st, out); break;
                    case 2: gguf_tile_f<NR, 2, MIN>(s, ds, dm, Kq, xt, st, out); break;
                    default: gguf_tile_f<NR, 1, MIN>(s, ds, dm, Kq, xt, st, out); break;
                }
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            const float b = a.bias ? a.bias[n0 + r] : 0.0f;
            for (int64_t i = 0; i < (NR == 1 ? 1 : mt); i++)
                store_output(a.y, a.y_bf16, (m0 + i) * N + n0 + r, out[r][i] + b);
        }
    }
}

// Every output row, NR at a time over the threads (M == 1 when NR == 1). Returns 1 when a scratch allocation failed.
template <int NR>
static int gguf_rows(const qc_call* c, const gguf_type t, bool q8, int64_t Kq, const gguf_acts& a) {
    const int64_t M = c->M, N = c->N, C = Kq / 16, nb = (c->K + t.qk - 1) / t.qk, row_bytes = nb * t.bytes;
    const uint8_t* blocks = (const uint8_t*)c->tensors[0];
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        int8_t* s = (int8_t*)scratch_alloc((size_t)(NR * Kq));
        float* ds = (float*)scratch_alloc((size_t)(NR * C) * sizeof(float));
        float* dm = (float*)scratch_alloc((size_t)(NR * C) * sizeof(float));
        const bool ok = s && ds && dm;
        if (ok) {  // the columns past the last block stay zero
            memset(s, 0, (size_t)(NR * Kq));
            memset(ds, 0, (size_t)(NR * C) * sizeof(float));
            memset(dm, 0, (size_t)(NR * C) * sizeof(float));
        } else {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < (N + NR - 1) / NR; i++) {
            if (!ok) continue;
            const int64_t n0 = i * NR, rows = min_i64(NR, N - n0);
            for (int64_t r = 0; r < rows; r++)
                t.decode(blocks + (n0 + r) * row_bytes, nb, s + r * Kq, ds + r * C, dm + r * C);
            for (int64_t r = rows; r < NR; r++) {  // past N: zero rows (computed, not stored)
                memset(s + r * Kq, 0, (size_t)Kq);
                memset(ds + r * C, 0, (size_t)C * sizeof(float));
                memset(dm + r * C, 0, (size_t)C * sizeof(float));
            }
            // the next rows stream in while these meet the tokens
            const int64_t ahead = min_i64(NR, N - n0 - NR) * row_bytes;
            for (int64_t b = 0; b < ahead; b += 64) __builtin_prefetch(blocks + (n0 + NR) * row_bytes + b);
            if (q8 && t.min)
                gguf_rows_tokens<NR, true, true>(s, ds, dm, M, Kq, a, n0, rows, N);
            else if (q8)
                gguf_rows_tokens<NR, true, false>(s, ds, dm, M, Kq, a, n0, rows, N);
            else if (t.min)
                gguf_rows_tokens<NR, false, true>(s, ds, dm, M, Kq, a, n0, rows, N);
            else
                gguf_rows_tokens<NR, false, false>(s, ds, dm, M, Kq, a, n0, rows, N);
        }
        free(s);
        free(ds);
        free(dm);
    }
    return failed;
}

// The one-token form of the 32-element block types (kernels/gguf_gemv.h); false where it does not take the call.
static bool gguf_gemv(const qc_call* c, int type, const float* xf, const float* xs, int64_t Kq);
static bool gguf_gemv_q8(const qc_call* c, int type, const int8_t* xq, const float* dxl, const int32_t* x4,
                         int64_t Kq);

static int gguf_linear(const qc_call* c, const gguf_type t, const bool q8) {
    const int64_t M = c->M, K = c->K;
    const int64_t nb = (K + t.qk - 1) / t.qk, Kq = (nb * t.qk + 63) / 64 * 64, C = Kq / 16;
    float* xf = q8 ? nullptr : (float*)scratch_alloc((size_t)(M * Kq) * sizeof(float));
    int8_t* xq = q8 ? (int8_t*)scratch_alloc((size_t)(M * Kq)) : nullptr;
    float* dxl = q8 ? (float*)scratch_alloc((size_t)(M * (Kq / 4)) * sizeof(float)) : nullptr;
    int32_t* x4 = q8 && GGUF_LANE_SUMS ? (int32_t*)scratch_alloc((size_t)(M * (Kq / 4)) * sizeof(int32_t)) : nullptr;
    float* xs = t.min ? (float*)scratch_alloc((size_t)(M * C) * sizeof(float)) : nullptr;
    int failed = (q8 ? !xq || !dxl || (GGUF_LANE_SUMS && !x4) : !xf) || (t.min && !xs);
    if (!failed) {
        if (q8)
            gguf_prepare_q8(c->x, c->x_bf16, M, K, Kq, t.qk, xq, dxl, xs, x4, c->threads);
        else
            gguf_prepare_f(c->x, c->x_bf16, M, K, Kq, xf, xs, c->threads);
        const gguf_acts a{xf, dxl, xs, xq, x4, c->bias, c->y, c->y_bf16};
        const bool served = q8 ? gguf_gemv_q8(c, (int)c->ints[0], xq, dxl, x4, Kq)
                               : gguf_gemv(c, (int)c->ints[0], xf, xs, Kq);
        if (!served)
            failed = M == 1 ? gguf_rows<1>(c, t, q8, Kq, a) : gguf_rows<GGUF_NR>(c, t, q8, Kq, a);
    }
    free(xf);
    free(xq);
    free(dxl);
    free(x4);
    free(xs);
    return failed;
}

// Rows n0..n1 of w as float32, or bfloat16 (y_bf16: rounded to nearest even as torch's conversion), [n1 - n0, K]:
// ds * s - dm, the reference's float operations.
#if defined(__AVX2__)
// 8 floats -> 8 bfloat16 (float_to_bf16 of common.h, eight at once)
static inline __m128i gguf_bf16x8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));  // NaN stays NaN
    const __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
#endif

// 16 weights d * s[i] - m (MIN) or d * s[i] -> float32 or bfloat16 at o.
template <bool MIN>
static inline void gguf_store16(const int8_t* s, float d, float m, void* o, int bf16) {
#if defined(__AVX512F__)
    const __m512 codes = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)s)));
    __m512 w = _mm512_mul_ps(_mm512_set1_ps(d), codes);
    if (MIN) w = _mm512_sub_ps(w, _mm512_set1_ps(m));
    if (bf16) {
        _mm_storeu_si128((__m128i*)o, gguf_bf16x8(_mm512_castps512_ps256(w)));
        const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1));
        _mm_storeu_si128((__m128i*)o + 1, gguf_bf16x8(high));
    } else {
        _mm512_storeu_ps((float*)o, w);
    }
#elif defined(__AVX2__)
    for (int h = 0; h < 2; h++) {
        const __m128i raw = _mm_loadl_epi64((const __m128i*)(s + 8 * h));
        __m256 w = _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw)));
        if (MIN) w = _mm256_sub_ps(w, _mm256_set1_ps(m));
        if (bf16)
            _mm_storeu_si128((__m128i*)o + h, gguf_bf16x8(w));
        else
            _mm256_storeu_ps((float*)o + 8 * h, w);
    }
#else
    for (int i = 0; i < 16; i++) store_output(o, bf16, i, MIN ? d * (float)s[i] - m : d * (float)s[i]);
#endif
}

template <bool MIN>
static void gguf_dequant_row(const int8_t* s, const float* ds, const float* dm, int64_t K, void* o, int bf16) {
    const int64_t whole = K / 16 * 16, size = bf16 ? 2 : 4;
    for (int64_t k0 = 0; k0 < whole; k0 += 16)
        gguf_store16<MIN>(s + k0, ds[k0 / 16], MIN ? dm[k0 / 16] : 0.0f, (char*)o + k0 * size, bf16);
    for (int64_t k = whole; k < K; k++) {
        const float w = ds[k / 16] * (float)s[k];
        store_output(o, bf16, k, MIN ? w - dm[k / 16] : w);
    }
}

static int gguf_dequant(const qc_call* c, const gguf_type t) {
    const int64_t K = c->K, n0 = c->ints[1], n1 = c->ints[2];
    const int64_t nb = (K + t.qk - 1) / t.qk, Kp = nb * t.qk, row_bytes = nb * t.bytes;
    const uint8_t* blocks = (const uint8_t*)c->tensors[0];
    const int64_t size = c->y_bf16 ? 2 : 4;
    int failed = 0;
#pragma omp parallel num_threads(c->threads)
    {
        int8_t* s = (int8_t*)scratch_alloc((size_t)Kp);
        float* ds = (float*)scratch_alloc((size_t)(Kp / 16) * sizeof(float));
        float* dm = (float*)scratch_alloc((size_t)(Kp / 16) * sizeof(float));
        const bool ok = s && ds && dm;
        if (!ok) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t n = n0; n < n1; n++) {
            if (!ok) continue;
            t.decode(blocks + n * row_bytes, nb, s, ds, dm);
            void* o = (char*)c->y + (n - n0) * K * size;
            if (t.min)
                gguf_dequant_row<true>(s, ds, dm, K, o, c->y_bf16);
            else
                gguf_dequant_row<false>(s, ds, dm, K, o, c->y_bf16);
        }
        free(s);
        free(ds);
        free(dm);
    }
    return failed;
}

// One switch over the ggml type id; 2 (a parameter error the Python side never sends) for an unknown one.
#define GGUF_TYPES(X) \
    X(gguf_q4_0) X(gguf_q4_1) X(gguf_q5_0) X(gguf_q5_1) X(gguf_q8_0) X(gguf_q2_k) X(gguf_q3_k) X(gguf_q4_k) \
    X(gguf_q5_k) X(gguf_q6_k) X(gguf_iq4_nl) X(gguf_iq4_xs)

static int linear_gguf_call(const qc_call* c) {
#define GGUF_CASE(T) \
    case T::ID: return gguf_linear(c, gguf_type_of<T>(), false);
    switch (c->ints[0]) { GGUF_TYPES(GGUF_CASE) }
#undef GGUF_CASE
    return 2;
}
QC_KERNEL(linear_gguf, linear_gguf_call)

static int linear_gguf_q8_call(const qc_call* c) {
#define GGUF_CASE(T) \
    case T::ID: return gguf_linear(c, gguf_type_of<T>(), true);
    switch (c->ints[0]) { GGUF_TYPES(GGUF_CASE) }
#undef GGUF_CASE
    return 2;
}
QC_KERNEL(linear_gguf_q8, linear_gguf_q8_call)

static int dequant_gguf_call(const qc_call* c) {
#define GGUF_CASE(T) \
    case T::ID: return gguf_dequant(c, gguf_type_of<T>());
    switch (c->ints[0]) { GGUF_TYPES(GGUF_CASE) }
#undef GGUF_CASE
    return 2;
}
QC_KERNEL(dequant_gguf, dequant_gguf_call)

#undef GGUF_TYPES
