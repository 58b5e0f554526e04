"""mean over any dimensions but the batch (token mean pooling, LayerNorm's statistics): fake == integer on the
targets that run it, LiteRT's reference MEAN gives the same codes, and the other targets refuse it at prepare_qat."""
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import assert_runtime_gives_the_same_codes
from qparity.errors import UnsupportedOpError
from qparity.ops.registry import OPERATORS

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
CASES = [((2, 7, 6), (1,), False), ((2, 5, 3, 6), (1, 2), False), ((2, 3, 4, 5), (1,), True),
         ((2, 50, 4), (-2,), False)]


class LinearThenMean(nn.Module):
    def __init__(self, features, dims, keepdim):
        super().__init__()
        self.fc = nn.Linear(features, features)
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        return torch.mean(self.fc(x), self.dims, keepdim=self.keepdim)


def convert(target, case, seed):
    shape, dims, keepdim = case
    torch.manual_seed(seed)
    x = torch.randn(*shape) * float(np.random.default_rng(seed).uniform(0.3, 5))
    prepared = qp.prepare_qat(LinearThenMean(shape[-1], dims, keepdim), (x,), target=target)
    qp.calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    return prepared, qp.convert(prepared), x


@pytest.mark.parametrize("target", OPERATORS["mean"].targets())
@pytest.mark.parametrize("case", CASES)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_mean_fake_equals_integer(target, case, seed):
    prepared, integer, x = convert(target, case, seed)
    assert [n.op for n in prepared.graph.nodes] == ["input", "linear", "mean"]
    assert torch.equal(prepared.eval()(x), integer(x))


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_exported_mean_gives_the_integer_models_codes_in_litert(tmp_path_factory, case, seed):
    _, integer, x = convert("tflite", case, seed)
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("mean"))


@settings(max_examples=80, deadline=None)
@given(count=st.integers(1, 5000), sums=st.lists(st.integers(-128 * 5000, 128 * 5000), min_size=1, max_size=8),
       ratio=st.floats(2**-12, 2**8))
def test_exact_mean_is_the_correctly_rounded_quotient(count, sums, ratio):
    from fractions import Fraction

    from qparity.numerics import get_target
    from qparity.qparams import QParams

    source, out = QParams(float(np.float32(ratio)) * 0.01, 3, "int8"), QParams(0.01, -5, "int8")
    sums = [max(-255 * count, min(255 * count, s)) for s in sums]
    # codes whose centered sums are `sums`: one column of `count` codes per sum
    codes = torch.full((len(sums), count), 3, dtype=torch.int64)
    for i, s in enumerate(sums):
        step, rest = divmod(abs(s), count)
        column = torch.full((count,), step, dtype=torch.int64)
        column[:rest] += 1
        codes[i] = 3 + (column if s >= 0 else -column)
    codes = codes.clamp(-128, 127)
    centered = (codes - 3).sum(1)
    ours = get_target("exact").mean(codes, source, out, (1,), False)
    exact = Fraction(float(source.scale)) / (count * Fraction(float(out.scale)))
    expected = [min(127, max(-128, -5 + round(int(s) * exact))) for s in centered]
    assert ours.tolist() == expected


@pytest.mark.parametrize("target", sorted(OPERATORS["mean"].refused_by))
def test_mean_is_refused_at_prepare_naming_the_targets_that_run_it(target):
    runs = ", ".join(OPERATORS["mean"].targets())
    with pytest.raises(UnsupportedOpError, match=rf"mean at node 'mean' .*cannot run on target '{target}'.*"
                                                 rf"targets that run it: {runs}"):
        qp.prepare_qat(LinearThenMean(6, (1,), False), (torch.randn(2, 7, 6),), target=target)


def test_a_mean_over_the_batch_is_refused_at_capture():
    with pytest.raises(UnsupportedOpError, match="include the batch dimension"):
        qp.prepare_qat(LinearThenMean(6, (0, 1), False), (torch.randn(2, 7, 6),), target="tflite")


class ConvThenMean(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.conv, self.dims = nn.Conv2d(3, 4, 3, padding=1), dims

    def forward(self, x):
        return self.conv(x).mean(self.dims)


@pytest.mark.parametrize("dims", [(1,), (2,)])
def test_mean_of_a_tensor_stored_channels_last_reduces_the_right_axes_in_litert(tmp_path, dims):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6)
    prepared = qp.prepare_qat(ConvThenMean(dims), (x,), target="tflite")
    qp.calibrate(prepared, [x])
    integer = qp.convert(qp.freeze(prepared))
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)
