"""The Triton rows' launches as a graph tracer records them: their ``inline`` (``dispatch.inline_kernels``).

When AOTAutograd functionalizes a ``qcompile::linear`` call on a CUDA tensor with inlining on, the serving row's
bound launcher (the one eager calls of that signature use) runs under ``common.traced_launches``: every kernel call
becomes a ``triton_kernel_wrapper`` node (``torch.library.wrap_triton``), the output and split-K workspaces become
allocations in the graph, and the launch config is the tuned one. A key with no tuned config is tuned then, on real
tensors shaped like the traced ones (:func:`real_like`), and a config no search ran is launched once on such tensors
(so that one needing more shared memory than the device has steps its stages down first). Inductor then compiles
the kernels with the rest of the graph and launches them from its own wrapper code.
"""

from __future__ import annotations

import torch

from qcompile.codegen.triton import common

#: the largest value of the random float tensors a tuning search runs on: activations, scales, zero points and
#: biases this small keep a K = 16384 dot far inside fp16's range
TUNING_MAGNITUDE = 0.01


def inline(launch, x, packed, bias) -> torch.Tensor:
    """The launches of a row's bound ``launch`` for this call, recorded by the tracer whose mode is active (see
    module docstring)."""
    with common.traced_launches(real_like):
        return launch(x, packed, bias)


def real_like(tensors: tuple) -> tuple | None:
    """Real tensors with the sizes, strides, dtypes and device of the traced ``tensors`` (other items as they are),
    filled with values every kernel family takes: uint8 and int8 codes over their whole range, float8 and wider
    floats in ``[0, TUNING_MAGNITUDE)``. ``None`` when a size or stride is symbolic. Call it with the tracer's modes
    set aside (``common.untraced``)."""
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor) and not all(isinstance(v, int) for v in (*tensor.shape, *tensor.stride())):
            return None
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(_random(t, generator) if isinstance(t, torch.Tensor) else t for t in tensors)


def _random(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    shape, dtype = tuple(like.shape), like.dtype
    if dtype == torch.uint8:
        values = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    elif dtype == torch.int8:
        values = torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)
    elif dtype.is_floating_point:
        values = (torch.rand(shape, generator=generator) * TUNING_MAGNITUDE).to(dtype)
    else:
        raise TypeError(f"no tuning values for a {dtype} tensor")
    out = torch.empty_strided(shape, like.stride(), dtype=dtype, device=like.device)
    return out.copy_(values)
