"""PReLU with a learned slope (one, or one per channel): fake == integer on every target that runs it, the
slope learns through its int8 codes, the exact rule against Fractions, PyTorch's qprelu and LiteRT's PRELU
give the same codes, save/load keeps the slope, and ONNX Runtime refuses it at prepare_qat."""
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from qparity.errors import InvalidParameterError, UnsupportedOpError
from qparity.numerics import get_target
from qparity.numerics.prelu import slope_codes, slope_grid
from qparity.ops.registry import OPERATORS

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
RUNS = OPERATORS["prelu"].targets()


class ConvPReLU(nn.Module):
    def __init__(self, slopes: int, spatial: bool = True):
        super().__init__()
        self.layer = nn.Conv2d(3, 4, 3, padding=1) if spatial else nn.Linear(3, 4)
        self.act = nn.PReLU(slopes)

    def forward(self, x):
        return self.act(self.layer(x))


def convert_prelu(target: str, slopes: int, spatial: bool, seed: int, largest: float):
    torch.manual_seed(seed)
    model = ConvPReLU(slopes, spatial)
    with torch.no_grad():
        model.act.weight.uniform_(-largest / 2, largest)
    x = torch.randn(6, 3, 5, 5) if spatial else torch.randn(40, 3)
    prepared = qp.prepare_qat(model, (x[:2],), target=target)
    qp.calibrate(prepared, [x, 2 * x])
    qp.freeze(prepared)
    return prepared, qp.convert(prepared), torch.cat([x, 3 * x])


@pytest.mark.parametrize("target", RUNS)
@settings(max_examples=5, deadline=None)
@given(slopes=st.sampled_from([1, 4]), spatial=st.booleans(), seed=st.integers(0, 2**16),
       largest=st.sampled_from([0.3, 1.0, 2.5]))
def test_prelu_fake_equals_integer(target, slopes, spatial, seed, largest):
    prepared, integer, x = convert_prelu(target, slopes, spatial, seed, largest)
    assert torch.equal(prepared.eval()(x), integer(x))


@pytest.mark.parametrize("target", [t for t in RUNS if t in FILE_SUFFIXES])
@settings(max_examples=3, deadline=None)
@given(slopes=st.sampled_from([1, 4]), spatial=st.booleans(), seed=st.integers(0, 2**16))
def test_exported_prelu_gives_the_integer_models_codes_in_litert(tmp_path_factory, target, slopes, spatial, seed):
    _, integer, x = convert_prelu(target, slopes, spatial, seed, 1.0)
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("prelu"))


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), channels=st.sampled_from([1, 3, 16]), largest=st.sampled_from([0.9, 1.7]))
def test_engine_prelu_matches_pytorchs_qprelu_kernel(engine, seed, channels, largest):
    """torch.ops.quantized.prelu with the slope as torch.ao holds it (quint8: codes + 128, zero point 128)."""
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    source = qp.QParams(float(np.float32(10 ** rng.uniform(-3, -0.5))), int(rng.integers(0, 256)), "uint8")
    out = qp.QParams(float(np.float32(10 ** rng.uniform(-3, -0.5))), int(rng.integers(0, 256)), "uint8")
    slopes = torch.tensor(rng.uniform(-0.6, largest, channels), dtype=torch.float32)
    k, scale = slope_grid(slopes, "test")
    codes = slope_codes(slopes, k).to(torch.int64)
    x = torch.from_numpy(rng.integers(0, 256, (3, channels, 37)))
    qx = torch._make_per_tensor_quantized_tensor(x.to(torch.uint8), float(source.scale), int(source.zero_point))
    qw = torch._make_per_tensor_quantized_tensor((codes + 128).to(torch.uint8), scale, 128)
    expected = torch.ops.quantized.prelu(qx, qw, float(out.scale), int(out.zero_point)).int_repr().to(torch.int64)
    per_element = codes.reshape(1, -1, 1) if channels > 1 else codes.reshape(())
    assert torch.equal(get_target(engine).prelu(x, source, per_element, scale, out), expected)


def test_exact_prelu_is_the_correctly_rounded_rational_with_ties_to_even():
    source, out = qp.QParams(0.0625, 3, "int8"), qp.QParams(0.125, -1, "int8")
    k, scale = slope_grid(torch.tensor([0.5, -0.25]), "test")
    assert (k, scale) == (127, float(np.float32(1 / 127)))
    codes = torch.tensor([64, -32])  # rne(0.5 * 127) = 64 (63.5 to even), rne(-0.25 * 127) = -32
    assert torch.equal(slope_codes(torch.tensor([0.5, -0.25]), k).to(torch.int64), codes)
    q = torch.arange(-128, 128).reshape(1, 1, -1).expand(1, 2, 256)
    result = get_target("exact").prelu(q, source, codes.reshape(1, 2, 1), scale, out)
    s, s_a, s_y = Fraction(1, 16), Fraction(float(np.float32(1 / 127))), Fraction(1, 8)
    for channel, code in enumerate(codes.tolist()):
        for i, value in enumerate(range(-128, 128)):
            x = (value - 3) * s
            real = x if x >= 0 else x * code * s_a
            assert int(result[0, channel, i]) == min(max(round(real / s_y) - 1, -128), 127)  # round(): half to even


def test_the_slope_learns_through_its_codes():
    torch.manual_seed(0)
    model = ConvPReLU(4)
    x = torch.randn(8, 3, 5, 5)
    prepared = qp.prepare_qat(model, (x,), target="exact")
    qp.calibrate(prepared, [x])
    prepared.train()
    prepared(x).sum().backward()
    slope = prepared.slopes["act"].module.weight
    assert slope.grad is not None and torch.isfinite(slope.grad).all() and bool((slope.grad != 0).any())


def test_save_and_load_keep_the_slope_codes(tmp_path):
    _, integer, x = convert_prelu("tflite", 4, True, 0, 1.0)
    path = tmp_path / "model.qp"
    integer.save(path)
    assert torch.equal(qp.load(path)(x), integer(x))


def test_slopes_beyond_127_are_refused_naming_the_module():
    """At prepare_qat for the initial slope; in the forward for a slope that grows there during training."""
    model = ConvPReLU(1)
    with torch.no_grad():
        model.act.weight.fill_(200.0)
    with pytest.raises(InvalidParameterError, match=r"prelu at module 'act'.*slope magnitude 200"):
        qp.prepare_qat(model, (torch.randn(2, 3, 5, 5),), target="exact")
    prepared = qp.prepare_qat(ConvPReLU(1), (torch.randn(2, 3, 5, 5),), target="exact")
    with torch.no_grad():
        prepared.slopes[next(iter(prepared.slopes))].module.weight.fill_(200.0)
    with pytest.raises(InvalidParameterError, match=r"prelu at module 'act'.*slope magnitude 200"):
        prepared(torch.randn(2, 3, 5, 5))


def test_onnxruntime_refuses_prelu_at_prepare_naming_the_module_and_the_targets_that_run_it():
    with pytest.raises(UnsupportedOpError, match=rf"prelu at module 'act' cannot run on target 'onnxruntime'.*"
                                                 rf"targets that run it: {', '.join(RUNS)}$"):
        qp.prepare_qat(ConvPReLU(4), (torch.randn(2, 3, 5, 5),), target="onnxruntime")


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_to_torch_runs_prelu_in_pytorchs_engine(engine):
    torch.backends.quantized.engine = engine
    _, integer, x = convert_prelu(engine, 4, True, 1, 1.0)
    assert torch.equal(qp.to_torch(integer)(x), integer(x))
