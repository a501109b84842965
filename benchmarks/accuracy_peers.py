"""The peer libraries' own quantizers, for ``benchmarks/accuracy_formats.py``.

Each function quantizes a copy of a float causal LM with the peer's own API, every ``nn.Linear`` but ``lm_head``
(tied to the embedding: it stays float), and returns :class:`Quantized`: the model running the peer's own modules
and kernels (hqq: its dequantized weights in ``nn.Linear``, as ``benchmarks/accuracy.py`` evaluates it), the
quantization wall time, and the bits per weight of what the peer stores for those layers: every tensor of their
state dicts but the bias (codes, scales, zeros, absmax and nested absmax, code tables, the serialized quant-state
bytes), tensor subclasses (torchao) counted by their inner tensors, over the layers' ``N * K`` weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time

import torch


@dataclasses.dataclass
class Quantized:
    """A quantized model ready for evaluation: ``bits`` per quantized weight; ``note`` says how it runs."""

    model: torch.nn.Module
    seconds: float
    bits: float
    note: str = ""


def linear_sites(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """``(name, module)`` of every ``nn.Linear`` but the output head."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")]  # fmt: skip


def replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def tensor_bytes(tensor) -> int:
    """Bytes a tensor holds; a wrapper subclass (``__tensor_flatten__``) by its inner tensors."""
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def stored_bits(modules: list[torch.nn.Module], weights: int) -> float:
    """Bits per weight of every state-dict tensor of ``modules`` except biases, over ``weights`` weights."""
    total = sum(tensor_bytes(t) for m in modules for key, t in m.state_dict().items()
                if key != "bias" and not key.endswith(".bias") and torch.is_tensor(t))  # fmt: skip
    return 8 * total / weights


def _weights(sites) -> int:
    return sum(m.in_features * m.out_features for _, m in sites)


def bitsandbytes_4bit(base: torch.nn.Module, quant_type: str, double_quant: bool) -> Quantized:
    """``bnb.nn.Linear4bit`` (blocksize 64, float32 compute), quantized when moved to the CPU."""
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model = copy.deepcopy(base)
    sites = linear_sites(model)
    start = time.perf_counter()
    modules = []
    for name, lin in sites:
        module = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                   compute_dtype=torch.float32, compress_statistics=double_quant,
                                   quant_type=quant_type)  # fmt: skip
        module.load_state_dict(lin.state_dict())
        modules.append(module.to("cpu"))
        replace(model, name, modules[-1])
    seconds = time.perf_counter() - start
    return Quantized(model, seconds, stored_bits(modules, _weights(sites)), "Linear4bit forward")


def bitsandbytes_int8(base: torch.nn.Module, threshold: float = 6.0) -> Quantized:
    """``bnb.nn.Linear8bitLt`` (``has_fp16_weights=False``: LLM.int8() inference, outlier columns in float)."""
    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model = copy.deepcopy(base)
    sites = linear_sites(model)
    start = time.perf_counter()
    modules = []
    for name, lin in sites:
        module = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                     has_fp16_weights=False, threshold=threshold)  # fmt: skip
        module.load_state_dict(lin.state_dict())
        modules.append(module.to("cpu").eval())
        replace(model, name, modules[-1])
    seconds = time.perf_counter() - start
    return Quantized(model, seconds, stored_bits(modules, _weights(sites)), "Linear8bitLt forward")


def quanto(base: torch.nn.Module, weights: str) -> Quantized:
    """optimum-quanto ``quantize(weights=...)`` + ``freeze`` (its own group choice for 2/4 bits)."""
    from optimum import quanto as q
    from optimum.quanto.nn import QModuleMixin

    model = copy.deepcopy(base)
    weight_count = _weights(linear_sites(model))
    start = time.perf_counter()
    q.quantize(model, weights=getattr(q, weights), exclude=["lm_head"])
    q.freeze(model)
    seconds = time.perf_counter() - start
    modules = [m for _, m in model.named_modules() if isinstance(m, QModuleMixin)]
    return Quantized(model, seconds, stored_bits(modules, weight_count), f"quanto {weights} modules")


def torchao(base: torch.nn.Module, config: str, group_size: int = 64) -> Quantized:
    """torchao 0.18 ``quantize_``: ``int8`` is ``Int8WeightOnlyConfig()`` on the float32 model; ``int4`` is
    ``PrototypeInt4WeightOnlyConfig(group_size)`` (its CPU path, tinygemm) on a bfloat16 copy, evaluated in bf16."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(base)
    if config == "int8":
        chosen, note = Int8WeightOnlyConfig(), "Int8Tensor forward"
    elif config == "int4":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        model = model.to(torch.bfloat16)
        chosen, note = PrototypeInt4WeightOnlyConfig(group_size=group_size), "Int4OpaqueTensor forward, bf16 model"
    else:
        raise ValueError(f"torchao peer row: config must be 'int8' or 'int4', got {config!r}")
    sites = linear_sites(model)
    names = {name for name, _ in sites}
    start = time.perf_counter()
    quantize_(model, chosen, filter_fn=lambda module, fqn: fqn in names)
    seconds = time.perf_counter() - start
    modules = [model.get_submodule(name) for name in names]
    return Quantized(model, seconds, stored_bits(modules, _weights(sites)), note)


def hqq(base: torch.nn.Module, bits: int, group_size: int) -> Quantized:
    """The hqq package's ``Quantizer`` (optimize=True, float zeros, float32 meta, bit-packed codes); evaluated with
    its dequantized weights in ``nn.Linear``. Its groups run over the flattened weight (across rows when
    ``K % group_size != 0``)."""
    from hqq.core.quantize import Quantizer

    model = copy.deepcopy(base)
    sites = linear_sites(model)
    start, stored = time.perf_counter(), 0
    for _, module in sites:
        w = module.weight.detach().float()
        codes, meta = Quantizer.quantize(w, nbits=bits, group_size=group_size, optimize=True, round_zero=False,
                                         axis=1, bitpack=True, compute_dtype=torch.float32, device="cpu")  # fmt: skip
        stored += tensor_bytes(codes) + tensor_bytes(meta["scale"]) + tensor_bytes(meta["zero"])
        with torch.no_grad():
            module.weight.copy_(Quantizer.dequantize(codes, meta).reshape(w.shape))
    seconds = time.perf_counter() - start
    return Quantized(model, seconds, 8 * stored / _weights(sites), "dequantized weights (fake-quant)")
