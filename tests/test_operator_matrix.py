"""Every (operator, target) pair of the registry, checked end to end against what the registry declares.

For each operator there is one small model that captures to it (EXAMPLES; a test fails when an operator is
registered without one). For each target the pair either is refused at prepare_qat, naming the module and the
targets that run it, exactly when the registry says so, or runs with: fake forward == integer program,
the same codes after save and load, the same codes in PyTorch's own engine through `to_torch` where the
registry gives a torch form, and 0 mismatched codes in the real runtime where the registry gives the target's
file format.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError
from qparity.numerics import TARGETS, get_target
from qparity.ops.registry import CAPTURED_OPS, OPERATORS
from helpers import FILE_SUFFIXES, OPTIONAL_RUNTIMES, calibrate, require_optional_runtime

ENGINES = ("fbgemm", "x86", "qnnpack")
# Random qparams and inputs per pair and run; QPARITY_MATRIX_EXAMPLES=20 explores longer.
EXAMPLES_PER_PAIR = int(os.environ.get("QPARITY_MATRIX_EXAMPLES", "1"))


class Around(nn.Module):
    """conv -> op (unary) or two convs -> op (binary): the operator sees inputs on grids of their own."""

    def __init__(self, op, binary=False, channels=4):
        super().__init__()
        self.left = nn.Conv2d(3, channels, 3, padding=1)
        self.right = nn.Conv2d(3, channels, 1) if binary else None
        self.op = op

    def forward(self, x):
        if self.right is None:
            return self.op(self.left(x))
        return self.op(self.left(x), self.right(x))


class Apply(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


class Unfused(nn.Module):
    """A clamp that cannot be fused into the layer before it (the layer has another user)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU6()

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([self.act(y), y], 1)


class LinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class Gain(nn.Module):
    """A learned per-channel gain: a parameter tensor times the activations."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, y):
        return y * self.gain


# operator -> (model factory, the module path a refusal names)
EXAMPLES = {
    "input": (lambda: Around(nn.Identity()), "left"),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, groups=1), nn.BatchNorm2d(4)), "0"),
    "conv_transpose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1),
                                               nn.BatchNorm2d(4)), "0"),
    "linear": (LinearHead, "fc"),
    "add": (lambda: Around(Apply(torch.add), binary=True), "op"),
    "mul": (lambda: Around(Apply(torch.mul), binary=True), "op"),
    "sub": (lambda: Around(Apply(torch.sub), binary=True), "op"),
    "constant": (lambda: Around(Apply(lambda y: y * 0.5 + 1.0)), "op"),
    "cat": (lambda: Around(Apply(lambda a, b: torch.cat([a, b], 1)), binary=True), "op"),
    "hardswish": (lambda: Around(nn.Hardswish()), "op"),
    "sigmoid": (lambda: Around(nn.Sigmoid()), "op"),
    "tanh": (lambda: Around(nn.Tanh()), "op"),
    "hardsigmoid": (lambda: Around(nn.Hardsigmoid()), "op"),
    "leaky_relu": (lambda: Around(nn.LeakyReLU(0.125)), "op"),
    "gelu": (lambda: Around(nn.GELU()), "op"),
    "elu": (lambda: Around(nn.ELU()), "op"),
    "prelu": (lambda: Around(nn.PReLU(4, 0.2)), "op"),
    "clamp": (Unfused, "act"),
    "max_pool2d": (lambda: Around(nn.MaxPool2d(2)), "op"),
    "avg_pool2d": (lambda: Around(nn.AvgPool2d(2)), "op"),
    "upsample_nearest": (lambda: Around(nn.Upsample(scale_factor=2, mode="nearest")), "op"),
    "upsample_bilinear": (lambda: Around(Apply(lambda y: F.interpolate(y, size=(9, 5), mode="bilinear"))), "op"),
    "amax": (lambda: Around(Apply(lambda y: torch.amax(y, (1, 3), keepdim=True))), "op"),
    "pad": (lambda: Around(nn.ZeroPad2d(1)), "op"),
    "dropout": (lambda: Around(nn.Dropout(0.25)), "op"),
    "call": (lambda: Around(Apply(lambda y: y.permute(0, 2, 3, 1))), "op"),
    "mean": (lambda: Around(Apply(lambda y: y.mean(1))), "op"),
    "rsqrt": (lambda: Around(Apply(lambda y: torch.rsqrt(F.relu(y)))), "op"),  # the ReLU fuses into the conv
    "parameter": (lambda: Around(Gain()), "op"),
    "matmul": (lambda: Around(Apply(lambda a, b: a @ b.transpose(-2, -1)), binary=True), "op"),
    "softmax": (lambda: Around(nn.Softmax(dim=-1)), "op"),
}


# Where a target runs an operator only within a restriction (the registry's restrictions column), its example
# stays inside it: ExecuTorch's XNNPACK delegate runs integer average pools only over the whole image.
EXAMPLES_WITHIN_RESTRICTIONS = {
    ("avg_pool2d", "executorch-xnnpack"): (lambda: Around(nn.AdaptiveAvgPool2d(1)), "op"),
}


def test_every_registered_operator_has_an_example_here():
    """Except those only from_torch of a convert_pt2e graph writes (tests/test_from_torch_pt2e.py)."""
    assert set(EXAMPLES) == set(CAPTURED_OPS)


def ops_captured(model, x):
    prepared = qp.prepare_qat(model, (x,), target="exact")
    return {node.op for node in prepared.graph.nodes}


@pytest.mark.parametrize("op", sorted(CAPTURED_OPS))
def test_each_example_captures_to_its_operator(op):
    make, _ = EXAMPLES[op]
    assert op in ops_captured(make(), torch.randn(2, 3, 6, 6))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", sorted(CAPTURED_OPS))
@settings(max_examples=EXAMPLES_PER_PAIR, deadline=None)
@given(seed=st.integers(0, 10**6), spread=st.floats(0.1, 8))
def test_operator_on_target_runs_exactly_or_is_refused_as_registered(tmp_path_factory, op, target, seed, spread):
    torch.manual_seed(seed)
    make, where = EXAMPLES_WITHIN_RESTRICTIONS.get((op, target), EXAMPLES[op])
    x = torch.randn(4, 3, 6, 6) * spread
    entry = OPERATORS[op]
    if target in entry.refused_by:
        runs = ", ".join(entry.targets())
        with pytest.raises(UnsupportedOpError, match=rf"module '{where}' cannot run on target '{target}'"
                                                     rf".*targets that run it: {runs}"):
            qp.prepare_qat(make(), (x,), target=target)
        return
    dtype = get_target(target).activation_dtypes[0]
    prepared = qp.prepare_qat(make(), (x,), target=target, activation_dtype=dtype)
    calibrate(prepared, [x, x * 0.7 + 0.3], lr=0.01)
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    test = torch.randn(3, 3, 6, 6) * spread
    outputs = integer(test)
    assert torch.equal(prepared.eval()(test), outputs)

    directory = tmp_path_factory.mktemp(f"{op}-{target}")
    integer.save(directory / "model.qp")
    assert torch.equal(qp.load(directory / "model.qp")(test), outputs)

    if target in ENGINES and entry.torch_form is not None:
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = target
        try:
            assert torch.equal(qp.to_torch(integer)(test), outputs)
        finally:
            torch.backends.quantized.engine = previous
    suffix = FILE_SUFFIXES.get(target)
    if suffix is not None and suffix.lstrip(".") in entry.formats:
        if suffix in OPTIONAL_RUNTIMES:
            require_optional_runtime(*OPTIONAL_RUNTIMES[suffix])
        qp.export(integer, directory / f"model{suffix}")
        report = qp.verify(integer, directory / f"model{suffix}", test)
        assert report.ok and report.mismatched == 0, str(report)
