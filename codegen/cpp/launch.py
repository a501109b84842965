"""Launchers for the C++ kernels: one call signature's ``launch(x, packed, bias) -> y`` for any kernel of the table.

A row's ``bind`` names the kernel and its parameters (``ints``, ``floats``: documented beside the kernel in
``kernels/*.h``); :func:`bind_kernel` fills a :class:`library.Call` once per signature, hands the C++ op the same
plan (``op.remember``), and per call only sets the pointers and the token count. Calls the kernel cannot take as
they are (no tokens, more than ``max_tokens`` tokens, tensors that are not dense) go to ``slow`` instead.
"""

from __future__ import annotations

import ctypes
import dataclasses

import torch

from qcompile.codegen.cpp import library, op

ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)


def activation_reason(x: torch.Tensor) -> str | None:
    if x.dtype not in ACTIVATION_DTYPES:
        return f"activations are {x.dtype}; the C++ kernels take float32 or bfloat16"
    return None


def check(rc: int, what: str, m: int, k: int, n: int) -> None:
    if rc != 0:
        raise MemoryError(f"qcompile cpp kernel {what}: no memory for scratch buffers (M={m}, K={k}, N={n})")


def bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.to(torch.float32).contiguous()


def dense(packed, bias) -> bool:
    """Packed tensors the kernel can read in place: contiguous, and a float32 bias (or none)."""
    return all(t.is_contiguous() for t in packed) and (
        bias is None or (bias.dtype == torch.float32 and bias.is_contiguous())
    )


def make_dense(launch, x, packed, bias, n: int):
    """Any call: made dense (contiguous tensors, a float32 bias) and handed to ``launch``."""
    if x.numel() == 0:
        return x.new_empty((*x.shape[:-1], n))
    return launch(x.contiguous(), [t.contiguous() for t in packed], bias32(bias))


def template(kernel: str, k: int, n: int, n_tensors: int, ints=(), floats=(), bf16: bool = False) -> library.Call:
    call = library.Call()
    call.K, call.N, call.n_tensors = k, n, n_tensors
    call.x_bf16 = call.y_bf16 = int(bf16)
    for i, value in enumerate(ints):
        call.ints[i] = int(value)
    for i, value in enumerate(floats):
        call.floats[i] = float(value)
    return call


@dataclasses.dataclass(frozen=True)
class Slices:
    """A GEMM path :func:`sliced_gemm` runs on the activation as it is, or as ``prologue`` rewrites it (a kernel
    of the table that writes ``x``'s values transformed, same shape and dtype, e.g. ``quantize_tokens``):
    ``kernel`` writes weight rows ``ints[slots[0]]`` to ``ints[slots[1]]`` in the activation's dtype, ``rows`` at a
    time. The C++ op runs it itself, so a call of many tokens does not return to Python."""

    kernel: str
    ints: tuple
    floats: tuple
    slots: tuple[int, int]
    rows: int
    prologue: str = ""

    def run(self, scheme, x, packed, bias, n: int) -> torch.Tensor:
        xw = x.reshape(-1, x.shape[-1]).contiguous()
        if self.prologue:
            xw = run_prologue(self.prologue, xw)
        packed = [t.contiguous() for t in packed]
        return sliced_gemm(scheme, x, xw, packed, bias, n, self.kernel, self.ints, self.floats, self.slots, self.rows)


def run_prologue(kernel: str, x2: torch.Tensor) -> torch.Tensor:
    """``kernel`` (no tensors or parameters) on the contiguous ``x2 [M, K]``: its output, same shape and dtype."""
    out = torch.empty_like(x2)
    call = template(kernel, x2.shape[1], 0, 0, bf16=x2.dtype == torch.bfloat16)
    call.x, call.y, call.M, call.threads = x2.data_ptr(), out.data_ptr(), x2.shape[0], torch.get_num_threads()
    check(library.kernel(kernel)(ctypes.byref(call)), kernel, x2.shape[0], x2.shape[1], 0)
    return out


def quantize_tokens_int8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The contiguous ``x2 [M, K]`` (float32 or bfloat16) quantized per token (``quantize_tokens``, mode 1):
    ``(int8 [M, K], float32 [M, 1])``, equal to ``quantize_per_token_int8``."""
    m, k = x2.shape
    codes = torch.empty((m, k), dtype=torch.int8)
    scales = torch.empty((m, 1), dtype=torch.float32)
    call = template("quantize_tokens", k, 0, 1, (1,), bf16=x2.dtype == torch.bfloat16)
    call.x, call.y, call.M, call.threads = x2.data_ptr(), codes.data_ptr(), m, torch.get_num_threads()
    call.tensors[0] = scales.data_ptr()
    check(library.kernel("quantize_tokens")(ctypes.byref(call)), "quantize_tokens", m, k, 0)
    return codes, scales


def bind_kernel(scheme, kernel: str, x, packed, bias, n: int, ints=(), floats=(), max_tokens: int | None = None,
                slow=None, slices: Slices | None = None):
    """``launch(x, packed, bias) -> y`` running C++ kernel ``kernel`` for this call signature (see module
    docstring); ``slow(x, packed, bias)`` serves calls of more than ``max_tokens`` tokens (``None``: no limit;
    0: every call goes to ``slow``), or ``slices`` when it is given (the C++ op then serves those calls too)."""
    if slices is not None:
        def slow(x, packed, bias):
            return slices.run(scheme, x, packed, bias, n)
    if max_tokens == 0 and slow is not None:
        return slow
    max_tokens = max_tokens or 0
    op.remember(scheme, x, packed, bias, n, kernel, ints, floats, max_tokens, slices)
    k, dtype = x.shape[-1], x.dtype
    base = template(kernel, k, n, len(packed), ints, floats, dtype == torch.bfloat16)
    size = ctypes.sizeof(library.Call)

    def launch(x, packed, bias):
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0 or not dense(packed, bias):
            return make_dense(launch, x, packed, bias, n)
        if max_tokens and m > max_tokens:
            return slow(x, packed, bias)
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = torch.empty((m, n), dtype=dtype)
        call = library.Call()
        ctypes.memmove(ctypes.byref(call), ctypes.byref(base), size)
        call.x, call.y, call.M = x2.data_ptr(), y.data_ptr(), m
        call.bias = None if bias is None else bias.data_ptr()
        call.threads = torch.get_num_threads()
        for i, tensor in enumerate(packed):
            call.tensors[i] = tensor.data_ptr()
        rc = library.kernel(kernel)(ctypes.byref(call))
        if rc:
            check(rc, kernel, m, k, n)
        return y.view(*x.shape[:-1], n)

    return launch


def sliced_gemm(scheme, x, xw, packed, bias, n: int, kernel: str, ints=(), floats=(), slots=(0, 1),
                rows: int = 1) -> torch.Tensor:  # fmt: skip
    """Many tokens: ``xw [M, Kw]`` (the activation as the weight rows line up with it, float32 or bfloat16) times
    the weight rows ``kernel`` dequantizes into ``xw``'s dtype, ``rows`` at a time (it writes rows ``ints[slots[0]]``
    to ``ints[slots[1]]``; bfloat16 when its ``y_bf16`` is set), with torch's GEMM in that dtype (oneDNN: AMX or
    AVX512-BF16 for bfloat16 where the CPU has them); the bias joins inside the GEMM (one rounding, as
    ``F.linear``). Each slice's GEMM writes its columns of ``y [M, N]`` in place (a strided output: oneDNN takes
    the row stride), so no transpose or copy follows. Returned in ``x.dtype`` and ``x``'s leading shape.
    ``packed`` is contiguous."""
    k, m, kw = x.shape[-1], xw.shape[0], xw.shape[1]
    dtype, rows = xw.dtype, max(1, min(rows, n))  # Slices give the height for any N
    y = torch.empty((m, n), dtype=dtype)
    weight = torch.empty((rows, kw), dtype=dtype)
    call = template(kernel, k, n, len(packed), ints, floats, dtype == torch.bfloat16)
    for i, tensor in enumerate(packed):
        call.tensors[i] = tensor.data_ptr()
    call.y, call.threads = weight.data_ptr(), torch.get_num_threads()
    dequantize = library.kernel(kernel)
    bias = None if bias is None else bias.to(dtype)
    first, end = slots
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        call.ints[first], call.ints[end] = n0, n1
        check(dequantize(call), f"{scheme.name} dequantize", m, k, n)
        out = y if n1 - n0 == n else y[:, n0:n1]
        if bias is None:
            torch.mm(xw, weight[: n1 - n0].t(), out=out)
        else:
            torch.addmm(bias[n0:n1], xw, weight[: n1 - n0].t(), out=out)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
