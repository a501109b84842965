"""What the Triton families' dispatch rows share: whether a call can reach a CUDA kernel at all
(:func:`cuda_call_reason`) and a family's one CUDA row (:func:`cuda_rows`).

A family's ``supports(scheme, x, packed)`` calls :func:`cuda_call_reason` for the checks every kernel needs, after
or before its own (scheme variants, ggml types, activation modes); its ``kernel_entries(family)`` returns
:func:`cuda_rows`. Nothing here imports triton; the capability is read through ``common.device_capability`` at
each call, so a test can stand in a device's facts there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qcompile.codegen.triton import common
from qcompile.runtime.dispatch import KernelEntry

#: the capability reason's default words, formatted with the capability needed (``"8.0"``)
NEEDS = "needs compute capability {}+"
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def cuda_call_reason(
    x: torch.Tensor,
    packed: Sequence[torch.Tensor],
    capability: tuple[int, int] | None = (8, 0),
    dtypes: Sequence[torch.dtype] = common.ACTIVATION_DTYPES,
    *,
    needs: str = NEEDS,
    names: Sequence[str] = (),
) -> str | None:
    """``None`` when a call with activation ``x [..., K]`` and weight tensors ``packed`` can run a CUDA kernel, else
    why not; checked in this order: triton imports, ``x`` is on a CUDA device, ``x.dtype`` is one of ``dtypes``,
    the device's compute capability is ``capability`` or more (``None``: any), each tensor of ``packed`` is on
    ``x``'s device (pass ``()`` to skip).

    ``needs``: the capability reason's words before ``", the device has X.Y"``, formatted with the capability
    needed (``"int8 tl.dot needs compute capability {}+"``); ``names``: the packed tensors' names for the device
    reason (a tensor without one is named by its index).
    """
    missing = common.triton_missing()
    if missing is not None:
        return missing
    if x.device.type != "cuda":
        return f"needs a CUDA tensor, got {x.device.type}"
    if x.dtype not in dtypes:
        return f"activations must be {dtype_list(dtypes)}, got {x.dtype}"
    if capability is not None:
        have = common.device_capability(x.device)
        if have < capability:
            return f"{needs.format(f'{capability[0]}.{capability[1]}')}, the device has {have[0]}.{have[1]}"
    return packed_device_reason(x, packed, names)


def packed_device_reason(x: torch.Tensor, packed: Sequence[torch.Tensor], names: Sequence[str] = ()) -> str | None:
    """``None`` when every tensor of ``packed`` is on ``x``'s device, else which one is not (named by ``names``
    where it has a name there, else by its index)."""
    for index, tensor in enumerate(packed):
        if tensor.device != x.device:
            name = names[index] if index < len(names) else index
            return f"packed tensor {name} is on {tensor.device}, the activation on {x.device}"
    return None


def dtype_list(dtypes: Sequence[torch.dtype]) -> str:
    """``"float16, bfloat16 or float32"``: the dtypes in their order, the last two joined by "or"."""
    words = [DTYPE_NAMES.get(dtype, str(dtype)) for dtype in dtypes]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def cuda_rows(
    family: str,
    wanted: str | tuple[str, ...],
    name: str,
    supports: Callable[..., str | None],
    bind: Callable[..., Callable[..., torch.Tensor]],
    priority: int,
    *,
    inline: Callable[..., torch.Tensor] | None = None,
) -> list[KernelEntry]:
    """``[KernelEntry(name, "cuda", ...)]`` serving the ``wanted`` family (or families) when ``family`` is one of
    them and triton imports, else ``[]``: a family module's ``kernel_entries(family)``."""
    families = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    if family not in families or common.triton_missing() is not None:
        return []
    return [KernelEntry(name=name, device_type="cuda", families=families, supports=supports, bind=bind,
                        priority=priority, inline=inline)]  # fmt: skip
