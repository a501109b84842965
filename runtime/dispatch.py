"""Kernel choice: per scheme family, one table of ``(device type, supports predicate, launcher)`` rows, looked up in
one place.

Each family names the modules that hold its kernel rows (``Family.kernels`` in :mod:`qcompile.schemes.registry`);
the first call of a family imports them and adds their ``kernel_entries(family)``. The ``qcompile::linear`` op asks
:func:`launcher`, which validates the call against the scheme's declared tensors and consults :func:`select_kernel`
once per call signature (the one memo of per-signature choices), and runs the scheme's plain-PyTorch reference
when no row supports the call, saying so once per (device, scheme, reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import threading
import warnings
from typing import Callable

import torch
import torch._functorch.config  # noqa: F401 - torch._functorch.config is read below

from qcompile.schemes import Scheme, families, family, parse_scheme

log = logging.getLogger("qcompile")


@dataclasses.dataclass(frozen=True)
class KernelEntry:
    """A fast implementation of ``qcompile::linear`` for schemes of some ``families`` on one device type.

    ``supports(scheme, x, packed) -> str | None`` returns ``None`` when the kernel can serve the call, else a
    short reason (shown in the fallback notice). ``packed`` is the scheme's tensor list, already checked against
    its declaration.
    ``bind(scheme, x, packed, bias, out_features) -> launch`` returns a launcher specialized to one call
    signature, ``launch(x, packed, bias) -> Tensor``: per-shape constants are worked out once, so a decode step
    pays only for the kernel call.
    ``inline(launch, x, packed, bias) -> Tensor`` (optional) runs this row's ``launch`` so that a graph tracer
    records what it does, kernel launches included (``torch.library.wrap_triton``): inductor then compiles them
    in place of one opaque op (:func:`inline_launches`).
    """

    name: str
    device_type: str
    families: tuple[str, ...]
    supports: Callable[..., str | None]
    bind: Callable[..., Callable[..., torch.Tensor]]
    priority: int = 0
    inline: Callable[..., torch.Tensor] | None = None


#: (call signature) → (chosen kernel row or None, launcher); a signature is validated and dispatched once
_CHOICES: dict[tuple, tuple] = {}
_MAX_CHOICES = 4096
_NOTIFIED: set[tuple] = set()


def load_family_kernels(name: str) -> None:
    """Import the kernel modules of family ``name`` once; each gives its rows with ``kernel_entries(name)``.

    A module that fails to import or to build (no compiler, no triton) is reported once and skipped: the
    reference path keeps serving its calls.
    """
    record = family(name)
    if record.kernels_loaded:
        return
    record.kernels_loaded = True
    for module in record.kernels:
        try:
            entries = importlib.import_module(module).kernel_entries(name)
        except Exception as error:  # noqa: BLE001 - a broken kernel package must not break the op
            warnings.warn(f"qcompile: kernels from {module} are unavailable for {name} ({error}); "
                          "using the reference path")  # fmt: skip
            continue
        for entry in entries:
            register_kernel(entry)


def load_builtin_kernels() -> None:
    """Load the kernel rows of every registered family."""
    for record in families():
        load_family_kernels(record.name)


def register_kernel(entry: KernelEntry) -> None:
    """Add (or replace, by name) a kernel row in the table of each of its families."""
    for name in entry.families:
        rows = family(name).rows
        rows[:] = [k for k in rows if k.name != entry.name]
        rows.append(entry)
        rows.sort(key=lambda k: -k.priority)
    forget_choices()


def unregister_kernel(name: str) -> None:
    for record in families():
        record.rows[:] = [k for k in record.rows if k.name != name]
    forget_choices()


_forget_hooks: list[Callable[[], None]] = []


def on_forget(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever memoized choices are dropped (kernel modules that keep their own plans)."""
    if hook not in _forget_hooks:
        _forget_hooks.append(hook)


def forget_choices() -> None:
    """Drop every memoized choice (and the bound launches it holds): after the table or tuned configs change."""
    _CHOICES.clear()
    for hook in _forget_hooks:
        hook()


def registered_kernels() -> list[KernelEntry]:
    """Every row of every family (each once)."""
    out: dict[str, KernelEntry] = {}
    for record in families():
        for entry in record.rows:
            out.setdefault(entry.name, entry)
    return list(out.values())


def select_kernel(scheme: Scheme, x, packed) -> tuple[KernelEntry | None, str]:
    """The first row of the scheme's family that supports the call, or ``(None, reasons)``."""
    load_family_kernels(scheme.family)
    reasons = []
    for entry in family(scheme.family).rows:
        if entry.device_type != x.device.type:
            continue
        reason = entry.supports(scheme, x, packed)
        if reason is None:
            return entry, ""
        reasons.append(f"{entry.name}: {reason}")
    return None, "; ".join(reasons) or f"no fast kernel is registered for {scheme.family} on {x.device.type}"


def notify_fallback(scheme: Scheme, device_type: str, reason: str) -> None:
    """Say once per (device, scheme, reason) that the reference path serves a call."""
    key = (device_type, scheme.name, reason)
    if key in _NOTIFIED:
        return
    _NOTIFIED.add(key)
    message = f"qcompile: {scheme.name} on {device_type} runs the reference path ({reason})"
    if device_type != "cpu" or any(k.device_type == device_type for k in family(scheme.family).rows):
        warnings.warn(message, stacklevel=3)
    else:
        log.info(message)


def _signature(scheme: str, x, packed, bias, in_features, out_features) -> tuple:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    bucket = rows if x.device.type != "cpu" else min(rows, 256)  # GPU paths pick by M; CPU only by M >= 256
    tensors = tuple((tuple(t.shape), t.dtype) for t in packed)
    return (scheme, x.device, x.dtype, x.shape[-1], bucket, tensors, None if bias is None else bias.dtype,
            in_features, out_features)  # fmt: skip


def _choose(scheme: str, x, packed, bias, in_features, out_features) -> tuple:
    key = _signature(scheme, x, packed, bias, in_features, out_features)
    choice = _CHOICES.get(key)
    if choice is not None:
        return choice
    parsed = parse_scheme(scheme)
    if x.shape[-1] != in_features:
        raise ValueError(f"qcompile::linear ({parsed.name}): the input has {x.shape[-1]} features, the layer takes "
                         f"{in_features}")  # fmt: skip
    if in_features == 0:
        raise ValueError("qcompile::linear: the activation has no features")
    parsed.check_packed(packed, out_features, in_features, where="qcompile::linear")
    kernel, reason = select_kernel(parsed, x, packed)
    if kernel is None:
        notify_fallback(parsed, x.device.type, reason)

        def reference(x, packed, bias, scheme=parsed, n=out_features):
            return scheme.reference_linear(x, packed, bias, n)

        choice = (None, reference)
    else:
        choice = (kernel, kernel.bind(parsed, x, packed, bias, out_features))
    if len(_CHOICES) >= _MAX_CHOICES:
        forget_choices()
    _CHOICES[key] = choice
    return choice


def choose_kernel(scheme: str, x, packed, bias, in_features, out_features) -> KernelEntry | None:
    """Validate the packed tensors against the scheme and pick a kernel row, once per call signature."""
    return _choose(scheme, x, packed, bias, in_features, out_features)[0]


def launcher(scheme: str, x, packed, bias, in_features, out_features) -> Callable[..., torch.Tensor]:
    """``launch(x, packed, bias) -> y`` for this call signature: the chosen kernel, bound to the signature, else
    the scheme's reference (the fallback notice is said once)."""
    return _choose(scheme, x, packed, bias, in_features, out_features)[1]


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
    x, packed, bias, scheme, in_features, out_features = _linear_args(*args, **kwargs)
    if x.device.type == "cpu" or not all(isinstance(size, int) for size in x.shape):
        return NotImplemented  # symbolic sizes: the launch config depends on M, so one graph per M bucket would result
    entry = None
    try:
        with mode:
            # the launcher eager calls of this signature use: its configs and launches (and any stage count lowered
            # to fit the device's shared memory) serve every trace of the signature too
            entry, launch = _choose(scheme, x, packed, bias, in_features, out_features)
            if entry is None or entry.inline is None:
                return NotImplemented
            return entry.inline(launch, x, packed, bias)
    except Exception as error:  # noqa: BLE001 - the whole op still serves the call
        row = "the kernel choice" if entry is None else entry.name
        message = f"qcompile: {row} could not be inlined for {scheme} ({error}); the call stays one op"
        if message not in _INLINE_WARNED:
            _INLINE_WARNED.add(message)
            warnings.warn(message)
        return NotImplemented


def _linear_args(x, packed, bias, scheme, in_features, out_features):
    return x, packed, bias, scheme, in_features, out_features
