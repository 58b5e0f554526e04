"""Export to .tflite and run the file in LiteRT: 0 mismatched codes in the kernels the target follows.

Whole models and random single-op models (hypothesis) are trained a little, converted for target `tflite`
(reference kernels, BUILTIN_REF) or `xnnpack` (the default interpreter), exported, and run with LiteRT's
three kernel sets. The target's kernels must give exactly the integer model's codes, and so exactly
`im(x)` after DEQUANTIZE; the other kernel sets are reported, and their mismatch counts printed.
"""
import itertools
import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from helpers import prepare_and_convert, require_runtime
from op_models import Conv, Dense, MeanHW, Pool, random_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from models import CatMLP, ResNetish
from torch import nn

import qparity as qp
from qparity.errors import ExportError, UnsupportedOpError
from qparity.export import export
from qparity.export.tflite import AxisWindow, export_tflite, plan_padding, run_tflite
from qparity.numerics import pooling
from qparity.verify import verify

require_runtime("ai_edge_litert")

single_ops = settings(max_examples=20, deadline=None)


def export_and_verify(integer, inputs, directory, batch_size=1):
    """Export, verify, and check the reference kernels' float output equals im(x) bit for bit."""
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    path = os.path.join(directory, "model.tflite")
    export_tflite(integer, path, batch_size=batch_size)
    report = verify(integer, path, inputs)
    assert report.ok, str(report)
    binding_kernels = "BUILTIN_REF" if integer.target.name == "tflite" else "AUTO"
    reference = run_tflite(path, inputs, binding_kernels)
    expected = integer(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for runtime_output, model_output in zip(reference, expected):
        assert torch.equal(runtime_output, model_output)
    for r in report.results:
        if not r.binding:
            print(f"{r.runtime}, output {r.output}: {r.mismatched} of {r.total} codes differ")
    return report


def check_single_op(model, shape, seed, lr=0.01, per_channel=True):
    # Both .tflite targets, drawn from the seed: reference kernels (tflite) and default kernels (xnnpack).
    target = ("tflite", "xnnpack")[seed % 2]
    batches = random_batches(seed, shape)
    try:
        _, integer = prepare_and_convert(model, (batches[0],), target, batches, lr=lr, per_channel=per_channel)
    except UnsupportedOpError as error:  # xnnpack refuses scale ratios where LiteRT leaves XNNPACK
        assert target == "xnnpack" and "XNNPACK" in str(error), error
        return None
    x = random_batches(seed + 1, (5,) + tuple(shape[1:]), count=1)[0]
    with tempfile.TemporaryDirectory() as directory:
        return export_and_verify(integer, x, directory)


# ---------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------
def test_resnet_with_batchnorm_residual_adds_and_pooling_matches_reference_kernels(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 1, 12, 12, generator=g) * 1.5 for _ in range(4)]
    _, integer = prepare_and_convert(ResNetish(), (batches[0],), "tflite", batches, lr=0.02)
    x = torch.randn(16, 1, 12, 12, generator=g) * 1.5
    report = export_and_verify(integer, x, str(tmp_path))
    assert report.results[-1].total == 16 * 10


def test_mlp_with_cat_clamp_relu6_and_dropout_matches_reference_kernels(tmp_path):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(16, 20, generator=g) * 3 for _ in range(4)]
    _, integer = prepare_and_convert(CatMLP(), (batches[0],), "tflite", batches, lr=0.02)
    export_and_verify(integer, torch.randn(32, 20, generator=g) * 3, str(tmp_path))


def test_file_with_a_larger_batch_runs_inputs_in_chunks(tmp_path):
    torch.manual_seed(0)
    batches = [torch.randn(16, 20) * 3 for _ in range(3)]
    _, integer = prepare_and_convert(CatMLP(), (batches[0],), "tflite", batches)
    export_and_verify(integer, torch.randn(12, 20) * 3, str(tmp_path), batch_size=4)


# ---------------------------------------------------------------------------------------------------------
# Random single-op models
# ---------------------------------------------------------------------------------------------------------
activations = st.sampled_from([None, nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5), nn.Hardtanh(-1.0, 1.0)])


@single_ops
@given(st.data())
def test_random_conv_matches_reference_kernels(data):
    kind = data.draw(st.sampled_from(["plain", "grouped", "depthwise"]))
    groups = {"plain": 1, "grouped": data.draw(st.sampled_from([2, 3])), "depthwise": 1}[kind]
    cin = groups * data.draw(st.integers(1, 3))
    cout = groups * data.draw(st.integers(1, 3))
    if kind == "depthwise":
        groups, cout = cin, cin * data.draw(st.integers(1, 2))
    k = data.draw(st.integers(1, 3))
    dilation = data.draw(st.integers(1, 2))
    stride = data.draw(st.integers(1, 3))
    padding = data.draw(st.one_of(st.integers(0, 2), st.sampled_from(["same", "valid"]))) if stride == 1 \
        else data.draw(st.integers(0, 2))
    size = data.draw(st.integers(k * dilation + 1, 9))
    model = Conv(cin, cout, k, stride, padding, dilation, groups, data.draw(st.booleans()), data.draw(st.booleans()),
                 data.draw(activations))
    check_single_op(model, (4, cin, size, size), data.draw(st.integers(0, 10**6)),
                    per_channel=data.draw(st.booleans()))


@single_ops
@given(st.data())
def test_random_linear_matches_reference_kernels(data):
    features = data.draw(st.integers(1, 48))
    model = Dense(features, data.draw(st.integers(1, 16)), data.draw(st.booleans()), data.draw(activations))
    extra = data.draw(st.sampled_from([(), (3,)]))
    check_single_op(model, (4, *extra, features), data.draw(st.integers(0, 10**6)),
                    per_channel=data.draw(st.booleans()))


class TwoBranches(nn.Module):
    """Two convs on different grids, joined by add (+ activation) or cat (inputs rescaled to the output grid)."""

    def __init__(self, channels, join, act):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 1)
        self.join = join
        self.act = act

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.join == "add":
            y = a + b
        elif self.join == "add_input":
            y = torch.add(a, x)
        else:
            y = torch.cat([a, b, x], dim=1)
        return self.act(y) if self.act is not None else y


@single_ops
@given(st.data())
def test_random_add_and_cat_match_reference_kernels(data):
    channels = data.draw(st.integers(1, 4))
    model = TwoBranches(channels, data.draw(st.sampled_from(["add", "add_input", "cat"])), data.draw(activations))
    check_single_op(model, (3, channels, 5, 5), data.draw(st.integers(0, 10**6)))


@st.composite
def pools(draw):
    kind = draw(st.sampled_from(["max", "avg", "adaptive", "mean"]))
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, k // 2))
    ceil_mode = draw(st.booleans())
    if kind == "max":
        return nn.MaxPool2d(k, stride, padding, ceil_mode=ceil_mode)
    if kind == "avg":
        return nn.AvgPool2d(k, stride, padding, ceil_mode=ceil_mode, count_include_pad=draw(st.booleans()))
    if kind == "adaptive":
        return nn.AdaptiveAvgPool2d(draw(st.sampled_from([1, 2, 4, (2, 1)])))
    return MeanHW(draw(st.booleans()))


@single_ops
@given(st.data())
def test_random_pooling_matches_reference_kernels_or_is_refused(data):
    pool = data.draw(pools())
    size = 8 if isinstance(pool, nn.AdaptiveAvgPool2d) else data.draw(st.integers(5, 9))
    try:
        check_single_op(Pool(pool), (3, 2, size, size), data.draw(st.integers(0, 10**6)))
    except ExportError as error:  # only average pools whose divisor TFLite's windows cannot reproduce
        assert isinstance(pool, nn.AvgPool2d) and "no TFLite padding" in str(error), str(error)


def pytorch_axis(size, k, s, p, ceil_mode):
    out = pooling.output_size((size, size), {"kernel_size": (k, k), "stride": (s, s), "padding": (p, p),
                                                "ceil_mode": ceil_mode})[0]
    return AxisWindow(size, out, k, s, 1, p, size + p)


def test_padding_planner_expresses_every_max_pool_and_average_pool_with_padding_counted():
    """Max pools always (padding with -128 never wins: every PyTorch window holds a real code); average pools
    counting the padding always, except ceil-mode windows that TFLite can only clip at a shifted start."""
    refused = {"max": [], "avg_include": []}
    for size, k, s, ceil_mode in itertools.product(range(1, 11), range(1, 5), range(1, 4), (False, True)):
        for p in range(k // 2 + 1):
            if size + 2 * p < k:
                continue
            for rule, cases in refused.items():
                if plan_padding([pytorch_axis(size, k, s, p, ceil_mode)], rule) is None:
                    cases.append((size, k, s, p, ceil_mode))
    assert refused["max"] == []
    assert refused["avg_include"] == [(4, 3, 3, 0, True), (7, 3, 3, 0, True), (10, 3, 3, 0, True)]


class Layout(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(36, 5)
        self.fc_tail = nn.Linear(34, 2)
        self.act = act
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.conv(x)
        y = self.act(y) if self.act is not None else y  # a clamp that cannot fuse: y is used twice below
        z = y.permute(0, 2, 3, 1).reshape(y.size(0), -1)
        z = self.drop(z)
        w = torch.flatten(y.transpose(2, 3), 1)
        a, b = y.chunk(2, dim=1)
        return (self.fc(z), self.fc_tail(w[:, 2:]), y.view(y.shape[0], 4, 9), b[:, :, ::2, 1], F.relu(a),
                a.clamp(-0.1, 0.1))


@single_ops
@given(st.data())
def test_layout_ops_and_standalone_clamps_match_reference_kernels(data):
    check_single_op(Layout(data.draw(activations)), (3, 2, 5, 5), data.draw(st.integers(0, 10**6)))


class FlattenHead(nn.Module):
    """A conv output flattened in NCHW order into a linear layer (the file stores the conv output NHWC)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 3 * 3, 6)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def test_flatten_after_conv_follows_pytorch_channel_order(tmp_path):
    torch.manual_seed(0)
    batches = random_batches(3, (8, 3, 6, 6), spread=2.0)
    _, integer = prepare_and_convert(FlattenHead(), (batches[0],), "tflite", batches, lr=0.01)
    export_and_verify(integer, random_batches(4, (6, 3, 6, 6), count=1, spread=2.0)[0], str(tmp_path))


# ---------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["onnxruntime", "exact"])
def test_exporting_another_target_to_tflite_names_the_right_target(target, tmp_path):
    batches = [torch.randn(8, 20) for _ in range(2)]
    _, integer = prepare_and_convert(CatMLP(), (batches[0],), target, batches)
    with pytest.raises(ExportError, match=f"target {target!r}.*target='tflite'"):
        export(integer, tmp_path / "model.tflite")
    with pytest.raises(ExportError, match="'tflite'"):
        export_tflite(integer, tmp_path / "model.tflite")


@pytest.mark.parametrize("pool, why", [
    (nn.MaxPool2d(3, 1, 1, dilation=2), "MAX_POOL_2D has no dilation"),
    (nn.AvgPool2d(2, 2, 1, count_include_pad=False), "no TFLite padding"),
])
def test_inexpressible_pooling_raises_export_error_naming_op_and_module(pool, why, tmp_path):
    batches = random_batches(5, (3, 2, 8, 8))
    _, integer = prepare_and_convert(Pool(pool), (batches[0],), "tflite", batches)
    with pytest.raises(ExportError, match=f"pool2d at module 'pool'.*{why}"):
        export(integer, tmp_path / "model.tflite")


class MixesSamples(nn.Module):
    """Adds the first sample's features to every sample: a .tflite file running one sample at a time cannot."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        y = self.fc(x)
        return y + y[:1]


@pytest.mark.parametrize("target", ["tflite", "xnnpack"])
def test_a_model_mixing_samples_of_the_batch_is_refused_at_export_naming_the_node(tmp_path, target):
    x = torch.randn(3, 4, 5)
    prepared = qp.prepare_qat(MixesSamples(), (x,), target=target)
    qp.calibrate(prepared, [x])
    integer = qp.convert(qp.freeze(prepared))
    with pytest.raises(qp.QParityError, match=r"node 'getitem'.*combines different samples of the batch"):
        qp.export(integer, tmp_path / "model.tflite")
    assert not (tmp_path / "model.tflite").exists()
