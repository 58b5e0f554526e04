"""`qparity export` and `qparity verify` on a saved model, through the real runtimes."""
import pytest
import torch
from torch import nn

import qparity as qp
from qparity.cli import main
from helpers import require_runtime


def saved_model(tmp_path, target):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.randn(8, 2, 6, 6)
    prepared = qp.prepare_qat(model, (x,), target=target)
    qp.calibrate(prepared, [x, x * 2])
    qp.freeze(prepared)
    path = tmp_path / "model.qp"
    qp.convert(prepared).save(path)
    return path


@pytest.mark.parametrize("target, suffix, runtime", [("tflite", ".tflite", "ai_edge_litert"),
                                                      ("onnxruntime", ".onnx", "onnxruntime")])
def test_export_then_verify_reports_zero_mismatches(tmp_path, capsys, target, suffix, runtime):
    require_runtime(runtime)
    model = saved_model(tmp_path, target)
    exported = tmp_path / f"model{suffix}"
    assert main(["export", str(model), str(exported)]) == 0
    assert exported.exists()
    assert main(["verify", str(model), str(exported), "--samples", "16"]) == 0
    assert "OK: 0 mismatched codes" in capsys.readouterr().out


def test_export_to_the_wrong_runtime_fails_with_the_right_target(tmp_path, capsys):
    model = saved_model(tmp_path, "tflite")
    assert main(["export", str(model), str(tmp_path / "model.onnx")]) == 1
    assert "train with target='onnxruntime'" in capsys.readouterr().err


def test_golden_command_writes_an_index_and_arrays(tmp_path, capsys):
    import json

    model = saved_model(tmp_path, "tflite")
    assert main(["golden", str(model), str(tmp_path / "golden"), "--samples", "2"]) == 0
    index = json.loads((tmp_path / "golden" / "index.json").read_text())
    assert index["target"] == "tflite" and index["nodes"]
    assert all((tmp_path / "golden" / n["output"]).exists() for n in index["nodes"] if isinstance(n.get("output"), str))
