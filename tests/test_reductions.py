"""amax over dims: the maximum of the codes on the input's grid, exact on every target, in the real runtimes
(REDUCE_MAX, ReduceMax) and in PyTorch's engines (quantized max over one dim at a time)."""
import pytest
import torch
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError


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
    prepared = qp.prepare_qat(Maxima(dims, keepdim), inputs, target=target)
    qp.calibrate(prepared, [inputs])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    for fake, deployed in zip(prepared.eval()(*inputs), integer(*inputs)):
        assert torch.equal(fake, deployed)
    if target in FILE_SUFFIXES:
        assert_runtime_gives_the_same_codes(integer, inputs, tmp_path_factory.mktemp("amax"))
    elif target != "exact":
        torch.backends.quantized.engine = target
        for runtime, deployed in zip(qp.to_torch(integer)(*inputs), integer(*inputs)):
            assert torch.equal(runtime, deployed)


def test_amax_over_the_batch_dimension_is_refused_by_name():
    class OverBatch(nn.Module):
        def forward(self, x):
            return torch.amax(x, 0)

    with pytest.raises(UnsupportedOpError, match=r"amax over dims \(0,\), which include the batch dimension"):
        qp.prepare_qat(OverBatch(), (torch.randn(2, 3, 4),))
