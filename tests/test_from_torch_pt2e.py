"""from_torch of a convert_pt2e model: the IntegerModel of target pt2e-reference computes every code the converted
model's QUANTIZE nodes compute (torch.equal), and refuses by name what it cannot read."""
import copy
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.fx import Interpreter

import qparity
from pt2e_case import PoolNet, ResidualNet, X86Net, build_pt2e, x86_quantizer, xnnpack_quantizer
from qparity.errors import InputError, ModelFileError, QParityError, UnsupportedOpError
from qparity.serialize import PREFIX
from test_hostile_files import write

QUANTIZE = "quantized_decomposed.quantize_per_tensor.default"


pytestmark = pytest.mark.usefixtures("pt2e_runtimes")


def graph_values(converted, x):
    """Every node's value from one run of the converted graph."""
    found = {}

    class Record(Interpreter):
        def run_node(self, node):
            found[node] = super().run_node(node)
            return found[node]

    Record(converted).run(x)
    return found


def holder(model, quantize) -> str:
    """The qparity node holding a QUANTIZE's codes: the model input or operator it quantizes (through a ReLU,
    which qparity fuses), a quantize node of a float value (named after the QUANTIZE), or, for an alias, the
    codes of the alias's input."""
    source = quantize.args[0]
    if str(source.target) == "aten.alias.default":
        return holder(model, source.args[0].args[0])
    names = [quantize.name, source.name] + ([source.args[0].name] if str(source.target) == "aten.relu.default" else [])
    found = [n.name for n in model.graph.nodes if n.name in names and n.op != "aten_float"]
    assert len(found) == 1, (quantize.name, found)
    return found[0]


def assert_every_value_equal(converted, model, batches):
    """Each batch (the converted graph's fixed batch size): every quantized tensor of the graph and every value it
    leaves in float32, bit for bit, and the model's output. Returns how many values were compared."""
    floats = {n.name for n in model.graph.nodes if n.op == "aten_float"}
    compared = 0
    for x in batches:
        expected = graph_values(converted, x)
        executor = model.executor()
        executor.run([model.quantize(x).to(torch.int64)])
        checked = set()
        for node, value in expected.items():
            if str(node.target) == QUANTIZE:
                name = holder(model, node)
                assert torch.equal(executor.values[name].codes, value.to(torch.int64)), name
            elif node.name in floats:
                name = node.name
                assert torch.equal(executor.values[name], value), name
            else:
                continue
            checked.add(name)
            compared += value.numel()
        assert floats <= checked
        assert torch.equal(model(x), converted(x))
    return compared


def batches(seed: int, count: int = 8, size: int = 2):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 12, 12, generator=generator) * 2 for _ in range(count)]


def test_xnnpack_qat_flow_with_bn_relu_residual_add_linear_gives_every_code(default_flow):
    _, converted, x, _ = default_flow
    model = qparity.from_torch(converted, x)
    assert model.target.name == "pt2e-reference" and model.activation_dtype == "int8"
    assert sorted(model.layers) == ["conv2d", "conv2d_1", "linear"]
    assert assert_every_value_equal(converted, model, batches(0)) == 8 * (864 + 3 * 2304 + 16 + 8)


def test_xnnpack_per_tensor_weights_and_max_pools_give_every_code_also_after_save_and_load(tmp_path):
    _, converted, x = build_pt2e(xnnpack_quantizer(per_channel=False), seed=2, model=PoolNet())
    qparity.from_torch(converted, x).save(tmp_path / "pt2e.qp")
    model = qparity.load(tmp_path / "pt2e.qp")
    assert all(layer.weight_scale.numel() == 1 for layer in model.layers.values())
    assert [n.op for n in model.graph.nodes] == ["input", "conv2d", "max_pool2d", "conv2d", "max_pool2d"]
    assert_every_value_equal(converted, model, batches(1))


def test_x86_inductor_pool_net_leaves_conv_outputs_in_float_and_gives_every_code_and_the_float_output():
    """X86InductorQuantizer quantizes a conv's output only where the next operator takes int8 (conv -> ReLU ->
    max pool is quantized after the pool) and never a model output: those values are aten_float nodes."""
    _, converted, x = build_pt2e(x86_quantizer(), model=PoolNet())
    model = qparity.from_torch(converted, x)
    assert "aten_float" in {n.op for n in model.graph.nodes} and model.output_qparams is None
    assert_every_value_equal(converted, model, batches(3))


def test_an_operator_qparity_does_not_read_is_refused_naming_the_node(default_flow):
    """The flow's converted graph with its mean made a sum (aten.sum.dim_IntList takes the same arguments)."""
    _, converted, x, _ = default_flow
    edited = copy.deepcopy(converted)
    mean = next(n for n in edited.graph.nodes if n.target is torch.ops.aten.mean.dim)
    mean.target = torch.ops.aten.sum.dim_IntList
    edited.recompile()
    with pytest.raises(UnsupportedOpError, match=r"PT2E node 'mean' \(aten::sum\) .*does not read"):
        qparity.from_torch(edited, x)


def test_the_reference_target_is_read_only():
    with pytest.raises(QParityError, match="pt2e-reference.*not a runtime to train for"):
        qparity.prepare_qat(ResidualNet(False), torch.randn(1, 3, 12, 12), target="pt2e-reference")
    assert "pt2e-reference" not in qparity.TARGETS


class ShapeNet(nn.Module):
    """Shape operators between XNNPACKQuantizer's Q/DQ pairs: cat, max pool, permute, reshape, slice, flatten on
    codes; an unsqueeze -> squeeze pair it leaves in float32 between them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(12 * 6, 5)

    def forward(self, x):
        z = torch.max_pool2d(torch.cat([torch.relu(self.conv(x)), self.conv2(x)], 1), 2)
        z = z.permute(0, 2, 3, 1).reshape(2, 36, 12)[:, 1:7].flatten(1)
        return self.fc(z.unsqueeze(1).squeeze(1))


def build_ptq(quantizer, model: nn.Module, seed: int = 0):
    """(converted, example_inputs) of prepare_pt2e, calibrated on a few batches, and convert_pt2e."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(seed)
    x = torch.randn(2, 3, 12, 12)
    prepared = prepare_pt2e(torch.export.export(model.eval(), (x,)).module(), quantizer)
    for _ in range(3):
        prepared(torch.randn(2, 3, 12, 12) * 2)
    return convert_pt2e(prepared), (x,)


def x86_ptq_quantizer():
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())


def xnnpack_ptq_quantizer():
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)

    return XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))


@pytest.fixture(scope="module")
def x86_ptq():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_ptq(x86_ptq_quantizer(), X86Net())


def test_x86_inductor_qat_flow_gives_every_code_every_float_value_and_the_float_output(x86_flow):
    _, converted, x = x86_flow
    model = qparity.from_torch(converted, x)
    ops = [n.op for n in model.graph.nodes]
    assert model.activation_dtype == "uint8" and {"aten_float", "quantize", "conv2d"} <= set(ops)
    assert model.graph.node("linear").op == "aten_float" and model.output_qparams is None  # the float output
    assert sorted(model.layers) == ["conv2d", "conv2d_1", "conv2d_2", "linear"]
    assert assert_every_value_equal(converted, model, batches(4)) > 8 * 2304


def test_x86_inductor_ptq_flow_gives_every_code_every_float_value_and_the_float_output(x86_ptq):
    converted, x = x86_ptq
    model = qparity.from_torch(converted, x)
    assert model.graph.node("adaptive_avg_pool2d").op == "aten_float" and model.output_qparams is None
    assert assert_every_value_equal(converted, model, batches(5)) > 0


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(0.25, 8.0))
def test_x86_inductor_ptq_flow_equals_the_converted_model_on_random_inputs(x86_ptq, seed, spread):
    converted, x = x86_ptq
    model = qparity.from_torch(converted, x)
    generator = torch.Generator().manual_seed(seed)
    assert_every_value_equal(converted, model, [torch.randn(2, 3, 12, 12, generator=generator) * spread])


def test_x86_inductor_flow_gives_every_value_after_save_and_load(x86_flow, tmp_path):
    _, converted, x = x86_flow
    qparity.from_torch(converted, x).save(tmp_path / "x86.qp")
    model = qparity.load(tmp_path / "x86.qp")
    assert model.graph.node("linear").op == "aten_float" and "linear" in model.layers
    assert_every_value_equal(converted, model, batches(6, count=2))


def test_xnnpack_shape_operators_move_codes_and_give_every_code():
    converted, x = build_ptq(xnnpack_ptq_quantizer(), ShapeNet())
    model = qparity.from_torch(converted, x)
    calls = [n.attrs["fn"] for n in model.graph.nodes if n.op == "call"]
    assert calls == ["function:torch.permute", "function:torch.reshape", "function:operator.getitem",
                     "function:torch.flatten"]
    assert [n.attrs["aten"] for n in model.graph.nodes if n.op == "aten_float"] == ["aten.unsqueeze.default",
                                                                                      "aten.squeeze.dim"]
    assert_every_value_equal(converted, model, batches(7))


def test_cat_across_grids_dequantizes_each_input_then_quantizes():
    """XNNPACKQuantizer puts a cat's inputs on one grid; here the second input's QUANTIZE/DEQUANTIZE pair is moved
    to another scale, so the converted graph dequantizes each input on its own grid and quantizes the cat."""
    converted, x = build_ptq(xnnpack_ptq_quantizer(), ShapeNet())
    cat = next(n for n in converted.graph.nodes if str(n.target) == "aten.cat.default")
    dequantize = cat.args[0][1]
    quantize = dequantize.args[0]
    scale = float(torch.tensor(quantize.args[1] * 1.7, dtype=torch.float32))
    for node in (quantize, dequantize):
        node.args = (node.args[0], scale) + tuple(node.args[2:])
    converted.recompile()
    model = qparity.from_torch(converted, x)
    grids = [model.grids[ref.name] for ref in model.graph.node("cat").args[0]]
    assert not grids[0].same_grid(grids[1])
    assert_every_value_equal(converted, model, batches(8))


def _saved_header(model, path):
    model.save(path)
    raw = path.read_bytes()
    _, _, header_len, data_len = PREFIX.unpack_from(raw)
    return json.loads(raw[PREFIX.size:PREFIX.size + header_len]), raw[PREFIX.size + header_len:
                                                                       PREFIX.size + header_len + data_len]


def _node(header, name):
    return next(n for n in header["graph"]["nodes"] if n["name"] == name)


def test_a_file_whose_float_node_calls_another_aten_operator_is_refused_at_load(x86_ptq, tmp_path):
    converted, x = x86_ptq
    header, data = _saved_header(qparity.from_torch(converted, x), tmp_path / "ptq.qp")
    attrs = _node(header, "flatten")["attrs"]["$dict"]
    attrs[[k for k, _ in attrs].index("aten")][1] = "aten.empty.memory_format"
    with pytest.raises(ModelFileError, match=r"aten_float node 'flatten' calls 'aten.empty.memory_format', which "
                                             r"is not one of the ATen calls qparity evaluates"):
        qparity.load(write(tmp_path, header, data))


def test_a_file_whose_integer_operator_reads_a_float_value_is_refused_at_load(x86_ptq, tmp_path):
    converted, x = x86_ptq
    header, data = _saved_header(qparity.from_torch(converted, x), tmp_path / "ptq.qp")
    _node(header, "quantize_per_tensor_default_1")["op"] = "max_pool2d"  # a code operator now reads max_pool2d
    with pytest.raises(ModelFileError, match=r"max_pool2d node 'quantize_per_tensor_default_1' takes the float32 "
                                             r"value\(s\) \['max_pool2d'\], not codes"):
        qparity.load(write(tmp_path, header, data))


def test_a_file_whose_quantize_node_reads_codes_is_refused_at_load(x86_ptq, tmp_path):
    converted, x = x86_ptq
    header, data = _saved_header(qparity.from_torch(converted, x), tmp_path / "ptq.qp")
    _node(header, "quantize_per_tensor_default_1")["args"] = {"$tuple": [{"$ref": "x"}]}
    with pytest.raises(ModelFileError, match=r"quantize node 'quantize_per_tensor_default_1' quantizes 'x', which "
                                             r"is not a float32 value"):
        qparity.load(write(tmp_path, header, data))


def test_a_float_node_in_a_model_of_another_target_is_refused_at_load(x86_ptq, tmp_path):
    converted, x = x86_ptq
    header, data = _saved_header(qparity.from_torch(converted, x), tmp_path / "ptq.qp")
    header["target"] = "fbgemm"  # uint8 activations and a float32 bias, as the file holds
    with pytest.raises(ModelFileError, match=r"aten_float at conv cannot run on target 'fbgemm'"):
        qparity.load(write(tmp_path, header, data))


def test_to_torch_refuses_float_values_naming_the_nodes(x86_ptq):
    converted, x = x86_ptq
    with pytest.raises(UnsupportedOpError, match=r"to_torch cannot express node\(s\) 'conv2d' \(aten.conv2d.default"
                                                 r" at conv\).*'linear' \(aten.linear.default at fc\)"):
        qparity.to_torch(qparity.from_torch(converted, x))


def test_float_nodes_refuse_to_run_for_another_target(x86_ptq):
    """The delegate model doctor_pte builds from a reference graph, for one: a float32 value is no deployed kernel."""
    converted, x = x86_ptq
    model = qparity.from_torch(converted, x)
    other = qparity.IntegerModel(model.graph, "x86", model.activation_dtype, model.qparams, model.layers)
    with pytest.raises(UnsupportedOpError, match=r"aten_float at conv cannot run on target 'x86'"):
        other.run(model.quantize(*x))


def _input_quantized_twice(scale_factor: float):
    """ShapeNet's PTQ graph with a second QUANTIZE of the model input for its second conv, on the first one's
    scale times `scale_factor` (a quantizer that annotates each user of the input on its own)."""
    converted, x = build_ptq(xnnpack_ptq_quantizer(), ShapeNet())
    placeholder = next(n for n in converted.graph.nodes if n.op == "placeholder" and n.users)
    quantize = next(u for u in placeholder.users if "quantize_per_tensor" in str(u.target))
    first, dequantize = list(quantize.users)  # one DEQUANTIZE per conv reading the input
    scale = float(torch.tensor(quantize.args[1] * scale_factor, dtype=torch.float32))
    with converted.graph.inserting_after(quantize):
        second = converted.graph.call_function(quantize.target, (placeholder, scale) + tuple(quantize.args[2:]))
    dequantize.args = (second, scale) + tuple(dequantize.args[2:])
    converted.recompile()
    return converted, x


def test_a_model_input_quantized_twice_on_one_grid_is_one_input():
    converted, x = _input_quantized_twice(1.0)
    model = qparity.from_torch(converted, x)
    assert [n.name for n in model.graph.inputs] == ["x"]
    assert_every_value_equal(converted, model, batches(9))


def test_a_model_input_quantized_onto_two_grids_is_refused_by_name():
    converted, x = _input_quantized_twice(1.7)
    with pytest.raises(UnsupportedOpError, match=r"model input 'x' is quantized onto two grids"):
        qparity.from_torch(converted, x)


def test_inputs_the_graphs_recorded_shapes_do_not_fit_raise_input_error_naming_the_node():
    """A PT2E graph records a view's sizes for the batch it was exported with; another batch is an InputError
    naming the node, not PyTorch's RuntimeError."""
    converted, x = build_ptq(xnnpack_ptq_quantizer(), ShapeNet())
    model = qparity.from_torch(converted, x)
    with pytest.raises(InputError, match=r"call 'reshape' .* fails on inputs of shape \[\(3, 6, 6, 12\)\]"):
        model(torch.randn(3, *x[0].shape[1:]))
