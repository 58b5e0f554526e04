"""The fbgemm/x86/qnnpack IntegerModel layers on the engine's own kernels equal the targets' emulation
(engine_kernels)."""
import torch
from hypothesis import given, settings, strategies as st

from qparity.numerics import get_target
from qparity.numerics.accumulate import ConvGeometry, accumulate, plan_accumulation
from qparity.numerics.engine_kernels import engine_layer
from qparity.numerics.int8_accumulate import int32_dot_products
from qparity.numerics.pytorch_engines import QnnpackTarget, X86Target
from qparity.numerics.pytorch_versions import CHECKED
from qparity.qparams import QParams

scales = st.floats(2.0**-10, 0.5).map(lambda v: float(torch.tensor(v, dtype=torch.float32)))


@st.composite
def layer_case(draw):
    linear = draw(st.booleans())
    groups = 1 if linear else draw(st.sampled_from([1, 1, 2]))
    # wide layers too: past 2^24 the emulation sums in float32 chunks or float64, the engine still in int32
    cin = groups * draw(st.one_of(st.integers(1, 12), st.integers(150, 300)))
    cout = groups * draw(st.integers(1, 6))
    k = 1 if linear else draw(st.integers(1, 3))
    stride, padding, dilation = (draw(st.integers(1, 2)), draw(st.integers(0, 1)), draw(st.integers(1, 2)))
    geometry = ConvGeometry("linear") if linear else ConvGeometry("conv2d", (stride,) * 2, (padding,) * 2,
                                                                  (dilation,) * 2, groups)
    size = draw(st.integers(k * dilation, 7))
    shape = (draw(st.integers(1, 3)), cin) if linear else (draw(st.integers(1, 3)), cin, size, size)
    per_channel = draw(st.booleans())
    clamp = draw(st.sampled_from([(0, 255), "relu", (40, 200)]))
    engine = draw(st.sampled_from(["x86", "fbgemm", "qnnpack"]))
    return (engine, geometry, shape, cout, k, per_channel, draw(st.booleans()),
            QParams(draw(scales), draw(st.integers(0, 255)), "uint8"), QParams(draw(scales), draw(st.integers(0, 255)),
                                                                               "uint8"),
            clamp, draw(st.integers(0, 2**31 - 1)))


@settings(max_examples=60, deadline=None)
@given(layer_case())
def test_engine_layer_equals_the_targets_emulation(case):
    name, geometry, shape, cout, k, per_channel, with_bias, input_qp, output_qp, clamp, seed = case
    target = get_target(name).with_defaults_for(())
    g = torch.Generator().manual_seed(seed)
    cin = shape[1]
    weight = torch.randint(-127, 128, (cout, cin // geometry.groups) + ((k, k) if geometry.is_conv else ()),
                           generator=g)
    weight_scale = (torch.rand(cout, generator=g) * 0.02 + 1e-4) if per_channel else torch.tensor(0.01)
    bias = torch.randn(cout, generator=g) if with_bias else None
    lo, hi = (int(output_qp.zero_point), 255) if clamp == "relu" else clamp
    plan = plan_accumulation(geometry, weight, 255)
    kernel = engine_layer(target, plan, geometry, weight, weight_scale, bias, input_qp, output_qp, lo, hi)
    if name != "qnnpack" and not int32_dot_products():
        assert kernel is None  # fbgemm's GEMM saturates int16 pairs without VNNI: the emulation runs
        return
    if name == "qnnpack" and plan.path != "float32":
        assert kernel is None  # QNNPACK's bias check assumes an accumulator below 2^24: the emulation runs
        return
    assert kernel is not None
    codes = torch.randint(0, 256, shape, generator=g)
    layer = target.layer_target(geometry)
    ndim = 4 if geometry.is_conv else 2
    requantize = layer.requantizer(geometry.kind, input_qp, weight_scale.to(torch.float32), output_qp, lo, hi,
                                   geometry.channel_axis, ndim, **({} if bias is None else {"bias": bias}))
    expected = requantize(accumulate(plan, geometry, (codes - int(input_qp.zero_point)).to(torch.float32),
                                     weight.to(torch.float32)))
    result = kernel(codes)
    if result is not None:  # declined: a layout the emulation may leave NCHW
        assert torch.equal(result, expected) and result.stride() == expected.stride()


def test_engine_layer_is_refused_for_another_release_and_other_targets():
    geometry = ConvGeometry("conv2d", padding=(1, 1))
    weight = torch.ones(4, 4, 3, 3, dtype=torch.int64)
    grid = QParams(0.1, 128, "uint8")
    plan = plan_accumulation(geometry, weight, 255)
    installed = get_target("x86").with_defaults_for(()).kernels.release
    other = next(release for release in CHECKED if release != installed)
    for target in (X86Target(CHECKED[other]), QnnpackTarget(CHECKED[other]), get_target("tflite")):
        assert engine_layer(target, plan, geometry, weight, torch.tensor(0.01), None, grid, grid, 0, 255) is None


def test_a_layer_past_float32s_exact_range_runs_on_the_engine_with_the_emulations_codes():
    """Wide layers (the bench's width x2 and x4): the emulation sums in float32 chunks (groups 1) or float64
    (groups 2), the engine in int32; the codes are the same. Weights at +-127 and inputs at 0/255 push the sums
    far past 2^24."""
    if not int32_dot_products():
        return  # fbgemm's GEMM saturates int16 pairs without VNNI: the emulation runs (tested above)
    g = torch.Generator().manual_seed(3)
    input_qp, output_qp = QParams(0.02, 3, "uint8"), QParams(1.5, 120, "uint8")
    for name in ("x86", "fbgemm"):
        target = get_target(name).with_defaults_for(())
        for groups, path in ((1, "chunks"), (2, "float64")):
            geometry = ConvGeometry("conv2d", (1, 1), (1, 1), (1, 1), groups)
            weight = torch.where(torch.rand(64, 256 // groups, 3, 3, generator=g) < 0.5, -127, 127)
            plan = plan_accumulation(geometry, weight, 255)
            assert plan.path == path and plan.bound > 2**24
            kernel = engine_layer(target, plan, geometry, weight, torch.tensor(0.01), None, input_qp, output_qp,
                                  0, 255)
            codes = torch.randint(0, 2, (2, 256, 6, 6), generator=g) * 255
            layer = target.layer_target(geometry)
            requantize = layer.requantizer("conv2d", input_qp, torch.tensor(0.01), output_qp, 0, 255, 1, 4)
            expected = requantize(accumulate(plan, geometry, (codes - 3).to(torch.float32), weight.to(torch.float32)))
            result = kernel(codes)
            assert result is not None and torch.equal(result, expected), (name, groups)
            assert 0 < int((expected > 0).sum()) and int((expected < 255).sum()) > 0  # not all saturated
