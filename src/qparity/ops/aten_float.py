"""aten_float: a value a PT2E quantizer leaves in float32, computed as the converted graph computes it.

torchao's X86InductorQuantizer quantizes an operator's output only where the next operator takes int8, and never a
model output, so a convert_pt2e graph holds float32 values between its QUANTIZE/DEQUANTIZE pairs (an adaptive
average pool feeding a flatten, the last linear). Such a node calls the graph's own ATen operator, with the
graph's own arguments, on the same float32 inputs: a quantized operand is dequantized by the target's one
dequantize rule (what the graph's dequantize_per_tensor computes), a float operand is the float node's value,
and a conv/linear's weight is its int8 codes dequantized by numerics/pt2e_reference.py's rule. Its result has no
codes and no grid; a `quantize` node puts it on one. Only target pt2e-reference reads it (from_pt2e.py).
"""
from __future__ import annotations

from typing import Dict

import torch

from ..errors import UnsupportedOpError
from ..graph import Node, QValue
from ..numerics.pt2e_reference import dequantized_weight
from .call import calling
from .registry import refuse_if_target_cannot_run

_aten = torch.ops.aten
# The ATen operators a float node may call, by their name in a graph (str of the OpOverload). A file naming any
# other call is refused at load (file_checks.py): the node runs code, so the list is closed.
FLOAT_CALLS: Dict[str, torch._ops.OpOverload] = {str(op): op for op in (
    _aten.conv2d.default, _aten.linear.default, _aten.relu.default, _aten.hardtanh.default, _aten.add.Tensor,
    _aten.mul.Tensor, _aten.mean.dim, _aten.max_pool2d.default, _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool2d.default, _aten.flatten.using_ints, _aten.view.default, _aten.reshape.default,
    _aten.permute.default, _aten.transpose.int, _aten.squeeze.dim, _aten.squeeze.dims, _aten.unsqueeze.default,
    _aten.slice.Tensor, _aten.cat.default, _aten.alias.default, _aten.clone.default,
)}
# Calls whose weight (argument 1) and bias (argument 2) are a layer's constants (IntegerModel.layers).
FLOAT_LAYERS = {"aten.conv2d.default": "conv2d", "aten.linear.default": "linear"}


def layer_kind(node: Node) -> str:
    """The layer kind (conv2d, linear) of a node holding weights: a layer node, or a float conv/linear."""
    return FLOAT_LAYERS[node.attrs["aten"]] if node.op == "aten_float" else node.op


def float_arguments(ctx, node: Node, args: tuple) -> list:
    """The call's arguments: quantized operands dequantized, a layer's weight and bias filled in."""
    args = [_dequantized(ctx, a) for a in args]
    if node.attrs["aten"] in FLOAT_LAYERS:
        args[1:3] = ctx.mode.model.float_layer_constants[node.name]
    return args


def float_layer_constants(layer) -> list:
    """[weight, bias] of a float conv/linear as the graph holds them: the int8 codes dequantized by
    pt2e_reference's rule, the float32 bias (built once, when the IntegerModel is)."""
    bias = None if layer.bias_codes is None else layer.bias_codes.to(torch.float32)
    return [dequantized_weight(layer.weight_codes, layer.weight_scale), bias]


def _dequantized(ctx, value):
    if isinstance(value, QValue):
        return ctx.dequantize(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_dequantized(ctx, v) for v in value)
    return value


def run(ctx, node, *args, **kwargs):
    if ctx.fake:
        raise UnsupportedOpError(f"aten_float at {node.path}: a float32 value read from a PT2E graph is not trained")
    refuse_if_target_cannot_run("aten_float", node.path, ctx.target.name)  # a graph handed to another target
    name = node.attrs["aten"]
    return calling(node, name, FLOAT_CALLS[name], *float_arguments(ctx, node, args),
                   **{k: _dequantized(ctx, v) for k, v in kwargs.items()})
