"""Export to ExecuTorch .pte (XNNPACK delegate) and run the file in ExecuTorch's runtime: 0 mismatched codes.

Lowering takes seconds per model, so the property test draws few models, each holding every operator the .pte
exporter writes (conv, depthwise conv, linear, add, mul, hardswish, sigmoid, clamps, pad, max pool, global mean,
flatten, dropout) on random grids; the demo models are checked whole. Target `executorch-xnnpack` is
what the file computes: where it differs from target `xnnpack` (LiteRT), this shows it.
"""
import pytest
import torch
import torch.nn.functional as F
from helpers import prepare_and_convert, require_optional_runtime
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from op_models import random_batches
from torch import nn

import qparity as qp
from qparity.cli import main
from qparity.demo import DigitsNet, MobileDigitsNet
from qparity.errors import ExportError, ModelFileError, UnsupportedOpError

require_optional_runtime("executorch", "executorch")

TARGET = "executorch-xnnpack"


def export_and_verify(im, inputs, path):
    qp.export(im, path)
    report = qp.verify(im, path, inputs)
    assert report.ok and report.mismatched == 0, str(report)
    return report


class EveryWrittenOperator(nn.Module):
    def __init__(self, groups: int, stride: int, low: float, high: float):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=stride, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=False)
        self.side = nn.Conv2d(3, 8, 1, stride=stride)
        self.gate = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)
        self.low, self.high = low, high

    def forward(self, x):
        y = F.hardswish(self.stem(x))
        y = torch.clamp(self.depthwise(y), self.low, self.high) + y
        y = F.dropout(y + F.relu(self.side(x)), 0.1, self.training)
        y = y * torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        y = torch.clamp(F.max_pool2d(F.pad(y, (1, 1, 1, 1)), 2), self.low, self.high)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@settings(max_examples=2, deadline=None, phases=[Phase.generate])  # no shrinking: each example lowers a model
@given(seed=st.integers(0, 2**16), groups=st.sampled_from([1, 8]), stride=st.sampled_from([1, 2]),
       bounds=st.sampled_from([(-1.0, 1.0), (0.0, 6.0), (-0.5, 3.0)]))
def test_every_operator_the_pte_exporter_writes_gives_the_runtimes_codes(tmp_path_factory, seed, groups, stride,
                                                                         bounds):
    torch.manual_seed(seed)
    batches = random_batches(seed, (8, 3, 8, 8))
    _, im = prepare_and_convert(EveryWrittenOperator(groups, stride, *bounds), batches[0], TARGET, batches, lr=1e-3)
    inputs = torch.cat(random_batches(seed + 1, (16, 3, 8, 8), count=4, spread=float(batches[0].std()) * 1.5))
    export_and_verify(im, inputs, tmp_path_factory.mktemp("pte") / "model.pte")


class NewerOperators(nn.Module):
    """sub, numbers, a parameter, conv_transpose2d, leaky_relu, gelu, tanh, nearest upsampling, amax and mean over
    other dims than H and W: the operators the .pte exporter writes through XNNPACK's qs8 views, pools and
    reductions, and float kernels between converts."""

    def __init__(self, slope: float, factor: int):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.Conv2d(3, 4, 1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=factor, padding=1, output_padding=factor - 1)
        self.gain = nn.Parameter(torch.rand(1, 4, 1, 1) + 0.5)
        self.slope, self.factor = slope, factor

    def forward(self, x):
        y = F.leaky_relu(self.stem(x), self.slope) - F.gelu(self.side(x))
        z = F.relu(self.up(y)) + F.interpolate(torch.tanh(y), scale_factor=self.factor, mode="nearest") * 0.5
        z = (1.0 - z) * self.gain + 0.25
        return torch.amax(z, 1) - z.mean(1)


@settings(max_examples=2, deadline=None, phases=[Phase.generate])  # no shrinking: each example lowers a model
@given(seed=st.integers(0, 2**16), slope=st.sampled_from([0.01, 0.1, 0.37]), factor=st.sampled_from([2, 3]))
def test_sub_numbers_parameters_transposed_convs_activations_upsampling_and_reductions_give_the_runtimes_codes(
        tmp_path_factory, seed, slope, factor):
    torch.manual_seed(seed)
    batches = random_batches(seed, (8, 3, 5, 5))
    _, im = prepare_and_convert(NewerOperators(slope, factor), batches[0], TARGET, batches, lr=1e-3)
    inputs = torch.cat(random_batches(seed + 1, (16, 3, 5, 5), count=4, spread=float(batches[0].std()) * 1.5))
    export_and_verify(im, inputs, tmp_path_factory.mktemp("pte") / "model.pte")


def test_leaky_relu_is_xnnpacks_float_kernel_between_converts_not_litert_qs8_lrelu():
    """ExecuTorch's partitioner takes leaky_relu only in float32: f(x * alpha) between the qs8/f32 converts, where
    LiteRT's delegate runs XNNPACK's qs8 lrelu (8-bit multipliers): the two tables differ."""
    from qparity.numerics.executorch_xnnpack import leaky_relu_table
    from qparity.numerics.litert_activations import xnnpack_leaky_relu_table

    source = qp.QParams(torch.tensor(0.0731), torch.tensor(-9), "int8")
    out = qp.QParams(torch.tensor(0.0419), torch.tensor(17), "int8")
    assert not torch.equal(leaky_relu_table(source, out, 0.1), xnnpack_leaky_relu_table(source, out, 0.1))


@pytest.mark.parametrize("build", [DigitsNet, MobileDigitsNet])
def test_the_demo_models_export_to_pte_and_verify_with_zero_mismatches(tmp_path, build):
    torch.manual_seed(0)
    batches = [torch.randn(16, 1, 8, 8) * 2 for _ in range(3)]
    _, im = prepare_and_convert(build(), batches[0], TARGET, batches, lr=1e-2)
    report = export_and_verify(im, torch.randn(100, 1, 8, 8) * 2, tmp_path / "model.pte")
    assert sum(r.total for r in report.results) == 1000


def test_qparity_export_and_verify_commands_take_pte_files(tmp_path, capsys):
    torch.manual_seed(0)
    x = torch.randn(8, 2, 6, 6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    _, im = prepare_and_convert(model, x, TARGET, [x, x * 2])
    im.save(tmp_path / "model.qp")
    exported = tmp_path / "model.pte"
    assert main(["export", str(tmp_path / "model.qp"), str(exported)]) == 0
    assert main(["verify", str(tmp_path / "model.qp"), str(exported), "--samples", "16"]) == 0
    assert "OK: 0 mismatched codes" in capsys.readouterr().out


def test_a_model_xnnpack_does_not_take_whole_is_refused_with_the_nodes_left_out(tmp_path):
    class Strided(nn.Module):
        def forward(self, x):
            return x[:, :, ::2] + x[:, :, 1::2]

    x = torch.randn(4, 2, 6, 4)
    _, im = prepare_and_convert(Strided(), x, TARGET, [x])
    with pytest.raises(ExportError, match="outside the delegate: .*slice"):
        qp.export(im, tmp_path / "model.pte")
    assert not (tmp_path / "model.pte").exists()


@pytest.mark.parametrize("content", [b"", b"not a program at all", b"\x00" * 64, b"PTE0" + bytes(range(256)) * 8])
def test_a_corrupt_or_hostile_pte_file_is_a_model_file_error(tmp_path, content):
    x = torch.randn(4, 2, 6, 6)
    _, im = prepare_and_convert(nn.Conv2d(2, 3, 3), x, TARGET, [x])
    path = tmp_path / "model.pte"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match="ExecuTorch cannot load"):
        qp.verify(im, path, x)


def test_other_targets_are_refused_for_pte_and_executorch_xnnpack_for_tflite(tmp_path):
    x = torch.randn(4, 2, 6, 6)
    _, xnnpack = prepare_and_convert(nn.Conv2d(2, 3, 3), x, "xnnpack", [x])
    with pytest.raises(ExportError, match="train with target='executorch-xnnpack'"):
        qp.export(xnnpack, tmp_path / "model.pte")
    _, executorch = prepare_and_convert(nn.Conv2d(2, 3, 3), x, TARGET, [x])
    with pytest.raises(ExportError, match="export it to a .pte file instead"):
        qp.export(executorch, tmp_path / "model.tflite")


def test_cat_of_other_grids_requantizes_as_the_delegates_two_converts(tmp_path):
    class Cat(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(2, 3, 1), nn.Conv2d(2, 3, 1)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x) * 3.0], 1)

    x = torch.randn(4, 2, 6, 6)
    _, im = prepare_and_convert(Cat(), x, TARGET, [x, x * 2])
    export_and_verify(im, torch.randn(64, 2, 6, 6) * 2, tmp_path / "model.pte")


@pytest.mark.parametrize("model, match", [
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Upsample(scale_factor=2, mode="bilinear")),
     "upsample_bilinear at module '1'.*only in float32.*UpsampleBilinear2dConfig"),
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.ELU()), "elu at module '1'.*EluConfig is commented out"),
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.GELU("tanh")), "gelu at module '1'.*computes the erf form"),
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softmax(-1)), "softmax at module '1'.*only in float32.*SoftmaxConfig"),
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.AvgPool2d(2)), "avg_pool2d at module '1'.*mean over the whole image"),
    (nn.Sequential(nn.Conv2d(2, 3, 3), nn.AdaptiveAvgPool2d(2)), "avg_pool2d at module '1'.*to \\(2, 2\\)"),
])
def test_what_the_delegate_runs_in_float_or_leaves_out_is_refused_at_prepare_qat(model, match):
    with pytest.raises(UnsupportedOpError, match=match):
        qp.prepare_qat(model, torch.randn(4, 2, 6, 6), target=TARGET)


class QDQActivation(nn.Module):
    """QUANTIZE, DEQUANTIZE, an activation, QUANTIZE, DEQUANTIZE on fixed grids: one delegated table, all codes."""

    def __init__(self, function, source, out):
        super().__init__()
        self.function, self.source, self.out = function, source, out

    def forward(self, x):
        qd = torch.ops.quantized_decomposed
        q = qd.quantize_per_tensor.default(x, *self.source, -128, 127, torch.int8)
        y = self.function(qd.dequantize_per_tensor.default(q, *self.source, -128, 127, torch.int8))
        return qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(y, *self.out, -128, 127, torch.int8),
                                                *self.out, -128, 127, torch.int8)


def reference_hardswish_codes(source, out):
    """The reference formula x / 6 * clamp(x + 3, 0, 6), quantized as XNNPACK's reference kernel does."""
    real = (torch.arange(-128, 128) - source.zero_point).to(torch.float32) * source.scale
    h = (real / 6.0) * torch.clamp(real + 3.0, 0.0, 6.0)
    return torch.round(h * (1.0 / out.scale) + out.zero_point).to(torch.int64).clamp(-128, 127)


def litert_tanh_codes(source, out):
    from qparity.numerics.litert_activations import xnnpack_table
    return xnnpack_table("tanh", source, out, {})


def litert_gelu_codes(source, out):
    from qparity.numerics.litert_activations import xnnpack_table
    return xnnpack_table("gelu", source, out, {"approximate": "none"})


# Grids found by the emulation where the float kernel's table and the formula it approximates differ by one code.
@pytest.mark.parametrize("function, kind, source, out, formula", [
    (F.hardswish, "hardswish", (0.006818439811468124, -1), (0.0592980831861496, -67), reference_hardswish_codes),
    (torch.tanh, "tanh", (0.051969880588694915, 13), (1 / 128, 0), litert_tanh_codes),
    (F.gelu, "gelu", (0.05816517406693997, -65), (0.03243390453346474, -121), litert_gelu_codes),
])
def test_float_only_activations_are_xnnpacks_float_kernels_with_their_fused_multiply_adds(
        tmp_path, function, kind, source, out, formula):
    """hardswish (f32-vhswish: x * clamp(fmaf(x, 1/6, 1/2), 0, 1)), tanh (f32-vtanh: rational 9/8 by fmaf) and
    gelu (f32-vgelu: rational 12/10 erf by fmaf) between the converts: the runtime gives the kernel's codes for all
    256 codes, one apart from the formula (LiteRT's tables from the C library's tanhf / erfcf)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from qparity.export.pte import run_pte
    from qparity.numerics import get_target

    x = ((torch.arange(-128, 128, dtype=torch.float32) - source[1]) * source[0]).reshape(1, 1, 16, 16)
    exported = torch.export.export(QDQActivation(function, source, out), (x,))
    (tmp_path / "f.pte").write_bytes(
        to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch().buffer)
    runtime = torch.round(run_pte(tmp_path / "f.pte", [x])[0].reshape(-1) / out[0]).to(torch.int64) + out[1]
    grids = [qp.QParams(torch.tensor(s, dtype=torch.float32), torch.tensor(z), "int8") for s, z in (source, out)]
    codes = torch.arange(-128, 128)
    target = get_target(TARGET)
    attrs = {"approximate": "none"} if kind == "gelu" else {}
    emulated = target.hardswish(codes, *grids) if kind == "hardswish" else target.activation(kind, codes, *grids, attrs)
    assert torch.equal(runtime, emulated)
    assert int((formula(*grids) != runtime).sum()) == 1


def test_global_mean_and_hardswish_follow_xnnpack_not_litert():
    """The two rules where ExecuTorch's XNNPACK and LiteRT's differ, pinned on ties and on a whole table."""
    from qparity.numerics import get_target
    from qparity.numerics.executorch_xnnpack import hardswish_table
    from qparity.numerics.litert_activations import hard_swish_table

    grid = qp.QParams(torch.tensor(0.05), torch.tensor(-128), "int8")
    sums, counts = torch.tensor([[[[408]]]]), torch.tensor([[[[16]]]])  # codes summing to -1640: mean -102.5
    assert int(get_target(TARGET).average(sums, counts, grid)) == -102  # XNNPACK: nearbyint, ties to even
    assert int(get_target("xnnpack").average(sums, counts, grid)) == -103  # TFLite: ties away from zero
    source = qp.QParams(torch.tensor(0.0345365629), torch.tensor(13), "int8")
    out = qp.QParams(torch.tensor(0.0169263799), torch.tensor(-106), "int8")
    assert not torch.equal(hardswish_table(source, out), hard_swish_table(source, out))
