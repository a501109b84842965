// Run-time CPU feature detection and the kernel table (compiled for the baseline x86-64 ISA).
#include <stddef.h>
#include <string.h>

#include "qc_abi.h"

namespace {
constexpr int MAX_KERNELS = 256;
struct Row {
    const char* name;
    const char* isa;
    qc_kernel fn;
};
Row table[MAX_KERNELS];  // zero-initialized before any constructor runs, so registration order does not matter
int rows = 0;
}  // namespace

extern "C" int qc_register_kernel(const char* name, const char* isa, qc_kernel fn) {
    if (rows >= MAX_KERNELS) return -1;
    table[rows] = Row{name, isa, fn};
    return rows++;
}

extern "C" qc_kernel qc_find_kernel(const char* name, const char* isa) {
    for (int i = 0; i < rows; i++)
        if (strcmp(table[i].name, name) == 0 && strcmp(table[i].isa, isa) == 0) return table[i].fn;
    return nullptr;
}

extern "C" int qc_kernel_count(void) { return rows; }

extern "C" const char* qc_kernel_name(int i) { return i >= 0 && i < rows ? table[i].name : nullptr; }

extern "C" int qc_cpu_supports(const char* isa) {
    __builtin_cpu_init();
    if (strcmp(isa, "scalar") == 0) return 1;
    if (strcmp(isa, "avx2") == 0)  // every AVX2 CPU has F16C; the variants convert halves with it
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (strcmp(isa, "avx512") == 0)
        return qc_cpu_supports("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    if (strcmp(isa, "avx512bf16") == 0)  // a feature inside the avx512 variant (kernels with a target attribute)
        return qc_cpu_supports("avx512") && __builtin_cpu_supports("avx512bf16");
    return 0;
}

extern "C" int64_t qc_call_layout(int i) {
    const int64_t layout[] = {
        sizeof(qc_call),           offsetof(qc_call, x),       offsetof(qc_call, y),
        offsetof(qc_call, bias),   offsetof(qc_call, M),       offsetof(qc_call, K),
        offsetof(qc_call, N),      offsetof(qc_call, x_bf16),  offsetof(qc_call, y_bf16),
        offsetof(qc_call, threads), offsetof(qc_call, n_tensors), offsetof(qc_call, tensors),
        offsetof(qc_call, ints),   offsetof(qc_call, floats),
    };
    return i >= 0 && i < (int)(sizeof(layout) / sizeof(layout[0])) ? layout[i] : -1;
}
