"""The qcompile::linear op: opcheck, reference semantics, autograd, fallback notice."""

import pytest
import torch

import qcompile  # noqa: F401
from qcompile.runtime import dispatch
from qcompile.runtime.ops import reference_linear
from qcompile.schemes import parse_scheme

SCHEMES = ["int8", "int4-g32", "int4-g128-sym", "int4", "int3-g64", "int2-g32", "nf4-g64", "w8a8", "w4a8-g32", "fp8",
           "fp8-w8a8"]


def _packed(name, n, k, seed=0):
    torch.manual_seed(seed)
    scheme = parse_scheme(name)
    weight = torch.randn(n, k)
    return scheme, weight, scheme.pack(scheme.quantize(weight))


@pytest.mark.parametrize("name", SCHEMES)
def test_opcheck(name):
    scheme, _, p = _packed(name, 24, 72)
    x = torch.randn(2, 3, 72)
    bias = torch.randn(24)
    # torch's schema checker compares inputs with ops that have no float8 CPU kernel: skip that one check for fp8
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    fp8 = any(t.dtype == torch.float8_e4m3fn for t in p.list())
    kwargs = {"test_utils": utils} if fp8 else {}
    op = torch.ops.qcompile.linear.default
    torch.library.opcheck(op, (x, p.list(), bias, scheme.name, 72, 24), **kwargs)
    x_grad = torch.randn(5, 72, requires_grad=True)
    torch.library.opcheck(op, (x_grad, p.list(), None, scheme.name, 72, 24), **kwargs)


def test_w8a8_reference_matches_float64_integer_math():
    scheme, _, p = _packed("w8a8", 12, 40)
    x = torch.randn(6, 40)
    x64 = x.double()
    x_scale = x64.abs().amax(1, keepdim=True) / 127
    x_q = torch.clamp(torch.round(x64 / x_scale), -127, 127)
    expected = (x_q @ p.qweight.double().t()) * x_scale * p.scales.double().reshape(1, -1)
    got = reference_linear(x, p.list(), None, "w8a8", x.shape[-1], 12)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "int4-g32", "nf4-g64", "w8a8", "w4a8-g32"])
def test_activation_gradient_matches_autograd_through_dequantized_weight(name):
    scheme, _, p = _packed(name, 16, 48)
    bias = torch.randn(16, requires_grad=True)
    x = torch.randn(3, 48, requires_grad=True)
    y = torch.ops.qcompile.linear(x, p.list(), bias, name, 48, 16)
    grad_out = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, bias), grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    w = scheme.dequantize_packed(p, 16, 48)
    y_ref = torch.nn.functional.linear(x_ref, w, bias_ref)
    gx_ref, gb_ref = torch.autograd.grad(y_ref, (x_ref, bias_ref), grad_out)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gb, gb_ref)


def test_lora_trains_over_frozen_quantized_base():
    torch.manual_seed(0)
    scheme, weight, p = _packed("int4-g32", 8, 32)
    lora_a = torch.nn.Parameter(torch.randn(4, 32) * 0.01)
    lora_b = torch.nn.Parameter(torch.zeros(8, 4))
    target = torch.nn.Linear(32, 8, bias=False)
    x = torch.randn(64, 32)
    y_target = target(x).detach()
    optimizer = torch.optim.Adam([lora_a, lora_b], lr=1e-2)
    losses = []
    for _ in range(60):
        y = torch.ops.qcompile.linear(x, p.list(), None, "int4-g32", 32, 8) + x @ lora_a.t() @ lora_b.t()
        loss = torch.nn.functional.mse_loss(y, y_target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bad_packed_shapes_are_refused_with_the_tensor_named():
    _, _, p = _packed("int4-g32", 8, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"qweight is uint8\[8, 31\], expected uint8\[8, 32\]"):
        torch.ops.qcompile.linear(x, [p.qweight[:, :-1], p.scales, p.zeros], None, "int4-g32", 64, 8)
    with pytest.raises(ValueError, match=r"takes 3 packed tensors \(qweight, scales, zeros\).*got 2"):
        torch.ops.qcompile.linear(x, [p.qweight, p.scales], None, "int4-g32", 64, 8)
    with pytest.raises(ValueError, match="zeros is float16"):
        torch.ops.qcompile.linear(x, [p.qweight, p.scales, p.zeros.half()], None, "int4-g32", 64, 8)
    with pytest.raises(ValueError, match=r"qweight is uint8\[8, 32\], expected uint8\[9, 32\] for \[N=9, K=64\]"):
        torch.ops.qcompile.linear(x, p.list(), None, "int4-g32", 64, 9)


def test_activation_width_is_checked_by_the_op():
    """A call whose activation width does not match the layer's K is refused, even when K pads to the same size."""
    _, _, p = _packed("int4-g32", 8, 60)  # K = 60 pads to 64
    with pytest.raises(ValueError, match="the input has 64 features, the layer takes 60"):
        torch.ops.qcompile.linear(torch.randn(2, 64), p.list(), None, "int4-g32", 60, 8)
    fake = torch._subclasses.FakeTensorMode()
    with fake, pytest.raises(Exception, match="the input has 64 features, the layer takes 60"):
        torch.ops.qcompile.linear(fake.from_tensor(torch.randn(2, 64)), [fake.from_tensor(t) for t in p.list()], None,
                                  "int4-g32", 60, 8)  # fmt: skip


def test_unserved_call_falls_back_and_says_so_once():
    def refuse(scheme, x, packed):
        return "test kernel refuses everything"

    entry = dispatch.KernelEntry("refusing-test-kernel", "cpu", ("int-weight-only",), refuse, lambda *a: None,
                                 priority=1000)  # fmt: skip
    dispatch.register_kernel(entry)
    try:
        _, _, p = _packed("int2-g16-sym", 8, 32)
        x = torch.randn(2, 32)
        with pytest.warns(UserWarning, match="reference path"):
            y = torch.ops.qcompile.linear(x, p.list(), None, "int2-g16-sym", 32, 8)
        torch.testing.assert_close(y, reference_linear(x, p.list(), None, "int2-g16-sym", x.shape[-1], 8))
    finally:
        dispatch.unregister_kernel("refusing-test-kernel")
