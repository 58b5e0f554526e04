"""Hardswish: each target's spec equals its runtime on every input code, and the op is exact end to end.

- fbgemm, x86, qnnpack: `Target.hardswish` equals torch.ops.quantized.hardswish on all 256 codes, in the
  vector loop and the scalar tail, NCHW and channels-last, for random input and output qparams.
- exact: equals a Fraction reference.
- prepare_qat fake == integer for conv + hardswish; from_torch equals torch.ao converted models (eager and
  FX) with nn.Hardswish; to_torch reproduces the integer model.
- tflite, xnnpack, onnxruntime refuse hardswish by name.
"""
import warnings
from fractions import Fraction

import pytest
import torch
import torch.ao.quantization as tq
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

import qparity as qp
from qparity.capture import capture
from qparity.qparams import QParams
from qparity.numerics import get_target

from helpers import assert_bit_exact, prepare_and_convert

warnings.filterwarnings("ignore")
ENGINES = ["fbgemm", "x86", "qnnpack"]
CODES = torch.arange(256, dtype=torch.int64)

scales = st.floats(1e-3, 0.5).map(lambda s: float(torch.tensor(s, dtype=torch.float32)))
# power-of-two and simple-ratio scales put many results exactly on rounding ties
tie_scales = st.sampled_from([2.0**-k * m for k in range(2, 9) for m in (1, 1.5, 3, 0.75)])


def torch_hardswish(codes, source: QParams, out: QParams):
    qx = torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), float(source.scale), int(source.zero_point))
    return torch.ops.quantized.hardswish(qx, float(out.scale), int(out.zero_point)).int_repr().to(torch.int64)


@given(engine=st.sampled_from(ENGINES), s=st.one_of(scales, tie_scales), z=st.integers(0, 255),
       s_y=st.one_of(scales, tie_scales), z_y=st.integers(0, 255), tail=st.integers(0, 63))
def test_spec_hardswish_equals_torch_on_all_codes(engine, s, z, s_y, z_y, tail):
    torch.backends.quantized.engine = engine
    source, out = QParams(s, z, "uint8"), QParams(s_y, z_y, "uint8")
    codes = torch.cat([CODES, CODES[:tail], CODES])  # the second copy straddles the vector blocks' end
    assert torch.equal(get_target(engine).hardswish(codes, source, out), torch_hardswish(codes, source, out))
    nchw = codes[:256].reshape(2, 8, 4, 4)
    for layout in (nchw, nchw.contiguous(memory_format=torch.channels_last)):
        ours = get_target(engine).hardswish(layout, source, out)
        assert torch.equal(ours, torch_hardswish(layout, source, out))
        assert ours.is_contiguous(memory_format=torch.channels_last) == layout.is_contiguous(
            memory_format=torch.channels_last)


def fraction_hardswish(code, source: QParams, out: QParams) -> int:
    x = (code - int(source.zero_point)) * Fraction(float(source.scale))
    y = x * min(max(x + 3, Fraction(0)), Fraction(6)) / 6
    value = int(out.zero_point) + round(y / Fraction(float(out.scale)))
    return min(max(value, out.qmin), out.qmax)


@given(dtype=st.sampled_from(["int8", "uint8"]), s=st.one_of(scales, tie_scales), s_y=st.one_of(scales, tie_scales),
       z=st.integers(-128, 127), z_y=st.integers(-128, 127))
def test_exact_hardswish_equals_fraction_reference(dtype, s, s_y, z, z_y):
    shift = 128 if dtype == "uint8" else 0
    source, out = QParams(s, z + shift, dtype), QParams(s_y, z_y + shift, dtype)
    codes = torch.arange(source.qmin, source.qmax + 1)
    expected = torch.tensor([fraction_hardswish(int(c), source, out) for c in codes])
    assert torch.equal(get_target("exact").hardswish(codes, source, out), expected)


def test_targets_without_hardswish_refuse_it_by_name():
    qp_ = QParams(0.1, 0, "uint8")
    with pytest.raises(qp.QParityError, match="hardswish is not emulated for target 'onnxruntime'"):
        get_target("onnxruntime").hardswish(CODES[:10], qp_, qp_)


class ConvHardswish(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 5)
        self.functional = functional

    def forward(self, x):
        y = self.act(self.bn(self.conv1(x)))
        y = self.conv2(y)
        y = nn.functional.hardswish(y) if self.functional else self.act(y)
        return nn.functional.hardswish(self.fc(torch.flatten(y, 1)))


def test_capture_keeps_hardswish_as_its_own_node():
    graph, _, _ = capture(ConvHardswish(False), (torch.randn(1, 3, 6, 6),))
    assert [n.op for n in graph.nodes if n.op in ("conv2d", "linear", "hardswish")] == [
        "conv2d", "hardswish", "conv2d", "hardswish", "linear", "hardswish"]
    assert all(n.new_grid for n in graph.nodes if n.op == "hardswish")


@pytest.mark.parametrize("target", ["exact", "fbgemm", "x86", "qnnpack"])
@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_fake_equals_integer_for_conv_hardswish(target, functional, seed):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 6, 6) * 2
    batches = [torch.randn(4, 3, 6, 6) * 2 for _ in range(4)]
    prepared, im = prepare_and_convert(ConvHardswish(functional), (x,), target, batches, lr=0.01)
    for batch in (x, torch.randn(9, 3, 6, 6) * 3):
        assert_bit_exact(prepared, im, batch)


def test_hardswish_gradient_flows_to_the_conv():
    prepared = qp.prepare_qat(ConvHardswish(False), (torch.randn(2, 3, 6, 6),), target="exact")
    prepared.train()(torch.randn(2, 3, 6, 6)).pow(2).sum().backward()
    assert prepared.layers["conv1"].module.weight.grad.abs().sum() > 0


class EagerHardswish(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.Hardswish()
        self.conv2 = nn.Conv2d(8, 4, 1)
        self.act2 = nn.Hardswish()

    def forward(self, x):
        return self.dequant(self.act2(self.conv2(self.act(self.bn(self.conv(self.quant(x)))))))


def _train(prepared, x):
    with torch.no_grad():
        for scale in (1.0, 1.5, 2.0):
            prepared(x * scale)
    return prepared


def eager_qat_converted(engine, seed):
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    model = EagerHardswish().train()
    model.qconfig = tq.get_default_qat_qconfig(engine)
    tq.fuse_modules_qat(model, [["conv", "bn"]], inplace=True)
    x = torch.randn(4, 3, 8, 8)
    prepared = _train(tq.prepare_qat(model), x)
    return tq.convert(prepared.eval()), x


def fx_qat_converted(engine, seed):
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    model = EagerHardswish().train()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_qat_fx(model, tq.get_default_qat_qconfig_mapping(engine), (x,))
    return convert_fx(_train(prepared, x).eval()), x


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flow", [eager_qat_converted, fx_qat_converted])
@pytest.mark.parametrize("seed", [0, 1])
def test_from_torch_equals_converted_model_with_hardswish(engine, flow, seed):
    converted, x = flow(engine, seed)
    im = qp.from_torch(converted, (x,))
    assert sum(n.op == "hardswish" for n in im.graph.nodes) == 2
    for batch in (x, torch.randn(7, 3, 8, 8) * 2):
        assert torch.equal(im(batch), converted(batch))


@pytest.mark.parametrize("engine", ENGINES)
def test_to_torch_round_trip_with_hardswish(engine):
    converted, x = eager_qat_converted(engine, 0)
    im = qp.from_torch(converted, (x,))
    module = qp.to_torch(im)
    assert any(isinstance(m, torch.ao.nn.quantized.Hardswish) for m in module.modules())
    assert torch.equal(module(x), im(x))


@pytest.mark.parametrize("engine", ENGINES)
def test_to_torch_runs_a_qparity_trained_hardswish_model_exactly(engine):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6) * 2
    _, im = prepare_and_convert(ConvHardswish(False), (x,), engine, [x, x * 1.5])
    torch.backends.quantized.engine = engine
    assert torch.equal(qp.to_torch(im)(x), im(x))
