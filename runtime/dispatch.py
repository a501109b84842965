"""Kernel choice: one table of ``(device type, supports predicate, kernel)`` rows, looked up in one place.

Kernel modules (``qcompile.codegen.cpp``, ``qcompile.codegen.triton``) call :func:`register_kernel`
when they are imported; the ``qcompile::linear`` op asks :func:`choose_kernel`, which validates the call
and consults :func:`select_kernel` once per call signature, and runs the scheme's plain-PyTorch reference
when no row supports the call, saying so once per (device, scheme, reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
from typing import Callable

import torch
import torch._functorch.config  # noqa: F401 - torch._functorch.config is read below

from qcompile.schemes import Scheme, parse_scheme

log = logging.getLogger("qcompile")


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """A fast implementation of ``qcompile::linear`` for some schemes on one device type.

    ``supports(scheme, x, qweight, scales, zeros) -> str | None`` returns ``None`` when the kernel can
    serve the call, else a short reason (shown in the fallback notice).
    ``run(scheme, x, qweight, scales, zeros, bias) -> Tensor`` computes the result.
    ``bind(scheme, x, qweight, scales, zeros, bias) -> launch`` (optional) returns a launcher specialized to
    one call signature, ``launch(x, qweight, scales, zeros, bias) -> Tensor``: per-shape constants are worked
    out once, so a decode step pays only for the kernel call.
    ``inline(launch, x, qweight, scales, zeros, bias) -> Tensor`` (optional) runs this row's ``launch`` (from
    ``bind``) so that a graph tracer records what it does, kernel launches included (``torch.library.wrap_triton``):
    inductor then compiles them in place of one opaque op (:func:`inline_launches`).
    """

    name: str
    device_type: str
    supports: Callable[..., str | None]
    run: Callable[..., torch.Tensor]
    priority: int = 0
    bind: Callable[..., Callable[..., torch.Tensor]] | None = None
    inline: Callable[..., torch.Tensor] | None = None

    def launcher(self, scheme: Scheme, x, qweight, scales, zeros, bias) -> Callable[..., torch.Tensor]:
        if self.bind is not None:
            return self.bind(scheme, x, qweight, scales, zeros, bias)
        run = self.run
        return lambda x, qweight, scales, zeros, bias: run(scheme, x, qweight, scales, zeros, bias)


_KERNELS: list[KernelEntry] = []
#: (call signature) → (chosen kernel row or None, launcher); a signature is validated and dispatched once
_CHOICES: dict[tuple, tuple] = {}
_MAX_CHOICES = 4096
_NOTIFIED: set[tuple] = set()
_BUILTIN_MODULES = ("qcompile.codegen.cpp", "qcompile.codegen.triton")
_builtin_loaded = False


def load_builtin_kernels() -> None:
    """Import the built-in kernel packages once; each calls :func:`register_kernel` for what it has.

    A package that fails to import (no compiler, no triton) is reported once and skipped: the reference
    path keeps serving its calls.
    """
    global _builtin_loaded
    if _builtin_loaded:
        return
    _builtin_loaded = True
    import importlib

    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module).register()
        except Exception as error:  # noqa: BLE001 - a broken kernel package must not break the op
            warnings.warn(f"qcompile: kernels from {module} are unavailable ({error}); using the reference path")


def register_kernel(entry: KernelEntry) -> None:
    """Add (or replace, by name) a kernel row."""
    _KERNELS[:] = [k for k in _KERNELS if k.name != entry.name]
    _KERNELS.append(entry)
    _KERNELS.sort(key=lambda k: -k.priority)
    _forget_choices()


def unregister_kernel(name: str) -> None:
    _KERNELS[:] = [k for k in _KERNELS if k.name != name]
    _forget_choices()


_forget_hooks: list[Callable[[], None]] = []


def on_forget(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever memoized choices are dropped (kernel modules that keep their own plans)."""
    if hook not in _forget_hooks:
        _forget_hooks.append(hook)


def _forget_choices() -> None:
    """Memoized choices are stale once the table changes."""
    _CHOICES.clear()
    for hook in _forget_hooks:
        hook()


def registered_kernels() -> list[KernelEntry]:
    return list(_KERNELS)


def select_kernel(scheme: Scheme, x, qweight, scales, zeros) -> tuple[KernelEntry | None, str]:
    """The first kernel row that supports the call, or ``(None, reasons)``."""
    load_builtin_kernels()
    reasons = []
    for entry in _KERNELS:
        if entry.device_type != x.device.type:
            continue
        reason = entry.supports(scheme, x, qweight, scales, zeros)
        if reason is None:
            return entry, ""
        reasons.append(f"{entry.name}: {reason}")
    return None, "; ".join(reasons) or f"no fast kernel is registered for {x.device.type}"


def notify_fallback(scheme: Scheme, device_type: str, reason: str) -> None:
    """Say once per (device, scheme, reason) that the reference path serves a call."""
    key = (device_type, scheme.name, reason)
    if key in _NOTIFIED:
        return
    _NOTIFIED.add(key)
    message = f"qcompile: {scheme.name} on {device_type} runs the reference path ({reason})"
    if device_type != "cpu" or any(k.device_type == device_type for k in _KERNELS):
        warnings.warn(message, stacklevel=3)
    else:
        log.info(message)


def _signature(scheme: str, x, qweight, scales, zeros, bias) -> tuple:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    bucket = rows if x.device.type != "cpu" else min(rows, 256)  # GPU paths pick by M; CPU only by M >= 256
    return (scheme, x.device, x.dtype, x.shape[-1], bucket, tuple(qweight.shape), qweight.dtype,
            tuple(scales.shape), scales.dtype, None if zeros is None else zeros.dtype,
            None if bias is None else bias.dtype)  # fmt: skip


def _choose(scheme: str, x, qweight, scales, zeros, bias) -> tuple:
    key = _signature(scheme, x, qweight, scales, zeros, bias)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    parsed = parse_scheme(scheme)
    if x.shape[-1] == 0:
        raise ValueError("qcompile::linear: the activation has no features")
    parsed.check_packed(qweight, scales, zeros, x.shape[-1])
    kernel, reason = select_kernel(parsed, x, qweight, scales, zeros)
    if kernel is None:
        notify_fallback(parsed, x.device.type, reason)
        reference = parsed.reference_linear
        choice = (None, reference)
    else:
        choice = (kernel, kernel.launcher(parsed, x, qweight, scales, zeros, bias))
    if len(_CHOICES) >= _MAX_CHOICES:
        _forget_choices()
    _CHOICES[key] = choice
    return choice


def choose_kernel(scheme: str, x, qweight, scales, zeros, bias) -> KernelEntry | None:
    """Validate the packed tensors against the scheme and pick a kernel row, once per call signature."""
    return _choose(scheme, x, qweight, scales, zeros, bias)[0]


def launcher(scheme: str, x, qweight, scales, zeros, bias) -> Callable[..., torch.Tensor]:
    """``launch(x, qweight, scales, zeros, bias) -> y`` for this call signature: the chosen kernel, bound to
    the signature where the row can be, else the scheme's reference (the fallback notice is said once)."""
    return _choose(scheme, x, qweight, scales, zeros, bias)[1]


# -- inlined launches ---------------------------------------------------------------------------------------------
#: ``QCOMPILE_INLINE_KERNELS=1`` inlines kernel launches wherever ``qcompile::linear`` is functionalized
INLINE_ENV = "QCOMPILE_INLINE_KERNELS"


class _InlineState(threading.local):
    enabled: bool | None = None  # None: the environment variable decides


_INLINE = _InlineState()
_INLINE_WARNED: set[str] = set()


@contextlib.contextmanager
def inline_kernels(enabled: bool = True):
    """Within this block (or everywhere, with ``QCOMPILE_INLINE_KERNELS=1``) a ``qcompile::linear`` call that
    AOTAutograd functionalizes, as inductor's ``compile_fx`` does, becomes the launches of the row that serves it
    where the row can say them (:attr:`KernelEntry.inline`): inductor then compiles and launches those kernels
    itself, with no Python dispatch per call. ``torch.export`` keeps the op whole. AOTAutograd's cache keys a
    graph as it was before functionalization, so it does not tell an inlined compile from an opaque one: compile
    with it off (``torch._functorch.config.enable_autograd_cache = False``, as the qcompile backend does while it
    inlines, or ``TORCHINDUCTOR_AUTOGRAD_CACHE=0``)."""
    previous = _INLINE.enabled
    _INLINE.enabled = enabled
    try:
        yield
    finally:
        _INLINE.enabled = previous


def inlining() -> bool:
    """Whether ``qcompile::linear`` calls are inlined when functionalized (:func:`inline_kernels`)."""
    enabled = _INLINE.enabled
    return os.environ.get(INLINE_ENV) == "1" if enabled is None else enabled


def inline_launches(mode, args: tuple, kwargs: dict):
    """The functionalization rule of ``qcompile::linear`` (registered by ``runtime.ops``): the serving row's
    launches traced under ``mode``, or ``NotImplemented`` for the op to stay whole (inlining off, an export,
    CPU tensors, symbolic sizes, no row that can inline the call, or a row whose tracing failed, which is said
    once)."""
    if not inlining():
        return NotImplemented
    if not getattr(torch._functorch.config, "decompose_custom_triton_ops", True):  # torch.export sets it off
        return NotImplemented
    x, qweight, scales, zeros, bias, scheme = _linear_args(*args, **kwargs)
    if x.device.type == "cpu" or not all(isinstance(size, int) for size in x.shape):
        return NotImplemented  # symbolic sizes: the launch config depends on M, so one graph per M bucket would result
    entry = None
    try:
        with mode:
            # the launcher eager calls of this signature use: its configs and launches (and any stage count lowered
            # to fit the device's shared memory) serve every trace of the signature too
            entry, launch = _choose(scheme, x, qweight, scales, zeros, bias)
            if entry is None or entry.inline is None:
                return NotImplemented
            return entry.inline(launch, x, qweight, scales, zeros, bias)
    except Exception as error:  # noqa: BLE001 - the whole op still serves the call
        row = "the kernel choice" if entry is None else entry.name
        message = f"qcompile: {row} could not be inlined for {scheme} ({error}); the call stays one op"
        if message not in _INLINE_WARNED:
            _INLINE_WARNED.add(message)
            warnings.warn(message)
        return NotImplemented


def _linear_args(x, qweight, scales, zeros, bias, scheme):
    return x, qweight, scales, zeros, bias, scheme
