"""Qualcomm QNN / SNPE: a float ONNX model plus its AIMET encodings file, so the converter keeps qparity's grids.

QNN's converters (qnn-onnx-converter, snpe-onnx-to-dlc) quantize a float model themselves unless they are
given quantization overrides: an AIMET encodings file naming, per tensor, the scale and offset to use
(AIMET's quantization_encoding_specification). `export_aimet(model, "model.onnx")` writes

    model.onnx       the integer program as float ONNX operators (Conv, Gemm, Add, Clip, MaxPool, ...), every
                     weight and bias the dequantized qparity value (float32(code * scale), what the fake-quant
                     forward uses), every tensor named after its qparity node (index.json's node names)
    model.encodings  every activation tensor's grid and every weight's and bias's, in version 1.0.0 (a list of
                     {"name", "dtype", "enc_type", "bw", "is_sym", "scale", "offset"}) or 0.6.1 (a dict by
                     tensor name of [{"bitwidth", "dtype", "is_symmetric", "max", "min", "offset", "scale"}])

AIMET describes every grid on the unsigned codes u in [0, 2^bw - 1]: real = (u + offset) * scale, so
offset = -(the unsigned zero point) <= 0, min = scale * offset and max = scale * (2^bw - 1 + offset). qparity's
codes q (int8 or uint8, zero point z) are u = q - q_min: offset = q_min - z (int8: -128 - z; uint8: -z).
Weights are symmetric int8 (zero point 0): offset -128, per output channel; biases int32 at s_in * s_w:
bw 32, offset -2^31, so the converter finds qparity's bias codes again instead of rounding them anew.

The encodings fix the grids, not the arithmetic: Hexagon's requantization (how the HTP rounds an accumulator
onto the output grid) is not public, so parity on a Qualcomm device is checked with golden vectors and
`qparity compare` (docs/runtimes.md, "Checking a device"), not promised.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..errors import ArgumentTypeError, ExportError
from ..files import path_of, replacing
from ..graph import Node, fused_clamp_bounds, leaves, resolve
from ..numerics.accumulate import ConvGeometry
from ..ops import constant, parameter
from ..ops.registry import OPERATORS
from ..qparams import QParams
from ..runtime import IntegerModel
from .onnx import IR_VERSION, _conv_pads, _OnnxBuilder

VERSIONS = ("1.0.0", "0.6.1")
# The operators written as float ONNX (the QOperator builder's layout ops move floats as they move codes): the
# registry's `aimet` entries, so an operator added there is exported or refused here without a second list.
FLOAT_OPS = tuple(name for name, op in OPERATORS.items() if op.aimet)
WEIGHT_BITS, BIAS_BITS = 8, 32


def export_aimet(model: IntegerModel, path, version: str = "1.0.0") -> Tuple[str, str]:
    """Write `model` as float ONNX to `path` (.onnx) and its AIMET encodings next to it (.encodings).

    Returns the two paths.
    """
    import onnx

    if not isinstance(model, IntegerModel):
        raise ArgumentTypeError(f"expected an IntegerModel (from qparity.convert or qparity.load), got "
                                f"{type(model).__name__}")
    if version not in VERSIONS:
        raise ExportError(f"AIMET encodings version {version!r} is not written; choose one of {', '.join(VERSIONS)}")
    onnx_path = path_of(path, "the ONNX file")
    if os.path.splitext(onnx_path)[1].lower() != ".onnx":
        raise ExportError(f"{onnx_path!r}: the float model for QNN is an .onnx file")
    unsupported = [f"{node.op} at {node.path or node.name}" for node in model.graph.nodes if node.op not in FLOAT_OPS]
    if unsupported:
        raise ExportError(f"no float ONNX form for {', '.join(unsupported)} in the AIMET export; it writes "
                          f"{', '.join(FLOAT_OPS)}")
    builder = _FloatOnnxBuilder(model)
    proto = builder.build()
    onnx.checker.check_model(proto, full_check=True)
    encodings = builder.encodings(version)
    encodings_path = os.path.splitext(onnx_path)[0] + ".encodings"
    with replacing(onnx_path, "the exported file") as temporary:
        onnx.save(proto, temporary)
    with replacing(encodings_path, "the encodings file") as temporary:
        with open(temporary, "w") as f:
            json.dump(encodings, f, indent=1)
    return onnx_path, encodings_path


# ---------------------------------------------------------------------------------------------------------
# Encodings
# ---------------------------------------------------------------------------------------------------------
def grid_encoding(scale: np.ndarray, offset: np.ndarray, bits: int, symmetric: bool, version: str) -> dict:
    """One tensor's encoding (per tensor when `scale` has one value, else per channel)."""
    scale = np.asarray(scale, np.float64).reshape(-1)
    offset = np.asarray(offset, np.int64).reshape(-1)
    if version == "1.0.0":
        return {"dtype": "INT", "enc_type": "PER_TENSOR" if scale.size == 1 else "PER_CHANNEL", "bw": bits,
                "is_sym": symmetric, "scale": scale.tolist(), "offset": offset.tolist()}
    top = (1 << bits) - 1
    return [{"bitwidth": bits, "dtype": "int", "is_symmetric": str(symmetric), "max": float(s * (top + o)),
             "min": float(s * o), "offset": int(o), "scale": float(s)} for s, o in zip(scale, offset)]


def activation_encoding(qp: QParams, version: str) -> dict:
    """A qparity grid on AIMET's unsigned codes: offset = q_min - z."""
    offset = qp.qmin - int(qp.zero_point)
    symmetric = offset == -(1 << 7)  # the zero point in the middle: int8 z = 0, uint8 z = 128
    return grid_encoding(qp.scale.numpy(), np.asarray(offset), 8, symmetric, version)


def _file(activations: Dict[str, dict], params: Dict[str, dict], version: str) -> dict:
    if version == "1.0.0":
        return {"version": version,
                "activation_encodings": [{"name": name, **e} for name, e in activations.items()],
                "param_encodings": [{"name": name, **e} for name, e in params.items()]}
    return {"version": version, "activation_encodings": activations, "param_encodings": params,
            "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": "True",
                               "param_bitwidth": WEIGHT_BITS, "per_channel_quantization": "True",
                               "quant_scheme": "qparity"}}


# ---------------------------------------------------------------------------------------------------------
# The float graph: the QOperator builder's graph walk and layout ops, with float arithmetic operators
# ---------------------------------------------------------------------------------------------------------
class _FloatOnnxBuilder(_OnnxBuilder):
    def __init__(self, model: IntegerModel):
        super().__init__(model)
        self.params: Dict[str, Tuple[np.ndarray, np.ndarray, int, bool]] = {}  # name -> scale, offset, bits, sym
        self.unclamped: Dict[str, QParams] = {}  # a conv/linear/add's result before its fused clamp -> its grid

    def build(self):
        proto = super().build()
        proto.opset_import.pop()  # no com.microsoft operators in the float graph
        proto.ir_version = IR_VERSION
        return proto

    def encodings(self, version: str) -> dict:
        activations = {}
        for node in self.model.graph.nodes:
            name = self.names.get(node.name)
            if isinstance(name, str) and node.name in self.model.grids and name not in self.params:
                activations[name] = activation_encoding(self.model.grids[node.name], version)
        for name, qp in [*self.unclamped.items(), *zip(self.output_names, leaves(self.model.output_qparams))]:
            activations[name] = activation_encoding(qp, version)
        params = {name: grid_encoding(scale, offset, bits, symmetric, version)
                  for name, (scale, offset, bits, symmetric) in self.params.items()}
        return _file(activations, params, version)

    def outputs(self) -> list:
        from onnx import TensorProto, helper

        names = leaves(resolve(self.model.graph.output, self.names))
        small = leaves(resolve(self.model.graph.output, self.small))
        large = leaves(resolve(self.model.graph.output, self.large))
        if not all(isinstance(n, str) for n in names):
            raise ExportError("the model returns values that are not tensors; an ONNX graph can only return the "
                              "model's quantized tensors")
        self.output_names, declared = [], []
        for i, (name, a, b) in enumerate(zip(names, small, large)):
            output = self.emit("Identity", [name], "output" if len(names) == 1 else f"output_{i}")
            self.output_names.append(output)
            dims = [x if x == y else "batch" for x, y in zip(a.shape, b.shape)]
            declared.append(helper.make_tensor_value_info(output, TensorProto.FLOAT, dims))
        return declared

    # -- values ---------------------------------------------------------------------------------------------
    def real(self, qp: QParams, codes) -> np.ndarray:
        """The dequantized value the fake-quant forward computes (the numerics' one dequantize rule)."""
        return self.model.target.dequantize(torch.as_tensor(codes, dtype=torch.int64), qp).numpy()

    def clamped(self, name: str, node: Node) -> str:
        """A conv/linear/add's result `name`, on the output grid (the integer program requantizes, saturates,
        then clamps: quantizing before the Clip gives its codes), then its fused clamp, named after the node."""
        out_qp = self.model.qparams[node.name]
        self.unclamped[name] = out_qp
        return self.clip_real(name, node, fused_clamp_bounds(self.model.target, node, out_qp), out_qp, node.name)

    def clip_real(self, name: str, node: Node, bounds: Tuple[int, int], qp: QParams, output: str) -> str:
        """Clip to the real values of the code bounds (a fused ReLU: min 0); none where they are the grid's."""
        lo, hi = bounds
        if (lo, hi) == (qp.qmin, qp.qmax):
            return self.emit("Identity", [name], output)
        low = self.constant(f"{node.name}.clip_min", self.real(qp, lo))
        high = self.constant(f"{node.name}.clip_max", self.real(qp, hi))
        return self.emit("Clip", [name, low, high], output)

    def layer_params(self, node: Node, weight_shape) -> List[str]:
        """[float weight, float bias] of a conv/linear node, each recorded with its integer grid."""
        layer = self.model.layers[node.name]
        input_scale = self.input_grid(node).scale.to(torch.float64)
        weight_scale = layer.weight_scale.to(torch.float32).reshape(-1)
        view = (-1,) + (1,) * (len(weight_shape) - 1)
        weight = (layer.weight_codes.to(torch.float64) * weight_scale.to(torch.float64).reshape(view)).to(torch.float32)
        names = [self.constant(f"{node.name}.weight", weight.numpy())]
        self.params[names[0]] = (weight_scale.numpy(), np.full(weight_scale.numel(), -(1 << (WEIGHT_BITS - 1))),
                                 WEIGHT_BITS, True)
        if layer.bias_codes is not None:
            bias_scale = (input_scale * weight_scale.to(torch.float64)).expand(layer.bias_codes.numel())
            bias = (layer.bias_codes.to(torch.float64) * bias_scale).to(torch.float32)
            names.append(self.constant(f"{node.name}.bias", bias.numpy()))
            self.params[names[1]] = (bias_scale.numpy(), np.full(bias_scale.numel(), -(1 << (BIAS_BITS - 1))),
                                     BIAS_BITS, True)
        return names

    # -- operators ------------------------------------------------------------------------------------------
    def op_input(self, node: Node) -> str:
        return node.name

    def op_conv2d(self, node: Node, x: str) -> str:
        geometry = ConvGeometry.from_dict(node.attrs["geometry"])
        layer = self.model.layers[node.name]
        kernel = list(layer.weight_codes.shape[2:])
        y = self.emit("Conv", [x, *self.layer_params(node, layer.weight_codes.shape)], f"{node.name}.conv",
                      kernel_shape=kernel, strides=list(geometry.stride), pads=_conv_pads(geometry, kernel),
                      dilations=list(geometry.dilation), group=geometry.groups)
        return self.clamped(y, node)

    def op_linear(self, node: Node, x: str) -> str:
        layer = self.model.layers[node.name]
        if self.small[node.refs()[0]].dim() != 2:
            raise ExportError(f"linear at {node.path} takes a rank-{self.small[node.refs()[0]].dim()} input; the "
                              "AIMET export writes Gemm, for [batch, features] inputs only")
        y = self.emit("Gemm", [x, *self.layer_params(node, layer.weight_codes.shape)], f"{node.name}.gemm", transB=1)
        return self.clamped(y, node)

    def op_constant(self, node: Node) -> str:
        return self.stored(node, constant.codes(self.model.target, node, self.model.qparams[node.name]))

    def op_parameter(self, node: Node) -> str:
        return self.stored(node, parameter.stored_codes(node))

    def stored(self, node: Node, codes: torch.Tensor) -> str:
        qp = self.model.qparams[node.name]
        name = self.constant(node.name, self.real(qp, codes))
        self.params[name] = (qp.scale.numpy(), np.asarray(qp.qmin - int(qp.zero_point)), 8,
                             qp.qmin - int(qp.zero_point) == -128)
        return name

    def op_add(self, node: Node, a: str, b: str) -> str:
        return self.clamped(self.emit("Add", [a, b], f"{node.name}.add"), node)

    def op_sub(self, node: Node, a: str, b: str) -> str:
        return self.emit("Sub", [a, b], node.name)

    def op_mul(self, node: Node, a: str, b: str) -> str:
        return self.emit("Mul", [a, b], node.name)

    def op_matmul(self, node: Node, a: str, b: str) -> str:
        return self.emit("MatMul", [a, b], node.name)

    def op_softmax(self, node: Node, x: str) -> str:
        return self.emit("Softmax", [x], node.name, axis=-1)

    def op_cat(self, node: Node, tensors: List[str]) -> str:
        return self.emit("Concat", list(tensors), node.name, axis=node.attrs["dim"] % self.small[node.name].dim())

    def op_sigmoid(self, node: Node, x: str) -> str:
        return self.emit("Sigmoid", [x], node.name)

    def op_tanh(self, node: Node, x: str) -> str:
        return self.emit("Tanh", [x], node.name)

    def op_hardswish(self, node: Node, x: str) -> str:
        return self.emit("HardSwish", [x], node.name)

    def op_leaky_relu(self, node: Node, x: str) -> str:
        return self.emit("LeakyRelu", [x], node.name, alpha=float(node.attrs["negative_slope"]))

    def op_pad(self, node: Node, x: str) -> str:
        from ..ops.pad import padding_per_dimension

        per_dimension = padding_per_dimension(node.attrs["pad"], self.small[node.refs()[0]].dim())
        pads = self.constant(f"{node.name}.pads", np.asarray([b for b, _ in per_dimension] +
                                                             [e for _, e in per_dimension], np.int64))
        return self.emit("Pad", [x, pads], node.name, mode="constant")  # real 0, the zero point's code

    def op_avg_pool2d(self, node: Node, x: str) -> str:
        from ..numerics import pooling

        input_hw = tuple(self.small[node.refs()[0]].shape[-2:])
        a = pooling.window_attrs(node.attrs, input_hw, node.path)
        if tuple(a["kernel_size"]) == input_hw and tuple(a["padding"]) == (0, 0):
            return self.emit("GlobalAveragePool", [x], node.name)
        pads, ceil_mode = self.pool_pads(node, a, (1, 1))
        return self.emit("AveragePool", [x], node.name, kernel_shape=list(a["kernel_size"]),
                         strides=list(a["stride"]), pads=pads, ceil_mode=ceil_mode,
                         count_include_pad=int(a["count_include_pad"]))

    def op_clamp(self, node: Node, x: str) -> str:
        qp = self.input_grid(node)
        bounds = self.model.target.activation_bounds(node.attrs.get("min"), node.attrs.get("max"), qp)
        return self.clip_real(x, node, bounds, qp, node.name)
