"""from_torch for PT2E: a convert_pt2e graph (quantized_decomposed QUANTIZE/DEQUANTIZE around aten operators)
as an IntegerModel of target `pt2e-reference` (numerics/pt2e_reference.py), whose codes are the converted
model's codes.

An aten operator whose inputs are all DEQUANTIZEd codes and whose only use is one QUANTIZE (through at most one
ReLU for conv2d, linear and add) becomes the qparity operator of the same arithmetic: conv2d, linear, add, mean,
max_pool2d (kept on its input's grid), cat (each input dequantized, then quantized: Target.rescale), and the shape
operators (flatten, view, reshape, permute, transpose, squeeze, unsqueeze, slice, alias), which move codes when
the QUANTIZE keeps the input's grid. Any other value, which a quantizer left in float32 (torchao's
X86InductorQuantizer quantizes an operator's output only where the next operator takes int8, and never a model
output), becomes an `aten_float` node calling the graph's own ATen operator on the same float32 inputs
(ops/aten_float.py), and a QUANTIZE of it a `quantize` node. An operator that is neither is refused naming the node.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.fx as fx

from .errors import UnsupportedOpError
from .graph import Graph, Node, Ref
from .ops.aten_float import FLOAT_CALLS, FLOAT_LAYERS
from .numerics.accumulate import ConvGeometry
from .qparams import DTYPE_NAMES, DTYPE_RANGES, QParams
from .runtime import IntegerLayer, IntegerModel

TARGET = "pt2e-reference"
QUANTIZE = "quantized_decomposed::quantize_per_tensor"
DEQUANTIZE = "quantized_decomposed::dequantize_per_tensor"
DEQUANTIZE_PER_CHANNEL = "quantized_decomposed::dequantize_per_channel"
LAYERS = ("aten::conv2d", "aten::linear")
FUSING = LAYERS + ("aten::add",)  # a ReLU between them and their QUANTIZE is their output clamp
# Shape operators on codes: the qparity `call` each becomes (aten.slice becomes indexing: `slice_call`).
SHAPE_CALLS = {"aten::flatten": "function:torch.flatten", "aten::view": "method:view",
               "aten::reshape": "function:torch.reshape", "aten::permute": "function:torch.permute",
               "aten::transpose": "function:torch.transpose", "aten::squeeze": "function:torch.squeeze",
               "aten::unsqueeze": "function:torch.unsqueeze", "aten::slice": "function:operator.getitem",
               "aten::alias": None}
READ = FUSING + ("aten::mean", "aten::max_pool2d", "aten::cat") + tuple(SHAPE_CALLS)
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
        self.codes: Dict[fx.Node, str] = {}     # QUANTIZE / DEQUANTIZE node -> the qparity value of its codes
        self.floats: Dict[fx.Node, str] = {}    # aten node left in float32 -> its aten_float node
        self.pending: Dict[fx.Node, Any] = {}   # aten node -> its qparity Node (or, for an alias, its input's
        # Ref), emitted at its QUANTIZE

    def refuse(self, node: fx.Node, why: str) -> UnsupportedOpError:
        where = module_path(node) or node.name
        return UnsupportedOpError(f"PT2E node '{node.name}' ({op_name(node) or node.op}) at {where}: {why}. "
                                  f"qparity reads {', '.join(READ)} between dequantize and quantize nodes, and "
                                  f"{', '.join(FLOAT_CALLS)} in float32")

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
        if name == "aten::relu" and node.args[0] in self.pending:
            self.pending[node] = self.fused_relu(node)
        elif self.on_codes(node, name):
            self.pending[node] = self.operator(node, name)
        else:
            self.float_node(node)
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
            if source.name in self.qparams:  # quantized again (a quantizer annotating each user on its own)
                if not qp.same_grid(self.qparams[source.name]):
                    raise self.refuse(node, f"model input '{source.name}' is quantized onto two grids ({qp} and "
                                            f"{self.qparams[source.name]}); an IntegerModel takes one grid per input")
                self.codes[node] = source.name
                return
            qnode = Node(source.name, "input", attrs={"rank": self.values[source].dim()}, path=source.name)
        elif source in self.pending:
            qnode = self.pending.pop(source)
            if isinstance(qnode, Ref):  # an alias: the QUANTIZE holds its input's codes
                self.codes[node] = qnode.name
                return
        elif source in self.floats:
            qnode = Node(node.name, "quantize", (Ref(self.floats[source]),), {}, {}, module_path(source) or source.name)
        else:
            raise self.refuse(node, f"it quantizes '{source.name}', which is not a model input or an operator "
                                    "qparity read")
        if qnode.new_grid:
            self.qparams[qnode.name] = qp
        self.nodes.append(qnode)
        self.codes[node] = qnode.name

    def same_grid(self, node: fx.Node) -> bool:
        """Whether the QUANTIZE using `node` keeps the grid of its (dequantized) input."""
        quantize = next(iter(node.users))
        source = self.codes[node.args[0]]
        grid = self.qparams.get(source) or self.grid_of(source)
        return self.grid(quantize).same_grid(grid)

    def grid_of(self, name: str) -> QParams:
        """The grid of the codes a code-moving node (call, max_pool2d) holds: its input's."""
        node = next(n for n in self.nodes if n.name == name)
        source = node.refs()[0]
        return self.qparams.get(source) or self.grid_of(source)

    # -- operators on codes -----------------------------------------------------------------------------------
    def on_codes(self, node: fx.Node, name: str) -> bool:
        """Whether `node` is read on codes: an operator qparity reads, every tensor input a DEQUANTIZE of codes, its
        only use one QUANTIZE (through one ReLU for conv2d, linear and add), on the input's grid where it moves
        codes (max pool, shape operators)."""
        if name not in READ or name == "aten::relu":
            return False
        inputs = node.args[0] if name == "aten::cat" else node.args[:2 if name == "aten::add" else 1]
        if not all(isinstance(a, fx.Node) and a in self.codes for a in inputs):
            return False
        use = _only_user(node)
        if name in FUSING and use is not None and op_name(use) == "aten::relu":
            use = _only_user(use)
        if use is None or op_name(use) != QUANTIZE:
            return False
        if name in LAYERS:
            return self.is_weight(node.args[1]) and (len(node.args) < 3 or node.args[2] is None
                                                    or node.args[2].op == "get_attr")
        if name == "aten::add" and node.kwargs.get("alpha", 1) != 1:
            return False
        if name == "aten::max_pool2d" or name in SHAPE_CALLS:
            return self.same_grid(node)
        return True

    def is_weight(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and op_name(arg) in (DEQUANTIZE, DEQUANTIZE_PER_CHANNEL) \
            and isinstance(arg.args[0], fx.Node) and arg.args[0].op == "get_attr"

    def node(self, node: fx.Node, op: str, args, attrs) -> Node:
        return Node(node.name, op, tuple(args), {}, attrs, module_path(node) or node.name)

    def operator(self, node: fx.Node, name: str) -> Any:
        operand = Ref(self.codes[node.args[0]]) if name != "aten::cat" else None
        if name in SHAPE_CALLS:
            return self.shape_call(node, name, operand)
        if name == "aten::cat":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return self.node(node, "cat", [[Ref(self.codes[a]) for a in node.args[0]]],
                             {"dim": dim % self.values[node].dim()})
        if name == "aten::max_pool2d":
            return self.max_pool(node, operand)
        if name in LAYERS:
            return self.layer(node, name, operand)
        if name == "aten::add":
            return self.node(node, "add", [Ref(self.codes[a]) for a in node.args[:2]], {})
        dims = [d % self.values[node.args[0]].dim() for d in node.args[1]]
        keepdim = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
        return self.node(node, "mean", [operand], {"dims": dims, "keepdim": keepdim})

    def shape_call(self, node: fx.Node, name: str, operand: Ref) -> Any:
        """A shape operator on codes, as the `call` of the same function (an alias: its input's codes)."""
        fn = SHAPE_CALLS[name]
        if fn is None:
            return operand
        args = list(node.args[1:])
        if name == "aten::slice":  # aten.slice.Tensor(self, dim=0, start=None, end=None, step=1)
            dim, start, end, step = args + [0, None, None, 1][len(args):]
            args = [(slice(None),) * (dim % self.values[node.args[0]].dim()) + (slice(start, end, step),)]
        return self.node(node, "call", [operand] + args, {"fn": fn})

    def fused_relu(self, node: fx.Node) -> Node:
        """ReLU between an operator and its QUANTIZE: the operator's output clamp."""
        fused = self.pending.pop(node.args[0])
        fused.attrs["clamp"] = (0.0, None)
        return fused

    def max_pool(self, node: fx.Node, operand: Ref) -> Node:
        """aten.max_pool2d(input, kernel_size, stride=[], padding=0, dilation=1, ceil_mode=False) of codes."""
        args = list(node.args[1:]) + [[], 0, 1, False][len(node.args) - 2:]
        kernel, stride, padding, dilation, ceil_mode = args[:5]

        def pair(value):
            value = list(value) if isinstance(value, (list, tuple)) else [value]
            return value * 2 if len(value) == 1 else value

        attrs = {"kernel_size": pair(kernel), "stride": pair(stride or kernel), "padding": pair(padding),
                 "dilation": pair(dilation), "ceil_mode": bool(ceil_mode)}
        return self.node(node, "max_pool2d", [operand], attrs)

    def layer(self, node: fx.Node, name: str, operand: Ref) -> Node:
        self.layers[node.name] = self.constants(node)
        if name == "aten::linear":
            geometry = ConvGeometry("linear")
        else:
            stride, padding, dilation, groups = (list(node.args[3:]) + [[1, 1], [0, 0], [1, 1], 1][len(node.args) - 3:])
            geometry = ConvGeometry("conv2d", tuple(stride), padding if isinstance(padding, str) else tuple(padding),
                                    tuple(dilation), groups)
        return self.node(node, geometry.kind, [operand],
                         {"geometry": geometry.to_dict(), "module": module_path(node) or node.name})

    def constants(self, node: fx.Node) -> IntegerLayer:
        """A conv/linear's int8 weight codes, float32 weight scale(s) and float32 bias."""
        codes, scale = self.weight(node, node.args[1])
        bias = node.args[2] if len(node.args) > 2 else None
        if bias is None:
            return IntegerLayer(codes, scale, None)
        bias_value = self.values[bias]
        if not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias_value.dtype == torch.float32):
            raise self.refuse(node, "a bias that is not a float32 constant")
        return IntegerLayer(codes, scale, bias_value.detach().clone())

    def weight(self, layer: fx.Node, dequantize: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """A layer's int8 weight codes and float32 scale(s), from the DEQUANTIZE of a constant."""
        if not self.is_weight(dequantize):
            raise self.refuse(layer, "its weight is not an int8 constant dequantized by quantized_decomposed")
        args = [self.values[a] if isinstance(a, fx.Node) else a for a in dequantize.args]
        codes = args[0]
        if op_name(dequantize) == DEQUANTIZE_PER_CHANNEL:
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

    # -- values left in float32 -------------------------------------------------------------------------------
    def float_node(self, node: fx.Node) -> None:
        """The graph's own ATen call on its float32 inputs (ops/aten_float.py)."""
        call = str(node.target) if node.op == "call_function" else ""
        if call not in FLOAT_CALLS:
            raise self.refuse(node, "an operator qparity does not read from a PT2E graph")
        args = [self.float_operand(node, a) for a in node.args]
        if call in FLOAT_LAYERS:
            self.layers[node.name] = self.constants(node)
            args[1:3] = [None, None][:len(args) - 1]  # aten_float fills in the layer's own weight and bias
        kwargs = {k: self.float_operand(node, v) for k, v in node.kwargs.items()}
        self.nodes.append(Node(node.name, "aten_float", tuple(args), kwargs, {"aten": call},
                               module_path(node) or node.name))
        self.floats[node] = node.name

    def float_operand(self, user: fx.Node, arg: Any) -> Any:
        """An argument of a float call: a value of the program (codes, dequantized when the call runs, or a float
        value), a layer's weight or bias (filled in by aten_float), or a plain argument."""
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.float_operand(user, a) for a in arg)
        if not isinstance(arg, fx.Node):
            return arg
        if arg in self.codes:
            return Ref(self.codes[arg])
        if arg in self.floats:
            return Ref(self.floats[arg])
        if op_name(user) in LAYERS and arg in user.args[1:3]:
            return None
        raise self.refuse(user, f"its input {arg.name!r} is neither a dequantized activation nor a value qparity "
                                "computed (a float model input or a float constant)")

    def read_output(self, node: fx.Node) -> None:
        def ref(value):
            if isinstance(value, (tuple, list)):
                return type(value)(ref(v) for v in value)
            if isinstance(value, fx.Node):
                if value in self.codes:
                    return Ref(self.codes[value])
                if value in self.floats:
                    return Ref(self.floats[value])
                raise self.refuse(value, "a model output qparity did not read")
            return value

        result = node.args[0]
        self.output = ref(result[0] if isinstance(result, (tuple, list)) and len(result) == 1 else result)


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None
