"""`qparity compare`: real runtimes stand in for devices; compare must name the rule each one follows."""
import json

import numpy as np
import pytest
import torch

import qparity as qp
from qparity.cli import main
from qparity.errors import InputError, ModelFileError

from helpers import prepare_and_convert, require_optional_runtime, require_runtime
from models import ResNetish

SAMPLES = 6


@pytest.fixture(scope="module")
def tflite_model():
    torch.manual_seed(0)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    _, model = prepare_and_convert(ResNetish(channels=(4, 8)), (batches[0],), "tflite", batches)
    return model


@pytest.fixture(scope="module")
def golden_inputs():
    return torch.randn(SAMPLES, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 1.5


def litert_dumps(path, inputs, resolver, names):
    """Every integer tensor LiteRT computed that carries a golden node's name, batch by batch (the file's batch
    is 1), in its own NHWC layout: what a device dump looks like."""
    interpreter_module = require_runtime("ai_edge_litert.interpreter")
    interpreter = interpreter_module.Interpreter(
        model_path=str(path), experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=getattr(interpreter_module.OpResolverType, resolver))
    interpreter.allocate_tensors()
    index = {t["name"]: t["index"] for t in interpreter.get_tensor_details()}
    feed = interpreter.get_input_details()[0]["index"]
    dumps = {}
    for sample in inputs:
        interpreter.set_tensor(feed, sample[None].numpy())
        interpreter.invoke()
        for name in names:
            if name in index and interpreter.get_tensor(index[name]).dtype.kind in "iu":
                dumps.setdefault(name, []).append(interpreter.get_tensor(index[name]).copy())
    return {name: np.concatenate(parts) for name, parts in dumps.items()}


def write_golden_and_dumps(model, inputs, tmp_path, resolver):
    index = json.loads(qp.golden(model, inputs, tmp_path / "golden").read_text())
    qp.export(model, tmp_path / "model.tflite")
    dumps = litert_dumps(tmp_path / "model.tflite", inputs, resolver, [n["name"] for n in index["nodes"]])
    device = tmp_path / f"device_{resolver}"
    device.mkdir()
    for name, codes in dumps.items():
        np.save(device / f"{name}.npy", codes)
    return index, device


def test_litert_reference_kernels_are_the_tflite_rule(tflite_model, golden_inputs, tmp_path):
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, tmp_path, "BUILTIN_REF")
    report = qp.compare(tmp_path / "golden", device)
    assert report.ok and report.mismatched == 0 and report.first_divergence is None, str(report)
    assert len(report.layers) >= 10  # every conv, add, pool and the linear layer were dumped and compared
    rules = report.reproducing_rules
    assert "tflite" in rules and not {"xnnpack", "executorch-xnnpack", "onnxruntime", "exact"} & set(rules), str(report)


def test_litert_xnnpack_kernels_are_named_and_placed(tflite_model, golden_inputs, tmp_path):
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, tmp_path, "BUILTIN")
    report = qp.compare(tmp_path / "golden", device)
    assert not report.ok and report.mismatched > 0
    rules = report.reproducing_rules
    assert "xnnpack" in rules and not {"tflite", "tflite-micro", "onnxruntime", "exact", "tosa"} & set(rules), str(report)
    assert report.first_divergence is not None and report.first_divergence.op == "conv2d"
    first = report.layers.index(report.first_divergence)
    assert all(layer.mismatched == 0 for layer in report.layers[:first])
    assert "train and convert for 'xnnpack'" in str(report)


def test_raw_nhwc_dumps_of_outputs_only(tflite_model, golden_inputs, tmp_path):
    """A device that dumps raw bytes of its outputs alone: the rules then run the whole program."""
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, tmp_path, "BUILTIN_REF")
    raw = tmp_path / "raw"
    raw.mkdir()
    for output in index["outputs"]:
        np.load(device / f"{output['name']}.npy").astype(np.int8).tofile(raw / f"{output['name']}.bin")
    report = qp.compare(tmp_path / "golden", raw, layout="nhwc")
    assert report.ok and len(report.layers) == len(index["outputs"])
    assert "tflite" in report.reproducing_rules
    assert len(report.missing) == len(index["nodes"]) - len(index["outputs"])


def test_onnx_runtime_outputs_are_the_onnxruntime_rule(golden_inputs, tmp_path):
    ort = require_runtime("onnxruntime")
    torch.manual_seed(0)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    _, model = prepare_and_convert(ResNetish(channels=(4, 8)), (batches[0],), "onnxruntime", batches)
    index = json.loads(qp.golden(model, golden_inputs, tmp_path / "golden").read_text())
    qp.export(model, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (real,) = session.run(None, {session.get_inputs()[0].name: golden_inputs.numpy()})
    grid = model.output_qparams
    codes = np.round(real.astype(np.float64) / float(grid.scale)).astype(np.int64) + int(grid.zero_point)
    device = tmp_path / "device"
    device.mkdir()
    np.save(device / f"{index['outputs'][0]['name']}.npy", codes.astype(np.uint8))
    report = qp.compare(tmp_path / "golden", device)
    assert report.ok, str(report)
    assert "onnxruntime" in report.reproducing_rules


def test_a_layer_off_by_one_is_found_and_no_rule_claims_it(tflite_model, golden_inputs, tmp_path):
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, tmp_path, "BUILTIN_REF")
    victim = next(n["name"] for n in index["nodes"] if n["op"] == "conv2d")
    codes = np.load(device / f"{victim}.npy").astype(np.int16)
    codes[0, 0, 0, 0] = codes[0, 0, 0, 0] + (1 if codes[0, 0, 0, 0] < 127 else -1)
    np.save(device / f"{victim}.npy", codes.astype(np.int8))
    report = qp.compare(tmp_path / "golden", device)
    assert report.first_divergence.node == victim and report.first_divergence.mismatched == 1
    assert report.reproducing_rules == []
    # the next layer is judged on the device's own inputs: its arithmetic is still the tflite rule
    following = report.layers[report.layers.index(report.first_divergence) + 1]
    assert following.rules["tflite"] == 0


def test_cli_compare(tflite_model, golden_inputs, tmp_path, capsys):
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, tmp_path, "BUILTIN")
    assert main(["compare", str(tmp_path / "golden"), str(device)]) == 1
    out = capsys.readouterr().out
    assert "first diverging layer" in out and "xnnpack" in out
    again = tmp_path / "again"
    again.mkdir()
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, again, "BUILTIN_REF")
    assert main(["compare", str(again / "golden"), str(device)]) == 0


def test_bad_dumps_are_refused_with_the_reason(tflite_model, golden_inputs, tmp_path):
    index = json.loads(qp.golden(tflite_model, golden_inputs, tmp_path / "golden").read_text())
    golden = tmp_path / "golden"
    name = index["outputs"][0]["name"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no dump of any golden tensor"):
        qp.compare(golden, empty)
    for values, message in ((np.zeros((SAMPLES, 3), np.int8), "has shape"),
                            (np.zeros((SAMPLES, 10), np.float32), "integer codes"),
                            (np.full((SAMPLES, 10), 300, np.int16), "outside int8")):
        bad = tmp_path / f"bad_{message.replace(' ', '_')}"
        bad.mkdir()
        np.save(bad / f"{name}.npy", values)
        with pytest.raises(InputError, match=message):
            qp.compare(golden, bad)
    short = tmp_path / "short"
    short.mkdir()
    (short / f"{name}.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(InputError, match="bytes"):
        qp.compare(golden, short)
    with pytest.raises(InputError, match="layout"):
        qp.compare(golden, short, layout="chw")


def test_hostile_golden_index_is_refused(tflite_model, golden_inputs, tmp_path):
    path = qp.golden(tflite_model, golden_inputs, tmp_path / "golden")
    index = json.loads(path.read_text())
    device = tmp_path / "device"
    device.mkdir()
    np.save(device / f"{index['outputs'][0]['name']}.npy", np.zeros((SAMPLES, 10), np.int8))
    index["model"] = "../../outside.qp"
    path.write_text(json.dumps(index))
    with pytest.raises(ModelFileError, match="outside its directory"):
        qp.compare(tmp_path / "golden", device)
    path.write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        qp.compare(tmp_path / "golden", device)
    with pytest.raises(InputError, match="not a golden directory"):
        qp.compare(tmp_path / "nowhere", device)


def test_tflite_micro_outputs_are_the_tflite_micro_rule(tflite_model, tmp_path):
    """An MCU running a model trained for `tflite`: TFLite Micro's double-rounded FULLY_CONNECTED is told apart."""
    from qparity.export.tflite import codes_from_dequantized
    from qparity.export.tflite_micro import run_tflite_micro

    require_optional_runtime("tflite_micro", "tflm")
    inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.5
    index = json.loads(qp.golden(tflite_model, inputs, tmp_path / "golden").read_text())
    qp.export(tflite_model, tmp_path / "model.tflite")
    (real,) = run_tflite_micro(tmp_path / "model.tflite", (inputs,))
    device = tmp_path / "device"
    device.mkdir()
    codes = codes_from_dequantized(real, tflite_model.output_qparams)
    np.save(device / f"{index['outputs'][0]['name']}.npy", codes.numpy().astype(np.int8))
    report = qp.compare(tmp_path / "golden", device)
    rules = report.reproducing_rules
    assert "tflite-micro" in rules and not {"xnnpack", "onnxruntime", "exact", "tosa"} & set(rules), str(report)
    if not report.ok:  # the FC's second rounding showed on these inputs: the golden's own rule cannot claim them
        assert "tflite" not in rules


def test_tosa_reference_model_is_the_tosa_rule(tflite_model, golden_inputs, tmp_path):
    """The same integers (weights, grids) compiled for an Arm NPU as ExecuTorch's Arm backend lowers them."""
    from qparity.device_parity import _as_target
    from qparity.export.tosa import run_tosa

    require_optional_runtime("tosa_reference_model", "tosa")
    index = json.loads(qp.golden(tflite_model, golden_inputs, tmp_path / "golden").read_text())
    on_tosa = _as_target(tflite_model, "tosa")
    qp.export(on_tosa, tmp_path / "model.tosa")
    codes = on_tosa.quantize(golden_inputs)
    (outputs,) = run_tosa(tmp_path / "model.tosa", (codes,), on_tosa)
    device = tmp_path / "device"
    device.mkdir()
    np.save(device / f"{index['outputs'][0]['name']}.npy", outputs.numpy().astype(np.int8))
    report = qp.compare(tmp_path / "golden", device)
    rules = report.reproducing_rules
    assert "tosa" in rules and not {"xnnpack", "onnxruntime"} & set(rules), str(report)


def test_a_uint8_device_running_an_int8_model_is_named_with_the_shift(tflite_model, golden_inputs, tmp_path):
    """ONNX Runtime running the int8 model's integers on uint8 (every zero point + 128): its codes are the
    golden's + 128 where the arithmetic agrees, and its rule is named as running on uint8."""
    from qparity.device_parity import _as_target, _shifted

    ort = require_runtime("onnxruntime")
    index = json.loads(qp.golden(tflite_model, golden_inputs, tmp_path / "golden").read_text())
    on_uint8 = _as_target(_shifted(tflite_model, "uint8"), "onnxruntime")
    qp.export(on_uint8, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (real,) = session.run(None, {session.get_inputs()[0].name: golden_inputs.numpy()})
    grid = on_uint8.output_qparams
    codes = np.round(real.astype(np.float64) / float(grid.scale)).astype(np.int64) + int(grid.zero_point)
    device = tmp_path / "device"
    device.mkdir()
    name = index["outputs"][0]["name"]
    np.save(device / f"{name}.npy", codes.astype(np.uint8))
    report = qp.compare(tmp_path / "golden", device)
    assert report.device_dtype == "uint8" and report.golden_dtype == "int8"
    rules = report.reproducing_rules
    assert "onnxruntime" in rules and not {"tflite", "xnnpack", "tosa"} & set(rules), str(report)
    assert report.shifted["onnxruntime"] == "uint8" and "on uint8" in str(report)
    # the same codes as raw bytes: the type comes from `dtype`, and a dump that says otherwise is refused
    raw = tmp_path / "raw"
    raw.mkdir()
    codes.astype(np.uint8).tofile(raw / f"{name}.bin")
    assert qp.compare(tmp_path / "golden", raw, dtype="uint8").reproducing_rules == rules
    with pytest.raises(InputError, match="mix code types"):
        qp.compare(tmp_path / "golden", device, dtype="int8")


def test_an_int8_device_matching_the_golden_runs_uint8_only_rules_shifted(tflite_model, golden_inputs, tmp_path):
    """PyTorch's engines (uint8 only) are tried on an int8 model too, moved to uint8, instead of skipped."""
    index, device = write_golden_and_dumps(tflite_model, golden_inputs, tmp_path, "BUILTIN_REF")
    report = qp.compare(tmp_path / "golden", device)
    assert report.device_dtype == "int8" and report.ok
    for engine in ("fbgemm", "x86", "qnnpack"):
        assert engine not in report.not_applicable, report.not_applicable.get(engine)
        assert report.shifted[engine] == "uint8"


def _demo_model(target):
    from qparity.demo import DigitsNet

    torch.manual_seed(0)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    return prepare_and_convert(DigitsNet(channels=4), (batches[0],), target, batches)[1]


def _run_file(target, model, path, inputs):
    """The output codes of the target's own runtime running the exported file: what a device dumps."""
    from qparity.export.tflite import codes_from_dequantized

    if target == "tflite-micro":
        from qparity.export.tflite_micro import run_tflite_micro

        require_optional_runtime("tflite_micro", "tflm")
        (real,) = run_tflite_micro(path, (inputs,))
    elif target == "tosa":
        from qparity.export.tosa import run_tosa

        require_optional_runtime("tosa_reference_model", "tosa")
        (codes,) = run_tosa(path, (model.quantize(inputs),), model)
        return codes.to(torch.int64)
    else:
        from qparity.export.pte import run_pte

        require_optional_runtime("executorch", "executorch")
        (real,) = run_pte(path, (inputs,))
    return codes_from_dequantized(real, model.output_qparams)


@pytest.mark.parametrize("target, suffix", [("tflite-micro", ".tflite"), ("tosa", ".tosa"),
                                            ("executorch-xnnpack", ".pte")])
def test_golden_of_the_demo_network_on_each_runtime_target_is_met_by_its_runtime(target, suffix, tmp_path):
    """Golden vectors of the demo network for each target, the file run in that target's own runtime: 0 codes
    differ, and the rule named is the target's (alone, where the outputs tell the rules apart)."""
    golden_inputs = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 1.5
    model = _demo_model(target)
    index = json.loads(qp.golden(model, golden_inputs, tmp_path / "golden").read_text())
    assert index["target"] == target
    layers = [n for n in index["nodes"] if n["op"] in ("conv2d", "linear")]
    assert layers and all("multiplier_f32" in n["params"] or ("multiplier" in n["params"] and "shift" in n["params"])
                          for n in layers)
    (add,) = [n for n in index["nodes"] if n["op"] == "add"]
    assert "input_b_multiplier" in add["params"]
    path = tmp_path / f"model{suffix}"
    qp.export(model, path)
    device = tmp_path / "device"
    device.mkdir()
    codes = _run_file(target, model, path, golden_inputs)
    np.save(device / f"{index['outputs'][0]['name']}.npy", codes.numpy().astype(np.int8))
    report = qp.compare(tmp_path / "golden", device)
    assert report.ok and report.mismatched == 0, str(report)
    assert target in report.reproducing_rules, str(report)
    if target != "executorch-xnnpack":  # its float32 multipliers give these outputs under exact's rule too
        assert report.reproducing_rules == [target], str(report)
