"""The .pte doctor: an ExecuTorch .pte lowered from a converted PT2E model (XNNPACKQuantizer, per-channel) against
that model. Every count it states is recomputed here from the two models directly, and the file's codes that
differ from the converted model's are all predicted by the delegate's rule (target executorch-xnnpack) and, for
the nodes the partitioner leaves outside the delegate, ExecuTorch's portable kernels."""
import json
import warnings

import pytest
import torch

import qparity
from helpers import require_optional_runtime
from pt2e_case import PoolNet, build_pt2e
from torch import nn
from qparity.cli import main
from qparity.doctor.pte import PteDoctorInputError, delegate_model, doctor_pte, outside_delegate
from qparity.errors import ModelFileError, QParityError


def lower_pt2e(tmp_path_factory, model_class, batch_norm: bool = True):
    """(converted, example_inputs, path of the .pte lowered from it, the lowered graph's nodes outside the
    delegate)."""
    require_optional_runtime("torchao", "executorch")
    require_optional_runtime("executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from qparity.export.pte import undelegated_nodes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)  # the model's initial weights: the same file in every run and test order
        _, converted, x = build_pt2e(model=model_class(), batch_norm=batch_norm)
        edge = to_edge_transform_and_lower(torch.export.export(converted, x), partitioner=[XnnpackPartitioner()])
        outside = undelegated_nodes(edge.exported_program().graph)
        path = tmp_path_factory.mktemp("pte") / f"{model_class.__name__}.pte"
        path.write_bytes(edge.to_executorch().buffer)
    return converted, x, path, outside


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(converted, example_inputs, path of the .pte lowered from it), all nodes in the XNNPACK delegate."""
    converted, x, path, outside = lower_pt2e(tmp_path_factory, PoolNet)
    assert outside == []
    return converted, x, path


class MeanNet(nn.Module):
    """conv+ReLU, a residual conv and add, x.mean((2, 3)) and a linear (pt2e_case.ResidualNet without BN): the
    partitioner leaves the mean (no keepdim) outside the delegate."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = y + self.conv2(y)
        return self.fc(y.mean((2, 3)))


class StridedPoolNet(nn.Module):
    """A max pool whose stride exceeds its kernel and a final mean: both outside the delegate (MaxPool2dConfig,
    MeanDimConfig), the mean the model's last operator."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        y = torch.max_pool2d(torch.relu(self.conv(x)), 2, 3)
        return torch.relu(self.conv2(y)).mean((2, 3))


@pytest.fixture(scope="module")
def lowered_with_mean(tmp_path_factory):
    converted, x, path, outside = lower_pt2e(tmp_path_factory, MeanNet)
    assert [name.split(" ")[0] for name in outside] == ["aten_mean_dim"]
    return converted, x, path


def inputs(count=100):
    return torch.randn(count, 3, 12, 12, generator=torch.Generator().manual_seed(5)) * 2


def test_pte_doctor_counts_the_files_differences_and_predicts_every_one(lowered):
    from qparity.export.pte import run_pte
    from qparity.export.tflite import codes_from_dequantized

    converted, x, path = lowered
    xs = inputs()
    report = doctor_pte(path, converted, (xs,))
    grid = qparity.from_torch(converted, x).output_qparams
    reference = torch.cat([codes_from_dequantized(converted(xs[i:i + 2]), grid) for i in range(0, len(xs), 2)])
    deployed = codes_from_dequantized(run_pte(path, (xs,))[0], grid)
    differ = int((reference != deployed).sum())
    assert report.mismatched == differ > 0 and report.total == reference.numel()
    assert report.outputs[0].max_code_diff == int((reference - deployed).abs().max())
    assert report.unexplained == 0 and not report.ok
    assert report.first_divergence == "conv2d" and report.layers[0].mismatched > 0
    assert "int32" in report.cause and "round(y * (1/scale))" in report.cause


def test_cli_doctor_on_a_pte_with_a_saved_reference(lowered, tmp_path, capsys):
    converted, x, path = lowered
    qparity.from_torch(converted, x).save(tmp_path / "reference.qp")
    code = main(["doctor", str(path), "--reference", str(tmp_path / "reference.qp"), "--json", "--samples", "32"])
    data = json.loads(capsys.readouterr().out)
    assert code == (0 if data["ok"] else 1) and data["unexplained"] == 0
    assert data["total"] == 32 * 8 and [t["name"] for t in data["layers"]] == ["conv2d", "conv2d_1"]


def test_a_corrupt_pte_is_a_model_file_error(lowered, tmp_path):
    converted, _, path = lowered
    broken = tmp_path / "broken.pte"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelFileError, match="ExecuTorch cannot load"):
        doctor_pte(broken, converted, (inputs(4),))


def test_the_reference_must_be_the_pt2e_model(lowered):
    _, _, path = lowered
    with pytest.raises(PteDoctorInputError, match="convert_pt2e model the file was lowered from") as error:
        doctor_pte(path, torch.nn.Linear(2, 2), (inputs(4),))
    assert isinstance(error.value, QParityError)


def _file_codes(converted, x, path, xs):
    from qparity.export.pte import run_pte
    from qparity.export.tflite import codes_from_dequantized

    grid = qparity.from_torch(converted, x).output_qparams
    return codes_from_dequantized(run_pte(path, (xs,))[0], grid)


def test_a_mean_outside_the_delegate_is_predicted_by_executorchs_portable_kernel(lowered_with_mean):
    converted, x, path = lowered_with_mean
    xs = inputs(300)
    report = doctor_pte(path, converted, (xs,))
    assert report.unexplained == 0 and report.total == 300 * 4
    assert any("aten::mean.out" in note and "emulates" in note for note in report.notes)
    # the prediction the report states, recomputed: the delegate's rule with the portable mean, code for code
    reference = qparity.from_torch(converted, x)
    codes = reference.quantize(xs)
    values = {name: v.codes for name, v in _executed(reference, codes).items() if hasattr(v, "codes")}
    predicted = delegate_model(reference, values, ("mean",)).run(codes)
    assert torch.equal(predicted, _file_codes(converted, x, path, xs))
    # and the portable mean is what it takes: XNNPACK's qs8 mean would put some of the mean's codes elsewhere
    xnnpack_rule = _executed(delegate_model(reference, values), codes)["mean"].codes
    portable_rule = _executed(delegate_model(reference, values, ("mean",)), codes)["mean"].codes
    assert not torch.equal(xnnpack_rule, portable_rule)


def _executed(model, codes):
    executor = model.executor()
    executor.run([codes.to(torch.int64)])
    return executor.values


def test_a_strided_max_pool_and_a_final_mean_outside_the_delegate_leave_nothing_unexplained(tmp_path_factory):
    converted, x, path, outside = lower_pt2e(tmp_path_factory, StridedPoolNet, batch_norm=False)
    assert [name.split(" ")[0] for name in outside] == ["aten_max_pool2d_with_indices_default", "aten_mean_dim"]
    xs = inputs(200)
    report = doctor_pte(path, converted, (xs,))
    assert report.unexplained == 0 and report.mismatched == int(
        (_file_codes(converted, x, path, xs) != torch.cat([_reference_codes(converted, x, xs[i:i + 2])
                                                            for i in range(0, len(xs), 2)])).sum())
    assert [note.split(" ")[0] for note in report.notes] == ["max_pool2d", "mean"]


def _reference_codes(converted, x, xs):
    from qparity.export.tflite import codes_from_dequantized

    return codes_from_dequantized(converted(xs), qparity.from_torch(converted, x).output_qparams)


def test_a_file_that_computes_something_else_is_still_unexplained(lowered_with_mean):
    """The portable emulation hides no real difference: a reference whose linear bias is three output steps off
    the file's leaves the codes it moves unexplained, and the report says so. (Only codes that do not saturate
    move: these inputs are twice the calibration's spread, so how many depends on the weights.)"""
    from qparity.runtime import IntegerLayer, IntegerModel

    converted, x, path = lowered_with_mean
    reference = qparity.from_torch(converted, x)
    layer = reference.layers["linear"]
    bias = layer.bias_codes.clone()
    bias[0] += 3 * float(reference.qparams["linear"].scale)
    shifted = IntegerModel(reference.graph, reference.target, reference.activation_dtype, reference.qparams,
                           {**reference.layers, "linear": IntegerLayer(layer.weight_codes, layer.weight_scale, bias)})
    report = doctor_pte(path, shifted, (inputs(50),))
    assert 0 < report.unexplained <= 50 and "bug to report" in report.cause


def test_a_kernel_call_qparity_does_not_emulate_is_named(lowered_with_mean):
    from qparity.export.pte_program import KernelCall, TensorArgument, kernel_calls

    converted, x, path = lowered_with_mean
    calls = kernel_calls(path)
    assert [str(c) for c in calls] == ["aten::mean.out"] and calls[0].arguments[1:3] == ((2, 3), False)
    reference = qparity.from_torch(converted, x)
    values = {name: v.codes for name, v in _executed(reference, reference.quantize(x[0])).items()
              if hasattr(v, "codes")}
    convolution = KernelCall("aten::convolution", "out", (TensorArgument((2, 3, 12, 12)),))
    outside = outside_delegate(reference, values, calls + [convolution])
    assert outside.emulated == {"mean": "aten::mean.out"} and outside.not_emulated == ["aten::convolution.out"]
    # a mean call whose dims are not the node's matches no node
    other = KernelCall("aten::mean", "out", (calls[0].arguments[0], (1,), False, None))
    assert outside_delegate(reference, values, [other]).not_emulated == ["aten::mean.out"]
