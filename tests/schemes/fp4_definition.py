"""The FP4 formats written out from their published definitions, one scalar at a time, for the tests to compare
against (nothing here calls qcompile).

* E2M1 (OCP MX v1.0, 4-bit float): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6; round to nearest, ties to the value with
  an even mantissa bit, saturate at 6; code = sign << 3 | index.
* E8M0: 2**(s - 127); MX shared exponent = floor(log2(amax)) - emax(E2M1) with emax = 2.
* E4M3 (fn): bias 7, 3 mantissa bits, subnormals 2**-6 * m/8, largest 448, no infinities.
* Sylvester Hadamard: H[i, j] = (-1)**popcount(i & j) / sqrt(h).

Scale arithmetic follows the schemes' documented float32 operations: a float64 operation on float32 inputs rounded
once to float32 is the correctly rounded float32 result (53 >= 2 * 24 + 2), so ``f32(a / b)`` below is exact.
"""

from __future__ import annotations

import math

import numpy as np

LEVELS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def f32(value: float) -> float:
    return float(np.float32(value))


def e2m1_code(value: float) -> int:
    """Nearest level by brute force; a tie goes to the even index (mantissa bit 0)."""
    magnitude = abs(value)
    best = min(range(8), key=lambda i: (abs(LEVELS[i] - magnitude), i % 2))
    sign = 1 if math.copysign(1.0, value) < 0 else 0
    return sign << 3 | best


def e2m1_value(code: int) -> float:
    return (-1.0 if code & 8 else 1.0) * LEVELS[code & 7]


def e4m3_values() -> list[tuple[int, float]]:
    """(bits, value) of every non-negative finite e4m3fn value."""
    out = []
    for bits in range(0x7F):  # 0x7F is NaN
        e, m = bits >> 3, bits & 7
        out.append((bits, m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)))
    return out


E4M3 = e4m3_values()


def e4m3_round(value: float) -> float:
    """Nearest non-negative e4m3 value (ties to the even bit pattern), saturating at 448."""
    value = min(value, 448.0)
    return min(E4M3, key=lambda bv: (abs(bv[1] - value), bv[0] % 2))[1]


def hadamard(size: int) -> np.ndarray:
    i = np.arange(size)
    parity = np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :])
    return np.where(parity == 1, -1.0, 1.0) / math.sqrt(size)


def padded_rotated(w: np.ndarray, kp: int, size: int | None) -> np.ndarray:
    """float64 rows zero-padded to ``kp`` and multiplied by the block-diagonal Hadamard of ``size``."""
    out = np.zeros((w.shape[0], kp))
    out[:, : w.shape[1]] = w
    if size:
        h = hadamard(size)
        for k0 in range(0, kp, size):
            out[:, k0 : k0 + size] = out[:, k0 : k0 + size] @ h
    return out


def mx_block(block) -> tuple[int, list[int]]:
    """One group of float32 values → (E8M0 byte, codes)."""
    amax = max(abs(v) for v in block)
    exponent = -127 if amax == 0 else max(-127, min(127, math.frexp(amax)[1] - 1 - 2))
    return exponent + 127, [e2m1_code(v / 2.0**exponent) for v in block]


def nv_global(amax: float) -> float:
    scale = f32(amax / 2688.0)
    return scale if scale > 0 else 1.0


def nv_block(block, global_scale: float) -> tuple[float, list[int]]:
    """One group of float32 values → (e4m3 block scale, codes)."""
    amax = max(abs(v) for v in block)
    scale = e4m3_round(f32(f32(amax / 6.0) / global_scale))
    unit = f32(scale * global_scale)
    return scale, [e2m1_code(f32(v / unit)) if unit > 0 else 0 for v in block]
