"""amax over dims: the maximum of the codes on the input's grid, exact on every target, in the real runtimes
(REDUCE_MAX, ReduceMax) and in PyTorch's engines (quantized max over one dim at a time). Adaptive average pools
whose output size does not divide the input: exact in PyTorch's engines, refused where the runtime has no kernel."""
import re

import pytest
import torch
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError
from qparity.numerics import get_target, pooling
from qparity.ops.registry import OPERATORS


class Maxima(nn.Module):
    """amax as a function and a method, over one dim and several, kept and dropped."""

    def __init__(self, dims, keepdim):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.dims, self.keepdim = dims, keepdim

    def forward(self, x):
        y = self.conv(x)
        return torch.amax(y, self.dims, keepdim=self.keepdim), y.amax(-1)


@pytest.mark.parametrize("target", qp.TARGETS)
@settings(max_examples=2, deadline=None)
@given(dims=st.sampled_from([(1,), (2, 3), (1, 3), (1, 2, 3)]), keepdim=st.booleans(), seed=st.integers(0, 1000))
def test_amax_is_exact_in_the_integer_model_and_every_runtime(tmp_path_factory, target, dims, keepdim, seed):
    torch.manual_seed(seed)
    inputs = (torch.randn(3, 3, 5, 6) * 2,)
    if target in OPERATORS["amax"].refused_by:
        with pytest.raises(UnsupportedOpError, match=f"cannot run on target '{target}'"):
            qp.prepare_qat(Maxima(dims, keepdim), inputs, target=target)
        return
    prepared = qp.prepare_qat(Maxima(dims, keepdim), inputs, target=target)
    qp.calibrate(prepared, [inputs])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    for fake, deployed in zip(prepared.eval()(*inputs), integer(*inputs)):
        assert torch.equal(fake, deployed)
    if target in FILE_SUFFIXES:
        assert_runtime_gives_the_same_codes(integer, inputs, tmp_path_factory.mktemp("amax"))
    elif target in ("fbgemm", "x86", "qnnpack"):
        torch.backends.quantized.engine = target
        for runtime, deployed in zip(qp.to_torch(integer)(*inputs), integer(*inputs)):
            assert torch.equal(runtime, deployed)


def test_amax_over_the_batch_dimension_is_refused_by_name():
    class OverBatch(nn.Module):
        def forward(self, x):
            return torch.amax(x, 0)

    with pytest.raises(UnsupportedOpError, match=r"amax over dims \(0,\), which include the batch dimension"):
        qp.prepare_qat(OverBatch(), (torch.randn(2, 3, 4),))


class UnevenPools(nn.Module):
    """Adaptive average pools (2-D module and function, 1-D) whose output sizes do not divide the input."""

    def __init__(self, size):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(size)
        self.size = size

    def forward(self, x):
        y = self.conv(x)
        return self.pool(y), F.adaptive_avg_pool2d(y.contiguous(), self.size), F.adaptive_avg_pool1d(y.flatten(2), 5)


@pytest.mark.parametrize("target", qp.TARGETS)
@settings(max_examples=2, deadline=None)
@given(size=st.sampled_from([(3, 4), (5, 5), (4, 7), (2, 3)]), seed=st.integers(0, 1000))
def test_adaptive_average_pools_with_uneven_windows_are_exact_or_refused_at_prepare(target, size, seed):
    torch.manual_seed(seed)
    inputs = (torch.randn(3, 3, 7, 9) * 2,)
    if not get_target(target).uneven_adaptive_pool:
        with pytest.raises(UnsupportedOpError, match=rf"at module 'pool': adaptive_avg_pool2d to {re.escape(str(size))} cannot run on "
                                                     rf"target '{target}'.*targets that run it: exact, fbgemm"):
            qp.prepare_qat(UnevenPools(size), inputs, target=target)
        return
    prepared = qp.prepare_qat(UnevenPools(size), inputs, target=target)
    qp.calibrate(prepared, [inputs])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    for fake, deployed in zip(prepared.eval()(*inputs), integer(*inputs)):
        assert torch.equal(fake, deployed)
    if target != "exact":
        torch.backends.quantized.engine = target
        for runtime, deployed in zip(qp.to_torch(integer)(*inputs), integer(*inputs)):
            assert torch.equal(runtime, deployed)


def test_uneven_windows_follow_pytorchs_start_and_end_rule():
    codes = torch.randint(-100, 100, (2, 3, 7, 9))
    sums, counts = pooling.uneven_sums_and_counts(codes, (3, 4))
    for i in range(3):
        for j in range(4):  # AdaptivePooling.h: start = floor(o * in / out), end = ceil((o + 1) * in / out)
            rows = slice(i * 7 // 3, -(-(i + 1) * 7 // 3))
            columns = slice(j * 9 // 4, -(-(j + 1) * 9 // 4))
            window = codes[:, :, rows, columns]
            assert torch.equal(sums[:, :, i, j].to(torch.int64), window.sum((2, 3)))
            assert counts[0, 0, i, j] == window.shape[2] * window.shape[3]
