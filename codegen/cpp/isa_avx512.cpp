// Kernels, AVX-512 F/BW/VL/VNNI variant (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni).
// Everything ISA-specific lives in namespace qc_avx512 so no symbol is shared with another variant.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qc_abi.h"

namespace qc_avx512 {
#include "vec_avx512.h"
#include "common.h"
#include "weight_only.h"
#include "w8a8.h"
#include "w4a8.h"
}  // namespace qc_avx512

QC_DEFINE_ABI(avx512)
