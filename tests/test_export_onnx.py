"""Models of target `onnxruntime` exported to ONNX run in ONNX Runtime with the IntegerModel's codes, bit for bit.

Each case trains or calibrates a model, converts it, exports it, runs the file in ONNX Runtime (graph
optimizations on and off, one and two threads) and requires 0 mismatched codes and `im(x) == ORT's float
output` exactly.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import qparity as qp
from helpers import calibrate, require_runtime
from op_models import Conv, Dense, MeanHW, Pool
from models import CatMLP, ResNetish
from qparity.errors import ExportError
from qparity.export import export
from qparity.verify import verify

ort = require_runtime("onnxruntime")
onnx = require_runtime("onnx")

dtypes = st.sampled_from(["uint8", "int8"])
few = settings(max_examples=20, deadline=None)


def convert(model, shape, dtype, seed, lr=0.0, spread=None, per_channel=True):
    """prepare_qat(target="onnxruntime"), optional SGD steps, calibrate, freeze, convert."""
    g = torch.Generator().manual_seed(seed)
    scale = spread if spread is not None else float(torch.empty(1).uniform_(0.05, 20, generator=g))
    batches = [torch.randn(shape, generator=g) * scale for _ in range(3)]
    prepared = qp.prepare_qat(model, (batches[0],), target="onnxruntime", activation_dtype=dtype,
                              per_channel=per_channel)
    if lr:
        calibrate(prepared, batches, lr=lr)
    qp.calibrate(prepared, batches)
    qp.freeze(prepared)
    return qp.convert(prepared), scale


def ort_outputs(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(y) for y in session.run(None, feeds)]


def assert_runs_bit_exact(im, path, *inputs):
    export(im, path)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    report = verify(im, path, inputs)
    assert report.ok, str(report)
    assert {r.runtime for r in report.results} == {f"onnxruntime {o}, {t}" for o in ("optimized", "unoptimized")
                                                  for t in ("1 thread", "2 threads")}
    expected = im(*inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    actual = ort_outputs(path, *inputs)
    assert len(actual) == len(expected)
    for want, got in zip(expected, actual):
        assert want.shape == got.shape and torch.equal(want, got), f"{int((want != got).sum())} floats differ"
    return report


def inputs_for(shape, scale, seed):
    """A batch of another size than the calibration's, reaching well past the calibrated range (saturation)."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn((7,) + tuple(shape[1:]), generator=g) * scale * 2


def check(model, shape, dtype, seed, tmp_path, **options):
    im, scale = convert(model, shape, dtype, seed, **options)
    return assert_runs_bit_exact(im, tmp_path / "model.onnx", inputs_for(shape, scale, seed))


# ---------------------------------------------------------------------------------------------------------
# Whole models
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_resnet_with_batchnorm_residual_adds_and_global_pool_runs_bit_exact_in_onnxruntime(dtype, tmp_path):
    torch.manual_seed(0)
    im, _ = convert(ResNetish(), (8, 1, 12, 12), dtype, seed=1, lr=0.02, spread=1.5)
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(2)) * 2
    report = assert_runs_bit_exact(im, tmp_path / "resnet.onnx", x)
    assert report.mismatched == 0 and all(r.total == 16 * 10 for r in report.results)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "resnet.onnx")).graph.node}
    assert {"QuantizeLinear", "QLinearConv", "QLinearAdd", "QLinearGlobalAveragePool", "QGemm",
            "DequantizeLinear"} <= ops


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_mlp_with_cat_clamps_and_dropout_runs_bit_exact_in_onnxruntime(dtype, tmp_path):
    torch.manual_seed(0)
    im, _ = convert(CatMLP(), (16, 20), dtype, seed=3, lr=0.02, spread=3.0)
    x = torch.randn(32, 20, generator=torch.Generator().manual_seed(4)) * 6
    assert_runs_bit_exact(im, tmp_path / "mlp.onnx", x)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "mlp.onnx")).graph.node}
    assert {"QLinearConcat", "QGemm", "Clip"} <= ops


def test_exported_file_takes_any_batch_size(tmp_path):
    im, scale = convert(CatMLP(), (16, 20), "uint8", seed=5)
    path = tmp_path / "mlp.onnx"
    export(im, path)
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 2, 33):
        x = torch.randn(batch, 20) * scale
        assert torch.equal(ort_outputs(path, x)[0], im(x))


# ---------------------------------------------------------------------------------------------------------
# Random single-op models
# ---------------------------------------------------------------------------------------------------------
activations = st.sampled_from([None, nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 0.5)])


@few
@given(st.data())
def test_random_conv_runs_bit_exact_in_onnxruntime(tmp_path_factory, data):
    groups = data.draw(st.sampled_from([1, 1, 2, 3]))
    depthwise = data.draw(st.booleans())
    cin = groups * data.draw(st.integers(1, 3))
    cout = cin * data.draw(st.integers(1, 2)) if depthwise else groups * data.draw(st.integers(1, 3))
    groups = cin if depthwise else groups
    k = data.draw(st.integers(1, 3))
    dilation = data.draw(st.integers(1, 2))
    stride = data.draw(st.integers(1, 3))
    padding = data.draw(st.one_of(st.integers(0, 2), st.just("valid"),
                                  st.just("same") if stride == 1 else st.integers(0, 2)))
    size = data.draw(st.integers(k * dilation + 1, 9))
    model = Conv(cin, cout, k, stride, padding, dilation, groups, data.draw(st.booleans()), data.draw(st.booleans()),
                 data.draw(activations))
    check(model, (4, cin, size, size), data.draw(dtypes), data.draw(st.integers(0, 10**6)),
          tmp_path_factory.mktemp("conv"), lr=0.01, per_channel=data.draw(st.booleans()))


@few
@given(st.data())
def test_random_linear_runs_bit_exact_in_onnxruntime(tmp_path_factory, data):
    features = data.draw(st.integers(1, 48))
    model = Dense(features, data.draw(st.integers(1, 12)), data.draw(st.booleans()), data.draw(activations))
    extra = data.draw(st.sampled_from([(), (3,), (2, 3)]))  # rank > 2 goes through Reshape around QGemm
    check(model, (4, *extra, features), data.draw(dtypes), data.draw(st.integers(0, 10**6)),
          tmp_path_factory.mktemp("linear"), lr=0.01, per_channel=data.draw(st.booleans()))


class Join(nn.Module):
    """Two convs on different grids joined by add (+ activation) or cat, and a standalone clamp."""

    def __init__(self, channels, join, act, dim):
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 1)
        self.join, self.act, self.dim = join, act, dim

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.join == "add":
            y = a + b
        elif self.join == "add_input":
            y = torch.add(x, a)
        elif self.join == "cat_same_grid":
            y = torch.cat([a, a], dim=self.dim)
        else:
            y = torch.cat([a, b, x], dim=self.dim)
        return self.act(y) if self.act is not None else y


@few
@given(st.data())
def test_random_add_and_cat_run_bit_exact_in_onnxruntime(tmp_path_factory, data):
    channels = data.draw(st.integers(1, 4))
    model = Join(channels, data.draw(st.sampled_from(["add", "add_input", "cat", "cat_same_grid"])),
                 data.draw(activations), data.draw(st.sampled_from([1, 2, -1])))
    check(model, (3, channels, 5, 5), data.draw(dtypes), data.draw(st.integers(0, 10**6)),
          tmp_path_factory.mktemp("join"))


@st.composite
def pools(draw):
    kind = draw(st.sampled_from(["max", "avg", "avg", "adaptive", "mean", "global"]))
    k = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    padding = draw(st.integers(0, k // 2))
    ceil_mode = draw(st.booleans())
    if kind == "max":
        return nn.MaxPool2d(k, stride, padding, draw(st.integers(1, 2)), ceil_mode=ceil_mode)
    if kind == "avg":
        return nn.AvgPool2d(k, stride, padding, ceil_mode=ceil_mode, count_include_pad=draw(st.booleans()))
    if kind == "adaptive":
        return nn.AdaptiveAvgPool2d(draw(st.sampled_from([1, 2, 4, (2, 1)])))
    if kind == "mean":
        return MeanHW(draw(st.booleans()))
    return nn.AvgPool2d(8, draw(st.integers(1, 3)), ceil_mode=ceil_mode)  # the window is the whole input


@few
@given(st.data())
def test_random_pooling_runs_bit_exact_in_onnxruntime(tmp_path_factory, data):
    check(Pool(data.draw(pools())), (3, 2, 8, 8), data.draw(dtypes), data.draw(st.integers(0, 10**6)),
          tmp_path_factory.mktemp("pool"))


@pytest.mark.parametrize("pool, size", [(nn.MaxPool2d(1, 2, ceil_mode=True), 8),
                                        (nn.AvgPool2d(2, 3, 1, ceil_mode=True), 8),
                                        (nn.MaxPool2d(3, 3, 1, 3, ceil_mode=True), 9)])
def test_ceil_mode_pools_have_pytorchs_output_size_in_onnx_shape_inference(pool, size, tmp_path):
    """ONNX's ceil_mode formula keeps a last window that starts in the end padding, PyTorch and ORT drop it:
    the exporter picks end padding (below the kernel, as ORT requires) so that all three agree; full_check
    compares the declared output shape with ONNX shape inference."""
    check(Pool(pool), (3, 2, size, size), "uint8", 7, tmp_path)


class Layout(nn.Module):
    """Layout ops on quantized tensors, a standalone clamp, dropout, and several outputs."""

    def __init__(self, act, variant):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(36, 5)
        self.act = act
        self.variant = variant
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.conv(x)
        y = self.act(y) if self.act is not None else y  # a clamp that cannot fuse: y is used again below
        z = self.drop(y.permute(0, 2, 3, 1).reshape(y.size(0), -1))
        if self.variant == "transpose":
            w = torch.flatten(y.transpose(2, 3), 1)[:, 2:]
        elif self.variant == "index":
            w = y[:, 1, ::2, -1]
        elif self.variant == "unsqueeze":
            w = y[:, None, 1:3].squeeze(1).unsqueeze(-1)
        elif self.variant == "chunk":
            first, second = y.chunk(2, dim=1)
            w = torch.cat([second, first], dim=3)
        else:
            w = torch.split(y, [1, 3], dim=1)[1].contiguous().view(y.shape[0], 3, 9)
        return self.fc(z), w, y


@few
@given(st.data())
def test_random_layout_ops_run_bit_exact_in_onnxruntime(tmp_path_factory, data):
    variant = data.draw(st.sampled_from(["transpose", "index", "unsqueeze", "chunk", "split"]))
    check(Layout(data.draw(activations), variant), (3, 2, 5, 5), data.draw(dtypes),
          data.draw(st.integers(0, 10**6)), tmp_path_factory.mktemp("layout"))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 1)
        self.b = nn.Linear(5, 1)

    def forward(self, x, y):
        return self.a(x) + self.b(y), torch.add(x[:, :1], y[:, 2:3])


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_two_inputs_and_one_element_adds_run_bit_exact_in_onnxruntime(dtype, tmp_path):
    """At batch size 1 both addends hold one element: ORT's scalar kernel, which the spec follows."""
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(8, 3, generator=g), torch.randn(8, 5, generator=g) * 4) for _ in range(3)]
    prepared = qp.prepare_qat(TwoInputs(), batches[0], target="onnxruntime", activation_dtype=dtype)
    qp.calibrate(prepared, batches)
    qp.freeze(prepared)
    im = qp.convert(prepared)
    for batch in (1, 9):
        inputs = (torch.randn(batch, 3, generator=g) * 2, torch.randn(batch, 5, generator=g) * 8)
        assert_runs_bit_exact(im, tmp_path / "two.onnx", *inputs)


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, hint", [("tflite", "export it to a .tflite file"),
                                          ("exact", "no file format of its own")])
def test_exporting_another_target_to_onnx_names_the_right_target(target, hint, tmp_path):
    prepared = qp.prepare_qat(Dense(4, 3, True, None), torch.randn(8, 4), target=target)
    qp.calibrate(prepared, [torch.randn(8, 4)])
    qp.freeze(prepared)
    with pytest.raises(ExportError, match=f"target '{target}'.*target='onnxruntime'.*{hint}"):
        export(qp.convert(prepared), tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


class AdvancedIndex(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.conv(x)[:, [0, 2]]


class BatchChunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).chunk(2, dim=0)[0]  # piece sizes follow the batch size


@pytest.mark.parametrize("model, shape, match", [
    (AdvancedIndex(), (2, 3, 4, 4), r"indexing with \[0, 2\] at node 'getitem'"),
    (BatchChunk(), (2, 4), r"chunk at node 'chunk'.*splits along the batch dimension"),
])
def test_an_op_without_an_onnx_form_raises_export_error_naming_it(model, shape, match, tmp_path):
    im, _ = convert(model, shape, "uint8", seed=0)
    with pytest.raises(ExportError, match=match):
        export(im, tmp_path / "model.onnx")
