// C ABI of the qcompile CPU kernels (no torch headers; called from Python through ctypes).
//
// Every kernel exists once per instruction set, with the ISA as a name suffix:
//   qc_linear_wo_<isa>, qc_dequant_wo_<isa>, qc_linear_w8a8_<isa>, qc_linear_w4a8_<isa>   for <isa> in {scalar, avx2, avx512}
// The Python side (qcompile.codegen.cpp.library) picks the suffix at run time from qc_cpu_supports().
//
// Tensors are raw pointers to contiguous row-major buffers. Activations `x` are float32 or bfloat16
// ([M, K], `x_bf16` says which); outputs `y` are [M, N] in float32 or bfloat16 (`y_bf16`). `bias` is
// float32 [N] or NULL. Every function returns 0 on success and 1 when a scratch allocation failed.
#pragma once
#include <stdint.h>

#define QC_DECLARE_ABI(isa)                                                                              \
    /* Weight-only W8A16 / W4A16: y = x @ W.T + bias with W = (u - zero) * scale per group.          */ \
    /* qweight: bits=8 -> int8 [N, Kp]; bits=4 -> uint8 [N, Kp/2], element 2j low nibble, 2j+1 high. */ \
    /* scales, zeros: float32 [N, Kp/group_size]; zeros NULL -> zero_const for every group.          */ \
    /* K <= Kp; columns K..Kp are padding and never read against an activation.                      */ \
    int qc_linear_wo_##isa(const void* x, int x_bf16, int64_t M, int64_t K, const void* qweight, int bits,      \
                           int64_t N, int64_t Kp, const float* scales, const float* zeros, float zero_const,    \
                           int64_t group_size, const float* bias, void* y, int y_bf16, int threads);           \
    /* Dequantize rows n0..n1 of a weight-only matrix into float32 out [n1 - n0, K] (padding dropped). */ \
    int qc_dequant_wo_##isa(const void* qweight, int bits, int64_t N, int64_t Kp, int64_t K,                    \
                            const float* scales, const float* zeros, float zero_const, int64_t group_size,      \
                            int64_t n0, int64_t n1, float* out, int threads);                                  \
    /* W8A8: int8 weights [N, K] with float32 scales [N]; activations quantized per token to int8        */ \
    /* (scale = absmax / 127, round half to even, clamp to [-127, 127]); exact int32 dot products.       */ \
    int qc_linear_w8a8_##isa(const void* x, int x_bf16, int64_t M, int64_t K, const int8_t* qweight,          \
                             int64_t N, const float* scales, const float* bias, void* y, int y_bf16,           \
                             int threads);                                                             \
    /* W4A8: int4 weights as for qc_linear_wo (bits 4) x int8 activations quantized per token as for     */ \
    /* qc_linear_w8a8; exact int32 sums per group.                                                       */ \
    int qc_linear_w4a8_##isa(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* qweight,         \
                             int64_t N, int64_t Kp, const float* scales, const float* zeros, float zero_const,  \
                             int64_t group_size, const float* bias, void* y, int y_bf16, int threads);

extern "C" {
QC_DECLARE_ABI(scalar)
QC_DECLARE_ABI(avx2)
QC_DECLARE_ABI(avx512)
// 1 when this CPU runs the named variant ("scalar", "avx2", "avx512"), else 0.
int qc_cpu_supports(const char* isa);
// Bumped whenever the sources change in a way the Python binding must know about.
int qc_abi_version(void);
}

// Defines the extern "C" entry points of one variant by forwarding to its namespace qc_<isa>.
#define QC_DEFINE_ABI(isa)                                                                                   \
    extern "C" int qc_linear_wo_##isa(const void* x, int x_bf16, int64_t M, int64_t K, const void* qweight,     \
                                      int bits, int64_t N, int64_t Kp, const float* scales, const float* zeros, \
                                      float zero_const, int64_t group_size, const float* bias, void* y,         \
                                      int y_bf16, int threads) {                                                \
        return qc_##isa::linear_wo(x, x_bf16, M, K, qweight, bits, N, Kp, scales, zeros, zero_const,            \
                                   group_size, bias, y, y_bf16, threads);                                      \
    }                                                                                                           \
    extern "C" int qc_dequant_wo_##isa(const void* qweight, int bits, int64_t N, int64_t Kp, int64_t K,         \
                                       const float* scales, const float* zeros, float zero_const,               \
                                       int64_t group_size, int64_t n0, int64_t n1, float* out, int threads) {   \
        return qc_##isa::dequant_wo(qweight, bits, N, Kp, K, scales, zeros, zero_const, group_size, n0, n1,     \
                                    out, threads);                                                              \
    }                                                                                                           \
    extern "C" int qc_linear_w8a8_##isa(const void* x, int x_bf16, int64_t M, int64_t K, const int8_t* qweight, \
                                        int64_t N, const float* scales, const float* bias, void* y, int y_bf16, \
                                        int threads) {                                                          \
        return qc_##isa::linear_w8a8(x, x_bf16, M, K, qweight, N, scales, bias, y, y_bf16, threads);           \
    }                                                                                                           \
    extern "C" int qc_linear_w4a8_##isa(const void* x, int x_bf16, int64_t M, int64_t K, const uint8_t* qweight, \
                                        int64_t N, int64_t Kp, const float* scales, const float* zeros,          \
                                        float zero_const, int64_t group_size, const float* bias, void* y,        \
                                        int y_bf16, int threads) {                                               \
        return qc_##isa::linear_w4a8(x, x_bf16, M, K, qweight, N, Kp, scales, zeros, zero_const, group_size,    \
                                     bias, y, y_bf16, threads);                                                  \
    }
