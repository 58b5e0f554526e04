"""The `tflite` target's spec functions give the same codes as LiteRT's int8 reference kernels, op by op.

Each test writes a one-operator .tflite file (tests/runtime_models.py), runs it with
OpResolverType.BUILTIN_REF and compares the output codes with the spec function with torch.equal.
Parameters come from hypothesis: random scales 10**uniform(-4, 0) and powers of two (exact ties), zero
points, shapes, codes and fused activations. Tensors are NHWC in the file and NCHW for the spec.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from qparity.qparams import QParams
from qparity.numerics import get_target
from helpers import require_runtime

from runtime_models import (ACTIVATION_RANGES, ACTIVATIONS, REGIMES, TFLiteModel, as_codes, assert_codes_equal,
                            f32, layer_codes, layer_output_scale, layer_scales, run_tflite, scales, seeds,
                            tflite_options, tflite_same_padding)

require_runtime("ai_edge_litert")

TARGET = get_target("tflite")
SETTINGS = settings(max_examples=40, deadline=None)
activations = st.sampled_from(list(ACTIVATIONS))
zero_points = st.integers(-128, 127)
PADDING = {"SAME": 0, "VALID": 1}


def int8_codes(rng, shape) -> np.ndarray:
    return rng.integers(-128, 128, size=shape).astype(np.int8)


def nchw(y: np.ndarray) -> torch.Tensor:
    return as_codes(y).permute(0, 3, 1, 2)


def assume_activation_fits_int32(activation: str, scale: float) -> None:
    """LiteRT refuses a model whose fused activation bound / scale overflows int32 (kernel_util.cc Quantize)."""
    assume(all(abs(bound / np.float32(scale)) < 2**31 for bound in ACTIVATION_RANGES[activation] if bound is not None))


def bounds(activation: str, qp: QParams):
    return TARGET.activation_bounds(*ACTIVATION_RANGES[activation], qp)


# ---------------------------------------------------------------------------------------------------------
# QUANTIZE
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(scale=scales(), zp=zero_points, seed=seeds())
def test_quantize_matches_tflite_quantize(scale, zp, seed):
    rng = np.random.default_rng(seed)
    spread = rng.normal(0, 80, size=200) * scale
    ties = (rng.integers(-300, 300, size=100) + 0.5) * np.float64(scale)
    x = np.concatenate([spread, ties]).astype(np.float32).reshape(1, -1)
    model = TFLiteModel()
    source = model.tensor(x.shape, "float32")
    out = model.tensor(x.shape, "int8", scale, zp)
    model.operator("QUANTIZE", [source], [out])
    y = run_tflite(model.build([source], [out]), x)
    assert_codes_equal(as_codes(y), TARGET.quantize(torch.from_numpy(x), QParams(scale, zp, "int8")))


@SETTINGS
@given(scale=scales(), zp=zero_points, out_scale=scales(), out_zp=zero_points, ratio=st.sampled_from(
    [None, 0.5, 1.5, 2.0, 0.25, 3.0, 1.0]))
def test_rescale_matches_tflite_quantize_int8_to_int8(scale, zp, out_scale, out_zp, ratio):
    if ratio is not None:  # ratios of simple fractions: exact ties in the multiplier
        out_scale = f32(scale * ratio)
    q = np.arange(-128, 128, dtype=np.int8).reshape(1, -1)
    model = TFLiteModel()
    source = model.tensor(q.shape, "int8", scale, zp)
    out = model.tensor(q.shape, "int8", out_scale, out_zp)
    model.operator("QUANTIZE", [source], [out], version=2)
    y = run_tflite(model.build([source], [out]), q)
    spec = TARGET.rescale(as_codes(q), QParams(scale, zp, "int8"), QParams(out_scale, out_zp, "int8"))
    assert_codes_equal(as_codes(y), spec)


# ---------------------------------------------------------------------------------------------------------
# CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
# ---------------------------------------------------------------------------------------------------------
def conv_accumulator(x_nhwc: np.ndarray, zx: int, weight_oihw: np.ndarray, bias: np.ndarray, stride, dilation,
                     padding: str, groups: int) -> torch.Tensor:
    """acc + bias (int64, NCHW) with TFLite's padding: out-of-image taps are skipped (real value 0)."""
    centered = torch.from_numpy(x_nhwc.astype(np.float64) - zx).permute(0, 3, 1, 2)
    kernel = weight_oihw.shape[2:]
    if padding == "SAME":
        pads = [tflite_same_padding(n, k, s, d)[1:] for n, k, s, d in zip(centered.shape[2:], kernel, stride, dilation)]
        centered = F.pad(centered, (*pads[1], *pads[0]))
    acc = F.conv2d(centered, torch.from_numpy(weight_oihw.astype(np.float64)),
                   torch.from_numpy(bias.astype(np.float64)), stride, 0, dilation, groups)
    return acc.to(torch.int64)


conv_geometry = dict(stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
                     dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
                     kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)), padding=st.sampled_from(["SAME", "VALID"]))


@SETTINGS
@given(regime=st.sampled_from(REGIMES), zx=zero_points, zy=zero_points, activation=activations,
       seed=seeds(), **conv_geometry)
def test_conv_requantizer_matches_tflite_conv_2d(regime, zx, zy, activation, seed, stride, dilation,
                                                 kernel, padding):
    rng = np.random.default_rng(seed)
    channels, out_channels = int(rng.integers(1, 7)), int(rng.integers(1, 7))
    height, width = (int(rng.integers((k - 1) * d + 1, 9)) for k, d in zip(kernel, dilation))
    x, w, bias_bound = layer_codes(rng, regime, (int(rng.integers(1, 3)), height, width, channels), zx, -128, 127,
                                   (out_channels, *kernel, channels))  # w: OHWI
    x = x.astype(np.int8)
    bias = rng.integers(-bias_bound, bias_bound + 1, size=out_channels).astype(np.int32)
    input_scale, weight_scale = layer_scales(rng, regime, out_channels)
    acc = conv_accumulator(x, zx, w.transpose(0, 3, 1, 2), bias, stride, dilation, padding, 1)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)
    assume_activation_fits_int32(activation, y_scale)

    model = TFLiteModel()
    t_x = model.tensor(x.shape, "int8", input_scale, zx)
    t_w = model.tensor(w.shape, "int8", weight_scale, [0] * out_channels, data=w, quantized_dimension=0)
    t_b = model.tensor(bias.shape, "int32", (np.float64(input_scale) * weight_scale).astype(np.float32),
                       [0] * out_channels, data=bias)
    t_y = model.tensor(acc.permute(0, 2, 3, 1).shape, "int8", y_scale, zy)
    options = tflite_options("Conv2DOptions", padding=PADDING[padding], strideH=stride[0], strideW=stride[1],
                             dilationHFactor=dilation[0], dilationWFactor=dilation[1],
                             fusedActivationFunction=ACTIVATIONS[activation])
    model.operator("CONV_2D", [t_x, t_w, t_b], [t_y], options, version=3)
    y = run_tflite(model.build([t_x], [t_y]), x)

    input_qp, output_qp = QParams(input_scale, zx, "int8"), QParams(y_scale, zy, "int8")
    requantize = TARGET.requantizer("conv2d", input_qp, torch.from_numpy(weight_scale), output_qp,
                                    *bounds(activation, output_qp), channel_axis=1, ndim=4)
    assert_codes_equal(nchw(y), requantize(acc))


@SETTINGS
@given(regime=st.sampled_from(REGIMES), zx=zero_points, zy=zero_points, activation=activations,
       multiplier=st.integers(1, 2), seed=seeds(), **conv_geometry)
def test_conv_requantizer_matches_tflite_depthwise_conv_2d(regime, zx, zy, activation, multiplier, seed,
                                                           stride, dilation, kernel, padding):
    rng = np.random.default_rng(seed)
    channels = int(rng.integers(1, 11))  # past 8 too: the optimized kernels treat blocks of 8 differently
    out_channels = channels * multiplier
    height, width = (int(rng.integers((k - 1) * d + 1, 9)) for k, d in zip(kernel, dilation))
    x, w, bias_bound = layer_codes(rng, regime, (int(rng.integers(1, 3)), height, width, channels), zx, -128, 127,
                                   (1, *kernel, out_channels))  # w: 1HWO, o = c * multiplier + m
    x = x.astype(np.int8)
    bias = rng.integers(-bias_bound, bias_bound + 1, size=out_channels).astype(np.int32)
    input_scale, weight_scale = layer_scales(rng, regime, out_channels)
    acc = conv_accumulator(x, zx, w.transpose(3, 0, 1, 2), bias, stride, dilation, padding, channels)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)
    assume_activation_fits_int32(activation, y_scale)

    model = TFLiteModel()
    t_x = model.tensor(x.shape, "int8", input_scale, zx)
    t_w = model.tensor(w.shape, "int8", weight_scale, [0] * out_channels, data=w, quantized_dimension=3)
    t_b = model.tensor(bias.shape, "int32", (np.float64(input_scale) * weight_scale).astype(np.float32),
                       [0] * out_channels, data=bias)
    t_y = model.tensor(acc.permute(0, 2, 3, 1).shape, "int8", y_scale, zy)
    options = tflite_options("DepthwiseConv2DOptions", padding=PADDING[padding], strideH=stride[0],
                             strideW=stride[1], depthMultiplier=multiplier, dilationHFactor=dilation[0],
                             dilationWFactor=dilation[1], fusedActivationFunction=ACTIVATIONS[activation])
    model.operator("DEPTHWISE_CONV_2D", [t_x, t_w, t_b], [t_y], options, version=3)
    y = run_tflite(model.build([t_x], [t_y]), x)

    input_qp, output_qp = QParams(input_scale, zx, "int8"), QParams(y_scale, zy, "int8")
    requantize = TARGET.requantizer("conv2d", input_qp, torch.from_numpy(weight_scale), output_qp,
                                    *bounds(activation, output_qp), channel_axis=1, ndim=4)
    assert_codes_equal(nchw(y), requantize(acc))


@SETTINGS
@given(regime=st.sampled_from(REGIMES), zx=zero_points, zy=zero_points, activation=activations,
       rows=st.integers(1, 4), depth=st.integers(1, 40), units=st.integers(1, 10), seed=seeds())
def test_linear_requantizer_matches_tflite_fully_connected(regime, zx, zy, activation, rows, depth,
                                                           units, seed):
    rng = np.random.default_rng(seed)
    x, w, bias_bound = layer_codes(rng, regime, (rows, depth), zx, -128, 127, (units, depth))
    x = x.astype(np.int8)
    bias = rng.integers(-bias_bound, bias_bound + 1, size=units).astype(np.int32)
    input_scale, weight_scale = layer_scales(rng, regime, units)
    acc = torch.from_numpy((x.astype(np.int64) - zx) @ w.astype(np.int64).T + bias)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)
    assume_activation_fits_int32(activation, y_scale)

    model = TFLiteModel()
    t_x = model.tensor(x.shape, "int8", input_scale, zx)
    t_w = model.tensor(w.shape, "int8", weight_scale, [0] * units, data=w, quantized_dimension=0)
    t_b = model.tensor(bias.shape, "int32", (np.float64(input_scale) * weight_scale).astype(np.float32),
                       [0] * units, data=bias)
    t_y = model.tensor(acc.shape, "int8", y_scale, zy)
    options = tflite_options("FullyConnectedOptions", fusedActivationFunction=ACTIVATIONS[activation])
    model.operator("FULLY_CONNECTED", [t_x, t_w, t_b], [t_y], options, version=5)
    y = run_tflite(model.build([t_x], [t_y]), x)

    input_qp, output_qp = QParams(input_scale, zx, "int8"), QParams(y_scale, zy, "int8")
    requantize = TARGET.requantizer("linear", input_qp, torch.from_numpy(weight_scale), output_qp,
                                    *bounds(activation, output_qp), channel_axis=-1, ndim=2)
    assert_codes_equal(as_codes(y), requantize(acc))


def test_conv_and_fully_connected_round_ties_as_measured():
    """M = 0.25 with accumulators 2, 5, 6, -5, -6: CONV_2D double-rounds (1.25 -> 2), FULLY_CONNECTED does not."""
    acc = torch.tensor([2, 5, 6, -5, -6])
    qp = QParams(1.0, 0, "int8")
    conv = TARGET.requantizer("conv2d", qp, torch.tensor([0.25]), qp, -128, 127, channel_axis=0, ndim=1)
    linear = TARGET.requantizer("linear", qp, torch.tensor([0.25]), qp, -128, 127, channel_axis=0, ndim=1)
    assert conv(acc).tolist() == [1, 2, 2, -1, -2]
    assert linear(acc).tolist() == [1, 1, 2, -1, -2]


# ---------------------------------------------------------------------------------------------------------
# ADD and fused activations
# ---------------------------------------------------------------------------------------------------------
def add_model(shape, a, b, out, activation: str) -> bytes:
    """ADD of two int8 tensors; a, b and out are (scale, zero point) pairs."""
    model = TFLiteModel()
    t_a = model.tensor(shape, "int8", *a)
    t_b = model.tensor(shape, "int8", *b)
    t_y = model.tensor(shape, "int8", *out)
    model.operator("ADD", [t_a, t_b], [t_y], tflite_options("AddOptions",
                   fusedActivationFunction=ACTIVATIONS[activation]), version=2)
    return model.build([t_a, t_b], [t_y])


@SETTINGS
@given(scale_a=scales(), scale_b=scales(), scale_y=scales(), zps=st.tuples(zero_points, zero_points, zero_points),
       activation=activations, length=st.integers(1, 100), ties=st.booleans(), seed=seeds())
def test_add_matches_tflite_add(scale_a, scale_b, scale_y, zps, activation, length, ties, seed):
    rng = np.random.default_rng(seed)
    za, zb, zy = zps
    if ties:  # equal input scales and an output scale of twice: half the code sum, ties everywhere
        scale_b, scale_y = scale_a, f32(scale_a * rng.choice([2.0, 4.0, 0.5]))
    qa, qb = int8_codes(rng, (1, length)), int8_codes(rng, (1, length))
    y = run_tflite(add_model(qa.shape, (scale_a, za), (scale_b, zb), (scale_y, zy), activation), qa, qb)
    out = QParams(scale_y, zy, "int8")
    spec = TARGET.add(as_codes(qa), QParams(scale_a, za, "int8"), as_codes(qb), QParams(scale_b, zb, "int8"), out,
                      *bounds(activation, out))
    assert_codes_equal(as_codes(y), spec)


@SETTINGS
@given(scale_y=st.one_of(scales(-2.5, 0.0), st.sampled_from([12.0, 4.0, 0.048, 0.024])), zy=zero_points,
       activation=st.sampled_from(["RELU", "RELU6", "RELU_N1_TO_1"]))
def test_activation_bounds_match_tflite_fused_activation(scale_y, zy, activation):
    """An ADD of every int8 code and zero, with and without the fused activation: the outputs reach past
    both clamps, so the runtime's bounds are observed, and must equal the spec's."""
    qa = np.arange(-128, 128, dtype=np.int8).reshape(1, -1)
    qb = np.zeros_like(qa)
    scale = f32(max(scale_y, 8.0 / 100))  # the input range covers [-1, 6] on the output grid
    fused = as_codes(run_tflite(add_model(qa.shape, (scale, 0), (scale, 0), (scale_y, zy), activation), qa, qb))
    plain = as_codes(run_tflite(add_model(qa.shape, (scale, 0), (scale, 0), (scale_y, zy), "NONE"), qa, qb))
    lo, hi = bounds(activation, QParams(scale_y, zy, "int8"))
    assert_codes_equal(fused, torch.clamp(plain, lo, hi))


# ---------------------------------------------------------------------------------------------------------
# AVERAGE_POOL_2D
# ---------------------------------------------------------------------------------------------------------
def torch_pool_window(size: int, kernel: int, stride: int, padding: str):
    """PyTorch pooling attributes (padding, ceil_mode, first window) whose windows include TFLite's.

    TFLite SAME pads total // 2 in front and the rest behind; PyTorch pads both sides equally. An odd total
    becomes the front pad plus ceil_mode's extra last window (stride > 1), or one more pad and one dropped
    first window (stride 1). Padding taps never count (count_include_pad=False), so the sums agree.
    """
    if padding == "VALID":
        return (size - kernel) // stride + 1, 0, False, 0
    out, front, back = tflite_same_padding(size, kernel, stride)
    if front == back:
        return out, front, False, 0
    if stride > 1:
        return out, front, True, 0
    return out, back, False, 1


@SETTINGS
@given(scale=scales(), zp=zero_points, kernel=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.sampled_from(["SAME", "VALID"]), seed=seeds())
def test_average_pool_matches_tflite_average_pool_2d(scale, zp, kernel, stride, padding, seed):
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(kernel, 10)), int(rng.integers(kernel, 10))
    x = int8_codes(rng, (int(rng.integers(1, 3)), height, width, int(rng.integers(1, 4))))
    qp = QParams(scale, zp, "int8")
    model = TFLiteModel()
    t_x = model.tensor(x.shape, "int8", scale, zp)
    windows = [torch_pool_window(n, kernel, stride, padding) for n in (height, width)]
    t_y = model.tensor((x.shape[0], windows[0][0], windows[1][0], x.shape[3]), "int8", scale, zp)
    options = tflite_options("Pool2DOptions", padding=PADDING[padding], strideH=stride, strideW=stride,
                             filterHeight=kernel, filterWidth=kernel, fusedActivationFunction=0)
    model.operator("AVERAGE_POOL_2D", [t_x], [t_y], options, version=2)
    y = run_tflite(model.build([t_x], [t_y]), x)

    attrs = {"kernel_size": (kernel, kernel), "stride": (stride, stride),
             "padding": (windows[0][1], windows[1][1]), "ceil_mode": windows[0][2] or windows[1][2],
             "count_include_pad": False}
    spec = TARGET.average_pool(nchw(x), qp, attrs)
    (out_h, _, _, first_h), (out_w, _, _, first_w) = windows
    assert_codes_equal(nchw(y), spec[:, :, first_h:first_h + out_h, first_w:first_w + out_w])
