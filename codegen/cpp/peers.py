"""C++ rows of the peer families (``quanto``, ``torchao``, ``eetq``; :mod:`qcompile.schemes.peers`).

* Weight-only peer schemes keep an ``int-weight-only`` layout (``int8``, ``int4-gN``): that family's CPU rows serve
  them as they are (:mod:`qcompile.codegen.layout_rows`); 2-bit grids and ``fp8`` have no C++ kernel.
* quanto ``-a8`` (static per-tensor int8 activations) and torchao ``int8-a8`` (dynamic per-token int8, torchao's
  ``absmax / 127.5`` rule) run ``linear_peer_a8`` (``kernels/peer_a8.h``), bit for bit the reference.
"""

from __future__ import annotations

from qcompile.codegen import cpp, layout_rows
from qcompile.codegen.cpp import launch
from qcompile.runtime.dispatch import KernelEntry

#: ``activation_mode`` → the kernel's ``ints[0]``
MODES = {"static-int8": 0, "token-int8": 1}


def a8_supports(scheme, x, packed) -> str | None:
    mode = getattr(scheme, "activation_mode", None)
    if mode not in MODES:
        return f"linear_peer_a8 takes int8 activations, {scheme.name} has {mode or 'none (weight-only)'}"
    return launch.activation_reason(x)


def a8_bind(scheme, x, packed, bias, n):
    return launch.bind_kernel(scheme, "linear_peer_a8", x, packed, bias, n, (MODES[scheme.activation_mode],))


def kernel_entries(family: str) -> list[KernelEntry]:
    """The CPU rows of ``family`` (none without a C++ compiler)."""
    if not cpp.available():
        return []
    own = KernelEntry(f"cpp-{family}-a8", "cpu", (family,), a8_supports, a8_bind, cpp.PRIORITY)
    return [*layout_rows.delegated_entries(family, "cpu"), own]
