"""AIMET encodings for Qualcomm QNN: every encoding is qparity's grid exactly, and the float ONNX model with
quantize-dequantize inserted from the encodings alone (as QNN's converter reads them) computes qparity's codes."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import qparity as qp
from qparity.cli import main
from qparity.errors import ExportError
from qparity.export.aimet import export_aimet

from helpers import prepare_and_convert, require_runtime

SAMPLES = 64


def demo_model(target):
    from qparity.demo import DigitsNet

    torch.manual_seed(0)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    return prepare_and_convert(DigitsNet(channels=4), (batches[0],), target, batches)[1]


@pytest.fixture(scope="module")
def exact_model():
    return demo_model("exact")


def by_name(entries):
    return {e["name"]: e for e in entries} if isinstance(entries, list) else entries


def check_schema(encodings, version):
    """The fields and types of AIMET's quantization_encoding_specification for `version`."""
    assert encodings["version"] == version
    for kind in ("activation_encodings", "param_encodings"):
        if version == "1.0.0":
            assert isinstance(encodings[kind], list)
            for e in encodings[kind]:
                assert set(e) == {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset"}
                assert e["dtype"] == "INT" and e["enc_type"] in ("PER_TENSOR", "PER_CHANNEL")
                assert isinstance(e["bw"], int) and isinstance(e["is_sym"], bool)
                assert len(e["scale"]) == len(e["offset"]) and (len(e["scale"]) == 1) == (e["enc_type"] == "PER_TENSOR")
                assert all(isinstance(o, int) and -(1 << (e["bw"])) < o <= 0 for o in e["offset"])
        else:
            assert isinstance(encodings[kind], dict)
            for channels in encodings[kind].values():
                for e in channels:
                    assert set(e) == {"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}
                    assert e["dtype"] == "int" and e["is_symmetric"] in ("True", "False")
                    assert e["min"] == e["scale"] * e["offset"]
                    assert e["max"] == e["scale"] * ((1 << e["bitwidth"]) - 1 + e["offset"])


@pytest.mark.parametrize("version", ["1.0.0", "0.6.1"])
def test_every_encoding_is_the_models_grid_exactly(exact_model, tmp_path, version):
    onnx_path, encodings_path = export_aimet(exact_model, tmp_path / "model.onnx", version=version)
    encodings = json.loads(open(encodings_path).read())
    check_schema(encodings, version)
    activations, params = by_name(encodings["activation_encodings"]), by_name(encodings["param_encodings"])
    scales = lambda e: e["scale"] if version == "1.0.0" else [c["scale"] for c in e]  # noqa: E731
    offsets = lambda e: e["offset"] if version == "1.0.0" else [c["offset"] for c in e]  # noqa: E731
    for node in exact_model.graph.nodes:
        if node.name in activations:
            grid = exact_model.grids[node.name]
            assert scales(activations[node.name]) == [float(grid.scale)]
            assert offsets(activations[node.name]) == [grid.qmin - int(grid.zero_point)]
    assert {"x", "output"} <= set(activations)
    layers = exact_model.layers
    assert {f"{name}.weight" for name in layers} <= set(params)
    for name, layer in layers.items():
        assert scales(params[f"{name}.weight"]) == layer.weight_scale.to(torch.float32).reshape(-1).tolist()
        assert set(offsets(params[f"{name}.weight"])) == {-128}
    # the float weights are on the encodings' grid: QNN's quantizer finds qparity's weight codes again
    import onnx
    from onnx import numpy_helper

    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(onnx_path).graph.initializer}
    for name, layer in layers.items():
        scale = np.asarray(scales(params[f"{name}.weight"]), np.float32)
        w = weights[f"{name}.weight"]
        codes = np.round(w / scale.reshape((-1,) + (1,) * (w.ndim - 1)))
        np.testing.assert_array_equal(codes, layer.weight_codes.numpy())
        if layer.bias_codes is not None:
            bias_scale = np.asarray(scales(params[f"{name}.bias"]))
            np.testing.assert_array_equal(np.round(weights[f"{name}.bias"].astype(np.float64) / bias_scale),
                                          layer.bias_codes.numpy())


def with_qdq(onnx_path, encodings):
    """The float model with QuantizeLinear -> DequantizeLinear on every encoded activation, from the encodings
    file alone: uint8 codes u = round(x / scale) - offset, as QNN reads AIMET's unsigned convention."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(onnx_path)
    graph = model.graph
    activations = by_name(encodings["activation_encodings"])
    rename = {name: f"{name}.float" for name in activations}
    inputs = {i.name for i in graph.input}
    outputs = {o.name for o in graph.output}
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name in rename:
                node.output[i] = rename[name]
    for name in inputs & set(rename):
        for node in graph.node:
            for i, x in enumerate(node.input):
                if x == name:
                    node.input[i] = f"{name}.dq"
    qdq = []
    for name, e in activations.items():
        source = name if name in inputs else rename[name]
        target = f"{name}.dq" if name in inputs else name
        scale = numpy_helper.from_array(np.asarray(e["scale"][0], np.float32), f"{name}.qdq_scale")
        zero = numpy_helper.from_array(np.asarray(-e["offset"][0], np.uint8), f"{name}.qdq_zero_point")
        graph.initializer.extend([scale, zero])
        qdq += [helper.make_node("QuantizeLinear", [source, scale.name, zero.name], [f"{name}.q"]),
                helper.make_node("DequantizeLinear", [f"{name}.q", scale.name, zero.name], [target])]
    nodes = list(graph.node) + qdq
    del graph.node[:]
    graph.node.extend(nodes)
    assert outputs <= set(activations)
    return model  # the Q/DQ pairs follow their producers in the list; ONNX Runtime orders nodes itself


def test_float_model_with_the_encodings_computes_qparitys_codes(exact_model, tmp_path):
    """Every encoded tensor of the float model with Q/DQ (ONNX Runtime, float operators) is dumped as a device
    would and judged by `qparity compare` on its own inputs: conv, add, max pool, linear give qparity's codes
    exactly; a float32 average pool decides exact halves by rounding noise, so it may differ there only."""
    ort = require_runtime("onnxruntime")
    from onnx import TensorProto, helper

    onnx_path, encodings_path = export_aimet(exact_model, tmp_path / "model.onnx")
    encodings = json.loads(open(encodings_path).read())
    qdq = with_qdq(onnx_path, encodings)
    names = [n.name for n in exact_model.graph.nodes if n.name in by_name(encodings["activation_encodings"])]
    qdq.graph.output.extend(helper.make_tensor_value_info(f"{n}.q", TensorProto.UINT8, None) for n in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # float ops, no QOperator fusion
    session = ort.InferenceSession(qdq.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = torch.randn(SAMPLES, 1, 8, 8, generator=torch.Generator().manual_seed(5)) * 1.5
    dumps = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"x": x.numpy()})))
    qp.golden(exact_model, x, tmp_path / "golden")
    device = tmp_path / "device"
    device.mkdir()
    for name in names:
        np.save(device / f"{name}.npy", dumps[f"{name}.q"])  # AIMET's unsigned codes: qparity's int8 + 128
    report = qp.compare(tmp_path / "golden", device)
    assert report.device_dtype == "uint8" and len(report.layers) == len(names)  # the input too (QuantizeLinear)
    pools = [layer for layer in report.layers if layer.op == "avg_pool2d"]
    for layer in report.layers:
        if layer.op != "avg_pool2d":
            assert layer.rules["exact"] == 0, f"{layer.node} ({layer.op}): {layer.rules['exact']} codes differ"
    (pool,) = pools  # the global average: its input's dump, its exact sums, the halves
    source = exact_model.graph.node(pool.node).refs()[0]
    grid = exact_model.grids[source]
    sums = (dumps[f"{source}.q"].astype(np.int64) - 128 - int(grid.zero_point)).sum(axis=(2, 3), keepdims=True)
    count = dumps[f"{source}.q"].shape[2] * dumps[f"{source}.q"].shape[3]
    predicted = exact_model.target.average(torch.from_numpy(sums), torch.tensor(count), grid).numpy() + 128
    differ = predicted != dumps[f"{pool.node}.q"]
    assert differ.sum() == pool.rules["exact"]
    assert ((2 * sums[differ]) % (2 * count) == count).all(), "a code differs away from an exact half"


def test_refusals_name_the_problem(exact_model, tmp_path):
    with pytest.raises(ExportError, match="version"):
        export_aimet(exact_model, tmp_path / "model.onnx", version="2.0.0")
    with pytest.raises(ExportError, match=".onnx"):
        export_aimet(exact_model, tmp_path / "model.tflite")

    class ChannelMean(nn.Module):
        def forward(self, x):
            return x.mean(dim=1, keepdim=True)

    batches = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    _, model = prepare_and_convert(ChannelMean(), (batches[0],), "exact", batches)
    with pytest.raises(ExportError, match="no float ONNX form for mean"):
        export_aimet(model, tmp_path / "mean.onnx")
    assert not (tmp_path / "mean.onnx").exists()


def test_cli_writes_the_model_and_its_encodings(exact_model, tmp_path, capsys):
    exact_model.save(tmp_path / "model.qp")
    assert main(["export", str(tmp_path / "model.qp"), str(tmp_path / "qnn.onnx"), "--aimet-encodings"]) == 0
    assert (tmp_path / "qnn.onnx").is_file() and (tmp_path / "qnn.encodings").is_file()
    check_schema(json.loads((tmp_path / "qnn.encodings").read_text()), "1.0.0")
    assert "qnn.encodings" in capsys.readouterr().out
