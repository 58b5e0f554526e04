"""The accumulator is the exact integer sum, whichever float path computes it (float32, chunks, float64)."""
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

from qparity.numerics.accumulate import ConvGeometry, accumulate as accumulate_with_plan, plan_accumulation
from qparity.numerics.int8_accumulate import int32_dot_products, int8_accumulator, padding_only_windows, uint8_codes


def accumulate(geometry, x, w, max_abs):
    return accumulate_with_plan(plan_accumulation(geometry, w, max_abs), geometry, x, w)


def int64_conv(x, w, geometry):
    """Independent reference: im2col with int64 products and sums."""
    n, c, h, wd = x.shape
    out_c, c_per_group, kh, kw = w.shape
    ph, pw = geometry.padding
    cols = F.unfold(x.to(torch.float64), (kh, kw), dilation=geometry.dilation, padding=(ph, pw),
                    stride=geometry.stride).round().to(torch.int64)  # exact: small integers
    g = geometry.groups
    cols = cols.reshape(n, g, c_per_group * kh * kw, -1)
    weights = w.to(torch.int64).reshape(g, out_c // g, -1)
    acc = torch.einsum("gok,ngkl->ngol", weights, cols)
    oh = (h + 2 * ph - geometry.dilation[0] * (kh - 1) - 1) // geometry.stride[0] + 1
    ow = (wd + 2 * pw - geometry.dilation[1] * (kw - 1) - 1) // geometry.stride[1] + 1
    return acc.reshape(n, out_c, oh, ow)


@st.composite
def conv_case(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_per_group = draw(st.integers(1, 48))
    out_per_group = draw(st.integers(1, 4))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, 2))
    size = draw(st.integers(k * dilation, 7))
    geometry = ConvGeometry("conv2d", (stride, stride), (padding, padding), (dilation, dilation), groups)
    seed = draw(st.integers(0, 2**31 - 1))
    extreme = draw(st.booleans())
    return geometry, (groups * c_per_group, groups * out_per_group, k, size), seed, extreme


@given(conv_case())
def test_conv_accumulator_equals_int64_reference(case):
    geometry, (c, out_c, k, size), seed, extreme = case
    g = torch.Generator().manual_seed(seed)
    low, high = (-255, 256) if not extreme else (255, 256)
    x = torch.randint(low, high, (2, c, size, size), generator=g)
    if extreme:
        x = x * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1, 1)
    w = torch.randint(-127, 128, (out_c, c // geometry.groups, k, k), generator=g)
    if extreme:
        w = torch.where(w >= 0, torch.full_like(w, 127), torch.full_like(w, -127))
    acc = accumulate(geometry, x.to(torch.float32), w.to(torch.float32), 255)
    assert torch.equal(acc.to(torch.int64), int64_conv(x, w, geometry))


@given(st.integers(1, 1200), st.integers(1, 6), st.integers(0, 2**31 - 1), st.booleans())
def test_linear_accumulator_equals_int64_reference(features, outputs, seed, extreme):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-255, 256, (3, features), generator=g)
    w = torch.randint(-127, 128, (outputs, features), generator=g)
    if extreme:
        x = torch.full_like(x, 255)
        w = torch.full_like(w, 127)
    acc = accumulate(ConvGeometry("linear"), x.to(torch.float32), w.to(torch.float32), 255)
    assert torch.equal(acc.to(torch.int64), x @ w.T)


def test_large_layer_is_split_and_stays_exact():
    # 512 input channels x 3x3 x 127 x 255 = 1.5e8 > 2^24: a single float32 conv could round.
    x = torch.full((1, 512, 3, 3), 255.0)
    w = torch.full((2, 512, 3, 3), 127.0)
    w[1] = -127.0
    x[0, 0, 0, 0] = 254.0  # makes the exact sum odd, not representable in float32 at this magnitude
    acc = accumulate(ConvGeometry("conv2d"), x, w, 255)
    exact = int64_conv(x.to(torch.int64), w.to(torch.int64), ConvGeometry("conv2d"))
    assert torch.equal(acc.to(torch.int64), exact)
    assert int(exact.abs().max()) > 2**24


def test_wide_3x3_stride_1_conv_is_exact_in_channels_last():
    # The shape where a backend could pick a transform-based (Winograd) algorithm, which is not exact.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-120, 121, (2, 64, 16, 16), generator=g)
    w = torch.randint(-15, 16, (64, 64, 3, 3), generator=g)
    geometry = ConvGeometry("conv2d", padding=(1, 1))
    plan = plan_accumulation(geometry, w.float(), 120)
    assert plan.path == "float32"
    acc = accumulate_with_plan(plan, geometry, x.float(), w.float())
    assert torch.equal(acc.to(torch.int64), int64_conv(x, w, geometry))


@settings(max_examples=40, deadline=None)
@given(conv_case(), st.sampled_from([(0, 255), (-128, 127)]), st.integers(0, 255), st.booleans())
# windows entirely in the padding (padding 2 > (k - 1) * dilation = 1): oneDNN's qconv2d_pointwise left some of
# those outputs uninitialized (found by test_export_tflite's random depthwise conv on target xnnpack)
@example(case=(ConvGeometry("conv2d", (1, 1), (2, 2), (1, 1), 3), (3, 6, 2, 3), 1, False), grid=(-128, 127),
         zero_point=128, with_bias=True)
@example(case=(ConvGeometry("conv2d", (1, 1), (1, 1), (1, 1), 1), (4, 4, 1, 5), 2, False), grid=(0, 255),
         zero_point=3, with_bias=True)
def test_int8_kernel_accumulator_equals_int64_reference(case, grid, zero_point, with_bias):
    """The IntegerModel's oneDNN int8 path (int8_accumulate) is the same integer as the float path, bias included,
    for uint8 and int8 codes, every zero point, groups, strides, padding and dilation."""
    geometry, (c, out_c, k, size), seed, extreme = case
    qmin, qmax = grid
    zero_point = qmin + zero_point
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(qmin, qmax + 1, (2, c, size, size), generator=g)
    if extreme:
        x = torch.where(torch.rand(x.shape, generator=g) < 0.5, torch.full_like(x, qmin), torch.full_like(x, qmax))
    w = torch.randint(-127, 128, (out_c, c // geometry.groups, k, k), generator=g)
    bias = torch.randint(-2**20, 2**20, (out_c,), generator=g, dtype=torch.int32) if with_bias else None
    plan = plan_accumulation(geometry, w, max(zero_point - qmin, qmax - zero_point), bias)
    kernel = int8_accumulator(plan, geometry, w, bias, zero_point, qmin, qmax)
    if not int32_dot_products() or plan.path != "float32" or padding_only_windows(geometry, (k, k)):
        assert kernel is None  # not provably exact here (or oneDNN's padding-only windows): the float path
        return
    expected = int64_conv(x - zero_point, w, geometry) + (0 if bias is None else bias.reshape(1, -1, 1, 1))
    acc, float_path = kernel(x), accumulate_with_plan(plan, geometry, (x - zero_point).float(), w.float(), bias)
    assert torch.equal(float_path, expected.to(torch.float32))
    if acc is not None:  # it declines the shapes whose layout could differ; the layout must be the float path's
        assert torch.equal(acc, expected.to(torch.float32)) and acc.stride() == float_path.stride()
    linear = ConvGeometry("linear")
    w2 = w.reshape(out_c, -1)
    x2 = x.reshape(2, 1, -1)[..., :w2.shape[1]].expand(2, 3, -1)  # a 3-D input: (batch, tokens, features)
    plan2 = plan_accumulation(linear, w2, max(zero_point - qmin, qmax - zero_point), bias)
    kernel2 = int8_accumulator(plan2, linear, w2, bias, zero_point, qmin, qmax)
    expected2 = (x2 - zero_point) @ w2.T + (0 if bias is None else bias.to(torch.int64))
    acc2 = kernel2(x2)
    assert kernel2 is not None and torch.equal(acc2, expected2.to(torch.float32)) and acc2.is_contiguous()


def test_uint8_codes_are_the_codes_plus_the_shift_in_every_layout():
    int8 = torch.arange(-128, 128).repeat(6).reshape(2, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    for codes, shift in ((int8, 128), (int8 + 128, 0)):
        result = uint8_codes(codes, shift)
        assert result.dtype == torch.uint8 and result.stride() == codes.stride()
        assert torch.equal(result.to(torch.int64), codes + shift)
