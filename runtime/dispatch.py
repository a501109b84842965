"""Kernel choice: one table of ``(device type, supports predicate, kernel)`` rows, looked up in one place.

Kernel modules (``qcompile.codegen.cpp``, ``qcompile.codegen.triton``) call :func:`register_kernel`
when they are imported; the ``qcompile::linear`` op asks :func:`select_kernel` for every call and runs
the scheme's plain-PyTorch reference when no row supports the call, saying so once per
(device, scheme, reason).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Callable

import torch

from qcompile.schemes import Scheme

log = logging.getLogger("qcompile")


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """A fast implementation of ``qcompile::linear`` for some schemes on one device type.

    ``supports(scheme, x, qweight, scales, zeros) -> str | None`` returns ``None`` when the kernel can
    serve the call, else a short reason (shown in the fallback notice).
    ``run(scheme, x, qweight, scales, zeros, bias) -> Tensor`` computes the result.
    """

    name: str
    device_type: str
    supports: Callable[..., str | None]
    run: Callable[..., torch.Tensor]
    priority: int = 0


_KERNELS: list[KernelEntry] = []
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


def _forget_choices() -> None:
    import sys

    ops = sys.modules.get("qcompile.runtime.ops")
    if ops is not None:
        ops.forget_choices()


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
