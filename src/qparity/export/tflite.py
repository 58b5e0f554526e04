"""Export a `tflite` or `xnnpack` IntegerModel to a .tflite flatbuffer, and verify the file in LiteRT's three
kernel sets.

The file is written with the object API of the `schema_py_generated` module that ships in ai-edge-litert
(no TensorFlow). Every integer the model computes maps to one int8 TFLite kernel whose reference
implementation is exactly qparity's `tflite` target (`qparity.numerics.tflite`), and whose default (XNNPACK)
implementation is exactly the `xnnpack` target (`qparity.numerics.xnnpack`); the same file serves both:

    QUANTIZE (float32 -> int8) -> CONV_2D / DEPTHWISE_CONV_2D / TRANSPOSE_CONV / FULLY_CONNECTED / ADD / CONCATENATION /
    MAX_POOL_2D / AVERAGE_POOL_2D / MAXIMUM / MINIMUM / PADV2 / SLICE / RESHAPE / TRANSPOSE / GATHER -> DEQUANTIZE

Layout. The file keeps PyTorch's interface: float32 inputs and outputs with the PyTorch shapes (NCHW for
images), so `interpreter(x)` and `model(x)` take the same array. Inside, TFLite's spatial kernels need
NHWC, so every tensor carries a permutation (`tflite = logical.permute(perm)`) and TRANSPOSE ops are
inserted only where a consumer needs another order: after the input QUANTIZE (on int8, where it is a
cheap byte move), before a flatten/reshape of a conv output (PyTorch flattens in NCHW order), and before
each output's DEQUANTIZE. Code-preserving layout calls (view, reshape, flatten, permute, transpose,
squeeze, getitem, chunk, ...) are traced on a tensor of element positions: a pure reordering becomes a
relabelled permutation (no op), a TRANSPOSE and/or a RESHAPE, and anything else (slices, strided
indexing) a GATHER with constant positions.

Batch size. Shapes in a .tflite file are fixed; the file is written for `batch_size` samples (default 1,
the on-device case), and `verify_tflite` feeds larger inputs through it in chunks of that size.

Padding. TFLite's SAME skips out-of-image taps (for pooling: excludes them from the divisor); PyTorch pads
symmetrically. Each conv/pool axis is planned by comparing, per output position, the taps (and the average
divisor) of PyTorch's window with those of a candidate TFLite form (`plan_padding`): SAME or VALID, after an
explicit PADV2, with a SLICE dropping extra outputs where TFLite's grid of windows starts earlier.
Convolution pads with the zero point (real 0). Average pooling with count_include_pad pads with the zero
point too, whose centered value is 0 and which the divisor then counts. Max pooling pads
with -128: PyTorch's max pool pads with -inf, but it requires padding <= kernel / 2 and (in ceil mode)
that the last window start inside the input, so every window holds at least one real code q >= -128 and
max(q, -128) = q. The planner checks that no window is all padding and refuses otherwise. A form that no
candidate reproduces (average pooling that excludes padding PyTorch-style where SAME pads differently,
dilated max pooling) raises ExportError.

Clamps. A fused clamp (conv/linear/add) becomes the fused activation when its bounds in codes equal
TFLite's RELU / RELU6 / RELU_N1_TO_1 range for the output grid; any other clamp (and a standalone clamp
node) becomes MAXIMUM / MINIMUM with a constant int8 code on the same grid, exact because the kernel
already clamps to [-128, 127] and the bounds lie inside it.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ExportError, ModelFileError
from ..graph import CALLS, Executor, Node, fused_clamp_bounds, leaves
from ..numerics import pooling
from ..numerics.accumulate import ConvGeometry
from ..ops import constant
from ..ops.pad import padding_per_dimension
from ..qparams import QParams
from ..runtime import IntegerModel
from . import require_model_inputs
from .batch import refuse_mixed_samples
from .report import RuntimeResult, compare_codes

NHWC = (0, 2, 3, 1)
# TFLite fused activations and the real interval each clamps to (kernel_util.cc CalculateActivationRangeQuantized).
FUSED_ACTIVATIONS = (("NONE", None, None), ("RELU", 0.0, None), ("RELU6", 0.0, 6.0), ("RELU_N1_TO_1", -1.0, 1.0))
# The targets whose integers a .tflite file carries, and the kernel set each promises to match.
TFLITE_TARGETS = {"tflite": "LiteRT int8 reference kernels", "xnnpack": "LiteRT default kernels (XNNPACK)"}


def export_tflite(model: IntegerModel, path, batch_size: int = 1) -> None:
    """Write `model` (target `tflite` or `xnnpack`) as a .tflite file taking `batch_size` samples of float32 input."""
    if model.target.name not in TFLITE_TARGETS:
        raise ExportError(f"export_tflite needs a model of target 'tflite' or 'xnnpack', got {model.target.name!r}; "
                          "train with target='tflite' (reference kernels) or target='xnnpack' (LiteRT's default "
                          "kernels) to deploy with TFLite")
    if model.activation_dtype != "int8":
        raise ExportError(f"TFLite's int8 kernels need int8 activations, the model has {model.activation_dtype}")
    refuse_mixed_samples(model, batch_size, ".tflite")
    with open(path, "wb") as f:
        f.write(_Exporter(model, batch_size).build())


# ---------------------------------------------------------------------------------------------------------
# The flatbuffer
# ---------------------------------------------------------------------------------------------------------
class _FlatBuffer:
    """One subgraph under construction, in LiteRT's schema object API."""

    def __init__(self, target: str) -> None:
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.target = target
        self.tensors: List[Any] = []
        self.buffers = [schema.BufferT()]
        self.operators: List[Any] = []
        self.opcodes: List[int] = []

    def tensor(self, name: str, shape: Sequence[int], dtype: str, qp: Optional[QParams] = None,
               data: Optional[np.ndarray] = None) -> int:
        s = self.schema
        t = s.TensorT()
        t.name, t.shape = name, [int(d) for d in shape]
        t.type = {"int8": s.TensorType.INT8, "int32": s.TensorType.INT32, "float32": s.TensorType.FLOAT32}[dtype]
        if data is not None:
            buffer = s.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if qp is not None:
            t.quantization = self.quantization(qp.scale, qp.zero_point, 0)
        self.tensors.append(t)
        return len(self.tensors) - 1

    def quantization(self, scale: torch.Tensor, zero_point, axis: int):
        q = self.schema.QuantizationParametersT()
        q.scale = [float(v) for v in scale.to(torch.float32).reshape(-1)]
        q.zeroPoint = [int(v) for v in torch.as_tensor(zero_point).reshape(-1).expand(len(q.scale))]
        q.quantizedDimension = axis
        return q

    def constant(self, name: str, values: np.ndarray, dtype: str, qp: Optional[QParams] = None) -> int:
        array = np.asarray(values, dtype={"int8": np.int8, "int32": np.int32}[dtype])
        return self.tensor(name, array.shape, dtype, qp, array)

    def operator(self, name: str, inputs: Sequence[int], outputs: Sequence[int], options=None) -> None:
        s = self.schema
        code = getattr(s.BuiltinOperator, name)
        if code not in self.opcodes:
            self.opcodes.append(code)
        o = s.OperatorT()
        o.opcodeIndex = self.opcodes.index(code)
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType = getattr(s.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self.operators.append(o)

    def options(self, name: str, **fields):
        options = getattr(self.schema, name + "T")()
        for key, value in fields.items():
            setattr(options, key, value)
        return options

    def serialize(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        import flatbuffers

        s = self.schema
        model = s.ModelT()
        model.version = 3
        model.description = f"qparity export (target {self.target}: {TFLITE_TARGETS[self.target]})"
        model.operatorCodes = []
        for code in self.opcodes:
            c = s.OperatorCodeT()
            c.builtinCode, c.deprecatedBuiltinCode, c.version = code, min(code, 127), 1
            model.operatorCodes.append(c)
        graph = s.SubGraphT()
        graph.name = "main"
        graph.tensors, graph.inputs, graph.outputs, graph.operators = \
            self.tensors, list(inputs), list(outputs), self.operators
        model.subgraphs, model.buffers = [graph], self.buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


# ---------------------------------------------------------------------------------------------------------
# Padding: PyTorch's windows expressed as TFLite's SAME / VALID, with an explicit PADV2 where needed
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AxisWindow:
    """One spatial axis of a conv or pool as PyTorch computes it."""

    size: int
    out: int
    kernel: int
    stride: int
    dilation: int
    lead: int          # PyTorch's leading padding
    counted_end: int   # average pooling: taps below this position count in the divisor


@dataclass(frozen=True)
class AxisPlan:
    mode: str               # "SAME" or "VALID"
    pad: Tuple[int, int]    # explicit PADV2 before and after
    crop: int = 0           # TFLite outputs dropped at the start (the rest past PyTorch's size at the end)


def _tflite_output(size: int, window: AxisWindow, mode: str) -> Tuple[int, int]:
    """TFLite's output size and leading padding (tflite/kernels/padding.h)."""
    span = (window.kernel - 1) * window.dilation + 1
    if mode == "VALID":
        out = (size - span) // window.stride + 1 if size >= span else 0
        return out, 0
    out = -(-size // window.stride)
    return out, max((out - 1) * window.stride + span - size, 0) // 2


def _plan_matches(window: AxisWindow, plan: AxisPlan, rule: str) -> bool:
    """Whether TFLite on the padded axis takes PyTorch's taps at every output position (and its divisor)."""
    padded = window.size + sum(plan.pad)
    out, tflite_lead = _tflite_output(padded, window, plan.mode)
    if out < plan.crop + window.out:
        return False
    for o in range(window.out):
        offsets = [j * window.dilation for j in range(window.kernel)]
        torch_taps = [o * window.stride - window.lead + d for d in offsets]
        torch_real = [(j, t) for j, t in enumerate(torch_taps) if 0 <= t < window.size]
        start = (o + plan.crop) * window.stride - tflite_lead  # in padded coordinates
        inside = [(j, start + d - plan.pad[0]) for j, d in enumerate(offsets) if 0 <= start + d < padded]
        if torch_real != [(j, t) for j, t in inside if 0 <= t < window.size]:
            return False
        if rule == "max" and not torch_real:
            return False
        if rule == "avg_include" and len(inside) != sum(t < window.counted_end for t in torch_taps):
            return False
        if rule == "avg_exclude" and len(inside) != len(torch_real):
            return False
    return True


def plan_padding(windows: Sequence[AxisWindow], rule: str) -> Optional[Tuple[str, List[AxisPlan]]]:
    """The TFLite padding mode, explicit pads and output crops per axis that reproduce PyTorch's windows, or
    None. `rule`: "conv" (pads hold real 0), "max" (pads hold -128), "avg_include" / "avg_exclude"."""
    options = []
    for mode in ("VALID", "SAME"):
        chosen = [_first_plan(w, mode, rule) for w in windows]
        if all(chosen):
            options.append((sum(p.crop > 0 for p in chosen), sum(sum(p.pad) for p in chosen), mode, chosen))
    if not options:
        return None
    _, _, mode, chosen = min(options, key=lambda option: option[:2])
    return mode, chosen


def _first_plan(w: AxisWindow, mode: str, rule: str) -> Optional[AxisPlan]:
    """The cheapest plan for one axis in one mode: no crop, then the least padding."""
    span = (w.kernel - 1) * w.dilation + 1
    candidates = sorted((AxisPlan(mode, (a, b), c) for a in range(w.lead + w.stride + 1)
                         for b in range(w.lead + span + w.stride) for c in range(3)),
                        key=lambda p: (p.crop, sum(p.pad), p.pad))
    return next((p for p in candidates if _plan_matches(w, p, rule)), None)


# ---------------------------------------------------------------------------------------------------------
# The exporter: runs the graph on symbolic tensors, emitting TFLite operators
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TFLiteTensor:
    """A quantized tensor in the file: `tflite tensor == logical (PyTorch) tensor .permute(perm)`."""

    index: int
    shape: Tuple[int, ...]   # the logical (PyTorch) shape
    grid: QParams
    perm: Tuple[int, ...]

    @property
    def stored_shape(self) -> Tuple[int, ...]:
        return tuple(self.shape[p] for p in self.perm)


def _inverse(perm: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(i) for i in np.argsort(perm))


class _Exporter(Executor):
    def __init__(self, model: IntegerModel, batch_size: int):
        super().__init__(model.graph, model.target)
        if batch_size < 1:
            raise ExportError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.batch_size = batch_size
        self.fb = _FlatBuffer(model.target.name)
        self.graph_inputs: List[int] = []
        self.transposed: Dict[Tuple[int, Tuple[int, ...]], int] = {}  # (stored tensor, TRANSPOSE perm) -> result
        self.flattened: Dict[int, int] = {}  # stored tensor -> its RESHAPE to one dimension

    def build(self) -> bytes:
        for node in self.graph.nodes:
            if not hasattr(self, "op_" + node.op):
                raise ExportError(f"cannot export the operator {node.op!r} at {node.path} to TFLite: no TFLite "
                                  "kernel implements it")
        result = self.run([None] * len(self.graph.inputs))
        outputs = []
        for i, value in enumerate(leaves(result)):
            if not isinstance(value, TFLiteTensor):
                raise ExportError(f"model output {i} is {type(value).__name__}, not a tensor; a .tflite file returns "
                                  "tensors only")
            value = self.in_layout(value, tuple(range(len(value.shape))))
            out = self.fb.tensor(f"output_{i}", value.shape, "float32")
            self.fb.operator("DEQUANTIZE", [value.index], [out])
            outputs.append(out)
        return self.fb.serialize(self.graph_inputs, outputs)

    # -- helpers --------------------------------------------------------------------------------------------
    def refuse(self, node: Node, why: str) -> ExportError:
        return ExportError(f"cannot export {node.op} at {node.path} (node '{node.name}') to TFLite: {why}")

    def activation(self, name: str, shape: Sequence[int], grid: QParams) -> int:
        return self.fb.tensor(name, shape, "int8", grid)

    def in_layout(self, x: TFLiteTensor, perm: Tuple[int, ...]) -> TFLiteTensor:
        """`x` stored as logical.permute(perm), with one int8 TRANSPOSE if it is stored otherwise."""
        if x.perm == perm or all(size == 1 for size in x.shape):  # no element moves: relabel
            return TFLiteTensor(x.index, x.shape, x.grid, perm) if x.perm != perm else x
        moved = self.transpose(x, tuple(x.perm.index(p) for p in perm))
        return TFLiteTensor(moved, x.shape, x.grid, perm)

    def transpose(self, x: TFLiteTensor, perm: Tuple[int, ...]) -> int:
        """x's stored tensor through TRANSPOSE(perm), emitted once per tensor and permutation."""
        if (x.index, perm) not in self.transposed:
            out = self.activation(f"t{x.index}_transposed", [x.stored_shape[p] for p in perm], x.grid)
            perm_tensor = self.fb.constant(f"t{out}_perm", np.asarray(perm), "int32")
            self.fb.operator("TRANSPOSE", [x.index, perm_tensor], [out], self.fb.options("TransposeOptions"))
            self.transposed[(x.index, perm)] = out
        return self.transposed[(x.index, perm)]

    def reshape(self, source: int, shape: Sequence[int], grid: QParams, name: str) -> int:
        out = self.activation(name, shape, grid)
        shape_tensor = self.fb.constant(f"{name}_shape", np.asarray(shape, np.int32).reshape(-1), "int32")
        self.fb.operator("RESHAPE", [source, shape_tensor], [out],
                         self.fb.options("ReshapeOptions", newShape=[int(d) for d in shape]))
        return out

    def fused(self, node: Node, grid: QParams) -> Tuple[int, Optional[Tuple[int, int]]]:
        """The fused activation code for a node's output clamp, plus the clamp left to emit separately."""
        bounds = fused_clamp_bounds(self.target, node, grid)
        codes = self.fb.schema.ActivationFunctionType
        for name, low, high in FUSED_ACTIVATIONS:
            if self.target.activation_bounds(low, high, grid) == bounds:
                return getattr(codes, name), None
        return codes.NONE, bounds

    def clamp(self, x: TFLiteTensor, bounds: Optional[Tuple[int, int]], name: str) -> TFLiteTensor:
        """MAXIMUM / MINIMUM with int8 constants on x's grid: exact clamp of codes to [lo, hi]."""
        if bounds is None:
            return x
        for op, bound, limit in (("MAXIMUM", bounds[0], x.grid.qmin), ("MINIMUM", bounds[1], x.grid.qmax)):
            if bound == limit:
                continue
            constant = self.fb.constant(f"{name}_{op.lower()}_bound", np.asarray([bound]), "int8", x.grid)
            out = self.activation(f"{name}_{op.lower()}", x.stored_shape, x.grid)
            self.fb.operator(op, [x.index, constant], [out], self.fb.options("MaximumMinimumOptions"))
            x = TFLiteTensor(out, x.shape, x.grid, x.perm)
        return x

    def pad(self, x: TFLiteTensor, pads: Sequence[Tuple[int, int]], value: int, name: str) -> TFLiteTensor:
        """PADV2 of an NHWC tensor's H and W axes with a constant code on its grid."""
        if not any(a or b for a, b in pads):
            return x
        n, h, w, c = x.stored_shape
        padded = [n, h + sum(pads[0]), w + sum(pads[1]), c]
        paddings = self.fb.constant(f"{name}_paddings", np.asarray([(0, 0), pads[0], pads[1], (0, 0)]), "int32")
        constant = self.fb.constant(f"{name}_pad_value", np.asarray([value]), "int8", x.grid)
        out = self.activation(f"{name}_padded", padded, x.grid)
        self.fb.operator("PADV2", [x.index, paddings, constant], [out], self.fb.options("PadV2Options"))
        logical = (n, c, padded[1], padded[2])
        return TFLiteTensor(out, logical, x.grid, NHWC)

    def spatial(self, node: Node, x: TFLiteTensor, kernel, stride, dilation, lead, out_hw, rule: str,
                counted_end=(0, 0)):
        """PADV2 (if needed), the padding mode, TFLite's output size and the crop that give PyTorch's windows."""
        windows = [AxisWindow(x.shape[2 + i], out_hw[i], kernel[i], stride[i], dilation[i], lead[i], counted_end[i])
                   for i in range(2)]
        plan = plan_padding(windows, rule)
        if plan is None:
            raise self.refuse(node, f"no TFLite padding (SAME or VALID, after an explicit PAD, with the outputs "
                                    f"cropped) gives PyTorch's windows for kernel {tuple(kernel)}, stride "
                                    f"{tuple(stride)}, padding {tuple(lead)} on a {tuple(x.shape[2:])} input ({rule})")
        mode, plans = plan
        value = x.grid.qmin if rule == "max" else int(x.grid.zero_point)
        x = self.pad(x, [p.pad for p in plans], value, node.name)
        tflite_hw = tuple(_tflite_output(x.shape[2 + i], windows[i], mode)[0] for i in range(2))
        return x, getattr(self.fb.schema.Padding, mode), tflite_hw, tuple(p.crop for p in plans)

    def crop(self, x: TFLiteTensor, start: Sequence[int], out_hw: Sequence[int], name: str) -> TFLiteTensor:
        """SLICE an NHWC tensor's H and W to PyTorch's output positions."""
        if tuple(x.shape[2:]) == tuple(out_hw):
            return x
        n, c = x.shape[:2]
        begin = self.fb.constant(f"{name}_crop_begin", np.asarray([0, start[0], start[1], 0]), "int32")
        size = self.fb.constant(f"{name}_crop_size", np.asarray([n, out_hw[0], out_hw[1], c]), "int32")
        out = self.activation(f"{name}_cropped", [n, out_hw[0], out_hw[1], c], x.grid)
        self.fb.operator("SLICE", [x.index, begin, size], [out], self.fb.options("SliceOptions"))
        return TFLiteTensor(out, (n, c) + tuple(out_hw), x.grid, NHWC)

    # -- operators ------------------------------------------------------------------------------------------
    def op_input(self, node: Node, _):
        grid = self.model.qparams[node.name]
        shape = (self.batch_size,) + tuple(self.graph.input_shapes[len(self.graph_inputs)][1:])
        real = self.fb.tensor(node.name, shape, "float32")
        self.graph_inputs.append(real)
        codes = self.activation(f"{node.name}_codes", shape, grid)
        self.fb.operator("QUANTIZE", [real], [codes], self.fb.options("QuantizeOptions"))
        return TFLiteTensor(codes, shape, grid, tuple(range(len(shape))))

    def op_conv2d(self, node: Node, x: TFLiteTensor):
        geometry = ConvGeometry.from_dict(node.attrs["geometry"])
        layer = self.model.layers[node.name]
        grid = self.model.qparams[node.name]
        if len(x.shape) != 4:
            raise self.refuse(node, f"conv2d on a rank-{len(x.shape)} input (TFLite's CONV_2D takes NHWC)")
        weight = layer.weight_codes
        cout, cin_group, kh, kw = weight.shape
        lead, out_hw = _conv_padding(geometry, x.shape[2:], (kh, kw))
        x = self.in_layout(x, NHWC)
        x, padding, tflite_hw, crop = self.spatial(node, x, (kh, kw), geometry.stride, geometry.dilation, lead,
                                                   out_hw, "conv")
        depthwise = geometry.groups > 1 and geometry.groups == x.shape[1] and cin_group == 1
        if depthwise:
            name, filter_codes, axis = "DEPTHWISE_CONV_2D", weight.permute(1, 2, 3, 0), 3
        else:
            name, filter_codes, axis = "CONV_2D", weight.permute(0, 2, 3, 1), 0
        act, rest = self.fused(node, grid)
        weights = self.weights(node, x.grid, filter_codes, layer, axis, cout, always_bias=True)
        out_shape = (x.shape[0], cout) + tflite_hw
        out = self.activation(node.name, [out_shape[p] for p in NHWC], grid)
        fields = {"padding": padding, "strideH": geometry.stride[0], "strideW": geometry.stride[1],
                  "dilationHFactor": geometry.dilation[0], "dilationWFactor": geometry.dilation[1],
                  "fusedActivationFunction": act}
        if depthwise:
            options = self.fb.options("DepthwiseConv2DOptions", depthMultiplier=cout // x.shape[1], **fields)
        else:
            options = self.fb.options("Conv2DOptions", **fields)
        self.fb.operator(name, [x.index, *weights], [out], options)
        out = self.crop(TFLiteTensor(out, out_shape, grid, NHWC), crop, out_hw, node.name)
        return self.clamp(out, rest, node.name)

    def op_conv_transpose2d(self, node: Node, x: TFLiteTensor):
        """TRANSPOSE_CONV with VALID padding (no padding), then a SLICE from PyTorch's padding: TFLite's own SAME
        padding is derived from the output size and cannot express every padding / output_padding pair. VALID
        needs (O - k) // stride + 1 == H (transpose_conv.cc Prepare), so the file's output O is at least the full
        (H - 1) * stride + k; PyTorch's outputs lie in [padding, padding + H_out), which ends below O + stride
        because output_padding < stride. The fused clamp is MAXIMUM / MINIMUM, never the options' activation
        (the int8 kernel's Prepare reads it through TfLiteConvParams, transpose_conv.cc)."""
        geometry = ConvGeometry.from_dict(node.attrs["geometry"])
        layer = self.model.layers[node.name]
        grid = self.model.qparams[node.name]
        cout, cin, kh, kw = layer.weight_codes.shape
        out_hw = transposed_output_size(geometry, x.shape[2:], (kh, kw))
        valid_hw = tuple(max(o + p, (h - 1) * s + k) for o, p, h, s, k in
                         zip(out_hw, geometry.padding, x.shape[2:], geometry.stride, (kh, kw)))
        x = self.in_layout(x, NHWC)
        # The layer keeps the equivalent conv's flipped kernel; TRANSPOSE_CONV scatters with the unflipped one, OHWI.
        filter_codes = layer.weight_codes.flip(-2, -1).permute(0, 2, 3, 1)
        weights = self.weights(node, x.grid, filter_codes, layer, 0, cout, always_bias=True)
        out_shape = (x.shape[0], cout) + valid_hw
        stored = [out_shape[p] for p in NHWC]
        output_shape = self.fb.constant(f"{node.name}_output_shape", np.asarray(stored), "int32")
        out = self.activation(node.name, stored, grid)
        options = self.fb.options("TransposeConvOptions", padding=self.fb.schema.Padding.VALID,
                                  strideH=geometry.stride[0], strideW=geometry.stride[1],
                                  fusedActivationFunction=self.fb.schema.ActivationFunctionType.NONE)
        self.fb.operator("TRANSPOSE_CONV", [output_shape, weights[0], x.index, weights[1]], [out], options)
        out = self.crop(TFLiteTensor(out, out_shape, grid, NHWC), geometry.padding, out_hw, node.name)
        return self.clamp(out, fused_clamp_bounds(self.target, node, grid), node.name)

    def weights(self, node: Node, input_grid: QParams, filter_codes: torch.Tensor, layer, axis: int, cout: int,
                always_bias: bool) -> List[int]:
        """The int8 per-channel filter and the int32 bias at scale s_in * s_w (zeros where the layer has none)."""
        scale = layer.weight_scale.to(torch.float32).reshape(-1).expand(cout).contiguous()
        filter_index = self.fb.constant(f"{node.name}_filter", filter_codes.numpy(), "int8")
        self.fb.tensors[filter_index].quantization = self.fb.quantization(scale, 0, axis)
        bias = layer.bias_codes
        if bias is None and not always_bias:
            return [filter_index, -1]
        bias = torch.zeros(cout, dtype=torch.int32) if bias is None else bias.reshape(-1)
        bias_index = self.fb.constant(f"{node.name}_bias", bias.numpy(), "int32")
        bias_scale = (input_grid.scale.to(torch.float64) * scale.to(torch.float64)).to(torch.float32)
        self.fb.tensors[bias_index].quantization = self.fb.quantization(bias_scale, 0, 0)
        return [filter_index, bias_index]

    def op_linear(self, node: Node, x: TFLiteTensor):
        layer = self.model.layers[node.name]
        grid = self.model.qparams[node.name]
        x = self.in_layout(x, tuple(range(len(x.shape))))
        cout = layer.weight_codes.shape[0]
        weights = self.weights(node, x.grid, layer.weight_codes, layer, 0, cout, always_bias=False)
        act, rest = self.fused(node, grid)
        out_shape = tuple(x.shape[:-1]) + (cout,)
        out = self.activation(node.name, out_shape, grid)
        options = self.fb.options("FullyConnectedOptions", fusedActivationFunction=act,
                                  keepNumDims=len(out_shape) != 2)
        self.fb.operator("FULLY_CONNECTED", [x.index, *weights], [out], options)
        return self.clamp(TFLiteTensor(out, out_shape, grid, tuple(range(len(out_shape)))), rest, node.name)

    def op_constant(self, node: Node):
        grid = self.model.qparams[node.name]
        values = constant.codes(self.model.target, node, grid).numpy()
        index = self.fb.constant(f"{node.name}_codes", values, "int8", grid)
        return TFLiteTensor(index, tuple(values.shape), grid, tuple(range(values.ndim)))

    def op_add(self, node: Node, a: TFLiteTensor, b: TFLiteTensor):
        return self.binary(node, a, b, "ADD", "AddOptions")

    def op_sub(self, node: Node, a: TFLiteTensor, b: TFLiteTensor):
        return self.binary(node, a, b, "SUB", "SubOptions")

    def binary(self, node: Node, a: TFLiteTensor, b: TFLiteTensor, code: str, options: str):
        """ADD / SUB / MUL with broadcasting (BroadcastAdd4DSlow, BroadcastMul6DSlow: the same arithmetic per
        element): both operands stored in one layout, so their stored shapes broadcast alike; TFLite's broadcast
        takes at most 6 dimensions."""
        grid = self.model.qparams[node.name]
        if len(a.shape) != len(b.shape):
            raise self.refuse(node, f"{node.op} of ranks {len(a.shape)} and {len(b.shape)} (expand the smaller one "
                                    "first)")
        b = self.in_layout(b, a.perm)
        shape = tuple(max(x, y) for x, y in zip(a.shape, b.shape))
        act, rest = self.fused(node, grid)
        out = self.activation(node.name, [shape[p] for p in a.perm], grid)
        self.fb.operator(code, [a.index, b.index], [out], self.fb.options(options, fusedActivationFunction=act))
        return self.clamp(TFLiteTensor(out, shape, grid, a.perm), rest, node.name)

    def op_mul(self, node: Node, a: TFLiteTensor, b: TFLiteTensor):
        return self.binary(node, a, b, "MUL", "MulOptions")

    def op_cat(self, node: Node, tensors):
        grid = self.model.qparams[node.name]
        rank = len(tensors[0].shape)
        dim = node.attrs["dim"] % rank
        perm = tensors[0].perm
        parts = []
        for i, t in enumerate(tensors):
            t = self.in_layout(t, perm)
            if not t.grid.same_grid(grid):  # CONCATENATION requires equal qparams: requantize first
                moved = self.activation(f"{node.name}_input{i}_rescaled", t.stored_shape, grid)
                self.fb.operator("QUANTIZE", [t.index], [moved], self.fb.options("QuantizeOptions"))
                t = TFLiteTensor(moved, t.shape, grid, perm)
            parts.append(t)
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        out = self.activation(node.name, [shape[p] for p in perm], grid)
        self.fb.operator("CONCATENATION", [t.index for t in parts], [out],
                         self.fb.options("ConcatenationOptions", axis=perm.index(dim)))
        return TFLiteTensor(out, tuple(shape), grid, perm)

    def op_max_pool2d(self, node: Node, x: TFLiteTensor):
        attrs = node.attrs
        kernel = tuple(attrs["kernel_size"])
        if any(d != 1 and k != 1 for d, k in zip(attrs["dilation"], kernel)):
            raise self.refuse(node, f"dilation {tuple(attrs['dilation'])}: TFLite's MAX_POOL_2D has no dilation")
        return self.pool(node, x, "MAX_POOL_2D", attrs, "max")

    def op_avg_pool2d(self, node: Node, x: TFLiteTensor):
        attrs = pooling.window_attrs(node.attrs, tuple(x.shape[2:]), node.path)
        return self.pool(node, x, "AVERAGE_POOL_2D", attrs,
                         "avg_include" if attrs["count_include_pad"] else "avg_exclude")

    def pool(self, node: Node, x: TFLiteTensor, name: str, attrs: dict, rule: str):
        if len(x.shape) != 4:
            raise self.refuse(node, f"pooling of a rank-{len(x.shape)} input")
        kernel, stride, lead = tuple(attrs["kernel_size"]), tuple(attrs["stride"]), tuple(attrs["padding"])
        out_hw = pooling.output_size(tuple(x.shape[2:]), attrs)
        counted_end = tuple(x.shape[2 + i] + lead[i] for i in range(2))
        x = self.in_layout(x, NHWC)
        x, padding, tflite_hw, crop = self.spatial(node, x, kernel, stride, (1, 1), lead, out_hw, rule, counted_end)
        out_shape = (x.shape[0], x.shape[1]) + tflite_hw
        out = self.activation(node.name, [out_shape[p] for p in NHWC], x.grid)
        options = self.fb.options("Pool2DOptions", padding=padding, strideH=stride[0], strideW=stride[1],
                                  filterHeight=kernel[0], filterWidth=kernel[1])
        self.fb.operator(name, [x.index], [out], options)
        return self.crop(TFLiteTensor(out, out_shape, x.grid, NHWC), crop, out_hw, node.name)

    def op_sigmoid(self, node: Node, x: TFLiteTensor):
        return self.elementwise(node, x, "LOGISTIC")

    def op_tanh(self, node: Node, x: TFLiteTensor):
        return self.elementwise(node, x, "TANH")

    def op_hardswish(self, node: Node, x: TFLiteTensor):
        return self.elementwise(node, x, "HARD_SWISH")

    def op_leaky_relu(self, node: Node, x: TFLiteTensor):
        options = self.fb.options("LeakyReluOptions", alpha=float(node.attrs["negative_slope"]))
        return self.elementwise(node, x, "LEAKY_RELU", options)

    def op_gelu(self, node: Node, x: TFLiteTensor):
        options = self.fb.options("GeluOptions", approximate=node.attrs["approximate"] == "tanh")
        return self.elementwise(node, x, "GELU", options)

    def op_prelu(self, node: Node, x: TFLiteTensor):
        """PRELU with the slope codes as an int8 alpha on its own grid, shaped to broadcast along the stored
        position of the channel axis (reference_ops::BroadcastPrelu4DSlow)."""
        codes = np.asarray(node.attrs["slope_codes"])
        shape = [1]
        if codes.size > 1:
            position = x.perm.index(1 if len(x.shape) > 1 else 0)
            shape = [codes.size] + [1] * (len(x.shape) - 1 - position)
        grid = QParams(node.attrs["slope_scale"], 0, "int8")
        alpha = self.fb.constant(f"{node.name}_alpha", codes.reshape(shape), "int8", grid)
        out_grid = self.model.qparams[node.name]
        out = self.activation(node.name, x.stored_shape, out_grid)
        self.fb.operator("PRELU", [x.index, alpha], [out])
        return TFLiteTensor(out, x.shape, out_grid, x.perm)

    def op_elu(self, node: Node, x: TFLiteTensor):
        return self.elementwise(node, x, "ELU")

    def elementwise(self, node: Node, x: TFLiteTensor, name: str, options=None):
        """A one-input activation onto the node's grid, in whatever layout its input is stored."""
        grid = self.model.qparams[node.name]
        out = self.activation(node.name, x.stored_shape, grid)
        self.fb.operator(name, [x.index], [out], options)
        return TFLiteTensor(out, x.shape, grid, x.perm)

    def op_pad(self, node: Node, x: TFLiteTensor):
        """PAD: int8 padding is the output zero point (kernels/pad.cc), the code of real 0."""
        rank = len(x.shape)
        logical = padding_per_dimension(node.attrs["pad"], rank)
        shape = tuple(size + before + after for size, (before, after) in zip(x.shape, logical))
        paddings = self.fb.constant(f"{node.name}_paddings", np.asarray([logical[p] for p in x.perm]), "int32")
        out = self.activation(node.name, [shape[p] for p in x.perm], x.grid)
        self.fb.operator("PAD", [x.index, paddings], [out], self.fb.options("PadOptions"))
        return TFLiteTensor(out, shape, x.grid, x.perm)

    def op_upsample_nearest(self, node: Node, x: TFLiteTensor):
        """RESIZE_NEAREST_NEIGHBOR (no align_corners, no half-pixel centers) on the NHWC codes."""
        x = self.in_layout(x, NHWC)
        factors = node.attrs["scale_factor"]
        out_hw = [x.shape[2] * factors[0], x.shape[3] * factors[1]]
        shape = (x.shape[0], x.shape[1], *out_hw)
        size = self.fb.constant(f"{node.name}_size", np.asarray(out_hw), "int32")
        out = self.activation(node.name, [shape[p] for p in NHWC], x.grid)
        self.fb.operator("RESIZE_NEAREST_NEIGHBOR", [x.index, size], [out],
                         self.fb.options("ResizeNearestNeighborOptions", alignCorners=False, halfPixelCenters=False))
        return TFLiteTensor(out, shape, x.grid, NHWC)

    def op_clamp(self, node: Node, x: TFLiteTensor):
        bounds = self.target.activation_bounds(node.attrs.get("min"), node.attrs.get("max"), x.grid)
        return self.clamp(x, None if bounds == (x.grid.qmin, x.grid.qmax) else bounds, node.name)

    def op_dropout(self, node: Node, x: TFLiteTensor):
        return x

    def op_call(self, node: Node, *args, **kwargs):
        """A code-preserving call, traced on tensors whose values are their elements' positions in the file."""
        sources: Dict[int, TFLiteTensor] = {}

        def positions(value):
            if isinstance(value, TFLiteTensor):
                stored = torch.arange(math.prod(value.stored_shape)).reshape(value.stored_shape)
                tracer = stored.permute(_inverse(value.perm))
                sources[id(tracer)] = value
                return tracer
            if isinstance(value, (tuple, list)):
                return type(value)(positions(v) for v in value)
            if isinstance(value, dict):
                return {k: positions(v) for k, v in value.items()}
            return value

        traced_args, traced_kwargs = positions(args), positions(kwargs)
        result = CALLS[node.attrs["fn"]](*traced_args, **traced_kwargs)
        return self.realize(node, result, sources)

    def realize(self, node: Node, value, sources: Dict[int, TFLiteTensor]):
        if isinstance(value, torch.Tensor):
            if id(value) in sources:
                return sources[id(value)]
            if len(sources) != 1:
                raise self.refuse(node, "a layout call over several tensors")
            return self.rearrange(node, next(iter(sources.values())), value)
        if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            return type(value)(self.realize(node, v, sources) for v in value)
        return value

    def rearrange(self, node: Node, x: TFLiteTensor, positions: torch.Tensor) -> TFLiteTensor:
        """The tensor whose element i is element positions[i] of x's stored tensor: a relabelled permutation,
        TRANSPOSE and/or RESHAPE, or GATHER."""
        stored = torch.arange(math.prod(x.stored_shape)).reshape(x.stored_shape)
        shape = tuple(positions.shape)
        flat = positions.reshape(-1)
        if positions.numel() == stored.numel() and stored.dim() <= 6:
            for perm in itertools.permutations(range(stored.dim())):
                moved = stored.permute(perm)
                if not torch.equal(moved.reshape(-1), flat):
                    continue
                if tuple(moved.shape) == shape:  # only the labels change
                    return TFLiteTensor(x.index, shape, x.grid, _inverse(perm))
                source = x.index if perm == tuple(range(stored.dim())) else self.transpose(x, perm)
                out = self.reshape(source, shape, x.grid, node.name)
                return TFLiteTensor(out, shape, x.grid, tuple(range(len(shape))))
        if x.index not in self.flattened:
            self.flattened[x.index] = self.reshape(x.index, [stored.numel()], x.grid, f"t{x.index}_flat")
        indices = self.fb.constant(f"{node.name}_positions", positions.numpy(), "int32")
        out = self.activation(node.name, shape, x.grid)
        self.fb.operator("GATHER", [self.flattened[x.index], indices], [out], self.fb.options("GatherOptions", axis=0))
        return TFLiteTensor(out, shape, x.grid, tuple(range(len(shape))))


def _conv_padding(geometry: ConvGeometry, input_hw, kernel) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """PyTorch's leading padding and output size per spatial axis (padding may be 'same' or 'valid')."""
    lead, out = [], []
    for i in range(2):
        span = (kernel[i] - 1) * geometry.dilation[i] + 1
        if geometry.padding == "valid":
            before = after = 0
        elif geometry.padding == "same":  # torch pads (span - 1) // 2 before, the rest after
            before, after = (span - 1) // 2, span - 1 - (span - 1) // 2
        else:
            before = after = geometry.padding[i]
        lead.append(before)
        out.append((input_hw[i] + before + after - span) // geometry.stride[i] + 1)
    return tuple(lead), tuple(out)


def transposed_output_size(geometry: ConvGeometry, input_hw, kernel) -> Tuple[int, int]:
    """ConvTranspose2d's output size: (H - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1."""
    return tuple((input_hw[i] - 1) * geometry.stride[i] - 2 * geometry.padding[i]
                 + geometry.dilation[i] * (kernel[i] - 1) + geometry.output_padding[i] + 1 for i in range(2))


# ---------------------------------------------------------------------------------------------------------
# Verify: run the file with LiteRT's three kernel sets
# ---------------------------------------------------------------------------------------------------------
# (label, OpResolverType name, the target it binds, note when it does not bind)
CONFIGURATIONS = (
    ("LiteRT default kernels (XNNPACK)", "AUTO", "xnnpack",
     "XNNPACK requantizes in float32 with its own rounding; target 'xnnpack' follows these kernels"),
    ("LiteRT optimized built-in kernels", "BUILTIN_WITHOUT_DEFAULT_DELEGATES", None,
     "optimized kernels round differently from the reference and from XNNPACK; no target follows them"),
    ("LiteRT reference kernels", "BUILTIN_REF", "tflite",
     "the reference kernels use gemmlowp fixed point; target 'tflite' follows these kernels"),
)


def verify_tflite(model: IntegerModel, path, inputs: Sequence[torch.Tensor]) -> List[RuntimeResult]:
    """Run the .tflite file on `inputs` with each kernel set and compare its output codes with `model`'s."""
    inputs = tuple(inputs)
    expected = list(leaves(model.run(*_as_tuple(model.quantize(*inputs)))))
    grids = list(leaves(model.output_qparams))
    _require_loadable(model, path, len(expected))
    results: List[RuntimeResult] = []
    for label, resolver, bound_target, other_note in CONFIGURATIONS:
        binding = model.target.name == bound_target
        note = "" if binding else other_note
        try:
            outputs = run_tflite(path, inputs, resolver)
        except (RuntimeError, ValueError) as error:  # what the interpreter raises for a kernel it cannot run
            for i, codes in enumerate(expected):
                results.append(RuntimeResult(label, i, codes.numel(), codes.numel(), binding,
                                             note=f"could not run: {str(error).strip().splitlines()[0]}"))
            continue
        for i, (codes, real, grid) in enumerate(zip(expected, outputs, grids)):
            results.append(compare_codes(label, i, codes, codes_from_dequantized(real, grid), binding, note))
    return results


def _require_loadable(model: IntegerModel, path, outputs: int) -> None:
    """A ModelFileError unless LiteRT loads `path` as a model with the model's inputs and output count: the
    kernel sets that then fail to run it are reported per configuration, a file that is no model is not."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path))
    except (RuntimeError, ValueError) as error:
        raise ModelFileError(f"{str(path)!r} is not a TFLite model LiteRT can load: "
                             f"{str(error).strip().splitlines()[0]}") from error
    require_model_inputs(path, [tuple(int(d) for d in i["shape"]) for i in interpreter.get_input_details()], model)
    found = len(interpreter.get_output_details())
    if found != outputs:
        raise ModelFileError(f"{str(path)!r} has {found} output(s); the model has {outputs}")


def run_tflite(path, inputs: Sequence[torch.Tensor], resolver: str = "BUILTIN_REF") -> List[torch.Tensor]:
    """The file's float32 outputs for `inputs`, fed in chunks of the file's batch size."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=getattr(OpResolverType, resolver))
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    batch = int(details[0]["shape"][0])
    total = int(inputs[0].shape[0])
    if total % batch:
        raise ExportError(f"the file takes batches of {batch}; {total} samples do not split into them")
    chunks: List[List[np.ndarray]] = []
    for start in range(0, total, batch):
        for detail, x in zip(details, inputs):
            chunk = x[start:start + batch].detach().numpy()
            interpreter.set_tensor(detail["index"], np.ascontiguousarray(chunk, np.float32))
        interpreter.invoke()
        chunks.append([interpreter.get_tensor(d["index"]).copy() for d in interpreter.get_output_details()])
    return [torch.from_numpy(np.concatenate(parts)) for parts in zip(*chunks)]


def codes_from_dequantized(real: torch.Tensor, grid: QParams) -> torch.Tensor:
    """Codes from a DEQUANTIZE output: (q - z) * s is one float32 rounding of a product with |q - z| <= 255, so
    dividing in float64 and rounding gives q back exactly."""
    scaled = real.to(torch.float64) / grid.scale.to(torch.float64)
    return torch.round(scaled).to(torch.int64) + int(grid.zero_point)


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)
