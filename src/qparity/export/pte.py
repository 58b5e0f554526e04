"""Export an `executorch-xnnpack` IntegerModel to an ExecuTorch .pte file run by the XNNPACK delegate, and verify the file in
ExecuTorch's runtime.

The program is written from qparity's own integers, in the form ExecuTorch's XNNPACK partitioner lowers: every
operator runs on dequantized values between quantized_decomposed DEQUANTIZE and QUANTIZE nodes on the model's
grids (int8 weight codes with their per-channel scales; the bias as float32 values that the partitioner quantizes
back to int32 at s_in * s_w, checked here to give exactly qparity's codes). `to_edge_transform_and_lower` with
`XnnpackPartitioner` then hands the whole graph to XNNPACK; a node left outside the delegate would run in
ExecuTorch's portable float kernels, whose arithmetic no target follows, so such a model is refused with the list.

Target `executorch-xnnpack` (numerics/executorch_xnnpack.py) is this delegate's arithmetic: LiteRT's XNNPACK
kernels, as target `xnnpack`, but for the spatial mean (docs/runtimes.md). The file keeps
PyTorch's interface (float32 NCHW in, float32 out); its outputs are DEQUANTIZE of the codes, which
`verify_pte` divides back into codes exactly. Shapes are fixed: the file runs `batch_size` samples at a time and
verify feeds larger inputs in chunks, as for .tflite.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExportError, ModelFileError
from ..graph import CALLS, Graph, Node, leaves, resolve
from ..numerics.accumulate import ConvGeometry
from ..ops import constant, parameter
from ..qparams import QParams
from ..runtime import IntegerLayer, IntegerModel
from . import require_model_inputs
from .batch import refuse_mixed_samples
from .report import RuntimeResult, compare_codes
from .tflite import codes_from_dequantized

PTE_TARGET = "executorch-xnnpack"
# The code-preserving calls that only reshape (graph.CALLS), which the program writes as one view.
_SHAPE_ONLY_CALLS = {"method:view", "method:reshape", "method:flatten", "method:squeeze", "method:unsqueeze",
                     "function:torch.flatten", "function:torch.reshape", "function:torch.squeeze",
                     "function:torch.unsqueeze"}
INT32 = (-(2**31), 2**31 - 1)


def export_pte(model: IntegerModel, path, batch_size: int = 1) -> None:
    """Write `model` (target `executorch-xnnpack`) as a .pte file taking `batch_size` samples of float32 input."""
    if model.target.name != PTE_TARGET:
        raise ExportError(f"export_pte needs a model of target {PTE_TARGET!r}, got {model.target.name!r}; train "
                          f"with target={PTE_TARGET!r} to deploy with ExecuTorch's XNNPACK delegate")
    if model.activation_dtype != "int8":
        raise ExportError(f"XNNPACK's qs8 kernels need int8 activations, the model has {model.activation_dtype}")
    refuse_mixed_samples(model, batch_size, "a .pte file")
    program = lower(model, batch_size)
    with open(path, "wb") as f:
        f.write(program.buffer)


def lower(model: IntegerModel, batch_size: int = 1):
    """The ExecutorchProgramManager of the model's Q/DQ program, once every node is known to run in XNNPACK."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    module = QDQProgram(model)
    example = tuple(torch.zeros((batch_size,) + tuple(shape[1:])) for shape in model.graph.input_shapes)
    exported = torch.export.export(module, example)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    outside = undelegated_nodes(edge.exported_program().graph)
    if outside:
        raise ExportError(f"ExecuTorch's XNNPACK partitioner leaves {len(outside)} node(s) outside the delegate: "
                          f"{', '.join(outside)}; they would run in ExecuTorch's portable kernels, whose arithmetic "
                          "target 'executorch-xnnpack' does not follow")
    return edge.to_executorch()


def undelegated_nodes(graph: torch.fx.Graph) -> List[str]:
    """The operators of a lowered graph that run outside a delegate, as `node (operator)` strings."""
    import operator

    delegated = (torch.ops.higher_order.executorch_call_delegate, operator.getitem)
    return [f"{n.name} ({getattr(n.target, '__name__', n.target)})" for n in graph.nodes
            if n.op == "call_function" and n.target not in delegated]


# ---------------------------------------------------------------------------------------------------------
# The Q/DQ program
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Codes:
    """A node's output as the program holds it: int8 codes from a QUANTIZE node, on their grid."""

    codes: torch.Tensor
    qp: QParams

    @classmethod
    def quantize(cls, value: torch.Tensor, qp: QParams) -> "_Codes":
        args = (float(qp.scale), int(qp.zero_point), qp.qmin, qp.qmax, torch.int8)
        return cls(torch.ops.quantized_decomposed.quantize_per_tensor.default(value, *args), qp)

    def dequantize(self) -> torch.Tensor:
        args = (float(self.qp.scale), int(self.qp.zero_point), self.qp.qmin, self.qp.qmax, torch.int8)
        return torch.ops.quantized_decomposed.dequantize_per_tensor.default(self.codes, *args)


def _dequantized(value):
    """`value` with each _Codes replaced by a DEQUANTIZE of its own: one per consumer, as PT2E writes them,
    since XNNPACK's partitioner finds cycles where one DEQUANTIZE feeds operators of two partitions."""
    if isinstance(value, _Codes):
        return value.dequantize()
    if isinstance(value, (tuple, list)):
        return type(value)(_dequantized(v) for v in value)
    return value


def _quantized(value, qp: QParams):
    if isinstance(value, torch.Tensor):
        return _Codes.quantize(value, qp)
    if isinstance(value, (tuple, list)):
        return type(value)(_quantized(v, qp) for v in value)
    return value


def float_bias(layer: IntegerLayer, input_qp: QParams) -> torch.Tensor:
    """The float32 bias whose int32 codes, as XNNPACK's partitioner quantizes it at s_in * s_w
    (executorch backends/xnnpack/operators/quant_params.py QuantParams.from_bias, quantize_per_channel), are
    exactly the layer's codes; an ExportError where float32 cannot carry them."""
    qd = torch.ops.quantized_decomposed
    codes = layer.bias_codes.to(torch.int64)
    scale = torch.broadcast_to(layer.weight_scale.to(torch.float32), codes.shape) * float(input_qp.scale)
    bias = (codes.to(torch.float64) * scale.to(torch.float64)).to(torch.float32)
    back = qd.quantize_per_channel.default(bias, scale, torch.zeros_like(codes), 0, *INT32, torch.int32)
    if not torch.equal(back.to(torch.int64), codes):
        worst = int(torch.argmax(codes.abs()))
        raise ExportError(f"bias code {int(codes[worst])} (channel {worst}) does not survive ExecuTorch's float32 "
                          "bias: the partitioner quantizes a float32 bias again, which cannot carry codes this large")
    return bias


class QDQProgram(nn.Module):
    """qparity's graph as float operators between quantized_decomposed Q/DQ nodes on the model's grids."""

    def __init__(self, model: IntegerModel):
        super().__init__()
        self.graph: Graph = model.graph
        self.grids: Dict[str, QParams] = model.grids
        for node in self.graph.nodes:
            if not hasattr(self, "op_" + node.op):
                raise ExportError(f"{node.op} at {node.path}: the .pte exporter does not write this operator; "
                                  "operators it writes: " + ", ".join(sorted(
                                      name[3:] for name in dir(QDQProgram) if name.startswith("op_"))))
        for node in self.graph.nodes:  # numbers and parameters: int8 codes, dequantized where they are used
            if node.op == "constant":
                self.register_buffer(f"{node.name}_codes", constant.codes(model.target, node, self.grids[node.name])
                                     .to(torch.int8))
            elif node.op == "parameter":
                self.register_buffer(f"{node.name}_codes", parameter.stored_codes(node).to(torch.int8))
        for name, layer in model.layers.items():
            input_qp = self.grids[self.graph.node(name).args[0].name]
            scale = layer.weight_scale.to(torch.float32)
            channels = layer.weight_codes.shape[0]
            codes = layer.weight_codes
            if self.graph.node(name).op == "conv_transpose2d":
                # The layer keeps the equivalent conv's flipped kernel [out, in, kh, kw]; ConvTranspose2d's
                # weight is [in, out, kh, kw], per-channel along axis 1 (all XNNPACK's deconvolution takes).
                codes = codes.flip(-2, -1).transpose(0, 1)
            self.register_buffer(f"{name}_weight", codes.to(torch.int8).contiguous())
            self.register_buffer(f"{name}_weight_scale", torch.broadcast_to(scale, (channels,)).contiguous())
            self.register_buffer(f"{name}_weight_zero_point", torch.zeros(channels, dtype=torch.int64))
            if layer.bias_codes is not None:
                self.register_buffer(f"{name}_bias", float_bias(layer, input_qp))

    def forward(self, *inputs: torch.Tensor):
        env: Dict[str, object] = {}
        feed = iter(inputs)
        for node in self.graph.nodes:
            args = next(feed) if node.op == "input" else _dequantized(resolve(node.args, env))
            value = getattr(self, "op_" + node.op)(node, args, _dequantized(resolve(node.kwargs, env)))
            env[node.name] = _quantized(value, self.grids[node.name])
        return _dequantized(resolve(self.graph.output, env))

    def _weight(self, name: str, axis: int = 0) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        return qd.dequantize_per_channel.default(getattr(self, f"{name}_weight"), getattr(self, f"{name}_weight_scale"),
                                                 getattr(self, f"{name}_weight_zero_point"), axis, -127, 127, torch.int8)

    def _clamped(self, node: Node, value: torch.Tensor) -> torch.Tensor:
        """The node's fused clamp, in reals, as the activations the partitioner fuses into the operator's output
        range (relu, hardtanh: partition/config/gemm_configs.py fused_acts); an open bound is infinite."""
        low, high = tuple(node.attrs.get("clamp") or (None, None))
        if low is None and high is None:
            return value
        if low == 0.0 and high is None:
            return torch.relu(value)
        return F.hardtanh(value, -math.inf if low is None else low, math.inf if high is None else high)

    # One method per operator (tests/test_registry.py reads the names against the registry's formats).
    def op_input(self, node, x, kwargs):
        return x

    def op_conv2d(self, node, args, kwargs):
        g = ConvGeometry.from_dict(node.attrs["geometry"])
        bias = getattr(self, f"{node.name}_bias", None)
        y = F.conv2d(args[0], self._weight(node.name), bias, tuple(g.stride),
                     g.padding if isinstance(g.padding, str) else tuple(g.padding), tuple(g.dilation), g.groups)
        return self._clamped(node, y)

    def op_linear(self, node, args, kwargs):
        return self._clamped(node, F.linear(args[0], self._weight(node.name), getattr(self, f"{node.name}_bias", None)))

    def op_add(self, node, args, kwargs):
        return self._clamped(node, args[0] + args[1])

    def op_sub(self, node, args, kwargs):
        return args[0] - args[1]

    def op_mul(self, node, args, kwargs):
        return args[0] * args[1]

    def op_constant(self, node, args, kwargs):
        return _Codes(getattr(self, f"{node.name}_codes"), self.grids[node.name]).dequantize()

    op_parameter = op_constant

    def op_conv_transpose2d(self, node, args, kwargs):
        g = ConvGeometry.from_dict(node.attrs["geometry"])
        y = F.conv_transpose2d(args[0], self._weight(node.name, axis=1), getattr(self, f"{node.name}_bias", None),
                               tuple(g.stride), tuple(g.padding), tuple(g.output_padding), g.groups, tuple(g.dilation))
        return self._clamped(node, y)

    def op_leaky_relu(self, node, args, kwargs):
        return F.leaky_relu(args[0], node.attrs["negative_slope"])

    def op_amax(self, node, args, kwargs):
        # The partitioner has no config for amax; XNNPACK's qs8 max pooling takes the same maximum of codes, with
        # the reduced dims as one pooling window of a [1, 1, kept, reduced] view.
        x, grid = args[0], self.grids[node.name]
        rows, reduced = self._reduced_last(x, node.attrs["dim"], grid)
        window = self._requantized(rows.reshape(1, 1, -1, reduced.numel()), grid)
        pooled = self._requantized(F.max_pool2d(window, (1, reduced.numel())), grid)
        return pooled.reshape(self._reduced_shape(x, node.attrs["dim"], node.attrs["keepdim"]))

    def op_mean(self, node, args, kwargs):
        # The partitioner takes mean.dim only over the two inner axes of a 4-D tensor (MeanDimConfig), which
        # XNNPACK runs as its qs8 mean: the reduced dims as those axes of a [1, kept, 1, reduced] view.
        x, grid = args[0], self.grids[node.args[0].name]
        rows, reduced = self._reduced_last(x, node.attrs["dims"], grid)
        view = self._requantized(rows.reshape(1, -1, 1, reduced.numel()), grid)
        return torch.mean(view, (2, 3), keepdim=True).reshape(
            self._reduced_shape(x, node.attrs["dims"], node.attrs["keepdim"]))

    def _reduced_last(self, x, dims, grid):
        """x with the dims a reduction removes permuted last (a qs8 transpose), and those dims' sizes."""
        dims = sorted(d % x.dim() for d in dims)
        order = [d for d in range(x.dim()) if d not in dims] + dims
        if order != list(range(x.dim())):
            x = self._requantized(x.permute(order), grid)
        return x, torch.Size(x.shape[x.dim() - len(dims):])

    @staticmethod
    def _reduced_shape(x, dims, keepdim):
        dims = {d % x.dim() for d in dims}
        return [1 if d in dims else n for d, n in enumerate(x.shape) if keepdim or d not in dims]

    @staticmethod
    def _requantized(value, grid):
        """`value` through QUANTIZE and DEQUANTIZE on `grid`: the Q/DQ pair that makes its producer a qs8 operator."""
        return _Codes.quantize(value, grid).dequantize()

    def op_upsample_nearest(self, node, args, kwargs):
        # The partitioner has no config for upsample_nearest2d. Each axis is instead viewed with an axis of 1
        # after it, joined with itself `factor` times by cat and viewed back: the same codes, all of it qs8 in
        # XNNPACK. cat counts distinct inputs (CatConfig: at least 2), so each copy has its own DEQUANTIZE.
        grid, codes = self.grids[node.name], _Codes.quantize(args[0], self.grids[node.name])
        for axis, factor in zip((2, 3), node.attrs["scale_factor"]):
            if int(factor) == 1:
                continue
            shape = list(codes.codes.shape)
            single = _Codes.quantize(codes.dequantize().reshape(shape[:axis + 1] + [1] + shape[axis + 1:]), grid)
            joined = _Codes.quantize(torch.cat([single.dequantize() for _ in range(int(factor))], axis + 1), grid)
            shape[axis] *= int(factor)
            codes = _Codes.quantize(joined.dequantize().reshape(shape), grid)
        return codes.dequantize()

    def op_cat(self, node, args, kwargs):
        # XNNPACK's qs8 concatenate takes only inputs on the output's grid (xnn_define_concatenate fails to
        # create the node otherwise), so an input on another grid is first requantized onto it.
        out = self.grids[node.name]
        return torch.cat([x if self.grids[ref.name].same_grid(out) else self._requantized(x, out)
                          for ref, x in zip(node.args[0], args[0])], node.attrs["dim"])

    def op_hardswish(self, node, args, kwargs):
        return F.hardswish(args[0])

    def op_tanh(self, node, args, kwargs):
        return torch.tanh(args[0])

    def op_gelu(self, node, args, kwargs):
        return F.gelu(args[0])  # the erf form: what XNNPACK computes (approximate='tanh' is refused at prepare_qat)

    def op_sigmoid(self, node, args, kwargs):
        return torch.sigmoid(args[0])

    def op_clamp(self, node, args, kwargs):
        return torch.clamp(args[0], node.attrs.get("min"), node.attrs.get("max"))

    def op_max_pool2d(self, node, args, kwargs):
        a = node.attrs
        return F.max_pool2d(args[0], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])

    def op_avg_pool2d(self, node, args, kwargs):
        # A mean over the whole image lowers to XNNPACK's qs8 mean (an exact int32 sum, then one float
        # multiply: numerics/executorch_xnnpack.py); any other window runs XNNPACK's float32 average pooling
        # inside the delegate (subgraph/rewrites/cvt_to_fp32.cc), whose sums round in the kernel's order.
        a, height_width = node.attrs, tuple(args[0].shape[-2:])
        if tuple(a["kernel_size"]) != height_width or tuple(a["padding"]) != (0, 0):
            raise ExportError(f"avg_pool2d at {node.path} averages windows of {tuple(a['kernel_size'])} of a "
                              f"{height_width} image: the .pte exporter writes only means over the whole image "
                              "(global average pooling); XNNPACK runs other windows in float32")
        return torch.mean(args[0], (-2, -1), keepdim=True)

    def op_pad(self, node, args, kwargs):
        return F.pad(args[0], tuple(node.attrs["pad"]))

    def op_dropout(self, node, args, kwargs):
        return args[0]

    def op_call(self, node, args, kwargs):
        fn = node.attrs["fn"]
        if fn in _SHAPE_ONLY_CALLS and isinstance(args[0], torch.Tensor):
            # XNNPACK's partitioner takes squeeze/unsqueeze only on the last dim and flatten not at all, but any
            # view_copy: the same call as a reshape to the shape it gives (worked out on a meta tensor).
            shape = CALLS[fn](torch.empty(args[0].shape, device="meta"), *args[1:], **kwargs).shape
            return args[0].reshape(shape)
        return CALLS[fn](*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Running the file
# ---------------------------------------------------------------------------------------------------------
def load_method(path):
    """The `forward` method of a .pte file in ExecuTorch's runtime; a file it cannot load is a ModelFileError."""
    from executorch.runtime import Runtime

    try:
        program = Runtime.get().load_program(os.fspath(path))
        return program.load_method("forward")
    except Exception as error:  # the runtime raises RuntimeError/ValueError with its own status for bad files
        raise ModelFileError(f"ExecuTorch cannot load {os.fspath(path)!r} ({type(error).__name__}: {error}); "
                             "is it a .pte file written by qparity.export?") from None


def input_shapes(method) -> List[tuple]:
    meta = method.metadata
    return [tuple(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]


def run_pte(path, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The file's float outputs for `inputs`, fed in chunks of the file's batch size."""
    return _run(load_method(path), inputs)


def _run(method, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    batch = input_shapes(method)[0][0]
    total = inputs[0].shape[0]
    chunks = []
    for start in range(0, total, batch):
        piece = [x[start:start + batch].to(torch.float32).contiguous() for x in inputs]
        if piece[0].shape[0] < batch:  # pad the last chunk with copies of its first sample, dropped below
            piece = [torch.cat([p, p[:1].expand((batch - p.shape[0],) + p.shape[1:])]) for p in piece]
        chunks.append([o[:min(batch, total - start)] for o in method.execute(piece)])
    return [torch.cat(column) for column in zip(*chunks)]


def verify_pte(model: IntegerModel, path, inputs: Sequence[torch.Tensor]) -> List[RuntimeResult]:
    """Run the file in ExecuTorch (XNNPACK delegate) and compare its output codes with the model's."""
    method = load_method(path)
    require_model_inputs(path, input_shapes(method), model)
    codes = model.quantize(*inputs)
    expected = leaves(model.run(*(codes if isinstance(codes, tuple) else (codes,))))
    outputs = _run(method, inputs)
    if len(outputs) != len(expected):
        raise ModelFileError(f"{os.fspath(path)!r} has {len(outputs)} outputs; the model has {len(expected)}: was it "
                             "exported from another model?")
    return [compare_codes("ExecuTorch XNNPACK delegate", i, want, codes_from_dequantized(real, grid), binding=True)
            for i, (want, real, grid) in enumerate(zip(expected, outputs, leaves(model.output_qparams)))]
