// VPTQ kernels (qcompile/schemes/vptq.py): y = x @ W.T + bias with, for the R = ceil(N / v) vector rows,
//     Q[i*v + u, o + c] = C[idx(i, c), u] + Cr[ridx(i, c), u]        (c < gs = K - o main columns, u < v)
//     Q[i*v + u, j]     = Co[oidx[i, j], u]                           (j < o outlier columns)
//     W[n, perm[j]]     = Q[n, j] * scale[perm[j]] + wbias[perm[j]]
// so y[t, n] = sum_j xs[t, j] * Q[n, j] + beta[t] + bias[n] with xs[t, j] = x[t, perm[j]] * scale[perm[j]] and
// beta[t] = sum_k x[t, k] * wbias[k].
//
// (This file: the layout, the codebooks and the index decoders; the kernels are in vptq_linear.h.)
//
// Shapes and dtypes (tensors in the scheme's order; the optional ones only when present): indices int32 [R, Wd]
// (per vector row a little-endian bitstream of uint32 words: main column c's tb-bit entry starts at bit c*tb, main
// index in its low bk bits, residual index in the br bits above); centroids float16 bits [Kc, v]; res_centroids
// float16 bits [Kr, v] (br > 0); outlier_indices int16 [R, o] (uint16 bits; o > 0); outlier_centroids float16 bits
// [Kc, v] (o > 0); weight_scale, weight_bias float16 bits [K]; perm int16 [K] (uint16 bits). x float32 or bfloat16
// [Mt, K]; bias float32 [N] or NULL; y [Mt, N] float32 or bfloat16. Kc = 2**bk, Kr = 2**br, tb = bk + br <= 32.
// Out-of-range values cannot read outside the tensors: an outlier index is taken modulo Kc, a perm entry >= K reads
// a zero activation (dequant_vptq: writes nothing); bitstream reads stop at the row's last word.
//
// Parameters (qc_call.ints): [0] v, [1] bk, [2] br (0: no residual), [3] o, [4] R, [5] Wd; dequant_vptq also [6] n0,
// [7] n1. Kernels:
//   linear_vptq:  y as above (decode sizes). The codebooks are converted to float32 once per call (F16C where the ISA
//                 has it), xs and beta once per call. With a residual codebook of at most VPTQ_PAIR_BYTES (256 KiB)
//                 of (main, residual) pairs, 2**tb <= R * gs, the pairs are summed once per call (float32, the same
//                 sums as per column) into a table read by the raw tb-bit entry: one centroid load a column.
//                 AVX2 / AVX-512 and v a multiple of 4 up to 32 except 20 and 28 (vptq_rows): a thread takes blocks
//                 of RB vector rows and T tokens (T = 1 for one token, else groups of 4, zero tokens padding the
//                 last), RB = 16 (AVX-512) / 8 (AVX2) accumulator registers / (T * registers per row), so every
//                 accumulator (one v-float vector per row and token: zmm, ymm, xmm parts) stays in a register.
//                 Columns go in blocks of VPTQ_COLS (64): first the block's entries of the RB rows are decoded into
//                 byte offsets of their centroids (AVX-512: 16 entries from one masked 64-byte load, vpermw putting
//                 each entry's two 16-bit words in its 32-bit lane, a per-lane shift (tb > 17: 8 entries, four words
//                 in 64-bit lanes); AVX2: a gather of 32-bit windows, 8 entries (tb > 25, and the row's last
//                 entries: one 64-bit window each)), then per column the T activations are broadcast once and each
//                 row adds activation times its centroid (main plus residual, added first) to its accumulators. The
//                 o outlier columns come first, the same way with the outlier codebook. Other v, and the scalar
//                 variant: per vector row, column by column into v float accumulators of up to 16 tokens. Every
//                 row's sums run over the columns in order: results do not depend on the threads.
//   dequant_vptq: writes rows n0..n1 of W to `y` as float32 [n1 - n0, K] (reads no x).

// float16 bits -> float, exact (subnormals, infinities and NaN included).
static inline float vptq_half(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023;
    if (e == 0) {
        const float v = (float)m * 5.9604644775390625e-08f;  // m * 2**-24
        return (h & 0x8000) ? -v : v;
    }
    const uint32_t bits = e == 31 ? (sign | 0x7f800000u | (m << 13)) : (sign | ((e + 112) << 23) | (m << 13));
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

static void vptq_halves(const uint16_t* in, int64_t n, float* out) {
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(in + i))));
#elif defined(__F16C__)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(in + i))));
#endif
    for (; i < n; i++) out[i] = vptq_half(in[i]);
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

// One call's geometry and float32 data for the row kernels.
struct vptq_ctx {
    vptq_parts p;
    const float* xs;      // [Mp, K] permuted, scaled activations (zero rows past Mt)
    const float* pairs;   // [2**tb, v]: entry e's centroid plus residual centroid, or NULL (see linear_vptq_call)
    int64_t K, o, gs, R, Wd;
    int bk, br, tb;
    int32_t row_bytes;    // v * 4: an index times this is its centroid's byte offset
};

//: columns whose indices a block decodes at a time (a multiple of 16)
constexpr int VPTQ_COLS = 64;
//: largest table of summed (main, residual) centroid pairs built per call (2**tb * v floats; fits in L2)
constexpr int64_t VPTQ_PAIR_BYTES = 256 << 10;

// Entries of row i's main columns c0 .. c0 + VPTQ_COLS (past gs: arbitrary values in range) as byte offsets into the
// codebooks: with cx.pairs, idx = entry * 4v (into pairs); else idx = main index * 4v and ridx = residual index * 4v
// (only when br > 0).
#if defined(__AVX512F__)
// Per-call constants of the AVX-512 decoder: tb <= 17: 16 entries a step, 32-bit lane j = words wj, wj + 1 of the
// step's bytes (wj = j * tb / 16) shifted right by j * tb % 16; tb > 17: 8 entries a step in 64-bit lanes (words wj
// .. wj + 3).
struct vptq_decoder {
    __m512i words, shifts;
    bool wide;
};

static vptq_decoder vptq_decoder_of(int tb) {
    vptq_decoder d;
    d.wide = tb > 17;
    int16_t w[32];
    int32_t s32[16];
    int64_t s64[8];
    const int lanes = d.wide ? 8 : 16, per = d.wide ? 4 : 2;
    for (int j = 0; j < lanes; j++) {
        for (int h = 0; h < per; h++) w[j * per + h] = (int16_t)((j * tb) / 16 + h);
        if (d.wide)
            s64[j] = (j * tb) % 16;
        else
            s32[j] = (j * tb) % 16;
    }
    d.words = _mm512_loadu_si512((const void*)w);
    d.shifts = d.wide ? _mm512_loadu_si512((const void*)s64) : _mm512_loadu_si512((const void*)s32);
    return d;
}

// a * scale, by a shift when scale = 2**shift (shift >= 0)
static inline __m512i vptq_scaled(__m512i a, __m512i scale, int shift) {
    return shift >= 0 ? _mm512_slli_epi32(a, (unsigned)shift) : _mm512_mullo_epi32(a, scale);
}

static inline void vptq_decode(const vptq_ctx& cx, const vptq_decoder& d, int64_t i, int64_t c0, int32_t* idx,
                               int32_t* ridx) {
    const uint8_t* row = (const uint8_t*)(cx.p.words + i * cx.Wd);
    const int64_t bytes = cx.Wd * 4;
    const bool split = cx.br && !cx.pairs;
    const __m512i mk = _mm512_set1_epi32((int32_t)(((int64_t)1 << (split ? cx.bk : cx.tb)) - 1));
    const __m512i mr = _mm512_set1_epi32((int32_t)(((int64_t)1 << cx.br) - 1));
    const __m512i scale = _mm512_set1_epi32(cx.row_bytes);
    const int shift = (cx.row_bytes & (cx.row_bytes - 1)) ? -1 : __builtin_ctz((unsigned)cx.row_bytes);
    const int step = d.wide ? 8 : 16;
    for (int c = 0; c < VPTQ_COLS; c += step) {
        const int64_t at = (c0 + c) * cx.tb / 8;  // c0 + c is a multiple of 8: the step starts on a byte
        if (at >= bytes) break;                    // columns past the row (never read)
        const int64_t left = bytes - at;
        const __mmask64 live = left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1);
        const __m512i data = _mm512_permutexvar_epi16(d.words, _mm512_maskz_loadu_epi8(live, row + at));
        __m512i e;
        if (d.wide)
            e = _mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_srlv_epi64(data, d.shifts)));
        else
            e = _mm512_srlv_epi32(data, d.shifts);
        const __m512i main = vptq_scaled(_mm512_and_si512(e, mk), scale, shift);
        if (d.wide)
            _mm256_storeu_si256((__m256i*)(idx + c), _mm512_castsi512_si256(main));
        else
            _mm512_storeu_si512((void*)(idx + c), main);
        if (split) {
            const __m512i res = vptq_scaled(_mm512_and_si512(_mm512_srli_epi32(e, cx.bk), mr), scale, shift);
            if (d.wide)
                _mm256_storeu_si256((__m256i*)(ridx + c), _mm512_castsi512_si256(res));
            else
                _mm512_storeu_si512((void*)(ridx + c), res);
        }
    }
}
#else
// AVX2 (tb <= 25): 8 entries a step with one gather of 32-bit windows at the entries' first bytes (lane j: byte
// j * tb / 8 of the step, shifted right by j * tb % 8); steps whose windows would pass the row's end, and the
// scalar variant: one 64-bit window per entry.
struct vptq_decoder {
#if defined(__AVX2__)
    __m256i bytes, shifts;
#endif
    bool gather;
};

static vptq_decoder vptq_decoder_of(int tb) {
    vptq_decoder d;
    d.gather = false;
#if defined(__AVX2__)
    d.gather = tb <= 25;
    int32_t b[8], s8[8];
    for (int j = 0; j < 8; j++) b[j] = (j * tb) / 8, s8[j] = (j * tb) % 8;
    d.bytes = _mm256_loadu_si256((const __m256i*)b);
    d.shifts = _mm256_loadu_si256((const __m256i*)s8);
#endif
    return d;
}

static inline void vptq_decode(const vptq_ctx& cx, const vptq_decoder& d, int64_t i, int64_t c0, int32_t* idx,
                               int32_t* ridx) {
    const uint8_t* row = (const uint8_t*)(cx.p.words + i * cx.Wd);
    const int64_t bytes = cx.Wd * 4, cend = min_i64(VPTQ_COLS, cx.gs - c0);
    const bool split = cx.br && !cx.pairs;
    const uint64_t mask = (((uint64_t)1) << cx.tb) - 1, mk = ((uint64_t)1 << (split ? cx.bk : cx.tb)) - 1,
                   mr = ((uint64_t)1 << cx.br) - 1;  // fmt: skip
    int64_t c = 0;
#if defined(__AVX2__)
    if (d.gather) {
        const __m256i vmk = _mm256_set1_epi32((int32_t)mk), vmr = _mm256_set1_epi32((int32_t)mr);
        const __m256i scale = _mm256_set1_epi32(cx.row_bytes);
        for (; c < cend; c += 8) {
            const int64_t at = (c0 + c) * cx.tb / 8;        // c0 + c is a multiple of 8: the step starts on a byte
            if (at + (7 * cx.tb) / 8 + 4 > bytes) break;  // the last window would pass the row's end
            const __m256i e = _mm256_srlv_epi32(_mm256_i32gather_epi32((const int*)(row + at), d.bytes, 1), d.shifts);
            _mm256_storeu_si256((__m256i*)(idx + c), _mm256_mullo_epi32(_mm256_and_si256(e, vmk), scale));
            if (split)
                _mm256_storeu_si256((__m256i*)(ridx + c),
                                    _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(e, cx.bk), vmr), scale));
        }
    }
#endif
    for (; c < cend; c++) {
        const int64_t pos = (c0 + c) * cx.tb, at = pos >> 3;
        uint64_t bits = 0;
        if (at + 8 <= bytes)
            memcpy(&bits, row + at, 8);
        else
            memcpy(&bits, row + at, (size_t)(bytes - at));  // the row's last bytes (little-endian)
        const uint64_t e = (bits >> (pos & 7)) & mask;
        idx[c] = (int32_t)(e & mk) * cx.row_bytes;
        ridx[c] = (int32_t)((e >> cx.bk) & mr) * cx.row_bytes;
    }
}
#endif
