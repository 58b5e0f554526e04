"""qp.from_torch(converted) computes exactly what the converted torch.ao model computes in its engine.

Eager (QuantStub/DeQuantStub/FloatFunctional) and FX (convert_fx) models, per engine, including the seed case
(a fused Conv1x1+ReLU whose QAT and converted outputs disagree) and hypothesis-random convolutions.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.ao.quantization as tq
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

import qparity as qp
from qparity.errors import UnsupportedOpError
from seed_case import build_seed
from qparity.numerics.pytorch_engines import fbgemm_path

warnings.filterwarnings("ignore")
ENGINES = ["fbgemm", "x86", "qnnpack"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_from_torch_equals_converted_seed_case(engine, k):
    _, converted, (x,) = build_seed(k, engine)
    im = qp.from_torch(converted, (x,))
    assert torch.equal(im(x), converted(x))
    assert ("fbgemm path: VNNI" in repr(im)) == (engine != "qnnpack" and "VNNI" in fbgemm_path())


# -- eager and FX models ---------------------------------------------------------------------------------
class Net(nn.Module):
    """conv+BN+ReLU, grouped conv, residual add (FloatFunctional), cat, max pool, linear+ReLU, linear."""

    def __init__(self, groups=2):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 1 if groups > 1 else 3, padding=0 if groups > 1 else 1, groups=groups)
        self.add = nn.quantized.FloatFunctional()
        self.cat = nn.quantized.FloatFunctional()
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 4 * 4, 20)
        self.relu2 = nn.ReLU()
        self.fc2 = nn.Linear(20, 5)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(self.quant(x))))
        z = self.add.add_relu(self.conv2(y), y)
        z = self.pool(self.cat.cat([z, y], 1))
        z = torch.flatten(z, 1)
        return self.dequant(self.fc2(self.relu2(self.fc1(z))))


def calibrated(model, x):
    with torch.no_grad():
        for _ in range(3):
            model(x * 1.5)
            model(x)
    return model


def eager_converted(engine, seed):
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    model = Net().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2)
    model.qconfig = tq.get_default_qconfig(engine)
    tq.fuse_modules(model, [["conv1", "bn1", "relu1"], ["fc1", "relu2"]], inplace=True)
    prepared = tq.prepare(model)
    x = torch.randn(4, 3, 8, 8)
    return tq.convert(calibrated(prepared, x)), x


def fx_converted(engine, seed):
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    model = Net().eval()
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_fx(model, tq.get_default_qconfig_mapping(engine), (x,))
    return convert_fx(calibrated(prepared, x)), x


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flow", [eager_converted, fx_converted])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_from_torch_equals_converted_model(engine, flow, seed):
    converted, x = flow(engine, seed)
    im = qp.from_torch(converted, (x,))
    for batch in (x, torch.randn(7, 3, 8, 8) * 2):
        assert torch.equal(im(batch), converted(batch))


class OneConv(nn.Module):
    def __init__(self, conv, relu):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = conv
        self.relu = nn.ReLU() if relu else nn.Identity()

    def forward(self, x):
        return self.dequant(self.relu(self.conv(self.quant(x))))


@settings(max_examples=30, deadline=None)
@given(engine=st.sampled_from(ENGINES), data=st.data())
def test_from_torch_equals_converted_for_random_conv(engine, data):
    groups = data.draw(st.sampled_from([1, 2]))
    cin = groups * data.draw(st.integers(1, 4))
    depthwise = data.draw(st.booleans())
    cout = cin if depthwise else groups * data.draw(st.integers(1, 4))
    groups = cin if depthwise else groups
    k = data.draw(st.integers(1, 3))
    if engine == "fbgemm" and groups > 1 and k == 3:
        k = 2  # fbgemm's depthwise 3x3 kernel is refused by from_torch (test below)
    conv = nn.Conv2d(cin, cout, k, data.draw(st.integers(1, 2)), data.draw(st.integers(0, 1)), groups=groups,
                     bias=data.draw(st.booleans()))
    torch.backends.quantized.engine = engine
    torch.manual_seed(data.draw(st.integers(0, 10**6)))
    model = OneConv(conv, data.draw(st.booleans())).eval()
    model.qconfig = tq.get_default_qconfig(engine)
    x = torch.randn(3, cin, 7, 7) * data.draw(st.floats(0.1, 10))
    converted = tq.convert(calibrated(tq.prepare(model), x))
    im = qp.from_torch(converted, (x,))
    assert torch.equal(im(x), converted(x))


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                  nn.Conv2d(16, 32, 5, padding=2, groups=16), nn.Conv2d(8, 16, 3, groups=4)])
def test_from_torch_equals_fbgemm_grouped_and_depthwise_convs(conv):
    torch.backends.quantized.engine = "fbgemm"
    model = OneConv(conv, False).eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    x = torch.randn(2, conv.in_channels, 7, 7)
    converted = tq.convert(calibrated(tq.prepare(model), x))
    assert torch.equal(qp.from_torch(converted, (x,))(x), converted(x))


class PoolNet(nn.Module):
    """conv, avg pool, conv, adaptive average pool, linear."""

    def __init__(self, avg_pool, channels):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1)
        self.avg = nn.AvgPool2d(3, 2, 1) if avg_pool else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 4)

    def forward(self, x):
        y = self.conv2(self.avg(self.conv1(self.quant(x))))
        return self.dequant(self.fc(torch.flatten(self.gap(y), 1)))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("channels", [5, 16, 37])
@pytest.mark.parametrize("fx", [False, True])
def test_from_torch_equals_converted_model_with_average_pools(engine, channels, fx):
    torch.backends.quantized.engine = engine
    torch.manual_seed(channels)
    model = PoolNet(True, channels).eval()
    x = torch.randn(4, 3, 12, 12)
    if fx:
        converted = convert_fx(calibrated(prepare_fx(model, tq.get_default_qconfig_mapping(engine), (x,)), x))
    else:
        model.qconfig = tq.get_default_qconfig(engine)
        converted = tq.convert(calibrated(tq.prepare(model), x))
    im = qp.from_torch(converted, (x,))
    for batch in (x, torch.randn(9, 3, 12, 12) * 3):
        assert torch.equal(im(batch), converted(batch))
    assert torch.equal(qp.to_torch(im)(x), im(x))


# -- to_torch --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("flow", [eager_converted, fx_converted])
def test_to_torch_round_trip_equals_from_torch(engine, flow):
    converted, x = flow(engine, 3)
    im = qp.from_torch(converted, (x,))
    module = qp.to_torch(im)
    batch = torch.randn(6, 3, 8, 8) * 2
    assert torch.equal(module(batch), im(batch))


class Residual(nn.Module):
    """A residual add of the (contiguous) network input and a (channels-last) conv output, then cat, linear."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 1, groups=channels)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * channels * 4 * 4, 6)

    def forward(self, x):
        y = torch.relu(self.conv(x) + x)
        z = torch.cat([self.conv2(y), y], 1)
        return self.fc(torch.flatten(self.pool(z), 1))


@settings(max_examples=20, deadline=None)
@given(target=st.sampled_from(["fbgemm", "qnnpack"]), channels=st.integers(1, 9), seed=st.integers(0, 10**6))
def test_to_torch_runs_a_qparity_model_in_its_engine(target, channels, seed):
    check_to_torch(target, channels, seed)


def test_to_torch_x86_grouped_conv_regression():
    check_to_torch("x86", 5, 543)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_to_torch_runs_a_qparity_model_in_x86(seed):
    check_to_torch("x86", 4, seed)


def check_to_torch(target, channels, seed):
    torch.manual_seed(seed)
    x = torch.randn(4, channels, 8, 8) * float(torch.empty(1).uniform_(0.2, 5))
    prepared = qp.prepare_qat(Residual(channels), (x,), target=target)
    qp.calibrate(prepared, [x, x * 1.3])
    im = qp.convert(qp.freeze(prepared))
    torch.backends.quantized.engine = target
    module = qp.to_torch(im)
    for batch in (x, torch.randn(5, channels, 8, 8)):
        assert torch.equal(module(batch), im(batch))
        assert torch.equal(prepared.eval()(batch), im(batch))


def test_to_torch_refuses_other_targets():
    x = torch.randn(2, 3, 4, 4)
    prepared = qp.prepare_qat(nn.Conv2d(3, 2, 1), (x,), target="exact", activation_dtype="uint8")
    qp.calibrate(prepared, [x])
    with pytest.raises(qp.QParityError, match="to_torch needs"):
        qp.to_torch(qp.convert(qp.freeze(prepared)))


def eager_activation(act):
    torch.backends.quantized.engine = "fbgemm"
    model = nn.Sequential(tq.QuantStub(), nn.Conv2d(3, 4, 1), act, tq.DeQuantStub()).eval()
    model.qconfig = tq.get_default_qconfig("fbgemm")
    x = torch.randn(2, 3, 4, 4)
    return tq.convert(calibrated(tq.prepare(model), x)), x


def test_from_torch_reads_eager_quantized_leaky_relu():
    converted, x = eager_activation(nn.LeakyReLU(0.2))
    im = qp.from_torch(converted, (x,))
    assert torch.equal(im(x * 3), converted(x * 3))


def test_from_torch_refuses_modules_it_does_not_emulate():
    converted, x = eager_activation(nn.ELU())
    with pytest.raises(qp.QParityError, match="ELU"):
        qp.from_torch(converted, (x,))


def test_from_torch_model_saves_and_loads_with_its_float_bias(tmp_path):
    converted, x = eager_converted("fbgemm", 4)
    im = qp.from_torch(converted, (x,))
    im.save(tmp_path / "model.qp")
    assert torch.equal(qp.load(tmp_path / "model.qp")(x), converted(x))


# -- activations, mul and resampling in converted models ------------------------------------------------
class Gates(nn.Module):
    """Squeeze-excite style gates (quantized::mul), hardsigmoid, leaky_relu (module and function), nearest
    upsampling and zero padding; sigmoid and tanh where the engine's kernels are emulated; ReLU6 unfused."""

    def __init__(self, engine):
        super().__init__()
        self.engine = engine
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 1)
        self.gate = nn.Hardsigmoid()
        self.leaky = nn.LeakyReLU(0.125)
        self.relu6 = nn.ReLU6()
        self.sig = nn.Sigmoid()

    def forward(self, x):
        a, b = self.c1(x), self.c2(x)
        y = self.leaky(a * self.gate(b) + b)
        outputs = [y, F.interpolate(y, scale_factor=2, mode="nearest"), F.leaky_relu(b, 0.25), F.pad(a, (1, 1, 1, 1))]
        if self.engine == "qnnpack":
            outputs += [torch.tanh(a), b * self.sig(a)]
        else:  # qnnpack's clamp scrambles channels-last tensors (test below)
            outputs += [self.relu6(a), F.hardtanh(b, -0.5, 0.5)]
        return tuple(outputs)


def fx_converted_model(model, engine, x):
    torch.backends.quantized.engine = engine
    prepared = prepare_fx(model.eval(), tq.get_default_qconfig_mapping(engine), (x,))
    return convert_fx(calibrated(prepared, x))


@settings(max_examples=6, deadline=None)
@given(engine=st.sampled_from(ENGINES), seed=st.integers(0, 10**6), spread=st.floats(0.2, 6))
def test_from_torch_reads_gates_activations_and_resampling(engine, seed, spread):
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 6, 6) * spread
    converted = fx_converted_model(Gates(engine), engine, x)
    im = qp.from_torch(converted, (x,))
    for batch in (x, torch.randn(3, 3, 6, 6) * spread * 2):
        for theirs, ours in zip(converted(batch), im(batch)):
            assert torch.equal(theirs, ours), f"{int((theirs != ours).sum())} of {ours.numel()} differ"


class Activation(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = act

    def forward(self, x):
        return self.act(self.conv(x))


@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_from_torch_refuses_what_the_registry_says_the_engine_cannot_run(engine):
    x = torch.randn(2, 3, 6, 6)
    converted = fx_converted_model(Activation(nn.Sigmoid()), engine, x)
    with pytest.raises(qp.QParityError, match=rf"sigmoid at module 'act' cannot run on target '{engine}'.*Sleef"):
        qp.from_torch(converted, (x,))


def test_from_torch_refuses_qnnpacks_scrambled_clamp_of_channels_last_tensors():
    x = torch.randn(2, 3, 6, 6)
    converted = fx_converted_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardtanh(-0.5, 0.5)), "qnnpack", x)
    with pytest.raises(qp.QParityError, match="channels-last tensor returns its elements in the wrong order"):
        qp.from_torch(converted, (x,))


class Resized(nn.Module):
    """Bilinear resizing of a conv's output: after .contiguous() (the NCHW kernel), or channels-last as it comes."""

    def __init__(self, contiguous):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.contiguous = contiguous

    def forward(self, x):
        y = self.conv(x)
        y = y.contiguous() if self.contiguous else y
        return F.interpolate(y, size=(11, 9), mode="bilinear"), F.interpolate(y, scale_factor=2, mode="bilinear",
                                                                               align_corners=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_from_torch_reads_bilinear_resizing_of_nchw_tensors_and_refuses_channels_last(engine):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6) * 2
    converted = fx_converted_model(Resized(contiguous=True), engine, x)
    im = qp.from_torch(converted, (x,))
    for theirs, ours in zip(converted(x), im(x)):
        assert torch.equal(theirs, ours)
    with pytest.raises(UnsupportedOpError, match="channels-last quantized tensor"):
        qp.from_torch(fx_converted_model(Resized(contiguous=False), engine, x), (x,))


@pytest.mark.parametrize("engine", ENGINES)
def test_from_torch_reads_adaptive_average_pools_with_uneven_windows(engine):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 7, 9) * 2
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.AdaptiveAvgPool2d((4, 5)))
    converted = fx_converted_model(model, engine, x)
    assert torch.equal(converted(x), qp.from_torch(converted, (x,))(x))
