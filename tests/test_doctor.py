"""The doctor: every number it states is checked here against a direct computation on the models."""
import copy
import json
import shutil
import subprocess
import warnings
from fractions import Fraction

import pytest
import torch
import torch.ao.quantization as tq
from torch import nn
from torch.ao.nn.intrinsic.qat import freeze_bn_stats
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx

import qparity
from seed_case import Conv1x1, build_seed
from qparity.cli import main
from qparity.doctor.causes import fmt
from qparity.errors import QParityError

ENGINES = ("fbgemm", "x86", "qnnpack")


@pytest.fixture(autouse=True)
def _restore_engine():
    engine = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    torch.backends.quantized.engine = engine


def build_clean(k=1.0, engine="fbgemm", observer=False):
    """Non-fused FakeQuantize whose scale buffers hold exactly what the observers (and so convert) compute."""
    torch.backends.quantized.engine = engine
    m = Conv1x1(k, fused=False)
    tq.fuse_modules(m, [["conv", "act"]], inplace=True)
    prepared = tq.prepare_qat(m.train())
    prepared.apply(tq.disable_observer).eval()
    for fq, lo, hi in ((prepared.conv.weight_fake_quant, -k, k), (prepared.conv.activation_post_process, 0.0, k),
                       (prepared.quant.activation_post_process, 0.0, 1.0)):
        fq.activation_post_process.min_val, fq.activation_post_process.max_val = torch.tensor(lo), torch.tensor(hi)
        scale, zero_point = fq.calculate_qparams()
        fq.scale.copy_(scale)
        fq.zero_point.copy_(zero_point)
    converted = tq.convert(prepared, inplace=False)
    if observer:
        prepared.apply(tq.enable_observer)
    return prepared, converted, (torch.arange(256).repeat(1, 3, 64, 1) / 255.0,)


def kinds(report, layer=None):
    return {c.kind for c in report.causes if layer is None or c.layer == layer}


def cause(report, kind, layer):
    found = [c for c in report.causes if c.kind == kind and c.layer == layer]
    assert found, f"no {kind} on {layer}: {[(c.kind, c.layer) for c in report.causes]}"
    return found[0]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("k", [0.5, 1.0, 3.0])
def test_seed_case_is_a_weight_grid_mismatch_with_the_true_numbers(k, engine):
    prepared, converted, x = build_seed(k, engine)
    report = qparity.doctor(prepared, converted, x)
    fake, real = prepared(*x), converted(*x)
    assert report.mismatched == int((fake != real).sum()) > 0 and report.total == fake.numel()
    assert not report.ok and report.first_divergence == "conv"

    # The fused op ignores the hand-set scale 2k/255: with min == 0 its grid is affine, scale k/255, zp -128.
    trained_scale = float(torch.tensor(k, dtype=torch.float32) / 255)
    deployed = converted.conv.weight()
    qp = cause(report, "qparams_mismatch", "conv")
    assert qp.evidence["tensor"] == "weight"
    assert qp.evidence["fake_scale"] == trained_scale and qp.evidence["fake_zero_point"] == -128
    assert qp.evidence["converted_scale"] == deployed.q_scale() and qp.evidence["converted_zero_point"] == 0
    for number in (fmt(trained_scale), "-128", fmt(deployed.q_scale())):
        assert number in qp.explanation

    fake_w = torch.fake_quantize_per_tensor_affine(prepared.conv.weight, trained_scale, -128, -128, 127)
    grid = cause(report, "weight_grid", "conv")
    assert grid.evidence["weights_differing"] == int((fake_w != deployed.dequantize()).sum()) == 3
    i = tuple(grid.evidence["first_index"])
    assert grid.evidence["fake_value"] == float(fake_w[i])
    assert grid.evidence["converted_value"] == float(deployed.dequantize()[i])

    layer = next(l for l in report.layers if l.name == "conv")
    scale = converted.conv.scale
    expected, actual = torch.round(fake / scale).long(), torch.round(real / scale).long()
    assert layer.mismatched == int((expected != actual).sum()) == grid.affected
    assert layer.max_diff == int((expected - actual).abs().max())
    assert (layer.expected, layer.actual) == (int(expected[tuple(layer.first_index)]),
                                              int(actual[tuple(layer.first_index)]))
    assert layer.unexplained == 0
    assert kinds(report) == {"qparams_mismatch", "weight_grid"}


@pytest.mark.parametrize("engine", ENGINES)
def test_clean_fake_quantize_model_is_ok_with_no_causes(engine):
    prepared, converted, x = build_clean(1.0, engine)
    report = qparity.doctor(prepared, converted, x)
    assert torch.equal(prepared(*x), converted(*x))
    assert report.ok and report.mismatched == 0 and report.first_divergence is None
    assert report.causes == [] and all(l.mismatched == 0 for l in report.layers)
    assert [l.name for l in report.layers] == ["quant", "conv"]
    assert report.verdict.startswith("OK")


def test_doctor_leaves_the_prepared_model_untouched():
    prepared, converted, x = build_seed(1.0)
    state = copy.deepcopy(prepared.state_dict())
    qparity.doctor(prepared, converted, x)
    assert all(torch.equal(state[k], v) for k, v in prepared.state_dict().items())


def test_observer_left_on_is_found_with_its_ranges():
    prepared, converted, x = build_clean(1.0, observer=True)
    probe = copy.deepcopy(prepared)
    observer = probe.quant.activation_post_process.activation_post_process
    before = (float(observer.min_val), float(observer.max_val))
    probe(*x)
    after = (float(observer.min_val), float(observer.max_val))
    report = qparity.doctor(prepared, converted, x)
    found = [c for c in report.causes if c.kind == "observer_not_frozen"]
    assert {c.evidence["module"] for c in found} == {"quant.activation_post_process", "conv.weight_fake_quant",
                                                     "conv.activation_post_process"}
    quant = next(c for c in found if c.evidence["module"] == "quant.activation_post_process")
    assert tuple(quant.evidence["range_before"]) == before and tuple(quant.evidence["range_after"]) == after


# Default torch.ao QAT qconfigs: conv-bn-relu, a residual add, a pool and a linear layer.
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.skip = nn.quantized.FloatFunctional()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(self.quant(x))))
        y = self.skip.add(y, self.conv2(y))
        return self.dequant(self.fc(self.pool(y).flatten(1)))


class ResidualFx(Residual):
    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        return self.fc(self.pool(y).flatten(1))


def _train(prepared, x, steps=3):
    opt = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(steps):
        prepared(x).square().sum().backward()
        opt.step()
        opt.zero_grad()


def build_residual(engine, fx=False, freeze_bn=True, seed=0):
    torch.backends.quantized.engine = engine
    torch.manual_seed(seed)
    x = torch.randn(4, 3, 8, 8)
    if fx:
        mapping = tq.QConfigMapping().set_global(tq.get_default_qat_qconfig(engine))
        prepared = prepare_qat_fx(ResidualFx().train(), mapping, (x,))
    else:
        m = Residual().train()
        m.qconfig = tq.get_default_qat_qconfig(engine)
        tq.fuse_modules_qat(m, [["conv", "bn", "relu"]], inplace=True)
        prepared = tq.prepare_qat(m)
    _train(prepared, x)
    prepared.apply(tq.disable_observer)
    if freeze_bn:
        prepared.apply(freeze_bn_stats)
    prepared.eval()
    converted = (convert_fx if fx else tq.convert)(copy.deepcopy(prepared))
    return prepared, converted, (x,)


def _layer_codes(prepared, converted, x, fake_quant_path, converted_path):
    """Direct computation of one layer's codes: the fused fake quant writes the qparams it used into its
    buffers, and the converted module's output carries its own."""
    seen = {}
    fq = prepared.get_submodule(fake_quant_path)
    h1 = fq.register_forward_hook(lambda m, a, out: None if "fake" in seen else seen.update(fake=out.detach()))
    h2 = converted.get_submodule(converted_path).register_forward_hook(
        lambda m, a, out: None if "real" in seen else seen.update(real=out.int_repr().long()))
    with torch.no_grad():
        prepared(*x)
        converted(*x)
    h1.remove()
    h2.remove()
    expected = torch.round(seen["fake"].double() / float(fq.scale)).long() + int(fq.zero_point)
    return expected, seen["real"]


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_default_qat_qconfig_residual_model_numbers_match_direct_computation(engine):
    prepared, converted, x = build_residual(engine)
    report = qparity.doctor(copy.deepcopy(prepared), converted, x)
    fake, real = copy.deepcopy(prepared)(*x), converted(*x)
    assert report.mismatched == int((fake != real).sum()) and report.total == fake.numel()
    assert [l.name for l in report.layers] == ["quant", "conv", "conv2", "skip", "fc"]
    for name, fq_path, conv_path in (("conv", "conv.activation_post_process", "conv"),
                                     ("skip", "skip.activation_post_process", "skip.activation_post_process"),
                                     ("fc", "fc.activation_post_process", "fc")):
        expected, actual = _layer_codes(copy.deepcopy(prepared), converted, x, fq_path, conv_path)
        layer = next(l for l in report.layers if l.name == name)
        assert layer.mismatched == int((expected != actual).sum()), name
        assert layer.max_diff == int((expected - actual).abs().max()), name
    first = next((l.name for l in report.layers if l.mismatched), None)
    assert report.first_divergence == first
    for c in report.causes:
        if c.kind == "qparams_mismatch" and c.evidence["tensor"] == "weight":
            probe = copy.deepcopy(prepared)
            probe(*x)  # the fused op writes the per-channel scales it used into its buffer
            used = probe.get_submodule(c.layer).weight_fake_quant.scale
            ch = c.evidence["channel"]
            assert c.evidence["fake_scale"] == float(used[ch])
            weight = converted.get_submodule(c.layer).weight()
            scales = weight.q_per_channel_scales() if weight.qscheme() == torch.per_channel_affine else \
                torch.tensor([weight.q_scale()])
            assert c.evidence["converted_scale"] == float(scales[ch])
    assert all(l.unexplained in (None, 0) for l in report.layers) or engine == "qnnpack"


@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_fx_flow_names_layers_by_module_path_and_counts_output_mismatches(engine):
    prepared, converted, x = build_residual(engine, fx=True)
    report = qparity.doctor(prepared, converted, x)
    fake, real = copy.deepcopy(prepared)(*x), converted(*x)
    assert report.flow == "fx" and report.mismatched == int((fake != real).sum())
    assert [l.name for l in report.layers] == ["x", "conv", "conv2", "add", "flatten", "fc"]
    expected, actual = _layer_codes(copy.deepcopy(prepared), converted, x, "activation_post_process_1", "conv")
    conv = next(l for l in report.layers if l.name == "conv")
    assert conv.mismatched == int((expected != actual).sum())


def test_bn_left_in_training_mode_is_bn_folding():
    prepared, converted, x = build_residual("fbgemm", freeze_bn=False)
    prepared.train()
    probe = copy.deepcopy(prepared)
    before = probe.conv.bn.running_mean.clone()
    with torch.no_grad():
        probe(*x)
    report = qparity.doctor(prepared, converted, x)
    bn = cause(report, "bn_folding", "conv")
    assert bn.evidence["bn_training"] is True
    assert bn.evidence["running_mean_shift"] == pytest.approx(float((probe.conv.bn.running_mean - before).abs().max()),
                                                              rel=1e-6)
    assert bn.affected > 0 and fmt(bn.evidence["running_mean_shift"]) in bn.explanation


def test_hand_edited_bias_is_bias_quantization():
    prepared, converted, x = build_clean(1.0)
    edited = torch.tensor([0.3, 0.0, -0.2]) / 255
    converted.conv.set_weight_bias(converted.conv.weight(), edited)
    report = qparity.doctor(prepared, converted, x)
    assert not report.ok
    bias = cause(report, "bias_quantization", "conv")
    assert bias.evidence["channel"] == 0
    assert bias.evidence["converted_bias"] == float(edited[0]) and bias.evidence["prepared_bias"] == 0.0
    assert bias.evidence["max_difference"] == float(edited[0])
    layer = next(l for l in report.layers if l.name == "conv")
    assert bias.affected == layer.mismatched > 0 and layer.unexplained == 0
    assert kinds(report) == {"bias_quantization"}


def test_reduced_training_range_is_saturation():
    prepared, converted, x = build_clean(1.0)
    fq = prepared.conv.activation_post_process
    fq.activation_post_process.quant_max = fq.quant_max = 127  # reduce_range on the fake side only
    fq.activation_post_process.max_val = torch.tensor(0.5)
    scale, zero_point = fq.calculate_qparams()
    fq.scale.copy_(scale)
    fq.zero_point.copy_(zero_point)
    converted = tq.convert(prepared, inplace=False)
    report = qparity.doctor(prepared, converted, x)
    expected, actual = _layer_codes(prepared, converted, x, "conv.activation_post_process", "conv")
    clipped = int(((expected == 127) & (actual > 127)).sum())
    saturation = cause(report, "saturation", "conv")
    assert saturation.evidence["codes_past_training_clamp"] == saturation.affected == clipped > 0
    assert f"{clipped} of {expected.numel()}" in saturation.explanation


def test_terminal_report_has_verdict_causes_and_fixes():
    prepared, converted, x = build_seed(1.0)
    text = str(qparity.doctor(prepared, converted, x))
    assert text.startswith("MISMATCH: 98304 of 196608")
    assert "qparams_mismatch" in text and "FakeQuantize" in text and "train with qparity" in text


def test_json_round_trips_the_report():
    prepared, converted, x = build_seed(1.0)
    report = qparity.doctor(prepared, converted, x)
    data = json.loads(report.to_json())
    assert data["mismatched"] == report.mismatched and data["verdict"] == report.verdict
    assert [c["kind"] for c in data["causes"]] == [c.kind for c in report.causes]
    assert data["layers"][1]["first_index"] == report.layers[1].first_index


def test_html_is_self_contained(tmp_path):
    prepared, converted, x = build_seed(1.0)
    page = qparity.doctor(prepared, converted, x).to_html(tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2 and "<script" not in page and "<link" not in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_html_renders_in_headless_chromium(tmp_path):
    prepared, converted, x = build_seed(1.0)
    page = qparity.doctor(prepared, converted, x).to_html(tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    subprocess.run([shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400",
                    f"--screenshot={shot}", page.resolve().as_uri()], check=True, capture_output=True, timeout=60)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_doctor import build_seed, build_clean

def seed():
    return build_seed(1.0)

def clean():
    return build_clean(1.0)
"""


def test_cli_doctor_prints_json_writes_html_and_exits_by_verdict(tmp_path, capsys):
    script = tmp_path / "flow.py"
    script.write_text(SCRIPT.format(tests=str(__import__("pathlib").Path(__file__).parent)))
    assert main(["doctor", f"{script}:seed", "--json", "--html", str(tmp_path / "r.html")]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["first_divergence"] == "conv" and (tmp_path / "r.html").exists()
    assert main(["doctor", f"{script}:clean"]) == 0
    assert capsys.readouterr().out.startswith("OK")
    assert main(["doctor", f"{script}:missing"]) == 1
    assert "missing" in capsys.readouterr().err


def test_doctor_refuses_models_without_fake_quant():
    with pytest.raises(QParityError, match="no fake-quant modules"):
        qparity.doctor(nn.Linear(2, 2), nn.Linear(2, 2), (torch.randn(1, 2),))


def test_layers_at_risk_on_fbgemms_avx2_path_are_flagged_with_true_numbers():
    """A conv whose neighbouring weights are both 127 with activation codes up to 255: 2 * 127 * 255 = 64770."""
    from qparity.doctor.causes import saturation_risk_notes

    prepared, converted, inputs = build_seed(1.0, "fbgemm")
    report = qparity.doctor(prepared, converted, inputs)
    assert not any("int16" in note for note in report.notes)  # identity weights: one nonzero per pair

    class Call:
        pass

    call = Call()
    call.module, call.input = converted.conv, torch.quantize_per_tensor(inputs[0], 1 / 255, 0, torch.quint8)
    weight = torch.quantize_per_channel(torch.ones(3, 3, 1, 1), torch.full((3,), 1 / 127, dtype=torch.float64),
                                        torch.zeros(3, dtype=torch.int64), 0, torch.qint8)
    call.module.set_weight_bias(weight, None)

    class Run:
        converted_modules = {"conv": call}

    (note,) = saturation_risk_notes(Run())
    assert "64770 > 32767" in note and "3 weight pairs" in note and "up to 255" in note


# Arithmetic causes: a Quant -> Conv2d(1x1, no bias) -> DeQuant model with non-fused FakeQuantize qconfigs and
# hand-set qparams that the observers (so convert) compute too, so the only differences are in the arithmetic.
def _plain_qconfig():
    act = tq.FakeQuantize.with_args(observer=tq.MinMaxObserver, quant_min=0, quant_max=255, reduce_range=False)
    wgt = tq.FakeQuantize.with_args(observer=tq.MinMaxObserver, quant_min=-128, quant_max=127, dtype=torch.qint8,
                                    qscheme=torch.per_tensor_symmetric)
    return tq.QConfig(activation=act, weight=wgt)


class _Conv1x1NoBias(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv = nn.Conv2d(weight.shape[1], weight.shape[0], 1, bias=False)
        self.qconfig = _plain_qconfig()
        with torch.no_grad():
            self.conv.weight.copy_(weight.reshape(*weight.shape, 1, 1))

    def forward(self, x):
        return self.dequant(self.conv(self.quant(x)))


def build_arithmetic(weight_codes, sx, sw, sy, engine):
    """Input grid (sx, 0), symmetric weights (sw, 0), output grid (sy, 0): each exactly what the observer gives."""
    torch.backends.quantized.engine = engine
    prepared = tq.prepare_qat(_Conv1x1NoBias(weight_codes * sw).train())
    prepared.apply(tq.disable_observer).eval()
    for fq, lo, hi in ((prepared.conv.weight_fake_quant, -127.5 * sw, 127.5 * sw),
                       (prepared.conv.activation_post_process, 0.0, 255 * sy),
                       (prepared.quant.activation_post_process, 0.0, 255 * sx)):
        fq.activation_post_process.min_val, fq.activation_post_process.max_val = torch.tensor(lo), torch.tensor(hi)
        scale, zero_point = fq.calculate_qparams()
        fq.scale.copy_(scale)
        fq.zero_point.copy_(zero_point)
    converted = tq.convert(prepared, inplace=False)
    qw = converted.conv.weight()
    assert (converted.quant.scale, qw.q_scale(), converted.conv.scale) == (sx, sw, sy)
    assert int(converted.quant.zero_point) == qw.q_zero_point() == converted.conv.zero_point == 0
    assert torch.equal(qw.int_repr().reshape(weight_codes.shape).long(), weight_codes.long())
    return prepared, converted


def _direct_codes(prepared, converted, x, x_codes, weight_codes):
    """Exact accumulator (int64), exact codes (Fraction, round half to even), fake and engine codes."""
    sx, sw, sy = (Fraction(float(s)) for s in (converted.quant.scale, converted.conv.weight().q_scale(),
                                                converted.conv.scale))
    acc = torch.einsum("nchw,oc->nohw", x_codes.long(), weight_codes.long())
    exact_values = [Fraction(int(a)) * sx * sw / sy for a in acc.reshape(-1).tolist()]
    exact = torch.tensor([min(max(round(v), 0), 255) for v in exact_values]).reshape(acc.shape)
    with torch.no_grad():
        fake_out, real_out = prepared(x).double(), converted(x).double()
    fake = torch.round(fake_out / float(sy)).long()
    assert torch.equal(fake.double() * float(sy), fake_out)  # the fake output lies on its grid
    actual = torch.round(real_out / float(sy)).long()
    return acc, exact_values, exact, fake, actual


def _first_index(differ):
    flat = int(differ.reshape(-1).nonzero()[0])
    return flat, [int(i) for i in torch.unravel_index(torch.tensor(flat), differ.shape)]


def _accumulation_inputs(cin=2048, positions=256, seed=1):
    """Per position the input codes sum to 224 * cin, so with all weight codes 63 the accumulator is
    63 * 458752 = 28901376 = 220.5 * 2^17: an exact tie on the output grid (scale 2^17), beyond 2^24,
    where the fake forward's float32 conv rounds its partial sums."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randint(-31, 32, (positions, cin // 2), generator=g)
    other = torch.stack([-row[torch.randperm(cin // 2, generator=g)] for row in half])
    codes = (224 + torch.cat([half, other], 1)).T.reshape(1, cin, 16, positions // 16)
    return codes.float(), codes


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_float32_conv_across_a_tie_is_float_accumulation_with_the_true_numbers(engine):
    cin = 2048
    weight_codes = torch.full((1, cin), 63)
    prepared, converted = build_arithmetic(weight_codes, 1.0, 1.0, 2.0 ** 17, engine)
    x, x_codes = _accumulation_inputs(cin)
    acc, exact_values, exact, fake, actual = _direct_codes(prepared, converted, x, x_codes, weight_codes)
    assert (acc == 28901376).all() and all(v == Fraction(441, 2) for v in exact_values)
    assert (exact == 220).all()
    assert torch.equal(actual, exact)  # the engine's integer accumulator is exact
    differ = fake != exact
    moved = int(differ.sum())
    assert moved > 0

    report = qparity.doctor(prepared, converted, (x,))
    assert kinds(report) == {"float_accumulation"}
    found = cause(report, "float_accumulation", "conv")
    flat, index = _first_index(differ)
    total = exact.numel()
    assert found.affected == found.evidence["outputs_moved"] == moved
    assert found.evidence["index"] == index
    assert found.evidence["exact_code_value"] == float(exact_values[flat]) == 220.5
    assert found.evidence["exact_code"] == int(exact[tuple(index)]) == 220
    assert found.evidence["fake_code"] == int(fake[tuple(index)])
    assert (f"In {moved} of {total} outputs of conv" in found.explanation and str(index) in found.explanation
            and f"exact value is {fmt(float(exact_values[flat]))} codes, which rounds to {int(exact[tuple(index)])},"
            in found.explanation and f"fake forward produced {int(fake[tuple(index)])}." in found.explanation)

    layer = next(l for l in report.layers if l.name == "conv")
    assert layer.mismatched == int((fake != actual).sum()) == moved and layer.total == total
    assert layer.stages == {"float arithmetic": moved, "output grid": 0, "weights": 0, "input codes": 0, "bias": 0,
                            "engine bias": 0, "requantization": 0, "unexplained": 0}
    assert layer.unexplained == 0


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_float32_output_multiplier_at_ties_is_requantization_with_the_true_numbers(engine):
    # sx = 3, sw = 1, sy = 10: the exact multiplier 3/10 is not a float32; at acc = 3 * x with acc * 3/10 a
    # half-integer, the engine's f32(acc * f32(M)) lands off the tie while the fake forward's f32(3 acc * f32(1/10))
    # does not.
    weight_codes = torch.full((1, 1), 3)
    prepared, converted = build_arithmetic(weight_codes, 3.0, 1.0, 10.0, engine)
    x_codes = torch.arange(256).reshape(1, 1, 16, 16)
    x = x_codes.float() * 3
    acc, exact_values, exact, fake, actual = _direct_codes(prepared, converted, x, x_codes, weight_codes)
    assert torch.equal(fake, exact)  # nothing but the requantization differs
    differ = actual != exact
    moved = int(differ.sum())
    assert moved > 0
    assert all(exact_values[i].denominator == 2 for i in differ.reshape(-1).nonzero().reshape(-1).tolist())

    report = qparity.doctor(prepared, converted, (x,))
    assert kinds(report) == {"requantization"}
    found = cause(report, "requantization", "conv")
    flat, index = _first_index(differ)
    i = tuple(index)
    assert found.affected == found.evidence["outputs_moved"] == moved
    assert found.evidence["rule"] == engine and found.evidence["index"] == index
    assert found.evidence["acc"] == int(acc[i]) == 195
    assert found.evidence["exact_code"] == int(exact[i]) == round(exact_values[flat]) == 58
    assert found.evidence["engine_code"] == int(actual[i]) == 59
    assert (f"{engine} requantizes conv with a float32 multiplier ({engine} rule); in {moved} of {exact.numel()} "
            f"outputs" in found.explanation and f"first at {index}: accumulator {int(acc[i])}, exact code "
            f"{int(exact[i])}, engine code {int(actual[i])})." in found.explanation)

    layer = next(l for l in report.layers if l.name == "conv")
    assert layer.mismatched == moved and layer.unexplained == 0
    assert layer.stages["requantization"] == moved
    assert sum(layer.stages.values()) == moved


@pytest.mark.parametrize("engine", ["fbgemm", "qnnpack"])
def test_exact_scales_have_no_arithmetic_causes(engine):
    weight_codes = torch.full((1, 1), 3)
    prepared, converted = build_arithmetic(weight_codes, 1.0, 1.0, 4.0, engine)
    x_codes = torch.arange(256).reshape(1, 1, 16, 16)
    x = x_codes.float()
    _, _, exact, fake, actual = _direct_codes(prepared, converted, x, x_codes, weight_codes)
    assert torch.equal(fake, exact) and torch.equal(actual, exact)
    report = qparity.doctor(prepared, converted, (x,))
    assert report.ok and report.causes == []
    assert not kinds(report) & {"float_accumulation", "requantization"}
