"""optimum-quanto 0.2.7 against the ``quanto`` family (``qcompile/schemes/quanto.py``), the real package imported.

Weights: the dequantized weight of each qcompile scheme equals quanto's ``WeightQBitsTensor`` /
``WeightQBytesTensor.dequantize()`` element for element (``torch.equal``, in the model dtype quanto computes in:
bfloat16, float16, and float32 for 8 bits), for weights quantized by quanto's own ``quantize_weight`` and by
``quantize`` + ``freeze`` of a module. Static int8 activations: with quanto's calibrated ``input_scale`` the qcompile
op's output equals the calibrated quanto model's output bit for bit (same integer sums, same roundings).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qcompile  # noqa: F401  (registers torch.ops.qcompile.linear)
from qcompile.schemes import parse_scheme
from qcompile.schemes.quanto import quanto_group_size

DTYPES = {"": torch.bfloat16, "-fp16": torch.float16, "-fp32": torch.float32}
#: (quanto qtype name, qcompile weights, group) — K = 256: groups of 128 / 64 as quanto's quantize_weight takes them
WEIGHTS = [("qint4", "int4", 128), ("qint4", "int4", 64), ("qint2", "int2", 128), ("qint8", "int8", None),
           ("qfloat8", "fp8", None)]  # fmt: skip
N, K = 37, 256
#: quanto's CPU TinyGemm packing (bfloat16 qint4 g128 modules) needs N to be a multiple of 16
N_MODULE = 48


def _quanto():
    from optimum import quanto

    return quanto


def _weight(dtype, seed=0, zero_row=True):
    """``[N, K]`` in ``dtype``: random, one constant group (row 3: quanto's scale 0) and one all-zero row (5)."""
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[3, :128] = 0.25
    if zero_row:
        w[5] = 0.0
    return w.to(dtype)


def _scheme_name(weights, group, suffix, a8=False):
    return f"quanto-{weights}" + (f"-g{group}" if group else "") + ("-a8" if a8 else "") + suffix


def _ours(name, w):
    scheme = parse_scheme(name)
    q = scheme.unpack(scheme.pack(scheme.quantize(w.float())), w.shape[1])
    return scheme, q


@pytest.mark.parametrize("suffix", DTYPES)
@pytest.mark.parametrize("qtype_name, weights, group", WEIGHTS)
def test_dequantized_weights_equal_quanto_quantize_weight(qtype_name, weights, group, suffix):
    """quanto's optimizer (MaxOptimizer for 2/4 bits, AbsmaxOptimizer for 8) + ``quantize_weight`` vs qcompile."""
    quanto = _quanto()
    dtype = DTYPES[suffix]
    if dtype == torch.float32 and group:
        with pytest.raises(Exception, match="dtype must be one of bf16, fp16"):
            parse_scheme(_scheme_name(weights, group, suffix))
        return
    qtype = getattr(quanto, qtype_name)
    w = _weight(dtype, zero_row=weights != "fp8")  # quanto's qfloat8 makes an all-zero row NaN (below)
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer, MaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    if qtype.bits == 8:
        scale, shift = AbsmaxOptimizer()(w, qtype=qtype, axis=0), None
    else:
        scale, shift = MaxOptimizer()(w, qtype=qtype, axis=0, group_size=group)
    theirs = quantize_weight(w, qtype=qtype, axis=0, scale=scale, shift=shift, group_size=group, optimized=False)
    expected = theirs.dequantize()
    scheme, q = _ours(_scheme_name(weights, group, suffix), w)
    got = scheme.dequantize_as(q, dtype)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected), f"{scheme.name}: {(got.float() - expected.float()).abs().max()}"
    # and the stored numbers are quanto's: scale exactly, codes where the group is not constant
    if shift is not None:
        theirs_scale = theirs._scale.reshape(N, -1).float()
        flat = theirs_scale == 0
        assert torch.equal(q.scales[~flat], theirs_scale[~flat]) and bool(flat.any())
        assert torch.equal((q.zeros * q.scales).to(dtype), theirs._shift.reshape(N, -1))
    else:
        assert torch.equal(q.scales, theirs._scale.float())


def test_quanto_float8_zero_row_is_nan_and_zero_here():
    """quanto divides an all-zero row by its zero scale (NaN weights); qcompile stores scale 0 / codes 0."""
    quanto = _quanto()
    from optimum.quanto.tensor.optimizers import AbsmaxOptimizer
    from optimum.quanto.tensor.weights import quantize_weight

    w = _weight(torch.bfloat16)
    scale = AbsmaxOptimizer()(w, qtype=quanto.qfloat8, axis=0)
    expected = quantize_weight(w, qtype=quanto.qfloat8, axis=0, scale=scale, optimized=False).dequantize()
    scheme, q = _ours("quanto-fp8", w)
    got = scheme.dequantize_as(q, torch.bfloat16)
    assert torch.isnan(expected[5]).all() and torch.equal(got[5], torch.zeros(K, dtype=torch.bfloat16))
    rows = torch.arange(N) != 5
    assert torch.equal(got[rows], expected[rows])


@pytest.mark.parametrize("k", [64, 100, 128, 200, 256, 320, 448, 576, 1000])
def test_group_choice_is_quantos(k):
    """``quanto_group_size`` is the group quanto's QLinear picks (K = 576: 96; 100: per row)."""
    quanto = _quanto()
    layer = quanto.nn.QLinear(k, 8, weights=quanto.qint4)
    assert quanto_group_size(k) == layer.weight_group_size
    if k == 576:
        assert layer.weight_group_size == 96


@pytest.mark.parametrize("qtype_name, weights, k", [("qint4", "int4", 576), ("qint2", "int2", 200),
                                                    ("qint4", "int4", 100), ("qint8", "int8", 200),
                                                    ("qfloat8", "fp8", 200)])  # fmt: skip
def test_frozen_module_weights_equal(qtype_name, weights, k):
    """``quantize`` + ``freeze`` of ``Sequential(Linear)`` in float16 (quanto keeps its plain QTensor on CPU): the
    scheme of quanto's own group choice (K = 576: groups of 96; 100: per row) dequantizes to the frozen weight."""
    quanto = _quanto()
    model = torch.nn.Sequential(torch.nn.Linear(k, N)).to(torch.float16)
    w = model[0].weight.detach().clone()
    quanto.quantize(model, weights=getattr(quanto, qtype_name))
    quanto.freeze(model)
    expected = model[0].weight.dequantize()
    group = quanto_group_size(k) if weights in ("int2", "int4") else None
    scheme, q = _ours(_scheme_name(weights, group, "-fp16"), w)
    assert torch.equal(scheme.dequantize_as(q, torch.float16), expected)


def test_bfloat16_int4_module_on_cpu_keeps_tinygemm_shifts():
    """On CPU a bfloat16 qint4 g128 module becomes quanto's TinyGemm tensor, which re-expresses the shift as
    ``8 * scale - shift`` in bfloat16 (lossy, quanto's own comment); the scheme holds quanto's exact (scale, shift):
    the weights agree within one bfloat16 step of the shift, and the module's output within bfloat16 rounding."""
    quanto = _quanto()
    model = torch.nn.Sequential(torch.nn.Linear(K, N_MODULE)).to(torch.bfloat16)
    lin = copy.deepcopy(model[0])
    quanto.quantize(model, weights=quanto.qint4)
    quanto.freeze(model)
    assert type(model[0].weight).__name__ == "TinyGemmWeightQBitsTensor"
    scheme, q = _ours("quanto-int4-g128", lin.weight.detach())
    ours, theirs = scheme.dequantize_as(q, torch.bfloat16).float(), model[0].weight.dequantize().float()
    step = (q.zeros * q.scales).abs().amax() * 2**-7
    assert (ours - theirs).abs().max() <= step
    x = torch.randn(4, K, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x).float()
    packed = scheme.pack(q).list()
    got = torch.ops.qcompile.linear(x, packed, lin.bias.detach(), scheme.name, K, N_MODULE).float()
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()


@pytest.mark.parametrize("suffix", ["", "-fp16"])
@pytest.mark.parametrize("qtype_name, weights", [("qint4", "int4"), ("qint2", "int2"), ("qint8", "int8"),
                                                 ("qfloat8", "fp8")])  # fmt: skip
def test_module_outputs_within_rounding(qtype_name, weights, suffix):
    """quanto's frozen module vs ``qcompile::linear`` (kernel or reference) on the same activations: equal weights,
    different matmul kernels, so outputs agree to the dtype's rounding: ``2**-7`` (bf16) / ``2**-10`` (fp16) of
    ``max|y|`` plus K-term summation differences, checked at 4 output steps."""
    quanto = _quanto()
    dtype = DTYPES[suffix]
    model = torch.nn.Sequential(torch.nn.Linear(K, N_MODULE)).to(dtype)
    lin = copy.deepcopy(model[0])
    quanto.quantize(model, weights=getattr(quanto, qtype_name))
    quanto.freeze(model)
    group = 128 if weights in ("int2", "int4") else None
    scheme = parse_scheme(_scheme_name(weights, group, suffix))
    packed = scheme.pack(scheme.quantize(lin.weight.detach().float())).list()
    x = torch.randn(3, K, dtype=dtype)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fp16 activations take the reference path (notice)
        expected = model(x).float()
        got = torch.ops.qcompile.linear(x, packed, lin.bias.detach(), scheme.name, K, N_MODULE).float()
    step = expected.abs().max() * (2**-7 if dtype == torch.bfloat16 else 2**-10)
    assert (got - expected).abs().max() <= 4 * step


# -- static int8 activations ---------------------------------------------------------------------------------------
def _calibrated_quanto(lin, batches):
    quanto = _quanto()
    model = torch.nn.Sequential(copy.deepcopy(lin))
    quanto.quantize(model, weights=quanto.qint8, activations=quanto.qint8)
    with torch.no_grad(), quanto.Calibration(momentum=0.9):
        for batch in batches:
            model(batch)
    quanto.freeze(model)
    return model


@pytest.mark.parametrize("suffix", DTYPES)
def test_static_activations_bit_exact_with_quantos_scale(suffix):
    """quanto calibrated on three batches; the scheme's weights plus quanto's ``input_scale``: the op (C++ kernel
    for float32 / bfloat16, reference for float16) and the reference equal quanto's output exactly, with bias."""
    dtype = DTYPES[suffix]
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N).to(dtype)
    batches = [torch.randn(5, K, dtype=dtype) * (i + 1) for i in range(3)]
    model = _calibrated_quanto(lin, batches)
    scheme = parse_scheme(_scheme_name("int8", None, suffix, a8=True))
    q = scheme.quantize(lin.weight.detach().float())
    q.input_scale = model[0].input_scale.detach().float().reshape(1)
    packed = scheme.pack(q).list()
    x = torch.randn(2, 7, K, dtype=dtype) * 2
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model(x)
        got = torch.ops.qcompile.linear(x, packed, lin.bias.detach(), scheme.name, K, N)
    reference = scheme.reference_linear(x, packed, lin.bias.detach(), N)
    assert type(expected) is torch.Tensor and expected.dtype == dtype  # output quantization off (streamlined)
    assert torch.equal(got, expected) and torch.equal(reference, expected)


def _momentum_scale(batches, dtype, momentum=0.9):
    """quanto's ``Calibration`` rule (``calibrate.py``), written out: per batch ``absmax / 127`` in the model dtype;
    the first batch replaces the initial 1, later ones ``momentum * scale + (1 - momentum) * new``."""
    scale = torch.ones((), dtype=dtype)
    for batch in batches:
        new = batch.abs().max() / 127
        scale = new if bool((scale == 1).all()) else momentum * scale + new * (1.0 - momentum)
    return scale


class TinyLM(torch.nn.Module):
    """``input_ids`` → embedding → one linear: calibration batches are token ids, as qcompile's pass takes them."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, K)
        self.proj = torch.nn.Linear(K, N)

    def forward(self, input_ids):
        return self.proj(self.embed(input_ids))


def test_static_activations_algorithm_against_quanto_calibration():
    """qcompile's pass (``algorithm: static-activations``) takes ``absmax of all calibration inputs / 127``; quanto's
    ``Calibration()`` a momentum average. One batch: the same scale and bit-identical model outputs. Three batches
    whose largest activation comes last: quanto's scale is the momentum formula, qcompile's the max rule, and they
    differ by what the formulas predict."""
    quanto = _quanto()
    torch.manual_seed(1)
    base = TinyLM().to(torch.bfloat16)
    norms = base.embed.weight.detach().abs().amax(1)
    loud = int(norms.argmax())
    quiet = [t for t in range(64) if t != loud][:32]
    batches = [torch.tensor([quiet[:16]]), torch.tensor([quiet[16:]]), torch.tensor([[loud, *quiet[:4]]])]
    ids = torch.randint(0, 64, (1, 6))
    recipe = {"default": "quanto-int8-a8", "algorithm": "static-activations"}
    for calibration in (batches[:1], batches):
        theirs = copy.deepcopy(base)
        quanto.quantize(theirs, weights=quanto.qint8, activations=quanto.qint8)
        with torch.no_grad(), quanto.Calibration():
            for batch in calibration:
                theirs(input_ids=batch)
        quanto.freeze(theirs)
        ours = qcompile.quantize(copy.deepcopy(base), recipe, calibration=calibration, progress_bar=False)
        inputs = [base.embed(b).detach() for b in calibration]
        quanto_scale = theirs.proj.input_scale.detach()
        ours_scale = ours.proj.input_scale.reshape(())
        assert torch.equal(quanto_scale, _momentum_scale(inputs, torch.bfloat16))
        assert torch.equal(ours_scale, (max(i.abs().max() for i in inputs) / 127).float())
        if len(calibration) == 1:
            assert torch.equal(ours_scale, quanto_scale.float())
            with torch.no_grad():
                assert torch.equal(ours(input_ids=ids), theirs(input_ids=ids))
        else:
            assert ours_scale > quanto_scale.float()


def test_uncalibrated_input_scale_is_quantos_initial_one():
    scheme = parse_scheme("quanto-int8-a8")
    assert scheme.pack(scheme.quantize(torch.randn(4, 16))).input_scale.tolist() == [1.0]


@pytest.mark.parametrize("name, words", [
    ("quanto-int4-g128-fp32", ["dtype must be one of bf16, fp16", "fp32"]),
    ("quanto-int8-g128", ["per row", "128"]),
    ("quanto-int4-g128-a8", ["-a8", "int8 weights", "int4"]),
    ("quanto-int4-g12", ["multiple of 8", "12"]),
])  # fmt: skip
def test_bad_names_say_why(name, words):
    with pytest.raises(ValueError) as error:
        parse_scheme(name)
    for word in words:
        assert word in str(error.value)
