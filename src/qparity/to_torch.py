"""to_torch: an `IntegerModel` of target fbgemm, x86 or qnnpack as a torch.ao quantized nn.Module.

The module runs qparity's graph node by node with torch.ao.nn.quantized modules (conv, linear and their
fused-ReLU forms, holding the model's int8 weights and float32 bias) and torch.ops.quantized functions
(add, add_relu, cat) and torch.ao.nn.quantized.Hardswish modules, on quint8 tensors, in the engine the
target names. Its outputs equal `im(x)` when it runs with the thread count the model records: the module
stores its inputs in the model's recorded layout, but PyTorch's kernels read torch.get_num_threads() as they
run, so it warns (QParityWarning) whenever that differs (docs/determinism.md).
"""
from __future__ import annotations

import warnings
from typing import Dict

import torch
import torch.ao.nn.intrinsic.quantized as nniq
import torch.ao.nn.quantized as nnq
import torch.nn.functional as F
from torch import nn

from .errors import QParityWarning, UnsupportedOpError
from .graph import CALLS, Graph, Node, resolve
from .ops.conv_transpose2d import as_transposed_weight
from .ops.registry import FLOAT_VALUE_OPS, OPERATORS
from .numerics.accumulate import ConvGeometry
from .qparams import QParams
from .runtime import IntegerLayer, IntegerModel
from .numerics.pytorch_engines import PARALLEL_GRAIN
from .numerics.pytorch_versions import installed_kernels

ENGINE_TARGETS = ("fbgemm", "x86", "qnnpack")


def to_torch(im: IntegerModel) -> "TorchQuantizedModel":
    """A torch.ao quantized module computing what `im` computes (run it with the engine im.target names)."""
    floats = [f"'{n.name}' ({n.attrs['aten']} at {n.path})" for n in im.graph.nodes if n.op in FLOAT_VALUE_OPS]
    if floats:  # a model read from a PT2E graph whose quantizer left values in float32
        raise UnsupportedOpError(f"to_torch cannot express node(s) {', '.join(floats)}: each computes a float32 value "
                                 "the PT2E quantizer left unquantized (a float model output among them, where one "
                                 "is), and torch.ao's quantized modules hold quantized tensors only")
    if im.target.name not in ENGINE_TARGETS:
        raise UnsupportedOpError(f"to_torch needs a model of target {', '.join(ENGINE_TARGETS)}; this one is for "
                                 f"{im.target.name!r}, whose integers PyTorch's engines do not compute")
    installed = installed_kernels()
    if im.target.kernels.release != installed.release:
        warnings.warn(f"the model follows PyTorch {im.target.kernels.release}'s {im.target.name} kernels, but this "
                      f"process runs PyTorch {torch.__version__} ({installed.release}'s kernels), whose integers "
                      "differ on some codes (qparity.numerics.pytorch_versions); the torch module computes this "
                      "PyTorch's integers, not the model's", QParityWarning, stacklevel=2)
    module = TorchQuantizedModel(im)
    module.warn_on_other_thread_count(stacklevel=3)
    return module


def _fused_clamp(node: Node):
    """The clamp fused into a conv, linear or add as (min, max) reals, or None."""
    clamp = tuple(node.attrs.get("clamp") or (None, None))
    return None if clamp == (None, None) else clamp


def _fuses_relu(node: Node) -> bool:
    """torch.ao has fused modules for ReLU only; any other fused clamp runs as quantized clamp after the op,
    which clamps the codes to the same bounds (quantize_val of each bound, as the engine targets compute them)."""
    return _fused_clamp(node) == (0.0, None)


def _clamp_after(node: Node, q: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """The node's fused clamp, run after the op unless its torch.ao module already fused it (`fused`: ReLU)."""
    clamp = _fused_clamp(node)
    return q if clamp is None or fused and _fuses_relu(node) else _quantized_clamp(q, *clamp)


def _quantized_clamp(q: torch.Tensor, lo, hi) -> torch.Tensor:
    # PyTorch's qnnpack_clamp (aten/src/ATen/native/quantized/cpu/qclamp.cpp, 2.13 and 2.14) writes a
    # channels-last input's NHWC data into a tensor it allocates contiguous, so clamp, hardtanh and relu6 of a
    # channels-last tensor come back scrambled on that engine (measured). Clamp a contiguous copy, then give
    # the result the input's layout, as every engine's own clamp does.
    layout = torch.channels_last if q.dim() == 4 and q.is_contiguous(memory_format=torch.channels_last) \
        and not q.is_contiguous() else torch.contiguous_format
    if hi is None and lo == 0.0:
        return torch.relu(q)  # quantized relu is its own kernel (not affected), and clamp needs both bounds
    # Quantized clamp needs both bounds; an open one becomes the end of the grid, which clamps nothing.
    info = torch.iinfo(q.int_repr().dtype)
    lo = (info.min - q.q_zero_point()) * q.q_scale() if lo is None else lo
    hi = (info.max - q.q_zero_point()) * q.q_scale() if hi is None else hi
    return torch.clamp(q.contiguous(), lo, hi).contiguous(memory_format=layout)


def _quantized_weight(layer: IntegerLayer, codes: torch.Tensor | None = None) -> torch.Tensor:
    codes = (layer.weight_codes if codes is None else codes).to(torch.int8)
    scale = layer.weight_scale
    if scale.dim():
        return torch._make_per_channel_quantized_tensor(codes, scale.to(torch.float64),
                                                        torch.zeros(scale.numel(), dtype=torch.int64), 0)
    return torch._make_per_tensor_quantized_tensor(codes, float(scale), 0)


def _layer_module(node: Node, layer: IntegerLayer, qp: QParams, engine: str) -> nn.Module:
    geometry = ConvGeometry.from_dict(node.attrs["geometry"])
    relu = _fuses_relu(node)
    out_features, in_features = layer.weight_codes.shape[0], layer.weight_codes.shape[1]
    if geometry.kind == "conv_transpose2d":
        return _transposed_conv_module(geometry, layer, qp, engine)
    if geometry.kind == "conv2d":
        if isinstance(geometry.padding, str):
            raise UnsupportedOpError(f"node '{node.name}': padding={geometry.padding!r}; torch.ao quantized conv "
                                     "takes integer padding")
        cls = nniq.ConvReLU2d if relu else nnq.Conv2d
        module = cls(in_features * geometry.groups, out_features, tuple(layer.weight_codes.shape[2:]),
                     geometry.stride, geometry.padding, geometry.dilation, geometry.groups,
                     bias=layer.bias_codes is not None)
    else:
        module = (nniq.LinearReLU if relu else nnq.Linear)(in_features, out_features, layer.bias_codes is not None)
    bias = None if layer.bias_codes is None else layer.bias_codes.to(torch.float32)
    module.set_weight_bias(_quantized_weight(layer), bias)
    module.scale, module.zero_point = float(qp.scale), int(qp.zero_point)
    return module


def _transposed_conv_module(geometry: ConvGeometry, layer: IntegerLayer, qp: QParams, engine: str) -> nn.Module:
    """nnq.ConvTranspose2d with the layer's codes in PyTorch's [in, out / groups, kh, kw] layout; it packs its
    weights for the engine that is current when they are set, so that engine is set meanwhile."""
    out_channels, in_per_group = layer.weight_codes.shape[:2]
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        module = nnq.ConvTranspose2d(in_per_group * geometry.groups, out_channels, tuple(layer.weight_codes.shape[2:]),
                                     geometry.stride, geometry.padding, geometry.output_padding, geometry.groups,
                                     layer.bias_codes is not None, geometry.dilation)
        codes = as_transposed_weight(layer.weight_codes, geometry.groups)
        bias = None if layer.bias_codes is None else layer.bias_codes.to(torch.float32)
        module.set_weight_bias(_quantized_weight(layer, codes), bias)
    finally:
        torch.backends.quantized.engine = previous
    module.scale, module.zero_point = float(qp.scale), int(qp.zero_point)
    return module


class TorchQuantizedModel(nn.Module):
    """qparity's graph executed with torch.ao quantized modules and ops; float in, float out."""

    def __init__(self, im: IntegerModel):
        super().__init__()
        self.graph: Graph = im.graph
        self.engine = im.target.name
        self.target = im.target
        self.qparams: Dict[str, QParams] = dict(im.qparams)
        self.layers = nn.ModuleDict({name: _layer_module(im.graph.node(name), layer, im.qparams[name], im.target.name)
                                     for name, layer in im.layers.items()})
        self.activations = nn.ModuleDict({n.name: nnq.Hardswish(float(im.qparams[n.name].scale),
                                                                int(im.qparams[n.name].zero_point))
                                          for n in im.graph.nodes if n.op == "hardswish"})
        # quint8 prelu weights (torch.ao's PReLU): the int8 slope codes + 128, zero point 128
        self.slopes = {n.name: torch._make_per_tensor_quantized_tensor(
            (torch.tensor(n.attrs["slope_codes"], dtype=torch.int64) + 128).to(torch.uint8),
            float(n.attrs["slope_scale"]), 128) for n in self.graph.nodes if n.op == "prelu"}
        for node in self.graph.nodes:
            if OPERATORS[node.op].torch_form is None:
                raise UnsupportedOpError(f"to_torch: operator {node.op!r} at {node.path} has no torch.ao form here")

    def forward(self, *inputs: torch.Tensor):
        if torch.backends.quantized.engine != self.engine:
            raise UnsupportedOpError(f"this module reproduces engine {self.engine!r}; set "
                                     f"torch.backends.quantized.engine = {self.engine!r} before running it")
        self.warn_on_other_thread_count(stacklevel=3)
        env: Dict[str, object] = {}
        feed = iter(inputs)
        for node in self.graph.nodes:
            if node.op == "input":
                qp = self.qparams[node.name]
                env[node.name] = torch.quantize_per_tensor(self.target.arrange_input(next(feed)), float(qp.scale),
                                                           int(qp.zero_point), torch.quint8)
                continue
            args = resolve(node.args, env)
            env[node.name] = self.run_node(node, args, resolve(node.kwargs, env))
        return _dequantize(resolve(self.graph.output, env))

    def warn_on_other_thread_count(self, stacklevel: int) -> None:
        """PyTorch splits add, hardswish, leaky_relu and hardsigmoid into one parallel chunk per thread, and the
        chunks decide which elements its vector loop rounds; a module cannot fix the count, so it says so."""
        recorded, running = self.target.threads, torch.get_num_threads()
        if recorded is not None and running != recorded:
            warnings.warn(f"the model records {recorded} engine thread(s) but PyTorch runs {running} "
                          f"(torch.get_num_threads()); tensors over {PARALLEL_GRAIN} elements may get other codes in "
                          f"{self.engine}'s elementwise kernels: call torch.set_num_threads({recorded}) to compute "
                          "the model's integers (docs/determinism.md)", QParityWarning, stacklevel=stacklevel)

    def run_node(self, node: Node, args, kwargs):
        if node.op in ("conv2d", "linear"):
            return _clamp_after(node, self.layers[node.name](args[0]))
        if node.op == "conv_transpose2d":  # torch.ao has no fused transposed conv: every clamp runs after it
            return _clamp_after(node, self.layers[node.name](args[0]), fused=False)
        if node.op == "constant":  # the number itself: the engines take it through add_scalar / mul_scalar
            return float(node.attrs["value"])
        if node.op in ("add", "mul") and any(isinstance(a, float) for a in args):
            x, value = (args[1], args[0]) if isinstance(args[0], float) else args
            if node.op == "mul":
                return torch.ops.quantized.mul_scalar(x, value)
            op = torch.ops.quantized.add_scalar_relu if _fuses_relu(node) else torch.ops.quantized.add_scalar
            return _clamp_after(node, op(x, value))
        if node.op == "add":
            qp = self.qparams[node.name]
            op = torch.ops.quantized.add_relu if _fuses_relu(node) else torch.ops.quantized.add
            return _clamp_after(node, op(args[0], args[1], float(qp.scale), int(qp.zero_point)))
        if node.op == "pad":
            return F.pad(args[0], tuple(node.attrs["pad"]))  # quantized constant_pad_nd pads with the zero point
        if node.op == "upsample_nearest":
            return F.interpolate(args[0], scale_factor=tuple(node.attrs["scale_factor"]), mode="nearest")
        if node.op == "amax":  # torch.amax has no quantized kernel; quantized max over a dim keeps the grid
            value = args[0]
            for dim in sorted(node.attrs["dim"], reverse=True):  # the highest first: lower dims keep their index
                value = torch.max(value, dim, keepdim=node.attrs["keepdim"]).values
            return value
        if node.op == "upsample_bilinear":  # the NCHW kernel, the one qparity emulates (numerics/resampling.py)
            return F.interpolate(args[0].contiguous(), size=tuple(node.attrs["size"]), mode="bilinear",
                                 align_corners=node.attrs["align_corners"])
        if node.op == "sigmoid":
            return torch.sigmoid(args[0])  # quantized sigmoid: PyTorch's fixed grid (1/256, 0), as the model's
        if node.op == "tanh":
            return torch.tanh(args[0])
        if node.op == "hardsigmoid":
            return F.hardsigmoid(args[0])
        if node.op == "leaky_relu":
            qp = self.qparams[node.name]
            return torch.ops.quantized.leaky_relu(args[0], float(node.attrs["negative_slope"]), False,
                                                  float(qp.scale), int(qp.zero_point))
        if node.op == "prelu":
            qp = self.qparams[node.name]
            return torch.ops.quantized.prelu(args[0], self.slopes[node.name], float(qp.scale), int(qp.zero_point))
        if node.op == "mul":
            qp = self.qparams[node.name]
            return torch.ops.quantized.mul(args[0], args[1], float(qp.scale), int(qp.zero_point))
        if node.op == "cat":
            qp = self.qparams[node.name]
            return torch.ops.quantized.cat(list(args[0]), node.attrs["dim"], float(qp.scale), int(qp.zero_point))
        if node.op == "hardswish":
            return self.activations[node.name](args[0])
        if node.op == "clamp":  # quantized clamp quantizes its bounds with quantize_val, as the engine targets do
            return _quantized_clamp(args[0], node.attrs.get("min"), node.attrs.get("max"))
        if node.op == "max_pool2d":
            a = node.attrs
            return F.max_pool2d(args[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])
        if node.op == "avg_pool2d":
            if "adaptive_output_size" in node.attrs:
                return F.adaptive_avg_pool2d(args[0], node.attrs["adaptive_output_size"])
            a = node.attrs
            return F.avg_pool2d(args[0], a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                a["count_include_pad"])
        if node.op == "dropout":
            return args[0]
        return CALLS[node.attrs["fn"]](*args, **kwargs)


def _dequantize(value):
    if isinstance(value, torch.Tensor):
        return value.dequantize() if value.is_quantized else value
    if isinstance(value, (tuple, list)):
        return type(value)(_dequantize(v) for v in value)
    return value
