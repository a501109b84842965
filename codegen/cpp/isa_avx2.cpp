// Kernels, AVX2 + FMA variant (compiled with -mavx2 -mfma).
// Everything ISA-specific lives in namespace qc_avx2 so no symbol is shared with another variant.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qc_abi.h"

namespace qc_avx2 {
#include "vec_avx2.h"
#include "common.h"
#include "weight_only.h"
#include "w8a8.h"
#include "w4a8.h"
}  // namespace qc_avx2

QC_DEFINE_ABI(avx2)
