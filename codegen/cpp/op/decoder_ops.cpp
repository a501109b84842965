// Small fused float ops for qcompile.decoder.Decoder on CPU tensors (one dispatcher call where torch's composite
// ops issue a dozen: F.rms_norm runs about twenty aten ops on CPU).
//
//   qcompile_cpu::rms_norm(x [..., C], weight [C], eps) -> y [..., C]
//       y = weight * (x * rsqrt(mean(x^2) + eps)) per row, float32 arithmetic; for bfloat16 tensors the normalised
//       row is rounded to bfloat16 before the weight multiplies it, and the product rounded again (transformers'
//       LlamaRMSNorm: `weight * hidden.to(input_dtype)`).
//   qcompile_cpu::rope_(qkv [B, T, W], cos [T, D], sin [T, D], heads) -> ()   (in place)
//       the first `heads` head vectors of D channels of every token: x * cos + rotate_half(x) * sin with
//       rotate_half(x) = cat(-x[D/2:], x[:D/2]) (transformers' apply_rotary_pos_emb), float32 arithmetic.
//   qcompile_cpu::add_rms_norm(x, delta, weight, eps) -> (x + delta, rms_norm(x + delta))
//       the residual add (rounded to the dtype, as torch's add) and the next RMSNorm in one call.
//   qcompile_cpu::silu_mul(gu [..., 2F]) -> silu(gu[..., :F]) * gu[..., F:]   (F.silu(g) * u: silu rounded, then
//       the product)
//   qcompile_cpu::decode_attention(qkv [B, 1, (H + 2 KV) D], keys [B, KV, L, D], values [B, KV, L, D], start, H, KV,
//                                  scale) -> out [B, 1, H D]
//       one decode position (its query and key heads already rotated): the key and value heads written to the caches
//       at `start`, then softmax(q . k_t * scale) over t = 0..start and the weighted sum of the values, per query head
//       (query head h reads key/value head h / (H / KV), as F.scaled_dot_product_attention with enable_gqa), float32
//       arithmetic, the output rounded once. One call where the step otherwise runs about a dozen ops a layer.
// float32 or bfloat16, contiguous, one dtype throughout; anything else is refused with the reason.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <cstring>
#include <vector>

namespace {

template <class T>
float to_f(T v) {
    return static_cast<float>(v);
}

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* what) {
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", what, " is ", b.scalar_type(), ", expected ",
                a.scalar_type());
    TORCH_CHECK(b.is_contiguous() && b.device().is_cpu(), op, ": ", what, " must be a contiguous CPU tensor");
}

void check_input(const at::Tensor& x, const char* op) {
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), op, ": x must be a contiguous CPU tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": x is ", x.scalar_type(),
                " (float32 or bfloat16)");
}

template <class T>
void rms_rows(const T* x, const T* w, T* y, int64_t rows, int64_t c, double eps) {
    at::parallel_for(0, rows, rows >= 64 ? 16 : rows, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++) {
            const T* xr = x + r * c;
            T* yr = y + r * c;
            float sum = 0.0f;
            for (int64_t i = 0; i < c; i++) sum += to_f(xr[i]) * to_f(xr[i]);
            const float scale = 1.0f / std::sqrt(sum / (float)c + (float)eps);
            for (int64_t i = 0; i < c; i++) yr[i] = static_cast<T>(to_f(w[i]) * to_f(static_cast<T>(to_f(xr[i]) * scale)));
        }
    });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
    check_input(x, "qcompile_cpu::rms_norm");
    check_same(x, weight, "qcompile_cpu::rms_norm", "weight");
    const int64_t c = x.size(-1);
    TORCH_CHECK(weight.dim() == 1 && weight.size(0) == c, "qcompile_cpu::rms_norm: weight is ", weight.sizes(),
                ", expected [", c, "]");
    at::Tensor y = at::empty_like(x);
    const int64_t rows = c ? x.numel() / c : 0;
    if (x.scalar_type() == at::kFloat)
        rms_rows(x.data_ptr<float>(), weight.data_ptr<float>(), y.data_ptr<float>(), rows, c, eps);
    else
        rms_rows(x.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows,
                 c, eps);
    return y;
}

template <class T>
void rope_rows(T* q, const T* cos, const T* sin, int64_t b, int64_t t, int64_t w, int64_t heads, int64_t d) {
    const int64_t half = d / 2;
    for (int64_t i = 0; i < b * t; i++) {
        const T* c = cos + (i % t) * d;
        const T* s = sin + (i % t) * d;
        for (int64_t h = 0; h < heads; h++) {
            T* x = q + i * w + h * d;
            for (int64_t j = 0; j < half; j++) {
                const float lo = to_f(x[j]), hi = to_f(x[j + half]);
                x[j] = static_cast<T>(lo * to_f(c[j]) - hi * to_f(s[j]));
                x[j + half] = static_cast<T>(hi * to_f(c[j + half]) + lo * to_f(s[j + half]));
            }
        }
    }
}

void rope_(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
    const char* op = "qcompile_cpu::rope_";
    check_input(qkv, op);
    check_same(qkv, cos, op, "cos");
    check_same(qkv, sin, op, "sin");
    TORCH_CHECK(qkv.dim() == 3 && cos.dim() == 2 && cos.sizes() == sin.sizes(), op, ": qkv ", qkv.sizes(), ", cos ",
                cos.sizes(), ", sin ", sin.sizes(), " (expected [B, T, W], [T, D], [T, D])");
    const int64_t b = qkv.size(0), t = qkv.size(1), w = qkv.size(2), d = cos.size(1);
    TORCH_CHECK(cos.size(0) == t && d % 2 == 0 && heads >= 0 && heads * d <= w, op, ": ", heads, " heads of ", d,
                " channels over qkv ", qkv.sizes(), " with cos ", cos.sizes());
    if (qkv.scalar_type() == at::kFloat)
        rope_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), b, t, w, heads, d);
    else
        rope_rows(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(), sin.data_ptr<c10::BFloat16>(), b, t,
                  w, heads, d);
}


// float32 dot product and y += a * x over n elements in 16-lane vectors; compiled for AVX-512, AVX2 + FMA and plain
// x86-64, the best one chosen when the library loads (target_clones).
typedef float v16sf __attribute__((vector_size(64)));
#define QC_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))

QC_CLONES float dot_f32(const float* a, const float* b, int64_t n) {
    v16sf acc = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16sf x, y;
        memcpy(&x, a + i, sizeof(x));
        memcpy(&y, b + i, sizeof(y));
        acc += x * y;
    }
    float s = 0.0f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}

QC_CLONES void axpy_f32(float* y, float a, const float* x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16sf vx, vy;
        memcpy(&vx, x + i, sizeof(vx));
        memcpy(&vy, y + i, sizeof(vy));
        vy += a * vx;
        memcpy(y + i, &vy, sizeof(vy));
    }
    for (; i < n; i++) y[i] += a * x[i];
}

// `n` cache values as float32: the values themselves, or converted into `scratch`.
const float* as_f32(const float* p, int64_t, std::vector<float>&) { return p; }
const float* as_f32(const c10::BFloat16* p, int64_t n, std::vector<float>& scratch) {
    scratch.resize(n);
    for (int64_t i = 0; i < n; i++) scratch[i] = static_cast<float>(p[i]);
    return scratch.data();
}

// One decode position per row: the new key and value heads of `qkv` written to the caches at `start`, then each
// query head attends over positions 0..start of its key/value head (heads / kv_heads query heads share one).
template <class T>
void decode_attention_rows(const T* qkv, T* keys, T* values, T* out, int64_t b, int64_t w, int64_t lmax,
                           int64_t start, int64_t heads, int64_t kv_heads, int64_t d, double scale) {
    const int64_t group = heads / kv_heads, len = start + 1;
    for (int64_t i = 0; i < b; i++)
        for (int64_t j = 0; j < kv_heads; j++) {
            const T* k = qkv + i * w + (heads + j) * d;
            const T* v = qkv + i * w + (heads + kv_heads + j) * d;
            const int64_t at = ((i * kv_heads + j) * lmax + start) * d;
            for (int64_t e = 0; e < d; e++) keys[at + e] = k[e], values[at + e] = v[e];
        }
    // one task per key/value head (its cache converted once for the query heads that share it); threads only where
    // the work pays for them (a few thousand multiply-adds a head is less than a thread's wake-up)
    at::parallel_for(0, b * kv_heads, group * len * d >= (1 << 14) ? 1 : b * kv_heads, [&](int64_t p0, int64_t p1) {
        std::vector<float> kf, vf, qf(d), score(len), acc(d);
        for (int64_t p = p0; p < p1; p++) {
            const int64_t i = p / kv_heads, j = p % kv_heads;
            const float* kc = as_f32(keys + (i * kv_heads + j) * lmax * d, len * d, kf);
            const float* vc = as_f32(values + (i * kv_heads + j) * lmax * d, len * d, vf);
            for (int64_t h = j * group; h < (j + 1) * group; h++) {
                const T* q = qkv + i * w + h * d;
                for (int64_t e = 0; e < d; e++) qf[e] = to_f(q[e]);
                float top = -INFINITY;
                for (int64_t t = 0; t < len; t++) {
                    score[t] = dot_f32(qf.data(), kc + t * d, d) * (float)scale;
                    top = std::max(top, score[t]);
                }
                float total = 0.0f;
                for (int64_t t = 0; t < len; t++) total += score[t] = std::exp(score[t] - top);
                std::fill(acc.begin(), acc.end(), 0.0f);
                for (int64_t t = 0; t < len; t++) axpy_f32(acc.data(), score[t] / total, vc + t * d, d);
                T* o = out + i * heads * d + h * d;
                for (int64_t e = 0; e < d; e++) o[e] = static_cast<T>(acc[e]);
            }
        }
    });
}

at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor keys, at::Tensor values, int64_t start, int64_t heads,
                            int64_t kv_heads, double scale) {
    const char* op = "qcompile_cpu::decode_attention";
    check_input(qkv, op);
    check_same(qkv, keys, op, "keys");
    check_same(qkv, values, op, "values");
    TORCH_CHECK(qkv.dim() == 3 && qkv.size(1) == 1 && keys.dim() == 4 && keys.sizes() == values.sizes(), op, ": qkv ",
                qkv.sizes(), ", keys ", keys.sizes(), ", values ", values.sizes(),
                " (expected [B, 1, W] and two [B, KV, L, D])");
    const int64_t b = qkv.size(0), w = qkv.size(2), lmax = keys.size(2), d = keys.size(3);
    TORCH_CHECK(keys.size(0) == b && keys.size(1) == kv_heads && kv_heads > 0 && heads % kv_heads == 0 &&
                    (heads + 2 * kv_heads) * d == w && start >= 0 && start < lmax,
                op, ": ", heads, " query and ", kv_heads, " key/value heads of ", d, " channels at position ", start,
                " do not fit qkv ", qkv.sizes(), " and caches ", keys.sizes());
    at::Tensor out = at::empty({b, 1, heads * d}, qkv.options());
    if (qkv.scalar_type() == at::kFloat)
        decode_attention_rows(qkv.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(),
                              out.data_ptr<float>(), b, w, lmax, start, heads, kv_heads, d, scale);
    else
        decode_attention_rows(qkv.data_ptr<c10::BFloat16>(), keys.data_ptr<c10::BFloat16>(),
                              values.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), b, w, lmax, start,
                              heads, kv_heads, d, scale);
    return out;
}


// sum = x + delta (rounded to the dtype, as torch's add), then rms_norm of sum, per row.
template <class T>
void add_rms_rows(const T* x, const T* delta, const T* w, T* sum, T* y, int64_t rows, int64_t c, double eps) {
    at::parallel_for(0, rows, rows >= 64 ? 16 : rows, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t i = 0; i < c; i++) sum[r * c + i] = static_cast<T>(to_f(x[r * c + i]) + to_f(delta[r * c + i]));
    });
    rms_rows(sum, w, y, rows, c, eps);
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
    const char* op = "qcompile_cpu::add_rms_norm";
    check_input(x, op);
    check_same(x, delta, op, "delta");
    check_same(x, weight, op, "weight");
    const int64_t c = x.size(-1);
    TORCH_CHECK(delta.sizes() == x.sizes() && weight.dim() == 1 && weight.size(0) == c, op, ": x ", x.sizes(),
                ", delta ", delta.sizes(), ", weight ", weight.sizes(), " (expected equal shapes and [", c, "])");
    at::Tensor sum = at::empty_like(x), y = at::empty_like(x);
    const int64_t rows = c ? x.numel() / c : 0;
    if (x.scalar_type() == at::kFloat)
        add_rms_rows(x.data_ptr<float>(), delta.data_ptr<float>(), weight.data_ptr<float>(), sum.data_ptr<float>(),
                     y.data_ptr<float>(), rows, c, eps);
    else
        add_rms_rows(x.data_ptr<c10::BFloat16>(), delta.data_ptr<c10::BFloat16>(), weight.data_ptr<c10::BFloat16>(),
                     sum.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>(), rows, c, eps);
    return {sum, y};
}

// out[..., f] = silu(gu[..., f]) * gu[..., F + f] for gu [..., 2F]: silu rounded to the dtype, then the product, as
// F.silu(g) * u.
template <class T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t f) {
    at::parallel_for(0, rows, rows >= 64 ? 16 : rows, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; r++)
            for (int64_t i = 0; i < f; i++) {
                const float g = to_f(gu[r * 2 * f + i]);
                const T act = static_cast<T>(g / (1.0f + std::exp(-g)));
                out[r * f + i] = static_cast<T>(to_f(act) * to_f(gu[r * 2 * f + f + i]));
            }
    });
}

at::Tensor silu_mul(const at::Tensor& gu) {
    const char* op = "qcompile_cpu::silu_mul";
    check_input(gu, op);
    const int64_t c = gu.size(-1);
    TORCH_CHECK(c % 2 == 0, op, ": gu is ", gu.sizes(), " (expected [..., 2F])");
    std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
    shape.back() = c / 2;
    at::Tensor out = at::empty(shape, gu.options());
    const int64_t rows = c ? gu.numel() / c : 0;
    if (gu.scalar_type() == at::kFloat)
        silu_mul_rows(gu.data_ptr<float>(), out.data_ptr<float>(), rows, c / 2);
    else
        silu_mul_rows(gu.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, c / 2);
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qcompile_cpu, m) {
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
    m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads) -> ()", &rope_);
    m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
    m.def("silu_mul(Tensor gu) -> Tensor", &silu_mul);
    m.def("decode_attention(Tensor qkv, Tensor(a!) keys, Tensor(b!) values, int start, int heads, int kv_heads, "
          "float scale) -> Tensor",
          &decode_attention);
}
