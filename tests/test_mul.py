"""mul of two tensors (broadcasting; squeeze-excite's x * gate; SiLU = x * sigmoid(x)): fake == integer on
every target, the exported file's runtime gives the same codes, and PyTorch's engines compute the same."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from qparity.errors import UnsupportedOpError
from qparity.numerics import get_target
from qparity.qparams import QParams

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
SHAPES = [((2, 3, 4, 5), (2, 3, 4, 5)), ((2, 3, 4, 5), (2, 3, 1, 1)), ((2, 3, 1, 1), (2, 3, 4, 5)),
          ((4, 7), (4, 1)), ((4, 7), (4, 7))]


class TwoBranchMul(nn.Module):
    """Two convs (or linears) on one input, multiplied: each operand has a grid of its own."""

    def __init__(self, shape_a, shape_b):
        super().__init__()
        self.spatial = len(shape_a) == 4
        channels = shape_a[1]
        self.a = nn.Conv2d(channels, channels, 1) if self.spatial else nn.Linear(shape_a[1], shape_a[1])
        self.b = nn.Conv2d(channels, channels, 1) if self.spatial else nn.Linear(shape_a[1], shape_a[1])
        self.pool_a = nn.AdaptiveAvgPool2d(1) if self.spatial and shape_a[2] == 1 else nn.Identity()
        self.pool_b = nn.AdaptiveAvgPool2d(1) if self.spatial and shape_b[2] == 1 else nn.Identity()
        self.narrow_b = (not self.spatial) and shape_b[1] == 1

    def forward(self, x):
        a, b = self.pool_a(self.a(x)), self.pool_b(self.b(x))
        if self.narrow_b:
            b = b[:, :1]
        return a * b


def convert(target, shapes, seed):
    torch.manual_seed(seed)
    shape_a, _ = shapes
    x = torch.randn(*shape_a) * float(np.random.default_rng(seed).uniform(0.3, 5))
    prepared = qp.prepare_qat(TwoBranchMul(*shapes), (x,), target=target)
    qp.calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    return prepared, qp.convert(prepared), x


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("shapes", SHAPES)
@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_mul_fake_equals_integer(target, shapes, seed):
    try:
        prepared, integer, x = convert(target, shapes, seed)
    except UnsupportedOpError as error:  # grids where LiteRT leaves XNNPACK: named, never silent
        assert target == "xnnpack" and "XNNPACK delegate takes MUL only" in str(error)
        assert str(error).startswith("mul at node 'mul'")  # where, although only the grids could tell
        return
    assert torch.equal(prepared.eval()(x), integer(x))


@pytest.mark.parametrize("target", list(FILE_SUFFIXES))
@pytest.mark.parametrize("shapes", SHAPES)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_exported_mul_gives_the_integer_models_codes_in_the_real_runtime(tmp_path_factory, target, shapes, seed):
    try:
        _, integer, x = convert(target, shapes, seed)
    except UnsupportedOpError:
        return
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("mul"))


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), broadcast=st.booleans(), relu=st.booleans())
def test_engine_multiply_matches_quantized_mul(engine, seed, broadcast, relu):
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    grids = [QParams(float(np.float32(10 ** rng.uniform(-3, 0))), int(rng.integers(0, 256)), "uint8") for _ in range(3)]
    qa = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 4, 5)))
    qb = torch.from_numpy(rng.integers(0, 256, size=(2, 3, 1, 1) if broadcast else (2, 3, 4, 5)))

    def quint8(codes, grid):
        return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), float(grid.scale), int(grid.zero_point))

    op = torch.ops.quantized.mul_relu if relu else torch.ops.quantized.mul
    expected = op(quint8(qa, grids[0]), quint8(qb, grids[1]), float(grids[2].scale), int(grids[2].zero_point))
    target = get_target(engine)
    lo, hi = target.activation_bounds(0.0 if relu else None, None, grids[2])
    ours = target.multiply(qa, grids[0], qb, grids[1], grids[2], lo, hi)
    assert torch.equal(ours, expected.int_repr().to(torch.int64))


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_to_torch_runs_mul_in_pytorchs_engine(engine):
    torch.backends.quantized.engine = engine
    prepared, integer, x = convert(engine, SHAPES[1], 0)
    assert torch.equal(qp.to_torch(integer)(x), integer(x))


def test_silu_is_a_sigmoid_then_a_mul():
    x = torch.randn(8, 6)
    prepared = qp.prepare_qat(nn.Sequential(nn.Linear(6, 6), nn.SiLU()), (x,), target="tflite")
    assert [n.op for n in prepared.graph.nodes] == ["input", "linear", "sigmoid", "mul"]
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    assert torch.equal(prepared.eval()(x), qp.convert(prepared)(x))


def test_mul_by_a_number_becomes_a_constant_operand():
    class Scale(nn.Module):
        def forward(self, x):
            return x * 3.0

    prepared = qp.prepare_qat(Scale(), (torch.randn(2, 3),), target="tflite")
    assert [n.op for n in prepared.graph.nodes] == ["input", "constant", "mul"]