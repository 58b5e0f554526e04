"""The doctor for PT2E models: torchao's prepare_qat_pt2e (a GraphModule whose fake quants are top-level
activation_post_process_N modules called from graph nodes) against its convert_pt2e result, the reference
Q/DQ graph (quantized_decomposed quantize/dequantize around float aten ops).

One fake-quant module may be called from several nodes (shared qparams), so the prepared model is run node by
node and every *call* is recorded. convert_pt2e replaces each fake-quant node in place with a quantize ->
dequantize pair (weights become an int8 constant -> dequantize_per_channel), so the i-th activation fake
quant is the i-th activation quantize, and the i-th conv/linear the i-th conv/linear.

Between dequantize and quantize the converted graph computes in float32. For a conv or linear layer whose
output is quantized the doctor walks from the fake forward to it one ingredient at a time, in float64, as
causes.py does for torch.ao's engines, except that the last step is the reference rule itself:

    F0 the fake-quant codes; F1 exact arithmetic with the fake input, fake weights and the BN-folded prepared
    bias; F2 on the converted output grid; F3 with the converted weights; F4 with the converted input codes;
    F5 with the converted (convert-folded) bias; F6 `reference_codes`: the float32 conv/linear of the
    dequantized values plus the float32 bias, ReLU, then quantize_per_tensor; A the converted codes
    (F6 != A is reported as unexplained, never silently).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..from_pt2e import is_pt2e, module_path, op_name
from ..numerics.pt2e_reference import reference_codes
from .causes import Grid, activation_causes, compare_codes, fake_codes, int_codes, observer_cause, weight_causes
from .compare import DoctorInputError, FakeQuantCall, Run, fake_quant_call, fake_quant_classes, snapshot
from .report import Cause, LayerResult

ENGINE = "pt2e reference (quantized_decomposed Q/DQ, float32)"
WEIGHTED = {"aten::conv1d": F.conv1d, "aten::conv2d": F.conv2d, "aten::linear": F.linear}
RELU = ("aten::relu", "aten::relu_")
BATCH_NORM = ("aten::batch_norm", "aten::_native_batch_norm_legit_no_training", "aten::_native_batch_norm_legit")
QUANT_DTYPES = {torch.int8: torch.qint8, torch.uint8: torch.quint8}
FIX_FUSED = (
    "in the quantizer's QuantizationSpecs use observer_or_fake_quant_ctr=torchao.quantization.pt2e.FakeQuantize"
    ".with_args(observer=MovingAveragePerChannelMinMaxObserver (weights) or MovingAverageMinMaxObserver "
    "(activations), eps=2**-12) instead of FusedMovingAvgObsFakeQuantize, whose kernel derives its own scale: "
    "FakeQuantize's forward uses calculate_qparams(), the grid convert_pt2e quantizes with; then disable the "
    "observers before convert_pt2e. Or train with qparity (qparity.prepare_qat) for your deployment target")


class _Recorder(fx.Interpreter):
    """Runs a GraphModule node by node: every value (get_attr values copied before in-place BN updates), and
    every fake-quant call with the qparams it used."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: Dict[fx.Node, Any] = {}
        self.calls: Dict[fx.Node, FakeQuantCall] = {}
        self.fake_quant_types = fake_quant_classes()[0]

    def run_node(self, node: fx.Node) -> Any:
        module = self.module.get_submodule(node.target) if node.op == "call_module" else None
        before = snapshot(module) if isinstance(module, self.fake_quant_types) else None
        value = super().run_node(node)
        if before is not None:
            self.calls[node] = fake_quant_call(node.name, module, before, self.values[node.args[0]], value)
        self.values[node] = value.detach().clone() if node.op == "get_attr" else value
        return value


def _from_input(graph: fx.Graph) -> set:
    """Nodes whose value depends on a model input (activations, not weights)."""
    found = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in found for a in node.all_input_nodes):
            found.add(node)
    return found


def _producer(node: fx.Node) -> Tuple[Optional[fx.Node], bool]:
    """The conv/linear a quantized value comes from (through one ReLU), and whether that ReLU is there."""
    relu = op_name(node) in RELU
    source = node.args[0] if relu else node
    return (source, relu) if isinstance(source, fx.Node) and op_name(source) in WEIGHTED else (None, relu)


@dataclass
class Point:
    """One activation quantization point: its fake-quant call and the converted quantize's codes."""
    name: str
    call: FakeQuantCall
    quantized: torch.Tensor  # the converted codes as a torch quantized tensor, for the shared cause code
    quantize: fx.Node


@dataclass
class Layer:
    """A conv/linear in both graphs."""
    name: str
    prepared: fx.Node
    converted: fx.Node
    weight_call: Optional[FakeQuantCall]


@dataclass
class Pt2eRun:
    prepared: _Recorder
    converted: _Recorder
    points: List[Point]
    layers: List[Layer]
    prepared_output: Any
    converted_output: Any


def _quantize_args(node: fx.Node, values: Dict[fx.Node, Any]) -> Tuple[float, int, int, int, torch.dtype]:
    scale, zero_point, qmin, qmax, dtype = [values[a] if isinstance(a, fx.Node) else a for a in node.args[1:6]]
    return float(scale), int(zero_point), int(qmin), int(qmax), dtype


def _as_quantized(codes: torch.Tensor, scale: float, zero_point: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype not in QUANT_DTYPES:
        raise DoctorInputError(f"a quantize to {dtype} (the doctor reads int8 and uint8 activations)")
    return torch._make_per_tensor_quantized_tensor(codes.to(dtype), scale, zero_point)


def _weight_tensor(dequantize: fx.Node, values: Dict[fx.Node, Any]) -> Optional[torch.Tensor]:
    """The converted int8 weight as a per-channel (or per-tensor) quantized tensor."""
    name = op_name(dequantize)
    if name not in ("quantized_decomposed::dequantize_per_channel", "quantized_decomposed::dequantize_per_tensor"):
        return None
    args = [values[a] if isinstance(a, fx.Node) else a for a in dequantize.args]
    codes = args[0]
    if name.endswith("per_tensor"):
        return torch._make_per_tensor_quantized_tensor(codes, float(args[1]), int(args[2]))
    return torch._make_per_channel_quantized_tensor(codes, args[1].to(torch.float64), args[2].to(torch.int64),
                                                    int(args[3]))


def _layer_name(node: fx.Node, used: set) -> str:
    name = (node.op != "placeholder" and module_path(node)) or node.name
    name = name if name not in used else f"{name} ({node.name})"
    used.add(name)
    return name


def record(prepared: fx.GraphModule, converted: fx.GraphModule, example_inputs: Tuple[Any, ...]) -> Pt2eRun:
    """Run both graphs once on `example_inputs` (the prepared one on a copy: observers and BN stats stay put)."""
    if not isinstance(prepared, fx.GraphModule) or not prepared.graph.find_nodes(op="call_module"):
        raise DoctorInputError("the converted model is a PT2E (convert_pt2e) graph, so the prepared model must be the "
                               f"prepare_qat_pt2e GraphModule it came from, got {type(prepared).__name__}")
    ran_prepared, ran_converted = _Recorder(copy.deepcopy(prepared)), _Recorder(converted)
    with torch.no_grad():
        prepared_output = ran_prepared.run(*example_inputs)
        converted_output = ran_converted.run(*example_inputs)
    if not ran_prepared.calls:
        raise DoctorInputError("the prepared PT2E model calls no fake-quant module: pass the prepare_qat_pt2e model")
    fake = [n for n in ran_prepared.calls if n in _from_input(ran_prepared.module.graph)]
    live = _from_input(converted.graph)
    quantizes = [n for n in converted.graph.nodes
                 if op_name(n) == "quantized_decomposed::quantize_per_tensor" and n in live]
    if len(fake) != len(quantizes):
        raise DoctorInputError(f"the prepared model fake-quantizes {len(fake)} activations but the converted model "
                               f"quantizes {len(quantizes)}: pass a prepare_qat_pt2e model and its own convert_pt2e")
    layers = _match_layers(ran_prepared, ran_converted)
    by_conv = {layer.converted: layer.name for layer in layers}
    used = set(by_conv.values())
    points = []
    for fq, quantize in zip(fake, quantizes):
        source, _ = _producer(quantize.args[0])
        name = by_conv.get(source) or _layer_name(quantize.args[0], used)
        scale, zero_point, _, _, dtype = _quantize_args(quantize, ran_converted.values)
        quantized = _as_quantized(ran_converted.values[quantize], scale, zero_point, dtype)
        points.append(Point(name, ran_prepared.calls[fq], quantized, quantize))
    return Pt2eRun(ran_prepared, ran_converted, points, layers, prepared_output, converted_output)


def _match_layers(prepared: _Recorder, converted: _Recorder) -> List[Layer]:
    ours = [n for n in prepared.module.graph.nodes if op_name(n) in WEIGHTED]
    theirs = [n for n in converted.module.graph.nodes if op_name(n) in WEIGHTED]
    if [op_name(n) for n in ours] != [op_name(n) for n in theirs]:
        raise DoctorInputError(f"the prepared model runs {[n.name for n in ours]} but the converted model "
                               f"{[n.name for n in theirs]}: pass a prepare_qat_pt2e model and its own convert_pt2e")
    used: set = set()
    return [Layer(_layer_name(c, used), p, c, prepared.calls.get(p.args[1])) for p, c in zip(ours, theirs)]


def diagnose(run: Pt2eRun) -> Tuple[List[LayerResult], List[Cause], List[str]]:
    """Per-point code comparison, the causes found, and notes about what could not be compared."""
    results, causes, notes = [], [], []
    compat = Run(fake_quants={}, layer_names={p.call.path: p.name for p in run.points})
    for point in run.points:
        if point.call.scale is None:
            notes.append(f"{point.name}: fake quant is disabled in {point.call.path}, so the prepared model does not "
                         "quantize it")
            continue
        result = compare_codes(point.name, op_name(point.quantize.args[0]) or point.quantize.args[0].op,
                               fake_codes(point.call), int_codes(point.quantized))
        results.append(result)
        causes += _fused_fix(activation_causes(point.name, point.call, point.quantized, result, notes), point.call)
    for node, call in run.prepared.calls.items():
        if call.observer_enabled:
            compat.layer_names.setdefault(call.path, _owner(node, run))
            cause = observer_cause(call.path, call, compat)
            cause.fix = ("call torchao.quantization.pt2e.disable_observer on every fake quant (prepared.apply(...)) "
                         "once calibration is over, before evaluating and before convert_pt2e")
            causes.append(cause)
    for layer in run.layers:
        causes += _layer_causes(layer, run, results, notes)
    return results, causes, notes


def _owner(node: fx.Node, run: Pt2eRun) -> str:
    return next((layer.name for layer in run.layers if layer.prepared.args[1] is node), node.name)


def _fused_fix(causes: List[Cause], call: FakeQuantCall) -> List[Cause]:
    """A grid mismatch from a fused fake quant is fixed in the quantizer's config, not in the model."""
    for cause in causes:
        if cause.kind == "qparams_mismatch" and "fused" in call.source:
            cause.fix = FIX_FUSED
    return causes


def _layer_causes(layer: Layer, run: Pt2eRun, results: List[LayerResult], notes: List[str]) -> List[Cause]:
    call = layer.weight_call
    qw = _weight_tensor(layer.converted.args[1], run.converted.values)
    if call is None or call.scale is None or qw is None:
        notes.append(f"{layer.name}: its weights are not fake-quantized in the prepared model or not dequantized from "
                     "int8 in the converted one, so they are not compared")
        return []
    causes = _fused_fix(weight_causes(layer.name, call, qw, "pt2e"), call)
    point = next((p for p in run.points if p.quantize.args[0] in (layer.converted, *layer.converted.users)), None)
    if point is None:  # X86InductorQuantizer quantizes an output only where an int8 operator takes it
        notes.append(f"{layer.name}: the quantizer leaves its output in float32 (no quantize follows it), so its "
                     "weights are compared but it has no output codes")
        return causes
    result = next((r for r in results if r.name == point.name), None)
    if result is None:
        return causes
    steps = _stages(layer, point, run)
    if steps is None:
        notes.append(f"{layer.name}: between the conv/linear and its quantize there is more than one ReLU; "
                     "its codes are compared but not taken apart")
        return causes
    codes, bn_training = steps
    moved = {label: int((codes[a] != codes[b]).sum()) for label, a, b in (
        ("float arithmetic", "F0", "F1"), ("output grid", "F1", "F2"), ("weights", "F2", "F3"),
        ("input codes", "F3", "F4"), ("bias", "F4", "F5"), ("reference float32", "F5", "F6"),
        ("unexplained", "F6", "A"))}
    result.stages, result.unexplained = moved, moved["unexplained"]
    for cause in causes:
        cause.affected = moved["weights"]
        cause.explanation += f" On these inputs this alone moves {cause.affected} of {result.total} output codes."
        cause.evidence["output_codes_moved"] = cause.affected
    return causes + _arithmetic_causes(layer.name, codes, moved, bn_training, result.total)


def _stages(layer: Layer, point: Point, run: Pt2eRun) -> Optional[Tuple[Dict[str, torch.Tensor], bool]]:
    source, relu = _producer(point.quantize.args[0])
    if source is not layer.converted:
        return None
    pv, cv = run.prepared.values, run.converted.values
    function = WEIGHTED[op_name(layer.converted)]
    geometry = layer.converted.args[3:]

    def forward(x, w, b):
        y = function(x, w, b, *geometry)
        return y.clamp(min=0) if relu else y

    f64 = lambda v: v.detach().to(torch.float64) if isinstance(v, torch.Tensor) else None  # noqa: E731
    x_f, w_f = f64(pv[layer.prepared.args[0]]), f64(pv[layer.prepared.args[1]])
    bias, bn_training = _prepared_bias(layer.prepared, pv)
    x_c, w_c = cv[layer.converted.args[0]], cv[layer.converted.args[1]]
    b_c = cv.get(layer.converted.args[2]) if len(layer.converted.args) > 2 else None
    call, grid = point.call, point.quantized
    fake = Grid(float(call.scale[0]), int(call.zero_point[0]), call.qmin, call.qmax)
    scale, zero_point, qmin, qmax, _ = _quantize_args(point.quantize, cv)
    out = Grid(scale, zero_point, qmin, qmax)
    y1 = forward(x_f, w_f, bias)
    codes = {"F0": fake_codes(call), "F1": fake.codes(y1, False), "F2": out.codes(y1, False),
             "F3": out.codes(forward(x_f, f64(w_c), bias), False),
             "F4": out.codes(forward(f64(x_c), f64(w_c), bias), False),
             "F5": out.codes(forward(f64(x_c), f64(w_c), f64(b_c)), False),
             "F6": reference_codes(forward(x_c, w_c, b_c), scale, zero_point, qmin, qmax),
             "A": int_codes(grid)}
    return codes, bn_training


def _prepared_bias(conv: fx.Node, values: Dict[fx.Node, Any]) -> Tuple[Optional[torch.Tensor], bool]:
    """The bias the fake forward adds, in float64, and whether BN normalized with batch statistics.

    prepare_qat_pt2e's conv+BN pattern runs conv(x, fq(w * g/sqrt(var+eps)), 0) / (g/sqrt(var+eps)) + b, then
    batch_norm: in exact arithmetic conv(x, fq(...)) + (b - mean) * g/sqrt(var+eps) + beta (pre-call stats)."""
    bias_arg = conv.args[2] if len(conv.args) > 2 else None
    if not (isinstance(bias_arg, fx.Node) and op_name(bias_arg) == "aten::zeros_like"):
        value = values.get(bias_arg) if isinstance(bias_arg, fx.Node) else None
        return (value.detach().to(torch.float64) if value is not None else None), False
    div = next(iter(conv.users))
    add = next(iter(div.users))
    bn = next(iter(add.users))
    if op_name(bn) not in BATCH_NORM:
        raise DoctorInputError(f"{conv.name}: a conv+BN pattern the doctor does not know ({op_name(bn)})")
    b = values[add.args[1]].reshape(-1).to(torch.float64)
    weight, beta, mean, var = (values[a].to(torch.float64) for a in bn.args[1:5])
    training = op_name(bn) == "aten::_native_batch_norm_legit" or (op_name(bn) == "aten::batch_norm" and bn.args[5])
    eps = bn.args[-1] if op_name(bn) != "aten::batch_norm" else bn.args[7]
    return (b - mean) * weight / torch.sqrt(var + eps) + beta, bool(training)


def _first(codes: Dict[str, torch.Tensor], a: str, b: str) -> List[int]:
    wrong = (codes[a] != codes[b]).reshape(-1).nonzero()
    return [int(i) for i in torch.unravel_index(wrong[0, 0], codes[a].shape)]


def _arithmetic_causes(name: str, codes: Dict[str, torch.Tensor], moved: Dict[str, int], bn_training: bool,
                       total: int) -> List[Cause]:
    causes = []
    if moved["float arithmetic"] and bn_training:
        causes.append(Cause(kind="bn_folding", layer=name, explanation=(
            f"{name}'s BatchNorm ran in training mode in the QAT forward (batch statistics) while convert_pt2e folds "
            f"the running statistics into the weights; this moves {moved['float arithmetic']} of {total} codes."),
            evidence={"bn_training": True, "outputs_moved": moved["float arithmetic"]},
            fix="call torchao.quantization.pt2e.move_exported_model_to_eval(prepared) before comparing and before "
                "convert_pt2e", affected=moved["float arithmetic"]))
    elif moved["float arithmetic"]:
        i = _first(codes, "F0", "F1")
        causes.append(Cause(kind="float_accumulation", layer=name, explanation=(
            f"In {moved['float arithmetic']} of {total} outputs of {name} the fake forward's float32 arithmetic "
            f"(for conv+BN: conv with the scaled weights, divided back, then batch_norm) lands on the other side of "
            f"a rounding boundary: at {i} exact arithmetic gives code {int(codes['F1'][tuple(i)])}, the fake "
            f"forward {int(codes['F0'][tuple(i)])}."),
            evidence={"outputs_moved": moved["float arithmetic"], "index": i,
                      "exact_code": int(codes["F1"][tuple(i)]), "fake_code": int(codes["F0"][tuple(i)])},
            fix="expected for values within float32 error of a rounding boundary; to train on the arithmetic the "
                "deployed kernel runs, train with qparity (qparity.prepare_qat) for your target",
            affected=moved["float arithmetic"]))
    if moved["bias"]:
        i = _first(codes, "F4", "F5")
        causes.append(Cause(kind="bn_folding" if moved["float arithmetic"] or bn_training else "bias_quantization",
                            layer=name, explanation=(
            f"convert_pt2e's bias for {name} (folded from BN in float32 when there is one) differs from the bias the "
            f"fake forward adds in exact arithmetic; this moves {moved['bias']} of {total} codes (first at {i})."),
            evidence={"outputs_moved": moved["bias"], "index": i},
            fix="expected at float32 precision; train with qparity (qparity.prepare_qat) to train on the deployed "
                "bias", affected=moved["bias"]))
    if moved["reference float32"]:
        i = _first(codes, "F5", "F6")
        causes.append(Cause(kind="requantization", layer=name, explanation=(
            f"The converted graph computes {name} in float32 on dequantized values and quantizes with "
            f"round(y * (1/scale)); in {moved['reference float32']} of {total} outputs that differs from exact "
            f"arithmetic (first at {i}: exact code {int(codes['F5'][tuple(i)])}, reference graph "
            f"{int(codes['F6'][tuple(i)])})."),
            evidence={"rule": "quantized_decomposed float32", "outputs_moved": moved["reference float32"],
                      "index": i, "exact_code": int(codes["F5"][tuple(i)]),
                      "reference_code": int(codes["F6"][tuple(i)])},
            fix="expected: the reference graph is float32 arithmetic; a deployed integer kernel rounds in its own "
                "way again, so compare against the deployed runtime (qparity verify) rather than this graph",
            affected=moved["reference float32"]))
    return causes
