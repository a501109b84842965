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
// float32 or bfloat16, contiguous, one dtype throughout; anything else is refused with the reason.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cmath>

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(qcompile_cpu, m) {
    m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
    m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads) -> ()", &rope_);
}
