"""from_torch for PT2E: a convert_pt2e graph (quantized_decomposed QUANTIZE/DEQUANTIZE around aten operators)
as an IntegerModel of target `pt2e-reference` (numerics/pt2e_reference.py), whose codes are the converted
model's codes.

An IntegerModel holds codes on every edge, so each aten operator read here must take DEQUANTIZEd inputs and
have its output (through at most one ReLU) QUANTIZEd: conv2d, linear, add, mean, max_pool2d, as ExecuTorch's
XNNPACKQuantizer annotates them. A value left in float32 between two operators or returned in float32 (torchao's
X86InductorQuantizer quantizes a conv's output only where the next operator takes int8, and never a model
output) has no codes, and any other operator has no reader: both are refused naming the node.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx

from .errors import UnsupportedOpError
from .graph import Graph, Node, Ref
from .numerics.accumulate import ConvGeometry
from .qparams import DTYPE_NAMES, DTYPE_RANGES, QParams
from .runtime import IntegerLayer, IntegerModel

TARGET = "pt2e-reference"
QUANTIZE = "quantized_decomposed::quantize_per_tensor"
DEQUANTIZE = "quantized_decomposed::dequantize_per_tensor"
DEQUANTIZE_PER_CHANNEL = "quantized_decomposed::dequantize_per_channel"
LAYERS = ("aten::conv2d", "aten::linear")
READ = LAYERS + ("aten::add", "aten::mean", "aten::max_pool2d", "aten::relu")
GUARD_MODULES = ("_guards_fn",)  # torch.export's shape-guard call: no value flows through it


def op_name(node: fx.Node) -> str:
    """'namespace::op' of a call_function node on an OpOverload ('' otherwise)."""
    if node.op != "call_function" or not hasattr(node.target, "name"):
        return ""
    return node.target.name().split(".")[0]


def is_pt2e(model: Any) -> bool:
    """A convert_pt2e result: a GraphModule calling quantized_decomposed ops."""
    return isinstance(model, fx.GraphModule) and any(op_name(n).startswith("quantized_decomposed::")
                                                     for n in model.graph.nodes)


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


class _Values(fx.Interpreter):
    """Every node's value from one run (shapes, constants)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: Dict[fx.Node, Any] = {}

    def run_node(self, node: fx.Node) -> Any:
        self.values[node] = super().run_node(node)
        return self.values[node]


def from_pt2e(converted: fx.GraphModule, inputs: Tuple[torch.Tensor, ...]) -> IntegerModel:
    """The converted PT2E model as an IntegerModel of target pt2e-reference."""
    recorder = _Values(converted)
    with torch.no_grad():
        recorder.run(*inputs)
    reader = _Reader(recorder.values)
    for node in converted.graph.nodes:
        reader.add(node)
    graph = Graph(reader.nodes, reader.output, [tuple(x.shape) for x in inputs])
    return IntegerModel(graph, TARGET, reader.activation_dtype, reader.qparams, reader.layers)


class _Reader:
    def __init__(self, values: Dict[fx.Node, Any]):
        self.values = values
        self.nodes = []
        self.output: Any = None
        self.qparams: Dict[str, QParams] = {}
        self.layers: Dict[str, IntegerLayer] = {}
        self.activation_dtype: Optional[str] = None
        self.codes: Dict[fx.Node, str] = {}     # QUANTIZE / DEQUANTIZE node -> the qparity value it holds
        self.pending: Dict[fx.Node, Node] = {}  # aten node -> its qparity node, emitted at its QUANTIZE

    def refuse(self, node: fx.Node, why: str) -> UnsupportedOpError:
        where = module_path(node) or node.name
        return UnsupportedOpError(f"PT2E node '{node.name}' ({op_name(node) or node.op}) at {where}: {why}. "
                                  f"qparity reads {', '.join(READ)} between dequantize and quantize nodes")

    def add(self, node: fx.Node) -> None:
        name = op_name(node)
        if node.op in ("get_attr", "placeholder") or name == DEQUANTIZE_PER_CHANNEL:
            return  # constants and inputs are read where a layer or QUANTIZE uses them
        if node.op == "call_module" and node.target in GUARD_MODULES:
            return
        if name == QUANTIZE:
            return self.quantize(node)
        if name == DEQUANTIZE:
            if node.args[0] in self.codes:
                self.codes[node] = self.codes[node.args[0]]
            return None  # a weight's DEQUANTIZE (per-tensor weights) is read by its layer
        if node.op == "output":
            return self.read_output(node)
        if name not in READ:
            raise self.refuse(node, "an operator qparity does not read from a PT2E graph")
        self.pending[node] = self.operator(node, name)
        return None

    # -- grids ------------------------------------------------------------------------------------------------
    def grid(self, node: fx.Node) -> QParams:
        scale, zero_point, qmin, qmax, dtype = (self.values[a] if isinstance(a, fx.Node) else a for a in node.args[1:6])
        if isinstance(scale, torch.Tensor) or isinstance(zero_point, torch.Tensor):
            scale, zero_point = float(scale), int(zero_point)  # qparams held as graph constants (tensor overload)
        if dtype not in DTYPE_NAMES or DTYPE_NAMES[dtype] not in ("int8", "uint8"):
            raise self.refuse(node, f"activations quantized to {dtype} (qparity reads int8 and uint8)")
        dtype_name = DTYPE_NAMES[dtype]
        if (qmin, qmax) != DTYPE_RANGES[dtype_name]:
            raise self.refuse(node, f"quant_min/quant_max {qmin}, {qmax} narrower than {dtype_name}'s range")
        if float(torch.tensor(scale, dtype=torch.float32)) != float(scale):
            raise self.refuse(node, f"scale {scale!r} is not a float32 value (qparity holds float32 scales)")
        if self.activation_dtype not in (None, dtype_name):
            raise self.refuse(node, f"a {dtype_name} activation in a model of {self.activation_dtype} activations")
        self.activation_dtype = dtype_name
        return QParams(scale, zero_point, dtype_name)

    def quantize(self, node: fx.Node) -> None:
        source = node.args[0]
        qp = self.grid(node)
        if source.op == "placeholder":
            qnode = Node(source.name, "input", attrs={"rank": self.values[source].dim()}, path=source.name)
        elif source in self.pending:
            qnode = self.pending.pop(source)
        else:
            raise self.refuse(node, f"it quantizes '{source.name}', which is not a model input or an operator "
                                    "qparity read")
        if qnode.op == "max_pool2d" and not qp.same_grid(self.qparams[qnode.args[0].name]):
            raise self.refuse(source, "a max pool quantized onto another grid than its input's")
        if qnode.op != "max_pool2d":  # a max pool keeps its input's grid
            self.qparams[qnode.name] = qp
        self.nodes.append(qnode)
        self.codes[node] = qnode.name

    # -- operators --------------------------------------------------------------------------------------------
    def operand(self, user: fx.Node, arg: Any) -> Ref:
        """A dequantized activation input of `user`."""
        if isinstance(arg, fx.Node) and arg in self.codes:
            return Ref(self.codes[arg])
        if isinstance(arg, fx.Node) and arg in self.pending:
            raise self.refuse(user, f"its input '{arg.name}' is left in float32 (not quantized) by the quantizer, "
                                    "and qparity's integer program holds codes on every edge")
        raise self.refuse(user, f"its input {getattr(arg, 'name', arg)!r} is not a dequantized activation")

    def node(self, node: fx.Node, op: str, args, attrs) -> Node:
        return Node(node.name, op, tuple(args), {}, attrs, module_path(node) or node.name)

    def operator(self, node: fx.Node, name: str) -> Node:
        if name == "aten::relu":
            return self.fused_relu(node)
        if name == "aten::max_pool2d":
            return self.max_pool(node)
        if name in LAYERS:
            return self.layer(node, name)
        if name == "aten::add":
            if node.kwargs.get("alpha", 1) != 1:
                raise self.refuse(node, "add with alpha != 1")
            return self.node(node, "add", [self.operand(node, a) for a in node.args[:2]], {})
        dims = [d % self.values[node.args[0]].dim() for d in node.args[1]]
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        return self.node(node, "mean", [self.operand(node, node.args[0])], {"dims": dims, "keepdim": keepdim})

    def fused_relu(self, node: fx.Node) -> Node:
        """ReLU between an operator and its QUANTIZE: the operator's output clamp (a ReLU on dequantized codes
        would be a clamp of its own, not read yet)."""
        source = node.args[0]
        fused = self.pending.get(source)
        if fused is None or fused.op not in ("conv2d", "linear", "add") or len(source.users) != 1:
            raise self.refuse(node, "a ReLU that does not directly follow a conv2d, linear or add")
        fused.attrs["clamp"] = (0.0, None)
        return self.pending.pop(source)

    def max_pool(self, node: fx.Node) -> Node:
        """aten.max_pool2d(input, kernel_size, stride=[], padding=0, dilation=1, ceil_mode=False) of codes."""
        args = list(node.args[1:]) + [[], 0, 1, False][len(node.args) - 2:]
        kernel, stride, padding, dilation, ceil_mode = args[:5]

        def pair(value):
            value = list(value) if isinstance(value, (list, tuple)) else [value]
            return value * 2 if len(value) == 1 else value

        attrs = {"kernel_size": pair(kernel), "stride": pair(stride or kernel), "padding": pair(padding),
                 "dilation": pair(dilation), "ceil_mode": bool(ceil_mode)}
        return self.node(node, "max_pool2d", [self.operand(node, node.args[0])], attrs)

    def layer(self, node: fx.Node, name: str) -> Node:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else None
        codes, scale = self.weight(node, weight)
        if name == "aten::linear":
            geometry = ConvGeometry("linear")
        else:
            stride, padding, dilation, groups = (list(node.args[3:]) + [[1, 1], [0, 0], [1, 1], 1][len(node.args) - 3:])
            geometry = ConvGeometry("conv2d", tuple(stride), padding if isinstance(padding, str) else tuple(padding),
                                    tuple(dilation), groups)
        bias_value = None
        if bias is not None:
            bias_value = self.values[bias]
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias_value.dtype == torch.float32):
                raise self.refuse(node, "a bias that is not a float32 constant")
        qnode = self.node(node, geometry.kind, [self.operand(node, x)],
                          {"geometry": geometry.to_dict(), "module": module_path(node) or node.name})
        self.layers[node.name] = IntegerLayer(codes, scale, None if bias_value is None else bias_value.detach())
        return qnode

    def weight(self, layer: fx.Node, dequantize: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """A layer's int8 weight codes and float32 scale(s), from the DEQUANTIZE of a constant."""
        name = op_name(dequantize) if isinstance(dequantize, fx.Node) else ""
        constant = dequantize.args[0] if name in (DEQUANTIZE, DEQUANTIZE_PER_CHANNEL) else None
        if not (isinstance(constant, fx.Node) and constant.op == "get_attr"):
            raise self.refuse(layer, "its weight is not an int8 constant dequantized by quantized_decomposed")
        args = [self.values[a] if isinstance(a, fx.Node) else a for a in dequantize.args]
        codes = args[0]
        if name == DEQUANTIZE_PER_CHANNEL:
            scale, zero_points, axis = args[1], args[2], args[3]
            if axis != 0:
                raise self.refuse(layer, f"per-channel weights along axis {axis} (qparity reads axis 0)")
        else:
            scale, zero_points = torch.tensor(args[1]), torch.tensor(args[2])
        if codes.dtype != torch.int8 or bool((zero_points != 0).any()):
            raise self.refuse(layer, f"weights of dtype {codes.dtype} with zero points {zero_points.tolist()} "
                                     "(qparity reads symmetric int8 weights, zero point 0)")
        if scale.dtype != torch.float32 and not torch.equal(scale.to(torch.float32).to(scale.dtype), scale):
            raise self.refuse(layer, "weight scales that are not float32 values")
        return codes.clone(), scale.to(torch.float32).clone()

    def read_output(self, node: fx.Node) -> None:
        def ref(value):
            if isinstance(value, (tuple, list)):
                return type(value)(ref(v) for v in value)
            if isinstance(value, fx.Node):
                if value not in self.codes:
                    raise self.refuse(value, "a model output in float32 (not quantized): qparity's integer "
                                             "program returns codes")
                return Ref(self.codes[value])
            return value

        result = node.args[0]
        self.output = ref(result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result)
