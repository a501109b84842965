"""Compile the real kernel launches for a GPU target on any machine, and read what the GPU would run.

Triton's NVIDIA backend (``ptxas`` and ``cuobjdump`` ship with the wheel) compiles a kernel to PTX and SASS without
a GPU. :func:`record` captures the launches a launcher makes (grid, arguments, constexprs) without running them;
:func:`compile_launch` compiles one the way the JIT would on that target (pointer and integer specialization
included); :func:`code_stats` reads the result: global load widths, registers, spills and the instructions of
the main loop. ``python -m qcompile.codegen.triton.asm`` prints them per kernel form;
``tests/codegen/test_kernel_asm.py`` pins the properties that decide memory-bound speed (16-byte weight loads, no
spills, instruction budgets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

#: Hopper (H100/H200) by default
DEFAULT_CAPABILITY = 90

_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.uint8: "u8",
    torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv",
}  # fmt: skip


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: object  # the ``@triton.jit`` function
    grid: tuple
    args: tuple
    kwargs: dict


class _Recorder:
    def __init__(self, kernel, launches: list[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def record(module, *names: str):
    """Within the block, ``module.<name>[grid](...)`` records a :class:`Launch` instead of running; yields the list.
    Outputs the launcher returns are then uninitialized."""
    launches: list[Launch] = []
    saved = {name: getattr(module, name) for name in names}
    try:
        for name, kernel in saved.items():
            setattr(module, name, _Recorder(kernel, launches))
        yield launches
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)


def _signature(launch: Launch):
    """``(signature, constexprs, attrs, options)`` as the JIT would specialize this launch."""
    fn = launch.kernel
    options = {key: launch.kwargs[key] for key in ("num_warps", "num_stages") if key in launch.kwargs}
    values = dict(zip(fn.arg_names, launch.args))
    values.update({key: value for key, value in launch.kwargs.items() if key not in options})
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        value = values[name]
        if index in fn.constexprs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _DTYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:  # the JIT turns integer arguments equal to 1 into constants
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"cannot compile argument {name}={value!r} of {fn.__name__}")
    return signature, constexprs, attrs, options


def compile_launch(launch: Launch, capability: int = DEFAULT_CAPABILITY):
    """The ``CompiledKernel`` of ``launch`` for CUDA ``sm_<capability>``; ``.asm`` holds ``ptx`` and ``cubin``."""
    signature, constexprs, attrs, options = _signature(launch)
    source = ASTSource(launch.kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


@dataclasses.dataclass
class CodeStats:
    """What one compiled kernel does: PTX global loads by width, registers, spills, shared memory, its main loop
    in SASS."""

    loads: Counter  # PTX ``ld.global`` variants, e.g. ``{"ld.global.v4.b32": 2}``
    registers: int
    spills: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block (sm_89 cards have 99 KB, A100 163 KB, H100/H200 227 KB)
    loop_instructions: int  # SASS instructions in the main loop (see _main_loop; 0 without a loop)
    loop_opcodes: Counter

    def widest_loads(self) -> int:
        """Bytes per thread of the widest global load."""
        return max((_load_bytes(variant) for variant in self.loads), default=0)


def _load_bytes(variant: str) -> int:
    parts = variant.split(".")
    lanes = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
    bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bsuf]\d+", p)), 8)
    return lanes * bits // 8


def _cuobjdump(cubin: bytes, flag: str) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([tool, flag, file.name], check=True, capture_output=True, text=True).stdout


def _main_loop(sass: str) -> list[str]:
    """Opcodes of the main loop: the innermost backward-branch loop with the most instructions, leaving out loops of
    TF32 tensor-core instructions (the asymmetric word-form GEMM's zero-term dots after the K loop, which run once
    per 32 K tiles and may be longer than it)."""
    code = [(int(address, 16), text) for address, text in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops: list[list[str]] = []
    for address, text in code:
        branch = re.search(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if not branch or int(branch.group(1), 16) >= address:
            continue
        body = [t for a, t in code if int(branch.group(1), 16) <= a <= address]
        loops.append([t.split()[1] if t.startswith("@") else t.split()[0] for t in body])
    main = [ops for ops in loops if not any("MMA" in op and "TF32" in op for op in ops)] or loops
    return max(main, key=len, default=[])


def code_stats(compiled) -> CodeStats:
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    loop = _main_loop(_cuobjdump(cubin, "-sass"))
    usage = dict(re.findall(r"\b(REG|LOCAL):(\d+)", _cuobjdump(cubin, "-res-usage")))
    return CodeStats(
        loads=Counter(re.findall(r"\bld\.global[.\w]*", ptx)),
        registers=int(usage["REG"]),
        spills=int(usage["LOCAL"]),
        shared=int(compiled.metadata.shared),
        loop_instructions=len(loop),
        loop_opcodes=Counter(op.split(".")[0] for op in loop),
    )


# -- the report: real launches of each kernel form ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One launcher call to compile: family (``int4``/``w8a16``/``w8a8``), scheme, path, M, K, N and config."""

    family: str
    scheme: str
    path: str
    m: int
    k: int
    n: int
    config: object  # autotune.KernelConfig

    @property
    def label(self) -> str:
        return f"{self.scheme} {self.path} M={self.m} {self.config.label}"


def record_case(case: Case) -> list[Launch]:
    """The kernel launches ``case`` makes (CPU tensors; nothing runs)."""
    from qcompile.codegen.triton import int4, w8a8, w8a16
    from qcompile.schemes import parse_scheme

    scheme = parse_scheme(case.scheme)
    packed = scheme.pack(scheme.quantize(torch.randn(case.n, case.k) * 0.05))
    x = torch.randn(case.m, case.k, dtype=torch.bfloat16)
    module, launcher, names = {
        "int4": (
            int4,
            int4.int4_linear,
            ("int4_linear_kernel", "int4_gemv_kernel", "int4_dequantize_kernel", "tile_sums_kernel"),
        ),
        "w8a16": (w8a16, w8a16.w8a16_linear, ("w8a16_linear_kernel", "w8_dequantize_kernel")),
        "w8a8": (w8a8, w8a8.w8a8_linear, ("w8a8_linear_kernel", "quantize_rows_kernel")),
    }[case.family]
    extra = {} if case.family == "w8a8" else {"path": case.path}
    with record(module, *names) as launches:
        launcher(x, packed.qweight, packed.scales, packed.get("zeros"), None, scheme, config=case.config, **extra)
    return launches


def weight_bytes_per_thread(case: Case, launch: Launch) -> float:
    """Packed weight bytes one thread loads per main-loop iteration of ``launch`` (its BLOCK_N x BLOCK_K tile)."""
    kw = launch.kwargs
    threads = 32 * kw.get("num_warps", 4)
    bits = 4 if case.family == "int4" else 8
    return kw["BLOCK_N"] * kw["BLOCK_K"] * bits / 8 / threads


def report_rows(cases, capability: int = DEFAULT_CAPABILITY) -> list[dict]:
    rows = []
    for case in cases:
        for launch in record_case(case):
            stats = code_stats(compile_launch(launch, capability))
            row = {"case": case.label, "kernel": launch.kernel.__name__, "loads": dict(stats.loads),
                   "widest_load": stats.widest_loads(), "registers": stats.registers, "spills": stats.spills,
                   "shared_kb": round(stats.shared / 1024, 1),
                   "loop_instructions": stats.loop_instructions}  # fmt: skip
            if "BLOCK_N" in launch.kwargs and "dequantize" not in launch.kernel.__name__:
                per_thread = weight_bytes_per_thread(case, launch)
                row["instructions_per_weight_byte"] = round(stats.loop_instructions / per_thread, 2)
            rows.append(row)
    return rows


def default_cases(k: int = 4096, n: int = 14336) -> list[Case]:
    """The forms that matter at decode and prefill on a Llama-8B-like shape: the GPU defaults, and the byte forms
    they replaced beside them."""
    from qcompile.codegen.triton import candidates, int4, w8a8, w8a16
    from qcompile.codegen.triton.autotune import KernelConfig

    gemv = candidates.standard_default("gemv", 1)
    out = [
        Case("int4", "int4-g128", "gemv", 1, k, n, KernelConfig(1, 64, 128, split_k=4, num_stages=2)),
        Case("int4", "int4-g128", "gemv", 1, k, n, int4.default_config("gemv", 1)),
        Case("int4", "int4-g128-sym", "gemv", 1, k, n, KernelConfig(1, 256, 128, split_k=4, num_stages=2, words=1)),
        Case("int4", "int4-g128", "gemv", 4, k, n, KernelConfig(4, 64, 128, split_k=4, num_stages=2, words=1)),
        Case("int4", "int4-g128", "gemv", 4, k, n, int4.default_config("gemv", 4)),
        Case("w8a16", "int8", "gemv", 1, k, n, gemv),
        Case("w8a16", "int8", "gemv", 1, k, n, dataclasses.replace(gemv, words=1)),
        Case("int4", "int4-g128", "splitk", 16, k, n, candidates.standard_default("splitk", 16)),
    ]
    for scheme in ("int4-g128", "int4-g128-sym"):
        out.append(Case("int4", scheme, "splitk", 16, k, n, int4.default_config("splitk", 16)))
        out.append(
            Case("int4", scheme, "splitk", 16, k, n, dataclasses.replace(int4.default_config("splitk", 16), words=2))
        )
    for m in (64, 256):
        out.append(Case("int4", "int4-g128", "gemm", m, k, n, candidates.standard_default("gemm", m)))
        for scheme in ("int4-g128", "int4-g128-sym"):
            out.append(Case("int4", scheme, "gemm", m, k, n, int4.default_config("gemm", m)))
        out.append(Case("w8a16", "int8", "gemm", m, k, n, w8a16.default_config("gemm", m)))
    out.append(Case("w8a8", "w8a8", "gemm", 256, k, n, w8a8.default_config(256)))
    out.append(Case("int4", "int4-g128", "gemm", 2048, k, n, candidates.DEQUANT_CONFIG))
    return out


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Compile qcompile's Triton kernels for a GPU and report the code.")
    parser.add_argument("--capability", type=int, default=DEFAULT_CAPABILITY, help="sm_XY as XY (default 90)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--only", default="", help="only the cases whose label contains this text")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    rows = report_rows([c for c in default_cases() if args.only in c.label], args.capability)
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"# sm_{args.capability}, triton {triton.__version__}: loop = SASS instructions of the main loop, "
          "per byte = per packed weight byte one thread loads in it")  # fmt: skip
    print(f"| case | kernel | widest load (B) | regs | spills | shared (KB) | loop | per byte |\n|{'---|' * 8}")
    for row in rows:
        print(f"| {row['case']} | {row['kernel']} | {row['widest_load']} | {row['registers']} | {row['spills']} | "
              f"{row['shared_kb']} | "
              f"{row['loop_instructions']} | {row.get('instructions_per_weight_byte', '')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
