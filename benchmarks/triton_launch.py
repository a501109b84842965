"""Python work per call of the Triton launchers: what an eager decode step pays besides the GPU kernels.

    python benchmarks/triton_launch.py              # on any machine: kernel launches stubbed out
    python benchmarks/triton_launch.py --device cuda  # on a GPU: also the real eager op against F.linear

Each row is the median of ``--repeats`` batches of ``--calls`` calls, in microseconds per call, for one
4096 x 4096 layer at M=1 (bf16 activations). "bind every call" is the launcher as a function (``int4_linear``
etc.: it binds, i.e. validates, looks the config up and builds the kernel arguments, then launches, on every call;
that is the work every call did before the dispatch rows kept bound launchers: the previous revision's int4
launcher measured 78 µs on the host of the table in docs/gpu-kernels.md); "bound" is what
``torch.ops.qcompile.linear`` runs per call now (``dispatch.launcher`` → the row's ``bind``). With the
launches stubbed, Triton's own launch cost (its argument binding and the driver call) is left out: it comes on top
of both rows. With ``--device cuda`` the stub is off and the rows include that cost and the kernel; the op's
eager call and ``F.linear`` are timed the same way, each call synchronized.
"""

from __future__ import annotations

import argparse
import contextlib

import torch

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.codegen.triton import int4, w8a8, w8a16
from qcompile.schemes import parse_scheme
from timing import median_ms

FAMILIES = (("int4-g128", int4, "int4_linear", ("int4_linear_kernel", "int4_gemv_kernel")),
            ("int8", w8a16, "w8a16_linear", ("w8a16_linear_kernel",)),
            ("w8a8", w8a8, "w8a8_linear", ("w8a8_linear_kernel", "quantize_rows_kernel")))  # fmt: skip


class _Stub:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def stubbed(module, names):
    saved = {name: getattr(module, name) for name in names}
    try:
        for name in names:
            setattr(module, name, _Stub())
        yield
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def per_call_us(fn, calls: int, repeats: int, sync) -> float:
    def batch():
        for _ in range(calls):
            fn()
        sync()

    return median_ms(batch, repeats) * 1e3 / calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    k = n = 4096
    x = torch.randn(1, k, dtype=torch.bfloat16, device=device)
    cuda = device.type == "cuda"
    print(f"# µs per call, M=1, {k}x{n}, bf16 activations, {'real kernels' if cuda else 'launches stubbed'}")
    print("| scheme | bind every call | bound launcher | saved |" + (" op (eager) | F.linear bf16 |" if cuda else ""))
    print("|---|---|---|---|" + ("---|---|" if cuda else ""))
    dense = torch.randn(n, k, dtype=torch.bfloat16, device=device)
    for name, module, launcher_name, kernels in FAMILIES:
        scheme = parse_scheme(name)
        packed = scheme.pack(scheme.quantize(torch.randn(n, k) * 0.02))
        q, s, z = (None if t is None else t.to(device) for t in (packed.qweight, packed.scales, packed.get("zeros")))
        launcher = getattr(module, launcher_name)
        with contextlib.nullcontext() if cuda else stubbed(module, kernels):
            unbound = per_call_us(lambda: launcher(x, q, s, z, None, scheme), args.calls, args.repeats, sync)
            bound_launch = module.bind(scheme, x, q, s, z, None)
            bound = per_call_us(lambda: bound_launch(x, q, s, z, None), args.calls, args.repeats, sync)
        row = f"| {name} | {unbound:.1f} | {bound:.1f} | {unbound - bound:.1f} |"
        if cuda:
            tensors = packed.to(device).list()
            op = per_call_us(lambda: torch.ops.qcompile.linear(x, tensors, None, name, k, n), args.calls, args.repeats,
                             sync)  # fmt: skip
            linear = per_call_us(lambda: torch.nn.functional.linear(x, dense), args.calls, args.repeats, sync)
            row += f" {op:.1f} | {linear:.1f} |"
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
