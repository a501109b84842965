// C ABI of the qcompile CPU kernels (no torch headers; called from Python through ctypes and from the C++ op).
//
// Every kernel has one signature, int kernel(const qc_call*), and exists once per instruction set. A kernel file
// (kernels/*.h, all of them compiled into every ISA unit) declares each of its kernels once with QC_KERNEL(name,
// function); that fills a table that qc_find_kernel(name, isa) reads. Nothing lists the kernels anywhere else:
// Python fills the same struct (its layout checked against qc_call_layout at load) and looks kernels up by name.
//
// Tensors are raw pointers to contiguous row-major buffers. Activations `x` are float32 or bfloat16 ([M, K],
// `x_bf16` says which); outputs `y` are [M, N] in float32 or bfloat16 (`y_bf16`). `bias` is float32 [N] or NULL.
// `tensors` are the scheme's packed tensors in the order the scheme declares them; `ints` and `floats` carry the
// kernel's own parameters, documented beside the kernel. Every kernel returns 0 on success and 1 when a scratch
// allocation failed.
#pragma once
#include <stdint.h>

#define QC_MAX_TENSORS 8
#define QC_MAX_PARAMS 8

typedef struct qc_call {
    const void* x;
    void* y;
    const float* bias;
    int64_t M, K, N;
    int32_t x_bf16, y_bf16, threads, n_tensors;
    const void* tensors[QC_MAX_TENSORS];
    int64_t ints[QC_MAX_PARAMS];
    double floats[QC_MAX_PARAMS];
} qc_call;

typedef int (*qc_kernel)(const qc_call*);

extern "C" {
// The kernel `name` compiled for `isa` ("scalar", "avx2", "avx512"), or NULL.
qc_kernel qc_find_kernel(const char* name, const char* isa);
// Adds a kernel to the table (called by QC_KERNEL while the library loads); returns its index.
int qc_register_kernel(const char* name, const char* isa, qc_kernel fn);
// The number of kernels in the table, and the name of entry i (for listings and tests).
int qc_kernel_count(void);
const char* qc_kernel_name(int i);
// 1 when this CPU runs the named variant ("scalar", "avx2", "avx512"), else 0.
int qc_cpu_supports(const char* isa);
// qc_call's layout, for the binding's check: i = 0 sizeof, then the offsets of x, y, bias, M, K, N, x_bf16, y_bf16,
// threads, n_tensors, tensors, ints, floats; -1 past the end.
int64_t qc_call_layout(int i);
}

// One declaration per kernel: registers `function` (int function(const qc_call*)) as `name` for the ISA of the
// translation unit (QC_ISA). Use it at namespace scope, after the function.
#define QC_KERNEL(name, function) \
    static const int qc_registered_##name = qc_register_kernel(#name, QC_ISA, &function);
