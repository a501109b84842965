"""The peer ``vptq`` package's own functions, loaded from its files.

``import vptq`` needs ``sentence_transformers`` (through ``vptq.utils.pack``'s module-level imports), and
``vptq.ops`` loads its CUDA library at import; neither is needed by the functions the tests use. So this module reads
the package's source files and executes exactly these definitions from them, unchanged:

* ``vptq/utils/pack.py``: ``pack_index``, ``unpack_index_tensor`` (the index bitstream);
* ``vptq/ops/quant_gemm.py``: ``dequant`` (the package's Python dequantization, what ``quant_gemm`` runs without its
  CUDA kernels);
* ``vptq/layers/vqlinear.py``: ``VQuantLinear`` (its parameters: names, shapes, dtypes), with ``ops`` bound to a
  namespace holding that ``dequant``.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import pathlib
import types
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.parameter import Parameter


def _root() -> pathlib.Path:
    spec = importlib.util.find_spec("vptq")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("the peer package vptq is not installed")
    return pathlib.Path(spec.origin).parent


def _definitions(relative: str, names: tuple[str, ...], namespace: dict) -> dict:
    """Execute the top-level definitions ``names`` of the package file ``relative`` in ``namespace``."""
    path = _root() / relative
    tree = ast.parse(path.read_text(), str(path))
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names]
    missing = set(names) - {n.name for n in nodes}
    if missing:
        raise AttributeError(f"{path}: no definition of {', '.join(sorted(missing))}")
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


_BASE = {"torch": torch, "math": math, "nn": nn, "F": F, "Parameter": Parameter, "Tuple": Tuple,
         "Optional": Optional}  # fmt: skip
_pack = _definitions("utils/pack.py", ("pack_index", "unpack_index_tensor"), dict(_BASE))
pack_index = _pack["pack_index"]
unpack_index_tensor = _pack["unpack_index_tensor"]
_ops = _definitions("ops/quant_gemm.py", ("dequant",), {**_BASE, "unpack_index_tensor": unpack_index_tensor})
dequant = _ops["dequant"]
VQuantLinear = _definitions("layers/vqlinear.py", ("VQuantLinear",),
                            {**_BASE, "ops": types.SimpleNamespace(dequant=dequant)})["VQuantLinear"]  # fmt: skip


def layer_weight(layer) -> torch.Tensor:
    """float32 ``[N, K]``: the package's ``dequant`` of a ``VQuantLinear`` (as its ``quant_gemm`` calls it without
    CUDA kernels), on float32 copies of the codebooks, scale and bias."""

    def f32(t):
        return None if t is None else t.detach().float()

    outlier = f32(layer.outlier_centroids.weight) if layer.enable_outlier else None
    res = f32(layer.res_centroids.weight) if layer.enable_residual else None
    return dequant(
        indices=layer.indices, centroids=f32(layer.centroids.weight).view(layer.num_codebooks, layer.num_centroids,
                                                                          layer.vector_len),
        outlier_indices=layer.outlier_indices,
        outlier_centroids=None if outlier is None else outlier.view(1, layer.num_outlier_centroids,
                                                                    layer.outlier_vector_len),
        res_indices=layer.res_indices,
        res_centroids=None if res is None else res.view(layer.num_codebooks, layer.num_res_centroids,
                                                        layer.vector_len),
        perm=getattr(layer, "perm", None), weight_scale=f32(layer.weight_scale), weight_bias=f32(layer.weight_bias),
        is_indice_packed=layer.is_indice_packed, enable_outlier=layer.enable_outlier,
        enable_residual=layer.enable_residual, enable_perm=layer.enable_perm, enable_norm=layer.enable_norm,
        num_centroids=layer.num_centroids, num_outlier_centroids=layer.num_outlier_centroids,
        num_res_centroids=layer.num_res_centroids, padding=layer.padding, outlier_padding=layer.outlier_padding,
        num_codebooks=layer.num_codebooks, group_size=layer.group_size, outlier_size=layer.outlier_size,
        vector_len=layer.vector_len, outlier_vector_len=layer.outlier_vector_len,
    )  # fmt: skip


def random_layer(n: int, k: int, v: int, kc: int, kr: int = -1, outliers: int = 0, *, norm: bool = True,
                 perm: bool = True, bias: bool = False, seed: int = 0, dtype=torch.float16):  # fmt: skip
    """A ``VQuantLinear`` (packed indices, one group) with random indices over their whole range (packed by the
    package's ``pack_index``), random codebooks, scale, bias and permutation; returns ``(layer, its config dict)``
    (the transformers ``VptqLayerConfig`` keys)."""
    g = torch.Generator().manual_seed(seed)
    gs = k - outliers
    config = {"vector_lens": [v if outliers else -1, v], "num_centroids": [kc if outliers else -1, kc],
              "num_res_centroids": [-1, kr], "group_num": 1, "group_size": gs, "outlier_size": outliers,
              "indices_as_float": False, "enable_norm": norm, "enable_perm": perm, "is_indice_packed": True}
    layer = VQuantLinear(k, n, vector_lens=config["vector_lens"], num_centroids=config["num_centroids"],
                         num_res_centroids=config["num_res_centroids"], group_num=1, group_size=gs,
                         outlier_size=outliers, indices_as_float=False, enable_norm=norm, enable_perm=perm,
                         is_indice_packed=True, bias=bias, dtype=dtype, enable_proxy_error=False)  # fmt: skip
    rows = layer.num_indices
    main = torch.randint(0, kc, (1, rows, gs), generator=g)
    res = torch.randint(0, kr, (1, rows, gs), generator=g) if kr > 0 else None
    bits = int(math.log2(kc))
    with torch.no_grad():
        layer.indices.data = pack_index(main.to(torch.int16), bits, None if res is None else res.to(torch.int16),
                                        int(math.log2(kr)) if kr > 0 else 0, index_dtype=torch.uint16)
        layer.centroids.weight.copy_(torch.randn(layer.centroids.weight.shape, generator=g) * 0.5)
        if res is not None:
            layer.res_centroids.weight.copy_(torch.randn(layer.res_centroids.weight.shape, generator=g) * 0.1)
        if outliers:
            layer.outlier_centroids.weight.copy_(torch.randn(layer.outlier_centroids.weight.shape, generator=g))
            idx = torch.randint(0, kc, tuple(layer.outlier_indices.shape), generator=g)
            layer.outlier_indices.data = idx.to(torch.uint16).view(torch.int16)
        if norm:
            layer.weight_scale.copy_(torch.rand(k, generator=g) + 0.5)
            layer.weight_bias.copy_(torch.randn(k, generator=g) * 0.1)
        if perm:
            layer.perm.data = torch.randperm(k, generator=g).to(torch.int16)
        if bias:
            layer.bias.copy_(torch.randn(n, generator=g))
    return layer, config
