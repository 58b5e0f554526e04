"""The doctor on torchao's PT2E flow (prepare_qat_pt2e / convert_pt2e): every number it states is checked
against the two graphs directly, and every differing conv/linear code is explained."""
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import qparity
from pt2e_case import build_pt2e, xnnpack_quantizer
from qparity.cli import main
from qparity.numerics.pt2e_reference import reference_codes
from qparity.errors import QParityError


pytestmark = pytest.mark.usefixtures("pt2e_runtimes")


def _values(graph_module, x, keep):
    """The outputs of the nodes `keep` selects, in graph order, from one node-by-node run."""
    from torch.fx import Interpreter

    found = []

    class Record(Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if keep(self.module, node):
                found.append(value)
            return value

    Record(graph_module).run(*x)
    return found


def test_default_xnnpack_qat_config_diverges_and_every_conv_linear_code_is_explained(default_flow):
    prepared, converted, x, report = default_flow
    fake, real = prepared(*x), converted(*x)
    assert report.flow == "pt2e" and not report.ok
    assert report.mismatched == int((fake != real).sum()) > 0 and report.total == fake.numel()
    assert report.first_divergence == "conv"
    weighted = [layer for layer in report.layers if layer.name in ("conv", "conv2", "fc")]
    assert len(weighted) == 3 and all(layer.unexplained == 0 for layer in weighted)
    assert sum(layer.mismatched for layer in weighted) > 0
    assert "Every differing code of the conv/linear layers is accounted for" in report.verdict


def test_weight_grid_cause_states_the_fused_kernels_scale_and_converts_scale(default_flow):
    prepared, converted, x, report = default_flow
    cause = next(c for c in report.causes if c.kind == "qparams_mismatch" and c.layer == "conv"
                 and c.evidence["tensor"] == "weight")
    channel = cause.evidence["channel"]
    # convert_pt2e quantizes with calculate_qparams() of the weight fake quant; the first conv's is the first.
    weight_fq = next(n for n in prepared.graph.nodes if n.op == "call_module" and n.args[0].name == "mul")
    deployed_scale = prepared.get_submodule(weight_fq.target).calculate_qparams()[0][channel]
    assert cause.evidence["converted_scale"] == float(deployed_scale)
    # The scale the fused kernel trained with: what its own output lies on (max|w| / scale = 127.5 or 127).
    trained = prepared.get_submodule(weight_fq.target).scale[channel]
    assert cause.evidence["fake_scale"] == float(trained) != float(deployed_scale)
    assert "FakeQuantize" in cause.fix and "calculate_qparams" in cause.fix
    assert cause.affected == next(l for l in report.layers if l.name == "conv").stages["weights"] > 0


def test_layer_codes_are_the_fake_quant_and_quantize_nodes_codes(default_flow):
    """Each activation fake-quant call's codes (output / its scale buffer: observers are off) against the codes
    of the quantize node convert_pt2e put in its place."""
    prepared, converted, x, report = default_flow
    fake_quant_calls = []

    def activation_fake_quant(module, node):
        if node.op == "call_module" and hasattr(module.get_submodule(node.target), "scale") \
                and node.args[0].op != "get_attr" and node.args[0].name != "mul":
            fake_quant_calls.append(module.get_submodule(node.target))
            return True
        return False

    fake = _values(prepared, x, activation_fake_quant)
    real = _values(converted, x, lambda module, node: str(node.target) ==
                   "quantized_decomposed.quantize_per_tensor.default")
    assert len(fake) == len(real) == len(report.layers)
    for layer, out, fq, codes in zip(report.layers, fake, fake_quant_calls, real):
        expected = torch.round(out.double() / float(fq.scale)).long() + int(fq.zero_point)
        assert layer.total == codes.numel() and layer.mismatched == int((expected != codes.long()).sum())


def test_fake_quantize_config_the_doctor_recommends_gives_zero_differences():
    """Without BN here to keep the suite fast; with conv+BN+ReLU it also gives 0 differences (seeds 0-2)."""
    prepared, converted, x = build_pt2e(xnnpack_quantizer(fused=False), seed=1, batch_norm=False)
    report = qparity.doctor(prepared, converted, x)
    assert report.ok and report.mismatched == 0 and not report.causes
    assert torch.equal(prepared(*x), converted(*x))
    assert all(layer.mismatched == 0 for layer in report.layers) and len(report.layers) == 6


def test_unfrozen_flow_names_observers_and_batch_norm(default_flow):
    """The QAT model evaluated with observers on and BN in training mode (before freezing)."""
    import copy

    import torchao.quantization.pt2e as pt2e

    prepared, converted, x, _ = default_flow
    prepared = copy.deepcopy(prepared)
    prepared.apply(pt2e.enable_observer)
    pt2e.move_exported_model_to_train(prepared)
    report = qparity.doctor(prepared, converted, x)
    kinds = {(c.kind, c.layer) for c in report.causes}
    assert ("observer_not_frozen", "conv") in kinds and ("bn_folding", "conv") in kinds
    assert all(layer.unexplained in (None, 0) for layer in report.layers)
    observer = next(c for c in report.causes if c.kind == "observer_not_frozen")
    assert "disable_observer" in observer.fix


SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from pt2e_case import build_pt2e, x86_quantizer

def build():
    return build_pt2e(x86_quantizer(), batch_norm=False)
"""


def test_cli_doctor_reads_an_x86_inductor_quantizer_flow_without_unexplained_codes(tmp_path, capsys):
    script = tmp_path / "flow.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    code = main(["doctor", f"{script}:build", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["flow"] == "pt2e" and code == (0 if data["ok"] else 1)
    assert [layer["name"] for layer in data["layers"]] == ["x", "conv", "mean"]  # conv2 feeds the add in float
    assert all(layer["unexplained"] in (None, 0) for layer in data["layers"])


def test_x86_inductor_flow_with_values_left_in_float_has_per_layer_codes_and_nothing_unexplained(x86_flow):
    """X86Net: conv+BN+ReLU, pools, cat, slice, adaptive average pool + flatten and a linear with a float output.
    Each quantize of the converted graph is a layer row with its codes; the convs and the linear whose outputs stay
    in float32 are named in the notes."""
    prepared, converted, x = x86_flow
    report = qparity.doctor(prepared, converted, x)
    codes = _values(converted, x, lambda module, node: str(node.target) ==
                    "quantized_decomposed.quantize_per_tensor.default")
    assert report.flow == "pt2e" and len(report.layers) == len(codes) == 5
    assert [layer.total for layer in report.layers] == [c.numel() for c in codes]
    assert report.layers[1].name == "conv" and report.layers[1].unexplained == 0
    assert all(layer.unexplained in (None, 0) for layer in report.layers)
    assert report.total == converted(*x).numel() == 10
    for name in ("conv2", "conv3", "fc"):
        assert any(note.startswith(f"{name}: the quantizer leaves its output in float32") for note in report.notes)


def test_pt2e_converted_model_needs_its_prepared_graph(default_flow):
    prepared, converted, x, _ = default_flow
    with pytest.raises(QParityError, match="prepare_qat_pt2e"):
        qparity.doctor(torch.nn.Linear(2, 2), converted, x)


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-4, 1.0), st.integers(-128, 127), st.integers(0, 2 ** 31 - 1))
def test_reference_codes_equal_quantized_decomposed_quantize_per_tensor(scale, zero_point, seed):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed

    y = torch.randn(257, generator=torch.Generator().manual_seed(seed)) * scale * 200
    expected = torch.ops.quantized_decomposed.quantize_per_tensor(y, scale, zero_point, -128, 127, torch.int8)
    assert torch.equal(reference_codes(y, scale, zero_point, -128, 127), expected.to(torch.int64))
