"""VPTQ checkpoints (transformers ``VptqConfig``, the ``vptq`` package's ``VQuantLinear``) → qcompile
``vptq-v<v>-k<Kc>[-r<Kr>][-o<o>]``.

``quantization_config``: ``{"quant_method": "vptq", "config_for_layers": {layer: VptqLayerConfig},
"shared_layer_config": {...}}``; a layer's config is ``config_for_layers[layer]``, else ``shared_layer_config``
under the layer's last name (``q_proj``). ``VptqLayerConfig`` keys: ``vector_lens [vo, v]``, ``num_centroids [Ko,
Kc]``, ``num_res_centroids [-1, Kr]`` (-1: none), ``group_num`` (must be 1), ``group_size`` (``K - o``),
``outlier_size`` ``o``, ``indices_as_float``, ``enable_norm``, ``enable_perm``, ``is_indice_packed`` (must be true).
Per layer ``<m>`` (``R = ceil(N / v)``)::

    <m>.indices                   int32            [1, R, ceil(gs*(log2 Kc + log2 Kr)/32)]  packed bitstream
    <m>.centroids.weight          float            [1, Kc*v]
    <m>.res_centroids.weight      float            [1, Kr*v]        with a residual
    <m>.outlier_indices           int16 / float16  [1, R, o]        with outliers (float16: the uint16 bits)
    <m>.outlier_centroids.weight  float            [1, Ko*vo]       with outliers
    <m>.weight_scale, weight_bias float            [K]              with enable_norm
    <m>.perm                      int16            [K]              with enable_perm (uint16 bits)
    <m>.bias                      float            [N]              optional

The codes carry over bit for bit (qcompile's layout is VPTQ's with the group axis dropped and codebooks as ``[E,
v]``). Codebooks, scale and bias become float16 (refused by name unless exact); without ``enable_norm`` the scale is 1
and the bias 0, without ``enable_perm`` the permutation is the identity (noted). Refused, naming the layer: more than
one group, unpacked indices, outliers whose vector length or centroid count differ from the main ones, a residual on
the outliers, a ``perm`` that is no permutation, outlier indices past their codebook.
"""

from __future__ import annotations

import math

import torch

from qcompile.hf.checkpoints.common import CheckpointError, ImportedLinear, dtype_name, expect
from qcompile.schemes import PackedWeight
from qcompile.schemes.vptq import Vptq

METHOD = "vptq"
TENSORS = {"indices": "indices", "centroids": "centroids.weight", "res_centroids": "res_centroids.weight",
           "outlier_indices": "outlier_indices", "outlier_centroids": "outlier_centroids.weight",
           "weight_scale": "weight_scale", "weight_bias": "weight_bias", "perm": "perm", "bias": "bias"}  # fmt: skip
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def layer_config(layer: str, config: dict) -> dict | None:
    found = (config.get("config_for_layers") or {}).get(layer)
    return found if found is not None else (config.get("shared_layer_config") or {}).get(layer.rsplit(".", 1)[-1])


def layers(names, config: dict, modules: dict | None = None) -> dict[str, tuple[dict, dict[str, str]]]:
    """``{layer: (its VptqLayerConfig, {local tensor name: checkpoint name})}`` for every layer with ``indices``."""
    names = set(names)
    out = {}
    for layer in sorted(n.removesuffix(".indices") for n in names if n.endswith(".indices")):
        cfg = layer_config(layer, config)
        if cfg is None:
            raise CheckpointError(f"{layer}: has VPTQ indices but no entry in config_for_layers or "
                                  f"shared_layer_config")  # fmt: skip
        out[layer] = (cfg, {t: f"{layer}.{s}" for t, s in TENSORS.items() if f"{layer}.{s}" in names})
    return out


def _pair(config: dict, key: str, where: str) -> tuple[int, int]:
    value = config.get(key)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise CheckpointError(f"{where}: VPTQ config {key} is {value!r}, expected [outlier, main]")
    return int(value[0]), int(value[1])


def scheme_of(config: dict, in_features: int, where: str = "layer") -> Vptq:
    """The qcompile scheme of one ``VptqLayerConfig`` (refusals name the key)."""
    if not config.get("is_indice_packed", True):
        raise CheckpointError(f"{where}: VPTQ is_indice_packed=false is not supported (transformers requires true)")
    if int(config.get("group_num", 1)) != 1:
        raise CheckpointError(f"{where}: VPTQ group_num={config['group_num']} is not supported (only 1)")
    vo, v = _pair(config, "vector_lens", where)
    ko, kc = _pair(config, "num_centroids", where)
    kro, kr = _pair(config, "num_res_centroids", where)
    o = int(config.get("outlier_size", 0))
    if o > 0 and (vo, ko) != (v, kc):
        raise CheckpointError(f"{where}: VPTQ outliers with vector length {vo} and {ko} centroids; qcompile's vptq "
                              f"needs the main ones (v={v}, {kc} centroids)")  # fmt: skip
    if o > 0 and kro > 0:
        raise CheckpointError(f"{where}: VPTQ residual on the outliers (num_res_centroids[0]={kro}) is not supported")
    gs = int(config.get("group_size", in_features - o))
    if gs != in_features - o:
        raise CheckpointError(f"{where}: VPTQ group_size={gs}, expected K - outlier_size = {in_features - o}")
    try:
        return Vptq(v, kc, kr if kr > 0 else 0, max(o, 0))
    except ValueError as error:
        raise CheckpointError(f"{where}: no qcompile vptq scheme for this config: {error}") from None


def _float16(tensor: torch.Tensor, where: str, name: str) -> torch.Tensor:
    half = tensor.to(torch.float16)
    if tensor.dtype != torch.float16 and not torch.equal(half.to(tensor.dtype), tensor):
        raise CheckpointError(f"{where}.{name}: {dtype_name(tensor.dtype)} values that float16 does not hold exactly "
                              f"(qcompile's vptq layout stores float16)")  # fmt: skip
    return half


def convert(tensors: dict[str, torch.Tensor], config: dict, *, in_features: int | None = None,
            out_features: int | None = None, where: str = "layer") -> ImportedLinear:  # fmt: skip
    """One VPTQ layer (local names: the keys of ``TENSORS``) → :class:`ImportedLinear`."""
    idx = tensors.get("indices")
    if idx is None:
        raise CheckpointError(f"{where}.indices: missing")
    if in_features is None or out_features is None:
        raise CheckpointError(f"{where}: VPTQ import needs the layer's in_features and out_features")
    n, k = out_features, in_features
    s = scheme_of(config, k, where)
    v, r, o = s.vector_len, s.vector_rows(n), s.outliers
    why = f"{s.name}: [N={n}, K={k}]"
    expect(idx, where, "indices", (1, r, math.ceil((k - o) * s.total_bits / 32)), (torch.int32,), why)
    packed = {"indices": idx.reshape(r, -1).contiguous()}
    books = expect(tensors.get("centroids"), where, "centroids", (1, s.centroids * v), FLOATS, why)
    packed["centroids"] = _float16(books, where, "centroids").reshape(s.centroids, v)
    if s.res_centroids:
        res = expect(tensors.get("res_centroids"), where, "res_centroids", (1, s.res_centroids * v), FLOATS, why)
        packed["res_centroids"] = _float16(res, where, "res_centroids").reshape(s.res_centroids, v)
    if o:
        oidx = expect(tensors.get("outlier_indices"), where, "outlier_indices", (1, r, o),
                      (torch.int16, torch.float16), why)  # fmt: skip
        packed["outlier_indices"] = oidx.view(torch.int16).reshape(r, o).contiguous()
        obooks = expect(tensors.get("outlier_centroids"), where, "outlier_centroids", (1, s.centroids * v), FLOATS,
                        why)  # fmt: skip
        packed["outlier_centroids"] = _float16(obooks, where, "outlier_centroids").reshape(s.centroids, v)
    notes = []
    if config.get("enable_norm", True):
        scale = expect(tensors.get("weight_scale"), where, "weight_scale", (k,), FLOATS, why)
        packed["weight_scale"] = _float16(scale, where, "weight_scale")
        packed["weight_bias"] = _float16(expect(tensors.get("weight_bias"), where, "weight_bias", (k,), FLOATS, why),
                                         where, "weight_bias")  # fmt: skip
    else:
        packed["weight_scale"], packed["weight_bias"] = torch.ones(k, dtype=torch.float16), torch.zeros(k).half()
        notes.append("enable_norm=false: weight_scale 1, weight_bias 0")
    if config.get("enable_perm", True):
        packed["perm"] = expect(tensors.get("perm"), where, "perm", (k,), (torch.int16,), why).contiguous()
    else:
        packed["perm"] = torch.arange(k).to(torch.int16)
        notes.append("enable_perm=false: identity permutation")
    bias = tensors.get("bias")
    if bias is not None:
        expect(bias, where, "bias", (n,), FLOATS)
    weight = PackedWeight(packed)
    s.check_packed(weight, n, k, where=where)
    try:
        s.check_values(weight, k, where)
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    return ImportedLinear(s.name, weight, k, n, None, bias, tuple(notes))
