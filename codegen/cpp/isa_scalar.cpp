// Kernels, portable variant (baseline x86-64 flags, no explicit vector intrinsics).
// Everything ISA-specific lives in namespace qc_scalar so no symbol is shared with another variant.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qc_abi.h"

namespace qc_scalar {
#include "vec_scalar.h"
#include "common.h"
#include "weight_only.h"
#include "w8a8.h"
#include "w4a8.h"
}  // namespace qc_scalar

QC_DEFINE_ABI(scalar)
