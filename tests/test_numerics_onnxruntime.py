"""The `onnxruntime` target's spec functions give the same codes as ONNX Runtime's CPU kernels, op by op.

Each test builds a one-node QOperator model (tests/runtime_models.py), runs it in onnxruntime and compares
the output codes with the spec function with torch.equal. Parameters come from hypothesis: random scales
10**uniform(-4, 0) and powers of two (exact ties), zero points, shapes and codes.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from qparity.numerics import pooling
from qparity.qparams import DTYPE_RANGES, QParams
from qparity.numerics import get_target
from helpers import require_runtime

from runtime_models import (NUMPY_DTYPES, REGIMES, as_codes, assert_codes_equal, f32, layer_codes,
                            layer_output_scale, layer_scales, run_onnx_op, scales, seeds)

require_runtime("onnx")
require_runtime("onnxruntime")

TARGET = get_target("onnxruntime")
ACTIVATION_DTYPES = st.sampled_from(["uint8", "int8"])
SETTINGS = settings(max_examples=40, deadline=None)


def codes(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    lo, hi = DTYPE_RANGES[dtype]
    return rng.integers(lo, hi + 1, size=shape).astype(NUMPY_DTYPES[dtype])


def scalar(value, dtype) -> np.ndarray:
    return np.array(value, dtype=NUMPY_DTYPES.get(dtype, dtype))


zero_points = st.integers(0, 255)  # shifted into the dtype's range by `zero_point`


def zero_point(raw: int, dtype: str) -> int:
    return raw + DTYPE_RANGES[dtype][0]


# ---------------------------------------------------------------------------------------------------------
# QuantizeLinear
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(dtype=ACTIVATION_DTYPES, scale=scales(), raw_zp=zero_points, seed=seeds())
def test_quantize_matches_onnxruntime_quantizelinear(dtype, scale, raw_zp, seed):
    rng = np.random.default_rng(seed)
    zp = zero_point(raw_zp, dtype)
    spread = rng.normal(0, 80, size=200) * scale
    ties = (rng.integers(-300, 300, size=100) + 0.5) * np.float64(scale)  # k + 1/2 steps, exact when representable
    x = np.concatenate([spread, ties]).astype(np.float32)
    arrays = {"x": x, "s": scalar(scale, np.float32), "z": scalar(zp, dtype)}
    y = run_onnx_op("QuantizeLinear", ["x", "s", "z"], arrays, {"s", "z"}, NUMPY_DTYPES[dtype])
    spec = TARGET.quantize(torch.from_numpy(x), QParams(scale, zp, dtype))
    assert_codes_equal(as_codes(y), spec)


# ---------------------------------------------------------------------------------------------------------
# QLinearConv and QGemm: exact integer accumulator, then the target's requantizer
# ---------------------------------------------------------------------------------------------------------
conv_kinds = st.sampled_from(["dense", "grouped", "depthwise"])


@SETTINGS
@given(dtype=ACTIVATION_DTYPES, kind=conv_kinds, regime=st.sampled_from(REGIMES), raw_zp=zero_points,
       raw_out_zp=zero_points, stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       pads=st.tuples(*[st.integers(0, 2)] * 4), seed=seeds())
def test_conv_requantizer_matches_onnxruntime_qlinearconv(dtype, kind, regime, raw_zp, raw_out_zp, stride, dilation,
                                                           kernel, pads, seed):
    rng = np.random.default_rng(seed)
    zx, zy = zero_point(raw_zp, dtype), zero_point(raw_out_zp, dtype)
    if kind == "depthwise":
        channels = int(rng.integers(1, 9))
        groups, out_channels = channels, channels * int(rng.integers(1, 3))
    elif kind == "grouped":
        groups = int(rng.integers(2, 4))
        channels, out_channels = groups * int(rng.integers(1, 4)), groups * int(rng.integers(1, 4))
    else:
        groups, channels, out_channels = 1, int(rng.integers(1, 9)), int(rng.integers(1, 9))
    height, width = (int(rng.integers((k - 1) * d + 1, 9)) for k, d in zip(kernel, dilation))
    x, w, bias_bound = layer_codes(rng, regime, (int(rng.integers(1, 3)), channels, height, width), zx,
                                   *DTYPE_RANGES[dtype], (out_channels, channels // groups, *kernel))
    x = x.astype(NUMPY_DTYPES[dtype])
    bias = rng.integers(-bias_bound, bias_bound + 1, size=out_channels).astype(np.int32)
    input_scale, weight_scale = layer_scales(rng, regime, out_channels)

    centered = F.pad(torch.from_numpy(x.astype(np.float64) - zx), (pads[1], pads[3], pads[0], pads[2]))
    acc = F.conv2d(centered, torch.from_numpy(w.astype(np.float64)), torch.from_numpy(bias.astype(np.float64)),
                   stride, 0, dilation, groups).to(torch.int64)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)

    arrays = {"x": x, "xs": scalar(input_scale, np.float32), "xz": scalar(zx, dtype), "w": w, "ws": weight_scale,
              "wz": np.zeros(out_channels, np.int8), "ys": scalar(y_scale, np.float32), "yz": scalar(zy, dtype),
              "b": bias}
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    y = run_onnx_op("QLinearConv", names, arrays, set(names) - {"x"}, NUMPY_DTYPES[dtype],
                    attrs=dict(strides=list(stride), pads=list(pads), dilations=list(dilation), group=groups))

    input_qp, output_qp = QParams(input_scale, zx, dtype), QParams(y_scale, zy, dtype)
    requantize = TARGET.requantizer("conv2d", input_qp, torch.from_numpy(weight_scale), output_qp,
                                    output_qp.qmin, output_qp.qmax, channel_axis=1, ndim=4)
    assert_codes_equal(as_codes(y), requantize(acc))


@SETTINGS
@given(dtype=ACTIVATION_DTYPES, regime=st.sampled_from(REGIMES), raw_zp=zero_points, raw_out_zp=zero_points,
       rows=st.integers(1, 6), depth=st.integers(1, 40), columns=st.integers(1, 12),
       seed=seeds())
def test_linear_requantizer_matches_onnxruntime_qgemm(dtype, regime, raw_zp, raw_out_zp, rows, depth, columns, seed):
    rng = np.random.default_rng(seed)
    za, zy = zero_point(raw_zp, dtype), zero_point(raw_out_zp, dtype)
    a, b, bias_bound = layer_codes(rng, regime, (rows, depth), za, *DTYPE_RANGES[dtype], (columns, depth))
    a = a.astype(NUMPY_DTYPES[dtype])  # b is [N, K] (transB=1), like nn.Linear
    bias = rng.integers(-bias_bound, bias_bound + 1, size=columns).astype(np.int32)
    input_scale, weight_scale = layer_scales(rng, regime, columns)
    acc = torch.from_numpy((a.astype(np.int64) - za) @ b.astype(np.int64).T + bias)
    y_scale = layer_output_scale(rng, regime, acc.numpy(), input_scale, weight_scale)

    arrays = {"a": a, "as": scalar(input_scale, np.float32), "az": scalar(za, dtype), "b": b, "bs": weight_scale,
              "bz": np.zeros(columns, np.int8), "c": bias, "ys": scalar(y_scale, np.float32), "yz": scalar(zy, dtype)}
    names = ["a", "as", "az", "b", "bs", "bz", "c", "ys", "yz"]
    y = run_onnx_op("QGemm", names, arrays, set(names) - {"a"}, NUMPY_DTYPES[dtype], attrs={"transB": 1},
                    domain="com.microsoft")

    input_qp, output_qp = QParams(input_scale, za, dtype), QParams(y_scale, zy, dtype)
    requantize = TARGET.requantizer("linear", input_qp, torch.from_numpy(weight_scale), output_qp,
                                    output_qp.qmin, output_qp.qmax, channel_axis=-1, ndim=2)
    assert_codes_equal(as_codes(y), requantize(acc))


def test_conv_requantizer_matches_onnxruntime_above_float32_exact_accumulators():
    """ORT converts the accumulator to float32 before scaling: acc = 2^24 + 1 loses its last bit."""
    acc = np.array([2**24 + 1, 2**24 + 3, -(2**24) - 1, 16_842_753], np.int64)
    x = np.ones((1, 1, 1, 1), np.uint8)
    w = np.ones((4, 1, 1, 1), np.int8)
    bias = (acc - 1).astype(np.int32)
    arrays = {"x": x, "xs": scalar(1.0, np.float32), "xz": scalar(0, "uint8"), "w": w,
              "ws": np.full(4, 2.0**-17, np.float32), "wz": np.zeros(4, np.int8), "ys": scalar(1.0, np.float32),
              "yz": scalar(0, "uint8"), "b": bias}
    names = ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz", "b"]
    y = run_onnx_op("QLinearConv", names, arrays, set(names) - {"x"}, np.uint8)
    requantize = TARGET.requantizer("conv2d", QParams(1.0, 0, "uint8"), torch.full((4,), 2.0**-17),
                                    QParams(1.0, 0, "uint8"), 0, 255, channel_axis=1, ndim=4)
    assert_codes_equal(as_codes(y), requantize(torch.from_numpy(acc).reshape(1, 4, 1, 1)))


# ---------------------------------------------------------------------------------------------------------
# QLinearAdd, QLinearConcat
# ---------------------------------------------------------------------------------------------------------
@SETTINGS
@given(dtype=ACTIVATION_DTYPES, scale_a=scales(), scale_b=scales(), scale_y=scales(), raw_zps=st.tuples(
    zero_points, zero_points, zero_points), length=st.one_of(st.just(1), st.integers(2, 200)), seed=seeds())
def test_add_matches_onnxruntime_qlinearadd(dtype, scale_a, scale_b, scale_y, raw_zps, length, seed):
    rng = np.random.default_rng(seed)
    za, zb, zy = (zero_point(z, dtype) for z in raw_zps)
    qa, qb = codes(rng, (length,), dtype), codes(rng, (length,), dtype)
    arrays = {"a": qa, "as": scalar(scale_a, np.float32), "az": scalar(za, dtype), "b": qb,
              "bs": scalar(scale_b, np.float32), "bz": scalar(zb, dtype), "ys": scalar(scale_y, np.float32),
              "yz": scalar(zy, dtype)}
    names = ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    y = run_onnx_op("QLinearAdd", names, arrays, set(names) - {"a", "b"}, NUMPY_DTYPES[dtype],
                    domain="com.microsoft")
    out = QParams(scale_y, zy, dtype)
    spec = TARGET.add(as_codes(qa), QParams(scale_a, za, dtype), as_codes(qb), QParams(scale_b, zb, dtype), out,
                      out.qmin, out.qmax)
    assert_codes_equal(as_codes(y), spec)


def test_add_of_single_elements_matches_onnxruntime_qlinearadd():
    a, b, out = QParams(0.09059564769268036, 67, "uint8"), QParams(0.005052782595157623, 249, "uint8"), \
        QParams(0.020176352933049202, 45, "uint8")
    arrays = {"a": np.array([92], np.uint8), "as": scalar(float(a.scale), np.float32), "az": scalar(67, "uint8"),
              "b": np.array([238], np.uint8), "bs": scalar(float(b.scale), np.float32), "bz": scalar(249, "uint8"),
              "ys": scalar(float(out.scale), np.float32), "yz": scalar(45, "uint8")}
    names = ["a", "as", "az", "b", "bs", "bz", "ys", "yz"]
    y = run_onnx_op("QLinearAdd", names, arrays, set(names) - {"a", "b"}, np.uint8, domain="com.microsoft")
    spec = TARGET.add(torch.tensor([92]), a, torch.tensor([238]), b, out, 0, 255)  # ORT's scalar kernel: 154
    assert_codes_equal(as_codes(y), spec)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_quantize_of_nan_matches_onnxruntime_quantizelinear(dtype):
    x = np.array([np.nan], np.float32)
    arrays = {"x": x, "s": scalar(0.1, np.float32), "z": scalar(3, dtype)}
    y = run_onnx_op("QuantizeLinear", ["x", "s", "z"], arrays, {"s", "z"}, NUMPY_DTYPES[dtype])
    assert_codes_equal(as_codes(y), TARGET.quantize(torch.from_numpy(x), QParams(0.1, 3, dtype)))


@SETTINGS
@given(dtype=ACTIVATION_DTYPES, scale_y=scales(), raw_out_zp=zero_points, inputs=st.integers(1, 3),
       axis=st.integers(0, 2), seed=seeds())
def test_rescale_matches_onnxruntime_qlinearconcat(dtype, scale_y, raw_out_zp, inputs, axis, seed):
    rng = np.random.default_rng(seed)
    zy = zero_point(raw_out_zp, dtype)
    out = QParams(scale_y, zy, dtype)
    arrays = {"ys": scalar(scale_y, np.float32), "yz": scalar(zy, dtype)}
    names, expected = ["ys", "yz"], []
    for i in range(inputs):
        shape = [2, 3, 4]
        shape[axis] = int(rng.integers(1, 5))
        q = codes(rng, shape, dtype)
        mode = rng.integers(0, 4)
        if mode == 0:  # the output grid: ORT copies
            scale, zp = scale_y, zy
        elif mode == 1:  # ratios k/2, k/4 of the output scale: exact ties
            scale, zp = f32(scale_y * rng.choice([0.5, 1.5, 2.5, 0.25, 0.75])), zero_point(rng.integers(0, 256), dtype)
        else:
            scale, zp = f32(scale_y * 10 ** rng.uniform(-1, 1)), zero_point(rng.integers(0, 256), dtype)
        arrays.update({f"x{i}": q, f"s{i}": scalar(scale, np.float32), f"z{i}": scalar(zp, dtype)})
        names += [f"x{i}", f"s{i}", f"z{i}"]
        expected.append(TARGET.rescale(as_codes(q), QParams(scale, zp, dtype), out))
    constants = {n for n in names if not n.startswith("x")}
    y = run_onnx_op("QLinearConcat", names, arrays, constants, NUMPY_DTYPES[dtype], attrs={"axis": axis},
                    domain="com.microsoft")
    assert_codes_equal(as_codes(y), torch.cat(expected, dim=axis))


# ---------------------------------------------------------------------------------------------------------
# Pools
# ---------------------------------------------------------------------------------------------------------
def run_qlinear_pool(op: str, x: np.ndarray, qp: QParams, dtype: str, attrs: dict) -> np.ndarray:
    arrays = {"x": x, "xs": scalar(float(qp.scale), np.float32), "xz": scalar(int(qp.zero_point), dtype),
              "ys": scalar(float(qp.scale), np.float32), "yz": scalar(int(qp.zero_point), dtype)}
    names = ["x", "xs", "xz", "ys", "yz"]
    return run_onnx_op(op, names, arrays, set(names) - {"x"}, NUMPY_DTYPES[dtype], attrs=attrs,
                       domain="com.microsoft")


@SETTINGS
@given(dtype=ACTIVATION_DTYPES, scale=scales(), raw_zp=zero_points, kernel=st.tuples(st.integers(1, 4),
       st.integers(1, 4)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), pad_fraction=st.tuples(
       st.integers(0, 2), st.integers(0, 2)), count_include_pad=st.booleans(), whole_input=st.booleans(),
       seed=seeds())
def test_average_pool_matches_onnxruntime_qlinearaveragepool(dtype, scale, raw_zp, kernel, stride, pad_fraction,
                                                              count_include_pad, whole_input, seed):
    rng = np.random.default_rng(seed)
    qp = QParams(scale, zero_point(raw_zp, dtype), dtype)
    if whole_input:  # kernel == input with no padding: ORT routes it to its global-average code
        height, width = kernel
        padding = (0, 0)
    else:
        height, width = (int(rng.integers(k, 10)) for k in kernel)
        padding = tuple(min(p, k // 2) for p, k in zip(pad_fraction, kernel))
    x = codes(rng, (int(rng.integers(1, 3)), int(rng.integers(1, 4)), height, width), dtype)
    attrs = {"kernel_size": kernel, "stride": stride, "padding": padding, "ceil_mode": False,
             "count_include_pad": count_include_pad}
    y = run_qlinear_pool("QLinearAveragePool", x, qp, dtype, dict(
        kernel_shape=list(kernel), strides=list(stride), pads=[padding[0], padding[1], padding[0], padding[1]],
        count_include_pad=int(count_include_pad)))
    assert_codes_equal(as_codes(y), TARGET.average_pool(as_codes(x), qp, attrs))


@SETTINGS
@given(dtype=ACTIVATION_DTYPES, scale=scales(), raw_zp=zero_points, height=st.integers(1, 9),
       width=st.integers(1, 9), seed=seeds())
def test_average_pool_over_whole_input_matches_onnxruntime_qlinearglobalaveragepool(dtype, scale, raw_zp, height,
                                                                                     width, seed):
    rng = np.random.default_rng(seed)
    qp = QParams(scale, zero_point(raw_zp, dtype), dtype)
    x = codes(rng, (int(rng.integers(1, 3)), int(rng.integers(1, 6)), height, width), dtype)
    attrs = {"kernel_size": (height, width), "stride": (height, width), "padding": (0, 0), "ceil_mode": False,
             "count_include_pad": True}
    y = run_qlinear_pool("QLinearGlobalAveragePool", x, qp, dtype, {"channels_last": 0})
    assert_codes_equal(as_codes(y), TARGET.average_pool(as_codes(x), qp, attrs))


@SETTINGS
@given(dtype=ACTIVATION_DTYPES, kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.tuples(st.integers(1, 2),
       st.integers(1, 2)), pad_fraction=st.tuples(st.integers(0, 2), st.integers(0, 2)), seed=seeds())
def test_max_pool_matches_onnxruntime_maxpool(dtype, kernel, stride, dilation, pad_fraction, seed):
    rng = np.random.default_rng(seed)
    padding = tuple(min(p, k // 2) for p, k in zip(pad_fraction, kernel))
    height, width = (int(rng.integers((k - 1) * d + 1, 10)) for k, d in zip(kernel, dilation))
    x = codes(rng, (1, int(rng.integers(1, 4)), height, width), dtype)
    y = run_onnx_op("MaxPool", ["x"], {"x": x}, set(), NUMPY_DTYPES[dtype], attrs=dict(
        kernel_shape=list(kernel), strides=list(stride), dilations=list(dilation),
        pads=[padding[0], padding[1], padding[0], padding[1]]))
    attrs = {"kernel_size": kernel, "stride": stride, "padding": padding, "dilation": dilation, "ceil_mode": False}
    assert_codes_equal(as_codes(y), pooling.max_pool2d(as_codes(x), attrs).to(torch.int64))


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
@pytest.mark.parametrize("kernel, padding, include_pad", [((6, 5), (0, 0), True), ((3, 3), (1, 1), True),
                                                          ((3, 2), (1, 0), False)])
def test_average_pool_takes_narrow_codes_as_they_are(dtype, kernel, padding, include_pad):
    """The integer runtime hands the pool its codes in their own dtype (Target.average_pool_takes_narrow_codes):
    the same codes as from int64 ones, global pool (QLinearGlobalAveragePool) and windows alike, at the dtype's
    extremes (an int8 code minus a 0-dim zero point would wrap in int8)."""
    target = get_target("onnxruntime")
    info = torch.iinfo(getattr(torch, dtype))
    grid = QParams(0.037, info.max if dtype == "int8" else 3, dtype)
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(info.min, info.max + 1, (2, 3, 6, 5), generator=generator)
    codes[0, 0] = info.min
    codes[0, 1] = info.max
    attrs = {"kernel_size": kernel, "stride": (1, 1), "padding": padding, "ceil_mode": False,
             "count_include_pad": include_pad, "adaptive": False}
    narrow = target.average_pool(codes.to(getattr(torch, dtype)), grid, attrs)
    assert torch.equal(narrow, target.average_pool(codes, grid, attrs))
