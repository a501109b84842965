"""``@triton.jit`` helpers every kernel family shares: tile order, split-K ranges, the store epilogue.

Plain pointer arithmetic only (no ``tl.make_block_ptr``), so the kernels run on triton 3.6 and 3.7 and under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tile_indices(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program 0-axis id, in groups of ``GROUP_M`` row tiles (L2 reuse of weight tiles)."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows
    return pid_m, pid_n


@triton.jit
def tile_pointers(x_ptr, w_ptr, pid_m, pid_n, M, N, stride_xm, stride_wn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """``(offs_m, offs_n, mask_m, mask_n, x_rows, w_cols)`` of a ``[BLOCK_M, BLOCK_N]`` output tile: the row and
    column indices, their bounds masks, and the row pointers of ``x`` / column pointers of the weight (int64)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_cols = w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn
    return offs_m, offs_n, offs_m < M, offs_n < N, x_rows, w_cols


@triton.jit
def bits_as_float(bits, OFFSET: tl.constexpr):
    """``bits - OFFSET`` as exact fp32 for int32 ``bits`` in ``[0, 2**23)``, without an int→float conversion
    (those run at a fraction of the ALU rate): the bits are OR-ed into the mantissa of ``2**23``, then
    ``2**23 + OFFSET`` is subtracted (one constant)."""
    return (bits | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)


@triton.jit
def in_k(ks, K, EVEN_K: tl.constexpr):
    """The bounds mask ``ks < K``; all true when ``EVEN_K`` (K a multiple of BLOCK_K) so loads stay vectorized:
    a mask that varies along the contiguous axis splits a 16-byte load into single elements."""
    if EVEN_K:
        return tl.full(ks.shape, 1, tl.int1)
    return ks < K


@triton.jit
def tile_start(k0, BLOCK_K: tl.constexpr):
    """``k0`` with its alignment stated: split ranges start on whole tiles, and without the hint the compiler
    cannot prove it through the loop, so it loads packed bytes one at a time."""
    return tl.multiple_of(k0, BLOCK_K)


@triton.jit
def split_k_range(K, SPLIT_K, BLOCK_K: tl.constexpr):
    """``[k_begin, k_end)`` of program 1-axis id: whole ``BLOCK_K`` tiles, the last split may be short or empty."""
    tiles = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_begin = tl.program_id(1) * tiles * BLOCK_K
    k_end = tl.minimum(k_begin + tiles * BLOCK_K, K)
    return k_begin, k_end


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, work_ptr, count_ptr, SPLIT_K, SPLIT: tl.constexpr):
    """Write the fp32 ``acc [BLOCK_M, BLOCK_N]`` of program ``(tile, split)`` to ``out`` in out's dtype.

    Without ``SPLIT`` the tile is stored. With it, the splits of a tile add their partial sums atomically into the
    fp32 workspace ``work [M, N]`` and count themselves in ``count[tile]``; the last to arrive reads the total (an
    atomic read, served at L2), stores it, and zeroes its workspace tile and counter. The workspace is therefore
    all zeros again when the kernel ends: one launch, no memset before and no cast kernel after.
    Ordering: every thread's adds happen before the barrier, the counter update releases them at GPU scope and
    the last split acquires them (the pattern of CUTLASS's split-K semaphore); atomics are served at L2.
    """
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    if SPLIT:
        work = work_ptr + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.atomic_add(work, acc, mask=mask, sem="relaxed")
        tl.debug_barrier()
        tile = tl.program_id(0)
        arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.atomic_add(work, tl.zeros_like(acc), mask=mask, sem="relaxed")  # read at L2, coherent
            total = tl.where(mask, total, 0.0)  # masked lanes of an atomic return nothing defined
            tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(work, tl.zeros_like(acc), mask=mask)
            tl.store(count_ptr + tile, 0)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_bias(bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    """``bias[offs_n]`` as fp32 ``[1, BLOCK_N]``, added by split 0 only (zeros elsewhere or without bias)."""
    if HAS_BIAS:
        first_split = tl.program_id(1) == 0
        bias = tl.load(bias_ptr + offs_n, mask=(offs_n < N) & first_split, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    return bias[None, :]
