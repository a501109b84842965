"""Which Triton kernel path serves a ``qcompile::linear`` call: one table of rows, each with a small predicate.

| row                    | schemes                        | M        | device                |
|------------------------|--------------------------------|----------|-----------------------|
| `triton-int4-gemv`     | `int4`, `int4-gN`, `-sym`      | 1–4      | CUDA, sm_80+          |
| `triton-int4-splitk`   | same                           | 5–16     | CUDA, sm_80+          |
| `triton-int4-gemm`     | same                           | ≥ 17     | CUDA, sm_80+          |
| `triton-w8a16-gemv`    | `int8` (per channel), `fp8`    | 1–4      | sm_80+ (`fp8`: sm_89+) |
| `triton-w8a16-splitk`  | same                           | 5–16     | same                  |
| `triton-w8a16-gemm`    | same                           | ≥ 17     | same                  |
| `triton-w8a8-gemm`     | `w8a8`, `fp8-w8a8`             | ≥ 1      | sm_80+ (`fp8-w8a8`: sm_89+) |

Each row becomes a ``KernelEntry`` of the families it serves (:func:`kernel_entries`, which the families name in
their registry entries); a call no row supports runs the reference path, and the reasons collected here are what the fallback notice shows. :func:`path_reason` is the pure part of
the predicate (no tensors), so the table can be checked without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from qcompile.codegen.triton import common, int4, traceable, w8a8, w8a16
from qcompile.codegen.triton.rows import packed_device_reason
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import FP8, IntWeightOnly, Scheme

PRIORITY = 10
UNBOUNDED = math.inf


def _int4_serves(scheme: Scheme) -> str | None:
    if isinstance(scheme, IntWeightOnly) and scheme.bits == 4:
        return None
    return f"{scheme.name} is not an int4 weight-only scheme"


def _uses_fp8(scheme: Scheme) -> bool:
    return isinstance(scheme, FP8)


@dataclasses.dataclass(frozen=True)
class KernelPath:
    """One row of the table: a kernel family's launcher restricted to an M range."""

    name: str
    serves: Callable[[Scheme], str | None]
    launcher: Callable[..., torch.Tensor]
    path: str | None  # the launcher's ``path`` argument; None for single-path families
    min_m: int
    max_m: float
    #: ``binder(scheme, x, qweight, scales, zeros, bias, path=...) -> launch``: a launcher bound to one call
    #: signature (its per-call Python work is a reshape, an allocation and the launch), where the family has one
    binder: Callable[..., Callable[..., torch.Tensor]] | None = None

    def bind(self, scheme, x, packed, bias, out_features) -> Callable[..., torch.Tensor]:
        """The dispatch row's ``bind``: this family's launchers take its declared tensors by name."""
        launch = self.binder(scheme, x, *named(packed), bias, path=self.path)

        def launch_packed(x, packed, bias):
            return launch(x, *named(packed), bias)

        launch_packed.bound = getattr(launch, "bound", None)  # its config, for reports
        return launch_packed


def named(packed) -> tuple:
    """``(qweight, scales, zeros or None)``: the tensors these kernel families' schemes declare, in order."""
    return (packed[0], packed[1], packed[2] if len(packed) > 2 else None)


PATHS: tuple[KernelPath, ...] = (
    KernelPath("triton-int4-gemv", _int4_serves, int4.int4_linear, "gemv", 1, common.GEMV_MAX_M, int4.bind),
    KernelPath("triton-int4-splitk", _int4_serves, int4.int4_linear, "splitk", common.GEMV_MAX_M + 1,
               common.SPLITK_MAX_M, int4.bind),
    KernelPath("triton-int4-gemm", _int4_serves, int4.int4_linear, "gemm", common.SPLITK_MAX_M + 1, UNBOUNDED,
               int4.bind),
    KernelPath("triton-w8a16-gemv", w8a16.serves, w8a16.w8a16_linear, "gemv", 1, common.GEMV_MAX_M, w8a16.bind),
    KernelPath("triton-w8a16-splitk", w8a16.serves, w8a16.w8a16_linear, "splitk", common.GEMV_MAX_M + 1,
               common.SPLITK_MAX_M, w8a16.bind),
    KernelPath("triton-w8a16-gemm", w8a16.serves, w8a16.w8a16_linear, "gemm", common.SPLITK_MAX_M + 1, UNBOUNDED,
               w8a16.bind),
    KernelPath("triton-w8a8-gemm", w8a8.serves, w8a8.w8a8_linear, None, 1, UNBOUNDED, w8a8.bind),
)  # fmt: skip


def path_reason(
    row: KernelPath, scheme: Scheme, m: int, device_type: str, capability: tuple[int, int], dtype: torch.dtype
) -> str | None:
    """``None`` when ``row`` serves the call described by these facts, else why not."""
    reason = row.serves(scheme)
    if reason is not None:
        return reason
    if device_type != "cuda":
        return f"needs a CUDA tensor, got {device_type}"
    if dtype not in common.ACTIVATION_DTYPES:
        return f"activations must be float16, bfloat16 or float32, got {dtype}"
    if not row.min_m <= m <= row.max_m:
        return f"M={m} is outside {row.min_m}..{row.max_m}"
    needed = (8, 9) if _uses_fp8(scheme) else (8, 0)
    if capability < needed:
        return f"needs compute capability {needed[0]}.{needed[1]}+, the device has {capability[0]}.{capability[1]}"
    return None


def select_path(scheme: Scheme, m: int, device_type: str = "cuda", capability=(9, 0), dtype=torch.bfloat16):
    """The name of the row that serves these facts, or ``None`` (the reference path)."""
    for row in PATHS:
        if path_reason(row, scheme, m, device_type, capability, dtype) is None:
            return row.name
    return None


def _supports(row: KernelPath, scheme, x, packed) -> str | None:
    missing = common.triton_missing()
    if missing is not None:
        return missing
    m = x.numel() // max(1, x.shape[-1])
    reason = path_reason(row, scheme, m, x.device.type, common.device_capability(x.device), x.dtype)
    return reason if reason is not None else packed_device_reason(x, packed)


#: the families whose schemes these rows serve (each row's ``serves`` picks its schemes among them)
FAMILIES = ("int-weight-only", "fp8", "w8a8-int8")


def kernel_entries(family: str) -> list[KernelEntry]:
    """The table's rows for ``family`` (CUDA only; none when triton cannot be imported)."""
    if family not in FAMILIES or common.triton_missing() is not None:
        return []
    return [
        KernelEntry(
            name=row.name,
            device_type="cuda",
            families=FAMILIES,
            supports=functools.partial(_supports, row),
            bind=row.bind,
            priority=PRIORITY,
            inline=traceable.inline,
        )
        for row in PATHS
    ]
