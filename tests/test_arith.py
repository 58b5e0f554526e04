"""add with broadcasting ([N, C, H, W] + [N, C, 1, 1], position embeddings [N, T, D] + [1, T, D]) and sub: fake ==
integer on every target that runs them, the exported file's runtime gives the same codes, refusals by name."""
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
from qparity.numerics.onnxruntime import swaps_operands

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
BROADCASTS = ["pool_b", "pool_a", "first_row_b", "first_row_a", "same"]
ENGINES = ("fbgemm", "x86", "qnnpack")


class TwoBranch(nn.Module):
    """Two convs (or linears on [N, T, D]) on one input, combined by `op`; one operand narrowed to broadcast."""

    def __init__(self, op, broadcast, spatial):
        super().__init__()
        self.op, self.broadcast, self.spatial = op, broadcast, spatial
        self.a = nn.Conv2d(3, 3, 1) if spatial else nn.Linear(5, 5)
        self.b = nn.Conv2d(3, 3, 1) if spatial else nn.Linear(5, 5)

    def narrow(self, t, which):
        if self.broadcast == "pool_" + which:
            return t.mean((2, 3), keepdim=True) if self.spatial else t[:, :1]  # [N, C, 1, 1] or [N, 1, D]
        if self.broadcast == "first_row_" + which:
            return t[:1]  # [1, ...]: a position-embedding-style operand
        return t

    def forward(self, x):
        a, b = self.narrow(self.a(x), "a"), self.narrow(self.b(x), "b")
        return a + b if self.op == "add" else a - b


def convert(target, op, broadcast, spatial, seed):
    torch.manual_seed(seed)
    x = torch.randn(*((2, 3, 4, 5) if spatial else (3, 4, 5))) * float(np.random.default_rng(seed).uniform(0.3, 5))
    prepared = qp.prepare_qat(TwoBranch(op, broadcast, spatial), (x,), target=target)
    qp.calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    return prepared, qp.convert(prepared), x


def runs(target, op, broadcast):
    if op == "sub":
        return target not in ENGINES
    return broadcast == "same" or target not in ENGINES


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("op", ["add", "sub"])
@pytest.mark.parametrize("broadcast", BROADCASTS)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31), spatial=st.booleans())
def test_fake_equals_integer(target, op, broadcast, spatial, seed):
    if not runs(target, op, broadcast):
        with pytest.raises(UnsupportedOpError, match=rf"^{op} at .*(?i:targets that run it)"):
            convert(target, op, broadcast, spatial, seed)
        return
    try:
        prepared, integer, x = convert(target, op, broadcast, spatial, seed)
    except UnsupportedOpError as error:  # grids where LiteRT leaves XNNPACK: named, never silent
        assert target in ("xnnpack", "executorch-xnnpack") and "XNNPACK takes ratios" in str(error)
        return
    assert torch.equal(prepared.eval()(x), integer(x))


@pytest.mark.parametrize("target", list(FILE_SUFFIXES))
@pytest.mark.parametrize("op", ["add", "sub"])
@pytest.mark.parametrize("broadcast", ["pool_b", "pool_a", "same"])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31), spatial=st.booleans())
def test_exported_model_gives_the_same_codes_in_the_real_runtime(tmp_path_factory, target, op, broadcast, spatial,
                                                                  seed):
    if not runs(target, op, broadcast):
        return
    try:
        _, integer, x = convert(target, op, broadcast, spatial, seed)
    except UnsupportedOpError:
        return
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp(op))


def test_broadcast_add_is_refused_on_pytorchs_engines_by_name():
    for engine in ENGINES:
        with pytest.raises(UnsupportedOpError, match=r"^add at .*broadcast.*TensorIterator"):
            convert(engine, "add", "pool_b", True, 0)


def test_sub_refusals_name_the_targets_that_run_it():
    for target in ENGINES:
        with pytest.raises(UnsupportedOpError, match="targets that run it: exact, tflite, onnxruntime, xnnpack"):
            convert(target, "sub", "same", True, 0)


def test_onnxruntime_swaps_the_operands_where_a_is_one_element_per_span():
    assert swaps_operands((2, 3, 1, 1), (2, 3, 4, 5)) and not swaps_operands((2, 3, 4, 5), (2, 3, 1, 1))
    assert not swaps_operands((1, 4, 5), (3, 4, 5)) and swaps_operands((1,), (1,))
    assert swaps_operands((2, 1), (2, 7)) and not swaps_operands((3, 1, 5), (3, 4, 1))


@pytest.mark.parametrize("target", ["exact", "tflite", "xnnpack"])
def test_sub_is_add_of_the_negated_codes_on_a_symmetric_grid(target):
    # On a grid with zero point 0 and a code range symmetric about it, a - b equals a + (-b) exactly.
    from qparity.qparams import QParams
    g = QParams(0.05, 0, "int8")
    qa, qb = torch.arange(-127, 128).repeat_interleave(255), torch.arange(-127, 128).repeat(255)
    t, out = get_target(target), QParams(0.09, 3, "int8")
    assert torch.equal(t.subtract(qa, g, qb, g, out, -128, 127), t.add(qa, g, -qb, g, out, -128, 127))
