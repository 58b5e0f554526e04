"""from_torch: a torch.ao converted model (eager or FX) to a qparity `IntegerModel` of the current engine's target.

The converted module is traced with torch.fx (eager QuantStub/DeQuantStub/QFunctional models trace too) and
run once on example inputs to read every quantized tensor's scale and zero point. Quantized conv/linear
modules become conv2d/linear nodes holding the engine's own int8 weights and float32 bias; quantized add,
add_relu, cat and hardswish (quantized Hardswish modules, quantized::hardswish, F.hardswish on a quantized
tensor) become add/cat/hardswish nodes on the grids PyTorch chose. Everything else goes through capture's
float-module rules (ReLU, max pool, flatten, ...). Ops the target cannot emulate exactly raise
`UnsupportedOpError`.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.fx as fx
import torch.nn.functional as F

from .capture import _Builder, _describe, _fuse_clamps, _record_values, _where
from .errors import CaptureError, UnsupportedOpError
from .from_pt2e import from_pt2e, is_pt2e
from .graph import Graph
from .numerics.accumulate import ConvGeometry
from .ops.registry import NEW_GRID_OPS, refuse_if_target_cannot_run
from .qparams import QParams
from .runtime import IntegerLayer, IntegerModel
from .numerics import get_target

ENGINES = ("fbgemm", "x86", "qnnpack")
QUANTIZED_CONVS = (nnq.Conv2d, nniq.ConvReLU2d)
QUANTIZED_LINEARS = (nnq.Linear, nniq.LinearReLU)
RELU_FUSED = (nniq.ConvReLU2d, nniq.LinearReLU)
HARDSWISH_FUNCTIONS = (torch.ops.quantized.hardswish, F.hardswish)


def from_torch(converted: torch.nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor) -> IntegerModel:
    """The integer program `converted` runs in torch.backends.quantized.engine, as a qparity IntegerModel; for a
    torchao convert_pt2e model, its reference Q/DQ graph as target 'pt2e-reference' (from_pt2e.py)."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if is_pt2e(converted):  # convert_pt2e's reference Q/DQ graph: the engine plays no part in it
        return from_pt2e(converted, inputs)
    engine = torch.backends.quantized.engine
    if engine not in ENGINES:
        raise UnsupportedOpError(f"quantized engine {engine!r} has no qparity target; use one of {ENGINES}")
    try:
        traced = converted if isinstance(converted, fx.GraphModule) else fx.symbolic_trace(converted)
    except Exception as error:
        raise CaptureError(f"torch.fx could not trace {type(converted).__name__}: {error}") from error
    # The engine as PyTorch runs these inputs now: this process's thread count, the inputs' layout.
    builder = _ConvertedBuilder(traced, _record_values(traced, inputs), get_target(engine).with_defaults_for(inputs))
    for node in traced.graph.nodes:
        builder.add(node)
    graph = Graph(builder.nodes, builder.output, [tuple(x.shape) for x in inputs])
    _fuse_clamps(graph)
    return IntegerModel(graph, builder.target, "uint8", builder.qparams, builder.integer_layers)


def _qparams(value: torch.Tensor, where: str) -> QParams:
    if not (isinstance(value, torch.Tensor) and value.is_quantized and value.dtype == torch.quint8):
        raise UnsupportedOpError(f"{where}: expected a quint8 tensor, got "
                                 f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
    if value.qscheme() != torch.per_tensor_affine:
        raise UnsupportedOpError(f"{where}: activation qscheme {value.qscheme()} (only per_tensor_affine)")
    return QParams(value.q_scale(), value.q_zero_point(), "uint8")


def _weight(module: torch.nn.Module, where: str):
    weight = module.weight()
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale = weight.q_per_channel_scales().to(torch.float32)
        zero_points = weight.q_per_channel_zero_points()
    else:
        scale = torch.tensor(weight.q_scale(), dtype=torch.float32)
        zero_points = torch.tensor([weight.q_zero_point()])
    if bool((zero_points != 0).any()):
        raise UnsupportedOpError(f"{where}: weight zero points {zero_points.tolist()} (qparity needs symmetric "
                                 "weights, zero point 0; use a per_channel_symmetric/per_tensor_symmetric qconfig)")
    bias = module.bias()
    return weight.int_repr(), scale, None if bias is None else bias.detach().to(torch.float32)


class _ConvertedBuilder(_Builder):
    def __init__(self, traced, values, target):
        super().__init__(traced, values)
        self.target = target
        self.qparams = {}
        self.integer_layers = {}

    def record_grid(self, node: fx.Node) -> None:
        self.qparams[node.name] = _qparams(self.values[node.name], f"node '{node.name}'")

    def add(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            return  # the float input; the quantize that follows it becomes the graph's input node
        if node.op == "call_module" and isinstance(self.modules[node.target], nnq.Quantize):
            return self.emit_input(node)
        if node.op == "call_module" and isinstance(self.modules[node.target], nnq.DeQuantize):
            self.alias[node.name] = self.ref(node.args[0]).name
            return None
        if node.op == "call_method" and node.target == "dequantize":
            self.alias[node.name] = self.ref(node.args[0]).name
            return None
        if node.op == "call_function" and node.target in (torch.quantize_per_tensor,):
            return self.emit_input(node)
        if node.op == "call_function" and node.target in (torch.ops.quantized.add, torch.ops.quantized.add_relu):
            return self.emit_quantized_add(node)
        if node.op == "call_function" and node.target in (torch.ops.quantized.cat, torch.cat):
            return self.emit_quantized_cat(node)
        if node.op == "call_function" and node.target is torch.ops.quantized.mul:
            return self.emit(node, "mul", [self.ref(node.args[0]), self.ref(node.args[1])])
        if node.op == "call_function" and node.target is torch.ops.quantized.leaky_relu:
            slope = node.kwargs.get("negative_slope", node.args[1] if len(node.args) > 1 else 0.01)
            return self.emit(node, "leaky_relu", [self.ref(node.args[0])], attrs={"negative_slope": float(slope)})
        if ((node.op == "call_function" and node.target in HARDSWISH_FUNCTIONS)
                or (node.op == "call_module" and isinstance(self.modules[node.target], torch.nn.Hardswish))):
            return self.emit(node, "hardswish", [self.ref(node.args[0])], attrs={})
        if (node.op, node.target) in (("call_method", "mean"), ("call_function", torch.mean)):
            raise self.unsupported(node, "quantized mean is not emulated; use AdaptiveAvgPool2d")
        return super().add(node)

    def constant_operand(self, node, a, b):
        if isinstance(a, (int, float)) or isinstance(b, (int, float)):
            raise self.unsupported(node, "a Python number in a converted model (quantized add_scalar / mul_scalar) "
                                         "is not read yet; prepare the float model with qparity instead")
        return a, b

    def emit_bilinear(self, node, x, *args) -> None:
        if not self.values[x.name].is_contiguous():
            raise self.unsupported(node, "bilinear interpolation of a channels-last quantized tensor (a conv's "
                                         "output): PyTorch runs it with qupsample_bilinear2d_nhwc_kernel "
                                         "(QuantizedOpKernels.cpp), whose float32 rounding qparity does not emulate; "
                                         "call .contiguous() before F.interpolate, which runs the NCHW kernel")
        super().emit_bilinear(node, x, *args)

    def emit_input(self, node: fx.Node) -> None:
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "placeholder"):
            raise self.unsupported(node, "a quantize must take a model input directly")
        self.emit(node, "input", attrs={"rank": self.values[node.name].dim()})
        self.record_grid(node)

    def emit_quantized_add(self, node: fx.Node) -> None:
        a, b = node.args[0], node.args[1]
        clamp = {"clamp": (0.0, None)} if node.target is torch.ops.quantized.add_relu else {}
        if self.values[a.name].shape != self.values[b.name].shape:
            raise self.unsupported(node, "add of tensors of different shapes (broadcasting)")
        self.emit(node, "add", [self.ref(a), self.ref(b)], attrs=clamp)

    def emit_quantized_cat(self, node: fx.Node) -> None:
        tensors = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        self.emit(node, "cat", [self.ref(list(tensors))], attrs={"dim": dim})

    def emit(self, node: fx.Node, op: str, args=(), kwargs=None, attrs=None) -> None:
        """Emit a node; an operator with a grid of its own takes the grid PyTorch gave its output (quantized
        modules and ops carry output qparams; float modules on quantized tensors keep or fix theirs)."""
        refuse_if_target_cannot_run(op, _where(node), self.target.name)
        if op == "clamp" and self.target.name == "qnnpack" and (attrs or {}).get("max") is not None:
            self.refuse_scrambled_clamp(node)
        super().emit(node, op, args, kwargs, attrs)
        if op in NEW_GRID_OPS and op != "input":
            self.record_grid(node)

    def refuse_scrambled_clamp(self, node: fx.Node) -> None:
        """PyTorch's qnnpack_clamp (clamp, hardtanh, relu6) writes a channels-last input's NHWC data into a
        tensor it allocates contiguous (aten/src/ATen/native/quantized/cpu/qclamp.cpp; measured on 2.13 and
        2.14): the converted model's values land in the wrong places. qparity computes the clamp, not the
        scramble, so it cannot predict that model."""
        source = self.values.get(node.args[0].name) if isinstance(node.args[0], fx.Node) else None
        if (isinstance(source, torch.Tensor) and source.dim() == 4 and not source.is_contiguous()
                and source.is_contiguous(memory_format=torch.channels_last)):
            raise UnsupportedOpError(
                f"{_describe(node, self.modules)} at {_where(node)}: on the qnnpack engine PyTorch's quantized "
                "clamp/hardtanh/relu6 of a channels-last tensor returns its elements in the wrong order (a PyTorch "
                "bug qparity does not reproduce); fuse the clamp into the conv, use ReLU, or make the tensor "
                "contiguous first")

    def add_module(self, node: fx.Node, module: torch.nn.Module) -> None:
        where = f"module '{node.target}'"
        if isinstance(module, QUANTIZED_CONVS):
            if module.padding_mode != "zeros":
                raise self.unsupported(node, f"padding_mode={module.padding_mode!r}")
            geometry = ConvGeometry("conv2d", tuple(module.stride), tuple(module.padding), tuple(module.dilation),
                                    module.groups)
            self.emit_layer(node, module, geometry, where)
        elif isinstance(module, QUANTIZED_LINEARS):
            self.emit_layer(node, module, ConvGeometry("linear"), where)
        elif isinstance(module, nnq.LeakyReLU):
            self.emit(node, "leaky_relu", [self.ref(node.args[0])], attrs={"negative_slope": module.negative_slope})
        elif type(module).__module__.startswith("torch.ao.nn"):
            raise self.unsupported(node, "a quantized module qparity does not read yet")
        else:
            super().add_module(node, module)

    def emit_layer(self, node: fx.Node, module, geometry: ConvGeometry, where: str) -> None:
        weight_codes, weight_scale, bias = _weight(module, where)
        attrs = {"geometry": geometry.to_dict(), "module": node.target}
        if isinstance(module, RELU_FUSED):
            attrs["clamp"] = (0.0, None)
        self.emit(node, geometry.kind, [self.ref(node.args[0])], attrs=attrs)
        self.integer_layers[node.name] = IntegerLayer(weight_codes, weight_scale, bias)
