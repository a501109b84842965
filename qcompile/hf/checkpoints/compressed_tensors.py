"""compressed-tensors checkpoints (``quant_method: compressed-tensors``, 0.20 layout) → qcompile schemes.

Which layers are quantized comes from ``config_groups`` (``targets``: class names such as ``Linear``, exact module
names, or ``re:<regex>`` matched from the start of the name) minus ``ignore``; each group's ``format`` (or the
top-level one) says how the tensors are laid out. Tensors per layer ``<m>`` (``W [N, K]``, ``b`` bits, ``G`` groups):

* ``pack-quantized``: ``weight_packed int32 [N, ceil(K b / 32)]`` (dense LSB-first bit stream along K, stored
  ``q + 2**(b-1)``), ``weight_scale [N, G]``, ``weight_shape int64 [2]``, asymmetric ``weight_zero_point int32
  [ceil(N b / 32), G]`` (packed along N, same offset) → ``int<b>-g<g>[-sym]`` / ``int<b>[-sym]`` (``w8a8``,
  ``w4a8-…`` with int8 activations);
* ``int-quantized`` / ``naive-quantized`` (int): ``weight int8 [N, K]`` (signed ``q``), ``weight_scale``,
  ``weight_zero_point`` (asymmetric, signed) → as above;
* ``float-quantized`` / ``naive-quantized`` (fp8): ``weight float8_e4m3fn [N, K]``, ``weight_scale [N, 1]`` or
  ``[1]`` → ``fp8`` / ``fp8-w8a8``; block ``[128, 128]``: ``weight_scale [ceil(N/128), ceil(K/128)]`` →
  ``fp8-block``;
* ``nvfp4-pack-quantized``: ``weight_packed uint8 [N, K/2]``, ``weight_scale e4m3 [N, K/16]``,
  ``weight_global_scale float32 [1]`` → ``nvfp4``;
* ``mxfp4-pack-quantized``: ``weight_packed uint8 [N, K/2]``, ``weight_scale uint8 [N, K/32]`` → ``mxfp4``.

Integer math ``w = (q - zp) * s`` with signed ``q, zp``: the qcompile codes are ``u = q + 2**(b-1)`` and zeros
``zp + 2**(b-1)`` (float, exact), so ``w = (u - zero) * s`` is the same number (8 bits: the int8 family's signed
storage is ``q`` itself). Symmetric ``w = q * s``: ``int<b>-…-sym`` computes ``(u - 2**(b-1)) * s``, the same.
``tensor`` strategy scales are broadcast to one per row (the same math). Scales (bf16/fp16/fp32) become float32
exactly.

Activations: none → weight-only; int8 ``dynamic`` per ``token`` symmetric → ``w8a8`` (int8 channel weights) or
``w4a8`` (int4): the integer weights are exact, the activation rule is qcompile's (``absmax / 127``, codes in
[-127, 127]: the scale vLLM's int8 kernel uses; compressed-tensors' own fake quantization divides by 127.5 and
clamps to [-128, 127]); fp8 ``dynamic`` per ``token`` → ``fp8-w8a8`` and fp8 ``dynamic`` ``group`` 128 with block weights → ``fp8-block``
(the same rule as compressed-tensors: ``absmax / 448``). Static activation scales (``input_scale``), NVFP4/MXFP4
activations, ``actorder`` with ``weight_g_idx``, ``kv_cache_scheme``, transforms, sparsity and any other format or
strategy are refused by name.

NVFP4: codes and e4m3 block scales carry over byte for byte. compressed-tensors' unit is ``weight_scale /
weight_global_scale`` (a float32 division), qcompile's is ``scales * global_scale`` (a float32 product, as the
serving kernels apply the global scale). The import picks ``global_scale`` among ``fl(1 / weight_global_scale)`` and
its nearest float32 neighbours so that the product equals the division for as many block scales as possible; one
multiplier rarely fits every scale of a layer, and where it does not the units differ by one float32 ulp (the
layer's :attr:`ImportedLinear.notes` says so). compressed-tensors' own decompressor rounds its output to bfloat16;
the tests compare that output bit for bit and the float32 values to 2 ulp.
"""

from __future__ import annotations

import re

import torch

from qcompile.hf.checkpoints.common import (CheckpointError, ImportedLinear, check_bits, expect, integer_layer,
                                            unpack_dense)
from qcompile.schemes import PackedWeight, parse_scheme

METHOD = "compressed-tensors"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
FLOAT_FORMATS = ("float-quantized", "naive-quantized")
UNSUPPORTED_TENSORS = {
    "weight_g_idx": "activation-order groups (actorder with g_idx)", "input_scale": "static activation quantization",
    "input_zero_point": "static activation quantization", "input_global_scale": "NVFP4 activation quantization",
}  # fmt: skip
FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "nvfp4-pack-quantized",
           "mxfp4-pack-quantized", "dense")  # fmt: skip


# -- the config -------------------------------------------------------------------------------------------------------
def check_config(config: dict) -> None:
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise CheckpointError(f"compressed-tensors quantization_status {status!r}: only 'compressed' checkpoints hold "
                              f"the codes")  # fmt: skip
    for key in ("kv_cache_scheme", "transform_config", "sparsity_config"):
        if config.get(key):
            raise CheckpointError(f"compressed-tensors {key} is not supported (found {config[key]!r})")
    if not config.get("config_groups"):
        raise CheckpointError("compressed-tensors quantization_config has no config_groups")


def strategy(args: dict) -> str:
    """The strategy, inferred as compressed-tensors does when absent (no group_size: tensor; -1: channel; >0:
    group)."""
    if args.get("strategy"):
        return str(args["strategy"])
    group = args.get("group_size")
    return "tensor" if group is None else "channel" if group == -1 else "group"


def _matches(name: str, module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or any(cls.__name__ == target for cls in type(module).__mro__)


def group_of(name: str, module, config: dict) -> dict | None:
    """The config group (with its effective ``format``) that quantizes module ``name``, or ``None``."""
    if any(_matches(name, module, target) for target in config.get("ignore") or ()):
        return None
    for group in config["config_groups"].values():
        if any(_matches(name, module, target) for target in group.get("targets") or ()):
            return {**group, "format": group.get("format") or config.get("format")}
    return None


def layers(names, config: dict, modules: dict) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (its config group, {local tensor name: checkpoint name})}`` for every module a group quantizes."""
    check_config(config)
    names = set(names)
    out = {}
    for name, module in modules.items():
        group = group_of(name, module, config)
        if group is None or group["format"] == "dense" or not isinstance(module, torch.nn.Linear):
            continue
        prefix = f"{name}."
        local = {full[len(prefix):]: full for full in names
                 if full.startswith(prefix) and "." not in full[len(prefix):]}  # fmt: skip
        out[name] = (group, local)
    return out


# -- one layer --------------------------------------------------------------------------------------------------------
def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One layer's tensors (local names: ``weight_packed``, ``weight_scale`` …, ``bias``) under its config group
    ``config`` (``weights``, ``input_activations``, ``format``) → :class:`ImportedLinear`."""
    fmt = config.get("format")
    if fmt not in FORMATS:
        raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported (supported: "
                              f"{', '.join(FORMATS)})")  # fmt: skip
    weights = config.get("weights")
    if not weights:
        raise CheckpointError(f"{where}: the config group has no weights scheme")
    if config.get("output_activations"):
        raise CheckpointError(f"{where}: output activation quantization is not supported")
    for name, what in UNSUPPORTED_TENSORS.items():
        if name in tensors:
            raise CheckpointError(f"{where}.{name}: {what} is not supported")
    n, k = _shape(tensors, fmt, in_features, out_features, where)
    kind = weights.get("type", "int")
    if fmt == "nvfp4-pack-quantized":
        layer = _nvfp4(tensors, weights, config.get("input_activations"), n, k, where)
    elif fmt == "mxfp4-pack-quantized":
        layer = _mxfp4(tensors, weights, config.get("input_activations"), n, k, where)
    elif kind == "int" and fmt in INT_FORMATS:
        layer = _integer(tensors, weights, config.get("input_activations"), fmt, n, k, where)
    elif kind == "float" and fmt in FLOAT_FORMATS:
        layer = _fp8(tensors, weights, config.get("input_activations"), n, k, where)
    else:
        raise CheckpointError(f"{where}: {kind} weights in format {fmt!r} are not supported")
    bias = tensors.get("bias")
    if bias is not None:
        layer.bias = expect(bias, where, "bias", (n,), SCALE_DTYPES)
    return layer


def _shape(tensors, fmt, in_features, out_features, where) -> tuple[int, int]:
    weight = tensors.get("weight_packed", tensors.get("weight"))
    if weight is None:
        raise CheckpointError(f"{where}: format {fmt!r} needs weight_packed or weight, found {', '.join(tensors)}")
    n = out_features if out_features is not None else weight.shape[0]
    if in_features is not None:
        k = in_features
    elif "weight_shape" in tensors:
        k = int(tensors["weight_shape"][1])
    elif fmt.endswith("fp4-pack-quantized"):
        k = weight.shape[1] * 2
    else:
        k = weight.shape[1]
    return n, k


def _scales(tensors, args: dict, n: int, k: int, where: str) -> tuple[torch.Tensor, int | None]:
    """float32 ``[N, G]`` scales and the qcompile group size (``None``: one per row)."""
    kind = strategy(args)
    scale = tensors.get("weight_scale")
    if kind == "group":
        g = int(args["group_size"])
        if k % g:
            raise CheckpointError(f"{where}: K={k} is not a multiple of group_size={g}")
        return expect(scale, where, "weight_scale", (n, k // g), SCALE_DTYPES, f"group_size={g}").float(), g
    if kind == "channel":
        return expect(scale, where, "weight_scale", (n, 1), SCALE_DTYPES, "channel").float(), None
    if kind == "tensor":
        if scale is not None and scale.numel() == 1:
            scale = scale.reshape(1)
        return expect(scale, where, "weight_scale", (1,), SCALE_DTYPES, "tensor").float().expand(n, 1), None
    raise CheckpointError(f"{where}: weight strategy {kind!r} is not supported for integer weights")


def _activation_scheme(act: dict | None, bits: int, group: int | None, symmetric: bool, where: str) -> str | None:
    """qcompile's activation-quantizing scheme for these int weights, or ``None`` (weight-only)."""
    if not act:
        return None
    dynamic_token = act.get("dynamic") is True and strategy(act) == "token" and act.get("symmetric", True)
    if act.get("type", "int") == "int" and act.get("num_bits", 8) == 8 and dynamic_token:
        if bits == 8 and group is None and symmetric:
            return "w8a8"
        if bits == 4:
            return f"w4a8{f'-g{group}' if group else ''}{'-sym' if symmetric else ''}"
    raise CheckpointError(f"{where}: input activations {act} with int{bits} weights are not supported (int8 dynamic "
                          f"per-token symmetric with int8 per-channel symmetric or int4 weights is)")  # fmt: skip


def _integer(tensors, args, act, fmt, n, k, where) -> ImportedLinear:
    bits = check_bits(args.get("num_bits", 8), (2, 3, 4, 8), where, "num_bits")
    symmetric = bool(args.get("symmetric", True))
    offset = 2 ** (bits - 1)
    why = f"int{bits} {strategy(args)}, [N={n}, K={k}]"
    if fmt == "pack-quantized":
        shape = expect(tensors.get("weight_shape"), where, "weight_shape", (2,), (torch.int64, torch.int32), why)
        if shape.tolist() != [n, k]:
            raise CheckpointError(f"{where}.weight_shape: is {shape.tolist()}, the layer is [{n}, {k}]")
        words = -(-k * bits // 32)
        packed = expect(tensors.get("weight_packed"), where, "weight_packed", (n, words), torch.int32, why)
        codes = unpack_dense(packed, bits, k)
    else:
        q = expect(tensors.get("weight"), where, "weight", (n, k), torch.int8, why).to(torch.int64)
        if bool(((q < -offset) | (q >= offset)).any()):
            raise CheckpointError(f"{where}.weight: codes outside [{-offset}, {offset - 1}] for num_bits={bits}")
        codes = q + offset
    scales, group = _scales(tensors, args, n, k, where)
    zeros = None
    if not symmetric:
        zp = tensors.get("weight_zero_point")
        groups = scales.shape[1]
        if fmt == "pack-quantized" and strategy(args) in ("group", "channel"):
            words = expect(zp, where, "weight_zero_point", (-(-n * bits // 32), groups), torch.int32, why + ", packed "
                           "along N")  # fmt: skip
            zeros = unpack_dense(words.t().contiguous(), bits, n).t()
        else:
            if zp is not None and zp.numel() == 1 and strategy(args) == "tensor":
                zp = zp.reshape(1).expand(n, 1)
            zp = expect(zp, where, "weight_zero_point", (n, groups), (torch.int8, torch.int32, torch.int64), why)
            zeros = zp.to(torch.int64) + offset
        if bool(((zeros < 0) | (zeros >= 2**bits)).any()):
            raise CheckpointError(f"{where}.weight_zero_point: zero points outside the int{bits} range")
    activations = _activation_scheme(act, bits, group, symmetric, where)
    return integer_layer(codes, scales, zeros, bits=bits, group_size=group, where=where, activations=activations)


def _fp8(tensors, args, act, n, k, where) -> ImportedLinear:
    if args.get("num_bits", 8) != 8 or not args.get("symmetric", True):
        raise CheckpointError(f"{where}: float weights {args} are not supported (fp8 e4m3, symmetric is)")
    weight = expect(tensors.get("weight"), where, "weight", (n, k), torch.float8_e4m3fn, "fp8")
    kind = strategy(args)
    scale = tensors.get("weight_scale")
    if kind == "block":
        if list(args.get("block_structure") or []) != [128, 128]:
            raise CheckpointError(f"{where}: block_structure {args.get('block_structure')} is not supported "
                                  f"([128, 128] is)")  # fmt: skip
        ok = act and act.get("type") == "float" and act.get("dynamic") is True and strategy(act) == "group" \
            and act.get("group_size") == 128  # fmt: skip
        if not ok:
            raise CheckpointError(f"{where}: block fp8 weights with input activations {act} are not supported "
                                  f"(fp8-block takes fp8 dynamic activations per group of 128)")  # fmt: skip
        shape = (-(-n // 128), -(-k // 128))
        scales = expect(scale, where, "weight_scale", shape, SCALE_DTYPES, "block [128, 128]").float()
        return _packed("fp8-block", {"qweight": weight, "scales": scales.contiguous()}, n, k, where)
    if kind == "channel":
        scales = expect(scale, where, "weight_scale", (n, 1), SCALE_DTYPES, "channel").float()
    elif kind == "tensor":
        scale = scale.reshape(1) if scale is not None and scale.numel() == 1 else scale
        scales = expect(scale, where, "weight_scale", (1,), SCALE_DTYPES, "tensor").float().expand(n, 1)
    else:
        raise CheckpointError(f"{where}: fp8 weight strategy {kind!r} is not supported")
    name = "fp8"
    if act:
        if not (act.get("type") == "float" and act.get("dynamic") is True and strategy(act) == "token"):
            raise CheckpointError(f"{where}: input activations {act} with fp8 weights are not supported (fp8 dynamic "
                                  f"per token is)")  # fmt: skip
        name = "fp8-w8a8"
    return _packed(name, {"qweight": weight, "scales": scales.contiguous()}, n, k, where)


def _no_activations(act, fmt, where) -> None:
    if act:
        raise CheckpointError(f"{where}: {fmt} with input activations {act} is not supported (weight-only is)")


def _mxfp4(tensors, args, act, n, k, where) -> ImportedLinear:
    _no_activations(act, "mxfp4", where)
    if strategy(args) != "group" or args.get("group_size") != 32 or args.get("num_bits") != 4:
        raise CheckpointError(f"{where}: mxfp4-pack-quantized weights {args} are not fp4 group 32")
    if k % 32:
        raise CheckpointError(f"{where}: K={k} is not a multiple of 32")
    packed = expect(tensors.get("weight_packed"), where, "weight_packed", (n, k // 2), torch.uint8, "mxfp4")
    scales = expect(tensors.get("weight_scale"), where, "weight_scale", (n, k // 32), torch.uint8, "E8M0 per 32")
    return _packed("mxfp4", {"qweight": packed, "scales": scales}, n, k, where)


def nvfp4_multiplier(block_scales: torch.Tensor, divisor: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """float32 ``[1]`` ``g`` for which ``fl(s * g) == fl(s / divisor)`` holds for the most block scales ``s`` present
    (weighted by how often each occurs), searched among ``fl(1 / divisor)`` and its four float32 neighbours either
    side, and whether it holds for all of them. Where it does not, the two units differ by one float32 ulp."""
    values, counts = block_scales.float().unique(return_counts=True)
    divisor = divisor.float().reshape(1)
    wanted = values / divisor
    base = (1 / divisor).reshape(1)
    best, best_count = base, -1
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        g = (base.view(torch.int32) + step).view(torch.float32)
        matched = int(counts[values * g == wanted].sum())
        if matched > best_count:
            best, best_count = g, matched
    return best, best_count == int(counts.sum())


def _nvfp4(tensors, args, act, n, k, where) -> ImportedLinear:
    _no_activations(act, "nvfp4", where)
    if args.get("group_size") != 16 or args.get("num_bits") != 4:
        raise CheckpointError(f"{where}: nvfp4-pack-quantized weights {args} are not fp4 group 16")
    if k % 16:
        raise CheckpointError(f"{where}: K={k} is not a multiple of 16")
    packed = expect(tensors.get("weight_packed"), where, "weight_packed", (n, k // 2), torch.uint8, "nvfp4")
    scales = expect(tensors.get("weight_scale"), where, "weight_scale", (n, k // 16), torch.float8_e4m3fn, "per 16")
    divisor = tensors.get("weight_global_scale")
    if divisor is not None and divisor.numel() == 1:
        divisor = divisor.reshape(1)
    divisor = expect(divisor, where, "weight_global_scale", (1,), torch.float32)
    multiplier, exact = nvfp4_multiplier(scales, divisor)
    layer = _packed("nvfp4", {"qweight": packed, "scales": scales, "global_scale": multiplier}, n, k, where)
    if not exact:
        layer.notes = ("nvfp4: some units scales * global_scale differ from weight_scale / weight_global_scale by one "
                       "float32 ulp",)  # fmt: skip
    return layer


def _packed(name: str, tensors: dict[str, torch.Tensor], n: int, k: int, where: str) -> ImportedLinear:
    scheme = parse_scheme(name)
    packed = PackedWeight(tensors)
    scheme.check_packed(packed, n, k, where=where)
    return ImportedLinear(scheme.name, packed, k, n)

