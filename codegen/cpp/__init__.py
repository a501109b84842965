"""C++ kernels for ``qcompile::linear`` on CPUs (registered in ``qcompile.runtime.dispatch``).

``register()`` compiles the sources of this package once (cached on disk, see ``build.py``), then adds:

| kernel        | schemes                                  | activations        |
|---------------|------------------------------------------|--------------------|
| `cpp-w8a16`   | `int8`, `int8-gN`, `int8-asym`           | float32, bfloat16  |
| `cpp-w4a16`   | `int4`, `int4-gN`, symmetric or not      | float32, bfloat16  |
| `cpp-w8a8`    | `w8a8`                                   | float32, bfloat16  |
| `cpp-w4a8`    | `w4a8-gN`, symmetric or not              | float32, bfloat16  |

Other schemes (int3, int2, nf4, fp8) get a reason from ``supports`` and run the reference path.
The same kernels also back a C++ dispatcher kernel for CPU tensors (``op.py``), so decode-sized calls skip Python.
"""

from __future__ import annotations

import warnings

from qcompile.runtime.dispatch import KernelEntry, on_forget, register_kernel

PRIORITY = 10


def register() -> None:
    """Build or load the library and register the CPU kernel rows; without a compiler, register nothing."""
    from qcompile.codegen.cpp import build, kernels, library, op

    try:
        library.load()
    except build.CompilerError as error:
        warnings.warn(f"qcompile: C++ CPU kernels are unavailable, CPU calls use the reference path ({error})")
        return
    op.load()
    on_forget(op.forget)

    def only_bits(bits):
        def supports(scheme, x, qweight, scales, zeros):
            reason = kernels.weight_only_supports(scheme, x, qweight, scales, zeros)
            if reason is None and scheme.bits != bits:
                return f"{scheme.name} is served by another row"
            return reason

        return supports

    for name, bits in (("cpp-w8a16", 8), ("cpp-w4a16", 4)):
        register_kernel(KernelEntry(name, "cpu", only_bits(bits), kernels.weight_only_run, PRIORITY,
                                    kernels.weight_only_bind))  # fmt: skip
    register_kernel(KernelEntry("cpp-w8a8", "cpu", kernels.w8a8_supports, kernels.w8a8_run, PRIORITY,
                                kernels.w8a8_bind))  # fmt: skip
    register_kernel(KernelEntry("cpp-w4a8", "cpu", kernels.w4a8_supports, kernels.w4a8_run, PRIORITY,
                                kernels.w4a8_bind))  # fmt: skip
