"""The native fused conv (numerics/fused_layer.py, numerics/native/int8_conv.c) gives the two-step path's codes.

The two-step path is the definition: the layer's exact accumulator plus bias, then the target's requantizer
(`requantize_float32`). The fused kernel computes both in one pass on AVX512-VNNI. These tests hold it to that
definition with torch.equal (values, dtype and channels-last strides) over shapes, strides, paddings, dilations,
channel counts that are not multiples of 4 or 16, zero points, per-channel multipliers, clamps, 8-bit dtypes in and
out, input layouts, accumulators past 2^24 (where the int32 -> float32 conversion rounds), several threads; then
whole networks run through IntegerModel with and without the kernel, node by node.
"""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import prepare_and_convert
from networks import NETWORKS
from qparity.bench import ResNetish
from qparity.numerics import native
from qparity.numerics.accumulate import AccumulationPlan, ConvGeometry
from qparity.numerics.arithmetic import (Float32Rule, ShiftRequantizer, float32_requantizer, quantize_multiplier,
                                         requantize_float32)
from qparity.numerics.fused_layer import FusedConv, fused_conv
from qparity.ops.program import ProgramExecutor
from qparity.qparams import QParams

FUSED_TARGETS = ["xnnpack", "executorch-xnnpack", "onnxruntime", "tflite", "tflite-micro"]

needs_kernel = pytest.mark.skipif(native.int8_conv() is None,
                                  reason=f"native kernel unavailable here: {native.unavailable_reason()}")


RULES = ["float32", "gemmlowp", "single_rounding"]


def make_rule(kind: str, multiplier: torch.Tensor, zero_y: int, lo: int, hi: int):
    """The requantizer of a target layer for real multipliers M: float32 (XNNPACK, ONNX Runtime), TFLite's
    fixed point (QuantizeMultiplier's m0 and shift, ShiftRequantizer.gemmlowp), or single rounding."""
    if kind == "float32":
        return Float32Rule(multiplier, zero_y, lo, hi)
    m0, shift = quantize_multiplier(multiplier.to(torch.float64))
    if kind == "gemmlowp":
        return ShiftRequantizer.gemmlowp(m0, shift, zero_y, lo, hi)
    return ShiftRequantizer.single_rounding(m0, (31 - shift).clamp(min=1), zero_y, lo, hi)


def two_step(x: torch.Tensor, zero_x: int, weight: torch.Tensor, bias, rule, dtype, stride, padding, dilation
             ) -> torch.Tensor:
    """The definition: exact acc + bias (float64 holds these sums exactly), then the requantizer's own function
    (requantize_float32, or ShiftRequantizer.requantize) with its channels along axis 1."""
    acc = torch.nn.functional.conv2d(x.to(torch.float64) - zero_x, weight.to(torch.float64),
                                     None if bias is None else bias.to(torch.float64), stride, padding, dilation)
    return requantize(acc.to(torch.int64), rule, dtype)


def requantize(acc: torch.Tensor, rule, dtype) -> torch.Tensor:
    shape = (1, -1) + (1,) * (acc.dim() - 2)
    if isinstance(rule, Float32Rule):
        return requantize_float32(acc, rule.multiplier.reshape(shape), rule.zero_point, rule.lo, rule.hi, dtype)
    channel = lambda value: value.reshape(shape) if isinstance(value, torch.Tensor) else value  # noqa: E731
    return ShiftRequantizer.requantize(acc, channel(rule.multiplier), channel(rule.addend), channel(rule.shift),
                                       channel(rule.sign_weight), rule.zero_point, rule.lo, rule.hi, dtype)


def build(weight, bias, zero_x, in_dtype, multiplier, zero_y, lo, hi, out_dtype, stride, padding, dilation):
    geometry = ConvGeometry("conv2d", stride, padding, dilation, 1)
    return FusedConv(native.int8_conv(), geometry, weight, bias, zero_x, in_dtype,
                     Float32Rule(multiplier, zero_y, lo, hi), out_dtype)


def layouts(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor: no dense layout at all
        wide = torch.repeat_interleave(x, 2, dim=3)
        return wide[..., ::2]
    if layout == "channels_last_slice":  # the first channels of a wider channels-last tensor: gaps between pixels
        wide = torch.cat([x, x[:, :3]], dim=1).contiguous(memory_format=torch.channels_last)
        return wide[:, :x.shape[1]]
    return x.contiguous()


@needs_kernel
@settings(max_examples=250, deadline=None)
@given(data=st.data(), n=st.integers(1, 3), in_channels=st.integers(2, 40), out_channels=st.integers(2, 70),
       kernel=st.tuples(st.integers(1, 5), st.integers(1, 5)), stride=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), in_dtype=st.sampled_from([torch.int8, torch.uint8]),
       out_dtype=st.sampled_from([torch.int8, torch.uint8]),
       layout=st.sampled_from(["nchw", "channels_last", "strided", "channels_last_slice"]),
       with_bias=st.booleans(), threads=st.sampled_from([1, 2, 3]), rule=st.sampled_from(RULES),
       quads=st.booleans())
def test_the_fused_conv_equals_the_accumulator_then_the_requantizer(
        data, n, in_channels, out_channels, kernel, stride, dilation, in_dtype, out_dtype, layout, with_bias, threads,
        rule, quads):
    """`quads`: a multiple of 4 input channels (no channel padding in the kernel's band rows), else any count."""
    if quads:
        in_channels = -(-in_channels // 4) * 4
    padding = (data.draw(st.integers(0, (kernel[0] - 1) * dilation[0])),
               data.draw(st.integers(0, (kernel[1] - 1) * dilation[1])))
    reach = ((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1)
    height = data.draw(st.integers(max(1, reach[0] - 2 * padding[0]), 14))
    width = data.draw(st.integers(max(1, reach[1] - 2 * padding[1]), 14))
    in_info, out_info = torch.iinfo(in_dtype), torch.iinfo(out_dtype)
    zero_x = data.draw(st.integers(in_info.min, in_info.max))
    zero_y = data.draw(st.integers(out_info.min, out_info.max))
    lo = data.draw(st.integers(out_info.min, out_info.max))
    hi = data.draw(st.integers(lo, out_info.max))
    seed = data.draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(in_info.min, in_info.max + 1, (n, in_channels, height, width), generator=generator,
                      dtype=torch.int64).to(in_dtype)
    weight = torch.randint(-127, 128, (out_channels, in_channels) + kernel, generator=generator, dtype=torch.int8)
    bias = (torch.randint(-2**20, 2**20, (out_channels,), generator=generator, dtype=torch.int32)
            if with_bias else None)
    # multipliers over the range XNNPACK takes, per channel; some scale the accumulator up
    exponent = data.draw(st.integers(-24, 2))
    multiplier = torch.rand(out_channels, generator=generator).add_(0.5).mul_(2.0**exponent)
    requantizer = make_rule(rule, multiplier, zero_y, lo, hi)
    geometry = ConvGeometry("conv2d", stride, padding, dilation, 1)
    fused = FusedConv(native.int8_conv(), geometry, weight, bias, zero_x, in_dtype, requantizer, out_dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = fused(layouts(x, layout))
    finally:
        torch.set_num_threads(before)
    want = two_step(x.to(torch.int64), zero_x, weight, bias, requantizer, out_dtype, stride, padding, dilation)
    if got is None:  # only the layouts the two-step path may leave NCHW
        assert 1 in (out_channels, height * width, want.shape[2] * want.shape[3])
        return
    assert got.dtype == out_dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} codes differ"


@needs_kernel
@pytest.mark.parametrize("in_dtype", [torch.int8, torch.uint8])
def test_accumulators_past_2_24_round_to_float32_as_the_rule_does(in_dtype):
    """|acc| up to 2^26: f32(acc) drops low bits there, with round-half-even, in the kernel as in the rule."""
    generator = torch.Generator().manual_seed(3)
    info = torch.iinfo(in_dtype)
    x = torch.full((2, 256, 6, 6), info.max, dtype=in_dtype)
    x[:, :, ::2] = info.min
    weight = torch.randint(100, 128, (24, 256, 3, 3), generator=generator, dtype=torch.int8)
    weight[::2] *= -1
    bias = torch.randint(-2**24, 2**24, (24,), generator=generator, dtype=torch.int32)
    zero_x = 0 if in_dtype == torch.uint8 else -128
    multiplier = torch.full((24,), 2.0**-19) * torch.linspace(0.9, 1.1, 24)
    fused = build(weight, bias, zero_x, in_dtype, multiplier, 3, -128, 127, torch.int8, (1, 1), (1, 1), (1, 1))
    got = fused(x.contiguous(memory_format=torch.channels_last))
    want = two_step(x.to(torch.int64), zero_x, weight, bias, Float32Rule(multiplier, 3, -128, 127), torch.int8,
                    (1, 1), (1, 1), (1, 1))
    acc = torch.nn.functional.conv2d(x.to(torch.float64) - zero_x, weight.to(torch.float64), bias.to(torch.float64),
                                     padding=1)
    assert float(acc.abs().max()) > 2**25  # the rounding of the conversion is exercised
    assert torch.equal(got, want)


@needs_kernel
def test_the_accumulator_converts_to_float32_with_round_half_even():
    """Sums s = m - 1 with m = (2k + 1) * 2^17, k odd, in [2^24, 2^25) where float32 holds even integers only:
    round-half-even gives f32(s) = m and the code rounds k + 0.5 up to k + 1; a truncating conversion would give
    m - 2 and code k. Neighbouring sums m - 8 .. m + 7 cover both neighbours of each tie."""
    ks = torch.arange(65, 97, 2)  # 16 odd k: one per output channel
    weight = torch.zeros((16, 4, 1, 1), dtype=torch.int8)
    weight[:, 0] = 1
    bias = ((2 * ks + 1) * 2**17 - 1).to(torch.int32)
    x = torch.zeros((1, 4, 4, 4), dtype=torch.int8)
    x[0, 0] = torch.arange(-8, 8, dtype=torch.int8).reshape(4, 4)
    multiplier = torch.full((16,), 2.0**-18)
    fused = build(weight, bias, 0, torch.int8, multiplier, 0, -128, 127, torch.int8, (1, 1), (0, 0), (1, 1))
    got = fused(x.contiguous(memory_format=torch.channels_last))
    want = two_step(x.to(torch.int64), 0, weight, bias, Float32Rule(multiplier, 0, -128, 127), torch.int8, (1, 1),
                    (0, 0), (1, 1))
    assert torch.equal(want[0, :, 2, 0], (ks + 1).to(torch.int8))  # x = 0: the tie, rounded up to even k + 1
    assert torch.equal(got, want)


def plan(weight):
    return AccumulationPlan("float32", 0.0)


def test_the_kernel_is_refused_where_it_is_not_exact_or_not_the_rule():
    weight = torch.ones((16, 8, 3, 3), dtype=torch.int8)
    grid = QParams(0.1, 3, "int8")
    rule = float32_requantizer(torch.full((16, 1, 1), 0.01), 2, -128, 127)
    conv = ConvGeometry("conv2d", (1, 1), (1, 1), (1, 1), 1)
    if native.int8_conv() is not None:
        assert fused_conv(plan(weight), conv, weight, None, grid, grid, rule) is not None
    # not the float32 rule (no constants to fuse), grouped, "same" padding, int16 pairs, a 16-bit grid
    assert fused_conv(plan(weight), conv, weight, None, grid, grid, lambda acc, dtype: acc) is None
    grouped = ConvGeometry("conv2d", (1, 1), (1, 1), (1, 1), 2)
    assert fused_conv(plan(weight), grouped, weight[:, :4], None, grid, grid, rule) is None
    same = ConvGeometry("conv2d", (1, 1), "same", (1, 1), 1)
    assert fused_conv(plan(weight), same, weight, None, grid, grid, rule) is None
    pairs = AccumulationPlan("int16_pairs", 0.0)
    assert fused_conv(pairs, conv, weight, None, grid, grid, rule) is None
    wide = QParams(0.1, 0, "int16")
    assert fused_conv(plan(weight), conv, weight, None, wide, grid, rule) is None
    # u8 x s8 partial sums that could leave int32: sum |w| * 255 >= 2^31
    heavy = torch.full((16, 8192, 9, 1), 127, dtype=torch.int8)
    assert fused_conv(plan(heavy), conv, heavy, None, grid, grid, rule) is None


@needs_kernel
def test_codes_it_does_not_take_go_to_the_two_step_path():
    weight = torch.ones((16, 8, 3, 3), dtype=torch.int8)
    fused = build(weight, None, 0, torch.int8, torch.full((16,), 0.01), 0, -128, 127, torch.int8, (1, 1), (1, 1),
                  (1, 1))
    assert fused(torch.zeros((1, 8, 5, 5), dtype=torch.float32)) is None   # not integer codes
    wide = torch.randint(-128, 128, (1, 8, 5, 5))                            # int64 codes on the int8 grid
    assert torch.equal(fused(wide), fused(wide.to(torch.int8)))
    assert fused(torch.zeros((0, 8, 5, 5), dtype=torch.int8)) is None      # an empty batch
    assert fused(torch.zeros((2, 8, 1, 1), dtype=torch.int8)) is None      # 1x1: the layout is ambiguous
    assert fused(torch.zeros((2, 8, 5, 5), dtype=torch.int8)) is not None


def layer_fusions(model):
    return {name: kernel.fused for name, kernel in model.layer_kernels.items()
            if isinstance(kernel, tuple) and kernel.fused is not None}


def without_fusions(model):
    twin = copy.copy(model)
    twin.layer_kernels = {name: kernel._replace(fused=None) if isinstance(kernel, tuple) else kernel
                          for name, kernel in model.layer_kernels.items()}
    twin.__dict__.pop("_narrow_mode", None)
    return twin


def assert_every_node_equal(model, twin, codes):
    runs = []
    for m in (model, twin):
        executor = ProgramExecutor(m.graph, m.target, m._narrow_mode)
        executor.run([codes.to(torch.int8) if m.input_qparams[0].dtype == "int8" else codes.to(torch.uint8)])
        runs.append(executor.values)
    for name, value in runs[0].items():
        other = runs[1][name]
        assert torch.equal(value.codes, other.codes), name
        assert value.codes.dtype == other.codes.dtype and value.codes.stride() == other.codes.stride(), name


@needs_kernel
@pytest.mark.parametrize("target, network", [
    (target, network) for target in FUSED_TARGETS for network in ("resnetish", "small_unet", "preact_resnet")
] + [(target, "mobilenetv3_small") for target in FUSED_TARGETS if target != "onnxruntime"])  # ORT: no hardswish
def test_whole_networks_give_the_same_codes_with_and_without_the_kernel(target, network):
    torch.manual_seed(0)
    if network == "resnetish":
        model, shape = ResNetish((16, 32, 64), in_channels=3), (3, 16, 16)
    else:
        cls, shape = NETWORKS[network]
        model = cls()
    example = torch.randn((2,) + shape)
    _, integer = prepare_and_convert(model, (example,), target, [torch.randn((4,) + shape) for _ in range(3)])
    assert layer_fusions(integer), "the kernel ran on none of the layers"
    calls = []
    for fused in layer_fusions(integer).values():
        original = fused.library
        fused.library = type("Spy", (), {"qparity_int8_conv": lambda self, conv, threads, original=original:
                                         calls.append(1) or original.qparity_int8_conv(conv, threads)})()
    codes = integer.quantize(torch.randn((3,) + shape))
    twin = without_fusions(integer)
    assert torch.equal(integer.run(codes), twin.run(codes))
    assert calls, "the kernel never ran"
    assert_every_node_equal(integer, twin, codes)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.integers(1, 5), min_size=1, max_size=3), features=st.integers(1, 70),
       out_features=st.integers(1, 40), in_dtype=st.sampled_from([torch.int8, torch.uint8]),
       out_dtype=st.sampled_from([torch.int8, torch.uint8]), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1),
       zero_x=st.integers(0, 127), zero_y=st.integers(0, 127), with_bias=st.booleans(), rule=st.sampled_from(RULES))
def test_a_fused_linear_layer_equals_the_two_step_path(rows, features, out_features, in_dtype, out_dtype, transposed,
                                                        seed, zero_x, zero_y, with_bias, rule):
    generator = torch.Generator().manual_seed(seed)
    info = torch.iinfo(in_dtype)
    x = torch.randint(info.min, info.max + 1, tuple(rows) + (features,), generator=generator).to(in_dtype)
    if transposed and x.dim() >= 2:  # the same values stored column-major
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    weight = torch.randint(-127, 128, (out_features, features), generator=generator, dtype=torch.int8)
    bias = torch.randint(-2**20, 2**20, (out_features,), generator=generator, dtype=torch.int32) if with_bias else None
    multiplier = torch.rand(out_features, generator=generator).add_(0.5).mul_(2.0**-9)
    geometry = ConvGeometry("linear")
    requantizer = make_rule(rule, multiplier, zero_y, 0, 127)
    fused = FusedConv(native.int8_conv(), geometry, weight, bias, zero_x, in_dtype, requantizer, out_dtype)
    got = fused(x)
    acc = torch.nn.functional.linear(x.to(torch.float64) - zero_x, weight.to(torch.float64),
                                     None if bias is None else bias.to(torch.float64))
    flat = requantize(acc.to(torch.int64).reshape(-1, out_features), requantizer, out_dtype)
    want = flat.reshape(acc.shape)
    assert got.dtype == out_dtype and got.is_contiguous()
    assert torch.equal(got, want)


@needs_kernel
def test_the_profiler_sees_the_native_kernels():
    """A ctypes call is invisible to PyTorch's profiler; the kernels record themselves, so `qparity bench
    --profile` counts them as convolutions and adds, not as Python."""
    from torch.profiler import profile

    from qparity.bench_profile import kind_of

    torch.manual_seed(0)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    _, integer = prepare_and_convert(ResNetish((16,), in_channels=3), (batches[0],), "xnnpack", batches)
    codes = integer.quantize(batches[1])
    with profile() as recorded:
        integer.run(codes)
    kinds = {kind_of(event.key) for event in recorded.key_averages() if event.key.startswith("qparity::")}
    assert kinds == {"conv and linear kernels", "engine and native adds"}
