// qcompile::linear for CPU tensors as a C++ dispatcher kernel, so a decode-sized call pays for the kernel and
// a few microseconds of dispatch instead of a trip through Python.
//
// The Python side stays the source of truth: the first call of a signature goes to qcompile::_linear_fallback
// (the Python implementation), which validates the packed tensors, picks a kernel row and, when that row is
// a C++ one, hands this file a plan with qcompile_cpu::remember: the kernel's name (found in the kernel library's
// table, qc_abi.h), its parameters, and up to how many tokens it serves a call itself. Later calls of the same
// signature (scheme, K, N, dtypes and shapes of every tensor) run the plan here. Anything else (no plan,
// non-contiguous tensors, a forced ISA this CPU lacks, more tokens than the plan takes) goes to the Python
// implementation, which serves it or raises the error the user should see. No kernel, argument list or
// threshold is named here.
//
// A plan may also carry a GEMM path for calls of more tokens than the direct kernel takes, when that path needs
// nothing but the activation as it is: a dequantization kernel writes slices of weight rows in the activation's
// dtype and at::mm / at::addmm (oneDNN) multiplies each into its columns of the output, as launch.sliced_gemm
// does in Python; an optional prologue kernel first rewrites the activation (same shape and dtype). The Python row decides whether a plan has one (launch.Slices).
//
// Autograd (AutogradCPU): without a gradient to record, redispatch below autograd; with one, call
// qcompile::_linear_train, whose Python autograd formula records the backward.
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
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

const char* const ISAS[] = {"avx512", "avx2", "scalar"};  // best first, as codegen/cpp/library.py

struct Plan {
    qc_kernel fn[3];  // per entry of ISAS
    int64_t ints[QC_MAX_PARAMS];
    double floats[QC_MAX_PARAMS];
    int64_t max_tokens;  // 0: any number
    // the GEMM path beyond max_tokens (gemm[isa] null: none, Python serves those calls)
    qc_kernel gemm[3], prologue[3];  // prologue[isa] null: x as it is
    int64_t gemm_ints[QC_MAX_PARAMS];
    double gemm_floats[QC_MAX_PARAMS];
    int64_t gemm_first, gemm_end, gemm_rows;  // gemm_ints slots of the row range; rows per slice
};

using LinearFn = at::Tensor(const at::Tensor&, at::TensorList, const std::optional<at::Tensor>&, c10::string_view,
                            c10::SymInt, c10::SymInt);

std::string signature(const at::Tensor& x, at::TensorList packed, const std::optional<at::Tensor>& bias,
                      c10::string_view scheme, int64_t out_features) {
    std::string key(scheme.data(), scheme.size());
    auto add = [&key](const at::Tensor* t) {
        key += '|';
        if (t == nullptr || !t->defined()) return;
        key += c10::toString(t->scalar_type());
        for (int64_t s : t->sizes()) key += ',' + std::to_string(s);
    };
    key += '|' + std::to_string(x.size(-1)) + c10::toString(x.scalar_type()) + '|' + std::to_string(out_features);
    for (const at::Tensor& t : packed) add(&t);
    add(bias.has_value() ? &*bias : nullptr);
    return key;
}

std::shared_mutex plans_mutex;
std::unordered_map<std::string, Plan> plans;
std::atomic<bool> enabled{true};
std::atomic<int64_t> fast_calls{0}, fallback_calls{0};

// Index into ISAS; -1 when $QCOMPILE_CPU_ISA names something this CPU cannot run (Python raises).
int active_isa() {
    static const int best = qc_cpu_supports("avx512") ? 0 : (qc_cpu_supports("avx2") ? 1 : 2);
    const char* forced = std::getenv("QCOMPILE_CPU_ISA");
    if (forced == nullptr || forced[0] == '\0') return best;
    std::string name;
    for (const char* c = forced; *c; c++)
        if (*c != ' ' && *c != '\t' && *c != '\n') name += (char)std::tolower((unsigned char)*c);
    if (name.empty()) return best;
    for (int i = 0; i < 3; i++)
        if (name == ISAS[i]) return qc_cpu_supports(ISAS[i]) ? i : -1;
    return -1;
}

at::Tensor fallback(const at::Tensor& x, at::TensorList packed, const std::optional<at::Tensor>& bias,
                    c10::string_view scheme, c10::SymInt in_features, c10::SymInt out_features) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qcompile::_linear_fallback", "").typed<LinearFn>();
    fallback_calls++;
    return op.call(x, packed, bias, scheme, std::move(in_features), std::move(out_features));
}

// Many tokens: slices of weight rows dequantized in x's dtype, each multiplied into its columns of y (a strided
// output: oneDNN takes the row stride); the bias joins inside the GEMM (one rounding, as F.linear).
at::Tensor sliced_gemm(const Plan& plan, int isa, const at::Tensor& x, at::TensorList packed,
                       const std::optional<at::Tensor>& bias, c10::string_view scheme, int64_t M, int64_t K,
                       int64_t N) {
    at::Tensor x2 = x.view({M, K});
    if (plan.prologue[isa] != nullptr) {
        at::Tensor xw = at::empty({M, K}, x.options());
        qc_call pro;
        std::memset(&pro, 0, sizeof(pro));
        pro.x = x2.data_ptr();
        pro.y = xw.data_ptr();
        pro.M = M;
        pro.K = K;
        pro.x_bf16 = pro.y_bf16 = x.scalar_type() == at::kBFloat16;
        pro.threads = at::get_num_threads();
        TORCH_CHECK(plan.prologue[isa](&pro) == 0, "qcompile::linear (", scheme, "): the activation prologue failed");
        x2 = xw;
    }
    at::Tensor y = at::empty({M, N}, x.options());
    const int64_t rows = std::min(N, std::max<int64_t>(1, plan.gemm_rows));
    at::Tensor weight = at::empty({rows, K}, x.options());
    at::Tensor b;
    if (bias.has_value() && bias->defined()) b = bias->to(x.scalar_type());
    qc_call call;
    std::memset(&call, 0, sizeof(call));
    call.y = weight.data_ptr();
    call.K = K;
    call.N = N;
    call.x_bf16 = call.y_bf16 = x.scalar_type() == at::kBFloat16;
    call.threads = at::get_num_threads();
    call.n_tensors = (int32_t)packed.size();
    for (size_t i = 0; i < packed.size(); i++) call.tensors[i] = packed[i].data_ptr();
    std::memcpy(call.ints, plan.gemm_ints, sizeof(call.ints));
    std::memcpy(call.floats, plan.gemm_floats, sizeof(call.floats));
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n1 = std::min(N, n0 + rows);
        call.ints[plan.gemm_first] = n0;
        call.ints[plan.gemm_end] = n1;
        TORCH_CHECK(plan.gemm[isa](&call) == 0, "qcompile::linear (", scheme, "): no memory for scratch buffers (M=",
                    M, ", K=", K, ", N=", N, ")");
        at::Tensor out = n1 - n0 == N ? y : y.narrow(1, n0, n1 - n0);
        const at::Tensor w = weight.narrow(0, 0, n1 - n0).t();
        if (b.defined())
            at::addmm_out(out, b.narrow(0, n0, n1 - n0), x2, w);
        else
            at::mm_out(out, x2, w);
    }
    std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
    out_sizes.back() = N;
    fast_calls++;
    return y.view(out_sizes);
}

at::Tensor linear_cpu(const at::Tensor& x, at::TensorList packed, const std::optional<at::Tensor>& bias,
                      c10::string_view scheme, c10::SymInt in_features, c10::SymInt out_features) {
    const bool has_bias = bias.has_value() && bias->defined();
    const int64_t N = out_features.expect_int();
    if (!enabled.load(std::memory_order_relaxed) || x.dim() < 1 || x.numel() == 0 ||
        x.size(-1) != in_features.expect_int() || packed.size() > QC_MAX_TENSORS)
        return fallback(x, packed, bias, scheme, in_features, out_features);
    const int64_t K = x.size(-1), M = x.numel() / K;
    const bool bf16 = x.scalar_type() == at::kBFloat16;
    bool dense = x.is_contiguous() && (!has_bias || bias->is_floating_point());
    for (const at::Tensor& t : packed) dense = dense && t.is_contiguous();
    const int isa = active_isa();
    if (!dense || !(bf16 || x.scalar_type() == at::kFloat) || isa < 0)
        return fallback(x, packed, bias, scheme, in_features, out_features);
    Plan plan;
    {
        const std::string key = signature(x, packed, bias, scheme, N);
        std::shared_lock<std::shared_mutex> lock(plans_mutex);
        auto found = plans.find(key);
        if (found == plans.end()) {
            lock.unlock();
            return fallback(x, packed, bias, scheme, in_features, out_features);
        }
        plan = found->second;
    }
    if (plan.max_tokens > 0 && M > plan.max_tokens && plan.gemm[isa] != nullptr)
        return sliced_gemm(plan, isa, x, packed, bias, scheme, M, K, N);
    if ((plan.max_tokens > 0 && M > plan.max_tokens) || plan.fn[isa] == nullptr)
        return fallback(x, packed, bias, scheme, in_features, out_features);
    std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
    out_sizes.back() = N;
    at::Tensor y = at::empty(out_sizes, x.options());
    at::Tensor bias32;  // the kernels add a float32 bias (a bfloat16 model's bias is widened, N values)
    if (has_bias) bias32 = bias->scalar_type() == at::kFloat ? bias->contiguous() : bias->to(at::kFloat).contiguous();
    qc_call call;
    std::memset(&call, 0, sizeof(call));
    call.x = x.data_ptr();
    call.y = y.data_ptr();
    call.bias = has_bias ? bias32.data_ptr<float>() : nullptr;
    call.M = M;
    call.K = K;
    call.N = N;
    call.x_bf16 = call.y_bf16 = bf16;
    call.threads = at::get_num_threads();
    call.n_tensors = (int32_t)packed.size();
    for (size_t i = 0; i < packed.size(); i++) call.tensors[i] = packed[i].data_ptr();
    std::memcpy(call.ints, plan.ints, sizeof(call.ints));
    std::memcpy(call.floats, plan.floats, sizeof(call.floats));
    const int rc = plan.fn[isa](&call);
    TORCH_CHECK(rc == 0, "qcompile::linear (", scheme, "): no memory for scratch buffers (M=", M, ", K=", K,
                ", N=", N, ")");
    fast_calls++;
    return y;
}

at::Tensor linear_autograd_cpu(c10::DispatchKeySet keys, const at::Tensor& x, at::TensorList packed,
                               const std::optional<at::Tensor>& bias, c10::string_view scheme,
                               c10::SymInt in_features, c10::SymInt out_features) {
    const bool wants_grad = c10::GradMode::is_enabled() &&
                            (x.requires_grad() || (bias.has_value() && bias->defined() && bias->requires_grad()));
    if (wants_grad) {
        static auto train =
            c10::Dispatcher::singleton().findSchemaOrThrow("qcompile::_linear_train", "").typed<LinearFn>();
        return train.call(x, packed, bias, scheme, std::move(in_features), std::move(out_features));
    }
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("qcompile::linear", "").typed<LinearFn>();
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.redispatch(keys & c10::after_autograd_keyset, x, packed, bias, scheme, std::move(in_features),
                         std::move(out_features));
}

void remember(const at::Tensor& x, at::TensorList packed, const std::optional<at::Tensor>& bias,
              c10::string_view scheme, int64_t out_features, c10::string_view kernel, at::IntArrayRef ints,
              at::ArrayRef<double> floats, int64_t max_tokens, c10::string_view gemm_kernel, at::IntArrayRef gemm_ints,
              at::ArrayRef<double> gemm_floats, at::IntArrayRef gemm_slots, int64_t gemm_rows,
              c10::string_view gemm_prologue) {
    TORCH_CHECK(ints.size() <= QC_MAX_PARAMS && floats.size() <= QC_MAX_PARAMS && gemm_ints.size() <= QC_MAX_PARAMS &&
                    gemm_floats.size() <= QC_MAX_PARAMS,
                "qcompile_cpu::remember: at most ", QC_MAX_PARAMS, " parameters of each kind");
    Plan plan;
    std::memset(&plan, 0, sizeof(plan));
    const std::string name(kernel.data(), kernel.size());
    for (int i = 0; i < 3; i++) plan.fn[i] = qc_find_kernel(name.c_str(), ISAS[i]);
    TORCH_CHECK(plan.fn[2] != nullptr, "qcompile_cpu::remember: the kernel library has no kernel ", name);
    for (size_t i = 0; i < ints.size(); i++) plan.ints[i] = ints[i];
    for (size_t i = 0; i < floats.size(); i++) plan.floats[i] = floats[i];
    plan.max_tokens = max_tokens;
    if (!gemm_kernel.empty()) {
        const std::string gemm(gemm_kernel.data(), gemm_kernel.size());
        TORCH_CHECK(gemm_slots.size() == 2 && gemm_slots[0] >= 0 && gemm_slots[0] < QC_MAX_PARAMS &&
                        gemm_slots[1] >= 0 && gemm_slots[1] < QC_MAX_PARAMS && gemm_rows > 0,
                    "qcompile_cpu::remember: the GEMM path needs two row-range slots below ", QC_MAX_PARAMS,
                    " and a positive slice height");
        for (int i = 0; i < 3; i++) plan.gemm[i] = qc_find_kernel(gemm.c_str(), ISAS[i]);
        TORCH_CHECK(plan.gemm[2] != nullptr, "qcompile_cpu::remember: the kernel library has no kernel ", gemm);
        for (size_t i = 0; i < gemm_ints.size(); i++) plan.gemm_ints[i] = gemm_ints[i];
        for (size_t i = 0; i < gemm_floats.size(); i++) plan.gemm_floats[i] = gemm_floats[i];
        plan.gemm_first = gemm_slots[0];
        plan.gemm_end = gemm_slots[1];
        plan.gemm_rows = gemm_rows;
        if (!gemm_prologue.empty()) {
            const std::string pro(gemm_prologue.data(), gemm_prologue.size());
            for (int i = 0; i < 3; i++) plan.prologue[i] = qc_find_kernel(pro.c_str(), ISAS[i]);
            TORCH_CHECK(plan.prologue[2] != nullptr, "qcompile_cpu::remember: the kernel library has no kernel ", pro);
        }
    }
    const std::string key = signature(x, packed, bias, scheme, out_features);
    std::unique_lock<std::shared_mutex> lock(plans_mutex);
    plans[key] = plan;
}

void forget() {
    std::unique_lock<std::shared_mutex> lock(plans_mutex);
    plans.clear();
}

void set_enabled(bool on) { enabled.store(on); }

std::vector<int64_t> stats() { return {fast_calls.load(), fallback_calls.load(), (int64_t)plans.size()}; }

}  // namespace

TORCH_LIBRARY(qcompile_cpu, m) {
    m.def("remember(Tensor x, Tensor[] packed, Tensor? bias, str scheme, int out_features, str kernel, int[] ints, "
          "float[] floats, int max_tokens, str gemm_kernel=\"\", int[] gemm_ints=[], float[] gemm_floats=[], "
          "int[] gemm_slots=[], int gemm_rows=0, str gemm_prologue=\"\") -> ()",
          &remember);
    m.def("forget() -> ()", &forget);
    m.def("set_enabled(bool on) -> ()", &set_enabled);
    m.def("stats() -> int[]", &stats);
}

TORCH_LIBRARY_IMPL(qcompile, CPU, m) { m.impl("linear", &linear_cpu); }

TORCH_LIBRARY_IMPL(qcompile, AutogradCPU, m) { m.impl("linear", &linear_autograd_cpu); }
