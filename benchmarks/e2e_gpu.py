"""Decode tokens/s of a Llama-3-8B-shaped decoder (random weights): bf16 vs qcompile int4-g128 and int8 on a GPU.

    python benchmarks/e2e_gpu.py                          # 32 layers, bf16 / int4-g128 / int8, CUDA graphs
    python benchmarks/e2e_gpu.py --layers 8 --steps 100   # a shorter run
    python benchmarks/e2e_gpu.py --compile                # each Block through torch.compile (inductor) first
    python benchmarks/e2e_gpu.py --compile --inline       # ... with qcompile's Triton launches in inductor's code
    python benchmarks/e2e_gpu.py --no-graphs              # the same steps as a Python loop (launch overhead in)
    python benchmarks/e2e_gpu.py --head int8              # also quantize lm_head (float by default)
    python benchmarks/e2e_gpu.py --device cpu --tiny      # smoke test of the whole script without a GPU

The model (``llama_decoder.py`` beside this script) is plain PyTorch (gpt-fast style, no transformers): fused
``wqkv``, SwiGLU ``w1``/``w3``/``w2``, RMSNorm, half-rotation RoPE and a static bf16 KV cache of ``--max-seq``
positions. One decode step takes a device tensor ``token [1, 1]`` and a device tensor ``pos [1]`` and never
reads a device value on the host, so a whole step, plus the greedy ``token`` and ``pos += 1`` updates, is
captured in one CUDA graph and replayed ``--steps`` times from position ``--context`` (timed with CUDA events
after 3 eager warm-up steps on a side stream, which is also where qcompile tunes its Triton kernels). Attention
always spans the whole static cache, masked, so the cost per step does not depend on the position.

``qcompile.quantize(model, {"default": scheme})`` swaps every ``nn.Linear`` but ``lm_head`` for a
``QuantizedLinear`` (``torch.ops.qcompile.linear``); the embedding and ``lm_head`` stay bf16 unless ``--head``.
Each row prints tokens/s, the ratio to bf16, the GPU memory allocated once the model is built (weights plus the
0.13 GB KV cache of the default shape) and the time per step. Attention: by default the query heads of one
KV head are folded into the query-length dimension (exact for one token), so SDPA runs a fused kernel on the
cache as it is; ``--attention gqa`` passes ``enable_gqa=True`` instead (with an explicit mask PyTorch may serve
that with its math kernel, which repeats the cache per query head at every step).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import os
import platform
import sys
import time
import traceback

import torch
import torch._functorch.config  # noqa: F401 - torch._functorch.config is read below

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling module, also when loaded by path
from llama_decoder import LLAMA3_8B, TINY, TINY_CONTEXT, TINY_STEPS, Config, Transformer, build_model  # noqa: E402

SCHEMES = ("bf16", "int4-g128", "int8")
WARMUP_STEPS = 3  # eager steps before capture: Triton kernels compile and tune on the first one
CHECK_STEPS = 3  # untimed graph replays whose greedy tokens are compared with eager steps'
START_TOKEN = 1


# -- decoding and timing --------------------------------------------------------------------------------------
def say(*parts) -> None:
    print(*parts, flush=True)


def check_positions(context: int, steps: int, max_seq: int) -> None:
    """Raise ``ValueError`` unless the warm-up and timed steps from ``context`` all fit in the static cache."""
    if context < 0 or steps < 1:
        raise ValueError(f"--context must be >= 0 and --steps >= 1 (got {context} and {steps})")
    if context + steps + WARMUP_STEPS >= max_seq:
        raise ValueError(f"--context {context} + --steps {steps} + {WARMUP_STEPS} warm-up steps must stay below "
                         f"--max-seq {max_seq}: raise --max-seq or lower --context / --steps")  # fmt: skip


def decode_step(model: Transformer, token: torch.Tensor, pos: torch.Tensor) -> None:
    """One greedy step, all on the device: ``token`` becomes the argmax, ``pos`` advances by one."""
    logits = model.step(token, pos)
    token.copy_(logits.argmax(-1))
    pos.add_(1)


def reset(token: torch.Tensor, pos: torch.Tensor, context: int) -> None:
    token.fill_(START_TOKEN)
    pos.fill_(context)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(model: Transformer, token: torch.Tensor, pos: torch.Tensor, context: int) -> float:
    """Eager steps from ``context`` (on a side stream on CUDA, as graph capture wants); seconds of the first one,
    which compiles and tunes the kernels (and runs torch.compile, if the blocks are wrapped)."""
    device = token.device
    reset(token, pos, context)
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    first = 0.0
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        for i in range(WARMUP_STEPS):
            start = time.perf_counter()
            decode_step(model, token, pos)
            synchronize(device)
            if i == 0:
                first = time.perf_counter() - start
    if side is not None:
        torch.cuda.current_stream(device).wait_stream(side)
    return first


def greedy_tokens(run_step, token: torch.Tensor, pos: torch.Tensor, context: int, steps: int) -> list[int]:
    """The tokens ``run_step()`` produces over ``steps`` steps from ``context`` (read after each step)."""
    reset(token, pos, context)
    produced = []
    for _ in range(steps):
        run_step()
        produced.append(token.clone())
    return torch.cat(produced).flatten().tolist()


def capture_step(model: Transformer, token: torch.Tensor, pos: torch.Tensor) -> torch.cuda.CUDAGraph:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_step(model, token, pos)
    return graph


def timed_steps(run_step, token: torch.Tensor, pos: torch.Tensor, context: int, steps: int) -> float:
    """Seconds for ``steps`` calls of ``run_step`` from ``context`` (CUDA events on a GPU, wall clock on CPU)."""
    device = token.device
    reset(token, pos, context)
    synchronize(device)
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        return time.perf_counter() - start
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        run_step()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3


@dataclasses.dataclass
class Measurement:
    seconds: float
    steps: int
    first_step_s: float
    notes: list[str]

    @property
    def tokens_per_second(self) -> float:
        return self.steps / self.seconds


@torch.no_grad()
def measure(model: Transformer, device: torch.device, context: int, steps: int, graphs: bool) -> Measurement:
    """Warm up, then time ``steps`` decode steps from ``context``: one CUDA graph replayed, or eager steps."""
    token = torch.full((1, 1), START_TOKEN, dtype=torch.long, device=device)
    pos = torch.full((1,), context, dtype=torch.long, device=device)
    first = warm_up(model, token, pos, context)
    notes = []
    eager = lambda: decode_step(model, token, pos)
    run_step = eager
    if graphs:
        expected = greedy_tokens(eager, token, pos, context, CHECK_STEPS)
        try:
            graph = capture_step(model, token, pos)
        except Exception:  # noqa: BLE001 - keep this scheme's number: time it eagerly and say why
            say(traceback.format_exc().rstrip())
            synchronize(device)
            notes.append("graph capture failed: eager steps")
        else:
            run_step = graph.replay
            replayed = greedy_tokens(graph.replay, token, pos, context, CHECK_STEPS)
            agree = sum(a == b for a, b in zip(expected, replayed))
            notes.append(f"graph greedy tokens = eager {agree}/{CHECK_STEPS}")
    else:
        greedy_tokens(eager, token, pos, context, CHECK_STEPS)  # untimed
    seconds = timed_steps(run_step, token, pos, context, steps)
    end_pos = int(pos.item())
    if end_pos != context + steps:
        raise RuntimeError(f"the steps did not advance pos: it is {end_pos}, expected {context + steps}")
    return Measurement(seconds, steps, first, notes)


# -- schemes --------------------------------------------------------------------------------------------------
def recipe_for(scheme: str, head: str | None) -> dict | None:
    """``None`` for ``bf16`` (no quantization); else ``scheme`` everywhere, ``lm_head`` float unless ``head``."""
    if scheme == "bf16":
        return None
    recipe = {"default": scheme}
    if head:
        recipe["overrides"] = [{"targets": ["lm_head"], "scheme": head}]
    return recipe


def label_for(scheme: str, head: str | None) -> str:
    return scheme if scheme == "bf16" or not head else f"{scheme}+head:{head}"


def compile_blocks(model: Transformer) -> None:
    """``torch.compile`` (inductor, static shapes) around every Block's forward: the layers share one code
    object, so one compiled graph serves them all (the cache limit is raised in case guards tell layers apart)."""
    limit = model.config.n_layers + 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, limit)
    if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
        torch._dynamo.config.accumulated_cache_size_limit = max(
            torch._dynamo.config.accumulated_cache_size_limit, limit)  # fmt: skip
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, dynamic=False)


def compiled_graphs() -> int | None:
    """Graphs dynamo has compiled in this process (one per Block means the layers did not share code)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def allocated_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / 1e9


def release(device: torch.device) -> None:
    """Forget compiled code and free the previous model's memory before the next scheme."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_scheme(scheme: str, args, config: Config, device: torch.device) -> tuple[Measurement, float | None]:
    import qcompile

    start = time.perf_counter()
    model = build_model(config, device, args.seed)
    synchronize(device)
    built = time.perf_counter() - start
    recipe = recipe_for(scheme, args.head)
    quantized = 0.0
    if recipe is not None:
        start = time.perf_counter()
        qcompile.quantize(model, recipe, progress_bar=False)
        synchronize(device)
        quantized = time.perf_counter() - start
    memory = allocated_gb(device)
    graphs_before = compiled_graphs()
    if args.compile:
        compile_blocks(model)
    measurement = measure(model, device, args.context, args.steps, args.graphs)
    setup = f"build {built:.1f} s, quantize {quantized:.1f} s, first step {measurement.first_step_s:.1f} s"
    if args.compile and graphs_before is not None:
        setup += f" (torch.compile: {compiled_graphs() - graphs_before} graph(s) for {config.n_layers} layers)"
    measurement.notes.insert(0, setup)
    return measurement, memory


def format_row(label: str, m: Measurement, memory: float | None, baseline: float | None) -> str:
    ratio = f"{m.tokens_per_second / baseline:5.2f}x bf16" if baseline else "   (no bf16)"
    memory_text = f"{memory:6.2f} GB" if memory is not None else "     n/a"
    ms = m.seconds / m.steps * 1e3
    return (f"{label:>20}: {m.tokens_per_second:9.1f} tokens/s  {ratio}  memory {memory_text}  "
            f"{ms:8.3f} ms/step  [{'; '.join(m.notes)}]")  # fmt: skip


# -- command line ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), help="bf16 and/or qcompile scheme names")
    parser.add_argument("--head", default=None, metavar="SCHEME", help="also quantize lm_head with SCHEME")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps (default 200; --tiny: 4)")
    parser.add_argument("--context", type=int, default=None, help="first timed position (default 512; --tiny: 8)")
    parser.add_argument("--max-seq", type=int, default=None, help="KV cache positions (default 1024; --tiny: 64)")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu, the latter for smoke tests")
    parser.add_argument("--no-graphs", dest="graphs", action="store_false", help="time eager steps, no CUDA graph")
    parser.add_argument("--compile", action="store_true", help="torch.compile each Block (inductor, dynamic=False)")
    parser.add_argument("--inline", action="store_true",
                        help="with --compile: inductor compiles and launches qcompile's kernels")  # fmt: skip
    parser.add_argument("--attention", choices=("grouped", "gqa"), default="grouped",
                        help="grouped: query heads folded per KV head; gqa: SDPA enable_gqa=True")  # fmt: skip
    parser.add_argument("--no-tune", action="store_true", help="qcompile Triton kernels use default configs")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and run, for smoke tests")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    base = TINY if args.tiny else LLAMA3_8B
    if args.layers is None:
        args.layers = base.n_layers
    if args.max_seq is None:
        args.max_seq = base.max_seq
    if args.context is None:
        args.context = TINY_CONTEXT if args.tiny else 512
    if args.steps is None:
        args.steps = TINY_STEPS if args.tiny else 200
    try:
        check_positions(args.context, args.steps, args.max_seq)
    except ValueError as error:
        parser.error(str(error))
    if args.inline and not args.compile:
        parser.error("--inline needs --compile (kernels are inlined into inductor's compiled graphs)")
    args.config = dataclasses.replace(base, n_layers=args.layers, max_seq=args.max_seq, attention=args.attention)
    return args


def version_of(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(args, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    shape = "tiny" if args.tiny else "Llama-3-8B-shaped"
    graphs = "on" if args.graphs and device.type == "cuda" else "off"
    blocks = "torch.compile blocks" if args.compile else "eager blocks"
    inlined = " (kernels inlined)" if args.inline else ""
    return (f"# {name} | torch {torch.__version__} | triton {version_of('triton')} | {args.layers} {shape} layers | "
            f"context {args.context}, {args.steps} steps, max_seq {args.max_seq} | CUDA graphs {graphs} | "
            f"{blocks}{inlined} | attention {args.attention}")  # fmt: skip


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/e2e_gpu.py needs a CUDA GPU and none is visible (use --device cpu for a smoke test); "
              "nothing was measured.", file=sys.stderr)  # fmt: skip
        return 2
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    else:
        args.graphs = False
    if args.no_tune:
        os.environ["QCOMPILE_TRITON_TUNE"] = "0"
    if args.inline:
        os.environ["QCOMPILE_INLINE_KERNELS"] = "1"  # read when inductor functionalizes each Block's graph
        torch._functorch.config.enable_autograd_cache = False  # its key cannot tell inlined graphs from the op's
    say(header(args, device))
    baseline, failed = None, 0
    for scheme in args.schemes:
        label = label_for(scheme, args.head)
        try:
            measurement, memory = run_scheme(scheme, args, args.config, device)
        except Exception:  # noqa: BLE001 - one scheme's failure must not lose the others' numbers
            failed += 1
            say(f"{label:>20}: FAILED\n{traceback.format_exc().rstrip()}")
        else:
            if scheme == "bf16":
                baseline = measurement.tokens_per_second
            say(format_row(label, measurement, memory, baseline))
        finally:
            release(device)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
