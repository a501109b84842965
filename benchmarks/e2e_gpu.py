"""Decode tokens/s of a Llama-shaped model (random weights, built locally) in bf16 vs qcompile int4-g128 and int8.

    python benchmarks/e2e_gpu.py                      # 4 Llama-3-8B-shaped layers, bf16 / int4-g128 / int8
    python benchmarks/e2e_gpu.py --layers 8 --compile # torch.compile(mode="reduce-overhead") + static cache

Tokens/s is measured as (n2 - n1) / (t2 - t1) over two greedy generations of n1 and n2 new tokens, so the prefill
and the first-call tuning cancel out. Every ``nn.Linear`` in the decoder layers becomes ``qcompile::linear``; the
embedding and ``lm_head`` stay bf16. With ``qcompile.quantize`` available it does the swap, else a small helper here.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

SCHEMES = ("bf16", "int4-g128", "int8")


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` replacement calling ``torch.ops.qcompile.linear`` on packed weights (benchmark helper)."""

    def __init__(self, linear: torch.nn.Linear, scheme_name: str):
        super().__init__()
        from qcompile.schemes import parse_scheme

        packed = parse_scheme(scheme_name).pack(parse_scheme(scheme_name).quantize(linear.weight.detach().float()))
        self.scheme = scheme_name
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("zeros", packed.zeros)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x):
        return torch.ops.qcompile.linear(x, self.qweight, self.scales, self.zeros, self.bias, self.scheme)


def quantize_layers(model, scheme_name: str):
    import qcompile

    if hasattr(qcompile, "quantize"):
        return qcompile.quantize(model, {"default": scheme_name}, progress_bar=False)
    for layer in model.model.layers:
        for name, child in list(layer.named_modules()):
            if isinstance(child, torch.nn.Linear):
                parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
                setattr(parent, name.rsplit(".", 1)[-1], PackedLinear(child, scheme_name))
    return model


def build_model(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=layers, vocab_size=32000, max_position_embeddings=4096, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return model.eval()


@torch.inference_mode()
def decode_tokens_per_second(model, prompt_len: int, short: int, long: int, use_compile: bool) -> float:
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
    kwargs = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    if use_compile:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
        kwargs["cache_implementation"] = "static"

    def generate(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    generate(short)  # compile, tune, warm up
    generate(long)
    t_short, t_long = generate(short), generate(long)
    return (long - short) / max(t_long - t_short, 1e-9)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128, help="new tokens of the long run (the short one: 1/4)")
    parser.add_argument("--compile", action="store_true", help="torch.compile(mode='reduce-overhead'), static cache")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/e2e_gpu.py needs a CUDA GPU and none is visible; nothing was measured.", file=sys.stderr)
        return 2
    import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)

    print(f"# {torch.cuda.get_device_name()}, {args.layers} Llama-3-8B-shaped layers, prompt {args.prompt}, "
          f"{'compiled' if args.compile else 'eager'}")  # fmt: skip
    baseline = None
    for scheme_name in args.schemes:
        model = build_model(args.layers)
        if scheme_name != "bf16":
            model = quantize_layers(model, scheme_name)
        torch.cuda.empty_cache()
        weights_gb = torch.cuda.memory_allocated() / 1e9
        tokens_per_second = decode_tokens_per_second(model, args.prompt, args.tokens // 4, args.tokens, args.compile)
        if scheme_name == "bf16":
            baseline = tokens_per_second
        ratio = f"{tokens_per_second / baseline:4.2f}x bf16" if baseline else "bf16 not run"
        print(
            f"{scheme_name:>10}: {tokens_per_second:8.1f} tokens/s  ({ratio})  memory {weights_gb:5.2f} GB", flush=True
        )
        del model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
