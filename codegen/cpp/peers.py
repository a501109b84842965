"""C++ rows of the peer families (``quanto``, ``torchao``, ``eetq``; :mod:`qcompile.schemes.peers`).

* Weight-only peer schemes keep an ``int-weight-only`` layout (``int8``, ``int4-gN``): that family's CPU rows serve
  them as they are (:mod:`qcompile.codegen.layout_rows`).
* quanto's 2-bit grids and the weight-only ``fp8`` forms (quanto, torchao) run ``linear_peer_wo``
  (``kernels/peer_wo.h``), which decodes each weight as the reference does for the activation's dtype; calls of
  many tokens take the reference (dequantize, then torch's GEMM).
* quanto ``-a8`` (static per-tensor int8 activations) and torchao ``int8-a8`` (dynamic per-token int8, torchao's
  ``absmax / 127.5`` rule) run ``linear_peer_a8`` (``kernels/peer_a8.h``), bit for bit the reference.
* torchao ``fp8-a8`` (dynamic per-token e4m3 activations) runs ``linear_peer_fp8a8`` (``kernels/peer_wo.h``): the
  reference's quantization and epilogue, exact e4m3 products, float32 sums in another order; many tokens take the
  reference.
"""

from __future__ import annotations

from qcompile.codegen import cpp, layout_rows
from qcompile.codegen.cpp import gemm_path, launch
from qcompile.runtime.dispatch import KernelEntry

#: ``activation_mode`` → the kernel's ``ints[0]``
MODES = {"static-int8": 0, "token-int8": 1}


def a8_supports(scheme, x, packed) -> str | None:
    mode = getattr(scheme, "activation_mode", None)
    if mode not in MODES:
        return f"linear_peer_a8 takes int8 activations, {scheme.name} has {mode or 'none (weight-only)'}"
    return launch.activation_reason(x)


def a8_bind(scheme, x, packed, bias, n):
    return launch.bind_kernel(scheme, "linear_peer_a8", x, packed, bias, n, (MODES[scheme.activation_mode],))


#: the peer's dtype → the kernel's ``ints[3]``
PEER_DTYPES = {"fp32": 0, "bf16": 1, "fp16": 2}


def wo_format(scheme) -> int | None:
    """``linear_peer_wo``'s format for ``scheme`` (0: quanto 2-bit groups, 1: fp8 rows), or ``None``."""
    if getattr(scheme, "activation_mode", "none") is not None:
        return None
    weights = getattr(scheme, "weights", None)
    if weights == "fp8":
        return 1
    return 0 if scheme.family == "quanto" and weights == "int2" else None


def wo_supports(scheme, x, packed) -> str | None:
    if wo_format(scheme) is None:
        return f"linear_peer_wo takes weight-only quanto int2 and fp8 weights, not {scheme.name}"
    return launch.activation_reason(x)


def wo_bind(scheme, x, packed, bias, n):
    """``linear_peer_wo`` for one call signature; from ``gemm_path.min_tokens`` tokens on, the reference."""
    k, fmt = x.shape[-1], wo_format(scheme)
    kp, group = (scheme.padded_in_features(k), scheme.group_size_for(k)) if fmt == 0 else (k, k)

    def gemm(x, packed, bias):
        return scheme.reference_linear(x, packed, bias, n)

    ints = (fmt, kp, group, PEER_DTYPES[scheme.dtype])
    limit = gemm_path.min_tokens("weight-only", x.dtype) - 1
    return launch.bind_kernel(scheme, "linear_peer_wo", x, packed, bias, n, ints, (), limit, gemm)


def fp8a8_supports(scheme, x, packed) -> str | None:
    mode = getattr(scheme, "activation_mode", None)
    if mode != "token-fp8":
        return f"linear_peer_fp8a8 takes float8 activations, {scheme.name} has {mode or 'none (weight-only)'}"
    return launch.activation_reason(x)


def fp8a8_bind(scheme, x, packed, bias, n):
    """``linear_peer_fp8a8`` for one call signature; from ``gemm_path.min_tokens`` tokens on, the reference."""

    def gemm(x, packed, bias):
        return scheme.reference_linear(x, packed, bias, n)

    limit = gemm_path.min_tokens("w8a8", x.dtype) - 1
    return launch.bind_kernel(scheme, "linear_peer_fp8a8", x, packed, bias, n, (), (), limit, gemm)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The CPU rows of ``family`` (none without a C++ compiler)."""
    if not cpp.available():
        return []
    own = KernelEntry(f"cpp-{family}-a8", "cpu", (family,), a8_supports, a8_bind, cpp.PRIORITY)
    rows = [*layout_rows.delegated_entries(family, "cpu"), own]
    if family in ("quanto", "torchao"):
        rows.append(KernelEntry(f"cpp-{family}-wo", "cpu", (family,), wo_supports, wo_bind, cpp.PRIORITY))
    if family == "torchao":
        rows.append(KernelEntry("cpp-torchao-fp8-a8", "cpu", (family,), fp8a8_supports, fp8a8_bind, cpp.PRIORITY))
    return rows
