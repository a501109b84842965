"""Helpers shared by the Triton kernel families: interpreter detection, M buckets, dtypes, activation views, and
the switch that makes launches traceable (:func:`traced_launches`).

Nothing here launches a kernel. The kernel modules (``int4``, ``w8a16``, ``w8a8``) import triton at module
level; this module does too, so import it only after checking :func:`triton_missing`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import threading

import torch

#: activation dtypes the kernels take; everything else runs the reference path
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: largest M that the GEMV (``tl.sum``) path serves; larger M up to ``SPLITK_MAX_M`` use split-K ``tl.dot``
GEMV_MAX_M = 4
SPLITK_MAX_M = 16


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_missing() -> str | None:
    """``None`` when triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        import triton.language  # noqa: F401
    except Exception as error:  # noqa: BLE001 - a broken install is a reason, not a crash
        return f"triton fails to import ({error})"
    return None


def triton_version() -> str:
    import triton

    return triton.__version__


def device_name(device: torch.device) -> str:
    """The name tuned configs are keyed by: the CUDA device name, or ``"interpreter"`` on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "interpreter"


def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


def m_bucket(m: int) -> int:
    """Round M up to a power of two (capped at 4096): tuned configs are shared within a bucket."""
    bucket = 1
    while bucket < m and bucket < 4096:
        bucket *= 2
    return bucket


def path_for_m(m: int) -> str:
    """The default kernel path for ``m`` activation rows: ``gemv``, ``splitk`` or ``gemm``."""
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk"
    return "gemm"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (``triton.cdiv`` is a jit function: slow to call from Python)."""
    return -(-a // b)


def next_power_of_2(value: int) -> int:
    out = 1
    while out < value:
        out *= 2
    return out


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` → ``[M, K]`` with unit stride along K (copies only when it must; ``x`` itself when it is
    already such rows, the common case, which skips the reshape on a launch's hot path)."""
    if x.dim() == 2 and x.stride(1) == 1:
        return x
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def as_input_shape(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``out [M, N]`` computed from the rows of ``x [..., K]``, shaped ``[..., N]`` like ``x``."""
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out.shape[-1])


def dot_dtype(x_dtype: torch.dtype):
    """The ``tl`` dtype the weight tile is dequantized to before ``tl.dot``: the activation's own dtype.

    The interpreter computes bf16 dots wrongly, so there bf16 activations get fp32 dots (the reference math);
    fp16 and fp32 dots are right there. fp32 dots run at ``ieee`` precision, see :func:`dot_precision`.
    """
    return tl_dtype(torch.float32 if interpreting() and x_dtype == torch.bfloat16 else x_dtype)


def tl_dtype(dtype: torch.dtype):
    """The ``tl`` dtype of a float ``torch`` dtype (fp16, bf16, fp32)."""
    import triton.language as tl

    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def dot_precision(x_dtype: torch.dtype) -> str:
    """fp32 activations get exact fp32 products (``ieee``), not TF32 tensor cores: the reference is fp32 math."""
    return "ieee" if x_dtype == torch.float32 else "tf32"


#: packed-tensor signatures already validated: (scheme, K, then shape and dtype of each tensor)
def prepare_rows(x: torch.Tensor, qweight, scales, zeros, scheme, where: str):
    """Check a launcher's activation and flatten ``x [..., K]`` to rows: ``(x2 [M, K], M, N, K)``.

    The packed tensors were checked against the scheme's declared specs where the call was bound
    (``dispatch`` checks them once per signature, with the choice it memoizes); direct callers pass packed
    tensors that the scheme itself wrote.
    """
    check_activation(x, f"{where}({scheme.name})")
    x2 = as_rows(x)
    return x2, x2.shape[0], scales.shape[0], x.shape[-1]


def check_activation(x: torch.Tensor, where: str) -> None:
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"{where}: activations must be float16, bfloat16 or float32, got {x.dtype}")
    if x.shape[-1] == 0:
        raise ValueError(f"{where}: the activation has no features")


# -- traced launches -----------------------------------------------------------------------------------------------
class _TraceState(threading.local):
    state = None  # (real_tensors,) while tracing; a class default, so a lookup never raises on the hot path


_TRACE = _TraceState()


@contextlib.contextmanager
def traced_launches(real_tensors=None):
    """Within this block the launchers emit traceable launches (``torch.library.wrap_triton``): a graph being
    captured for inductor records each kernel call rather than running it. No traced tensor's memory is touched:
    split-K workspaces are allocated in the graph and word alignment is read from storage offsets.
    ``real_tensors(tensors) -> tuple | None`` (optional) makes real tensors shaped like a launch's traced ones, on
    which a key without a tuned config is tuned and an untried config launched once, outside the trace
    (``autotune.BoundLaunches``); without it, or when it returns ``None``, the default config is traced untried."""
    previous = _TRACE.state
    _TRACE.state = (real_tensors,)
    try:
        yield
    finally:
        _TRACE.state = previous


def tracing() -> bool:
    """Whether launches are being traced (:func:`traced_launches`)."""
    return _TRACE.state is not None


def tuning_tensors(tensors: tuple) -> tuple | None:
    """Real tensors shaped like the traced ``tensors`` to tune on, made outside the trace, or ``None`` (see
    :func:`traced_launches`)."""
    state = _TRACE.state
    make = None if state is None else state[0]
    if make is None:
        return None
    with untraced():
        return make(tensors)


@contextlib.contextmanager
def untraced():
    """Launch for real inside a traced block (the tuning of a key met while tracing): the tracer's dispatch modes
    (functionalization, fake tensors, the graph proxy) are set aside until the block ends."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.utils._python_dispatch import _disable_current_modes

    previous = _TRACE.state
    _TRACE.state = None
    try:
        with _disable_current_modes(), unset_fake_temporarily():
            yield
    finally:
        _TRACE.state = previous


def kernel(jit_function):
    """``jit_function`` itself, or while tracing the ``wrap_triton`` wrapper that a graph records calls of."""
    if _TRACE.state is None:
        return jit_function
    from torch.library import wrap_triton

    return wrap_triton(jit_function)


def word_aligned(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s first element sits on a 4-byte boundary (int32 word loads). While tracing there is no
    address: the storage offset decides (storages themselves start aligned)."""
    if _TRACE.state is None:
        return tensor.data_ptr() % 4 == 0
    return tensor.storage_offset() * tensor.element_size() % 4 == 0


def no_workspace(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace arguments of a launch that does not split K (the kernel never touches them): ``out`` twice, or
    while tracing two empty tensors, since a traced launch's arguments must not alias the output it writes."""
    if _TRACE.state is None:
        return out, out
    return (torch.empty(0, device=out.device, dtype=torch.float32),
            torch.empty(0, device=out.device, dtype=torch.int32))  # fmt: skip


#: split-K workspaces by (device, stream): (fp32 sums, int32 tile counters), all zeros between launches
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
#: every workspace ever handed out stays alive: a captured CUDA graph may still point at an outgrown one
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def split_workspace(device: torch.device, elements: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroed ``(float32 [>= elements], int32 [>= tiles])`` workspace of split-K launches on this stream.

    The kernels leave it zeroed (``tiles.store_tile``), so it is allocated once, grown by powers of two, and keyed
    by stream so launches on concurrent streams never share one. While tracing it is a fresh zeroed pair in the
    graph (a captured graph cannot hold on to this process's buffers).
    """
    if _TRACE.state is not None:
        return (torch.zeros(elements, device=device, dtype=torch.float32),
                torch.zeros(tiles, device=device, dtype=torch.int32))  # fmt: skip
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    work, counts = _WORKSPACES.get(key, (None, None))
    if work is None or work.numel() < elements or counts.numel() < tiles:
        if work is not None:
            _RETIRED.append((work, counts))
        size = next_power_of_2(max(elements, 1 << 16, 0 if work is None else work.numel()))
        count = next_power_of_2(max(tiles, 1 << 10, 0 if counts is None else counts.numel()))
        work = torch.zeros(size, device=device, dtype=torch.float32)
        counts = torch.zeros(count, device=device, dtype=torch.int32)
        _WORKSPACES[key] = (work, counts)
    return work, counts


_SHRUNK: set[str] = set()


@functools.cache
def _out_of_resources() -> type:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def fewer_stages(error: Exception, kwargs: dict, what) -> bool:
    """Whether a launch that raised ``error`` should be retried: true when triton reported that the kernel needs
    more shared memory than the device has and ``kwargs["num_stages"]`` could be lowered by one (it is, in place,
    so later calls start from what fits). Logged at the first step down for each ``what`` (logger ``qcompile``,
    level INFO; ``what`` is any object whose ``str`` names the launch, formatted only on such a retry). Tiles tuned
    on a GPU with much shared memory (an H100 has 227 KB a block) then still run on smaller ones (an L40S or RTX
    4090: 99 KB). Launchers call this in an ``except`` clause, so a launch that fits pays nothing for it."""
    if not isinstance(error, _out_of_resources()) or error.name != "shared memory" or kwargs.get("num_stages", 1) <= 1:
        return False
    kwargs["num_stages"] -= 1
    what = str(what)
    if what not in _SHRUNK:
        _SHRUNK.add(what)
        logging.getLogger("qcompile").info(
            "%s needs %s bytes of shared memory, the device has %s: running it with %d pipeline stages",
            what, error.required, error.limit, kwargs["num_stages"],
        )  # fmt: skip
    return True
