"""The `qparity` console script and the motivating example: they run, and they report what they computed."""
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import qparity
from qparity import cli
from qparity.demo import DemoResult
from qparity.errors import NotCalibratedError

ROOT = Path(__file__).resolve().parents[1]
MISMATCH_LINE = re.compile(r"^fake-quant vs integer: (\d+) mismatched of (\d+) output values \((.+)\)$", re.M)
TINY = ["--float-epochs", "3", "--epochs", "1"]


def accuracies(output: str) -> dict:
    rows = {"float": r"float", "fake-quant": r"fake-quant \(QAT, frozen\)", "integer": r"integer \(converted\)"}
    found = {}
    for key, label in rows.items():
        match = re.search(label + r"\W+(\d+\.\d+)%", output)
        assert match, f"no {key} accuracy in the demo's output:\n{output}"
        found[key] = float(match.group(1)) / 100
    return found


@pytest.mark.parametrize("target", qparity.TARGETS)
def test_demo_is_bit_exact_with_sane_accuracy(target, capsys):
    assert cli.main(["demo", "--target", target, *TINY]) == 0
    output = capsys.readouterr().out
    line = MISMATCH_LINE.search(output)
    assert line, f"no mismatch line in the demo's output:\n{output}"
    assert (line.group(1), line.group(2), line.group(3)) == ("0", "3600", "bit-exact")  # 360 test digits x 10
    found = accuracies(output)
    assert found["float"] > 0.8
    assert found["fake-quant"] > 0.8
    assert found["integer"] == found["fake-quant"]


def test_demo_mismatch_line_reports_the_measured_count(monkeypatch, capsys):
    broken = DemoResult(target="tflite", train_size=1437, test_size=360, float_accuracy=0.9,
                        fake_quant_accuracy=0.9, integer_accuracy=0.89, mismatched=7, compared=3600)
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
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--epochs", "0"])
    assert exit_info.value.code != 0
    assert "--epochs" in capsys.readouterr().err


def test_info_lists_the_version_and_every_target(capsys):
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert qparity.__version__ in output
    for target in qparity.TARGETS:
        assert target in output


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
