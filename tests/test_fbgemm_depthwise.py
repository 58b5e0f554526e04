"""fbgemm's depthwise kernels add tap pairs of raw codes in int16 with saturation; qparity computes the same."""
import pytest
import torch
import torch.ao.quantization as tq
from hypothesis import given, settings, strategies as st
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError
from qparity.numerics.accumulate import ConvGeometry
from qparity.numerics.pytorch_engines import fbgemm_depthwise_path


class Depthwise(nn.Module):
    def __init__(self, channels, multiplier, kernel, stride):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(channels, channels * multiplier, kernel, stride, kernel // 2, groups=channels)

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def converted_depthwise(engine, channels, multiplier, kernel, stride, seed):
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    model = Depthwise(channels, multiplier, kernel, stride).eval()
    with torch.no_grad():
        model.conv.weight.mul_(4.0)  # large weights: neighbouring products reach the int16 limit
    # Full-range activations (no reduce_range): the case where fbgemm's int16 pairs saturate.
    model.qconfig = tq.QConfig(activation=tq.MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=False),
                               weight=tq.default_per_channel_weight_observer)
    prepared = tq.prepare(model)
    x = torch.rand(2, channels, 9, 9) * 4
    prepared(x)
    return tq.convert(prepared), x


@given(channels=st.sampled_from([8, 16, 24]), multiplier=st.sampled_from([1, 2]), kernel=st.sampled_from([3, 5, 7]),
       stride=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_from_torch_equals_fbgemm_depthwise_with_saturating_pairs(channels, multiplier, kernel, stride, seed):
    converted, x = converted_depthwise("fbgemm", channels, multiplier, kernel, stride, seed)
    im = qp.from_torch(converted, (x,))
    assert torch.equal(im(x), converted(x))


def test_the_saturating_path_is_taken_only_where_pytorch_takes_it():
    dw = ConvGeometry("conv2d", (1, 1), (1, 1), (1, 1), 8)
    assert fbgemm_depthwise_path(dw, (8, 1, 3, 3))
    assert fbgemm_depthwise_path(dw, (16, 1, 3, 3))
    assert not fbgemm_depthwise_path(ConvGeometry("conv2d", (1, 1), (1, 1), (1, 1), 6), (6, 1, 3, 3))
    assert not fbgemm_depthwise_path(ConvGeometry("conv2d", (1, 1), (2, 2), (2, 2), 8), (8, 1, 3, 3))
    assert not fbgemm_depthwise_path(ConvGeometry("conv2d", (3, 3), (1, 1), (1, 1), 8), (8, 1, 3, 3))
    assert not fbgemm_depthwise_path(ConvGeometry("conv2d", (1, 1), (0, 0), (1, 1), 8), (8, 1, 3, 3))


@settings(max_examples=6, deadline=None)
@given(channels=st.sampled_from([104, 128]), multiplier=st.sampled_from([1, 2]), kernel=st.sampled_from([3, 1]),
       stride=st.sampled_from([1, 2]), seed=st.integers(0, 1000))
def test_x86_runs_convs_with_more_than_100_groups_as_pytorch_does_through_fbgemm(channels, multiplier, kernel,
                                                                                 stride, seed):
    """PyTorch's x86 engine hands these convs to fbgemm (its depthwise kernels included): from_torch of an x86
    model equals it, and a qparity x86 model equals PyTorch's x86 engine through to_torch."""
    converted, x = converted_depthwise("x86", channels, multiplier, kernel, stride, seed)
    im = qp.from_torch(converted, (x,))
    assert torch.equal(im(x), converted(x))
    prepared = qp.prepare_qat(Depthwise(channels, multiplier, kernel, stride), (x,), target="x86")
    qp.calibrate(prepared, [x, x * 1.5])
    integer = qp.convert(qp.freeze(prepared))
    assert torch.equal(prepared.eval()(x), integer(x))
    assert torch.equal(qp.to_torch(integer)(x), integer(x))
