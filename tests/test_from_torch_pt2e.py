"""from_torch of a convert_pt2e model: the IntegerModel of target pt2e-reference computes every code the converted
model's QUANTIZE nodes compute (torch.equal), and refuses by name what it cannot read."""
import copy

import pytest
import torch
from torch.fx import Interpreter

import qparity
from pt2e_case import PoolNet, ResidualNet, build_pt2e, x86_quantizer, xnnpack_quantizer
from qparity.errors import QParityError, UnsupportedOpError

QUANTIZE = "quantized_decomposed.quantize_per_tensor.default"


pytestmark = pytest.mark.usefixtures("pt2e_runtimes")


def quantize_codes(converted, x):
    """{qparity node name: codes} of every QUANTIZE node of the converted graph: the value it quantizes is a
    model input or an operator's output (through a ReLU, which qparity fuses into the operator)."""
    found = {}

    class Record(Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if str(node.target) == QUANTIZE:
                source = node.args[0]
                if str(source.target) == "aten.relu.default":
                    source = source.args[0]
                found[source.name] = value
            return value

    Record(converted).run(x)
    return found


def assert_every_code_equal(converted, model, batches):
    """Each batch (the converted graph's fixed batch size): every quantized tensor of the graph, bit for bit."""
    compared = 0
    for x in batches:
        expected = quantize_codes(converted, x)
        executor = model.executor()
        executor.run([model.quantize(x).to(torch.int64)])
        assert set(expected) <= set(executor.values)
        for name, codes in expected.items():
            assert torch.equal(executor.values[name].codes, codes.to(torch.int64)), name
            compared += codes.numel()
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
    assert assert_every_code_equal(converted, model, batches(0)) == 8 * (864 + 3 * 2304 + 16 + 8)


def test_xnnpack_per_tensor_weights_and_max_pools_give_every_code_also_after_save_and_load(tmp_path):
    _, converted, x = build_pt2e(xnnpack_quantizer(per_channel=False), seed=2, model=PoolNet())
    qparity.from_torch(converted, x).save(tmp_path / "pt2e.qp")
    model = qparity.load(tmp_path / "pt2e.qp")
    assert all(layer.weight_scale.numel() == 1 for layer in model.layers.values())
    assert [n.op for n in model.graph.nodes] == ["input", "conv2d", "max_pool2d", "conv2d", "max_pool2d"]
    assert_every_code_equal(converted, model, batches(1))


def test_x86_inductor_quantizer_flows_are_refused_naming_the_value_left_in_float():
    """X86InductorQuantizer quantizes a conv's output only where the next operator takes int8 (conv -> ReLU ->
    max pool is quantized after the pool) and never a model output; qparity's program has codes on every edge."""
    _, converted, x = build_pt2e(x86_quantizer(), model=PoolNet())
    with pytest.raises(UnsupportedOpError, match=r"PT2E node 'max_pool2d' .*its input 'relu' is left in float32"):
        qparity.from_torch(converted, x)


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
