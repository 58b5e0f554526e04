"""The prepared model: runs the integer program's graph with observers and straight-through gradients.

In eval mode (and in train mode for every layer without BatchNorm) each operator's forward value is exactly
what the integer runtime computes, because it calls the same accumulation and the same target functions.
Train mode with BatchNorm uses batch statistics, as BatchNorm must while it learns; `freeze` folds it.
"""
from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from ..errors import InputError
from ..graph import Executor, Graph, Node, QValue, output_structure
from ..numerics import pooling
from ..numerics.accumulate import ConvGeometry
from ..ops.layer import layer_accumulator, plan_layer
from ..qparams import QParams
from ..numerics import Target
from .layers import QATLayer
from .observers import ActivationObserver
from .ste import clamp, quantized_output, straight_through


class QATModel(nn.Module):
    """What `prepare_qat` returns: train it like any module, then `freeze` and `convert` it."""

    def __init__(self, graph: Graph, layers: Dict[str, QATLayer], target: Target, activation_dtype: str,
                 per_channel: bool):
        super().__init__()
        self.graph = graph
        self.target = target
        self.activation_dtype = activation_dtype
        self.per_channel = per_channel
        self.layers = nn.ModuleDict(layers)
        self.observers = nn.ModuleDict({n.name: ActivationObserver(activation_dtype, n.path)
                                        for n in graph.nodes if n.new_grid})

    @property
    def frozen(self) -> bool:
        return all(o.frozen for o in self.observers.values()) and all(l.frozen for l in self.layers.values())

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.graph.inputs):
            raise InputError(f"the model takes {len(self.graph.inputs)} input(s), got {len(inputs)}")
        result = _FakeExecutor(self).run(list(inputs))
        return output_structure(result, lambda v: self.target.dequantize(v.codes, v.qparams))

    def qparams(self, name: str) -> QParams:
        return self.observers[name].qparams()

    def extra_repr(self) -> str:
        return f"target={self.target.name}, activations={self.activation_dtype}, {len(self.graph.nodes)} nodes"


class _FakeExecutor(Executor):
    def __init__(self, model: QATModel):
        super().__init__(model.graph, model.target)
        self.model = model

    def observed_qparams(self, node: Node, real: torch.Tensor) -> QParams:
        observer = self.model.observers[node.name]
        observer.observe(real)
        return observer.qparams()

    def emit(self, codes: torch.Tensor, real: torch.Tensor, qp: QParams, lo: int, hi: int) -> QValue:
        """Codes from the integer program, with the gradient of the real value on qp's grid."""
        return QValue(quantized_output(codes, real, float(qp.scale), float(qp.zero_point), lo, hi), qp)

    # -- operators ------------------------------------------------------------------------------------------
    def op_input(self, node: Node, x: torch.Tensor) -> QValue:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise InputError(f"input '{node.name}' must be a float tensor, got "
                             f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        qp = self.observed_qparams(node, x)
        codes = self.target.quantize(x.detach(), qp)
        return self.emit(codes, x.to(torch.float32), qp, qp.qmin, qp.qmax)

    def op_conv2d(self, node: Node, x: QValue) -> QValue:
        layer: QATLayer = self.model.layers[node.name]
        if layer.training and layer.batch_norm is not None:
            return self.batch_norm_training(node, layer, x)
        weight, bias = layer.folded()
        weight_scale = layer.weight_scale(weight)
        weight_codes = layer.weight_codes(weight, weight_scale)
        bias_codes, float_bias = None, {}
        if bias is not None and self.target.float_bias:
            float_bias = {"bias": self.target.quantize_bias(bias, x.qparams.scale, weight_scale)}
        elif bias is not None:
            bias_codes = straight_through(self.target.quantize_bias(bias, x.qparams.scale, weight_scale),
                                          bias.to(torch.float64) / _bias_scale(x.qparams, weight_scale))
        plan = plan_layer(layer.geometry, weight_codes, bias_codes, x.qparams, self.target)
        acc = layer_accumulator(plan, layer.geometry, x.codes, x.qparams, weight_codes, bias_codes)
        real = acc.to(torch.float32) * _channel(_bias_scale(x.qparams, weight_scale), layer.geometry, acc)
        if float_bias:
            real = real + _channel(bias, layer.geometry, acc)
        real = self.clamp_real(node, real)
        qp = self.observed_qparams(node, real)
        lo, hi = self.output_bounds(node, qp)
        requantize = self.target.requantizer(layer.geometry.kind, x.qparams, weight_scale, qp, lo, hi,
                                             layer.geometry.channel_axis, acc.dim(), **float_bias)
        codes = requantize(acc.detach())
        return self.emit(codes, real, qp, lo, hi)

    op_linear = op_conv2d

    def batch_norm_training(self, node: Node, layer: QATLayer, x: QValue) -> QValue:
        """Weights folded with the running statistics, output normalized with the batch's (torch.ao's scheme)."""
        weight, _ = layer.folded()
        weight_scale = layer.weight_scale(weight)
        weight_codes = layer.weight_codes(weight, weight_scale)
        plan = plan_layer(layer.geometry, weight_codes, None, x.qparams, self.target)
        acc = layer_accumulator(plan, layer.geometry, x.codes, x.qparams, weight_codes, None)
        factor = layer.batch_norm_factor()
        unfolded = acc.to(torch.float32) * _channel(_bias_scale(x.qparams, weight_scale) / factor, layer.geometry, acc)
        if layer.module.bias is not None:
            unfolded = unfolded + _channel(layer.module.bias, layer.geometry, acc)
        real = self.clamp_real(node, layer.batch_norm(unfolded))
        qp = self.observed_qparams(node, real)
        lo, hi = self.output_bounds(node, qp)
        # Batch statistics make this forward an approximation of the deployed layer whatever the rounding,
        # so the codes use the cheapest one (round half even in float32); eval mode and freeze are exact.
        codes = (real.detach() / qp.scale.to(real.device)).round_().add_(float(qp.zero_point)).clamp_(lo, hi)
        return self.emit(codes, real, qp, lo, hi)

    def clamp_real(self, node: Node, real: torch.Tensor) -> torch.Tensor:
        low, high = node.attrs.get("clamp") or (None, None)
        if low is None and high is None:
            return real
        return clamp(real, low, high)

    def op_add(self, node: Node, a: QValue, b: QValue) -> QValue:
        real = self.clamp_real(node, self.target.dequantize(a.codes, a.qparams)
                               + self.target.dequantize(b.codes, b.qparams))
        qp = self.observed_qparams(node, real)
        lo, hi = self.output_bounds(node, qp)
        codes = self.target.add(_codes(a), a.qparams, _codes(b), b.qparams, qp, lo, hi)
        return self.emit(codes, real, qp, lo, hi)

    def op_cat(self, node: Node, tensors: List[QValue]) -> QValue:
        dim = node.attrs["dim"]
        real = torch.cat([self.target.dequantize(t.codes, t.qparams) for t in tensors], dim=dim)
        qp = self.observed_qparams(node, real)
        codes = self.target.concatenate([_codes(t) for t in tensors], [t.qparams for t in tensors], qp, dim)
        return self.emit(codes, real, qp, qp.qmin, qp.qmax)

    def op_hardswish(self, node: Node, x: QValue) -> QValue:
        real = torch.nn.functional.hardswish(self.target.dequantize(x.codes, x.qparams))
        qp = self.observed_qparams(node, real)
        codes = self.target.hardswish(_codes(x), x.qparams, qp)
        return self.emit(codes, real, qp, qp.qmin, qp.qmax)

    def op_max_pool2d(self, node: Node, x: QValue) -> QValue:
        return QValue(pooling.max_pool2d(x.codes, node.attrs), x.qparams)

    def op_avg_pool2d(self, node: Node, x: QValue) -> QValue:
        attrs = self.average_pool_attrs(node, x.codes.shape[-2:])
        codes = self.target.average_pool(_codes(x), x.qparams, attrs)
        centered = x.codes - float(x.qparams.zero_point)
        sums = pooling.average_sums(centered, attrs, 255)
        counts = pooling.average_counts(tuple(x.codes.shape[-2:]), tuple(sums.shape[-2:]), attrs, sums.device)
        surrogate = (sums / counts + float(x.qparams.zero_point)).to(torch.float32)
        return QValue(straight_through(codes, surrogate), x.qparams)

    def op_dropout(self, node: Node, x: QValue) -> QValue:
        if not self.model.training or node.attrs["p"] == 0:
            return x
        qp = x.qparams
        real = torch.nn.functional.dropout(self.target.dequantize(x.codes, qp), node.attrs["p"], True)
        codes = self.target.quantize(real.detach(), qp)
        return self.emit(codes, real, qp, qp.qmin, qp.qmax)


def _codes(value: QValue) -> torch.Tensor:
    return value.codes.detach().to(torch.int64)


def _bias_scale(input_qp: QParams, weight_scale: torch.Tensor) -> torch.Tensor:
    return input_qp.scale.to(torch.float64) * weight_scale.to(torch.float64)


def _channel(values: torch.Tensor, geometry: ConvGeometry, like: torch.Tensor) -> torch.Tensor:
    """A per-channel float32 vector shaped to broadcast along `like`'s channel axis (the surrogate's dtype)."""
    values = values.to(device=like.device, dtype=torch.float32)
    if values.dim() == 0:
        return values
    shape = [1] * like.dim()
    shape[geometry.channel_axis] = -1
    return values.reshape(shape)
