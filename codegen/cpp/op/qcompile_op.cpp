// qcompile::linear for CPU tensors as a C++ dispatcher kernel, so a decode-sized call pays for the kernel and
// a few microseconds of dispatch instead of a trip through Python.
//
// The Python side stays the source of truth: the first call of a signature goes to qcompile::_linear_fallback
// (the Python implementation), which validates the packed tensors, picks a kernel row and, when that row is
// a C++ one, hands this file a plan with qcompile_cpu::remember. Later calls of the same signature (scheme,
// K, dtypes and shapes of every tensor) with fewer than GEMM_MIN_TOKENS tokens run the plan here. Anything
// else (no plan, non-contiguous tensors, a forced ISA this CPU lacks, many tokens) goes to the Python
// implementation, which serves it or raises the error the user should see.
//
// Autograd (AutogradCPU): without a gradient to record, redispatch below autograd; with one, call
// qcompile::_linear_train, whose Python autograd formula records the backward.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>

#include "../qc_abi.h"

namespace {

constexpr int64_t GEMM_MIN_TOKENS = 256;  // same constant as codegen/cpp/kernels.py
enum Kind : int64_t { WEIGHT_ONLY = 0, W8A8 = 1, W4A8 = 2 };

struct Plan {
    int64_t kind, bits, kp, group;
    double zero_const;
};

using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, c10::string_view);

std::string signature(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                      c10::string_view scheme) {
    std::string key(scheme.data(), scheme.size());
    auto add = [&key](const at::Tensor* t) {
        key += '|';
        if (t == nullptr || !t->defined()) return;
        key += c10::toString(t->scalar_type());
        for (int64_t s : t->sizes()) key += ',' + std::to_string(s);
    };
    key += '|' + std::to_string(x.size(-1)) + c10::toString(x.scalar_type());
    add(&qweight);
    add(&scales);
    add(zeros.has_value() ? &*zeros : nullptr);
    add(bias.has_value() ? &*bias : nullptr);
    return key;
}

std::shared_mutex plans_mutex;
std::unordered_map<std::string, Plan> plans;
std::atomic<bool> enabled{true};
std::atomic<int64_t> fast_calls{0}, fallback_calls{0};

// 0 avx512, 1 avx2, 2 scalar; -1 when $QCOMPILE_CPU_ISA names something this CPU cannot run (Python raises).
int active_isa() {
    static const int best = qc_cpu_supports("avx512") ? 0 : (qc_cpu_supports("avx2") ? 1 : 2);
    const char* forced = std::getenv("QCOMPILE_CPU_ISA");
    if (forced == nullptr || forced[0] == '\0') return best;
    std::string name;
    for (const char* c = forced; *c; c++)
        if (*c != ' ' && *c != '\t' && *c != '\n') name += (char)std::tolower((unsigned char)*c);
    if (name.empty()) return best;
    static const char* names[] = {"avx512", "avx2", "scalar"};
    for (int i = 0; i < 3; i++)
        if (name == names[i]) return qc_cpu_supports(names[i]) ? i : -1;
    return -1;
}

bool dense(const at::Tensor& t) { return t.is_contiguous(); }

at::Tensor fallback(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                    c10::string_view scheme) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qcompile::_linear_fallback", "").typed<LinearFn>();
    fallback_calls++;
    return op.call(x, qweight, scales, zeros, bias, scheme);
}

at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias,
                      c10::string_view scheme) {
    const bool has_zeros = zeros.has_value() && zeros->defined();
    const bool has_bias = bias.has_value() && bias->defined();
    if (!enabled.load(std::memory_order_relaxed) || x.dim() < 1 || x.numel() == 0 || qweight.dim() != 2 ||
        scales.dim() < 1)
        return fallback(x, qweight, scales, zeros, bias, scheme);
    const int64_t K = x.size(-1), N = scales.size(0), M = x.numel() / K;
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    if (M >= GEMM_MIN_TOKENS || !(bf16 || x.scalar_type() == at::kFloat) || !dense(x) || !dense(qweight) ||
        !dense(scales) || (has_zeros && !dense(*zeros)) || (has_bias && !bias->is_floating_point()))
        return fallback(x, qweight, scales, zeros, bias, scheme);
    const int isa = active_isa();
    if (isa < 0) return fallback(x, qweight, scales, zeros, bias, scheme);
    Plan plan;
    {
        const std::string key = signature(x, qweight, scales, zeros, bias, scheme);
        std::shared_lock<std::shared_mutex> lock(plans_mutex);
        auto found = plans.find(key);
        if (found == plans.end()) {
            lock.unlock();
            return fallback(x, qweight, scales, zeros, bias, scheme);
        }
        plan = found->second;
    }
    std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
    out_sizes.back() = N;
    at::Tensor y = at::empty(out_sizes, x.options());
    const float* zp = has_zeros ? zeros->data_ptr<float>() : nullptr;
    at::Tensor bias32;  // the kernels add a float32 bias (a bfloat16 model's bias is widened, N values)
    if (has_bias) bias32 = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat).contiguous();
    const float* bp = has_bias ? bias32.data_ptr<float>() : nullptr;
    const int threads = at::get_num_threads();
    int rc;
    if (plan.kind == WEIGHT_ONLY) {
        auto fn = isa == 0 ? qc_linear_wo_avx512 : (isa == 1 ? qc_linear_wo_avx2 : qc_linear_wo_scalar);
        rc = fn(x.data_ptr(), bf16, M, K, qweight.data_ptr(), (int)plan.bits, N, plan.kp, scales.data_ptr<float>(),
                zp, (float)plan.zero_const, plan.group, bp, y.data_ptr(), bf16, threads);
    } else if (plan.kind == W4A8) {
        auto fn = isa == 0 ? qc_linear_w4a8_avx512 : (isa == 1 ? qc_linear_w4a8_avx2 : qc_linear_w4a8_scalar);
        rc = fn(x.data_ptr(), bf16, M, K, (const uint8_t*)qweight.data_ptr(), N, plan.kp, scales.data_ptr<float>(),
                zp, (float)plan.zero_const, plan.group, bp, y.data_ptr(), bf16, threads);
    } else {
        auto fn = isa == 0 ? qc_linear_w8a8_avx512 : (isa == 1 ? qc_linear_w8a8_avx2 : qc_linear_w8a8_scalar);
        rc = fn(x.data_ptr(), bf16, M, K, (const int8_t*)qweight.data_ptr(), N, scales.data_ptr<float>(), bp,
                y.data_ptr(), bf16, threads);
    }
    TORCH_CHECK(rc == 0, "qcompile::linear (", scheme, "): no memory for scratch buffers (M=", M, ", K=", K,
                ", N=", N, ")");
    fast_calls++;
    return y;
}

at::Tensor linear_autograd_cpu(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& qweight,
                               const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                               const std::optional<at::Tensor>& bias, c10::string_view scheme) {
    const bool wants_grad = c10::GradMode::is_enabled() &&
                            (x.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad()));
    if (wants_grad) {
        static auto train =
            c10::Dispatcher::singleton().findSchemaOrThrow("qcompile::_linear_train", "").typed<LinearFn>();
        return train.call(x, qweight, scales, zeros, bias, scheme);
    }
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qcompile::linear", "").typed<LinearFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.redispatch(keys & c10::after_autograd_keyset, x, qweight, scales, zeros, bias, scheme);
}

void remember(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
              const std::optional<at::Tensor>& zeros, const std::optional<at::Tensor>& bias, c10::string_view scheme,
              int64_t kind, int64_t bits, int64_t kp, int64_t group, double zero_const) {
    TORCH_CHECK(kind == WEIGHT_ONLY || kind == W8A8 || kind == W4A8, "qcompile_cpu::remember: unknown kind ", kind);
    const std::string key = signature(x, qweight, scales, zeros, bias, scheme);
    std::unique_lock<std::shared_mutex> lock(plans_mutex);
    plans[key] = Plan{kind, bits, kp, group, zero_const};
}

void forget() {
    std::unique_lock<std::shared_mutex> lock(plans_mutex);
    plans.clear();
}

void set_enabled(bool on) { enabled.store(on); }

std::vector<int64_t> stats() { return {fast_calls.load(), fallback_calls.load(), (int64_t)plans.size()}; }

}  // namespace

TORCH_LIBRARY(qcompile_cpu, m) {
    m.def("remember(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, str scheme, int kind, "
          "int bits, int kp, int group, float zero_const) -> ()",
          &remember);
    m.def("forget() -> ()", &forget);
    m.def("set_enabled(bool on) -> ()", &set_enabled);
    m.def("stats() -> int[]", &stats);
}

TORCH_LIBRARY_IMPL(qcompile, CPU, m) { m.impl("linear", &linear_cpu); }

TORCH_LIBRARY_IMPL(qcompile, AutogradCPU, m) { m.impl("linear", &linear_autograd_cpu); }
