"""The `qparity` console script and the motivating example: they run, and they report what they computed."""
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import qparity
from qparity import cli
from qparity.demo import DemoConfig, DemoResult, ModelResult, TargetResult, run_demo
from qparity.errors import NotCalibratedError
from helpers import require_optional_runtime, require_runtime

ROOT = Path(__file__).resolve().parents[1]
MISMATCH_LINE = re.compile(r"^fake-quant vs integer vs runtimes: (\d+) mismatched of (\d+) output codes \((.+)\)$",
                           re.M)
TINY = ["--float-epochs", "3", "--epochs", "1"]


@pytest.fixture(scope="module")
def demo_result():
    return run_demo(DemoConfig(float_epochs=3, qat_epochs=1))


def test_demo_trains_every_target_bit_exact_with_sane_accuracy(demo_result):
    resnet = demo_result.models[0]
    assert resnet.float_accuracy > 0.8 and not resnet.refused
    assert [t.target for t in resnet.targets] == list(qparity.TARGETS)
    for t in resnet.targets:
        assert t.fake_quant_accuracy > 0.8
        assert t.integer_accuracy == t.fake_quant_accuracy
        assert (t.mismatched, t.compared) == (0, 3600)  # 360 test digits x 10 classes


def test_demo_second_model_runs_every_target_that_accepts_its_operators(demo_result):
    """The MobileNetV3-style model (hardswish, depthwise conv, squeeze-excite with sigmoid and mul): bit-exact
    where it runs, and each other target refused with prepare_qat's reason naming the module."""
    from qparity.ops.registry import OPERATORS

    mobile = demo_result.models[1]
    assert mobile.name == "mobilenetv3-style" and mobile.float_accuracy > 0.5
    expected = [t for t in qparity.TARGETS
                if all(t not in OPERATORS[op].refused_by for op in ("hardswish", "sigmoid", "mul"))]
    assert [t.target for t in mobile.targets] == expected and {"exact", "tflite", "xnnpack"} <= set(expected)
    for t in mobile.targets:
        assert (t.mismatched, t.compared) == (0, 3600)
        assert t.runtime is None or t.runtime.mismatched == 0
    assert {target for target, _ in mobile.refused} == set(qparity.TARGETS) - set(expected)
    for target, reason in mobile.refused:
        assert "cannot run on target" in reason and "module" in reason


@pytest.mark.parametrize("target, module", [("tflite", "ai_edge_litert"), ("xnnpack", "ai_edge_litert"),
                                            ("onnxruntime", "onnxruntime"), ("fbgemm", "torch"),
                                            ("x86", "torch"),
                                            ("qnnpack", "torch")])
def test_demo_runs_the_exported_file_in_the_real_runtime(demo_result, target, module):
    require_runtime(module)
    (t,) = [t for t in demo_result.models[0].targets if t.target == target]
    assert t.runtime is not None, t.skipped
    assert t.runtime.mismatched == 0 and t.runtime.compared >= 3600
    assert t.runtime.accuracy == t.integer_accuracy


def test_demo_runs_both_networks_tosa_files_in_tosas_reference_model(demo_result):
    require_optional_runtime("tosa_reference_model", "tosa")
    for model in demo_result.models:
        (t,) = [t for t in model.targets if t.target == "tosa"]
        assert t.runtime is not None, t.skipped
        assert t.runtime.mismatched == 0 and t.runtime.compared >= 3600
        assert t.runtime.accuracy == t.integer_accuracy


def test_demo_command_ends_with_the_zero_mismatch_line(capsys):
    assert cli.main(["demo", "--target", "tflite", *TINY]) == 0
    output = capsys.readouterr().out
    line = MISMATCH_LINE.search(output)
    assert line, f"no mismatch line in the demo's output:\n{output}"
    assert line.group(1) == "0" and line.group(3) == "bit-exact" and int(line.group(2)) >= 4 * 3600
    assert "mobilenetv3-style" in output


def test_demo_mismatch_line_reports_the_measured_count(monkeypatch, capsys):
    broken = DemoResult(train_size=1437, test_size=360, models=[ModelResult("resnet-style", "", 0.9, [
        TargetResult("exact", fake_quant_accuracy=0.9, integer_accuracy=0.89, mismatched=7, compared=3600)])])
    monkeypatch.setattr(cli, "run_demo", lambda config, progress=None: broken)
    assert cli.main(["demo"]) == 1
    line = MISMATCH_LINE.search(capsys.readouterr().out)
    assert line and line.group(1) == "7" and line.group(3) != "bit-exact"


def test_demo_exits_nonzero_with_the_message_of_a_qparity_error(monkeypatch, capsys):
    def fail(config, progress=None):
        raise NotCalibratedError("the observer of module 'fc' has seen no data")

    monkeypatch.setattr(cli, "run_demo", fail)
    assert cli.main(["demo"]) != 0
    assert "the observer of module 'fc' has seen no data" in capsys.readouterr().err


def test_demo_rejects_zero_qat_epochs(capsys):
    assert cli.main(["demo", "--epochs", "0"]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_info_lists_the_version_and_every_target(capsys):
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert qparity.__version__ in output
    for target in qparity.TARGETS:
        assert target in output


def test_info_names_the_torch_version_and_the_engine_semantics_that_apply(capsys):
    import torch

    from qparity.numerics.pytorch_versions import installed_kernels

    assert cli.main(["info"]) == 0
    output = " ".join(capsys.readouterr().out.split())
    assert f"torch {torch.__version__}" in output
    assert f"PyTorch {installed_kernels().release}'s kernels, checked bit for bit" in output


def test_console_script_is_declared_and_runs():
    (script,) = entry_points(group="console_scripts", name="qparity")
    assert script.value == "qparity.cli:main"
    result = subprocess.run([sys.executable, "-m", "qparity.cli", "info"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime" in result.stdout


def test_seed_conv1x1_example_has_no_qparity_mismatch_and_shows_torch_ao_ones():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "seed_conv1x1.py")], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^qparity mismatches: 0$", result.stdout, re.M), result.stdout
    per_case = re.findall(r"fake-quant vs integer: (\d+) mismatched", result.stdout)
    assert len(per_case) == 3 * len(qparity.TARGETS) and set(per_case) == {"0"}
    torch_ao = re.search(r"^torch\.ao total: (\d+) mismatched", result.stdout, re.M)
    assert torch_ao and int(torch_ao.group(1)) > 0
