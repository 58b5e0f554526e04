"""A graph fuzzer: random networks assembled from the operators qparity supports, on every target.

Each example draws a chain of blocks (convs with groups and BatchNorm, activations, residual adds,
squeeze-excite muls, concatenations, numbers (x * c + d), pools, upsampling, transposed convs, padding), a target and an activation dtype, then
checks the whole promise: the target accepts the network exactly when the registry says every operator in it
runs there; the fake-quant forward equals the integer program; a saved and reloaded model computes the same
codes; and where the target has a file format, the file either runs in the real runtime with 0 mismatched
codes or is refused by the exporter because the registry says that format cannot express an operator in it.

CI runs a bounded number of examples; `QPARITY_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz_graphs.py` fuzzes
longer.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings, strategies as st
from torch import nn

import qparity as qp
from qparity.errors import ExportError, UnsupportedOpError
from qparity.numerics import get_target
from qparity.ops.registry import OPERATORS
from helpers import FILE_SUFFIXES, calibrate
from op_models import random_batches
from test_fake_equals_integer import DOCUMENTED_REFUSALS

EXAMPLES = int(os.environ.get("QPARITY_FUZZ_EXAMPLES", "30"))
ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid,
               "tanh": nn.Tanh, "hardsigmoid": nn.Hardsigmoid, "leaky_relu": lambda: nn.LeakyReLU(0.1),
               "gelu": nn.GELU, "elu": nn.ELU, "prelu": nn.PReLU}
# The registry operators each activation becomes (ReLU and ReLU6 are clamps, fused or not).
ACTIVATION_OPS = {"relu": "clamp", "relu6": "clamp", "leaky_relu": "leaky_relu"}


class Block(nn.Module):
    """One step of the fuzzed network; `ops` lists the registry operators it captures to."""

    def __init__(self, kind: str, channels: int, option):
        super().__init__()
        self.kind, self.option = kind, option
        self.out_channels = channels
        if kind == "conv":
            k, groups, out, bn = option
            self.conv = nn.Conv2d(channels, out, k, padding=k // 2, groups=groups)
            self.bn = nn.BatchNorm2d(out) if bn else nn.Identity()
            self.out_channels = out
            self.ops = {"conv2d"}
        elif kind == "conv_transpose":
            k, out = option  # stride 2: k=2, or k=3 with padding 1 and output_padding 1, doubles H and W
            self.conv = nn.ConvTranspose2d(channels, out, k, stride=2, padding=k - 2, output_padding=k - 2)
            self.out_channels = out
            self.ops = {"conv_transpose2d"}
        elif kind == "activation":
            self.act = ACTIVATIONS[option]()
            self.ops = {ACTIVATION_OPS.get(option, option)}
        elif kind == "residual":
            self.conv = nn.Conv2d(channels, channels, 1)
            self.ops = {"conv2d", "add"}
        elif kind == "squeeze_excite":
            self.conv = nn.Conv2d(channels, channels, 1)
            self.gate = ACTIVATIONS[option]()
            self.ops = {"avg_pool2d", "conv2d", option, "mul"}
        elif kind == "cat":
            self.conv = nn.Conv2d(channels, option, 1)
            self.out_channels = channels + option
            self.ops = {"conv2d", "cat"}
        elif kind == "numbers":
            self.ops = {"constant", "mul", "add"}
        elif kind == "max_pool":
            self.ops = {"max_pool2d"}
        elif kind == "avg_pool":
            self.ops = {"avg_pool2d"}
        elif kind == "upsample":
            self.ops = {"upsample_nearest"}
        elif kind == "pad":
            self.ops = {"pad"}

    def forward(self, x):
        kind = self.kind
        if kind == "conv":
            return self.bn(self.conv(x))
        if kind == "conv_transpose":
            return self.conv(x)
        if kind == "activation":
            return self.act(x)
        if kind == "residual":
            return x + self.conv(x)
        if kind == "squeeze_excite":
            return x * self.gate(self.conv(x.mean((2, 3), keepdim=True)))
        if kind == "cat":
            return torch.cat([x, self.conv(x)], 1)
        if kind == "numbers":
            scale, shift = self.option
            return x * scale + shift
        if kind == "max_pool":
            return F.max_pool2d(x, 2)
        if kind == "avg_pool":
            return F.avg_pool2d(x, 2)
        if kind == "upsample":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.pad(x, (1, 1, 1, 1))


class FuzzedNet(nn.Module):
    def __init__(self, channels: int, blocks, classes: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(2, channels, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(blocks[-1].out_channels if blocks else channels, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))

    def operators(self):
        ops = {"input", "conv2d", "avg_pool2d", "linear"}
        for block in self.blocks:
            ops |= block.ops
        return ops


@st.composite
def networks(draw):
    channels = draw(st.integers(2, 6))
    size = draw(st.sampled_from([4, 6, 8]))
    blocks, c, s = [], channels, size
    for _ in range(draw(st.integers(1, 5))):
        kinds = ["conv", "activation", "residual", "squeeze_excite", "cat", "pad", "numbers"]
        kinds += ["max_pool", "avg_pool"] if s >= 4 else []
        kinds += ["upsample", "conv_transpose"] if s <= 8 else []
        kind = draw(st.sampled_from(kinds))
        if kind == "conv":
            groups = draw(st.sampled_from([g for g in (1, 2, c) if c % g == 0]))
            out = groups * draw(st.integers(1, max(1, 8 // groups)))
            option = (draw(st.sampled_from([1, 3])), groups, out, draw(st.booleans()))
        elif kind == "conv_transpose":
            option = (draw(st.sampled_from([2, 3])), draw(st.integers(1, 6)))
        elif kind == "activation":
            option = draw(st.sampled_from(sorted(ACTIVATIONS)))
        elif kind == "squeeze_excite":
            option = draw(st.sampled_from(["sigmoid", "hardsigmoid"]))
        elif kind == "cat":
            option = draw(st.integers(1, 4))
        elif kind == "numbers":
            option = (draw(st.sampled_from([0.5, 2.0, -1.0, 1 / 6, 3.0])), draw(st.sampled_from([1.0, -0.5, 3.0])))
        else:
            option = None
        block = Block(kind, c, option)
        blocks.append(block)
        c = block.out_channels
        s = {"max_pool": s // 2, "avg_pool": s // 2, "upsample": s * 2, "conv_transpose": s * 2, "pad": s + 2}.get(kind, s)
    return FuzzedNet(channels, blocks), size


def refused_operators(net: FuzzedNet, target: str):
    return sorted(op for op in net.operators() if target in OPERATORS[op].refused_by)


def file_format_lacks(net: FuzzedNet, suffix: str):
    return sorted(op for op in net.operators() if suffix.lstrip(".") not in OPERATORS[op].formats)


@settings(max_examples=EXAMPLES, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks(), st.sampled_from(qp.TARGETS), st.integers(0, 10**6), st.data())
def test_random_networks_are_exact_everywhere(tmp_path_factory, network, target, seed, data):
    torch.manual_seed(seed)
    net, size = network
    dtype = data.draw(st.sampled_from(get_target(target).activation_dtypes))
    batches = random_batches(seed, (4, 2, size, size))
    refused = refused_operators(net, target)
    if refused:
        with pytest.raises(UnsupportedOpError) as error:
            qp.prepare_qat(net, (batches[0],), target=target, activation_dtype=dtype)
        # The first refusal met in graph order: a refused operator, or a documented per-configuration refusal
        # of a layer before it (e.g. tosa's grouped conv ahead of its conv_transpose2d).
        named = any(op.replace("_", "") in str(error.value).replace("_", "").lower() for op in refused)
        assert named or any(target == t and phrase in str(error.value) for t, phrase in DOCUMENTED_REFUSALS), error.value
        event("refused at prepare_qat, as the registry says")
        return
    try:
        prepared = qp.prepare_qat(net, (batches[0],), target=target, activation_dtype=dtype)
        calibrate(prepared, batches, lr=0.01)
        qp.freeze(prepared)
        integer = qp.convert(prepared)
    except UnsupportedOpError as error:
        assert any(target == t and phrase in str(error) for t, phrase in DOCUMENTED_REFUSALS), error
        event("a documented per-configuration refusal")
        return
    test = random_batches(seed + 1, (3, 2, size, size), count=1)[0]
    fake = prepared.eval()(test)
    codes = integer(test)
    assert torch.equal(fake, codes), f"{int((fake != codes).sum())} of {codes.numel()} codes differ"

    directory = tmp_path_factory.mktemp("fuzz")
    integer.save(directory / "model.qp")
    assert torch.equal(qp.load(directory / "model.qp")(test), codes)

    suffix = FILE_SUFFIXES.get(target)
    if suffix is None or dtype != "int8" and suffix == ".tflite":
        event("fake == integer == reloaded")
        return
    path = directory / ("model" + suffix)
    lacking = file_format_lacks(net, suffix)
    if lacking:
        with pytest.raises((ExportError, UnsupportedOpError)):
            qp.export(integer, path)
        event("export refused, as the registry says")
        return
    qp.export(integer, path)
    report = qp.verify(integer, path, test)
    assert report.ok and report.mismatched == 0, str(report)
    event("fake == integer == reloaded == runtime")
