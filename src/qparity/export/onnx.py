"""ONNX QOperator export of `onnxruntime` models, and verification of the file in ONNX Runtime.

Each operator of the integer program becomes the ONNX Runtime kernel whose arithmetic
`qparity.numerics.onnxruntime` emulates, so the file computes the same codes:

    input          QuantizeLinear (float32 in, the batch dimension symbolic)
    conv2d         QLinearConv: per-channel int8 weights, int32 bias
    linear         com.microsoft QGemm (transB=1, per-column b_scale, int32 bias as C); inputs of rank > 2
                   are reshaped to [-1, K] and back
    add            com.microsoft QLinearAdd
    sub            BitwiseNot of the second operand's codes (its negation on the mirrored grid), QLinearAdd
    mul            com.microsoft QLinearMul (numpy broadcasting)
    matmul         QLinearMatMul (numpy matmul broadcasting)
    softmax        com.microsoft QLinearSoftmax (axis -1, opset 13)
    cat            com.microsoft QLinearConcat
    sigmoid        com.microsoft QLinearSigmoid
    leaky_relu     com.microsoft QLinearLeakyRelu (alpha as float32)
    max_pool2d     MaxPool on the codes
    amax           ReduceMax on the codes
    upsample       Resize (nearest, asymmetric, floor) on the codes
    pad            Pad (constant) with the zero point's code
    avg_pool2d     com.microsoft QLinearAveragePool, or QLinearGlobalAveragePool where the window covers the
                   whole input without padding (ORT routes that case to the global kernel itself)
    clamp          Clip on the codes, with the target's code bounds (also the clamp fused into conv/linear/add)
    call           Reshape / Transpose / Slice on the codes, shapes evaluated from the captured input shapes;
                   pixel_shuffle as DepthToSpace (CRD), pixel_unshuffle as Reshape-Transpose-Reshape
    dropout        nothing
    outputs        DequantizeLinear (float32 out)

Shapes that depend on the batch size are found by running the integer program at two batch sizes.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ExportError, ModelFileError
from ..graph import CALLS, Graph, Node, Ref, fused_clamp_bounds, leaves, resolve
from ..numerics import pooling
from ..numerics.accumulate import ConvGeometry
from ..numerics.onnxruntime import negated
from ..ops import constant, parameter
from ..ops.pad import padding_per_dimension
from ..qparams import TORCH_DTYPES, QParams
from ..runtime import IntegerModel
from . import require_model_inputs
from .report import RuntimeResult, compare_codes

OPSET = 21
MICROSOFT = "com.microsoft"
IR_VERSION = 10  # with opset 21: ONNX Runtime 1.18 or newer
PROBE_BATCHES = (2, 3)
INT64_MAX = np.iinfo(np.int64).max
RESHAPES = ("view", "reshape", "flatten", "squeeze", "unsqueeze")
TRANSPOSES = ("permute", "transpose", "t")
PIECES = ("chunk", "split")
ALIASES = ("contiguous",)


def export_onnx(model: IntegerModel, path) -> None:
    """Write `model` (target `onnxruntime`) as an ONNX QOperator graph checked by `onnx.checker`."""
    import onnx

    proto = build_onnx(model)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, os.fspath(path))


def build_onnx(model: IntegerModel):
    if model.target.name != "onnxruntime":
        raise ExportError(f"only models of target 'onnxruntime' export to ONNX; this one has target "
                          f"{model.target.name!r}")
    return _OnnxBuilder(model).build()


def _probe(model: IntegerModel, batch: int) -> Dict[str, Any]:
    """Every node's value (codes, or shapes and other Python values) for zero-point inputs of `batch` rows."""
    probe = copy.copy(model)
    probe.graph = Graph(model.graph.nodes, tuple(Ref(n.name) for n in model.graph.nodes), model.graph.input_shapes)
    codes = [torch.full((batch, *shape[1:]), int(qp.zero_point), dtype=TORCH_DTYPES[qp.dtype])
             for shape, qp in zip(model.graph.input_shapes, model.input_qparams)]
    try:
        values = probe.run(*codes)
    except Exception as error:
        raise ExportError(f"the model does not run with batch size {batch} ({error}); the ONNX file has a "
                          "symbolic batch dimension, so every layout op must follow the batch size") from error
    return {n.name: v for n, v in zip(model.graph.nodes, values)}


class _OnnxBuilder:
    def __init__(self, model: IntegerModel):
        self.model = model
        self.small, self.large = (_probe(model, b) for b in PROBE_BATCHES)
        self.nodes: list = []
        self.initializers: list = []
        self.names: Dict[str, Any] = {}  # qparity node -> ONNX name, list of names (a tuple of tensors) or None
        self.grid_names: Dict[int, List[str]] = {}

    # -- building blocks ------------------------------------------------------------------------------------
    def emit(self, op: str, inputs: Sequence[str], output: str, domain: str = "", **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, domain=domain or None, **attrs))
        return output

    def constant(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.array(array, order="C"), name))
        return name

    def grid(self, qp: QParams, owner: str) -> List[str]:
        """[scale, zero point] initializers of a per-tensor grid, one pair per grid."""
        if id(qp) not in self.grid_names:
            self.grid_names[id(qp)] = [
                self.constant(f"{owner}.scale", np.asarray(qp.scale.item(), np.float32)),
                self.constant(f"{owner}.zero_point", np.asarray(int(qp.zero_point), _numpy_dtype(qp)))]
        return self.grid_names[id(qp)]

    def input_grid(self, node: Node, index: int = 0) -> QParams:
        return self.model.grids[node.refs()[index]]

    def clip(self, name: str, node: Node, bounds: Tuple[int, int], qp: QParams) -> str:
        """Clip the codes to `bounds` unless they are the dtype range (which every QLinear op saturates to)."""
        lo, hi = bounds
        if (lo, hi) == (qp.qmin, qp.qmax):
            return name
        dtype = _numpy_dtype(qp)
        low = self.constant(f"{node.name}.clip_min", np.asarray(lo, dtype))
        high = self.constant(f"{node.name}.clip_max", np.asarray(hi, dtype))
        return self.emit("Clip", [name, low, high], f"{node.name}.clipped")

    def shape(self, node: Node, small, large) -> List[int]:
        """A Reshape target for a value seen at both probe batch sizes: -1 where the batch size enters."""
        a, b = tuple(small.shape), tuple(large.shape)
        varying = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(a) != len(b) or len(varying) > 1:
            raise ExportError(f"{node.op} '{node.name}' at {node.path}: its output shape {a} at batch size "
                              f"{PROBE_BATCHES[0]} becomes {b} at batch size {PROBE_BATCHES[1]}; ONNX Reshape can "
                              "follow the batch size in one dimension only. Keep the batch dimension separate")
        return [-1 if i in varying else d for i, d in enumerate(a)]

    def reshape(self, name: str, node: Node, small, large, output: str) -> str:
        target = self.constant(f"{output}.shape", np.asarray(self.shape(node, small, large), np.int64))
        return self.emit("Reshape", [name, target], output)

    # -- graph ----------------------------------------------------------------------------------------------
    def build(self):
        from onnx import TensorProto, helper

        graph_inputs = []
        for node in self.model.graph.nodes:
            if node.op == "input":
                graph_inputs.append(helper.make_tensor_value_info(
                    node.name, TensorProto.FLOAT, ["batch", *self.small[node.name].shape[1:]]))
            handler = getattr(self, "op_" + node.op, None)
            if handler is None:
                raise ExportError(f"operator {node.op!r} at {node.path} has no ONNX QOperator form")
            self.names[node.name] = handler(node, *resolve(node.args, self.names))
        outputs = self.outputs()
        graph = helper.make_graph(self.nodes, "qparity", graph_inputs, outputs, self.initializers)
        proto = helper.make_model(graph, producer_name="qparity", opset_imports=[
            helper.make_opsetid("", OPSET), helper.make_opsetid(MICROSOFT, 1)])
        proto.ir_version = IR_VERSION
        return proto

    def outputs(self) -> list:
        from onnx import TensorProto, helper

        names = leaves(resolve(self.model.graph.output, self.names))
        small = leaves(resolve(self.model.graph.output, self.small))
        large = leaves(resolve(self.model.graph.output, self.large))
        grids = leaves(self.model.output_qparams)
        if not all(isinstance(n, str) for n in names):
            raise ExportError("the model returns values that are not tensors; an ONNX graph can only return the "
                              "model's quantized tensors")
        declared = []
        for i, (name, a, b, qp) in enumerate(zip(names, small, large, grids)):
            output = "output" if len(names) == 1 else f"output_{i}"
            self.emit("DequantizeLinear", [name, *self.grid(qp, output)], output)
            dims = [x if x == y else "batch" if (x, y) == PROBE_BATCHES else None for x, y in zip(a.shape, b.shape)]
            declared.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, dims))
        return declared

    # -- operators ------------------------------------------------------------------------------------------
    def op_input(self, node: Node) -> str:
        qp = self.model.qparams[node.name]
        return self.emit("QuantizeLinear", [node.name, *self.grid(qp, node.name)], f"{node.name}.quantized")

    def op_conv2d(self, node: Node, x: str) -> str:
        geometry = ConvGeometry.from_dict(node.attrs["geometry"])
        layer = self.model.layers[node.name]
        out_qp = self.model.qparams[node.name]
        kernel = list(layer.weight_codes.shape[2:])
        inputs = [x, *self.grid(self.input_grid(node), node.refs()[0]), *self.weights(node),
                  *self.grid(out_qp, node.name)]
        if layer.bias_codes is not None:
            inputs.append(self.constant(f"{node.name}.bias", _int32(layer.bias_codes)))
        y = self.emit("QLinearConv", inputs, f"{node.name}.conv", kernel_shape=kernel,
                      strides=list(geometry.stride), pads=_conv_pads(geometry, kernel),
                      dilations=list(geometry.dilation), group=geometry.groups)
        return self.clip(y, node, fused_clamp_bounds(self.model.target, node, out_qp), out_qp)

    def op_linear(self, node: Node, x: str) -> str:
        layer = self.model.layers[node.name]
        out_qp = self.model.qparams[node.name]
        features = layer.weight_codes.shape[1]
        rank = self.small[node.refs()[0]].dim()
        if rank != 2:
            flat = self.constant(f"{node.name}.rows", np.asarray([-1, features], np.int64))
            x = self.emit("Reshape", [x, flat], f"{node.name}.rows_in")
        # QGemm wants b_scale and b_zero_point as [N] vectors (quant_gemm.cc), also for per-tensor weights.
        outputs = layer.weight_codes.shape[0]
        bias = (self.constant(f"{node.name}.bias", _int32(layer.bias_codes)) if layer.bias_codes is not None
                else "")
        y = self.emit("QGemm", [x, *self.grid(self.input_grid(node), node.refs()[0]),
                                        *self.weights(node, vector_length=outputs), bias,
                                        *self.grid(out_qp, node.name)],
                      f"{node.name}.gemm", domain=MICROSOFT, transB=1)
        if rank != 2:
            y = self.reshape(y, node, self.small[node.name], self.large[node.name], f"{node.name}.rows_out")
        return self.clip(y, node, fused_clamp_bounds(self.model.target, node, out_qp), out_qp)

    def weights(self, node: Node, vector_length: Optional[int] = None) -> List[str]:
        """[int8 weight codes, weight scale, zero weight zero points] of a conv/linear node."""
        layer = self.model.layers[node.name]
        scale = layer.weight_scale.detach().to(torch.float32).numpy()
        if vector_length is not None:
            scale = np.broadcast_to(scale.reshape(-1), (vector_length,))
        codes = layer.weight_codes.detach().to(torch.int8).numpy()
        return [self.constant(f"{node.name}.weight", codes),
                self.constant(f"{node.name}.weight_scale", scale.astype(np.float32)),
                self.constant(f"{node.name}.weight_zero_point", np.zeros(scale.shape, np.int8))]

    def op_constant(self, node: Node) -> str:
        qp = self.model.qparams[node.name]
        values = constant.codes(self.model.target, node, qp).numpy().astype(_numpy_dtype(qp))
        return self.constant(f"{node.name}.codes", values)

    def op_parameter(self, node: Node) -> str:
        qp = self.model.qparams[node.name]
        return self.constant(f"{node.name}.codes", parameter.stored_codes(node).numpy().astype(_numpy_dtype(qp)))

    def op_add(self, node: Node, a: str, b: str) -> str:
        out_qp = self.model.qparams[node.name]
        first, second = node.refs()
        y = self.emit("QLinearAdd", [a, *self.grid(self.model.grids[first], first), b,
                                     *self.grid(self.model.grids[second], second), *self.grid(out_qp, node.name)],
                      f"{node.name}.add", domain=MICROSOFT)
        return self.clip(y, node, fused_clamp_bounds(self.model.target, node, out_qp), out_qp)

    def op_sub(self, node: Node, a: str, b: str) -> str:
        """a - b as QLinearAdd of a and b's codes mirrored (BitwiseNot) on the mirrored grid: ONNX has no
        quantized Sub (numerics/onnxruntime.py subtract)."""
        out_qp = self.model.qparams[node.name]
        first, second = node.refs()
        _, negated_grid = negated(torch.zeros(()), self.model.grids[second])
        mirrored = self.emit("BitwiseNot", [b], f"{node.name}.negated")
        return self.emit("QLinearAdd", [a, *self.grid(self.model.grids[first], first), mirrored,
                                        *self.grid(negated_grid, f"{node.name}.negated"), *self.grid(out_qp, node.name)],
                         node.name, domain=MICROSOFT)

    def op_mul(self, node: Node, a: str, b: str) -> str:
        out_qp = self.model.qparams[node.name]
        first, second = node.refs()
        return self.emit("QLinearMul", [a, *self.grid(self.model.grids[first], first), b,
                                        *self.grid(self.model.grids[second], second), *self.grid(out_qp, node.name)],
                         node.name, domain=MICROSOFT)

    def op_matmul(self, node: Node, a: str, b: str) -> str:
        out_qp = self.model.qparams[node.name]
        first, second = node.refs()
        return self.emit("QLinearMatMul", [a, *self.grid(self.model.grids[first], first), b,
                                           *self.grid(self.model.grids[second], second), *self.grid(out_qp, node.name)],
                         node.name)

    def op_softmax(self, node: Node, x: str) -> str:
        """com.microsoft QLinearSoftmax with opset 13 semantics: one softmax per row of the last axis."""
        return self.lookup_activation("QLinearSoftmax", node, x, axis=-1, opset=13)

    def op_cat(self, node: Node, tensors: List[str]) -> str:
        out_qp = self.model.qparams[node.name]
        inputs = list(self.grid(out_qp, node.name))
        for ref, name in zip(node.refs(), tensors):
            inputs += [name, *self.grid(self.model.grids[ref], ref)]
        axis = node.attrs["dim"] % self.small[node.name].dim()
        return self.emit("QLinearConcat", inputs, node.name, domain=MICROSOFT, axis=axis)

    def op_sigmoid(self, node: Node, x: str) -> str:
        return self.lookup_activation("QLinearSigmoid", node, x)

    def op_leaky_relu(self, node: Node, x: str) -> str:
        return self.lookup_activation("QLinearLeakyRelu", node, x, alpha=float(node.attrs["negative_slope"]))

    def lookup_activation(self, op: str, node: Node, x: str, **attrs) -> str:
        """The com.microsoft activations ORT runs as a table built in float (qlinear_lookup_table.cc)."""
        source = node.refs()[0]
        return self.emit(op, [x, *self.grid(self.model.grids[source], source),
                              *self.grid(self.model.qparams[node.name], node.name)], node.name, domain=MICROSOFT,
                         **attrs)

    def op_pad(self, node: Node, x: str) -> str:
        """Pad (constant) with the zero point's code; ONNX orders pads as all begins, then all ends."""
        rank = self.small[node.refs()[0]].dim()
        per_dimension = padding_per_dimension(node.attrs["pad"], rank)
        begins, ends = [b for b, _ in per_dimension], [e for _, e in per_dimension]
        grid = self.input_grid(node)
        pads = self.constant(f"{node.name}.pads", np.asarray(begins + ends, np.int64))
        value = self.constant(f"{node.name}.value", np.asarray(int(grid.zero_point), _numpy_dtype(grid)))
        return self.emit("Pad", [x, pads, value], node.name, mode="constant")

    def op_upsample_nearest(self, node: Node, x: str) -> str:
        """Resize on the codes: asymmetric coordinates, floor: input index floor(y / k) = y // k."""
        scales = self.constant(f"{node.name}.scales", np.asarray([1, 1, *node.attrs["scale_factor"]], np.float32))
        return self.emit("Resize", [x, "", scales], node.name, mode="nearest",
                         coordinate_transformation_mode="asymmetric", nearest_mode="floor")

    def op_amax(self, node: Node, x: str) -> str:
        """ReduceMax on the codes (axes as an input since opset 18)."""
        axes = self.constant(f"{node.name}.axes", np.asarray(node.attrs["dim"], np.int64))
        return self.emit("ReduceMax", [x, axes], node.name, keepdims=int(node.attrs["keepdim"]))

    def op_max_pool2d(self, node: Node, x: str) -> str:
        a = node.attrs
        pads, ceil_mode = self.pool_pads(node, a, a["dilation"])
        return self.emit("MaxPool", [x], node.name, kernel_shape=list(a["kernel_size"]), strides=list(a["stride"]),
                         pads=pads, dilations=list(a["dilation"]), ceil_mode=ceil_mode)

    def op_avg_pool2d(self, node: Node, x: str) -> str:
        input_hw = tuple(self.small[node.refs()[0]].shape[-2:])
        a = pooling.window_attrs(node.attrs, input_hw, node.path)
        qp = self.input_grid(node)
        grid = self.grid(qp, node.refs()[0])
        # qlinear_pool.cc hands a window covering the whole input without padding to the global kernel;
        # writing that kernel into the file says what runs.
        if tuple(a["kernel_size"]) == input_hw and tuple(a["padding"]) == (0, 0):
            return self.emit("QLinearGlobalAveragePool", [x, *grid, *grid], node.name, domain=MICROSOFT,
                             channels_last=0)
        pads, ceil_mode = self.pool_pads(node, a, (1, 1))
        return self.emit("QLinearAveragePool", [x, *grid, *grid], node.name, domain=MICROSOFT,
                         kernel_shape=list(a["kernel_size"]), strides=list(a["stride"]), pads=pads,
                         ceil_mode=ceil_mode, count_include_pad=int(a["count_include_pad"]))

    def pool_pads(self, node: Node, attrs: dict, dilation) -> Tuple[List[int], int]:
        """ONNX pads and ceil_mode giving PyTorch's pooling output size.

        ONNX's ceil_mode size formula lacks the rule PyTorch and ONNX Runtime 1.32 share (a last window
        starting in the end padding is dropped), so with ceil_mode the end padding is chosen such that the
        standard formula gives PyTorch's size too. The values do not depend on it: MaxPool and
        QLinearAveragePool clip every window to the input and count the full kernel or the in-input
        elements (pool_attributes.h, qlinear_pool.cc), whatever the end padding.
        """
        begin = list(attrs["padding"])
        if not attrs["ceil_mode"]:
            return begin * 2, 0
        sizes = list(zip(self.small[node.refs()[0]].shape[-2:], self.small[node.name].shape[-2:],
                         attrs["kernel_size"], attrs["stride"], begin, dilation))
        for ceil_mode in (1, 0):
            end = [_end_padding(size, out, k, s, p, d, ceil_mode) for size, out, k, s, p, d in sizes]
            if None not in end:
                return begin + end, ceil_mode
        raise ExportError(f"{node.op} at {node.path}: no ONNX padding smaller than the kernel gives PyTorch's "
                          f"ceil_mode output size {tuple(self.small[node.name].shape[-2:])}; use ceil_mode=False "
                          "with explicit padding")

    def op_clamp(self, node: Node, x: str) -> str:
        qp = self.input_grid(node)
        bounds = self.model.target.activation_bounds(node.attrs.get("min"), node.attrs.get("max"), qp)
        return self.clip(x, node, bounds, qp)

    def op_dropout(self, node: Node, x: str) -> str:
        return x

    def op_call(self, node: Node, *operands):
        value = self.small[node.name]
        if not any(isinstance(v, torch.Tensor) for v in leaves(value)):
            return None  # shapes, sizes and arithmetic on them: evaluated here, not in the file
        source = node.refs()[0]
        name = resolve(Ref(source), self.names)
        if isinstance(name, list):  # indexing the tuple a chunk/split returned
            index = resolve(node.args[1], self.small)
            return name[index]
        method = node.attrs["fn"].split(":")[1].split(".")[-1]
        if method in ALIASES:
            return name
        if method in RESHAPES:
            return self.reshape(name, node, value, self.large[node.name], node.name)
        if method in TRANSPOSES:
            return self.emit("Transpose", [name], node.name, perm=self.permutation(node, source))
        if method == "getitem":
            return self.getitem(node, name, source)
        if method in PIECES:
            return self.pieces(node, name, source)
        if method == "pixel_shuffle":  # DepthToSpace's CRD mode is PyTorch's pixel_shuffle (ONNX spec)
            return self.emit("DepthToSpace", [name], node.name, blocksize=int(resolve(node.args[1], self.small)),
                             mode="CRD")
        if method == "pixel_unshuffle":
            return self.pixel_unshuffle(node, name, source)
        raise ExportError(f"the layout call {node.attrs['fn']!r} at {node.path} has no ONNX form in qparity's "
                          "exporter")

    # -- layout calls ---------------------------------------------------------------------------------------
    def pixel_unshuffle(self, node: Node, name: str, source: str) -> str:
        """PyTorch's pixel_unshuffle (channel c * r^2 + i * r + j; ONNX's SpaceToDepth orders them otherwise) as
        Reshape [N, C, H/r, r, W/r, r] -> Transpose (0, 1, 3, 5, 2, 4) -> Reshape [N, C r^2, H/r, W/r]."""
        r = int(resolve(node.args[1], self.small))
        _, c, h, w = self.small[source].shape
        split = self.constant(f"{node.name}.split_shape", np.asarray([-1, c, h // r, r, w // r, r], np.int64))
        merged = self.constant(f"{node.name}.merged_shape", np.asarray([-1, c * r * r, h // r, w // r], np.int64))
        blocks = self.emit("Reshape", [name, split], f"{node.name}.blocks")
        moved = self.emit("Transpose", [blocks], f"{node.name}.moved", perm=[0, 1, 3, 5, 2, 4])
        return self.emit("Reshape", [moved, merged], node.name)


    def permutation(self, node: Node, source: str) -> List[int]:
        """The axes a transpose-like call takes, found by running it on a tensor with distinct dimension sizes."""
        rank = self.small[source].dim()
        sizes = [2 + i for i in range(rank)]
        stand_in = torch.empty(sizes)
        args = resolve(node.args, {**self.small, source: stand_in})
        kwargs = resolve(node.kwargs, {**self.small, source: stand_in})
        moved = CALLS[node.attrs["fn"]](*args, **kwargs)
        return [sizes.index(d) for d in moved.shape]

    def getitem(self, node: Node, name: str, source: str) -> str:
        index = resolve(node.args[1], self.small)
        if index != resolve(node.args[1], self.large):
            raise ExportError(f"indexing at {node.path} depends on the batch size; the ONNX file has a symbolic "
                              "batch dimension")
        index = index if isinstance(index, tuple) else (index,)
        rank = self.small[source].dim()
        if any(i is Ellipsis for i in index):
            at = index.index(Ellipsis)
            named = sum(1 for i in index if i is not None and i is not Ellipsis)
            index = index[:at] + (slice(None),) * (rank - named) + index[at + 1:]
        starts, ends, axes, steps = [], [], [], []
        axis, reshaped = 0, False
        for entry in index:
            if entry is None:
                reshaped = True
                continue
            if isinstance(entry, bool) or not isinstance(entry, (int, slice)):
                raise ExportError(f"indexing with {entry!r} at {node.path} (advanced indexing) has no ONNX form "
                                  "in qparity's exporter; use slices and integers")
            if isinstance(entry, int):
                starts.append(entry)
                ends.append(INT64_MAX if entry == -1 else entry + 1)
                steps.append(1)
                reshaped = True
            elif entry != slice(None):
                starts.append(0 if entry.start is None else entry.start)
                ends.append(INT64_MAX if entry.stop is None else entry.stop)
                steps.append(1 if entry.step is None else entry.step)
            else:
                axis += 1
                continue
            axes.append(axis)
            axis += 1
        y = name
        if axes:
            inputs = [self.constant(f"{node.name}.{part}", np.asarray(v, np.int64))
                      for part, v in (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]
            y = self.emit("Slice", [name, *inputs], f"{node.name}.slice" if reshaped else node.name)
        if reshaped:
            y = self.reshape(y, node, self.small[node.name], self.large[node.name], node.name)
        return y

    def pieces(self, node: Node, name: str, source: str) -> List[str]:
        """chunk/split: one Slice per piece, along the one axis where the pieces differ from the input."""
        whole = tuple(self.small[source].shape)
        small, large = self.small[node.name], self.large[node.name]
        cut = [i for i in range(len(whole)) if any(p.shape[i] != whole[i] for p in small)]
        if len(small) != len(large) or len(cut) > 1 or any(
                a.shape[i] != b.shape[i] for a, b in zip(small, large) for i in cut):
            raise ExportError(f"{node.attrs['fn']} at {node.path} splits along the batch dimension; the ONNX file "
                              "has a symbolic batch dimension")
        if not cut:
            return [name]
        axis, start, names = cut[0], 0, []
        for i, piece in enumerate(small):
            size = piece.shape[axis]
            inputs = [self.constant(f"{node.name}.{i}.{part}", np.asarray([v], np.int64))
                      for part, v in (("starts", start), ("ends", start + size), ("axes", axis))]
            names.append(self.emit("Slice", [name, *inputs], f"{node.name}.{i}"))
            start += size
        return names


def _conv_pads(geometry: ConvGeometry, kernel: List[int]) -> List[int]:
    """ONNX pads [top, left, bottom, right]; padding='same' as PyTorch places it (the odd pixel at the end)."""
    if geometry.padding == "valid":
        return [0, 0, 0, 0]
    if geometry.padding == "same":
        total = [d * (k - 1) for d, k in zip(geometry.dilation, kernel)]
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    return list(geometry.padding) * 2


def _end_padding(size: int, out: int, kernel: int, stride: int, begin: int, dilation: int, ceil_mode: int):
    """An end padding (the begin padding preferred; ORT wants it below the kernel) giving `out` windows."""
    for end in [begin] + list(range(kernel)):
        span = size + begin + end - dilation * (kernel - 1) - 1
        if (-(-span // stride) if ceil_mode else span // stride) + 1 == out:
            return end
    return None


def _numpy_dtype(qp: QParams):
    return {"uint8": np.uint8, "int8": np.int8}[qp.dtype]


def _int32(codes: torch.Tensor) -> np.ndarray:
    return codes.detach().to(torch.int64).numpy().astype(np.int32)


# ---------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------
def _configurations():
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    return [(f"onnxruntime {label}, {threads} thread{'s' * (threads > 1)}", opt, threads)
            for label, opt in (("optimized", level.ORT_ENABLE_ALL), ("unoptimized", level.ORT_DISABLE_ALL))
            for threads in (1, 2)]


def verify_onnx(model: IntegerModel, path, inputs: Sequence[torch.Tensor]) -> List[RuntimeResult]:
    """Run the .onnx file in ONNX Runtime's CPU provider (graph optimizations on and off, 1 and 2 threads) and
    compare every output's codes with `model.run`."""
    import onnxruntime as ort

    inputs = tuple(inputs)
    codes = model.quantize(*inputs)
    expected = leaves(model.run(*(codes if isinstance(codes, tuple) else (codes,))))
    grids = leaves(model.output_qparams)
    binding = model.target.name == "onnxruntime"  # the target whose semantics are ONNX Runtime's
    results = []
    for label, level, threads in _configurations():
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = _session(ort, path, options)
        require_model_inputs(path, [tuple(i.shape) for i in session.get_inputs()], model)
        feeds = {i.name: x.detach().to(torch.float32).cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
        try:
            outputs = session.run(None, feeds)
        except Exception as error:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
            raise ModelFileError(f"{os.fspath(path)!r} does not run on the model's inputs: {error}") from error
        if len(outputs) != len(expected):
            raise ModelFileError(f"{os.fspath(path)!r} has {len(outputs)} output(s); the model has {len(expected)}")
        for index, (y, want, qp) in enumerate(zip(outputs, expected, grids)):
            results.append(compare_codes(label, index, want, _codes_from_floats(y, qp), binding=binding))
    return results


def _session(ort, path, options):
    """An InferenceSession of `path`, or a ModelFileError saying the file is no model ONNX Runtime loads."""
    try:
        return ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime's errors derive from Exception only
        raise ModelFileError(f"{os.fspath(path)!r} is not an ONNX model ONNX Runtime can load: "
                             f"{str(error).strip()}") from error


def _codes_from_floats(y: np.ndarray, qp: QParams) -> torch.Tensor:
    """The codes behind a DequantizeLinear output.

    DequantizeLinear returns f32((q - z) * s), one float32 rounding of an exact product: y / s (in float64)
    is within |q - z| * 2^-24 < 2^-15 of the integer q - z, so rounding recovers it exactly.
    """
    centered = torch.round(torch.from_numpy(np.asarray(y, np.float64)) / float(qp.scale))
    return centered.to(torch.int64) + int(qp.zero_point)
