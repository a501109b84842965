"""The ``qcompile::*`` custom ops.

``qcompile::linear(x, packed, bias, scheme, in_features, out_features) -> y`` is the one op every quantized matmul
site becomes. ``x`` is ``[..., K]`` in any float dtype with ``K == in_features`` (checked by the op: a packed K may
be padded, so only this argument says what K is); ``packed`` is the scheme's tensor list, in the order and with
the shapes the scheme declares (``Scheme.tensors(out_features, in_features)``); ``bias`` is ``[N]`` or ``None``;
``scheme`` is the scheme name. ``y`` is ``[..., N]`` in ``x.dtype`` with ``N = out_features``.

Each op has a fake impl (export, dynamic shapes), a reference impl in plain PyTorch (the scheme's
``reference_linear``), device kernels chosen by :mod:`qcompile.runtime.dispatch`, and an autograd
formula for the activation (and bias), so adapters can train over a frozen quantized base.
"""

from __future__ import annotations

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from qcompile.runtime import dispatch
from qcompile.schemes import parse_scheme

ARGUMENTS = "(Tensor x, Tensor[] packed, Tensor? bias, str scheme, SymInt in_features, SymInt out_features) -> Tensor"
SCHEMA = "linear" + ARGUMENTS

# Defined with torch.library.Library rather than @custom_op: the op runs once per quantized layer per
# decoded token, and custom_op's generic Python wrappers cost ~40 us a call on a small CPU, several times a
# decode-sized kernel. Here the backend kernel is one memoized launcher and autograd is a thin check.
_lib = torch.library.Library("qcompile", "DEF")
_lib.define(SCHEMA, tags=(torch.Tag.pt2_compliant_tag,))


def _linear(x, packed, bias, scheme, in_features, out_features):
    """Quantized ``y = x @ W.T + bias`` (see module docstring)."""
    return dispatch.launcher(scheme, x, packed, bias, in_features, out_features)(x, packed, bias)


_lib.impl("linear", _linear, "CompositeExplicitAutograd")
linear = torch.ops.qcompile.linear.default

# What a C++ dispatcher kernel (codegen/cpp/op) hands back when it cannot serve a call itself, and what it
# calls when a gradient must be recorded. Neither appears in captured graphs.
_lib.define("_linear_fallback" + ARGUMENTS)
_lib.impl("_linear_fallback", _linear, "CompositeExplicitAutograd")
_lib.define("_linear_train" + ARGUMENTS)


@torch.library.register_fake("qcompile::linear", lib=_lib)
def _(x, packed, bias, scheme, in_features, out_features):
    torch._check(x.shape[-1] == in_features, lambda: f"qcompile::linear ({scheme}): the input has {x.shape[-1]} "
                 f"features, the layer takes {in_features}")  # fmt: skip
    return x.new_empty((*x.shape[:-1], out_features))


def reference_linear(x, packed, bias, scheme: str, in_features: int, out_features: int) -> torch.Tensor:
    """The plain-PyTorch oracle, bypassing every kernel (the op's own signature)."""
    torch._check(x.shape[-1] == in_features, lambda: f"qcompile.linear ({scheme}): activation width "
                 f"{x.shape[-1]} != in_features {in_features}")  # fmt: skip
    return parse_scheme(scheme).reference_linear(x, list(packed), bias, out_features)


class _LinearFunction(torch.autograd.Function):
    """Gradients for ``x`` (and ``bias``): ``grad @ dequantize(W)``; the packed weight is frozen."""

    @staticmethod
    def forward(ctx, x, packed, bias, scheme, in_features, out_features):
        ctx.packed = list(packed)  # frozen buffers: nothing to save for autograd's version checks
        ctx.call = (scheme, in_features, out_features)
        ctx.x_dtype = x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        with torch._C._AutoDispatchBelowAutograd():
            return linear(x, packed, bias, scheme, in_features, out_features)

    @staticmethod
    def backward(ctx, grad):
        scheme, in_features, out_features = ctx.call
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = parse_scheme(scheme).dequantize_packed(ctx.packed, out_features, in_features)
            grad_x = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None, None


_BELOW_AUTOGRAD = torch._C._after_autograd_keyset


def _autograd(keyset, x, packed, bias, scheme, in_features, out_features):
    """Record a backward only when a gradient is wanted; otherwise go straight to the kernel."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _LinearFunction.apply(x, packed, bias, scheme, in_features, out_features)
    with torch._C._AutoDispatchBelowAutograd():
        return linear.redispatch(keyset & _BELOW_AUTOGRAD, x, packed, bias, scheme, in_features, out_features)


_lib.impl("linear", _autograd, "Autograd", with_keyset=True)
_lib.impl("_linear_train", lambda *args: _LinearFunction.apply(*args), "Autograd")


def _functionalize(mode, op, types, args, kwargs):
    """Under functionalization (AOTAutograd, which inductor runs) a call may become its kernel launches, so that
    inductor compiles them itself (``dispatch.inline_kernels``); otherwise it stays one op."""
    out = dispatch.inline_launches(mode, args, kwargs)
    return mode.__torch_dispatch__(op, types, args, kwargs) if out is NotImplemented else out


torch.library.register_torch_dispatch("qcompile::linear", FunctionalTensorMode, _functionalize, lib=_lib)
