"""Capture: an nn.Module to qparity's operator `Graph`, traced by torch.fx or, where tracing fails, exported by
torch.export and rewritten into the same torch-level fx forms (capture_export.py).

Modules and their functional forms map to the same operators. Conv2d followed by BatchNorm2d becomes one
conv node (BN folded the way it deploys); a clamp (ReLU, ReLU6, Hardtanh, clamp) right after a conv, linear
or add becomes that node's output clamp. Hardswish is never fused: it is its own node with its own output
grid, as torch.ao's quantized Hardswish. Anything else raises `UnsupportedOpError` naming the operator and
where it is.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .capture_export import export_as_fx, is_leaf_module
from .errors import CaptureError, UnsupportedOpError
from .graph import CODE_PRESERVING_FUNCTIONS, CODE_PRESERVING_METHODS, Graph, Node, Ref, collect_refs
from .numerics.accumulate import ConvGeometry
from .numerics.pooling import adaptive_as_pooling, adaptive_average_attrs
from .ops.attention import InProjection, attention_nodes, multihead_attention_nodes
from .ops.conv1d import Conv1dAs2d, as_conv2d_arguments
from .ops.conv_transpose2d import ConvTransposeAsConv
from .ops.registry import CAPTURED_OPS, CLAMP_FUSING_OPS, LAYER_OPS, OPERATORS
from .ops.upsample import float32_rule_is_exact
from .qparams import LARGEST_CONSTANT, SMALLEST_CONSTANT


def _is_number(value) -> bool:
    """A Python int or float (not a bool): what a constant node holds."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def supported_operators() -> str:
    """The operators the registry declares, for error messages; their PyTorch forms are in docs/ops.md."""
    return ", ".join(name for name in CAPTURED_OPS if name != "input")


ACTIVATION_MODULES = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardsigmoid: "hardsigmoid"}
ACTIVATION_FUNCTIONS = {torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh",
                        F.hardsigmoid: "hardsigmoid", torch.rsqrt: "rsqrt"}
SHAPE_ARITHMETIC = (operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.pow)


@dataclass
class Layer:
    """The modules that hold one conv/linear node's parameters."""

    module: nn.Module
    batch_norm: Optional[nn.BatchNorm2d] = None


CAPTURE_METHODS = ("torch.fx", "torch.export")


def capture(model: nn.Module, example_inputs: Tuple[torch.Tensor, ...]) -> Tuple[Graph, Dict[str, Layer], str]:
    """The model's graph, the modules holding its layers' parameters, and the capture used (`CAPTURE_METHODS`)."""
    example_inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise CaptureError(f"example input {i} must be a float tensor, got {type(x).__name__}"
                               + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if is_leaf_module(model):
        model = nn.Sequential(model)  # fx inlines a leaf root into F.conv2d/F.linear on its parameters
    traced, method = _trace(model, example_inputs)
    values = _record_values(traced, example_inputs)
    builder = _Builder(traced, values)
    for node in traced.graph.nodes:
        builder.add(node)
    graph = Graph(builder.nodes, builder.output, [tuple(x.shape) for x in example_inputs])
    _fuse_clamps(graph)
    return graph, builder.layers, method


def _trace(model: nn.Module, example_inputs) -> Tuple[fx.GraphModule, str]:
    """torch.fx's symbolic trace; where it fails (Python control flow on shapes, len(x), asserts), the graph
    torch.export records running the forward on the example inputs."""
    try:
        return fx.symbolic_trace(model), "torch.fx"
    except Exception as fx_error:  # fx raises many kinds; all mean the same thing to the user
        try:
            return export_as_fx(model, example_inputs), "torch.export"
        except CaptureError as error:
            raise CaptureError(f"torch.fx could not trace {type(model).__name__} ({fx_error}), and {error}") from error


class _Recorder(fx.Interpreter):
    """Keeps every node's result of one run. At module level: a class made inside a function sits in a reference
    cycle, and its closure would keep the example activations alive until a garbage collection."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module)
        self.values: Dict[str, Any] = {}

    def run_node(self, n):
        result = super().run_node(n)
        self.values[n.name] = result
        return result


def _record_values(traced: fx.GraphModule, inputs) -> Dict[str, Any]:
    recorder = _Recorder(traced)
    was_training = traced.training
    traced.eval()
    try:
        with torch.no_grad():
            recorder.run(*inputs)
    except Exception as error:
        raise CaptureError(f"running the model on the example inputs failed: {error}") from error
    finally:
        traced.train(was_training)
    return recorder.values


def _where(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}'"
    stack = node.meta.get("nn_module_stack")
    inside = f"module '{list(stack)[-1]}'" if stack else "the top-level forward"
    return f"node '{node.name}' in {inside}"


def _describe(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', target)}".lstrip(".")


def _pair(value) -> Tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class _Builder:
    def __init__(self, traced: fx.GraphModule, values: Dict[str, Any]):
        self.modules = dict(traced.named_modules())
        self.traced = traced
        self.values = values
        self.nodes: List[Node] = []
        self.layers: Dict[str, Layer] = {}
        self.alias: Dict[str, str] = {}
        self.parameters: Dict[str, Tuple[fx.Node, Any]] = {}
        self.conv1d_outputs: Dict[str, Node] = {}  # a Conv1d's squeeze node -> its conv2d node
        self.attention_outputs: Dict[str, str] = {}  # an nn.MultiheadAttention's node -> its output node
        self.output: Any = None

    # -- helpers --------------------------------------------------------------------------------------------
    def ref(self, arg):
        if isinstance(arg, fx.Node):
            if arg.name in self.parameters:
                raise self.unsupported(arg, f"the constant or parameter '{arg.target}' is used outside the weight "
                                            "or bias of a conv2d/linear")
            return Ref(self.alias.get(arg.name, arg.name))
        if isinstance(arg, (tuple, list)):
            return type(arg)(self.ref(a) for a in arg)
        if isinstance(arg, dict):
            return {k: self.ref(v) for k, v in arg.items()}
        return arg

    def static(self, value):
        """A non-tensor argument computed in the graph (e.g. `x.shape[-1]` as a kernel size) as its captured
        value: inputs keep their captured non-batch shape, so such values are constants of the program."""
        if isinstance(value, fx.Node) and not isinstance(self.values.get(value.name), torch.Tensor):
            return self.values[value.name]
        if isinstance(value, (tuple, list)):
            return type(value)(self.static(v) for v in value)
        return value

    def is_tensor(self, arg) -> bool:
        return isinstance(arg, fx.Node) and isinstance(self.values.get(arg.name), torch.Tensor)

    def emit(self, node: fx.Node, op: str, args=(), kwargs=None, attrs=None) -> None:
        self.nodes.append(Node(node.name, op, tuple(args), kwargs or {}, attrs or {}, _where(node)))

    def unsupported(self, node: fx.Node, why: str = "") -> UnsupportedOpError:
        name = _describe(node, self.modules)
        detail = f": {why}" if why else ""
        return UnsupportedOpError(f"unsupported operator {name} at {_where(node)}{detail}. qparity captures: "
                                  f"{supported_operators()} (their PyTorch forms: docs/ops.md)")

    def spatial(self, arg: fx.Node) -> Tuple[int, int]:
        return tuple(self.values[arg.name].shape[-2:])

    # -- dispatch -------------------------------------------------------------------------------------------
    def add(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            value = self.values.get(node.name)
            if not isinstance(value, torch.Tensor):
                raise CaptureError(f"model input '{node.name}' is not a tensor; qparity quantizes tensor inputs only")
            self.emit(node, "input", attrs={"rank": value.dim()})
        elif node.op == "output":
            self.output = self.ref(node.args[0])
        elif node.op == "get_attr":
            self.parameters[node.name] = (node, self.values[node.name])
        elif node.op == "call_module":
            self.add_module(node, self.modules[node.target])
        elif node.op == "call_function":
            self.add_function(node)
        elif node.op == "call_method":
            self.add_method(node)

    def add_module(self, node: fx.Node, module: nn.Module) -> None:
        x = node.args[0] if node.args else None
        if isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros":
                raise self.unsupported(node, f"padding_mode={module.padding_mode!r} (only 'zeros')")
            padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
            geometry = ConvGeometry("conv2d", _pair(module.stride), padding, _pair(module.dilation), module.groups)
            self.layers[node.name] = Layer(module)
            self.emit(node, "conv2d", [self.ref(x)], attrs={"geometry": geometry.to_dict(), "module": node.target})
        elif isinstance(module, nn.ConvTranspose2d):
            if len(node.args) > 1 or node.kwargs:
                raise self.unsupported(node, "an output_size argument (set output_padding on the module instead)")
            self.emit_conv_transpose(node, x, module.weight, module.bias, module.stride, module.padding,
                                     module.output_padding, module.groups, module.dilation, node.target)
        elif isinstance(module, nn.Conv1d):
            if module.padding_mode != "zeros":
                raise self.unsupported(node, f"padding_mode={module.padding_mode!r} (only 'zeros')")
            self.emit_conv1d(node, x, Conv1dAs2d(module.weight, module.bias), module.stride, module.padding,
                             module.dilation, module.groups)
        elif isinstance(module, nn.Linear):
            self.layers[node.name] = Layer(module)
            self.emit(node, "linear", [self.ref(x)], attrs={"geometry": ConvGeometry("linear").to_dict(),
                                                          "module": node.target})
        elif isinstance(module, nn.LayerNorm):
            self.emit_layer_norm(node, x, module.normalized_shape, module.weight, module.bias, module.eps)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d, nn.SyncBatchNorm)):
            self.fold_batch_norm(node, module)
        elif isinstance(module, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            low, high = (0.0, None) if isinstance(module, nn.ReLU) else (module.min_val, module.max_val)
            self.emit(node, "clamp", [self.ref(x)], attrs={"min": low, "max": high})
        elif isinstance(module, nn.Hardswish):
            self.emit(node, "hardswish", [self.ref(x)], attrs={})
        elif isinstance(module, (nn.Sigmoid, nn.Tanh, nn.Hardsigmoid)):
            self.emit(node, ACTIVATION_MODULES[type(module)], [self.ref(x)], attrs={})
        elif isinstance(module, nn.SiLU):
            self.emit_silu(node, x)
        elif isinstance(module, nn.LeakyReLU):
            self.emit(node, "leaky_relu", [self.ref(x)], attrs={"negative_slope": float(module.negative_slope)})
        elif isinstance(module, nn.GELU):
            self.emit(node, "gelu", [self.ref(x)], attrs={"approximate": module.approximate})
        elif isinstance(module, nn.ELU):
            self.emit(node, "elu", [self.ref(x)], attrs={"alpha": float(module.alpha)})
        elif isinstance(module, nn.PReLU):
            self.layers[node.name] = Layer(module)
            self.emit(node, "prelu", [self.ref(x)], attrs={"module": node.target})
        elif isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ZeroPad1d, nn.ConstantPad1d)):
            self.emit_pad(node, x, module.padding, "constant", getattr(module, "value", 0.0))
        elif isinstance(module, nn.Upsample):
            self.emit_upsample(node, x, module.size, module.scale_factor, module.mode, module.align_corners)
        elif isinstance(module, nn.AdaptiveMaxPool2d):
            if module.return_indices:
                raise self.unsupported(node, "return_indices=True")
            self.emit_adaptive_max(node, x, module.output_size)
        elif isinstance(module, (nn.MaxPool1d, nn.AvgPool1d)):
            self.emit_pool1d(node, x, module)
        elif isinstance(module, nn.MaxPool2d):
            if module.return_indices:
                raise self.unsupported(node, "return_indices=True")
            self.emit_max_pool(node, x, module.kernel_size, module.stride, module.padding, module.dilation,
                               module.ceil_mode)
        elif isinstance(module, nn.AvgPool2d):
            self.emit_avg_pool(node, x, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                               module.count_include_pad, module.divisor_override)
        elif isinstance(module, nn.AdaptiveAvgPool2d):
            self.emit_adaptive(node, x, module.output_size)
        elif isinstance(module, nn.AdaptiveAvgPool1d):
            self.emit_adaptive1d(node, x, module.output_size)
        elif isinstance(module, (nn.PixelShuffle, nn.PixelUnshuffle)):
            name = "pixel_shuffle" if isinstance(module, nn.PixelShuffle) else "pixel_unshuffle"
            factor = module.upscale_factor if isinstance(module, nn.PixelShuffle) else module.downscale_factor
            self.emit(node, "call", [self.ref(x), factor], attrs={"fn": f"function:torch.{name}"})
        elif isinstance(module, nn.Flatten):
            self.emit(node, "call", [self.ref(x), module.start_dim, module.end_dim],
                      attrs={"fn": "function:torch.flatten"})
        elif isinstance(module, nn.Identity):
            self.alias[node.name] = self.ref(x).name
        elif isinstance(module, nn.Dropout):
            self.emit(node, "dropout", [self.ref(x)], attrs={"p": float(module.p)})
        elif isinstance(module, nn.Softmax):
            self.emit_softmax(node, x, module.dim, None)
        elif isinstance(module, nn.MultiheadAttention):
            self.emit_multihead_attention(node, module)
        else:
            raise self.unsupported(node)

    def add_function(self, node: fx.Node) -> None:
        fn, args, kwargs = node.target, node.args, node.kwargs
        if fn is operator.getitem and getattr(args[0], "name", None) in self.attention_outputs:
            self.alias[node.name] = self.attention_outputs[args[0].name]  # nn.MultiheadAttention(...)[0]
        elif fn in (F.relu, torch.relu):
            self.emit(node, "clamp", [self.ref(args[0])], attrs={"min": 0.0, "max": None})
        elif fn is F.relu6:
            self.emit(node, "clamp", [self.ref(args[0])], attrs={"min": 0.0, "max": 6.0})
        elif fn is F.hardtanh:
            bound = _bind(args[1:], kwargs, ("min_val", "max_val"), (-1.0, 1.0))
            self.emit(node, "clamp", [self.ref(args[0])], attrs={"min": bound[0], "max": bound[1]})
        elif fn in (torch.clamp, torch.clip):
            self.emit_clamp(node, args[0], args[1:], kwargs)
        elif fn is F.hardswish:
            self.emit(node, "hardswish", [self.ref(args[0])], attrs={})
        elif fn in ACTIVATION_FUNCTIONS:
            self.emit(node, ACTIVATION_FUNCTIONS[fn], [self.ref(args[0])], attrs={})
        elif fn is F.leaky_relu:
            slope = self.static(_bind(args[1:], kwargs, ("negative_slope",), (0.01,))[0])
            self.emit(node, "leaky_relu", [self.ref(args[0])], attrs={"negative_slope": float(slope)})
        elif fn is F.gelu:
            approximate = self.static(_bind(args[1:], kwargs, ("approximate",), ("none",))[0])
            self.emit(node, "gelu", [self.ref(args[0])], attrs={"approximate": approximate})
        elif fn is F.elu:
            alpha = self.static(_bind(args[1:], kwargs, ("alpha",), (1.0,))[0])
            self.emit(node, "elu", [self.ref(args[0])], attrs={"alpha": float(alpha)})
        elif fn in (operator.add, torch.add):
            self.emit_add(node, args, kwargs)
        elif fn in (operator.sub, torch.sub):
            self.emit_add(node, args, kwargs, op="sub")
        elif fn in (operator.pow, torch.pow) and self.is_tensor(args[0]) and args[1] == 2:
            self.emit_mul(node, args[0], args[0])  # a square is the product of two tensors on one grid
        elif fn in (operator.mul, torch.mul) and isinstance(self.values.get(node.name), torch.Tensor):
            self.emit_mul(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
        elif (fn in (operator.truediv, torch.div, torch.true_divide) and not kwargs.get("rounding_mode")
              and isinstance(self.values.get(node.name), torch.Tensor)):
            self.emit_divide(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
        elif fn is F.silu:
            self.emit_silu(node, args[0])
        elif fn in (operator.matmul, torch.matmul, torch.bmm):
            self.emit_matmul(node, args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2")))
        elif fn is F.softmax:
            dim, _, dtype = self.static(_bind(args[1:], kwargs, ("dim", "_stacklevel", "dtype"), (None, 3, None)))
            self.emit_softmax(node, args[0], dim, dtype)
        elif fn is torch.softmax:
            dim, dtype = self.static(_bind(args[1:], kwargs, ("dim", "dtype"), (None, None)))
            self.emit_softmax(node, args[0], dim, dtype)
        elif fn is F.scaled_dot_product_attention:
            self.emit_attention(node, args, kwargs)
        elif fn in (torch.cat, torch.concat):
            dim = _bind(args[1:], kwargs, ("dim",), (0,))[0]
            tensors = args[0]
            if isinstance(tensors, fx.Node):
                raise self.unsupported(node, "cat of a sequence computed by another op; pass a list of tensors, "
                                             "e.g. torch.cat([a, b])")
            if not all(self.is_tensor(t) for t in tensors):
                raise self.unsupported(node, "every input of cat must be a tensor computed by the model")
            self.emit(node, "cat", [self.ref(list(tensors))], attrs={"dim": dim})
        elif fn is F.pad:
            pad, mode, value = self.static(_bind(args[1:], kwargs, ("pad", "mode", "value"), (None, "constant", None)))
            self.emit_pad(node, args[0], pad, mode, value)
        elif fn is F.interpolate:
            size, scale, mode, align, _, antialias = self.static(_bind(
                args[1:], kwargs, ("size", "scale_factor", "mode", "align_corners", "recompute_scale_factor", "antialias"),
                (None, None, "nearest", None, None, False)))
            if antialias:
                raise self.unsupported(node, "antialias=True (no runtime's integer resize filters first)")
            self.emit_upsample(node, args[0], size, scale, mode, align)
        elif fn is torch.amax:
            self.emit_amax(node, args[0], args[1:], kwargs)
        elif fn is F.adaptive_max_pool2d:
            size, indices = self.static(_bind(args[1:], kwargs, ("output_size", "return_indices"), (None, False)))
            if indices:
                raise self.unsupported(node, "return_indices=True")
            self.emit_adaptive_max(node, args[0], size)
        elif fn is F.max_pool2d:
            k, s, p, d, c, r = self.static(_bind(args[1:], kwargs, ("kernel_size", "stride", "padding", "dilation",
                                                                      "ceil_mode", "return_indices"),
                                                 (None, None, 0, 1, False, False)))
            if r:
                raise self.unsupported(node, "return_indices=True")
            self.emit_max_pool(node, args[0], k, s, p, d, c)
        elif fn is F.avg_pool2d:
            k, s, p, c, i, o = self.static(_bind(args[1:], kwargs, ("kernel_size", "stride", "padding",
                                                                     "ceil_mode", "count_include_pad",
                                                                     "divisor_override"),
                                                 (None, None, 0, False, True, None)))
            self.emit_avg_pool(node, args[0], k, s, p, c, i, o)
        elif fn is F.adaptive_avg_pool1d:
            self.emit_adaptive1d(node, args[0], self.static(_bind(args[1:], kwargs, ("output_size",), (None,))[0]))
        elif fn is F.adaptive_avg_pool2d:
            self.emit_adaptive(node, args[0], self.static(_bind(args[1:], kwargs, ("output_size",), (None,))[0]))
        elif fn is F.dropout:
            p = _bind(args[1:], kwargs, ("p",), (0.5,))[0]
            self.emit(node, "dropout", [self.ref(args[0])], attrs={"p": float(p)})
        elif fn is F.layer_norm:
            shape, weight, bias, eps = _bind(args[1:], kwargs, ("normalized_shape", "weight", "bias", "eps"),
                                             (None, None, None, 1e-5))
            self.emit_layer_norm(node, args[0], self.static(shape), self.parameter(node, weight, "weight"),
                                 self.parameter(node, bias, "bias"), eps)
        elif fn is torch.mean:
            self.emit_mean(node, args[0], args[1:], kwargs)
        elif fn is F.conv2d:
            w, b, stride, padding, dilation, groups = _bind(args[1:], kwargs, ("weight", "bias", "stride", "padding",
                                                                               "dilation", "groups"), (None, None, 1, 0, 1, 1))
            padding = padding if isinstance(padding, str) else _pair(padding)
            geometry = ConvGeometry("conv2d", _pair(stride), padding, _pair(dilation), groups)
            self.emit_functional_layer(node, args[0], w, b, geometry)
        elif fn is F.conv_transpose2d:
            w, b, stride, padding, output_padding, groups, dilation = _bind(
                args[1:], kwargs, ("weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"),
                (None, None, 1, 0, 0, 1, 1))
            weight, bias = self.parameter(node, w, "weight"), self.parameter(node, b, "bias")
            self.emit_conv_transpose(node, args[0], weight, bias, stride, padding, output_padding, groups, dilation,
                                     w.target)
        elif fn is F.conv1d:
            w, b, stride, padding, dilation, groups = _bind(args[1:], kwargs, ("weight", "bias", "stride", "padding",
                                                                               "dilation", "groups"), (None, None, 1, 0, 1, 1))
            weight, bias = self.parameter(node, w, "weight"), self.parameter(node, b, "bias")
            self.emit_conv1d(node, args[0], Conv1dAs2d(weight, bias), stride, padding, dilation, groups,
                             module_name=w.target)
        elif fn is F.linear:
            w, b = _bind(args[1:], kwargs, ("weight", "bias"), (None, None))
            self.emit_functional_layer(node, args[0], w, b, ConvGeometry("linear"))
        else:
            key = self.code_preserving_function(fn)
            if key is None:
                raise self.unsupported(node)
            if fn in SHAPE_ARITHMETIC and isinstance(self.values.get(node.name), torch.Tensor):
                raise self.unsupported(node, "arithmetic on a quantized tensor other than add, sub, mul of tensors "
                                             "and numbers, or division by a number")
            self.check_code_preserving(node)
            self.emit(node, "call", self.ref(args), self.ref(dict(kwargs)), attrs={"fn": "function:" + key})

    def add_method(self, node: fx.Node) -> None:
        name, args, kwargs = node.target, node.args, node.kwargs
        if name in ("relu", "relu_"):
            self.emit(node, "clamp", [self.ref(args[0])], attrs={"min": 0.0, "max": None})
        elif name in ("clamp", "clip"):
            self.emit_clamp(node, args[0], args[1:], kwargs)
        elif name == "add":
            self.emit_add(node, args, kwargs)
        elif name == "sub":
            self.emit_add(node, args, kwargs, op="sub")
        elif name == "mean":
            self.emit_mean(node, args[0], args[1:], kwargs)
        elif name in ("sigmoid", "tanh", "rsqrt"):
            self.emit(node, name, [self.ref(args[0])], attrs={})
        elif name == "amax":
            self.emit_amax(node, args[0], args[1:], kwargs)
        elif name == "pow" and args[1:] == (2,):
            self.emit_mul(node, args[0], args[0])
        elif name == "mul" and isinstance(self.values.get(node.name), torch.Tensor):
            self.emit_mul(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
        elif (name in ("div", "true_divide") and not kwargs.get("rounding_mode")
              and isinstance(self.values.get(node.name), torch.Tensor)):
            self.emit_divide(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"))
        elif name in ("matmul", "bmm"):
            self.emit_matmul(node, args[0], args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2")))
        elif name == "softmax":
            dim, dtype = self.static(_bind(args[1:], kwargs, ("dim", "dtype"), (None, None)))
            self.emit_softmax(node, args[0], dim, dtype)
        elif name in CODE_PRESERVING_METHODS:
            self.check_code_preserving(node)
            self.emit(node, "call", self.ref(args), self.ref(dict(kwargs)), attrs={"fn": "method:" + name})
        else:
            raise self.unsupported(node)

    # -- operators ------------------------------------------------------------------------------------------
    def fold_batch_norm(self, node: fx.Node, bn: nn.Module) -> None:
        """Fold a BatchNorm into the conv (Conv1d, Linear for BatchNorm1d) right before it when that layer's output
        feeds only it; otherwise run it as its own per-channel layer (`emit_batch_norm_layer`)."""
        if not bn.track_running_stats or not bn.affine:
            raise self.unsupported(node, f"{type(bn).__name__} needs affine=True and track_running_stats=True")
        source = node.args[0]
        producer = self.nodes[-1] if self.nodes else None
        output = producer  # what the BatchNorm reads: the layer, or a Conv1d's squeeze after its conv2d
        if producer is not None and producer.op != "linear" and self.values[source.name].dim() == 3:
            producer = self.conv1d_outputs.get(producer.name)
        if (producer is None or producer.op not in LAYER_OPS
                or output.name != self.alias.get(source.name, source.name) or len(source.users) != 1
                or self.layers[producer.name].batch_norm is not None):
            self.emit_batch_norm_layer(node, bn)
            return
        self.layers[producer.name].batch_norm = bn
        producer.attrs["batch_norm"] = node.target
        self.alias[node.name] = output.name

    def emit_batch_norm_layer(self, node: fx.Node, bn: nn.Module) -> None:
        """A BatchNorm after anything but its own conv (pre-activation nets) as a per-channel layer: a depthwise 1x1
        conv (a diagonal linear on [N, C]) with weight 1, no bias, and the BatchNorm folded into it the way it
        deploys; it trains as a folded BatchNorm (batch statistics in train mode, running ones at freeze)."""
        x = node.args[0]
        rank = self.values[x.name].dim()
        channels = bn.num_features
        if rank == 4:
            layer = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
            geometry = ConvGeometry("conv2d", (1, 1), (0, 0), (1, 1), channels)
        elif rank == 2:
            layer = nn.Linear(channels, channels, bias=False)
            geometry = ConvGeometry("linear")
        else:
            raise self.unsupported(node, f"{type(bn).__name__} on a rank-{rank} tensor that no Conv1d feeds")
        with torch.no_grad():
            layer.weight.copy_(torch.eye(channels).reshape(layer.weight.shape) if rank == 2 else 1.0)
        layer.weight.requires_grad_(False)  # the BatchNorm's own parameters train; the identity stays
        self.layers[node.name] = Layer(layer, bn)
        self.emit(node, geometry.kind, [self.ref(x)], attrs={"geometry": geometry.to_dict(), "module": node.target,
                                                             "batch_norm": node.target})

    def emit_functional_layer(self, node, x, weight, bias, geometry: ConvGeometry) -> None:
        holder = nn.Module()
        for name, arg in (("weight", weight), ("bias", bias)):
            value = self.parameters.get(arg.name, (None, None))[1] if isinstance(arg, fx.Node) else arg
            if arg is not None and not isinstance(value, nn.Parameter):
                raise self.unsupported(node, f"its {name} must be a parameter of the model (a get_attr), not a "
                                             "computed tensor")
            holder.register_parameter(name, value)
        self.layers[node.name] = Layer(holder)
        self.emit(node, geometry.kind, [self.ref(x)], attrs={"geometry": geometry.to_dict(),
                                                             "module": weight.target})

    def parameter(self, node, arg, name: str):
        value = self.parameters.get(arg.name, (None, None))[1] if isinstance(arg, fx.Node) else arg
        if arg is not None and not isinstance(value, nn.Parameter):
            raise self.unsupported(node, f"its {name} must be a parameter of the model (a get_attr), not a "
                                         "computed tensor")
        return value

    def emit_conv1d(self, node, x, layer_module, stride, padding, dilation, groups, module_name=None) -> None:
        """A Conv1d as unsqueeze -> conv2d (height-1 kernel) -> squeeze (ops/conv1d.py)."""
        stride, padding, dilation = as_conv2d_arguments(stride, padding, dilation)
        geometry = ConvGeometry("conv2d", stride, padding, dilation, groups)
        where = _where(node)
        widened = Node(node.name + "_as_2d", "call", (self.ref(x), -2), {}, {"fn": "method:unsqueeze"}, where)
        conv = Node(node.name + "_conv2d", "conv2d", (Ref(widened.name),), {},
                    {"geometry": geometry.to_dict(), "module": module_name or node.target}, where)
        self.nodes += [widened, conv]
        self.layers[conv.name] = Layer(layer_module)
        self.emit(node, "call", [Ref(conv.name), -2], attrs={"fn": "method:squeeze"})
        self.conv1d_outputs[node.name] = conv

    def emit_conv_transpose(self, node, x, weight, bias, stride, padding, output_padding, groups, dilation,
                            module_name: str) -> None:
        """A ConvTranspose2d as the conv of its zero-inserted input (ops/conv_transpose2d.py)."""
        if self.values[x.name].dim() != 4:
            raise self.unsupported(node, f"a rank-{self.values[x.name].dim()} input (only NCHW)")
        geometry = ConvGeometry("conv_transpose2d", _pair(stride), _pair(padding), _pair(dilation), groups,
                                _pair(output_padding))
        self.layers[node.name] = Layer(ConvTransposeAsConv(weight, bias, groups))
        self.emit(node, "conv_transpose2d", [self.ref(x)], attrs={"geometry": geometry.to_dict(),
                                                                  "module": module_name})

    def emit_clamp(self, node, x, args, kwargs) -> None:
        low, high = _bind(args, kwargs, ("min", "max"), (None, None))
        if isinstance(low, fx.Node) or isinstance(high, fx.Node):
            raise self.unsupported(node, "clamp bounds must be constants")
        self.emit(node, "clamp", [self.ref(x)], attrs={"min": None if low is None else float(low),
                                                       "max": None if high is None else float(high)})

    def constant_operand(self, node, a, b):
        """(a, b) with a Python number among them emitted as a constant node of shape [1, ..., 1] (the other
        operand's rank), so that add, sub and mul see two tensors; unchanged when both are tensors."""
        a, b = self.static(a), self.static(b)  # a number computed from shapes, e.g. x.shape[-1] ** -0.5
        if self.is_tensor(a) and _is_number(b) or self.is_tensor(b) and _is_number(a):
            tensor, value = (a, b) if self.is_tensor(a) else (b, a)
            magnitude = abs(float(value))
            if not (magnitude == 0 or SMALLEST_CONSTANT <= magnitude <= LARGEST_CONSTANT):
                raise self.unsupported(node, f"a constant {value!r}: a quantization grid holds 0 or magnitudes "
                                             f"from {SMALLEST_CONSTANT:.3g} to float32's largest")
            name = f"{node.name}_constant"
            self.values[name] = torch.full((1,) * self.values[tensor.name].dim(), float(value))
            self.nodes.append(Node(name, "constant", (), {}, {"value": float(value),
                                                             "shape": [1] * self.values[tensor.name].dim()},
                                   _where(node)))
            return (a, Ref(name)) if tensor is a else (Ref(name), b)
        return a, b

    def parameter_operand(self, node, arg, other):
        """A parameter of the model added to or multiplied with a tensor (a position embedding, RMSNorm's
        `* self.weight`) as a parameter node shaped to broadcast against it; any other argument unchanged."""
        value = self.parameters.get(arg.name, (None, None))[1] if isinstance(arg, fx.Node) else None
        if not isinstance(value, nn.Parameter) or not self.is_tensor(other):
            return arg
        rank = self.values[other.name].dim()
        if value.dim() > rank:
            raise self.unsupported(node, f"a parameter of shape {tuple(value.shape)} times a rank-{rank} tensor")
        holder = nn.Module()
        holder.register_parameter("weight", value)
        name = f"{node.name}_{arg.name}"
        self.layers[name] = Layer(holder)
        self.values[name] = value.detach().reshape((1,) * (rank - value.dim()) + tuple(value.shape))
        self.nodes.append(Node(name, "parameter", (), {}, {"shape": list(self.values[name].shape)}, _where(node)))
        return Ref(name)

    def is_operand(self, arg) -> bool:
        """A tensor of the model, or a constant node `constant_operand` made."""
        return self.is_tensor(arg) or isinstance(arg, Ref)

    def emit_add(self, node, args, kwargs, op="add") -> None:
        """add or sub of two tensors, or of a tensor and a number (a constant node); broadcasting is recorded so
        that prepare_qat can refuse it by name on a target whose kernel does not broadcast."""
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get("other")
        if not isinstance(self.values.get(node.name), torch.Tensor):
            self.emit(node, "call", self.ref(args), self.ref(dict(kwargs)), attrs={"fn": f"function:operator.{op}"})
            return
        if op == "sub" and _is_number(b) and self.is_tensor(a):
            op, b = "add", -b  # x - c is x + (-c): an add, which every runtime with constants has (ONNX: no QLinearSub)
        a, b = self.constant_operand(node, self.parameter_operand(node, a, b), self.parameter_operand(node, b, a))
        if not (self.is_operand(a) and self.is_operand(b)):
            raise self.unsupported(node, f"{op} of a tensor and {type(b if self.is_tensor(a) else a).__name__} "
                                         "(tensors and Python numbers only)")
        if kwargs.get("alpha", 1) != 1:
            raise self.unsupported(node, f"{op} with alpha != 1")
        shape_a, shape_b = self.values[a.name].shape, self.values[b.name].shape
        try:
            torch.broadcast_shapes(shape_a, shape_b)
        except RuntimeError:
            raise self.unsupported(node, f"{op} of shapes {tuple(shape_a)} and {tuple(shape_b)}, which do not "
                                         "broadcast") from None
        # A number's [1, ..., 1] tensor is no broadcast: PyTorch's engines take it as a scalar (add_scalar). A
        # parameter tensor (a position embedding) is one, so the targets that cannot broadcast refuse it here.
        numbers = {n.name for n in self.nodes if n.op == "constant"}
        constant = any(isinstance(v, Ref) and v.name in numbers for v in (a, b))
        attrs = {"broadcast": True} if shape_a != shape_b and not constant else {}
        self.emit(node, op, [self.ref(a), self.ref(b)], attrs=attrs)

    def emit_mul(self, node, a, b) -> None:
        a, b = self.constant_operand(node, self.parameter_operand(node, a, b), self.parameter_operand(node, b, a))
        if not (self.is_operand(a) and self.is_operand(b)):
            raise self.unsupported(node, "mul of a tensor and something that is neither a tensor nor a number")
        self.emit(node, "mul", [self.ref(a), self.ref(b)], attrs={})

    def emit_matmul(self, node, a, b) -> None:
        """The product of two tensors of the model, each of rank >= 2 (a vector's matmul drops a dimension)."""
        if not (self.is_tensor(a) and self.is_tensor(b)):
            raise self.unsupported(node, "matmul of something other than two tensors computed by the model "
                                         "(a weight matrix belongs in nn.Linear)")
        ranks = (self.values[a.name].dim(), self.values[b.name].dim())
        if min(ranks) < 2:
            raise self.unsupported(node, f"matmul of ranks {ranks}: both operands need rank >= 2 (unsqueeze a "
                                         "vector first)")
        # Batch dimensions that broadcast are recorded, so that prepare_qat refuses them on a target whose
        # kernel takes equal ones only (TOSA's MATMUL).
        batch = (self.values[a.name].shape[:-2], self.values[b.name].shape[:-2])
        self.emit(node, "matmul", [self.ref(a), self.ref(b)], attrs={"broadcast": True} if batch[0] != batch[1] else {})

    def emit_softmax(self, node, x, dim, dtype) -> None:
        rank = self.values[x.name].dim()
        if dim is None or dim % rank != rank - 1:
            raise self.unsupported(node, f"softmax over dim={dim} of a rank-{rank} tensor (only the last dimension, "
                                         "which every runtime's kernel reduces; transpose first)")
        if dtype is not None:
            raise self.unsupported(node, f"softmax with dtype={dtype}")
        # The row length, so that prepare_qat can refuse rows a target's kernel cannot sum (Target.check_softmax).
        self.emit(node, "softmax", [self.ref(x)], attrs={"length": int(self.values[x.name].shape[-1])})

    def emit_attention(self, node, args, kwargs) -> None:
        """F.scaled_dot_product_attention written out as the runtimes run it: matmul(q, k^T), mul by the scale
        (a constant), softmax, matmul with v."""
        q, k, v, mask, dropout, causal, scale, gqa = self.static(_bind(
            args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
            (None, None, None, None, 0.0, False, None, False)))
        if mask is not None or dropout or causal or gqa:
            raise self.unsupported(node, "scaled_dot_product_attention with attn_mask, dropout_p, is_causal or "
                                         "enable_gqa (only the plain form is decomposed)")
        scale = 1.0 / math.sqrt(self.values[q.name].shape[-1]) if scale is None else float(scale)
        steps = attention_nodes(node.name, self.ref(q), self.ref(k), self.ref(v), scale, self.values[q.name].dim(),
                                _where(node))
        self.nodes += steps[:-1]
        self.emit(node, "matmul", steps[-1].args, attrs={})

    def emit_multihead_attention(self, node, module: nn.MultiheadAttention) -> None:
        """nn.MultiheadAttention(x, x, x) (self-attention, batch_first, no masks, dropout or extra biases) as
        ops/attention.py writes it out; its outputs are read only through `[0]` (the attention weights would
        need another program)."""
        q, k, v, padding_mask, need_weights, mask, average, causal = _bind(
            node.args, node.kwargs, ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                                     "average_attn_weights", "is_causal"), (None, None, None, None, True, None, True,
                                                                            False))
        if not (q is k is v and self.is_tensor(q)):
            raise self.unsupported(node, "nn.MultiheadAttention other than self-attention (query, key and value the "
                                         "same tensor)")
        if (padding_mask is not None or mask is not None or causal or not module.batch_first or module.dropout
                or module.bias_k is not None or module.add_zero_attn or not module._qkv_same_embed_dim):
            raise self.unsupported(node, "nn.MultiheadAttention with masks, is_causal, dropout, add_bias_kv, "
                                         "add_zero_attn, kdim/vdim or batch_first=False (only plain batch-first "
                                         "self-attention is written out)")
        if any(user.target is not operator.getitem or user.args[1] != 0 for user in node.users):
            raise self.unsupported(node, "nn.MultiheadAttention's attention weights (use only its output [0])")
        steps = multihead_attention_nodes(node.name + "_output", self.ref(q), node.target, module,
                                          self.values[q.name].shape[1], _where(node))
        self.layers[steps[0].name] = Layer(InProjection(module))
        self.layers[steps[-1].name] = Layer(module.out_proj)
        self.nodes += steps
        self.attention_outputs[node.name] = steps[-1].name

    def emit_divide(self, node, a, b) -> None:
        """x / c as x * (1 / c): the runtimes have no quantized division; a tensor divisor is refused."""
        b = self.static(b)
        if not (self.is_tensor(a) and _is_number(b) and b != 0):
            raise self.unsupported(node, "division other than of a tensor by a nonzero Python number")
        self.emit_mul(node, a, 1.0 / float(b))

    def emit_silu(self, node, x) -> None:
        """SiLU as the runtimes run it: x * sigmoid(x), a sigmoid with its own grid, then a mul."""
        gate = Node(node.name + "_sigmoid", "sigmoid", (self.ref(x),), {}, {}, _where(node))
        self.nodes.append(gate)
        self.emit(node, "mul", [self.ref(x), Ref(gate.name)], attrs={})

    def emit_max_pool(self, node, x, kernel, stride, padding, dilation, ceil_mode) -> None:
        kernel = _pair(kernel)
        attrs = {"kernel_size": kernel, "stride": _pair(stride) if stride else kernel, "padding": _pair(padding),
                 "dilation": _pair(dilation), "ceil_mode": bool(ceil_mode)}
        self.emit(node, "max_pool2d", [self.ref(x)], attrs=attrs)

    def emit_pad(self, node, x, pad, mode, value) -> None:
        """Padding with zeros (the zero point's code); other values and modes would need a code of their own."""
        if mode != "constant" or value not in (None, 0, 0.0):
            raise self.unsupported(node, f"padding mode {mode!r} with value {value!r} (only constant zeros, which "
                                         "pad with the zero point's code)")
        pad = tuple(int(p) for p in pad)
        if any(p < 0 for p in pad):
            raise self.unsupported(node, f"negative padding {pad} (cropping): slice the tensor instead")
        self.emit(node, "pad", [self.ref(x)], attrs={"pad": pad})

    def emit_upsample(self, node, x, size, scale_factor, mode, align_corners) -> None:
        """Nearest upsampling of an NCHW tensor by integer factors, or bilinear resizing to any size (ops/upsample.py)."""
        if mode not in ("nearest", "bilinear"):
            raise self.unsupported(node, f"interpolation mode {mode!r} (only 'nearest' by integer factors and "
                                         "'bilinear')")
        input_hw = self.spatial(x)
        output_hw = tuple(self.values[node.name].shape[-2:])
        if mode == "bilinear":
            self.emit_bilinear(node, x, scale_factor, input_hw, output_hw, bool(align_corners))
            return
        if self.values[x.name].dim() != 4 or any(o % i for i, o in zip(input_hw, output_hw)):
            raise self.unsupported(node, f"upsampling {tuple(input_hw)} to {output_hw}: only 4-D inputs and integer "
                                         "factors copy codes exactly in every runtime")
        factors = tuple(o // i for i, o in zip(input_hw, output_hw))
        if not all(float32_rule_is_exact(i, k) for i, k in zip(input_hw, factors)):
            raise self.unsupported(node, f"upsampling {tuple(input_hw)} by {factors}: the runtimes' float32 index "
                                         "rule does not give y // k for every output row or column")
        self.emit(node, "upsample_nearest", [self.ref(x)], attrs={"scale_factor": factors})

    def emit_amax(self, node, x, args, kwargs) -> None:
        """The maximum over dimensions other than the batch (an exported file runs any batch size), same grid."""
        dim, keepdim = self.static(_bind(args, kwargs, ("dim", "keepdim"), ((), False)))
        rank = self.values[x.name].dim()
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        dims = tuple(sorted({d % rank for d in dims})) if dims else tuple(range(rank))
        if 0 in dims:
            raise self.unsupported(node, f"amax over dims {dims}, which include the batch dimension 0")
        self.emit(node, "amax", [self.ref(x)], attrs={"dim": dims, "keepdim": bool(keepdim)})

    def emit_bilinear(self, node, x, scale_factor, input_hw, output_hw, align_corners) -> None:
        """Bilinear resizing to the output size: the runtimes take sizes, and PyTorch's own position rule uses
        1 / scale_factor where one is given, which equals in / out in float32 only for integer factors."""
        if self.values[x.name].dim() != 4:
            raise self.unsupported(node, "bilinear interpolation of a tensor that is not 4-D (N, C, H, W)")
        factors = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor, scale_factor)
        if scale_factor is not None and not all(float(f).is_integer() for f in factors):
            raise self.unsupported(node, f"bilinear interpolation by scale_factor={scale_factor} (not an integer): "
                                         f"pass size={output_hw} instead")
        self.emit(node, "upsample_bilinear", [self.ref(x)],
                  attrs={"size": output_hw, "align_corners": align_corners})

    def emit_adaptive_max(self, node, x, output_size) -> None:
        """AdaptiveMaxPool2d to a size that divides the input: a max pool with uniform windows."""
        window = adaptive_as_pooling(self.spatial(x), output_size, _where(node))
        self.emit_max_pool(node, x, window["kernel_size"], window["stride"], 0, 1, False)

    def emit_pool1d(self, node, x, module) -> None:
        """MaxPool1d / AvgPool1d on [N, C, L] as the 2-D pool on [N, C, 1, L] between an unsqueeze and a squeeze."""
        where = _where(node)
        first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
        kernel = first(module.kernel_size)
        stride = first(module.stride) if module.stride is not None else kernel
        padding = first(module.padding)
        widened = Node(node.name + "_as_2d", "call", (self.ref(x), -2), {}, {"fn": "method:unsqueeze"}, where)
        self.nodes.append(widened)
        if isinstance(module, nn.MaxPool1d):
            if module.return_indices:
                raise self.unsupported(node, "return_indices=True")
            attrs = {"kernel_size": (1, kernel), "stride": (1, stride), "padding": (0, padding),
                     "dilation": (1, first(module.dilation)), "ceil_mode": bool(module.ceil_mode)}
            self.nodes.append(Node(node.name + "_pool", "max_pool2d", (Ref(widened.name),), {}, attrs, where))
        else:
            attrs = {"kernel_size": (1, kernel), "stride": (1, stride), "padding": (0, padding),
                     "ceil_mode": bool(module.ceil_mode), "count_include_pad": bool(module.count_include_pad)}
            self.nodes.append(Node(node.name + "_pool", "avg_pool2d", (Ref(widened.name),), {}, attrs, where))
        self.emit(node, "call", [Ref(node.name + "_pool"), -2], attrs={"fn": "method:squeeze"})

    def emit_avg_pool(self, node, x, kernel, stride, padding, ceil_mode, include_pad, divisor_override) -> None:
        if divisor_override is not None:
            raise self.unsupported(node, "divisor_override")
        kernel = _pair(kernel)
        attrs = {"kernel_size": kernel, "stride": _pair(stride) if stride else kernel, "padding": _pair(padding),
                 "ceil_mode": bool(ceil_mode), "count_include_pad": bool(include_pad)}
        self.emit(node, "avg_pool2d", [self.ref(x)], attrs=attrs)

    def emit_adaptive(self, node, x, output_size) -> None:
        attrs = adaptive_average_attrs(self.spatial(x), output_size, _where(node))
        attrs["adaptive_output_size"] = list(_pair(output_size)) if output_size is not None else None
        self.emit(node, "avg_pool2d", [self.ref(x)], attrs=attrs)

    def emit_adaptive1d(self, node, x, output_size, squeeze_length: bool = False) -> None:
        """AdaptiveAvgPool1d on [N, C, L] as the 2-D pool on [N, C, 1, L] between an unsqueeze and a squeeze."""
        where = _where(node)
        length = self.values[x.name].shape[-1]
        size = output_size[0] if isinstance(output_size, (tuple, list)) else output_size
        attrs = adaptive_average_attrs((1, length), (1, size), where)
        attrs["adaptive_output_size"] = [1, size]
        widened = Node(node.name + "_as_2d", "call", (self.ref(x), -2), {}, {"fn": "method:unsqueeze"}, where)
        pooled = Node(node.name + "_pool", "avg_pool2d", (Ref(widened.name),), {}, attrs, where)
        self.nodes += [widened, pooled]
        self.emit(node, "call", [Ref(pooled.name), (-2, -1) if squeeze_length else -2],
                  attrs={"fn": "method:squeeze"})

    def emit_mean(self, node, x, args, kwargs) -> None:
        dims, keepdim = _bind(args, kwargs, ("dim", "keepdim"), (None, False))
        rank = self.values[x.name].dim()
        dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
        if rank == 3 and [d % rank for d in dims] == [2]:  # the temporal mean of an [N, C, L] tensor
            self.emit_adaptive1d(node, x, 1, squeeze_length=not keepdim)
            return
        if rank != 4 or sorted(d % rank for d in dims) != [2, 3]:
            self.emit_reduce_mean(node, x, dims, keepdim)
            return
        attrs = adaptive_as_pooling(self.spatial(x), 1, _where(node))
        attrs["adaptive_output_size"] = [1, 1]
        pooled = Node(node.name + "_pool", "avg_pool2d", (self.ref(x),), {}, attrs, _where(node))
        self.nodes.append(pooled)
        if keepdim:
            self.alias[node.name] = pooled.name
        else:
            self.emit(node, "call", [Ref(pooled.name), (-1, -2)], attrs={"fn": "method:squeeze"})

    def emit_layer_norm(self, node, x, normalized_shape, weight, bias, eps) -> None:
        """LayerNorm over the last dimension as the program of int8 operators LiteRT's converter emits for it, each
        step on a grid of its own: m = mean(x), d = x - m, v = mean(d * d), r = rsqrt(v + eps), d * r; then the
        affine as a mul by the weight and an add of the bias, learned tensors on grids of their own."""
        rank = self.values[x.name].dim()
        if len(tuple(normalized_shape)) != 1 or rank < 2:
            raise self.unsupported(node, f"normalized_shape {tuple(normalized_shape)} of a rank-{rank} input (only the "
                                         "last dimension of a batch of samples)")
        where, prefix = _where(node), node.name
        shape = [1] * (rank - 1) + [int(normalized_shape[0])]

        def step(name, op, args, attrs=None):
            self.nodes.append(Node(f"{prefix}_{name}", op, tuple(args), {}, attrs or {}, where))
            return Ref(f"{prefix}_{name}")

        def tensor(name, value):
            holder = nn.Module()
            holder.register_parameter("weight", value)
            self.layers[f"{prefix}_{name}"] = Layer(holder)
            return step(name, "parameter", [], {"shape": shape})

        mean = step("mean", "mean", [self.ref(x)], {"dims": [rank - 1], "keepdim": True})
        centered = step("centered", "sub", [self.ref(x), mean], {"broadcast": True})
        variance = step("variance", "mean", [step("squared", "mul", [centered, centered])],
                        {"dims": [rank - 1], "keepdim": True})
        self.nodes.append(Node(f"{prefix}_eps", "constant", (), {}, {"value": float(eps), "shape": [1] * rank}, where))
        scale = step("rsqrt", "rsqrt", [step("plus_eps", "add", [variance, Ref(f"{prefix}_eps")], {"broadcast": True})])
        result = step("normalized", "mul", [centered, scale])
        if weight is not None:
            result = step("scaled", "mul", [result, tensor("weight", weight)])
        if bias is not None:
            result = step("shifted", "add", [result, tensor("bias", bias)], {"broadcast": True})
        self.alias[node.name] = result.name

    def emit_reduce_mean(self, node, x, dims, keepdim) -> None:
        """A mean over other dimensions (tokens, features): the mean operator, never over the batch."""
        rank = self.values[x.name].dim()
        resolved = sorted({d % rank for d in dims}) if dims else list(range(rank))
        if 0 in resolved:
            raise self.unsupported(node, f"mean over dims {tuple(dims) or 'all'}, which include the batch dimension "
                                         "(each sample's outputs must depend on that sample only)")
        self.emit(node, "mean", [self.ref(x)], attrs={"dims": resolved, "keepdim": bool(keepdim)})

    # -- code-preserving calls ------------------------------------------------------------------------------
    def code_preserving_function(self, fn) -> Optional[str]:
        for key, candidate in CODE_PRESERVING_FUNCTIONS.items():
            if candidate is fn:
                return key
        return None

    def check_code_preserving(self, node: fx.Node) -> None:
        tensors = [a for a in node.all_input_nodes if self.is_tensor(a)]
        if len(tensors) > 1:
            raise self.unsupported(node, "it combines several tensors")


def _bind(args, kwargs, names, defaults):
    values = list(defaults)
    for i, v in enumerate(args[:len(names)]):
        values[i] = v
    for i, name in enumerate(names):
        if name in kwargs:
            values[i] = kwargs[name]
    return values


def _fuse_clamps(graph: Graph) -> None:
    """Fold a clamp into the conv/linear/add right before it when that node feeds nothing else."""
    uses: Dict[str, int] = {}
    output_refs: List[str] = []
    collect_refs(graph.output, output_refs)
    for node in graph.nodes:
        for name in node.refs():
            uses[name] = uses.get(name, 0) + 1
    by_name = {n.name: n for n in graph.nodes}
    rename: Dict[str, str] = {}
    kept: List[Node] = []
    for node in graph.nodes:
        node.args, node.kwargs = _rename(node.args, rename), _rename(node.kwargs, rename)
        producer = by_name.get(node.args[0].name) if node.op == "clamp" and node.args else None
        if (producer is not None and producer.op in CLAMP_FUSING_OPS
                and uses.get(producer.name) == 1 and producer.name not in output_refs):
            low, high = producer.attrs.get("clamp", (None, None))
            low = node.attrs["min"] if low is None else (low if node.attrs["min"] is None else max(low, node.attrs["min"]))
            high = node.attrs["max"] if high is None else (high if node.attrs["max"] is None else min(high, node.attrs["max"]))
            producer.attrs["clamp"] = (low, high)
            rename[node.name] = producer.name
            uses[producer.name] = uses.get(node.name, 0)
            if node.name in output_refs:
                output_refs.append(producer.name)
            continue
        kept.append(node)
    graph.nodes = kept
    graph.output = _rename(graph.output, rename)


def _rename(value, mapping):
    if isinstance(value, Ref):
        return Ref(mapping.get(value.name, value.name))
    if isinstance(value, tuple):
        return tuple(_rename(v, mapping) for v in value)
    if isinstance(value, list):
        return [_rename(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _rename(v, mapping) for k, v in value.items()}
    return value
