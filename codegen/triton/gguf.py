"""Triton row and launcher for the ``gguf`` family (``q4_0`` … ``iq4_xs``, :mod:`qcompile.schemes.gguf`); the kernel
is in :mod:`qcompile.codegen.triton.gguf_kernels`.

Reads ggml's blocks as the scheme stores them, ``blocks uint8 [N, (Kp / QK) * BYTES]`` (``Kp``: K rounded up to the
block size ``QK``, 32 or 256), and decodes each ``[BLOCK_N, BLOCK_K]`` weight tile in the GEMM prologue, in fp32 and
exactly as the scheme's reference dequantizes (fp16 ``d`` / ``dmin`` / ``m`` from two bytes by bit casts, 4- and
6-bit sub-block scales and mins, low bits and high-bit planes of the codes, Q8_0's int8), one code plane (low
nibbles, high nibbles, …) at a time, then casts it to the activation's dtype for ``tl.dot`` with fp32 accumulation;
bias added, ``y [M, N]`` in ``x``'s dtype. Every type of :data:`TYPES` is served: all twelve block types of the
scheme; :func:`supports` names any other (it keeps the C++ or reference path).

Tiles (``BLOCK_K`` whole blocks): up to ``SPLITK_MAX_M`` rows (decode) 16 x 64 x 128 for 32-element blocks and
16 x 32 x 256 for 256-element ones, K split until about ``TARGET_PROGRAMS`` programs stream the weight; more rows
64 or 128 x 64 tiles, ``BLOCK_K`` 64 or 256. Under the interpreter, small tiles with K split in two. No tuning.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from qcompile.codegen.triton import autotune, common
from qcompile.codegen.triton.rows import cuda_call_reason, cuda_rows
from qcompile.runtime.dispatch import KernelEntry
from qcompile.schemes import as_scheme
from qcompile.schemes.gguf_blocks import BLOCK_TYPES

FAMILY = "gguf"
PRIORITY = 10
#: programs a small-M launch aims for (an H100/H200 has 132 SMs), reached by splitting K
TARGET_PROGRAMS = 264
#: compute capability the row needs (bf16 ``tl.dot``)
MIN_CAPABILITY = (8, 0)


@dataclasses.dataclass(frozen=True)
class GgufType:
    """What the kernel needs of one block type: ``name``; ggml ``type_id`` (the kernel's ``TYPE``); elements ``qk``
    and bytes ``nbytes`` per block; the code bytes: ``qb`` of them from byte ``qs`` of a block, each holding
    ``qk / qb`` codes (the planes); ``sub``: code bytes in a row that share a sub-block scale; ``has_min``: an added
    offset (``m`` or ``-dmin * m``)."""

    name: str
    type_id: int
    qk: int
    nbytes: int
    qs: int
    qb: int
    sub: int
    has_min: bool = False

    def __post_init__(self):
        kind = BLOCK_TYPES[self.name]
        if (self.type_id, self.qk, self.nbytes) != (kind.type_id, kind.qk, kind.nbytes) or self.qb % self.sub:
            raise ValueError(f"GgufType {self.name}: inconsistent with gguf_blocks ({self})")


def _type(name: str, qs: int, qb: int, sub: int, has_min: bool = False) -> GgufType:
    kind = BLOCK_TYPES[name]
    return GgufType(name, kind.type_id, kind.qk, kind.nbytes, qs, qb, sub, has_min)


#: the block types the kernel decodes (offsets and sizes from the layouts in ``gguf_blocks``)
TYPES: dict[str, GgufType] = {
    t.name: t
    for t in (
        _type("q4_0", 2, 16, 16), _type("q4_1", 4, 16, 16, True), _type("q5_0", 6, 16, 16),
        _type("q5_1", 8, 16, 16, True), _type("q8_0", 2, 32, 32), _type("q2_k", 16, 64, 16, True),
        _type("q3_k", 32, 64, 16), _type("q4_k", 16, 128, 32, True), _type("q5_k", 48, 128, 32, True),
        _type("q6_k", 0, 128, 16), _type("iq4_nl", 2, 16, 16), _type("iq4_xs", 8, 128, 16),
    )
}  # fmt: skip


@functools.cache
def _kernels():
    from qcompile.codegen.triton import gguf_kernels

    return gguf_kernels


def gguf_type(scheme, where: str = "gguf_linear") -> GgufType:
    """The :class:`GgufType` of a ``gguf`` scheme (object or name); ``ValueError`` for other schemes and types the
    kernel does not decode."""
    scheme = as_scheme(scheme)
    if scheme.family != FAMILY:
        raise ValueError(f"{where}: {scheme.name} is a {scheme.family} scheme, expected a {FAMILY} one")
    if scheme.name not in TYPES:
        raise ValueError(f"{where}: no Triton kernel for ggml type {scheme.name}; served: {', '.join(TYPES)}")
    return TYPES[scheme.name]


# -- configs ----------------------------------------------------------------------------------------------------------
def default_config(m: int, n: int, k: int, qk: int) -> autotune.KernelConfig:
    """One config per path (see the module docstring); ``BLOCK_K`` is a multiple of the block size ``qk``."""
    small = common.interpreting()
    if m <= common.SPLITK_MAX_M:
        if small:
            block_n, block_k = (16, qk) if qk > 32 else (32, 32)
        else:
            block_n, block_k = (32, 256) if qk > 32 else (64, 128)
        k_tiles = common.cdiv(k, block_k)
        split = min(k_tiles, 2) if small else max(1, min(k_tiles, TARGET_PROGRAMS // common.cdiv(n, block_n), 16))
        return autotune.KernelConfig(16, block_n, block_k, split_k=split, num_warps=4, num_stages=3)
    if small:
        return autotune.KernelConfig(16, 32, qk, num_stages=1)
    block_m = 64 if m <= 64 else 128
    return autotune.KernelConfig(block_m, 64, max(64, qk), num_warps=4 if block_m == 64 else 8,
                                 num_stages=3 if qk == 32 else 2)  # fmt: skip


# -- the launcher -----------------------------------------------------------------------------------------------------
def check_blocks(kind: GgufType, blocks: torch.Tensor, n: int, k: int, where: str) -> None:
    """``ValueError`` naming the tensor, what was expected and what came, unless ``blocks`` is ``uint8 [n, row]``
    with ``row`` the bytes of ``ceil(k / QK)`` blocks."""
    row = common.cdiv(k, kind.qk) * kind.nbytes
    if blocks.dtype != torch.uint8 or tuple(blocks.shape) != (n, row):
        got = f"{str(blocks.dtype).removeprefix('torch.')}{list(blocks.shape)}"
        raise ValueError(f"{where}: blocks is {got}, expected uint8[{n}, {row}] ({row // kind.nbytes} {kind.name} "
                         f"blocks of {kind.nbytes} bytes a row) for [N={n}, K={k}]")  # fmt: skip


def bind(scheme, x, packed, bias, out_features, *, config: autotune.KernelConfig | None = None):
    """``launch(x, packed, bias) -> y`` for calls with this one's signature (shapes, dtypes, scheme): the block
    tensor is checked and the config and kernel arguments worked out once."""
    kind = gguf_type(scheme)
    where = f"gguf_linear({kind.name})"
    common.check_activation(x, where)
    if len(packed) != 1:
        raise ValueError(f"{where}: takes 1 packed tensor (blocks), got {len(packed)}")
    n, k = out_features, x.shape[-1]
    check_blocks(kind, packed[0], n, k, where)
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{where}: bias is {list(bias.shape)}, expected [{n}]")
    kp = common.cdiv(k, kind.qk) * kind.qk
    m = x.numel() // k
    cfg = config or default_config(m, n, k, kind.qk)
    if cfg.block_k % kind.qk or min(cfg.block_m, cfg.block_n, cfg.block_k) < 16:
        raise ValueError(f"{where}: config {cfg.label} needs blocks >= 16 and BLOCK_K a multiple of the block size "
                         f"{kind.qk}")  # fmt: skip
    dtype = x.dtype
    # the interpreter's fp32 -> bf16 store truncates: there the kernel writes fp32 and torch rounds it
    out_dtype = torch.float32 if common.interpreting() and dtype == torch.bfloat16 else dtype
    grid = (common.cdiv(m, cfg.block_m) * common.cdiv(n, cfg.block_n), cfg.split_k)
    meta = dict(
        TYPE=kind.type_id, QK=kind.qk, NBYTES=kind.nbytes, QS=kind.qs, QB=kind.qb, SUB=kind.sub,
        HAS_MIN=kind.has_min, HAS_BIAS=bias is not None, SPLIT=cfg.split_k > 1, EVEN_K=k % cfg.block_k == 0,
        DOT_DTYPE=common.dot_dtype(dtype), ROUND_BF16=common.interpreting() and dtype == torch.bfloat16,
        DOT_PRECISION=common.dot_precision(dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    name = f"the GGUF {kind.name} kernel ({cfg.label})"

    def gemm(x2, blocks, bias):
        out = torch.empty((m, n), device=x2.device, dtype=out_dtype)
        if m == 0:
            return out
        work, counts = (common.split_workspace(x2.device, m * n, grid[0]) if cfg.split_k > 1
                        else common.no_workspace(out))  # fmt: skip
        try:
            common.kernel(_kernels().gguf_linear_kernel)[grid](
                x2, blocks, blocks if bias is None else bias, out, work, counts, m, n, k, kp // kind.qk, cfg.split_k,
                x2.stride(0), blocks.stride(0), out.stride(0), **meta,
            )  # fmt: skip
        except Exception as error:
            if not common.fewer_stages(error, meta, name):
                raise
            return gemm(x2, blocks, bias)
        return out

    def launch(x, packed, bias):
        out = gemm(common.as_rows(x), packed[0].contiguous(), bias)
        return common.as_input_shape(out if out.dtype == dtype else out.to(dtype), x)

    return launch


def gguf_linear(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None, scheme, *,
                config: autotune.KernelConfig | None = None) -> torch.Tensor:  # fmt: skip
    """``qcompile::linear`` for ``gguf`` schemes: ``x [..., K]`` fp16/bf16/fp32, ``blocks uint8 [N, (Kp / QK) *
    BYTES]`` (the scheme's one packed tensor), ``bias [N]`` or ``None`` → ``[..., N]`` in ``x.dtype``. ``scheme``:
    a ``gguf`` scheme or its name (``"q4_k"``); ``config``: a launch config in place of :func:`default_config`."""
    return bind(scheme, x, [blocks], bias, blocks.shape[0], config=config)(x, [blocks], bias)


# -- dispatch rows ----------------------------------------------------------------------------------------------------
def supports(scheme, x, packed) -> str | None:
    """``None`` when the Triton GGUF kernel serves the call, else why not (those calls keep the C++ or reference
    path)."""
    missing = common.triton_missing()
    if missing is not None:
        return missing
    if scheme.family != FAMILY:
        return f"{scheme.name} is not a {FAMILY} scheme"
    if scheme.name not in TYPES:
        return f"no Triton kernel for ggml type {scheme.name}"
    return cuda_call_reason(x, packed, MIN_CAPABILITY)


def kernel_entries(family: str) -> list[KernelEntry]:
    """The family's CUDA row (none when triton cannot be imported)."""
    from qcompile.codegen.triton import traceable

    return cuda_rows(family, FAMILY, "triton-gguf", supports, bind, PRIORITY, inline=traceable.inline)
