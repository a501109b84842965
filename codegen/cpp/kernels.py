"""``qcompile::linear`` kernel rows for CPUs: W8A16 / W4A16 (weight-only), W8A8 and W4A8, backed by the C++ library.

Each row is a ``supports`` predicate (``None`` when the kernel serves the call, else the reason), a ``bind``
that returns a launcher for one call signature (and hands the C++ op its plan), and a ``run`` for any call.
Launchers hand raw pointers of dense tensors to the library (see ``qc_abi.h``); ``run`` makes a call dense
first.
"""

from __future__ import annotations

import torch

from qcompile.codegen.cpp import library, op
from qcompile.schemes import IntWeightOnly, W4A8Int, W8A8Int

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
#: from this many tokens on, weight-only calls dequantize the weight in slices and use torch's float GEMM.
#: Measured on a 2-core AVX2 machine, the direct kernel (4 tokens per unpacked block) was faster up to M=128.
GEMM_MIN_TOKENS = 256
#: bytes of float32 weight dequantized per slice in the GEMM path (fits in L2/L3 next to the activations)
GEMM_SLICE_BYTES = 2 << 20


def _pointer(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _activation_reason(x: torch.Tensor) -> str | None:
    if x.dtype not in ACTIVATION_DTYPES:
        return f"activations are {x.dtype}; the C++ kernels take float32 or bfloat16"
    return None


def _check(rc: int, what: str, m: int, k: int, n: int) -> None:
    if rc != 0:
        raise MemoryError(f"qcompile cpp kernel {what}: no memory for scratch buffers (M={m}, K={k}, N={n})")


def _bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.float32).contiguous()


# -- weight-only: int8 and int4 -------------------------------------------------------------------------


def weight_only_supports(scheme, x, qweight, scales, zeros) -> str | None:
    if not isinstance(scheme, IntWeightOnly):
        return f"{scheme.name} is not an integer weight-only scheme"
    if scheme.bits not in (4, 8):
        return f"{scheme.bits}-bit weights have no C++ kernel (int4 and int8 do)"
    return _activation_reason(x)


def _zero_const(scheme: IntWeightOnly) -> float:
    return 2.0 ** (scheme.bits - 1) if scheme.symmetric and scheme.bits < 8 else 0.0


def weight_only_run(scheme, x, qweight, scales, zeros, bias):
    """W8A16 / W4A16: ``x [..., K]`` float32/bfloat16 → ``[..., N]`` in ``x.dtype`` (see ``weight_only.h``)."""
    k, n = x.shape[-1], scales.shape[0]
    if x.numel() // max(k, 1) >= GEMM_MIN_TOKENS:
        x2 = x.reshape(-1, k).contiguous()
        zeros = None if zeros is None else zeros.contiguous()
        kp, group = scheme.padded_in_features(k), scheme.group_size_for(k)
        y = _weight_only_gemm(scheme, x2, qweight.contiguous(), scales.contiguous(), zeros, _bias32(bias), kp, group,
                              torch.get_num_threads())  # fmt: skip
        return y.to(x.dtype).reshape(*x.shape[:-1], n)
    return _run_dense(_weight_only_launcher(scheme, x, n), x, qweight, scales, zeros, bias)


def weight_only_bind(scheme, x, qweight, scales, zeros, bias):
    """W8A16 / W4A16 launcher for one call signature (many tokens take the dequantize + GEMM path)."""
    k = x.shape[-1]
    op.remember(op.WEIGHT_ONLY, scheme, x, qweight, scales, zeros, bias, scheme.bits, scheme.padded_in_features(k),
                scheme.group_size_for(k), _zero_const(scheme))  # fmt: skip
    return _weight_only_launcher(scheme, x, scales.shape[0])


def _weight_only_launcher(scheme, x, n: int):
    k = x.shape[-1]
    kp, group = scheme.padded_in_features(k), scheme.group_size_for(k)
    zero_const, bits = _zero_const(scheme), scheme.bits

    def middle(qweight, scales, zeros, bias):
        return qweight.data_ptr(), bits, n, kp, scales.data_ptr(), _pointer(zeros), zero_const, group, _pointer(bias)

    def run(*tensors):
        return weight_only_run(scheme, *tensors)

    return _bind("qc_linear_wo", x, n, middle, run, slow=lambda m: m >= GEMM_MIN_TOKENS)


def _bind(kernel: str, x, n: int, middle, run, slow=lambda m: False):
    """``launch(x, qweight, scales, zeros, bias) -> y`` for one call signature: the ctypes ``kernel`` called as
    ``kernel(x, x_bf16, M, K, *middle(qweight, scales, zeros, bias), y, y_bf16, threads)``; calls it cannot take
    as they are (no tokens, ``slow(M)``, tensors that are not dense) go to ``run`` instead. Shape constants and
    the ctypes function are looked up once, so a decode-sized call costs the kernel plus a few microseconds."""
    k, dtype = x.shape[-1], x.dtype
    x_bf16 = int(dtype == torch.bfloat16)

    def launch(x, qweight, scales, zeros, bias):
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0 or slow(m) or not _dense(qweight, scales, zeros, bias):
            return run(x, qweight, scales, zeros, bias)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty((m, n), dtype=dtype)
        rc = library.kernel(kernel)(x2.data_ptr(), x_bf16, m, k, *middle(qweight, scales, zeros, bias), y.data_ptr(),
                                    x_bf16, torch.get_num_threads())  # fmt: skip
        if rc:
            _check(rc, kernel, m, k, n)
        return y.view(*x.shape[:-1], n)

    return launch


def _run_dense(launch, x, qweight, scales, zeros, bias):
    """Any call: made dense (contiguous tensors, a float32 bias) and handed to a launcher, which takes it as is."""
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], scales.shape[0]))
    zeros = None if zeros is None else zeros.contiguous()
    return launch(x.contiguous(), qweight.contiguous(), scales.contiguous(), zeros, _bias32(bias))


def _dense(qweight, scales, zeros, bias) -> bool:
    """Packed tensors the kernel can read in place: contiguous, and a float32 bias (or none)."""
    return (qweight.is_contiguous() and scales.is_contiguous() and (zeros is None or zeros.is_contiguous())
            and (bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())))  # fmt: skip


def _weight_only_gemm(scheme, x2, qweight, scales, zeros, bias32, kp, group, threads) -> torch.Tensor:
    """Many tokens: dequantize slices of N rows once (float32, C++) and multiply with torch's GEMM."""
    m, k = x2.shape
    n = scales.shape[0]
    x32 = x2.to(torch.float32)
    y_t = torch.empty((n, m), dtype=torch.float32)  # y transposed: every slice of rows is contiguous
    rows = max(1, min(n, GEMM_SLICE_BYTES // (4 * k)))
    weight = torch.empty((rows, k), dtype=torch.float32)
    dequant = library.kernel("qc_dequant_wo")
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        rc = dequant(
            _pointer(qweight), scheme.bits, n, kp, k, _pointer(scales), _pointer(zeros), _zero_const(scheme),
            group, n0, n1, _pointer(weight), threads,
        )  # fmt: skip
        _check(rc, f"{scheme.name} dequantize", m, k, n)
        torch.mm(weight[: n1 - n0], x32.t(), out=y_t[n0:n1])
    y = y_t.t()
    return y + bias32 if bias32 is not None else y


# -- W8A8 -----------------------------------------------------------------------------------------------


def w8a8_supports(scheme, x, qweight, scales, zeros) -> str | None:
    if not isinstance(scheme, W8A8Int):
        return f"{scheme.name} is not w8a8"
    return _activation_reason(x)


def w8a8_run(scheme, x, qweight, scales, zeros, bias):
    """W8A8: per-token dynamic int8 activations × int8 weights, exact int32 sums (see ``w8a8.h``)."""
    return _run_dense(_w8a8_launcher(scheme, x, scales.shape[0]), x, qweight, scales, zeros, bias)


def w8a8_bind(scheme, x, qweight, scales, zeros, bias):
    """W8A8 launcher for one call signature (see :func:`_bind`)."""
    op.remember(op.W8A8, scheme, x, qweight, scales, zeros, bias)
    return _w8a8_launcher(scheme, x, scales.shape[0])


def _w8a8_launcher(scheme, x, n: int):
    def middle(qweight, scales, zeros, bias):
        return qweight.data_ptr(), n, scales.data_ptr(), _pointer(bias)

    return _bind("qc_linear_w8a8", x, n, middle, lambda *tensors: w8a8_run(scheme, *tensors))


# -- W4A8 -----------------------------------------------------------------------------------------------


def w4a8_supports(scheme, x, qweight, scales, zeros) -> str | None:
    if not isinstance(scheme, W4A8Int):
        return f"{scheme.name} is not w4a8"
    return _activation_reason(x)


def w4a8_run(scheme, x, qweight, scales, zeros, bias):
    """W4A8: per-token dynamic int8 activations × int4 group-wise weights, exact int32 sums (see ``w4a8.h``)."""
    return _run_dense(_w4a8_launcher(scheme, x, scales.shape[0]), x, qweight, scales, zeros, bias)


def w4a8_bind(scheme, x, qweight, scales, zeros, bias):
    """W4A8 launcher for one call signature (every token count runs the kernel; see :func:`_bind`)."""
    k = x.shape[-1]
    op.remember(op.W4A8, scheme, x, qweight, scales, zeros, bias, 4, scheme.padded_in_features(k),
                scheme.group_size_for(k), 8.0)  # fmt: skip
    return _w4a8_launcher(scheme, x, scales.shape[0])


def _w4a8_launcher(scheme, x, n: int):
    k = x.shape[-1]
    kp, group = scheme.padded_in_features(k), scheme.group_size_for(k)

    def middle(qweight, scales, zeros, bias):
        return qweight.data_ptr(), n, kp, scales.data_ptr(), _pointer(zeros), 8.0, group, _pointer(bias)

    return _bind("qc_linear_w4a8", x, n, middle, lambda *tensors: w4a8_run(scheme, *tensors))
