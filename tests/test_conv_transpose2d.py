"""ConvTranspose2d (with BatchNorm2d folded) and F.conv_transpose2d: the conv of the zero-inserted input, exact on
every target that runs it, in LiteRT's kernels and in PyTorch's own quantized ConvTranspose2d; refused by name
elsewhere."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import assert_runtime_gives_the_same_codes, require_runtime
from qparity.errors import UnsupportedOpError
from qparity.numerics.accumulate import AccumulationPlan, ConvGeometry, accumulate
from qparity.ops.conv_transpose2d import as_conv_weight, as_transposed_weight
from qparity.ops.registry import OPERATORS

ENGINES = ("fbgemm", "qnnpack")  # x86 is refused (ops/registry.py)
TFLITE_TARGETS = ("tflite", "xnnpack", "tflite-micro")  # TRANSPOSE_CONV: groups 1, dilation 1
ACCEPTED = tuple(OPERATORS["conv_transpose2d"].targets())


class Decoder(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding, output_padding, groups, dilation, bias, batch_norm):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cout, kernel, stride, padding, output_padding, groups, bias, dilation)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()

    def forward(self, x):
        return F.relu(self.bn(self.up(x)))


@st.composite
def geometries(draw, plain: bool = False):
    """A ConvTranspose2d configuration PyTorch accepts (output_padding < stride or dilation); `plain`: what
    TFLite's TRANSPOSE_CONV expresses (groups 1, dilation 1)."""
    groups = 1 if plain else draw(st.sampled_from([1, 2]))
    dilation = 1 if plain else draw(st.integers(1, 2))
    stride = draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1))
    g = {"cin": groups * draw(st.integers(1, 3)), "cout": groups * draw(st.integers(1, 3)), "kernel": kernel,
         "stride": (stride, draw(st.integers(1, 2))), "padding": (draw(st.integers(0, 2)), draw(st.integers(0, 1))),
         "output_padding": (output_padding, 0), "groups": groups, "dilation": dilation,
         "bias": draw(st.booleans()), "batch_norm": draw(st.booleans()),
         "size": (draw(st.integers(2, 6)), draw(st.integers(2, 6)))}
    assume(all((g["size"][i] - 1) * g["stride"][i] - 2 * g["padding"][i] + dilation * (kernel[i] - 1)
               + g["output_padding"][i] + 1 >= 1 for i in range(2)))
    return g


def build(g):
    model = Decoder(g["cin"], g["cout"], g["kernel"], g["stride"], g["padding"], g["output_padding"], g["groups"],
                    g["dilation"], g["bias"], g["batch_norm"])
    x = torch.randn(4, g["cin"], *g["size"])
    return model, x


def train_and_convert(model, x, target):
    prepared = qp.prepare_qat(model, (x,), target=target)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):  # BatchNorm2d learns in train mode, then folds into the transposed conv at freeze
        loss = prepared(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qp.freeze(prepared)
    return prepared, qp.convert(prepared)


@settings(max_examples=15, deadline=None)
@given(g=geometries(), seed=st.integers(0, 1000))
def test_zero_inserted_conv_equals_pytorchs_conv_transpose2d(g, seed):
    """The accumulator's definition: conv of the zero-inserted input with the flipped, transposed kernel."""
    torch.manual_seed(seed)
    weight = torch.randint(-127, 128, (g["cin"], g["cout"] // g["groups"], *g["kernel"])).double()
    x = torch.randint(-255, 256, (2, g["cin"], *g["size"])).double()
    geometry = ConvGeometry("conv_transpose2d", g["stride"], g["padding"], (g["dilation"],) * 2, g["groups"],
                            g["output_padding"])
    expected = F.conv_transpose2d(x, weight, None, g["stride"], g["padding"], g["output_padding"], g["groups"],
                                  g["dilation"])
    conv_weight = as_conv_weight(weight, g["groups"])
    assert torch.equal(as_transposed_weight(conv_weight, g["groups"]), weight)
    for path in ("float32", "float64"):
        acc = accumulate(AccumulationPlan(path, 0.0), geometry, x, conv_weight)
        assert torch.equal(acc.double(), expected), path


@pytest.mark.parametrize("target", ACCEPTED)
@settings(max_examples=6, deadline=None)
@given(data=st.data(), seed=st.integers(0, 1000))
def test_conv_transpose2d_fake_equals_integer(target, data, seed):
    g = data.draw(geometries(plain=target in TFLITE_TARGETS + ("executorch-xnnpack",)))  # the xnnpack rule
    torch.manual_seed(seed)
    model, x = build(g)
    try:
        prepared, integer = train_and_convert(model, x, target)
    except UnsupportedOpError as error:  # xnnpack's requantization range, named
        assert target in ("xnnpack", "executorch-xnnpack") and "XNNPACK" in str(error), error
        return
    assert torch.equal(prepared.eval()(x), integer(x))


@pytest.mark.parametrize("target", TFLITE_TARGETS)
@settings(max_examples=5, deadline=None)
@given(g=geometries(plain=True), seed=st.integers(0, 1000))
def test_exported_conv_transpose2d_gives_the_integer_models_codes_in_litert(tmp_path_factory, target, g, seed):
    require_runtime("ai_edge_litert")
    torch.manual_seed(seed)
    model, x = build(g)
    try:
        _, integer = train_and_convert(model, x, target)
    except UnsupportedOpError as error:
        assert target in ("xnnpack", "executorch-xnnpack") and "XNNPACK" in str(error), error
        return
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("deconv"))


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=4, deadline=None)
@given(g=geometries(), seed=st.integers(0, 1000))
def test_conv_transpose2d_equals_pytorchs_quantized_conv_transpose2d(engine, g, seed):
    """The engines' rule (fbgemm's on fbgemm, QNNPACK's on qnnpack) on the exact accumulator gives
    torch.ao.nn.quantized.ConvTranspose2d's codes, fed the IntegerModel's own constants."""
    torch.manual_seed(seed)
    decoder, x = build({**g, "batch_norm": False})
    model = nn.Sequential(decoder.up)  # no clamp: the engine's ConvTranspose2d has none fused
    _, integer = train_and_convert(model, x, engine)
    (name, layer), = integer.layers.items()
    node = integer.graph.node(name)
    grid_in, grid_out = integer.grids[node.args[0].name], integer.qparams[name]
    weight = as_transposed_weight(layer.weight_codes.to(torch.float32), g["groups"]) * layer.weight_scale
    codes = integer.quantize(x)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine  # before the module: it packs its weights for the engine
    try:
        deconv = torch.ao.nn.quantized.ConvTranspose2d(g["cin"], g["cout"], g["kernel"], g["stride"], g["padding"],
                                                       g["output_padding"], g["groups"], g["bias"], g["dilation"])
        deconv.set_weight_bias(torch.quantize_per_tensor(weight, float(layer.weight_scale), 0, torch.qint8),
                               layer.bias_codes)
        deconv.scale, deconv.zero_point = float(grid_out.scale), int(grid_out.zero_point)
        quantized = torch._make_per_tensor_quantized_tensor(codes, float(grid_in.scale), int(grid_in.zero_point))
        expected = deconv(quantized).int_repr()
    finally:
        torch.backends.quantized.engine = previous
    assert torch.equal(integer.run(codes), expected)


@pytest.mark.parametrize("target, reason", [("onnxruntime", "QLinearConvTranspose"),
                                            ("x86", "in_channels != out_channels")])
def test_conv_transpose2d_is_refused_naming_the_module_the_reason_and_the_targets_that_run_it(target, reason):
    model, x = build({"cin": 2, "cout": 2, "kernel": (3, 3), "stride": (2, 2), "padding": (1, 1),
                      "output_padding": (1, 0), "groups": 1, "dilation": 1, "bias": True, "batch_norm": False,
                      "size": (4, 4)})
    with pytest.raises(UnsupportedOpError, match=rf"conv_transpose2d at module 'up' cannot run on target "
                                                 rf"'{target}'.*{reason}.*targets that run it: "
                                                 + ", ".join(ACCEPTED)):
        qp.prepare_qat(model, (x,), target=target, per_channel=False)


@pytest.mark.parametrize("target", TFLITE_TARGETS)
@pytest.mark.parametrize("groups, dilation", [(2, 1), (1, 2)])
def test_grouped_or_dilated_conv_transpose2d_is_refused_on_litert(target, groups, dilation):
    model, x = build({"cin": 2, "cout": 2, "kernel": (3, 3), "stride": (2, 2), "padding": (0, 0),
                      "output_padding": (0, 0), "groups": groups, "dilation": dilation, "bias": True,
                      "batch_norm": False, "size": (4, 4)})
    with pytest.raises(UnsupportedOpError, match=rf"conv_transpose2d at module 'up'.*groups={groups}, "
                                                 rf"dilation=\({dilation}, {dilation}\).*TRANSPOSE_CONV"):
        qp.prepare_qat(model, (x,), target=target)


@pytest.mark.parametrize("engine", ENGINES)
def test_conv_transpose2d_gets_per_tensor_weights_on_pytorchs_engines(engine):
    model, x = build({"cin": 2, "cout": 2, "kernel": (3, 3), "stride": (2, 2), "padding": (0, 0),
                      "output_padding": (0, 0), "groups": 1, "dilation": 1, "bias": True, "batch_norm": False,
                      "size": (4, 4)})
    prepared = qp.prepare_qat(model, (x,), target=engine)
    qp.calibrate(prepared, [x])
    integer = qp.convert(qp.freeze(prepared))
    (layer,) = integer.layers.values()
    assert layer.weight_scale.dim() == 0
    assert torch.equal(prepared.eval()(x), integer(x))


def test_an_output_size_argument_is_refused_by_name():
    class Sized(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 2, 3, stride=2)

        def forward(self, x):
            return self.up(x, output_size=[10, 10])

    with pytest.raises(UnsupportedOpError, match=r"ConvTranspose2d at module 'up'.*output_size"):
        qp.prepare_qat(Sized(), (torch.randn(1, 2, 4, 4),))


class FunctionalUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 2, 2, 2) * 0.3)
        self.bias = nn.Parameter(torch.randn(2) * 0.1)

    def forward(self, x):
        return F.conv_transpose2d(x, self.weight, self.bias, stride=2)


def test_functional_conv_transpose2d_on_the_models_parameters_equals_the_module():
    torch.manual_seed(0)
    functional = FunctionalUp()
    module = nn.Sequential(nn.ConvTranspose2d(3, 2, 2, stride=2))
    module[0].weight.data.copy_(functional.weight.data)
    module[0].bias.data.copy_(functional.bias.data)
    x = torch.randn(4, 3, 5, 5)
    outputs = [qp.convert(qp.freeze(qp.calibrate(qp.prepare_qat(m, (x,), target="tflite"), [x])))(x)
               for m in (functional, module)]
    assert torch.equal(*outputs)


def test_freeze_folds_batch_norm_into_the_users_transposed_weight():
    torch.manual_seed(0)
    model, x = build({"cin": 4, "cout": 6, "kernel": (3, 2), "stride": (2, 1), "padding": (1, 0),
                      "output_padding": (1, 0), "groups": 2, "dilation": 1, "bias": False, "batch_norm": True,
                      "size": (5, 4)})
    prepared = qp.prepare_qat(model, (x,), target="exact")
    prepared.train()(x)
    prepared.eval()
    layer = next(iter(prepared.layers.values()))
    before = prepared(x)
    folded, _ = layer.folded()
    qp.freeze(prepared)
    assert layer.module.weight_transposed.shape == (4, 3, 3, 2)
    assert torch.equal(layer.module.weight, folded.detach()) and layer.module.bias is not None
    assert torch.equal(prepared(x), before)


class UNetWithTransposedConvs(nn.Module):
    """Conv down, ConvTranspose2d up (BatchNorm folded), skip concatenations."""

    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.bottom = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.up2 = nn.Sequential(nn.ConvTranspose2d(16, 16, 2, stride=2), nn.BatchNorm2d(16), nn.ReLU())
        self.dec2 = nn.Sequential(nn.Conv2d(32, 8, 3, padding=1), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1)
        self.dec1 = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up2(self.bottom(e2)), e2], 1))
        d1 = self.dec1(torch.cat([F.relu(self.up1(d2)), e1], 1))
        return self.out(d1)


@pytest.mark.parametrize("target", ACCEPTED)
def test_unet_with_transposed_convs_end_to_end(tmp_path, target):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    prepared = qp.prepare_qat(UNetWithTransposedConvs(), (x,), target=target)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        loss = (prepared(x) - x[:, :2]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    integer.save(tmp_path / "unet.qp")
    assert torch.equal(qp.load(tmp_path / "unet.qp")(x), integer(x))
    if target in TFLITE_TARGETS:
        require_runtime("ai_edge_litert")
        assert_runtime_gives_the_same_codes(integer, x, tmp_path)


@pytest.mark.parametrize("engine", ENGINES)
@settings(max_examples=4, deadline=None)
@given(g=geometries(), seed=st.integers(0, 1000))
def test_to_torch_runs_transposed_convs_in_pytorchs_engine(engine, g, seed):
    torch.manual_seed(seed)
    model, x = build(g)
    prepared = qp.prepare_qat(model, (x,), target=engine)
    qp.calibrate(prepared, [x, x * 1.5])
    integer = qp.convert(qp.freeze(prepared))
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        assert torch.equal(qp.to_torch(integer)(x), integer(x))
    finally:
        torch.backends.quantized.engine = previous
