"""Attention masks, decided once per forward instead of once per layer.

Under ``torch.compile``, transformers' models build one boolean mask ``[B, 1, L, S]`` (True: attend) and hand it to
every layer's ``scaled_dot_product_attention``, where eager code passes no mask and ``is_causal=True``. Each call
then turns the mask into an additive float mask again (two passes over ``B·L·S`` per layer) and computes every
block of the scores, the ones the mask removes included.

:func:`share_attention_masks` rewrites the graph so that the mask is looked at once per forward
(:func:`classify_mask`): an all-True mask becomes no mask, a mask equal to ``tril(ones(L, S))`` (what
``is_causal=True`` means) becomes ``is_causal=True``, and any other mask becomes one additive mask in the query's
dtype (0 where True, ``-inf`` where False: what SDPA itself makes of a boolean mask). Every SDPA call reading that
mask then gets the shared result (:func:`attention`). The decision is a value check at run time, so padding or a
sliding window simply keep their mask. Graphs compiled further with inductor keep their masks: the check decides by
value, which a traced graph cannot.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

_SDPA = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)


def classify_mask(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor | None, bool]:
    """``(attn_mask, is_causal)`` equivalent to the boolean ``mask [..., L, S]`` for SDPA with ``dtype`` queries."""
    if bool(mask.all()):
        return None, False
    rows, cols = mask.shape[-2], mask.shape[-1]
    causal = torch.ones(rows, cols, dtype=torch.bool, device=mask.device).tril()
    if bool((mask == causal).all()):
        return None, True
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(mask.logical_not(), float("-inf")), False


def attention(query, key, value, shared, *args, **kwargs):
    """SDPA with the mask :func:`classify_mask` decided (``shared``); other arguments as the original call's."""
    attn_mask, is_causal = shared
    return F.scaled_dot_product_attention(query, key, value, *args, attn_mask=attn_mask, is_causal=is_causal,
                                          **kwargs)  # fmt: skip


def _mask_argument(node: fx.Node):
    mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
    if not isinstance(mask, fx.Node) or node.kwargs.get("is_causal", False) or len(node.args) > 4:
        return None
    value = mask.meta.get("example_value", mask.meta.get("val"))
    query = node.args[0].meta.get("example_value", node.args[0].meta.get("val")) if node.args else None
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool or not isinstance(query, torch.Tensor):
        return None
    return mask, query.dtype


def share_attention_masks(gm: fx.GraphModule) -> int:
    """Rewrite the SDPA calls of ``gm`` that take a boolean mask (see module docstring); returns how many."""
    shared: dict[tuple, fx.Node] = {}
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        found = _mask_argument(node)
        if found is None:
            continue
        mask, dtype = found
        if (mask, dtype) not in shared:
            with gm.graph.inserting_after(mask):
                shared[(mask, dtype)] = gm.graph.call_function(classify_mask, (mask, dtype))
        kwargs = {k: v for k, v in node.kwargs.items() if k not in ("attn_mask", "is_causal")}
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(attention, (*node.args[:3], shared[(mask, dtype)]), kwargs)
        replacement.meta.update(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        rewritten += 1
    if rewritten:
        gm.graph.lint()
        gm.recompile()
    return rewritten
