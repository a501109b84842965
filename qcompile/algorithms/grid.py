"""The integer grid the calibration algorithms write into.

GPTQ, AWQ, HQQ and SmoothQuant all produce the canonical form of :mod:`qcompile.schemes.integer`
(``codes [N, K_padded]``, ``scales`` and ``zeros`` ``float32 [N, groups]``, ``w = (u - zero) * scale``),
so every kernel serves their output. ``w8a8`` stores its weights as symmetric per-channel ``int8`` and
is handled through that integer scheme.

A scheme that is not an integer grid may still let GPTQ choose its codes by offering a static **column grid**:
``scheme.column_grid(weight [N, K])`` returns an object with ``padded_in_features``, ``quantize_column(index,
values [N]) -> [N]`` (round column ``index``, in original order, to the grid fixed by round-to-nearest, remember
the codes, return the values they stand for) and ``finish()`` (the scheme's unpacked form). :func:`column_grid`
finds it.
"""

from __future__ import annotations

import torch

from qcompile.schemes import IntWeightOnly, Scheme


def integer_scheme(scheme: Scheme, algorithm: str) -> IntWeightOnly:
    """The :class:`IntWeightOnly` grid behind ``scheme`` (``Scheme.integer_grid``); an error naming the algorithm
    otherwise."""
    grid = scheme.integer_grid()
    if grid is not None:
        return grid
    raise ValueError(
        f"algorithm {algorithm!r} writes integer grids (int2/3/4/8, w8a8, w4a8); scheme {scheme.name!r} is not one. "
        f"Use algorithm 'rtn' for {scheme.name!r} or pick an integer scheme such as 'int4-g128'."
    )


def column_grid(scheme: Scheme, weight: torch.Tensor):
    """``scheme.column_grid(weight)`` for a scheme that offers one and is no integer grid, else ``None``."""
    if scheme.integer_grid() is not None:
        return None
    make = getattr(scheme, "column_grid", None)
    return None if make is None else make(weight)


def code_range(scheme: IntWeightOnly) -> tuple[int, int]:
    """Smallest and largest unsigned code ``u`` (the symmetric range leaves out ``0``)."""
    return (1 if scheme.symmetric else 0), 2**scheme.bits - 1


def offsets(scheme: IntWeightOnly, zeros: torch.Tensor | None, scales: torch.Tensor) -> torch.Tensor:
    """Zero points in unsigned code units, ``[N, groups]`` (the implicit ``2**(bits-1)`` when symmetric)."""
    if zeros is None:
        return torch.full_like(scales, 2 ** (scheme.bits - 1))
    return zeros


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Round ``w`` to the grid ``(u - zero) * scale``, ``u`` in ``[lo, hi]``; broadcasting shapes."""
    u = torch.clamp(torch.round(w / scale + zero), lo, hi)
    return (u - zero) * scale
