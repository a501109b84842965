"""Helpers for the ONNX export tests: an oracle that runs qcompile's plain-PyTorch reference op, and
onnxruntime runs of a written file."""

from __future__ import annotations

import copy

import onnx
import torch

import qcompile
from qcompile.runtime.ops import reference_linear
from qcompile.onnx.validate import feeds, session, tensor_outputs

QUANTIZED_LINEAR = torch.ops.qcompile.linear.default


def reference_program(program: qcompile.QuantizedProgram) -> torch.nn.Module:
    """A copy of ``program.module`` whose quantized matmuls call the reference impl (no fast kernels)."""
    gm = copy.deepcopy(program.module)
    for node in gm.graph.nodes:
        if node.target is QUANTIZED_LINEAR:
            node.target = reference_linear
    gm.recompile()
    return gm


def onnxruntime_outputs(path, args, kwargs=None) -> list[torch.Tensor]:
    sess = session(path)
    return [torch.from_numpy(o) for o in sess.run(None, feeds(sess, args, kwargs))]


def assert_parity(path, program, args, kwargs=None, rtol=1e-3):
    """onnxruntime vs the reference oracle: max |diff| <= rtol * max |reference| for every output."""
    with torch.no_grad():
        expected = tensor_outputs(reference_program(program)(*args, **(kwargs or {})))
    got = onnxruntime_outputs(path, args, kwargs)
    assert len(got) == len(expected)
    worst = 0.0
    for ours, theirs in zip(expected, got):
        assert tuple(ours.shape) == tuple(theirs.shape)
        diff = (ours.float() - theirs.float()).abs().max().item()
        bound = rtol * ours.abs().max().item()
        assert diff <= bound, f"max |onnxruntime - reference| = {diff:.3g} > {bound:.3g}"
        worst = max(worst, diff / max(ours.abs().max().item(), 1e-12))
    return worst


def op_counts(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def assert_sizes(report, program, slack=0.10):
    """Initializers within ``slack`` of qcompile's packed weights plus the float remainder; no quantized
    weight present as a float tensor of its ``N*K`` elements."""
    model = onnx.load(report.path, load_external_data=False)
    quantized_paths = {p for s in report.sites for p in s.paths.values()}
    sizes = {t.name: len(t.raw_data) for t in model.graph.initializer}
    float_remainder = sum(size for name, size in sizes.items() if name not in quantized_paths)
    packed = sum(e.bytes_after for e in program.plan.quantized())
    assert sum(sizes.values()) <= (1 + slack) * (packed + float_remainder)
    weight_numels = {e.site.out_features * e.site.in_features for e in program.plan.quantized()}
    kept_numels = {e.site.out_features * e.site.in_features for e in program.plan if e.scheme is None}
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and tensor.name not in quantized_paths:
            numel = 1
            for d in tensor.dims:
                numel *= d
            assert numel not in weight_numels - kept_numels, f"float initializer {tensor.name} looks like a weight"
    return packed, float_remainder


class Stack(torch.nn.Module):
    """``layers`` (``name, in, out, scheme``) as linears one after another, each followed by a bounded activation:
    one site per scheme in one small model."""

    def __init__(self, layers):
        super().__init__()
        self.names = [name for name, *_ in layers]
        for name, k, n, _ in layers:
            setattr(self, name, torch.nn.Linear(k, n))

    def forward(self, x):
        for name in self.names:
            x = torch.tanh(getattr(self, name)(x)) * 2
        return x
