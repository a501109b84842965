"""What the peer families (``quanto``, ``torchao``, ``eetq``) share: schemes that write another library's quantized
numbers into a packed layout qcompile already has, so that layout's kernels serve them unchanged.

A peer scheme's packed tensors are those of its ``layout`` (an ``int-weight-only`` grid or ``fp8``; see the family
modules for which), plus ``input_scale float32 [1]`` where activations are quantized with a static scale. What is the
peer's own:

* the **quantizer**: the peer's scale rule, rounding and clamp, computed in the dtype its model runs in (the scheme's
  ``dtype``: ``bf16`` unless the name ends in ``-fp16`` or ``-fp32``); the float weight is first cast to that dtype;
* the **dequantization** (:meth:`PeerScheme.dequantize_as`), in the peer's order of operations: with activations in
  the peer's dtype this is, element for element, the weight the peer multiplies with; with float32 activations the
  same operations run in float32 (the value the kernels, which keep float32 weights, compute; ``dequantize`` is this
  form); with another 16-bit dtype, the peer's weight rounded to it (:func:`compute_dtype`);
* ``reference_linear`` multiplies in ``x.dtype`` (as the ``int-weight-only`` reference does); schemes that quantize
  activations follow the peer's forward step by step, every rounding in ``x.dtype``.

Scales are stored as float32 values of the peer's dtype (exactly). A peer's offset in weight units (quanto's
``shift``, torchao's ``zero_point``) is stored as the ``int-weight-only`` zero in code units, ``z = f(offset) /
scale`` in float32; the offset comes back as ``(z * scale)`` rounded to the peer's dtype. That is exact: ``z * s``
misses the offset by at most two float32 roundings (``2 * 2**-24`` relative), far less than half a step of a
bfloat16 or float16 value; :func:`check_recovered` checks it for every group when quantizing. (A float32 offset
would not come back exactly, which is why the peers' 2- and 4-bit grids take ``bf16`` and ``fp16`` only.)
"""

from __future__ import annotations

import dataclasses

import torch

from qcompile.schemes.base import PackedWeight, QuantizedWeight, Scheme, TensorSpec

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_DTYPE = "bf16"


def split_dtype(name: str) -> tuple[str, str]:
    """``"quanto-int8-fp16"`` → ``("quanto-int8", "fp16")``; no suffix: the default ``bf16``."""
    for dtype in DTYPES:
        if name.endswith(f"-{dtype}"):
            return name[: -len(dtype) - 1], dtype
    return name, DEFAULT_DTYPE


def dtype_suffix(dtype: str) -> str:
    return "" if dtype == DEFAULT_DTYPE else f"-{dtype}"


def check_dtype(family: str, dtype: str, allowed=tuple(DTYPES)) -> None:
    if dtype not in allowed:
        raise ValueError(f"{family}: dtype must be one of {', '.join(allowed)}, got {dtype!r}")


def check_recovered(where: str, recovered: torch.Tensor, offset: torch.Tensor) -> None:
    """Raise ``ValueError`` unless every group's offset comes back exactly from its stored zero (see module doc)."""
    bad = recovered != offset
    if bad.any():
        n, g = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}: the offset of row {n}, group {g} ({float(offset[n, g])!r}) does not come back "
                         f"from its float32 zero (got {float(recovered[n, g])!r})")  # fmt: skip


@dataclasses.dataclass
class StaticQuantizedWeight(QuantizedWeight):
    """:class:`QuantizedWeight` plus ``input_scale float32 [1]``, the static per-tensor activation scale."""

    input_scale: torch.Tensor


INPUT_SCALE_DOC = "static per-tensor activation scale (a value of the peer's dtype)"


class PeerScheme(Scheme):
    """A scheme whose packed tensors are ``self.layout``'s (plus ``input_scale`` when :attr:`static_input`).

    Subclasses are frozen dataclasses with a ``dtype`` field and define ``layout``, ``quantize`` and
    ``dequantize_as``; schemes that quantize activations also define ``reference_linear``.
    """

    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def layout(self) -> Scheme:
        raise NotImplementedError

    @property
    def static_input(self) -> bool:
        """Whether an ``input_scale`` tensor follows the layout's tensors."""
        return False

    @property
    def activation_mode(self) -> str | None:
        """How activations are quantized: ``None`` (weight-only), ``"static-int8"`` (one scale per tensor, the
        packed ``input_scale``: quanto), ``"token-int8"`` / ``"token-fp8"`` (per token at run time: torchao)."""
        return None

    def kernel_layout(self, dtype: torch.dtype) -> Scheme | None:
        """The scheme whose kernels compute this scheme's numbers for activations of ``dtype``: the layout for a
        weight-only scheme (kernels keep float32 weights, as they do for the layout's own reference), else
        ``None``."""
        return None if self.quantizes_activations else self.layout

    def padded_in_features(self, in_features):
        return self.layout.padded_in_features(in_features)

    def group_size_for(self, in_features):
        return self.layout.group_size_for(in_features)

    def tensors(self, out_features, in_features):
        specs = self.layout.tensors(out_features, in_features)
        if self.static_input:
            specs = (*specs, TensorSpec("input_scale", (1,), torch.float32, INPUT_SCALE_DOC))
        return specs

    def pack(self, q):
        tensors = self.layout.pack(q).tensors()
        if self.static_input:
            tensors["input_scale"] = q.input_scale.reshape(1).to(torch.float32).contiguous()
        return self.checked_pack(PackedWeight(tensors), q.out_features, q.in_features)

    def unpack(self, packed: PackedWeight, in_features):
        q = self.layout.unpack(packed, in_features)
        if self.static_input:
            return StaticQuantizedWeight(q.codes, q.scales, q.zeros, in_features, packed["input_scale"])
        return q

    def dequantize_as(self, q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
        """``[N, K]`` in ``dtype``: the weight as the peer dequantizes it in a model of that dtype."""
        raise NotImplementedError

    def dequantize(self, q):
        return self.dequantize_as(q, torch.float32)

    def unpack_list(self, packed, out_features: int, in_features: int):
        if not isinstance(packed, PackedWeight):
            packed = PackedWeight.from_list(self, packed, out_features, in_features)
        return self.unpack(packed, in_features)

    def reference_linear(self, x, packed, bias, out_features):
        w = self.dequantize_as(self.unpack_list(packed, out_features, x.shape[-1]), x.dtype)
        return torch.nn.functional.linear(x, w, None if bias is None else bias.to(x.dtype))


def compute_dtype(activation: torch.dtype, peer: torch.dtype) -> torch.dtype:
    """The dtype a peer's multi-step dequantization runs in for activations of dtype ``activation``: float32 for
    float32 activations, else the peer's own dtype (its weight, then rounded to the activation dtype: an affine
    ``scale * u - shift`` recomputed in another 16-bit dtype would round its two large terms before they cancel)."""
    return torch.float32 if activation == torch.float32 else peer


def rowwise_as(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """Per-row 8-bit codes (int8 or float8 e4m3) times their float32 scale, rounded once to ``dtype``:
    ``(float32(code) * scale).to(dtype)``. The product of an 8-bit code and a bfloat16 / float16 scale is exact in
    float32, so this is also the peer's product computed in its own dtype."""
    return (q.codes.to(torch.float32) * q.scales).to(dtype)[:, : q.in_features]


def grouped(weight: torch.Tensor, layout, dtype: torch.dtype) -> torch.Tensor:
    """``[N, K]`` → ``[N, groups, group]`` in ``dtype``, zero-padded to whole groups as ``layout`` pads K."""
    n, k = weight.shape
    kp = layout.padded_in_features(k)
    w = torch.nn.functional.pad(weight.to(dtype), (0, kp - k))
    return w.reshape(n, kp // layout.group_size_for(k), -1)


def expand_groups(values: torch.Tensor, kp: int) -> torch.Tensor:
    """``[N, groups]`` → ``[N, Kp]`` (each group's value repeated over its elements)."""
    return values.repeat_interleave(kp // values.shape[1], dim=1)
