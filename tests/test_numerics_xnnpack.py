"""The `xnnpack` target's spec functions give the same codes as LiteRT's default kernels, op by op; and whole
models trained for `xnnpack` give 0 mismatched codes in the default interpreter.

Each test writes a one-operator .tflite file (tests/runtime_models.py) and runs it with
`Interpreter(model_content=...)` and no resolver argument: LiteRT applies the XNNPACK delegate (the op list
shows a DELEGATE node) and leaves int8 AVERAGE_POOL_2D, and the QUANTIZE ratios XNNPACK refuses, to its
optimized built-in kernels. Parameters come from hypothesis: random and dyadic scales (exact ties), zero
points, shapes, codes and fused activations.
"""
from functools import lru_cache
from typing import Optional

import numpy as np
import pytest
import torch
from helpers import prepare_and_convert, require_runtime
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CatMLP, ResNetish

from qparity.errors import UnsupportedOpError
from qparity.export import export
from qparity.qparams import QParams
from qparity.numerics import get_target
from qparity.verify import verify

from runtime_models import (ACTIVATION_RANGES, ACTIVATIONS, REGIMES, TFLiteModel, as_codes, assert_codes_equal, f32,
                            layer_codes, layer_output_scale, layer_scales, scales, seeds, tflite_options)
from test_numerics_tflite import PADDING, conv_accumulator, int8_codes, nchw, torch_pool_window

require_runtime("ai_edge_litert")

TARGET = get_target("xnnpack")
SETTINGS = settings(max_examples=40, deadline=None)
activations = st.sampled_from(list(ACTIVATIONS))
zero_points = st.integers(-128, 127)


@lru_cache(maxsize=64)
def _default_interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    return interpreter


def run_default(model: bytes, *inputs: np.ndarray, delegated: Optional[bool] = True) -> np.ndarray:
    """Run a model with LiteRT's default kernels; check whether XNNPACK took its operator (unless None)."""
    interpreter = _default_interpreter(model)
    ops = [op["op_name"] for op in interpreter._get_ops_details()]
    assert delegated is None or ("DELEGATE" in ops) == delegated, f"expected delegated={delegated}, ops {ops}"
    for detail, value in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def bounds(activation: str, qp: QParams):
    return TARGET.activation_bounds(*ACTIVATION_RANGES[activation], qp)


# ---------------------------------------------------------------------------------------------------------
# QUANTIZE
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(scale=scales(), zp=zero_points, seed=seeds())
def test_quantize_matches_xnnpack_quantize(scale, zp, seed):
    rng = np.random.default_rng(seed)
    spread = rng.normal(0, 80, size=200) * scale
    ties = (rng.integers(-300, 300, size=100) + 0.5) * np.float64(scale)
    x = np.concatenate([spread, ties]).astype(np.float32).reshape(1, -1)
    model = TFLiteModel()
    source = model.tensor(x.shape, "float32")
    out = model.tensor(x.shape, "int8", scale, zp)
    model.operator("QUANTIZE", [source], [out])
    y = run_default(model.build([source], [out]), x)
    assert_codes_equal(as_codes(y), TARGET.quantize(torch.from_numpy(x), QParams(scale, zp, "int8")))


@SETTINGS
@given(scale=scales(), zp=zero_points, out_scale=scales(), out_zp=zero_points, ratio=st.sampled_from(
    [None, 0.5, 1.5, 2.0, 0.25, 3.0, 1.0, 0.3, 2.0**-8, 2.0**7, 2.0**-9 * 3, 0.001, 200.0]))
def test_rescale_matches_xnnpack_quantize_int8_to_int8(scale, zp, out_scale, out_zp, ratio):
    if ratio is not None:  # simple fractions tie; ratios past [2^-8, 2^7] run TFLite's optimized Requantize
        out_scale = f32(scale / ratio)
    q = np.arange(-128, 128, dtype=np.int8).reshape(1, -1)
    model = TFLiteModel()
    source = model.tensor(q.shape, "int8", scale, zp)
    out = model.tensor(q.shape, "int8", out_scale, out_zp)
    model.operator("QUANTIZE", [source], [out], version=2)
    delegated = 2.0**-8 <= f32(f32(scale) / f32(out_scale)) <= 2.0**7
    y = run_default(model.build([source], [out]), q, delegated=delegated)
    spec = TARGET.rescale(as_codes(q), QParams(scale, zp, "int8"), QParams(out_scale, out_zp, "int8"))
    assert_codes_equal(as_codes(y), spec)


# ---------------------------------------------------------------------------------------------------------
# CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
# ---------------------------------------------------------------------------------------------------------
conv_geometry = dict(stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
                     dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
                     kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.sampled_from(["SAME", "VALID"]))


def conv_case(rng, regime, zx, kernel, dilation, in_channels, weight_shape, out_channels, batch=True):
    height, width = (int(rng.integers((k - 1) * d + 1, 9)) for k, d in zip(kernel, dilation))
    shape = (int(rng.integers(1, 3)) if batch else 1, height, width, in_channels)
    x, w, bias_bound = layer_codes(rng, regime, shape, zx, -128, 127, weight_shape)
    bias = rng.integers(-bias_bound, bias_bound + 1, size=out_channels).astype(np.int32)
    return x.astype(np.int8), w, bias, *layer_scales(rng, regime, out_channels)


def layer_tensors(model, x, w, bias, input_scale, weight_scale, y_shape, y_scale, zx, zy, axis):
    channels = len(weight_scale)
    t_x = model.tensor(x.shape, "int8", input_scale, zx)
    t_w = model.tensor(w.shape, "int8", weight_scale, [0] * channels, data=w, quantized_dimension=axis)
    t_b = model.tensor(bias.shape, "int32", (np.float64(input_scale) * weight_scale).astype(np.float32),
                       [0] * channels, data=bias)
    return t_x, t_w, t_b, model.tensor(y_shape, "int8", y_scale, zy)


def check_requantizer(y, acc, input_scale, weight_scale, y_scale, zx, zy, activation, op, channel_axis):
    input_qp, output_qp = QParams(input_scale, zx, "int8"), QParams(y_scale, zy, "int8")
    requantize = TARGET.requantizer(op, input_qp, torch.from_numpy(weight_scale), output_qp,
                                    *bounds(activation, output_qp), channel_axis=channel_axis, ndim=acc.dim())
    assert_codes_equal(y, requantize(acc))


@SETTINGS
@given(regime=st.sampled_from(REGIMES), zx=zero_points, zy=zero_points, activation=activations,
       seed=seeds(), **conv_geometry)
def test_conv_requantizer_matches_xnnpack_conv_2d(regime, zx, zy, activation, seed, stride, dilation,
                                                  kernel, padding):
    rng = np.random.default_rng(seed)
    channels, out_channels = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    x, w, bias, input_scale, weight_scale = conv_case(rng, regime, zx, kernel, dilation, channels,
                                                      (out_channels, *kernel, channels), out_channels)
    acc = conv_accumulator(x, zx, w.transpose(0, 3, 1, 2), bias, stride, dilation, padding, 1)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)
    model = TFLiteModel()
    t_x, t_w, t_b, t_y = layer_tensors(model, x, w, bias, input_scale, weight_scale, acc.permute(0, 2, 3, 1).shape,
                                       y_scale, zx, zy, 0)
    options = tflite_options("Conv2DOptions", padding=PADDING[padding], strideH=stride[0], strideW=stride[1],
                             dilationHFactor=dilation[0], dilationWFactor=dilation[1],
                             fusedActivationFunction=ACTIVATIONS[activation])
    model.operator("CONV_2D", [t_x, t_w, t_b], [t_y], options, version=3)
    y = run_default(model.build([t_x], [t_y]), x)
    check_requantizer(nchw(y), acc, input_scale, weight_scale, y_scale, zx, zy, activation, "conv2d", 1)


@SETTINGS
@given(regime=st.sampled_from(REGIMES), zx=zero_points, zy=zero_points, activation=activations,
       multiplier=st.integers(1, 2), seed=seeds(), **conv_geometry)
def test_conv_requantizer_matches_xnnpack_depthwise_conv_2d(regime, zx, zy, activation, multiplier, seed,
                                                            stride, dilation, kernel, padding):
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 11))
    out_channels = channels * multiplier
    x, w, bias, input_scale, weight_scale = conv_case(rng, regime, zx, kernel, dilation, channels,
                                                      (1, *kernel, out_channels), out_channels)
    acc = conv_accumulator(x, zx, w.transpose(3, 0, 1, 2), bias, stride, dilation, padding, channels)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)
    model = TFLiteModel()
    t_x, t_w, t_b, t_y = layer_tensors(model, x, w, bias, input_scale, weight_scale, acc.permute(0, 2, 3, 1).shape,
                                       y_scale, zx, zy, 3)
    options = tflite_options("DepthwiseConv2DOptions", padding=PADDING[padding], strideH=stride[0],
                             strideW=stride[1], depthMultiplier=multiplier, dilationHFactor=dilation[0],
                             dilationWFactor=dilation[1], fusedActivationFunction=ACTIVATIONS[activation])
    model.operator("DEPTHWISE_CONV_2D", [t_x, t_w, t_b], [t_y], options, version=3)
    y = run_default(model.build([t_x], [t_y]), x)
    check_requantizer(nchw(y), acc, input_scale, weight_scale, y_scale, zx, zy, activation, "conv2d", 1)


def fully_connected(x, w, bias, input_scale, weight_scale, y_scale, zx, zy, activation, acc_shape):
    model = TFLiteModel()
    t_x, t_w, t_b, t_y = layer_tensors(model, x, w, bias, input_scale, weight_scale, acc_shape, y_scale, zx, zy, 0)
    options = tflite_options("FullyConnectedOptions", fusedActivationFunction=ACTIVATIONS[activation])
    model.operator("FULLY_CONNECTED", [t_x, t_w, t_b], [t_y], options, version=5)
    return as_codes(run_default(model.build([t_x], [t_y]), x))


@SETTINGS
@given(regime=st.sampled_from(REGIMES), zx=zero_points, zy=zero_points, activation=activations,
       rows=st.integers(1, 4), depth=st.integers(1, 40), units=st.integers(1, 10), seed=seeds())
def test_linear_requantizer_matches_xnnpack_fully_connected(regime, zx, zy, activation, rows, depth, units, seed):
    rng = np.random.default_rng(seed)
    x, w, bias_bound = layer_codes(rng, regime, (rows, depth), zx, -128, 127, (units, depth))
    x = x.astype(np.int8)
    bias = rng.integers(-bias_bound, bias_bound + 1, size=units).astype(np.int32)
    input_scale, weight_scale = layer_scales(rng, regime, units)
    acc = torch.from_numpy((x.astype(np.int64) - zx) @ w.astype(np.int64).T + bias)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)
    y = fully_connected(x, w, bias, input_scale, weight_scale, y_scale, zx, zy, activation, acc.shape)
    check_requantizer(y, acc, input_scale, weight_scale, y_scale, zx, zy, activation, "linear", -1)


def test_fully_connected_converts_accumulators_past_2_24_to_float32():
    """acc = 16,842,753 + bias with M = 2^-17: float32(acc) drops the low bits (exact rounding would differ)."""
    depth = 1030
    x = np.full((1, depth), 127, np.int8)
    w = np.full((1, depth), 127, np.int8)
    acc_value = (127 + 128) * 127 * depth
    bias = np.asarray([16842753 - acc_value], np.int32)  # acc + bias = 2^24 + 2^16 + 1
    y = fully_connected(x, w, bias, 1.0, np.asarray([2.0**-17], np.float32), 1.0, -128, -100, "NONE", (1, 1))
    acc = torch.tensor([[16842753.0]], dtype=torch.float64)
    check_requantizer(y, acc, 1.0, np.asarray([2.0**-17], np.float32), 1.0, -128, -100, "NONE", "linear", -1)
    assert y.item() == 128 - 100  # 16842753 / 2^17 = 128.5000076...: exact rounding gives 129


def test_requantization_scale_past_256_is_refused():
    qp = QParams(1.0, 0, "int8")
    with pytest.raises(UnsupportedOpError, match=r"outside XNNPACK's \[2\^-32, 256\)"):
        TARGET.requantizer("conv2d", qp, torch.tensor([1.0]), QParams(1 / 256, 0, "int8"), -128, 127, 0, 1)


def test_xnnpack_rounds_float32_products_half_even():
    """M = 0.25 with accumulators 2, 5, 6, -5, -6 (semantics.md): XNNPACK gives 0, 1, 2, -1, -2."""
    qp = QParams(1.0, 0, "int8")
    conv = TARGET.requantizer("conv2d", qp, torch.tensor([0.25]), qp, -128, 127, channel_axis=0, ndim=1)
    assert conv(torch.tensor([2.0, 5.0, 6.0, -5.0, -6.0])).tolist() == [0, 1, 2, -1, -2]


# ---------------------------------------------------------------------------------------------------------
# ADD and fused activations
# ---------------------------------------------------------------------------------------------------------
def add_model(shape, a, b, out, activation: str) -> bytes:
    model = TFLiteModel()
    t_a = model.tensor(shape, "int8", *a)
    t_b = model.tensor(shape, "int8", *b)
    t_y = model.tensor(shape, "int8", *out)
    model.operator("ADD", [t_a, t_b], [t_y], tflite_options("AddOptions",
                   fusedActivationFunction=ACTIVATIONS[activation]), version=2)
    return model.build([t_a, t_b], [t_y])


@SETTINGS
@given(scale_a=scales(-3, 0), scale_b=scales(-3, 0), scale_y=scales(-3, 0),
       zps=st.tuples(zero_points, zero_points, zero_points), activation=activations, length=st.integers(1, 300),
       ties=st.booleans(), seed=seeds())
def test_add_matches_xnnpack_add(scale_a, scale_b, scale_y, zps, activation, length, ties, seed):
    rng = np.random.default_rng(seed)
    za, zb, zy = zps
    if ties:  # equal input scales and an output scale of twice: half the code sum, ties everywhere
        scale_b, scale_y = scale_a, f32(scale_a * rng.choice([2.0, 4.0, 0.5]))
    qa, qb = int8_codes(rng, (1, length)), int8_codes(rng, (1, length))
    a, b, out = QParams(scale_a, za, "int8"), QParams(scale_b, zb, "int8"), QParams(scale_y, zy, "int8")
    ratios = [f32(f32(s) / f32(scale_y)) for s in (scale_a, scale_b)]
    if not all(2.0**-10 <= r < 256.0 for r in ratios):
        with pytest.raises(UnsupportedOpError, match="XNNPACK takes ratios"):
            TARGET.add(as_codes(qa), a, as_codes(qb), b, out, -128, 127)
        return
    y = run_default(add_model(qa.shape, (scale_a, za), (scale_b, zb), (scale_y, zy), activation), qa, qb)
    assert_codes_equal(as_codes(y), TARGET.add(as_codes(qa), a, as_codes(qb), b, out, *bounds(activation, out)))


@SETTINGS
@given(scale_y=st.one_of(scales(-2.5, 0.0), st.sampled_from([12.0, 4.0, 0.048, 0.024, 2.4, 0.4])), zy=zero_points,
       activation=st.sampled_from(["RELU", "RELU6", "RELU_N1_TO_1"]))
def test_activation_bounds_match_xnnpack_fused_activation(scale_y, zy, activation):
    """An ADD of every int8 code and zero with and without the fused activation: the runtime's bounds are
    observed, and must equal the spec's."""
    qa = np.arange(-128, 128, dtype=np.int8).reshape(1, -1)
    qb = np.zeros_like(qa)
    scale = f32(max(scale_y, 8.0 / 100))
    fused = as_codes(run_default(add_model(qa.shape, (scale, 0), (scale, 0), (scale_y, zy), activation), qa, qb))
    plain = as_codes(run_default(add_model(qa.shape, (scale, 0), (scale, 0), (scale_y, zy), "NONE"), qa, qb))
    lo, hi = bounds(activation, QParams(scale_y, zy, "int8"))
    assert_codes_equal(fused, torch.clamp(plain, lo, hi))


# ---------------------------------------------------------------------------------------------------------
# AVERAGE_POOL_2D (TFLite's optimized kernel: not delegated) and MAX_POOL_2D (XNNPACK, exact)
# ---------------------------------------------------------------------------------------------------------
def pool_model(op, x, scale, zp, kernel, stride, padding):
    model = TFLiteModel()
    t_x = model.tensor(x.shape, "int8", scale, zp)
    windows = [torch_pool_window(n, kernel, stride, padding) for n in x.shape[1:3]]
    t_y = model.tensor((x.shape[0], windows[0][0], windows[1][0], x.shape[3]), "int8", scale, zp)
    options = tflite_options("Pool2DOptions", padding=PADDING[padding], strideH=stride, strideW=stride,
                             filterHeight=kernel, filterWidth=kernel, fusedActivationFunction=0)
    model.operator(op, [t_x], [t_y], options, version=2)
    return model.build([t_x], [t_y]), windows


pool_cases = dict(scale=scales(), zp=zero_points, kernel=st.integers(1, 4), stride=st.integers(1, 3),
                  padding=st.sampled_from(["SAME", "VALID"]), seed=seeds())


def pool_input(rng, kernel):
    height, width = int(rng.integers(kernel, 10)), int(rng.integers(kernel, 10))
    return int8_codes(rng, (int(rng.integers(1, 3)), height, width, int(rng.integers(1, 20))))


@SETTINGS
@given(**pool_cases)
def test_average_pool_matches_default_average_pool_2d(scale, zp, kernel, stride, padding, seed):
    x = pool_input(np.random.default_rng(seed), kernel)
    model, windows = pool_model("AVERAGE_POOL_2D", x, scale, zp, kernel, stride, padding)
    y = run_default(model, x, delegated=False)
    attrs = {"kernel_size": (kernel, kernel), "stride": (stride, stride),
             "padding": (windows[0][1], windows[1][1]), "ceil_mode": windows[0][2] or windows[1][2],
             "count_include_pad": False}
    spec = TARGET.average_pool(nchw(x), QParams(scale, zp, "int8"), attrs)
    (out_h, _, _, first_h), (out_w, _, _, first_w) = windows
    assert_codes_equal(nchw(y), spec[:, :, first_h:first_h + out_h, first_w:first_w + out_w])


@SETTINGS
@given(**pool_cases)
def test_max_pool_2d_is_an_exact_max_in_xnnpack(scale, zp, kernel, stride, padding, seed):
    x = pool_input(np.random.default_rng(seed), kernel)
    model, windows = pool_model("MAX_POOL_2D", x, scale, zp, kernel, stride, padding)
    y = run_default(model, x, delegated=None)  # XNNPACK leaves 1x1 pools and strides past the kernel to TFLite
    (out_h, pad_h, ceil_h, first_h), (out_w, pad_w, ceil_w, first_w) = windows
    padded = torch.nn.functional.max_pool2d(nchw(x).double(), kernel, stride, (pad_h, pad_w),
                                            ceil_mode=ceil_h or ceil_w)
    assert_codes_equal(nchw(y), padded[:, :, first_h:first_h + out_h, first_w:first_w + out_w].to(torch.int64))


# ---------------------------------------------------------------------------------------------------------
# Whole models: trained for xnnpack, exported, 0 mismatched codes in the default interpreter
# ---------------------------------------------------------------------------------------------------------
def verify_default_kernels(integer, x, path):
    export(integer, path)
    report = verify(integer, path, (x,))
    assert report.ok, str(report)
    bound = [r for r in report.results if r.binding]
    assert bound and all(r.runtime == "LiteRT default kernels (XNNPACK)" and r.mismatched == 0 for r in bound)
    assert sum(r.total for r in bound) == integer(x).numel()


def test_resnet_trained_for_xnnpack_matches_default_kernels(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 1, 12, 12, generator=g) * 1.5 for _ in range(4)]
    _, integer = prepare_and_convert(ResNetish(), (batches[0],), "xnnpack", batches, lr=0.02)
    verify_default_kernels(integer, torch.randn(16, 1, 12, 12, generator=g) * 1.5, tmp_path / "resnet.tflite")


def test_mlp_with_cat_trained_for_xnnpack_matches_default_kernels(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 20, generator=g) * 3 for _ in range(4)]
    _, integer = prepare_and_convert(CatMLP(), (batches[0],), "xnnpack", batches, lr=0.02)
    verify_default_kernels(integer, torch.randn(32, 20, generator=g) * 3, tmp_path / "mlp.tflite")
