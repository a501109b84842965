"""``passes/attention.py``: a boolean attention mask decided once per forward, checked against SDPA with the mask
itself (float64 attention for exactness of the decision, the model's own output for the rewrite)."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

from qcompile.passes.attention import attention, classify_mask, share_attention_masks


def _sdpa_with_mask(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["all", "causal", "causal, L < S", "padded", "window"])
def test_the_decision_equals_the_mask(kind):
    generator = torch.Generator().manual_seed(0)
    rows, cols = (5, 9) if kind == "causal, L < S" else (7, 7)
    q = torch.randn(2, 3, rows, 16, generator=generator, dtype=torch.float64)
    k = torch.randn(2, 3, cols, 16, generator=generator, dtype=torch.float64)
    v = torch.randn(2, 3, cols, 16, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 1, rows, cols, dtype=torch.bool)
    if kind.startswith("causal"):
        mask = mask.tril()
    elif kind == "padded":  # the second sequence is left-padded by two tokens
        mask = mask.tril()
        mask[1, :, :, :2] = False
        mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)
    elif kind == "window":
        mask = mask.tril() & ~mask.tril(-3)
    attn_mask, is_causal = classify_mask(mask, torch.float64)
    expected_kind = {"all": (True, False), "causal": (True, True), "causal, L < S": (True, True)}
    assert (attn_mask is None, is_causal) == expected_kind.get(kind, (False, False))
    if attn_mask is not None:
        assert attn_mask.dtype == torch.float64
    out = attention(q, k, v, (attn_mask, is_causal))
    torch.testing.assert_close(out, _sdpa_with_mask(q, k, v, mask), rtol=1e-12, atol=1e-12)


class _TwoLayers(torch.nn.Module):
    def forward(self, q, k, v, mask):
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=0.3)
        return F.scaled_dot_product_attention(a, k, v, attn_mask=mask, scale=0.3)


def test_one_decision_serves_every_layer():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    gm = fx.symbolic_trace(_TwoLayers())
    for node in gm.graph.nodes:  # symbolic_trace records no values: give every node the one Dynamo would
        node.meta["example_value"] = mask if node.name == "mask" else q
    assert share_attention_masks(gm) == 2
    decisions = [n for n in gm.graph.nodes if n.target is classify_mask]
    assert len(decisions) == 1
    assert not any(n.target is F.scaled_dot_product_attention for n in gm.graph.nodes)
    torch.testing.assert_close(gm(q, k, v, mask), _TwoLayers()(q, k, v, mask), rtol=1e-6, atol=1e-6)


def test_float_masks_and_causal_calls_are_left_alone():
    class Model(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask) + F.scaled_dot_product_attention(
                q, k, v, is_causal=True)

    q = torch.randn(1, 2, 4, 8)
    gm = fx.symbolic_trace(Model())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta["example_value"] = torch.zeros(1, 1, 4, 4) if node.name == "mask" else q
    assert share_attention_masks(gm) == 0


def test_compiled_model_matches_eager_with_and_without_padding(monkeypatch):
    """A real transformers model through the backend: a causal prefill (decided ``is_causal``) and a padded batch
    (its mask kept), each equal to eager."""
    from qcompile.models import load_smollm2
    from qcompile.passes import attention as pass_module

    decisions = []

    def recording(mask, dtype):
        decisions.append(classify_mask(mask, dtype))
        return decisions[-1]

    monkeypatch.setattr(pass_module, "classify_mask", recording)

    model, tokenizer = load_smollm2()
    model.config.num_hidden_layers = 2
    model.model.layers = model.model.layers[:2]
    compiled = torch.compile(model.forward, dynamic=True, backend="qcompile", options={"recipe": {"default": None}})
    ids = tokenizer(["The witches met", "Macbeth on the heath and spoke"], return_tensors="pt", padding=True)
    with torch.no_grad():
        cases = (({"input_ids": ids.input_ids[1:]}, (False, True)), (dict(ids), (True, False)))
        for batch, (is_mask, is_causal) in cases:
            expected = model(**batch, use_cache=False).logits
            decisions.clear()
            got = compiled(**batch, use_cache=False).logits
            assert [(m is not None, c) for m, c in decisions] == [(is_mask, is_causal)]
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
