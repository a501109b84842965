"""Checkpoint writers for the import tests, built from each tool's published layout (GPTQ, AWQ) or by the tool itself
(bitsandbytes, compressed-tensors), plus the tiny Llama checkpoint they fill and its float reference.

Every writer returns the layer's tensors (the tool's local names) and the tool's own dequantized weight: for GPTQ and
AWQ the published formula evaluated in float64 on the integers the writer packed, for the others the tool's
dequantizer."""

from __future__ import annotations

import copy
import json
import pathlib

import numpy as np
import torch

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")  # fmt: skip


# -- GPTQ (AutoGPTQ qlinear pack, transcribed) ------------------------------------------------------------------------
def _pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``pack``: ``intweight [R, C]`` (uint32) → ``[R * bits / 32, C]`` words, packing along rows."""
    rows = intweight.shape[0] * bits // 32
    out = np.zeros((rows, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    if bits in (2, 4, 8):
        while row < rows:
            for j in range(i, i + 32 // bits):
                out[row] |= intweight[j] << np.uint32(bits * (j - i))
            i += 32 // bits
            row += 1
        return out
    assert bits == 3
    while row < rows:
        for j in range(i, i + 10):
            out[row] |= intweight[j] << np.uint32(3 * (j - i))
        i += 10
        out[row] |= intweight[i] << np.uint32(30)
        row += 1
        out[row] |= (intweight[i] >> np.uint32(2)) & np.uint32(1)
        i += 1
        for j in range(i, i + 10):
            out[row] |= intweight[j] << np.uint32(3 * (j - i) + 1)
        i += 10
        out[row] |= intweight[i] << np.uint32(31)
        row += 1
        out[row] |= (intweight[i] >> np.uint32(1)) & np.uint32(3)
        i += 1
        for j in range(i, i + 10):
            out[row] |= intweight[j] << np.uint32(3 * (j - i) + 2)
        i += 10
        row += 1
    return out


def _words(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).view(np.int32).copy())


def gptq_layer(w: torch.Tensor, bits: int = 4, group: int = 128, sym: bool = False, v2: bool = False,
               desc_act: bool = False, seed: int = 0, bias: bool = False):  # fmt: skip
    """A GPTQ layer for float ``w [N, K]``: round-to-nearest on GPTQ's grid (per group of ``group`` columns, in a
    random activation order with ``desc_act``), packed as AutoGPTQ packs. Returns ``(tensors, w64)`` with ``w64`` the
    published dequantization ``s[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])`` in float64."""
    n, k = w.shape
    maxq = 2**bits - 1
    g = k if group == -1 else group
    groups = -(-k // g)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if desc_act else torch.arange(k)
    g_idx = torch.empty(k, dtype=torch.int64)
    g_idx[order] = torch.arange(k) // g
    w64 = w.double()
    scales = torch.zeros(groups, n, dtype=torch.float16)
    zeros = torch.zeros(groups, n, dtype=torch.int64)
    for gi in range(groups):
        cols = w64[:, g_idx == gi]
        lo, hi = cols.amin(1).clamp(max=0), cols.amax(1).clamp(min=0)
        if sym:
            scale = torch.maximum(lo.abs(), hi) * 2 / maxq
            zero = torch.full((n,), (maxq + 1) // 2, dtype=torch.int64)
        else:
            scale = (hi - lo) / maxq
            zero = torch.round(-lo / scale).to(torch.int64)
        scales[gi] = scale.to(torch.float16)
        zeros[gi] = zero
    s = scales.double()[g_idx].t()  # [N, K]
    z = zeros[g_idx].t()
    q = torch.clamp(torch.round(w64 / s) + z, 0, maxq).to(torch.int64)  # [N, K]
    stored_zeros = zeros if v2 else (zeros - 1) & maxq  # v1 stores zero - 1
    tensors = {
        "qweight": _words(_pack_rows(q.t().numpy().astype(np.uint32), bits)),
        "qzeros": _words(_pack_rows(stored_zeros.t().numpy().astype(np.uint32), bits).T),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    if bias:
        tensors["bias"] = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(torch.float16)
    read_zero = stored_zeros if v2 else stored_zeros + 1
    w_ref = s * (q - read_zero[g_idx].t()).double()
    return tensors, w_ref


# -- AWQ GEMM (AutoAWQ WQLinear_GEMM.from_linear, transcribed) --------------------------------------------------------
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _awq_pack(intweight: np.ndarray) -> np.ndarray:
    """``[R, C]`` codes → ``[R, C / 8]`` words: nibble i of word c holds column 8c + AWQ_ORDER[i]."""
    out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << np.uint32(i * 4)
    return out


def awq_layer(w: torch.Tensor, group: int = 64, bias: bool = False, seed: int = 0):
    """An AWQ GEMM layer for float ``w [N, K]`` (zero-point RTN per group). Returns ``(tensors, w64)`` with ``w64 =
    (q - z) * s`` in float64."""
    n, k = w.shape
    groups = -(-k // group)
    g_of = torch.arange(k) // group
    w64 = w.double()
    scales = torch.zeros(groups, n, dtype=torch.float16)
    zeros = torch.zeros(groups, n, dtype=torch.int64)
    for gi in range(groups):
        cols = w64[:, g_of == gi]
        lo, hi = cols.amin(1), cols.amax(1)
        scale = ((hi - lo).clamp(min=1e-5) / 15).to(torch.float16)
        scales[gi] = scale
        zeros[gi] = torch.clamp(torch.round(-lo / scale.double()), 0, 15).to(torch.int64)
    s, z = scales.double()[g_of].t(), zeros[g_of].t()
    q = torch.clamp(torch.round(w64 / s) + z, 0, 15).to(torch.int64)  # [N, K]
    tensors = {
        "qweight": _words(_awq_pack(q.t().numpy().astype(np.uint32))),
        "qzeros": _words(_awq_pack(zeros.numpy().astype(np.uint32))),
        "scales": scales,
    }
    if bias:
        tensors["bias"] = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)).to(torch.float16)
    return tensors, (q - z).double() * s


# -- bitsandbytes (its own quantizer) ---------------------------------------------------------------------------------
def bnb_layer(w: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
              storage: torch.dtype = torch.uint8):  # fmt: skip
    """bitsandbytes' ``quantize_4bit`` of ``w`` serialized as ``Linear4bit`` saves it (``storage``:
    ``bnb_4bit_quant_storage``); ``(tensors, its dequantize_4bit)``. The dequantization is bitsandbytes' default
    backend's (blocks over the flattened weight, as its quantizer and CUDA kernels read them): its AVX-512 CPU kernel
    indexes absmax per row where ``K`` is a multiple of 16 but not of the blocksize."""
    import bitsandbytes.functional as F
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type,
                                    quant_storage=storage)  # fmt: skip
    tensors = {"weight": packed}
    tensors.update({f"weight.{key}": value for key, value in state.as_dict(packed=True).items()})
    absmax = state.absmax
    if state.nested:
        absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    flat = _dequantize_4bit_compute(packed.reshape(-1).view(torch.uint8), absmax, state.code, blocksize,
                                    tuple(w.shape), torch.float32)  # fmt: skip
    return tensors, flat.to(w.dtype)


def bnb_int8_layer(w: torch.Tensor, threshold: float = 6.0):
    """bitsandbytes' ``Linear8bitLt`` (``has_fp16_weights=False``) holding ``w``, quantized on CPU and saved; ``(its
    state dict: weight int8, SCB, weight_format, its int8_vectorwise_dequant(CB, SCB))``."""
    import bitsandbytes.functional as F

    module = bnb_int8_module(w, None, threshold)
    tensors = {key: value for key, value in module.state_dict().items() if key != "bias"}
    return tensors, F.int8_vectorwise_dequant(tensors["weight"], tensors["SCB"])


def bnb_int8_module(w: torch.Tensor, bias: torch.Tensor | None, threshold: float):
    """``bitsandbytes.nn.Linear8bitLt`` (``has_fp16_weights=False``, eval) with weight ``w`` and ``bias``, on CPU."""
    import logging

    import bitsandbytes as bnb

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    n, k = w.shape
    module = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False, threshold=threshold)
    state = {"weight": w.detach().to(torch.float32)}
    if bias is not None:
        state["bias"] = bias.detach()
    module.load_state_dict(state)
    return module.to("cpu").eval()


# -- compressed-tensors (its own qparams and compressors) -------------------------------------------------------------
def ct_args(**kwargs):
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(**kwargs)


def ct_layer(w: torch.Tensor, weights, activations=None, fmt: str = "pack-quantized", scale_dtype=None,
             fp32: bool = False):  # fmt: skip
    """compressed-tensors' qparams (``calculate_qparams`` on each group's min / max, its global scale for NVFP4) and
    its compressor for ``fmt``; ``(tensors, its decompress(...)["weight"])``. ``scale_dtype`` casts ``weight_scale``
    before compressing (checkpoints hold it in the model dtype). FP4 decompression rounds to bfloat16; ``fp32``
    returns the same formula (its ``unpack_fp4_from_uint8`` and ``dequantize``) evaluated in float32 instead."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam

    n, k = w.shape
    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations, format=fmt)
    strategy = weights.strategy
    state = {"weight": w}
    global_scale = None
    if strategy == "tensor_group":
        global_scale = generate_gparam(w.min(), w.max())
        state["weight_global_scale"] = global_scale
    if strategy in ("group", "tensor_group"):
        blocks = w.reshape(n, k // weights.group_size, weights.group_size)
        lo, hi = blocks.amin(-1), blocks.amax(-1)
    elif strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    elif strategy == "block":
        rows, cols = weights.block_structure
        padded = torch.nn.functional.pad(w, (0, -k % cols, 0, -n % rows))
        blocks = padded.reshape(padded.shape[0] // rows, rows, padded.shape[1] // cols, cols)
        lo, hi = blocks.amin((1, 3)), blocks.amax((1, 3))
    else:
        lo, hi = w.min().reshape(1), w.max().reshape(1)
    scale, zero = calculate_qparams(lo, hi, weights, global_scale=global_scale)
    if scale_dtype is not None and scale.dtype not in (torch.float8_e4m3fn, torch.uint8):
        scale = scale.to(scale_dtype)
    state["weight_scale"] = scale
    if not weights.symmetric:
        state["weight_zero_point"] = zero
    compressor = BaseCompressor.get_value_from_registry(fmt)
    tensors = compressor.compress(state, scheme)
    if fp32 and fmt.endswith("fp4-pack-quantized"):
        return tensors, ct_fp4_dequantize_fp32(tensors, weights, fmt)
    return tensors, compressor.decompress(dict(tensors), scheme)["weight"]


def ct_fp4_dequantize_fp32(tensors, weights, fmt: str) -> torch.Tensor:
    """compressed-tensors' FP4 decompression (unpack, scale, ``dequantize``) with float32 in place of bfloat16."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    packed = tensors["weight_packed"]
    values = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
    scale = tensors["weight_scale"]
    scale = decompress_mx_scale(scale).float() if fmt.startswith("mxfp4") else scale.float()
    return dequantize(values, scale, args=weights, global_scale=tensors.get("weight_global_scale"),
                      dtype=torch.float32)


def ct_config(groups: dict, ignore=("lm_head",), fmt: str | None = None) -> dict:
    """``quantization_config`` as compressed-tensors' ``ModelCompressor.update_config`` writes it."""
    import tempfile

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    config = QuantizationConfig(config_groups=groups, ignore=list(ignore), format=fmt,
                                quantization_status="compressed")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ModelCompressor(quantization_config=config).update_config(tmp)
        return json.loads((pathlib.Path(tmp) / "config.json").read_text())["quantization_config"]


# -- the tiny Llama checkpoint ----------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0, tie: bool = True):
    from qcompile.models import tiny_llama as build

    return build(seed=seed, tie=tie, layers=2, hidden=128, intermediate=192)


def write_checkpoint(model, path: pathlib.Path, quantization_config: dict, layer_fn) -> torch.nn.Module:
    """Write ``model`` with every decoder linear replaced by ``layer_fn(name, weight) -> (tensors, dequantized)``;
    returns the float reference: a copy of ``model`` whose linear weights are the tool's dequantized ones."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    reference = copy.deepcopy(model)
    state = {}
    quantized = set()
    for index, layer in enumerate(model.model.layers):
        for part in LLAMA_LINEARS:
            name = f"model.layers.{index}.{part}"
            module = model.get_submodule(name)
            tensors, dequantized = layer_fn(name, module.weight.detach())
            state.update({f"{name}.{key}": value.contiguous() for key, value in tensors.items()})
            quantized.add(f"{name}.weight")
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(dequantized.to(torch.float32))
    for name, tensor in model.state_dict().items():
        if name not in quantized and not (model.config.tie_word_embeddings and name == "lm_head.weight"):
            state[name] = tensor.contiguous()
    save_file(state, str(path / "model.safetensors"))
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return reference


def logits(model, seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits
