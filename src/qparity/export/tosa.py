"""Export a `tosa` IntegerModel to a TOSA 1.0 flatbuffer, and verify the file in TOSA's reference model.

The file is written with `tosa_serializer` and run with `tosa_reference_model` (both from the `tosa-tools`
wheel, the optional extra `tosa`). Every integer the model computes maps to TOSA operators whose
specification is exactly qparity's `tosa` target (`qparity.numerics.tosa`), lowered as ExecuTorch's Arm
backend lowers them:

    CONV2D / DEPTHWISE_CONV2D (int32) -> RESCALE;  linear as a 1x1 CONV2D;  RESCALE x2 -> ADD / SUB / MUL (int32)
    -> RESCALE;  MATMUL (int32) -> RESCALE;  RESCALE -> REDUCE_SUM (int32) -> RESCALE for a mean;  REDUCE_MAX;
    softmax as REDUCE_MAX, SUB, GATHER, REDUCE_SUM, INTDIV (int32);
    CONCAT (inputs on other grids RESCALEd first);  MAX_POOL2D / AVG_POOL2D;  RESIZE NEAREST;  CLAMP;  PAD;
    CONST for parameters;  TABLE for the activations (sigmoid, tanh, hardsigmoid, hardswish, leaky_relu, gelu,
    elu) and rsqrt;
    RESHAPE / TRANSPOSE / SLICE / GATHER for layout calls and padding TOSA cannot express.

Interface. The graph takes and returns int8 codes with PyTorch's shapes (NCHW for images): quantizing the
float input and dequantizing the output is the host's, as with ExecuTorch's Arm delegate. Inside, TOSA's
spatial operators take NHWC, so every tensor carries a permutation (`stored = logical.permute(perm)`) and a
TRANSPOSE is emitted only where a consumer needs another order.

Batch size. Shapes in a TOSA graph are fixed; the file is written for `batch_size` samples (default 1), and
`verify_tosa` feeds larger inputs through it in chunks of that size.

Padding. TOSA's conv and pool windows are PyTorch's, but the output size must come out exactly
(`idiv_check`): the trailing padding is chosen so that it does, and where that would be negative the unused
trailing rows are cut off with a SLICE first. AVG_POOL2D excludes its padding from the divisor, so PyTorch's
count_include_pad padding is an explicit PAD with the zero point (centered value 0, counted).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ExportError, ModelFileError
from ..graph import CALLS, Executor, Node, fused_clamp_bounds, leaves
from ..numerics import pooling
from ..numerics.accumulate import ConvGeometry
from ..numerics.tosa import (add_scales, layer_scale, mean_scale, multiply_scale, rescale_parameters,
                              softmax_exp_table)
from ..ops import constant, parameter
from ..ops.pad import padding_per_dimension
from ..qparams import QParams
from ..runtime import IntegerModel
from . import require_model_inputs
from .batch import refuse_mixed_samples
from .report import RuntimeResult, compare_codes
from .tflite import _conv_padding

NHWC = (0, 2, 3, 1)
RUNTIME = "TOSA reference model"


def export_tosa(model: IntegerModel, path, batch_size: int = 1) -> None:
    """Write `model` (target `tosa`) as a TOSA flatbuffer taking `batch_size` samples of int8 codes."""
    if model.target.name != "tosa":
        raise ExportError(f"export_tosa needs a model of target 'tosa', got {model.target.name!r}; train with "
                          "target='tosa' to deploy a TOSA graph")
    if batch_size < 1:
        raise ExportError(f"batch_size must be at least 1, got {batch_size}")
    refuse_mixed_samples(model, batch_size, "a TOSA graph")
    binary = _Exporter(model, batch_size).build()
    with open(path, "wb") as f:
        f.write(binary)


@dataclass(frozen=True)
class TosaTensor:
    """An int8 tensor in the graph: `stored tensor == logical (PyTorch) tensor .permute(perm)`."""

    name: str
    shape: Tuple[int, ...]
    grid: QParams
    perm: Tuple[int, ...]

    @property
    def stored_shape(self) -> Tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)


def _identity(rank: int) -> Tuple[int, ...]:
    return tuple(range(rank))


class _Graph:
    """The serializer with the handful of tensor and operator forms the exporter writes."""

    def __init__(self) -> None:
        import tosa_serializer as ts

        self.ts = ts
        # TOSA 1.0, the version ExecuTorch's Arm backend writes for "TOSA-1.0+INT".
        self.serializer = ts.TosaSerializer("", targetMajor=1, targetMinor=0, targetPatch=0, targetDraft=False)
        self.count = 0

    def dtype(self, name: str):
        return getattr(self.ts.DType, name.upper())

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, hint: str, values, dtype: str) -> str:
        values = np.asarray(values)
        numpy_type = {"int8": np.int8, "int32": np.int32, "int16": np.int16}[dtype]
        name = self.name(hint)
        self.serializer.addConst(list(values.shape), self.dtype(dtype), values.astype(numpy_type).reshape(-1).tolist(),
                                 name=name)
        return name

    def shape(self, hint: str, values: Sequence[int]) -> str:
        name = self.name(hint)
        self.serializer.addConst([len(values)], self.ts.DType.SHAPE, [int(v) for v in values], name=name)
        return name

    def tensor(self, shape: Sequence[int], dtype: str) -> str:
        return self.serializer.addIntermediate([int(d) for d in shape], self.dtype(dtype)).name

    def operator(self, op: str, inputs: Sequence[str], shape: Sequence[int], dtype: str, attribute: str,
                 **fields) -> str:
        out = self.tensor(shape, dtype)
        attr = self.ts.TosaSerializerAttribute()
        getattr(attr, attribute)(**fields)
        self.serializer.addOperator(getattr(self.ts.Op, op), list(inputs), [out], attr)
        return out

    def rescale(self, source: str, shape: Sequence[int], scale: torch.Tensor, input_zp: int, output_zp: int,
                in_dtype: str, out_dtype: str) -> str:
        """RESCALE with ExecuTorch's multipliers and shifts, SINGLE_ROUND; per channel along the last axis when
        `scale` has one entry per channel."""
        multiplier, shift = rescale_parameters(scale.reshape(-1))
        inputs = [source, self.const("multiplier", multiplier.numpy(), "int32"),
                  self.const("shift", shift.numpy(), "int8"),
                  self.const("input_zp", [input_zp], in_dtype), self.const("output_zp", [output_zp], out_dtype)]
        return self.operator("RESCALE", inputs, shape, out_dtype, "RescaleAttribute", scale32=True,
                             rounding_mode=self.ts.RoundingMode.SINGLE_ROUND, per_channel=multiplier.numel() > 1,
                             input_unsigned=False, output_unsigned=False)

    def serialize(self) -> bytes:
        return self.serializer.serialize()


class _Exporter(Executor):
    def __init__(self, model: IntegerModel, batch_size: int):
        super().__init__(model.graph, model.target)
        self.model = model
        self.batch_size = batch_size
        self.g = _Graph()
        self.inputs = 0
        self.transposed: Dict[Tuple[str, Tuple[int, ...]], str] = {}

    def build(self) -> bytes:
        for node in self.graph.nodes:
            if not hasattr(self, "op_" + node.op):
                raise ExportError(f"cannot export the operator {node.op!r} at {node.path} to TOSA: qparity has no "
                                  "TOSA lowering for it")
        result = self.run([None] * len(self.graph.inputs))
        for i, value in enumerate(leaves(result)):
            if not isinstance(value, TosaTensor):
                raise ExportError(f"model output {i} is {type(value).__name__}, not a tensor; a TOSA graph returns "
                                  "tensors only")
            value = self.in_layout(value, _identity(len(value.shape)))
            # A graph output must be an operator's output of its own: an IDENTITY gives every output one.
            out = self.g.operator("IDENTITY", [value.name], value.shape, "int8", "IdentityAttribute")
            self.g.serializer.addOutputTensor(self.g.serializer.currRegion.currBasicBlock.tensors[out])
        return self.g.serialize()

    # -- helpers --------------------------------------------------------------------------------------------
    def refuse(self, node: Node, why: str) -> ExportError:
        return ExportError(f"cannot export {node.op} at {node.path} (node '{node.name}') to TOSA: {why}")

    def in_layout(self, x: TosaTensor, perm: Tuple[int, ...]) -> TosaTensor:
        """`x` stored as logical.permute(perm), with one TRANSPOSE if it is stored otherwise."""
        if x.perm == perm:
            return x
        moved = tuple(x.perm.index(p) for p in perm)
        key = (x.name, moved)
        if key not in self.transposed:
            shape = [x.stored_shape[p] for p in moved]
            self.transposed[key] = self.g.operator("TRANSPOSE", [x.name], shape, "int8", "TransposeAttribute",
                                                   perms=list(moved))
        return TosaTensor(self.transposed[key], x.shape, x.grid, perm)

    def reshape(self, x: TosaTensor, shape: Sequence[int]) -> TosaTensor:
        """x (in its logical order) reshaped; the result is stored in logical order."""
        x = self.in_layout(x, _identity(len(x.shape)))
        out = self.g.operator("RESHAPE", [x.name, self.g.shape("shape", shape)], shape, "int8", "ReshapeAttribute")
        return TosaTensor(out, tuple(shape), x.grid, _identity(len(shape)))

    def clamp(self, x: TosaTensor, bounds: Optional[Tuple[int, int]]) -> TosaTensor:
        """CLAMP of int8 codes to [lo, hi] (exact), where the bounds narrow the dtype's range."""
        if bounds is None or tuple(bounds) == (x.grid.qmin, x.grid.qmax):
            return x
        lo, hi = (np.array([b], np.int8).view(np.uint8).tolist() for b in bounds)
        out = self.g.operator("CLAMP", [x.name], x.stored_shape, "int8", "ClampAttribute", min_val=lo, max_val=hi,
                              nan_mode=self.g.ts.NanPropagationMode.PROPAGATE)
        return TosaTensor(out, x.shape, x.grid, x.perm)

    def window_padding(self, node: Node, x: TosaTensor, kernel, stride, dilation, lead, out_hw, limit: bool):
        """x (NHWC) with its trailing rows/columns cut where needed, and TOSA's [top, bottom, left, right] padding
        giving PyTorch's out_hw exactly; `limit`: pooling's padding must stay below the kernel."""
        pads, crop = [], []
        for i in range(2):
            span = (kernel[i] - 1) * dilation[i] + 1
            after = (out_hw[i] - 1) * stride[i] + span - x.shape[2 + i] - lead[i]
            crop.append(x.shape[2 + i] + min(after, 0))
            pads += [lead[i], max(after, 0)]
            if limit and max(lead[i], after) >= kernel[i]:
                raise self.refuse(node, f"padding {lead[i]}/{after} is not below the kernel {kernel[i]} (TOSA's "
                                        "pooling requires it)")
        if tuple(crop) != tuple(x.shape[2:]):
            n, c = x.shape[:2]
            size = [n, crop[0], crop[1], c]
            out = self.g.operator("SLICE", [x.name, self.g.shape("start", [0, 0, 0, 0]), self.g.shape("size", size)],
                                  size, "int8", "SliceAttribute")
            x = TosaTensor(out, (n, c, crop[0], crop[1]), x.grid, NHWC)
        return x, pads

    def requantize(self, node: Node, acc: str, shape: Sequence[int], input_grid: QParams, weight_scale: torch.Tensor,
                   cout: int) -> str:
        """The int32 accumulator of a conv or linear (channels last) onto the node's grid, then its fused clamp."""
        grid = self.model.qparams[node.name]
        scale = layer_scale(input_grid.scale, weight_scale.reshape(-1), grid.scale)
        if scale.numel() not in (1, cout):
            raise self.refuse(node, f"{scale.numel()} weight scales for {cout} output channels")
        return self.g.rescale(acc, shape, scale, 0, int(grid.zero_point), "int32", "int8")

    # -- operators ------------------------------------------------------------------------------------------
    def op_input(self, node: Node, _):
        grid = self.model.qparams[node.name]
        shape = (self.batch_size,) + tuple(self.graph.input_shapes[self.inputs][1:])
        self.inputs += 1
        tensor = self.g.ts.TosaSerializerTensor(node.name, list(shape), self.g.ts.DType.INT8, data=None)
        self.g.serializer.addInputTensor(tensor)
        return TosaTensor(node.name, shape, grid, _identity(len(shape)))

    def op_conv2d(self, node: Node, x: TosaTensor):
        geometry = ConvGeometry.from_dict(node.attrs["geometry"])
        layer = self.model.layers[node.name]
        grid = self.model.qparams[node.name]
        if len(x.shape) != 4:
            raise self.refuse(node, f"conv2d on a rank-{len(x.shape)} input (TOSA's CONV2D takes NHWC)")
        weight = layer.weight_codes
        cout, cin_group, kh, kw = weight.shape
        lead, out_hw = _conv_padding(geometry, x.shape[2:], (kh, kw))
        x = self.in_layout(x, NHWC)
        x, pads = self.window_padding(node, x, (kh, kw), geometry.stride, geometry.dilation, lead, out_hw, False)
        cin = x.shape[1]
        if geometry.groups == 1:
            op, attribute, filter_codes = "CONV2D", "Conv2dAttribute", weight.permute(0, 2, 3, 1)  # OHWI
        elif geometry.groups == cin and cin_group == 1:  # [KH, KW, C, M], output channel c * M + m
            op, attribute = "DEPTHWISE_CONV2D", "DepthwiseConv2dAttribute"
            filter_codes = weight.reshape(cin, cout // cin, kh, kw).permute(2, 3, 0, 1)
        else:
            raise self.refuse(node, f"groups={geometry.groups} (TOSA has CONV2D and DEPTHWISE_CONV2D only)")
        bias = layer.bias_codes
        bias = torch.zeros(cout, dtype=torch.int64) if bias is None else bias.reshape(-1).to(torch.int64)
        shape = [x.shape[0], out_hw[0], out_hw[1], cout]
        inputs = [x.name, self.g.const("weight", filter_codes.numpy(), "int8"), self.g.const("bias", bias, "int32"),
                  self.g.const("input_zp", [int(x.grid.zero_point)], "int8"), self.g.const("weight_zp", [0], "int8")]
        acc = self.g.operator(op, inputs, shape, "int32", attribute, pad=pads, stride=list(geometry.stride),
                              dilation=list(geometry.dilation), local_bound=False, acc_type=self.g.ts.DType.INT32)
        out = self.requantize(node, acc, shape, x.grid, layer.weight_scale, cout)
        out = TosaTensor(out, (x.shape[0], cout) + tuple(out_hw), grid, NHWC)
        return self.clamp(out, fused_clamp_bounds(self.target, node, grid))

    def op_linear(self, node: Node, x: TosaTensor):
        """A 1x1 CONV2D over the rows of x (ExecuTorch's DecomposeLinearPass), then a RESHAPE back."""
        layer = self.model.layers[node.name]
        grid = self.model.qparams[node.name]
        cout, cin = layer.weight_codes.shape
        rows = math.prod(x.shape[:-1])
        image = self.reshape(x, [rows, 1, 1, cin])
        bias = layer.bias_codes
        bias = torch.zeros(cout, dtype=torch.int64) if bias is None else bias.reshape(-1).to(torch.int64)
        shape = [rows, 1, 1, cout]
        inputs = [image.name, self.g.const("weight", layer.weight_codes.reshape(cout, 1, 1, cin).numpy(), "int8"),
                  self.g.const("bias", bias, "int32"), self.g.const("input_zp", [int(x.grid.zero_point)], "int8"),
                  self.g.const("weight_zp", [0], "int8")]
        acc = self.g.operator("CONV2D", inputs, shape, "int32", "Conv2dAttribute", pad=[0, 0, 0, 0], stride=[1, 1],
                              dilation=[1, 1], local_bound=False, acc_type=self.g.ts.DType.INT32)
        out = self.requantize(node, acc, shape, x.grid, layer.weight_scale, cout)
        out = self.reshape(TosaTensor(out, (rows, 1, 1, cout), grid, _identity(4)), tuple(x.shape[:-1]) + (cout,))
        return self.clamp(out, fused_clamp_bounds(self.target, node, grid))

    def op_constant(self, node: Node):
        grid = self.model.qparams[node.name]
        values = constant.codes(self.model.target, node, grid).numpy()
        name = self.g.const("constant", values, "int8")
        return TosaTensor(name, tuple(values.shape), grid, _identity(values.ndim))

    def op_parameter(self, node: Node):
        """A CONST of the codes convert wrote (a position embedding, LayerNorm's weight and bias)."""
        values = parameter.stored_codes(node).numpy()
        name = self.g.const("parameter", values, "int8")
        return TosaTensor(name, tuple(values.shape), self.model.qparams[node.name], _identity(values.ndim))

    def binary_operands(self, a: TosaTensor, b: TosaTensor):
        """a and b (in a's layout) of one rank, the lower-ranked one with leading 1s (TOSA broadcasts size-1
        dimensions of equal ranks only), and the result's shape."""
        rank = max(len(a.shape), len(b.shape))
        if len(a.shape) < rank:
            a = self.reshape(a, (1,) * (rank - len(a.shape)) + a.shape)
        if len(b.shape) < rank:
            b = self.reshape(b, (1,) * (rank - len(b.shape)) + b.shape)
        b = self.in_layout(b, a.perm)
        return a, b, tuple(max(p, q) for p, q in zip(a.shape, b.shape))

    def op_add(self, node: Node, a: TosaTensor, b: TosaTensor):
        return self.add_or_sub(node, a, b, "ADD", "AddAttribute")

    def op_sub(self, node: Node, a: TosaTensor, b: TosaTensor):
        return self.add_or_sub(node, a, b, "SUB", "SubAttribute")

    def add_or_sub(self, node: Node, a: TosaTensor, b: TosaTensor, op: str, attribute: str):
        """InsertRescaleInt32Pass: both operands RESCALEd to int32 at 2 max(s_a, s_b) / 2^20, the int32 op, a
        RESCALE back to int8."""
        grid = self.model.qparams[node.name]
        a, b, shape = self.binary_operands(a, b)
        scale_a, scale_b, scale_sum = add_scales(a.grid, b.grid, grid)
        wide_a = self.g.rescale(a.name, a.stored_shape, scale_a, int(a.grid.zero_point), 0, "int8", "int32")
        wide_b = self.g.rescale(b.name, b.stored_shape, scale_b, int(b.grid.zero_point), 0, "int8", "int32")
        stored = [shape[p] for p in a.perm]
        total = self.g.operator(op, [wide_a, wide_b], stored, "int32", attribute)
        out = self.g.rescale(total, stored, scale_sum, 0, int(grid.zero_point), "int32", "int8")
        return self.clamp(TosaTensor(out, shape, grid, a.perm), fused_clamp_bounds(self.target, node, grid))

    def op_mul(self, node: Node, a: TosaTensor, b: TosaTensor):
        """InsertRescaleInt32Pass: both operands RESCALEd to int32 by 1 (zero points removed), MUL with shift 0,
        a RESCALE by s_a s_b / s_y back to int8."""
        grid = self.model.qparams[node.name]
        a, b, shape = self.binary_operands(a, b)
        one = torch.tensor(1.0, dtype=torch.float64)
        wide_a = self.g.rescale(a.name, a.stored_shape, one, int(a.grid.zero_point), 0, "int8", "int32")
        wide_b = self.g.rescale(b.name, b.stored_shape, one, int(b.grid.zero_point), 0, "int8", "int32")
        stored = [shape[p] for p in a.perm]
        product = self.g.operator("MUL", [wide_a, wide_b, self.g.const("shift", [0], "int8")], stored, "int32",
                                  "MulAttribute")
        out = self.g.rescale(product, stored, multiply_scale(a.grid, b.grid, grid), 0, int(grid.zero_point),
                             "int32", "int8")
        return self.clamp(TosaTensor(out, shape, grid, a.perm), fused_clamp_bounds(self.target, node, grid))

    def op_cat(self, node: Node, tensors):
        grid = self.model.qparams[node.name]
        rank = len(tensors[0].shape)
        dim = node.attrs["dim"] % rank
        perm = tensors[0].perm
        parts = []
        for t in tensors:
            t = self.in_layout(t, perm)
            if not t.grid.same_grid(grid):
                scale = torch.tensor(float(t.grid.scale) / float(grid.scale), dtype=torch.float64)
                moved = self.g.rescale(t.name, t.stored_shape, scale, int(t.grid.zero_point), int(grid.zero_point),
                                       "int8", "int8")
                t = TosaTensor(moved, t.shape, grid, perm)
            parts.append(t)
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        out = self.g.operator("CONCAT", [t.name for t in parts], [shape[p] for p in perm], "int8", "ConcatAttribute",
                              axis=perm.index(dim))
        return TosaTensor(out, tuple(shape), grid, perm)

    def op_max_pool2d(self, node: Node, x: TosaTensor):
        attrs = node.attrs
        kernel = tuple(attrs["kernel_size"])
        if any(d != 1 and k != 1 for d, k in zip(attrs["dilation"], kernel)):
            raise self.refuse(node, f"dilation {tuple(attrs['dilation'])}: TOSA's MAX_POOL2D has no dilation")
        return self.pool(node, x, attrs, "MAX_POOL2D", "MaxPool2dAttribute")

    def op_avg_pool2d(self, node: Node, x: TosaTensor):
        attrs = pooling.window_attrs(node.attrs, tuple(x.shape[2:]), node.path)
        return self.pool(node, x, attrs, "AVG_POOL2D", "AvgPool2dAttribute")

    def pool(self, node: Node, x: TosaTensor, attrs: dict, op: str, attribute: str):
        if len(x.shape) != 4:
            raise self.refuse(node, f"pooling of a rank-{len(x.shape)} input")
        kernel, stride, lead = tuple(attrs["kernel_size"]), tuple(attrs["stride"]), tuple(attrs["padding"])
        out_hw = pooling.output_size(tuple(x.shape[2:]), attrs)
        x = self.in_layout(x, NHWC)
        zero_point = int(x.grid.zero_point)
        if op == "AVG_POOL2D" and attrs["count_include_pad"] and any(lead):
            x = self.pad(x, [(0, 0), (0, 0), (lead[0], lead[0]), (lead[1], lead[1])], zero_point)
            lead = (0, 0)
        x, pads = self.window_padding(node, x, kernel, stride, (1, 1), lead, out_hw, True)
        shape = [x.shape[0], out_hw[0], out_hw[1], x.shape[1]]
        if op == "AVG_POOL2D":
            inputs = [x.name, self.g.const("input_zp", [zero_point], "int8"),
                      self.g.const("output_zp", [zero_point], "int8")]
            out = self.g.operator(op, inputs, shape, "int8", attribute, kernel=list(kernel), stride=list(stride),
                                  pad=pads, acc_type=self.g.ts.DType.INT32)
        else:
            out = self.g.operator(op, [x.name], shape, "int8", attribute, kernel=list(kernel), stride=list(stride),
                                  pad=pads, nan_mode=self.g.ts.NanPropagationMode.PROPAGATE)
        return TosaTensor(out, (x.shape[0], x.shape[1]) + tuple(out_hw), x.grid, NHWC)

    def pad(self, x: TosaTensor, logical: Sequence[Tuple[int, int]], value: int) -> TosaTensor:
        """PAD with a constant code, `logical` giving (before, after) per logical dimension."""
        shape = tuple(size + before + after for size, (before, after) in zip(x.shape, logical))
        padding = [v for p in x.perm for v in logical[p]]
        out = self.g.operator("PAD", [x.name, self.g.shape("padding", padding), self.g.const("pad_value", [value],
                                                                                             "int8")],
                              [shape[p] for p in x.perm], "int8", "PadAttribute")
        return TosaTensor(out, shape, x.grid, x.perm)

    def table(self, node: Node, x: TosaTensor, entries: torch.Tensor) -> TosaTensor:
        """TABLE: the target's int8 output code for each of the 256 input codes, in any layout."""
        grid = self.model.qparams[node.name]
        out = self.g.operator("TABLE", [x.name, self.g.const("table", entries.numpy(), "int8")], x.stored_shape,
                              "int8", "TableAttribute")
        return TosaTensor(out, x.shape, grid, x.perm)

    def activation(self, node: Node, x: TosaTensor) -> TosaTensor:
        grid = self.model.qparams[node.name]
        return self.table(node, x, self.target.activation_table(node.op, x.grid, grid, node.attrs))

    op_sigmoid = op_tanh = op_hardsigmoid = op_leaky_relu = op_gelu = op_elu = op_rsqrt = activation

    def op_hardswish(self, node: Node, x: TosaTensor):
        codes = torch.arange(x.grid.qmin, x.grid.qmax + 1)
        return self.table(node, x, self.target.hardswish(codes, x.grid, self.model.qparams[node.name]))

    def op_matmul(self, node: Node, a: TosaTensor, b: TosaTensor):
        """MATMUL ([B, M, K] x [B, K, N] int8 with both zero points -> int32), then RESCALE by (s_a s_b) / s_y
        (RewriteMatmulPass); batch dimensions are flattened into TOSA's one."""
        grid = self.model.qparams[node.name]
        if len(a.shape) != len(b.shape) or a.shape[:-2] != b.shape[:-2]:
            raise self.refuse(node, f"a product of shapes {a.shape} and {b.shape}: TOSA's MATMUL takes equal batch "
                                    "dimensions (expand the operands first)")
        batch = math.prod(a.shape[:-2])
        (m, k), n = a.shape[-2:], b.shape[-1]
        left, right = self.reshape(a, [batch, m, k]), self.reshape(b, [batch, k, n])
        inputs = [left.name, right.name, self.g.const("a_zp", [int(a.grid.zero_point)], "int8"),
                  self.g.const("b_zp", [int(b.grid.zero_point)], "int8")]
        acc = self.g.operator("MATMUL", inputs, [batch, m, n], "int32", "MatMulAttribute")
        out = self.g.rescale(acc, [batch, m, n], multiply_scale(a.grid, b.grid, grid), 0, int(grid.zero_point),
                             "int32", "int8")
        out = self.reshape(TosaTensor(out, (batch, m, n), grid, _identity(3)), a.shape[:-2] + (m, n))
        return self.clamp(out, fused_clamp_bounds(self.target, node, grid))

    def op_softmax(self, node: Node, x: TosaTensor):
        """qparity's int32 softmax program (numerics/tosa.py): k = REDUCE_MAX(q) - q, e = GATHER of the exp
        table at k, S = REDUCE_SUM(e), INTDIV(256 e + (S >> 1), S), RESCALE by 1 onto (1/256, -128)."""
        grid = self.model.qparams[node.name]
        rank, stored = len(x.shape), list(x.stored_shape)
        one = torch.tensor(1.0, dtype=torch.float64)
        row_max = self.reduce(x, [rank - 1], "REDUCE_MAX", "ReduceMaxAttribute", "int8")
        wide = self.g.rescale(x.name, stored, one, 0, 0, "int8", "int32")
        wide_max = self.g.rescale(row_max.name, row_max.stored_shape, one, 0, 0, "int8", "int32")
        k = self.g.operator("SUB", [wide_max, wide], stored, "int32", "SubAttribute")
        count = math.prod(stored)
        flat = self.g.operator("RESHAPE", [k, self.g.shape("shape", [1, count])], [1, count], "int32",
                               "ReshapeAttribute")
        table = self.g.const("exp_table", softmax_exp_table(x.grid).reshape(1, 256, 1).numpy(), "int32")
        gathered = self.g.operator("GATHER", [table, flat], [1, count, 1], "int32", "GatherAttribute")
        e = self.g.operator("RESHAPE", [gathered, self.g.shape("shape", stored)], stored, "int32", "ReshapeAttribute")
        total = self.reduce(TosaTensor(e, x.shape, x.grid, x.perm), [rank - 1], "REDUCE_SUM", "ReduceSumAttribute",
                            "int32")
        ones = [1] * rank
        half = self.g.operator("ARITHMETIC_RIGHT_SHIFT", [total.name, self.g.const("one", np.ones(ones), "int32")],
                               total.stored_shape, "int32", "ArithmeticRightShiftAttribute", round=False)
        scaled = self.g.operator("MUL", [e, self.g.const("256", np.full(ones, 256), "int32"),
                                         self.g.const("shift", [0], "int8")], stored, "int32", "MulAttribute")
        numerator = self.g.operator("ADD", [scaled, half], stored, "int32", "AddAttribute")
        quotient = self.g.operator("INTDIV", [numerator, total.name], stored, "int32", "IntDivAttribute")
        out = self.g.rescale(quotient, stored, one, 0, int(grid.zero_point), "int32", "int8")
        return TosaTensor(out, x.shape, grid, x.perm)

    def reduce(self, x: TosaTensor, dims: Sequence[int], op: str, attribute: str, dtype: str) -> TosaTensor:
        """REDUCE_SUM / REDUCE_MAX over logical `dims`, one axis at a time (TOSA keeps each as size 1)."""
        shape = list(x.shape)
        name = x.name
        fields = {"nan_mode": self.g.ts.NanPropagationMode.PROPAGATE} if op == "REDUCE_MAX" else {}
        for dim in sorted(d % len(shape) for d in dims):
            shape[dim] = 1
            name = self.g.operator(op, [name], [shape[p] for p in x.perm], dtype, attribute, axis=x.perm.index(dim),
                                   **fields)
        return TosaTensor(name, tuple(shape), x.grid, x.perm)

    def squeezed(self, x: TosaTensor, dims: Sequence[int], keepdim: bool) -> TosaTensor:
        """x without the reduced (size-1) dimensions unless keepdim."""
        if keepdim:
            return x
        dims = {d % len(x.shape) for d in dims}
        return self.reshape(x, [s for i, s in enumerate(x.shape) if i not in dims])

    def op_amax(self, node: Node, x: TosaTensor):
        """REDUCE_MAX of the codes: the maximum commutes with dequantization."""
        dims = tuple(node.attrs["dim"])
        return self.squeezed(self.reduce(x, dims, "REDUCE_MAX", "ReduceMaxAttribute", "int8"), dims,
                             node.attrs["keepdim"])

    def op_mean(self, node: Node, x: TosaTensor):
        """RESCALE to int32 by 1 (the zero point removed), REDUCE_SUM per axis, RESCALE by s_x / (count s_y)."""
        grid = self.model.qparams[node.name]
        dims = tuple(node.attrs["dims"])
        count = math.prod(x.shape[d] for d in dims)
        one = torch.tensor(1.0, dtype=torch.float64)
        wide = self.g.rescale(x.name, x.stored_shape, one, int(x.grid.zero_point), 0, "int8", "int32")
        sums = self.reduce(TosaTensor(wide, x.shape, x.grid, x.perm), dims, "REDUCE_SUM", "ReduceSumAttribute", "int32")
        out = self.g.rescale(sums.name, sums.stored_shape, mean_scale(count, x.grid, grid), 0, int(grid.zero_point),
                             "int32", "int8")
        return self.squeezed(TosaTensor(out, sums.shape, grid, x.perm), dims, node.attrs["keepdim"])

    def op_upsample_nearest(self, node: Node, x: TosaTensor):
        """RESIZE NEAREST by integer factors k with Arm's parameters (rewrite_upsample.py: scale 2k / 2, offset
        1 - k, border k - 1), which picks input row y // k."""
        factors = tuple(int(f) for f in node.attrs["scale_factor"])
        if len(x.shape) != 4:
            raise self.refuse(node, f"upsampling of a rank-{len(x.shape)} input")
        x = self.in_layout(x, NHWC)
        n, c, h, w = x.shape
        out_hw = (h * factors[0], w * factors[1])
        scale = [2 * factors[0], 2, 2 * factors[1], 2]
        inputs = [x.name, self.g.shape("scale", scale), self.g.shape("offset", [1 - factors[0], 1 - factors[1]]),
                  self.g.shape("border", [factors[0] - 1, factors[1] - 1])]
        out = self.g.operator("RESIZE", inputs, [n, out_hw[0], out_hw[1], c], "int8", "ResizeAttribute",
                              mode=self.g.ts.ResizeMode.NEAREST)
        return TosaTensor(out, (n, c) + out_hw, x.grid, NHWC)

    def op_pad(self, node: Node, x: TosaTensor):
        """PAD with the zero point's code (real 0)."""
        return self.pad(x, padding_per_dimension(node.attrs["pad"], len(x.shape)), int(x.grid.zero_point))

    def op_clamp(self, node: Node, x: TosaTensor):
        bounds = self.target.activation_bounds(node.attrs.get("min"), node.attrs.get("max"), x.grid)
        return self.clamp(x, bounds)

    def op_dropout(self, node: Node, x: TosaTensor):
        return x

    def op_call(self, node: Node, *args, **kwargs):
        """A code-preserving call, traced on tensors whose values are their elements' positions."""
        sources: Dict[int, TosaTensor] = {}

        def positions(value):
            if isinstance(value, TosaTensor):
                tracer = torch.arange(math.prod(value.shape)).reshape(value.shape)
                sources[id(tracer)] = value
                return tracer
            if isinstance(value, (tuple, list)):
                return type(value)(positions(v) for v in value)
            if isinstance(value, dict):
                return {k: positions(v) for k, v in value.items()}
            return value

        result = CALLS[node.attrs["fn"]](*positions(args), **positions(kwargs))
        return self.realize(node, result, sources)

    def realize(self, node: Node, value, sources: Dict[int, TosaTensor]):
        if isinstance(value, torch.Tensor):
            if id(value) in sources:
                return sources[id(value)]
            if len(sources) != 1:
                raise self.refuse(node, "a layout call over several tensors")
            return self.rearrange(next(iter(sources.values())), value)
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self.realize(node, v, sources) for v in value)
        return value

    def rearrange(self, x: TosaTensor, positions: torch.Tensor) -> TosaTensor:
        """The tensor whose element i is element positions[i] of x (logical order): a relabelled permutation, a
        RESHAPE, or a GATHER of the flattened codes."""
        shape = tuple(positions.shape)
        logical = torch.arange(math.prod(x.shape)).reshape(x.shape)
        if positions.numel() == logical.numel():
            if torch.equal(positions.reshape(-1), logical.reshape(-1)):
                return self.reshape(x, shape)
            if positions.dim() == logical.dim():
                for perm in itertools.permutations(range(logical.dim())):
                    if torch.equal(logical.permute(perm), positions):  # a permutation: only the labels change
                        return self.permuted(x, perm)
        flat = self.reshape(x, [1, logical.numel(), 1])
        indices = self.g.const("positions", positions.reshape(1, -1).numpy(), "int32")
        gathered = self.g.operator("GATHER", [flat.name, indices], [1, positions.numel(), 1], "int8",
                                   "GatherAttribute")
        return self.reshape(TosaTensor(gathered, (1, positions.numel(), 1), x.grid, _identity(3)), shape)

    def permuted(self, x: TosaTensor, perm: Tuple[int, ...]) -> TosaTensor:
        """x.permute(perm) as a relabelling of the stored tensor: new logical dim i is old logical dim perm[i]."""
        shape = tuple(x.shape[p] for p in perm)
        # stored = old.permute(x.perm) = new.permute(q) with new = old.permute(perm): old dim x.perm[j] is new
        # dim perm.index(x.perm[j]).
        return TosaTensor(x.name, shape, x.grid, tuple(perm.index(p) for p in x.perm))


# ---------------------------------------------------------------------------------------------------------
# Verify: run the file in TOSA's reference model
# ---------------------------------------------------------------------------------------------------------
def verify_tosa(model: IntegerModel, path, inputs: Sequence[torch.Tensor]) -> List[RuntimeResult]:
    """Run the TOSA file on the model's input codes for `inputs` and compare its output codes with `model`'s."""
    codes = model.quantize(*tuple(inputs))
    codes = codes if isinstance(codes, tuple) else (codes,)
    expected = list(leaves(model.run(*codes)))
    outputs = run_tosa(path, codes, model)
    if len(outputs) != len(expected):
        raise ModelFileError(f"{str(path)!r} has {len(outputs)} output(s); the model has {len(expected)}")
    return [compare_codes(RUNTIME, i, e, a, True) for i, (e, a) in enumerate(zip(expected, outputs))]


def run_tosa(path, codes: Sequence[torch.Tensor], model: IntegerModel) -> List[torch.Tensor]:
    """The file's int8 output codes for int8 input `codes`, fed in chunks of the file's batch size."""
    import tosa_reference_model as reference
    import tosa_serializer as ts

    with open(path, "rb") as f:
        binary = f.read()
    shapes = _input_shapes(ts, binary, path)
    require_model_inputs(path, shapes, model)
    batch = shapes[0][0]
    total = int(codes[0].shape[0])
    if total % batch:
        raise ExportError(f"the file takes batches of {batch}; {total} samples do not split into them")
    chunks = []
    for start in range(0, total, batch):
        arrays = [np.ascontiguousarray(c[start:start + batch].numpy().astype(np.int8)) for c in codes]
        outputs, status = reference.run(binary, arrays)
        if status != reference.GraphStatus.TOSA_VALID:
            raise ModelFileError(f"TOSA's reference model rejects {str(path)!r}: {status}")
        chunks.append([torch.from_numpy(np.asarray(o).astype(np.int64)) for o in outputs])
    return [torch.cat(parts) for parts in zip(*chunks)]


def _input_shapes(ts, binary: bytes, path) -> List[Tuple[int, ...]]:
    """The graph's input shapes, read back from the flatbuffer (a file that is no TOSA graph: ModelFileError)."""
    from tosa.TosaGraph import TosaGraph

    try:
        graph = TosaGraph.GetRootAs(binary, 0)
        block = graph.Regions(0).Blocks(0)
        tensors = {block.Tensors(i).Name(): block.Tensors(i) for i in range(block.TensorsLength())}
        names = [block.Inputs(i) for i in range(block.InputsLength())]
        return [tuple(int(d) for d in tensors[n].ShapeAsNumpy()) for n in names]
    except Exception as error:  # flatbuffers raises whatever a malformed buffer makes it hit
        raise ModelFileError(f"{str(path)!r} is not a TOSA graph: {error}") from None
