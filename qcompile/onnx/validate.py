"""Validation after export, as ``optimum-cli export onnx`` does it: run the file in onnxruntime on the
example inputs and on a second shape, and compare with qcompile's own output.

The second shape grows every dynamic axis of the graph inputs (batch by 1, other axes by 3); new integer
inputs are drawn within the example's value range (token ids stay in the vocabulary, an all-ones mask stays
all ones), float inputs with the example's mean and spread.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.utils._pytree as pytree

from qcompile.onnx.base import OnnxExportError

RELATIVE_TOLERANCE = 1e-3
# Activations quantized at run time (w8a8): each quantized matmul matches qcompile exactly given the same input,
# but an ulp-level difference in the float ops between them (LayerNorm, softmax, GELU) flips rounding decisions
# of later activation quantizations, and deep models amplify those flips (MiniLM w8a8: about 2e-2).
ACTIVATION_QUANTIZED_RELATIVE_TOLERANCE = 1e-1


class OnnxValidationError(OnnxExportError):
    """onnxruntime's output differs from qcompile's by more than the tolerance."""


@dataclasses.dataclass
class Comparison:
    """One output at one input shape: ``max_abs_diff`` against ``bound`` (``reference_max``: max |qcompile|)."""

    inputs: str
    output: str
    max_abs_diff: float
    reference_max: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.bound

    @property
    def relative(self) -> float:
        return self.max_abs_diff / max(self.reference_max, 1e-12)


def session(path, threads: int | None = None):
    """An onnxruntime CPU session for parity: float activations in every quantized matmul.

    ``session.qdq_matmulnbits_accuracy_level = 0`` stops onnxruntime from fusing ``DequantizeLinear`` +
    ``MatMul`` into a MatMulNBits that quantizes activations (its default accuracy level 4)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def grown_inputs(sess, args, kwargs, seed: int = 0):
    """``(args, kwargs)`` like the examples with every dynamic axis of the ONNX inputs made larger."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    onnx_inputs = sess.get_inputs()
    if len(onnx_inputs) != len(positions):
        raise OnnxExportError(f"the ONNX graph takes {len(onnx_inputs)} inputs, the examples give {len(positions)}")
    sizes: dict[str, int] = {}
    for position, info in zip(positions, onnx_inputs):
        for axis, (dim, size) in enumerate(zip(info.shape, leaves[position].shape)):
            if isinstance(dim, str):
                sizes.setdefault(dim, size + (1 if axis == 0 else 3))
    generator = torch.Generator().manual_seed(seed)
    new = list(leaves)
    for position, info in zip(positions, onnx_inputs):
        example = leaves[position]
        shape = [sizes[d] if isinstance(d, str) else s for d, s in zip(info.shape, example.shape)]
        new[position] = _like(example, shape, generator)
    return pytree.tree_unflatten(new, spec)


def _like(example: torch.Tensor, shape, generator) -> torch.Tensor:
    if example.dtype == torch.bool:
        return torch.ones(shape, dtype=torch.bool)
    if example.dtype.is_floating_point:
        std = float(example.float().std()) if example.numel() > 1 else 1.0
        return (torch.randn(shape, generator=generator) * std + float(example.float().mean())).to(example.dtype)
    low, high = int(example.min()), int(example.max())
    return torch.randint(low, high + 1, shape, generator=generator, dtype=example.dtype)


def feeds(sess, args, kwargs) -> dict[str, np.ndarray]:
    leaves = [leaf for leaf in pytree.tree_leaves((tuple(args), dict(kwargs or {}))) if isinstance(leaf, torch.Tensor)]
    return {info.name: leaf.detach().cpu().numpy() for info, leaf in zip(sess.get_inputs(), leaves)}


def tensor_outputs(value) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]


def compare(sess, reference_fn, args, kwargs, atol: float | None, label: str,
            rtol: float = RELATIVE_TOLERANCE) -> list[Comparison]:  # fmt: skip
    """Run both sides on ``(args, kwargs)``; one :class:`Comparison` per output."""
    with torch.no_grad():
        expected = tensor_outputs(reference_fn(*args, **(kwargs or {})))
    got = sess.run(None, feeds(sess, args, kwargs))
    names = [o.name for o in sess.get_outputs()]
    if len(got) != len(expected):
        raise OnnxExportError(f"the ONNX graph gives {len(got)} outputs, qcompile's program {len(expected)}")
    results = []
    for name, ours, theirs in zip(names, expected, got):
        ours = ours.detach().float().cpu().numpy()
        if ours.shape != theirs.shape:
            raise OnnxValidationError(
                f"output {name} at inputs {label}: onnxruntime shape {theirs.shape}, qcompile {ours.shape}"
            )
        diff = float(np.abs(ours - theirs.astype(np.float32)).max()) if ours.size else 0.0
        scale = float(np.abs(ours).max()) if ours.size else 0.0
        bound = atol if atol is not None else rtol * max(scale, 1e-6)
        results.append(Comparison(label, name, diff, scale, bound))
    return results


def describe(args, kwargs) -> str:
    leaves = [leaf for leaf in pytree.tree_leaves((tuple(args), dict(kwargs or {}))) if isinstance(leaf, torch.Tensor)]
    return ", ".join("x".join(str(s) for s in leaf.shape) for leaf in leaves)


def validate(path, reference_fn, args, kwargs=None, atol: float | None = None,
             rtol: float = RELATIVE_TOLERANCE) -> list[Comparison]:  # fmt: skip
    """Compare onnxruntime with ``reference_fn`` at the example inputs and one grown shape; raise
    :class:`OnnxValidationError` when a difference exceeds ``atol`` (default ``rtol * max|qcompile output|``)."""
    sess = session(path)
    runs = [(tuple(args), dict(kwargs or {}))]
    runs.append(grown_inputs(sess, *runs[0]))
    results = []
    for run_args, run_kwargs in runs:
        results += compare(sess, reference_fn, run_args, run_kwargs, atol, describe(run_args, run_kwargs), rtol)
    failed = [r for r in results if not r.ok]
    if failed:
        lines = "\n".join(
            f"  output {r.output} at inputs {r.inputs}: "
            f"max |onnxruntime - qcompile| = {r.max_abs_diff:.3g} > {r.bound:.3g}"
            for r in failed
        )  # fmt: skip
        raise OnnxValidationError(
            f"{path}: onnxruntime does not match qcompile:\n{lines}\nThe file was written; inspect it, or pass a "
            f"larger atol if this difference is expected (see docs/onnx.md, 'Parity')."
        )
    return results
