"""Save a model quantized by qcompile as a compressed-tensors checkpoint (what vLLM and transformers load).

    import qcompile
    from qcompile.hf.compressed_tensors_export import save
    qcompile.quantize(model, "int4-g128")
    records = save(model, "out/", tokenizer)      # safetensors + config.json with a compressed-tensors config

What each qcompile scheme becomes (``W [N, K]``; scales are written as float32, so they carry over exactly):

* ``int4`` / ``int8`` / ``int2`` (``-gN``, ``-sym``): ``pack-quantized``, int b group N or channel, no activations
  (``weight_packed`` int32, ``weight_scale``, ``weight_shape``, ``weight_zero_point``);
* ``w8a8``: ``int-quantized``, int8 channel symmetric, int8 dynamic per-token activations (``weight`` int8);
* ``fp8``: ``naive-quantized``, fp8 channel, no activations; ``fp8-w8a8``: ``float-quantized``, fp8 dynamic per-token
  activations; ``fp8-block``: ``float-quantized``, block 128 x 128, fp8 dynamic activations per group of 128;
* ``nvfp4``: ``nvfp4-pack-quantized`` (tensor_group 16, e4m3 scales, global scale); ``mxfp4``:
  ``mxfp4-pack-quantized`` (group 32, E8M0 scales).

Integer codes: compressed-tensors stores ``q + 2**(b-1)`` (``q`` signed) packed LSB first along K, 32 elements per
``b`` int32 words, and zero points the same way along N; ``w = (q - zp) * s``. qcompile's unsigned code ``u`` is that
stored value, and its symmetric ``(u - 2**(b-1)) * s`` is compressed-tensors' ``q * s`` (same codes). An
asymmetric qcompile zero is a float; where every zero of a site is an integer in ``[0, 2**b)`` it is written as is
(exact). Otherwise the site is **re-rounded**: ``zero' = clamp(round(zero))``, codes ``u' = clamp(round(u - zero +
zero'))`` (from the dequantized weight ``(u - zero) * s``); :func:`save` reports each such site with the largest
absolute change of a weight (at most half a step, more only where clamping bites).

NVFP4: compressed-tensors divides (``weight_scale / weight_global_scale``), qcompile multiplies (``scales *
global_scale``); ``weight_global_scale`` is chosen near ``1 / global_scale`` so the two agree for as many block scales
as possible; where one does not fit all, the site is reported with the largest change (a float32 ulp of a unit).

Refused, naming the sites and why: 3-bit integers (compressed-tensors 0.17, which vLLM reads, packs them
differently from 0.20), grouped integer sites whose K is not a multiple of the group (compressed-tensors needs whole
groups), input permutations (GPTQ ``desc_act`` imports), Hadamard rotations and activation quantization of the FP4
families, ``fp8-block-ue8m0``, and every other family.

vLLM kernels that serve each format (vLLM 0.34 on NVIDIA GPUs; see docs): int weight-only → ``WNA16`` (Machete on
sm90, Marlin, ...); ``w8a8`` → ``W8A8Int8`` (CUTLASS int8); fp8 → ``W8A8Fp8`` (sm89+) / ``W8A16Fp8`` (Marlin FP8);
``fp8-block`` → block ``W8A8Fp8`` (DeepGEMM, CUTLASS, Triton); ``nvfp4`` → ``W4A4Fp4``'s weight-only form (FlashInfer /
CUTLASS on sm100+, Marlin NVFP4 on H100); ``mxfp4`` → MXFP4 weight-only (Marlin and others).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import torch

from qcompile.hf.checkpoints.common import pack_dense
from qcompile.nn import QuantizedLinear
from qcompile.schemes import PackedWeight, parse_scheme
from qcompile.schemes.fp4 import e2m1_decode
from qcompile.schemes.integer import IntWeightOnly

EXPORT_BITS = (2, 4, 8)
INT8_TOKEN = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "token",
              "dynamic": True}  # fmt: skip
FP8_TOKEN = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "token",
             "dynamic": True}  # fmt: skip
FP8_GROUP = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": 128, "strategy": "group",
             "dynamic": True}  # fmt: skip


@dataclasses.dataclass
class ExportRecord:
    """One exported site: ``status`` is ``exact``, ``re-rounded`` (asymmetric zeros rounded, codes recomputed) or
    ``unit-ulp`` (NVFP4 units within one float32 ulp); ``max_error``: the largest absolute change of a weight."""

    site: str
    scheme: str
    format: str
    status: str
    max_error: float = 0.0


class ExportError(ValueError):
    """A model with sites compressed-tensors cannot express (the message names each site and why)."""


@dataclasses.dataclass
class _Site:
    record: ExportRecord
    weights: dict
    activations: dict | None
    tensors: dict[str, torch.Tensor]


# -- one site -------------------------------------------------------------------------------------------------------
def _integer(name: str, module: QuantizedLinear, weights_scheme: IntWeightOnly, activations: dict | None) -> _Site:
    bits, n, k = weights_scheme.bits, module.out_features, module.in_features
    group = weights_scheme.group_size
    q = weights_scheme.unpack(dict_packed(module), k)
    u = q.codes.to(torch.int64)[:, :k] + (128 if bits == 8 else 0)
    scales = q.scales.to(torch.float32)
    status, max_error = "exact", 0.0
    zero_units = None
    if q.zeros is not None:
        zeros = q.zeros.to(torch.float64) + (128 if bits == 8 else 0)  # unsigned code units
        rounded = torch.clamp(torch.round(zeros), 0, 2**bits - 1)
        if not torch.equal(rounded, zeros):
            groups = scales.shape[1]
            per = k // groups if group is None else group
            z_old = zeros.repeat_interleave(per, 1)[:, :k]
            z_new = rounded.repeat_interleave(per, 1)[:, :k]
            u_new = torch.clamp(torch.round(u - z_old + z_new), 0, 2**bits - 1)
            s = scales.to(torch.float64).repeat_interleave(per, 1)[:, :k]
            before = ((u - z_old) * s).to(torch.float32)
            after = ((u_new - z_new) * s).to(torch.float32)
            max_error = float((after - before).abs().max())
            u, status = u_new.to(torch.int64), "re-rounded"
        zero_units = rounded.to(torch.int64)
    tensors = {"weight_scale": scales.contiguous()}
    if activations is None:
        fmt = "pack-quantized"
        tensors["weight_packed"] = pack_dense(u, bits)
        tensors["weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if zero_units is not None:
            tensors["weight_zero_point"] = pack_dense(zero_units.t().contiguous(), bits).t().contiguous()
    else:
        fmt = "int-quantized"
        tensors["weight"] = (u - 128).to(torch.int8)
    weights = {"num_bits": bits, "type": "int", "symmetric": zero_units is None, "group_size": group,
               "strategy": "group" if group else "channel", "dynamic": False}  # fmt: skip
    record = ExportRecord(name, module.scheme, fmt, status, max_error)
    return _Site(record, weights, activations, tensors)


def _nvfp4_divisor(scales: torch.Tensor, multiplier: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """float32 ``[1]`` ``w`` near ``1 / multiplier`` for which ``fl(s / w) == fl(s * multiplier)`` for the most block
    scales ``s`` (weighted by count), and whether for all of them."""
    values, counts = scales.float().unique(return_counts=True)
    wanted = values * multiplier
    base = (1 / multiplier).reshape(1).to(torch.float32)
    best, best_count = base, -1
    for step in (0, 1, -1, 2, -2, 3, -3, 4, -4):
        w = (base.view(torch.int32) + step).view(torch.float32)
        matched = int(counts[values / w == wanted].sum())
        if matched > best_count:
            best, best_count = w, matched
    return best, best_count == int(counts.sum())


def _fp4(name: str, module: QuantizedLinear, scheme) -> _Site:
    n, k = module.out_features, module.in_features
    packed = dict_packed(module)
    tensors = {"weight_packed": packed["qweight"].contiguous(), "weight_scale": packed["scales"].contiguous()}
    status, max_error = "exact", 0.0
    if scheme.family == "nvfp4":
        fmt = "nvfp4-pack-quantized"
        multiplier = packed["global_scale"].to(torch.float32).reshape(1)
        divisor, exact = _nvfp4_divisor(packed["scales"], multiplier)
        tensors["weight_global_scale"] = divisor
        if not exact:
            codes = scheme.unpack(packed, k).codes
            values = e2m1_decode(codes, torch.float32).reshape(n, -1, 16)
            ours = values * (packed["scales"].float() * multiplier).unsqueeze(-1)
            theirs = values * (packed["scales"].float() / divisor).unsqueeze(-1)
            max_error, status = float((ours - theirs).abs().max()), "unit-ulp"
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                   "dynamic": False, "scale_dtype": "torch.float8_e4m3fn"}  # fmt: skip
    else:
        fmt = "mxfp4-pack-quantized"
        weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32, "strategy": "group",
                   "dynamic": False, "scale_dtype": "torch.uint8"}  # fmt: skip
    return _Site(ExportRecord(name, module.scheme, fmt, status, max_error), weights, None, tensors)


def _fp8(name: str, module: QuantizedLinear, scheme) -> _Site:
    packed = dict_packed(module)
    tensors = {"weight": packed["qweight"].contiguous(), "weight_scale": packed["scales"].to(torch.float32)}
    if scheme.family == "fp8-block":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "block",
                   "block_structure": [128, 128], "dynamic": False}  # fmt: skip
        return _Site(ExportRecord(name, module.scheme, "float-quantized", "exact"), weights, FP8_GROUP, tensors)
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "strategy": "channel",
               "dynamic": False}  # fmt: skip
    activations = FP8_TOKEN if scheme.activations else None
    fmt = "float-quantized" if activations else "naive-quantized"
    return _Site(ExportRecord(name, module.scheme, fmt, "exact"), weights, activations, tensors)


class _Refused(Exception):
    pass


def dict_packed(module: QuantizedLinear) -> PackedWeight:
    return PackedWeight(dict(zip(module.tensor_names, module.packed())))


def refusal(scheme, in_features: int, permuted: bool = False) -> str | None:
    """Why a layer of ``scheme`` (a :class:`~qcompile.schemes.Scheme`) with ``in_features`` input columns has no
    compressed-tensors form (``permuted``: it holds an input permutation), or ``None`` when it has one."""
    if permuted:
        return "an input permutation (desc_act) has no compressed-tensors 0.20 form"
    family, k = scheme.family, in_features
    if family in ("int-weight-only", "w8a8-int8"):
        weights = scheme if family == "int-weight-only" else scheme.weights
        bits, group = weights.bits, weights.group_size
        if bits not in EXPORT_BITS:
            return f"{bits}-bit integers: compressed-tensors 0.17 (read by vLLM) and 0.20 pack them differently"
        if group is not None and k % group:
            return f"K={k} is not a multiple of the group size {group} (compressed-tensors needs whole groups)"
        return None
    if family == "fp8-block" and scheme.ue8m0:
        return "ue8m0 rounds activation scales to powers of two, which compressed-tensors cannot say"
    if family in ("fp8", "fp8-block"):
        return None
    if family in ("nvfp4", "mxfp4"):
        if scheme.rotation or scheme.activations:
            return "Hadamard rotations and FP4 activation quantization have no compressed-tensors form here"
        if k % scheme.group_size:
            return f"K={k} is not a multiple of {scheme.group_size}"
        return None
    return (f"family {family} has no compressed-tensors form (exported: int2/4/8 weight-only, w8a8, fp8, "
            "fp8-w8a8, fp8-block, nvfp4, mxfp4)")  # fmt: skip


def export_site(name: str, module: QuantizedLinear) -> _Site:
    """The compressed-tensors form of one qcompile layer; raises ``_Refused`` with the reason when there is none."""
    scheme = parse_scheme(module.scheme)
    reason = refusal(scheme, module.in_features, getattr(module, "input_permutation", None) is not None)
    if getattr(module, "input_divisor", None) is not None:
        reason = "an explicit input scale (AWQ / SmoothQuant explicit_scales) has no compressed-tensors form"
    if reason is not None:
        raise _Refused(reason)
    if scheme.family == "int-weight-only":
        return _integer(name, module, scheme, None)
    if scheme.family == "w8a8-int8":
        return _integer(name, module, scheme.weights, INT8_TOKEN)
    if scheme.family in ("fp8", "fp8-block"):
        return _fp8(name, module, scheme)
    return _fp4(name, module, scheme)


# -- the model ------------------------------------------------------------------------------------------------------
def quantization_config(sites: list[_Site], ignore: list[str]) -> dict:
    """The compressed-tensors ``quantization_config``: one config group per distinct (weights, activations, format);
    targets are ``Linear`` when a single group covers every quantized layer, else the layers' names."""
    groups: dict[str, dict] = {}
    for site in sites:
        key = json.dumps([site.weights, site.activations, site.record.format], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": site.weights, "input_activations": site.activations,
                                        "output_activations": None, "format": site.record.format})  # fmt: skip
        group["targets"].append(site.record.site)
    if len(groups) == 1:
        next(iter(groups.values()))["targets"] = ["Linear"]
    formats = {g["format"] for g in groups.values()}
    config = {
        "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": ignore,
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
    }
    try:
        import compressed_tensors

        config["version"] = compressed_tensors.__version__
    except ImportError:
        pass
    return config


def write_config(out_dir, config: dict, sites: list[_Site], ignore: list[str]) -> None:
    """``out_dir/config.json``: the model's transformers ``config`` (a dict) with the ``quantization_config`` of
    ``sites`` (only their records, weights and activations are read) and the float linear layers ``ignore``."""
    config = {**config, "quantization_config": quantization_config(sites, ignore)}
    text = json.dumps(config, indent=2, sort_keys=True, default=str)
    (pathlib.Path(out_dir) / "config.json").write_text(text + "\n")


def table(records: list[ExportRecord]) -> str:
    rows = [("site", "scheme", "format", "status", "max abs added error")]
    rows += [(r.site, r.scheme, r.format, r.status, f"{r.max_error:.3g}") for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def save(model: torch.nn.Module, out_dir, tokenizer=None, *, verbose: bool = True) -> list[ExportRecord]:
    """Write ``model`` (quantized with :func:`qcompile.quantize`) to ``out_dir`` as a compressed-tensors checkpoint:
    ``model.safetensors`` and ``config.json`` (the model's transformers config plus ``quantization_config``), the
    generation config and ``tokenizer`` when given. Returns one :class:`ExportRecord` per quantized site and prints
    their table (``verbose``). Raises :class:`ExportError` naming every site that has no compressed-tensors form."""
    from safetensors.torch import save_file

    out = pathlib.Path(out_dir)
    sites, refused, ignore, owned = [], [], [], set()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            try:
                sites.append(export_site(name, module))
            except _Refused as reason:
                refused.append(f"{name} ({module.scheme}): {reason}")
            owned.update(f"{name}.{t}" for t in (*module.tensor_names, "input_permutation"))
        elif isinstance(module, torch.nn.Linear):
            ignore.append(name)
    if refused:
        raise ExportError("these sites have no compressed-tensors form:\n  " + "\n  ".join(refused))
    if not sites:
        raise ExportError("the model has no qcompile QuantizedLinear layers (quantize it with qcompile.quantize "
                          "first)")  # fmt: skip
    state, seen = {}, {}
    for name, tensor in model.state_dict().items():
        if name in owned:
            continue
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))
        if tensor.numel() and key in seen:  # a tied weight: written once, as transformers does
            continue
        seen[key] = name
        state[name] = tensor.detach().contiguous()
    for site in sites:
        state.update({f"{site.record.site}.{k}": v.contiguous() for k, v in site.tensors.items()})
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_config(out, model.config.to_dict() if hasattr(model, "config") else {}, sites, ignore)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    records = [site.record for site in sites]
    if verbose:
        print(table(records))
    return records
