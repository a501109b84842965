// Run-time CPU feature detection for the per-ISA kernel variants (compiled for the baseline x86-64 ISA).
#include <string.h>

#include "qc_abi.h"

extern "C" int qc_cpu_supports(const char* isa) {
    __builtin_cpu_init();
    if (strcmp(isa, "scalar") == 0) return 1;
    if (strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (strcmp(isa, "avx512") == 0)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    return 0;
}

extern "C" int qc_abi_version(void) { return 1; }
