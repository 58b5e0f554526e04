"""A parameter of the model added to or multiplied with activations (a position embedding, a learned gain) is a
tensor of codes on a grid of its own: it learns through QAT, fake == integer, and the exported file holds its codes."""
import warnings

import pytest
import torch
from torch import nn

import qparity as qp
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from qparity.errors import UnsupportedOpError

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")


class Embedded(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.position = nn.Parameter(torch.randn(5, 6))
        self.gain = nn.Parameter(torch.rand(6) + 0.5)

    def forward(self, x):
        return (self.fc(x) + self.position) * self.gain


@pytest.mark.parametrize("target", qp.TARGETS)
def test_parameters_learn_and_run_bit_exactly(tmp_path, target):
    torch.manual_seed(0)
    x = torch.randn(4, 5, 6)
    try:
        prepared = qp.prepare_qat(Embedded(), (x,), target=target)
    except UnsupportedOpError as error:  # broadcasting add/mul where the target's kernel has none: named
        assert "broadcast" in str(error) or "cannot run on target" in str(error), str(error)
        return
    assert [n.op for n in prepared.graph.nodes] == ["input", "linear", "parameter", "add", "parameter", "mul"]
    prepared(x).sum().backward()
    assert all(t.weight.grad is not None for t in prepared.tensors.values())
    qp.calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    if target in FILE_SUFFIXES:
        try:
            assert_runtime_gives_the_same_codes(integer, x, tmp_path)
        except UnsupportedOpError as error:  # xnnpack: a ratio outside the range LiteRT's delegate takes
            assert target == "xnnpack", str(error)
