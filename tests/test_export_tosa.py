"""Export to .tosa and run the file in TOSA's reference model: 0 mismatched codes, for every operator the
`tosa` target runs.

Whole models and random single-op models (hypothesis) are trained a little, converted for target `tosa`,
exported and run by `tosa_reference_model` (the optional extra `tosa`); its int8 output codes must equal the
IntegerModel's. RESCALE itself is checked against the reference model over random values and scales, and
the multipliers and shifts against ExecuTorch's Arm backend, which qparity follows.
"""
import os
import tempfile

import numpy as np
import pytest
import torch
from helpers import prepare_and_convert, require_optional_runtime
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CatMLP, ResNetish
from op_models import Conv, Dense, Pool, random_batches
from test_attention import Scores
from test_export_tflite import Layout, TwoBranches, pools
from test_layer_norm import convert as convert_norm
from torch import nn

import qparity as qp
from qparity.errors import ExportError, InvalidParameterError, UnsupportedOpError
from qparity.export.tosa import _Graph, export_tosa, run_tosa
from qparity.numerics.tosa import SOFTMAX_MAX_ROW, apply_scale_32, reciprocal_scale, rescale_parameters



def reference_model():
    """TOSA's reference model (the extra `tosa`): skips the test without it, fails it in CI."""
    return require_optional_runtime("tosa_reference_model", "tosa")


single_ops = settings(max_examples=8, deadline=None)
activations = st.sampled_from([None, nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5)])


def export_and_verify(integer, inputs, directory, batch_size=1):
    reference_model()
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    path = os.path.join(directory, "model.tosa")
    export_tosa(integer, path, batch_size=batch_size)
    report = qp.verify(integer, path, inputs)
    assert report.ok and report.mismatched == 0, str(report)
    codes = integer.quantize(*inputs)
    outputs = run_tosa(path, codes if isinstance(codes, tuple) else (codes,), integer)
    expected = integer.run(*(codes if isinstance(codes, tuple) else (codes,)))
    for runtime_codes, model_codes in zip(outputs, expected if isinstance(expected, tuple) else (expected,)):
        assert torch.equal(runtime_codes, model_codes)
    return report


def check_single_op(model, shape, seed, lr=0.01, per_channel=True):
    reference_model()
    batches = random_batches(seed, shape)
    _, integer = prepare_and_convert(model, (batches[0],), "tosa", batches, lr=lr, per_channel=per_channel)
    x = random_batches(seed + 1, (5,) + tuple(shape[1:]), count=1)[0]
    with tempfile.TemporaryDirectory() as directory:
        return export_and_verify(integer, x, directory)


# ---------------------------------------------------------------------------------------------------------
# RESCALE: qparity's emulation against the reference model, and the constants against ExecuTorch's
# ---------------------------------------------------------------------------------------------------------
def run_rescale(values: np.ndarray, scales: torch.Tensor, input_zp: int, output_zp: int, in_dtype: str,
                out_dtype: str) -> np.ndarray:
    """One RESCALE (per channel along the last axis when several scales) in the reference model."""
    reference = reference_model()
    g = _Graph()
    ts = g.ts
    g.serializer.addInputTensor(ts.TosaSerializerTensor("x", list(values.shape), g.dtype(in_dtype), data=None))
    out = g.rescale("x", values.shape, scales, input_zp, output_zp, in_dtype, out_dtype)
    g.serializer.addOutputTensor(g.serializer.currRegion.currBasicBlock.tensors[out])
    (result,), status = reference.run(g.serialize(), [values])
    assert status == reference.GraphStatus.TOSA_VALID
    return result


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.floats(-40, 12), st.integers(-128, 127), st.integers(-128, 127),
       st.integers(0, 2**31 - 1))
def test_rescale_equals_the_reference_model(channels, log2_scale, input_zp, output_zp, seed):
    reference_model()
    g = torch.Generator().manual_seed(seed)
    scales = torch.exp2(log2_scale + torch.rand(channels, generator=g, dtype=torch.float64))
    _, shift = rescale_parameters(scales)
    # int32 accumulators within apply_scale_32's REQUIRE range, and every int8 code
    bound = min(2**31 - 1, 2 ** int(shift.min() - 1) - 1)
    wide = torch.randint(-bound, bound + 1, (64, channels), generator=g)
    codes = torch.arange(-128, 128).reshape(-1, 1).expand(256, channels)
    for values, zp, dtype in ((wide, 0, "int32"), (codes, input_zp, "int8")):
        if dtype == "int8" and bool(((codes - zp).abs() >= 2 ** (shift.min() - 1)).any()):
            continue  # outside apply_scale_32's range: the reference model refuses such a graph
        expected = qp_rescale(values, scales, zp, output_zp)
        actual = run_rescale(values.numpy().astype(dtype), scales, zp, output_zp, dtype, "int8")
        assert torch.equal(torch.from_numpy(actual.astype(np.int64)), expected)


def qp_rescale(values, scales, input_zp, output_zp):
    from qparity.numerics.tosa import rescale

    return rescale(values, scales, input_zp, output_zp, -128, 127, channel_axis=1)


@settings(max_examples=200, deadline=None)
@given(st.floats(2.0**-70, 2.0**28, allow_nan=False, allow_infinity=False))
def test_multiplier_and_shift_are_executorchs(scale):
    reference_model()  # ExecuTorch's Arm backend imports tosa_serializer, from the same extra
    require_optional_runtime("executorch", "executorch")
    from executorch.backends.arm.operators.op_tosa_rescale import _compute_multiplier_and_shift

    multiplier, shift = rescale_parameters(torch.tensor([scale], dtype=torch.float64))
    assert ([int(multiplier)], [int(shift)]) == tuple(_compute_multiplier_and_shift([scale], 32))


def test_rescale_single_rounds_ties_up():
    """(v * m + 2^(s - 1)) >> s: -2.5 rounds to -2 and 2.5 to 3 (round half up), one rounding."""
    multiplier, shift = rescale_parameters(torch.tensor([0.5], dtype=torch.float64))
    assert apply_scale_32(torch.tensor([-5, -3, 3, 5]), multiplier, shift).tolist() == [-2, -1, 2, 3]


def test_reciprocal_scale_is_the_specifications():
    counts = torch.arange(1, 4097)
    multiplier, shift = reciprocal_scale(counts)
    for c, m, s in zip(counts.tolist(), multiplier.tolist(), shift.tolist()):
        k = (c - 1).bit_length()
        assert (m, s) == ((((1 << 30) + 1) << k) // c, 30 + k)


def test_a_value_outside_rescales_range_raises_instead_of_computing():
    multiplier, shift = rescale_parameters(torch.tensor([2.0**20], dtype=torch.float64))
    with pytest.raises(InvalidParameterError, match="apply_scale_32"):
        apply_scale_32(torch.tensor([2**12]), multiplier, shift)


# ---------------------------------------------------------------------------------------------------------
# Whole models and single operators
# ---------------------------------------------------------------------------------------------------------
def test_resnet_with_batchnorm_residual_adds_and_pooling_matches_the_reference_model(tmp_path):
    reference_model()
    torch.manual_seed(0)
    batches = random_batches(0, (8, 1, 8, 8), spread=1.0)
    _, integer = prepare_and_convert(ResNetish(), (batches[0],), "tosa", batches, lr=0.01)
    export_and_verify(integer, torch.randn(16, 1, 8, 8), str(tmp_path), batch_size=4)


def test_mlp_with_cat_clamp_relu6_and_dropout_matches_the_reference_model(tmp_path):
    reference_model()
    torch.manual_seed(0)
    batches = random_batches(1, (8, 20), spread=2.0)
    _, integer = prepare_and_convert(CatMLP(), (batches[0],), "tosa", batches, lr=0.01)
    export_and_verify(integer, torch.randn(6, 20) * 2, str(tmp_path))


@single_ops
@given(st.data())
def test_random_conv_and_depthwise_conv_match_the_reference_model(data):
    depthwise = data.draw(st.booleans())
    cin = data.draw(st.integers(1, 3))
    cout, groups = (cin * data.draw(st.integers(1, 2)), cin) if depthwise else (data.draw(st.integers(1, 4)), 1)
    k, dilation, stride = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    padding = data.draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"]))) if stride == 1 \
        else data.draw(st.integers(0, 2))
    size = data.draw(st.integers(k * dilation + 1, 9))
    model = Conv(cin, cout, k, stride, padding, dilation, groups, data.draw(st.booleans()), data.draw(st.booleans()),
                 data.draw(activations))
    check_single_op(model, (4, cin, size, size), data.draw(st.integers(0, 10**6)),
                    per_channel=data.draw(st.booleans()))


@single_ops
@given(st.data())
def test_random_linear_matches_the_reference_model(data):
    features = data.draw(st.integers(1, 48))
    model = Dense(features, data.draw(st.integers(1, 16)), data.draw(st.booleans()), data.draw(activations))
    extra = data.draw(st.sampled_from([(), (3,)]))
    check_single_op(model, (4, *extra, features), data.draw(st.integers(0, 10**6)),
                    per_channel=data.draw(st.booleans()))


@single_ops
@given(st.data())
def test_random_add_and_cat_match_the_reference_model(data):
    channels = data.draw(st.integers(1, 4))
    model = TwoBranches(channels, data.draw(st.sampled_from(["add", "add_input", "cat"])), data.draw(activations))
    check_single_op(model, (3, channels, 5, 5), data.draw(st.integers(0, 10**6)))


class Arithmetic(nn.Module):
    """sub, mul (a broadcast gate), and constants, on two grids."""

    def __init__(self, op):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(2, 3, 1)
        self.op = op

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.op == "sub":
            return a - b
        if self.op == "mul":
            return a * b.mean((2, 3), keepdim=True)
        return (a + 0.5) * 2.0 - b


@single_ops
@given(st.sampled_from(["sub", "mul", "constants"]), st.integers(0, 10**6))
def test_sub_mul_and_constants_match_the_reference_model(op, seed):
    check_single_op(Arithmetic(op), (3, 2, 5, 5), seed)


@single_ops
@given(st.data())
def test_random_pooling_matches_the_reference_model(data):
    pool = data.draw(pools())
    size = 8 if isinstance(pool, nn.AdaptiveAvgPool2d) else data.draw(st.integers(5, 9))
    check_single_op(Pool(pool), (3, 2, size, size), data.draw(st.integers(0, 10**6)))


@single_ops
@given(st.data())
def test_layout_ops_pad_and_standalone_clamps_match_the_reference_model(data):
    check_single_op(Layout(data.draw(activations)), (3, 2, 5, 5), data.draw(st.integers(0, 10**6)))


class Padded(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):
        return torch.nn.functional.pad(self.conv(x), (1, 2, 0, 1))


def test_pad_matches_the_reference_model():
    check_single_op(Padded(), (3, 2, 6, 6), 7)


ACTIVATIONS = {"sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "hardsigmoid": nn.Hardsigmoid(),
               "hardswish": nn.Hardswish(), "leaky_relu": nn.LeakyReLU(0.1), "gelu": nn.GELU(approximate="tanh"),
               "elu": nn.ELU(0.7)}


class Activated(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("kind", list(ACTIVATIONS))
def test_activations_run_as_tables_that_match_the_reference_model(kind):
    check_single_op(Activated(ACTIVATIONS[kind]), (3, 2, 5, 5), 11)


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["sigmoid", "tanh", "hardsigmoid", "hardswish", "gelu", "rsqrt"]),
       st.floats(2.0**-8, 2.0**-2), st.integers(-128, 127), st.floats(2.0**-9, 2.0**-3), st.integers(-128, 127))
def test_tables_are_executorchs(kind, in_scale, in_zp, out_scale, out_zp):
    """Each entry as ExecuTorch's Arm backend computes its TABLE (InsertTableOpsPass.generate_8bit_table_values)."""
    reference_model()  # ExecuTorch's Arm backend imports tosa_serializer, from the same extra
    require_optional_runtime("executorch", "executorch")
    from executorch.backends.arm._passes.insert_table_ops import InsertTableOpsPass
    from executorch.backends.arm._passes.quant_args import QuantArgs

    from qparity.numerics import get_target

    in_zp = -128 if kind == "rsqrt" else in_zp  # rsqrt's input grid holds no negative values
    source, out = qp.QParams(in_scale, in_zp, "int8"), qp.QParams(out_scale, out_zp, "int8")
    functions = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "hardsigmoid": nn.functional.hardsigmoid,
                 "hardswish": nn.functional.hardswish, "gelu": nn.functional.gelu, "rsqrt": torch.rsqrt}
    expected, _ = InsertTableOpsPass.generate_8bit_table_values(
        InsertTableOpsPass, functions[kind], QuantArgs(float(source.scale), in_zp, -128, 127, torch.int8),
        QuantArgs(float(out.scale), out_zp, -128, 127, torch.int8))
    target = get_target("tosa")
    if kind == "hardswish":
        actual = target.hardswish(torch.arange(-128, 128), source, out)
    else:
        actual = target.activation_table(kind, source, out, {"approximate": "none"})
    assert torch.equal(actual, expected.to(torch.int64))


# ---------------------------------------------------------------------------------------------------------
# Transformer operators: matmul, mean, amax, rsqrt, parameters, nearest upsampling, LayerNorm
# ---------------------------------------------------------------------------------------------------------
class Products(nn.Module):
    """(a @ b^T) @ b for two linear projections of [N, (H,) T, D] tokens: MATMUL twice, on batch dims."""

    def __init__(self, width):
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return torch.matmul(a, b.transpose(-2, -1)) @ b


@single_ops
@given(st.data())
def test_random_matmul_matches_the_reference_model(data):
    width, tokens = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 9))
    heads, seed = data.draw(st.sampled_from([(), (2,)])), data.draw(st.integers(0, 10**6))
    torch.manual_seed(seed)
    check_single_op(Products(width), (3, *heads, tokens, width), seed, lr=0.0)  # cubic: calibrate, no steps


class Reductions(nn.Module):
    """A learned per-channel offset and gain (parameters, broadcast from the right and from the left), nearest
    upsampling, amax and means over random dims."""

    def __init__(self, factor, amax_dims, mean_dims, keepdim):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.offset, self.gain = nn.Parameter(torch.randn(3, 1, 1)), nn.Parameter(torch.rand(3, 1, 1) + 0.5)
        self.factor, self.amax_dims, self.mean_dims, self.keepdim = factor, amax_dims, mean_dims, keepdim

    def forward(self, x):
        y = nn.functional.interpolate(self.gain * (self.conv(x) + self.offset), scale_factor=self.factor,
                                      mode="nearest")
        return y.amax(self.amax_dims, keepdim=self.keepdim), y.mean(self.mean_dims, keepdim=self.keepdim)


@settings(max_examples=4, deadline=None)
@given(st.data())
def test_random_parameters_upsampling_amax_and_mean_match_the_reference_model(data):
    dims = st.sampled_from([(1,), (3,), (1, 2), (1, 3), (1, 2, 3)])
    torch.manual_seed(data.draw(st.integers(0, 10**6)))
    model = Reductions(data.draw(st.sampled_from([1, 2, 3])), data.draw(dims), data.draw(dims),
                       data.draw(st.booleans()))
    check_single_op(model, (3, 2, 4, 5), data.draw(st.integers(0, 10**6)))


@pytest.mark.parametrize("model_name", ["layer_norm", "rms_norm"])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.booleans())
def test_layer_norm_and_rms_norm_match_the_reference_model(model_name, seed, tokens):
    reference_model()
    _, _, integer, x = convert_norm("tosa", model_name, (4, 3, 8) if tokens else (4, 8), seed)
    with tempfile.TemporaryDirectory() as directory:
        export_and_verify(integer, x, directory)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=40), st.integers(-128, 127),
       st.floats(2.0**-8, 2.0**2), st.integers(-128, 127))
def test_mean_is_one_round_half_up_rescale_of_the_exact_sum(codes, zero_point, ratio, out_zp):
    """mean = clamp(z_y + round_half_up(sum(q - z) * s_x / (count s_y))) within RESCALE's precision: the Q31
    multiplier's quotient differs from the rational one only where it is within 2^-30 of a tie."""
    from fractions import Fraction

    from qparity.numerics import get_target

    source, out = qp.QParams(0.05, zero_point, "int8"), qp.QParams(0.05 * ratio, out_zp, "int8")
    q = torch.tensor([codes])
    actual = int(get_target("tosa").mean(q, source, out, (1,), False))
    exact = Fraction(sum(c - zero_point for c in codes)) * Fraction(float(source.scale)) / (
        len(codes) * Fraction(float(out.scale)))
    nearest = int((exact + Fraction(1, 2)).__floor__()) + out_zp
    if abs(exact - round(exact) - Fraction(1, 2)) > Fraction(1, 2**20):
        assert actual == max(-128, min(127, nearest))


@single_ops
@given(st.data())
def test_random_attention_scores_softmax_and_matmul_match_the_reference_model(data):
    """softmax(a @ b^T * c) @ b: qparity's softmax program (REDUCE_MAX, GATHER, REDUCE_SUM, INTDIV) and MATMUL."""
    seed = data.draw(st.integers(0, 10**6))
    torch.manual_seed(seed)
    model = Scores(data.draw(st.integers(1, 8)), data.draw(st.sampled_from([0.05, 0.5, 3.0])))
    check_single_op(model, (3, data.draw(st.integers(1, 9)), model.a.in_features), seed, lr=0.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-128, 127), min_size=1, max_size=64), st.floats(2.0**-8, 2.0**-1))
def test_tosa_softmax_is_within_one_code_of_the_real_softmax(codes, scale):
    """The 2^16 exp table and the rounded quotient keep every code within 1 of rhe(256 softmax) - 128."""
    from qparity.numerics.tosa import SOFTMAX_GRID, softmax

    q = torch.tensor([codes])
    actual = softmax(q, qp.QParams(scale, 0, "int8"), SOFTMAX_GRID)
    real = torch.softmax(q.to(torch.float64) * scale, dim=-1)
    expected = torch.clamp(torch.round(real * 256) - 128, -128, 127)
    assert int((actual - expected).abs().max()) <= 1


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------
def test_grouped_conv_is_refused_at_prepare_qat_naming_tosas_convs():
    with pytest.raises(UnsupportedOpError, match="DEPTHWISE_CONV2D"):
        qp.prepare_qat(nn.Conv2d(4, 4, 3, groups=2), (torch.randn(1, 4, 6, 6),), target="tosa")


class Sloped(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        self.slope = nn.PReLU()

    def forward(self, x):
        return self.slope(self.conv(x))


def test_prelu_is_refused_for_tosa_at_prepare_qat_naming_the_module():
    with pytest.raises(UnsupportedOpError, match=r"prelu at module 'slope' cannot run on target 'tosa'"):
        qp.prepare_qat(Sloped(), (torch.randn(1, 1, 4, 4),), target="tosa")


@pytest.mark.parametrize("target", ["tflite", "exact"])
def test_exporting_another_target_to_tosa_is_refused(target, tmp_path):
    batches = random_batches(0, (4, 1, 4, 4))
    _, integer = prepare_and_convert(nn.Conv2d(1, 2, 3), (batches[0],), target, batches)
    with pytest.raises(ExportError, match="cannot be exported to .tosa"):
        qp.export(integer, tmp_path / "model.tosa")
    assert not (tmp_path / "model.tosa").exists()


def test_a_file_that_is_no_tosa_graph_is_a_model_file_error(tmp_path):
    from qparity.errors import ModelFileError

    reference_model()
    batches = random_batches(0, (4, 1, 4, 4))
    _, integer = prepare_and_convert(nn.Conv2d(1, 2, 3), (batches[0],), "tosa", batches)
    path = tmp_path / "model.tosa"
    path.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(ModelFileError):
        qp.verify(integer, path, batches[0])


class LongSoftmax(nn.Module):
    def forward(self, x):
        return torch.softmax(x, dim=-1)


def test_a_softmax_row_longer_than_the_tosa_program_sums_is_refused_at_prepare_qat():
    x = torch.randn(1, SOFTMAX_MAX_ROW + 1)
    with pytest.raises(UnsupportedOpError, match=f"softmax at .*{SOFTMAX_MAX_ROW + 1} entries.*'tflite'"):
        qp.prepare_qat(LongSoftmax(), (x,), target="tosa")
    qp.prepare_qat(LongSoftmax(), (x[:, :SOFTMAX_MAX_ROW],), target="tosa")
