"""C++ kernel rows for the ``gguf`` family (``q4_0`` … ``iq4_xs``, :mod:`qcompile.schemes.gguf`); kernels in
``kernels/gguf_linear.h`` and ``kernels/gguf_gemv.h`` (the blocks' decoders in ``kernels/gguf.h``), which read ggml's
blocks as they are (``blocks uint8 [N, nb * BYTES]``, the ggml type id in ``ints[0]``).

Two rows, chosen by the number of tokens ``M`` of a call:

* ``cpp-gguf-q8`` (``M <= Q8_MAX_TOKENS``, only with ``QCOMPILE_GGUF_Q8=1``): llama.cpp's form. Activations are quantized per block of the weight's
  block size (32, or 256 as Q8_K) to int8 with ``dx = amax / 127`` and integer dot products do the rest (AVX-512
  VNNI, AVX2 ``vpmaddubsw`` or scalar), block scales applied in float32. It differs from the scheme's reference
  (dequantize, then ``F.linear``) by the int8 rounding of the activations, as llama.cpp does.
* ``cpp-gguf`` (every other call): the exact float form, ``x · dequant(W)ᵀ`` with float32 accumulation; from
  ``GEMM_MIN_TOKENS`` tokens on, the weight is dequantized in slices to the activation's dtype (``dequant_gguf``:
  the reference's values) for torch's GEMM in that dtype.

The int8 form is opt-in: ``QCOMPILE_GGUF_Q8=1`` (read when a call signature is first dispatched) turns it on.
By default every call takes the exact form, so a ``gguf`` layer computes what its scheme's reference computes (the
int8 form moves SmolLM2's decode logits by about 2.5 % rms, as llama.cpp's own; a scheme name does not say it).
:func:`uses_int8_activations` says which form a call of ``M`` tokens gets.

The C++ op keeps one plan per call signature whatever ``M`` is; the int8 row holds it (with ``max_tokens`` =
``Q8_MAX_TOKENS``) and the exact row's calls run from Python, so a signature's small calls never switch form
depending on which call came first.
"""

from __future__ import annotations

import os

import torch

from qcompile.codegen import cpp
from qcompile.codegen.cpp import launch, library
from qcompile.runtime.dispatch import KernelEntry

#: up to this many tokens, calls take the int8-activation form (``cpp-gguf-q8``). Measured on 4096 x 4096
#: (``benchmarks/gguf_cpu.py``, ``docs/cpu-kernels.md``): 15-35% faster than the exact form at every M up to 64 with
#: one thread; with two, about even at M = 1 and 10-30% faster from 2 to 32 tokens, where the bfloat16 GEMM path of
#: the exact form catches up. 0 switches the form off.
Q8_MAX_TOKENS = 16
#: from this many tokens on, the exact form dequantizes the weight in slices and uses torch's GEMM (the direct kernel
#: and the float32 GEMM path cross near 32 tokens; the bfloat16 one near 16)
GEMM_MIN_TOKENS = 32
#: bytes of dequantized weight per slice in the GEMM path
GEMM_SLICE_BYTES = 4 << 20
#: ``0`` keeps every call on the exact float form
Q8_ENV = "QCOMPILE_GGUF_Q8"


def q8_max_tokens() -> int:
    """Calls of up to this many tokens take the int8-activation form: ``Q8_MAX_TOKENS`` when ``$QCOMPILE_GGUF_Q8``
    is ``1``, else 0 (the default: the exact form only)."""
    return Q8_MAX_TOKENS if os.environ.get(Q8_ENV, "0").strip() == "1" else 0


def tokens(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def uses_int8_activations(m: int) -> bool:
    """Whether a call of ``m`` tokens runs llama.cpp's int8-activation form (else the exact float form)."""
    return m <= q8_max_tokens()


def type_id(scheme) -> int:
    """The ggml type id of ``scheme`` (the kernels' ``ints[0]``)."""
    return scheme.kind.type_id


# -- the int8-activation form -----------------------------------------------------------------------------------------
def q8_supports(scheme, x, packed) -> str | None:
    reason = launch.activation_reason(x)
    if reason is not None:
        return reason
    if q8_max_tokens() == 0:
        return f"the int8-activation form is off ({Q8_ENV}=0 or Q8_MAX_TOKENS = 0)"
    if not uses_int8_activations(tokens(x)):
        return f"{tokens(x)} tokens: the int8-activation form serves up to {q8_max_tokens()} (cpp-gguf serves more)"
    return None


def q8_bind(scheme, x, packed, bias, n):
    """``linear_gguf_q8`` for calls of up to ``Q8_MAX_TOKENS`` tokens (the C++ op's plan for the signature)."""

    def exact(x, packed, bias):
        return exact_launcher(scheme, x, n)(x, packed, bias)

    ints = (type_id(scheme),)
    return launch.bind_kernel(scheme, "linear_gguf_q8", x, packed, bias, n, ints, (), q8_max_tokens(), exact)


# -- the exact float form ---------------------------------------------------------------------------------------------
def exact_supports(scheme, x, packed) -> str | None:
    return launch.activation_reason(x)


def exact_bind(scheme, x, packed, bias, n):
    """The exact form for one call signature: ``linear_gguf`` below ``GEMM_MIN_TOKENS`` tokens, dequantized slices and
    torch's GEMM from there. It hands the C++ op a plan only while the int8 row is off (see the module docstring)."""
    if q8_max_tokens() > 0:
        return exact_launcher(scheme, x, n)
    ints = (type_id(scheme),)
    return launch.bind_kernel(scheme, "linear_gguf", x, packed, bias, n, ints, (), GEMM_MIN_TOKENS - 1,
                              slices=slices(scheme, x))


def exact_launcher(scheme, x, n: int):
    """``launch(x, packed, bias)`` of the exact form from Python (no plan for the C++ op): the direct kernel below
    ``GEMM_MIN_TOKENS`` tokens, dequantized slices and torch's GEMM from there."""
    direct = direct_launcher(scheme, x, n)
    gemm = slices(scheme, x)

    def run(x, packed, bias):
        if tokens(x) >= GEMM_MIN_TOKENS:
            return gemm.run(scheme, x, packed, bias, n)
        return direct(x, packed, bias)

    return run


def direct_launcher(scheme, x, n: int, kernel: str = "linear_gguf"):
    """``launch(x, packed, bias)`` running ``kernel`` (``linear_gguf`` or ``linear_gguf_q8``) at any token count,
    from Python."""
    k = x.shape[-1]
    base = launch.template(kernel, k, n, 1, (type_id(scheme),), (), x.dtype == torch.bfloat16)

    def run(x, packed, bias):
        x2 = x.reshape(-1, k)
        m = x2.shape[0]
        if m == 0 or not launch.dense(packed, bias):
            return launch.make_dense(run, x, packed, bias, n)
        x2 = x2.contiguous()
        y = torch.empty((m, n), dtype=x.dtype)
        call = library.Call.from_buffer_copy(base)
        call.x, call.y, call.M, call.threads = x2.data_ptr(), y.data_ptr(), m, torch.get_num_threads()
        call.bias = None if bias is None else bias.data_ptr()
        call.tensors[0] = packed[0].data_ptr()
        launch.check(library.kernel(kernel)(call), f"{scheme.name} {kernel}", m, k, n)
        return y.view(*x.shape[:-1], n)

    return run


def slices(scheme, x) -> launch.Slices:
    """Many tokens: slices of rows dequantized to the activation's dtype by ``dequant_gguf`` (float32: the reference's
    values bit for bit; bfloat16: their rounding to nearest even, the reference's ``.to(x.dtype)``), each times ``x``
    with torch's GEMM in that dtype, as the reference's ``F.linear``; plus ``bias``."""
    rows = max(1, GEMM_SLICE_BYTES // (x.element_size() * x.shape[-1]))
    return launch.Slices("dequant_gguf", (type_id(scheme), 0, 0), (), (1, 2), rows)


def dequantize_gemm(scheme, x, packed, bias, n: int) -> torch.Tensor:
    """The GEMM path of :func:`slices` for one call."""
    return slices(scheme, x).run(scheme, x, packed, bias, n)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The family's CPU rows (none without a C++ compiler; a warning says so once)."""
    if family != "gguf" or not cpp.available():
        return []
    return [
        KernelEntry("cpp-gguf-q8", "cpu", (family,), q8_supports, q8_bind, cpp.PRIORITY + 1),
        KernelEntry("cpp-gguf", "cpu", (family,), exact_supports, exact_bind, cpp.PRIORITY),
    ]
