"""The .pte doctor: an ExecuTorch .pte lowered from a converted PT2E model (XNNPACKQuantizer, per-channel) against
that model. Every count it states is recomputed here from the two models directly, and the file's codes that
differ from the converted model's are all predicted by the delegate's rule (target executorch-xnnpack)."""
import json
import warnings

import pytest
import torch

import qparity
from helpers import require_optional_runtime
from pt2e_case import PoolNet, build_pt2e
from qparity.cli import main
from qparity.doctor.pte import PteDoctorInputError, doctor_pte
from qparity.errors import ModelFileError, QParityError


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """(converted, example_inputs, path of the .pte lowered from it), all nodes in the XNNPACK delegate."""
    require_optional_runtime("torchao", "executorch")
    require_optional_runtime("executorch", "executorch")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from qparity.export.pte import undelegated_nodes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, converted, x = build_pt2e(model=PoolNet())
        edge = to_edge_transform_and_lower(torch.export.export(converted, x), partitioner=[XnnpackPartitioner()])
        assert undelegated_nodes(edge.exported_program().graph) == []
        path = tmp_path_factory.mktemp("pte") / "pool.pte"
        path.write_bytes(edge.to_executorch().buffer)
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
