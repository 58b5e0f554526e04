"""Every misuse of the `qparity` command ends in one line on stderr and a non-zero exit status, never a
traceback or a table; `--debug` shows the traceback."""
import numpy as np
import pytest
import torch
from torch import nn

import qparity as qp
from qparity.cli import main
from helpers import prepare_and_convert


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory with a tflite model (.qp and .tflite), garbage files, and .npy inputs of every kind."""
    pytest.importorskip("ai_edge_litert")
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(8, 2, 6, 6)
    integer = prepare_and_convert(model, (x,), "tflite", [x])[1]
    integer.save(root / "model.qp")
    qp.export(integer, root / "model.tflite")
    for name in ("garbage.qp", "garbage.tflite", "garbage.onnx", "garbage.npy"):
        (root / name).write_bytes(b"not what the name says\n" * 20)
    np.save(root / "ints.npy", np.zeros((4, 2, 6, 6), np.int64))
    np.save(root / "nan.npy", np.full((4, 2, 6, 6), np.nan, np.float32))
    np.save(root / "float64.npy", np.full((4, 2, 6, 6), 0.1))
    np.save(root / "wrong_shape.npy", np.zeros((4, 3), np.float32))
    np.save(root / "object.npy", np.array([{}], dtype=object), allow_pickle=True)
    np.savez(root / "several.npz", a=np.zeros(3, np.float32))
    (root / "broken.py").write_text("def build():\n    raise ValueError('boom')\n")
    (root / "syntax.py").write_text("x = (\n")
    return root


MISUSE = [
    ([], "arguments are required: command"),
    (["nope"], "invalid choice: 'nope'"),
    (["demo", "--epochs", "x"], "--epochs: must be an integer, got 'x'"),
    (["demo", "--epochs", "0"], "--epochs: must be at least 1"),
    (["demo", "--float-epochs", "-1"], "--float-epochs: must be at least 0"),
    (["demo", "--target", "tpu"], "invalid choice: 'tpu'"),
    (["demo", "--seed", "-1"], "--seed: must be at least 0"),
    (["info", "extra"], "unrecognized arguments: extra"),
    (["export"], "arguments are required: model, output"),
    (["export", "{d}/absent.qp", "{d}/out.tflite"], "FileAccessError: the model file .* does not exist"),
    (["export", "{d}", "{d}/out.tflite"], "FileAccessError: the model file .* is a directory"),
    (["export", "{d}/garbage.qp", "{d}/out.tflite"], "ModelFileError: .* is not a qparity model file"),
    (["export", "{d}/model.tflite", "{d}/out.tflite"], "ModelFileError: .* is not a qparity model file"),
    (["export", "{d}/model.qp", "{d}/out.txt"], "ExportError: cannot tell the format"),
    (["export", "{d}/model.qp", "{d}/out.onnx"], "ExportError: .* target 'tflite' cannot be exported to .onnx"),
    (["export", "{d}/model.qp", "{d}/absent/out.tflite"], "FileAccessError: cannot write .* does not exist"),
    (["export", "{d}/model.qp", "{d}/model.qp.tflite/"], "ExportError: cannot tell the format"),
    (["verify", "{d}/model.qp", "{d}/absent.tflite"], "FileAccessError: the exported file .* does not exist"),
    (["verify", "{d}/model.qp", "{d}/garbage.tflite"], "ModelFileError: .* is not a TFLite model LiteRT can load"),
    (["verify", "{d}/model.qp", "{d}/garbage.onnx"], "ExportError: .* cannot be verified against .onnx"),
    (["verify", "{d}/model.qp", "{d}/model.qp"], "ExportError: cannot tell the format"),
    (["verify", "{d}/model.tflite", "{d}/model.tflite"], "ModelFileError: .* is not a qparity model file"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/ints.npy"], "holds int64 values"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/nan.npy"], "288 NaN or infinite"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/float64.npy"], "float32 cannot hold exactly"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/wrong_shape.npy"], "has shape \\(4, 3\\)"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/object.npy"], "is not a .npy array file"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/several.npz"], "holds several arrays"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/garbage.npy"], "is not a .npy file"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}/absent.npy"], "--inputs file .* does not exist"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--inputs", "{d}"], "--inputs file .* is a directory"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--samples", "0"], "--samples: must be at least 1"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--samples", "1e3"], "--samples: must be an integer"),
    (["verify", "{d}/model.qp", "{d}/model.tflite", "--seed", "abc"], "--seed: must be an integer"),
    (["golden", "{d}/absent.qp", "{d}/golden"], "the model file .* does not exist"),
    (["golden", "{d}/model.qp", "{d}/ints.npy"], "Not a directory"),
    (["golden", "{d}/model.qp", "{d}/golden", "--inputs", "{d}/ints.npy"], "holds int64 values"),
    (["golden", "{d}/model.qp", "{d}/golden", "--samples", "-3"], "--samples: must be at least 1"),
    (["doctor", "{d}/absent.py"], "no script at"),
    (["doctor", "{d}"], "no script at"),
    (["doctor", "{d}/model.qp"], "is not a Python script"),
    (["doctor", "{d}/broken.py"], "broken.py raised ValueError: boom"),
    (["doctor", "{d}/syntax.py"], "raised SyntaxError"),
    (["doctor", "{d}/broken.py:absent"], "has no function 'absent'"),
]


@pytest.mark.parametrize("argv, message", MISUSE, ids=[" ".join(a).replace("{d}/", "") or "(none)" for a, _ in MISUSE])
def test_misuse_prints_one_error_line_and_exits_non_zero(files, capsys, argv, message):
    import re

    status = main([a.format(d=files) for a in argv])
    err = capsys.readouterr().err
    assert status != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qparity: error: "), err
    assert re.search(message, lines[0]), lines[0]


def test_verify_of_a_garbage_onnx_file_is_an_error_not_a_mismatch_table(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    prepare_and_convert(nn.Linear(4, 3), (x,), "onnxruntime", [x])[1].save(tmp_path / "model.qp")
    (tmp_path / "model.onnx").write_bytes(b"garbage" * 10)
    assert main(["verify", str(tmp_path / "model.qp"), str(tmp_path / "model.onnx")]) == 1
    captured = capsys.readouterr()
    assert "is not an ONNX model ONNX Runtime can load" in captured.err and "MISMATCH" not in captured.out


def test_verify_of_a_file_exported_from_another_model_names_the_shapes(files, tmp_path, capsys):
    torch.manual_seed(1)
    x = torch.randn(8, 5)
    other = prepare_and_convert(nn.Linear(5, 3), (x,), "tflite", [x])[1]
    qp.export(other, tmp_path / "other.tflite")
    assert main(["verify", str(files / "model.qp"), str(tmp_path / "other.tflite")]) == 1
    assert "takes inputs of shape [[1, 5]]; the model's are [[8, 2, 6, 6]]" in capsys.readouterr().err


def test_help_and_version_exit_zero(capsys):
    assert main(["--version"]) == 0
    assert main(["export", "--help"]) == 0


def test_debug_shows_the_traceback(files):
    from qparity.errors import FileAccessError

    with pytest.raises(FileAccessError):
        main(["--debug", "export", str(files / "absent.qp"), str(files / "out.tflite")])
    with pytest.raises(FileAccessError):
        main(["export", str(files / "absent.qp"), str(files / "out.tflite"), "--debug"])


def test_an_unexpected_error_is_one_line_naming_debug(monkeypatch, capsys):
    from qparity import cli

    def broken(console):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "info", broken)
    assert main(["info"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected ZeroDivisionError" in err and "--debug" in err


def test_a_failed_export_leaves_no_file(files, monkeypatch):
    from qparity.export import tflite

    def failing(model, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tflite, "export_tflite", failing)
    before = sorted(p.name for p in files.iterdir())
    assert main(["export", str(files / "model.qp"), str(files / "new.tflite")]) == 1
    assert sorted(p.name for p in files.iterdir()) == before
