"""The ``qcompile::*`` custom ops.

``qcompile::linear(x, qweight, scales, zeros, bias, scheme) -> y`` is the one op every quantized matmul
site becomes. ``x`` is ``[..., K]`` in any float dtype; ``qweight, scales, zeros`` are the scheme's packed
tensors (``zeros`` may be ``None``); ``bias`` is ``[N]`` or ``None``; ``scheme`` is the scheme name.
``y`` is ``[..., N]`` in ``x.dtype``, where ``N = scales.shape[0]``.

Each op has a fake impl (export, dynamic shapes), a reference impl in plain PyTorch (the scheme's
``reference_linear``), device kernels chosen by :mod:`qcompile.runtime.dispatch`, and an autograd
formula for the activation (and bias), so adapters can train over a frozen quantized base.
"""

from __future__ import annotations

import torch

from qcompile.runtime import dispatch
from qcompile.schemes import parse_scheme


@torch.library.custom_op("qcompile::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bias: torch.Tensor | None,
    scheme: str,
) -> torch.Tensor:
    """Quantized ``y = x @ W.T + bias`` (see module docstring)."""
    kernel = dispatch.choose_kernel(scheme, x, qweight, scales, zeros, bias)
    parsed = parse_scheme(scheme)
    if kernel is not None:
        return kernel.run(parsed, x, qweight, scales, zeros, bias)
    return parsed.reference_linear(x, qweight, scales, zeros, bias)


@linear.register_fake
def _(x, qweight, scales, zeros, bias, scheme):
    return x.new_empty((*x.shape[:-1], scales.shape[0]))


def reference_linear(x, qweight, scales, zeros, bias, scheme: str) -> torch.Tensor:
    """The plain-PyTorch oracle, bypassing every kernel."""
    return parse_scheme(scheme).reference_linear(x, qweight, scales, zeros, bias)


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, bias, scheme = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.scheme = scheme
    ctx.in_features = x.shape[-1]
    ctx.x_dtype = x.dtype
    ctx.has_bias = bias is not None
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    weight = parse_scheme(ctx.scheme).dequantize_packed(qweight, scales, zeros, ctx.in_features)
    grad_x = (grad @ weight.to(grad.dtype)).to(ctx.x_dtype)
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None


linear.register_autograd(_backward, setup_context=_setup_context)
