"""conv2d / conv_transpose2d / linear: exact accumulator plus bias, then the target's requantizer.

Both modes of the program call `layer_accumulator` and the target's `requantizer` with the same bias
handling (`bias_for_target`); they differ only in where the weight codes come from (the prepared model's
float weights through a straight-through estimator, or the IntegerModel's frozen int8 codes, whose
requantizer is built once in `prepare_integer_layer`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from ..errors import InvalidParameterError, OverflowRiskError, UnsupportedOpError
from ..graph import Node, QValue, fused_clamp_bounds
from ..qparams import FLOAT32_TINY, TORCH_DTYPES, QParams
from ..numerics.arithmetic import INT32_MAX
from ..numerics.engine_kernels import engine_layer
from ..numerics.fused_layer import fused_conv
from ..numerics.int8_accumulate import int8_accumulator
from ..numerics.accumulate import AccumulationPlan, ConvGeometry, accumulate, accumulator_bounds, plan_accumulation
from .surrogates import clamped, straight_through


class LayerKernels(NamedTuple):
    """What the IntegerModel runs one conv/linear node with (prepare_integer_layer)."""

    plan: AccumulationPlan
    geometry: ConvGeometry
    weight: torch.Tensor                # the weight codes as float32 (channels-last for a conv)
    bias: Optional[torch.Tensor]        # int32 bias codes added to the accumulator, or None
    requantize: Callable                # the target's requantizer
    int8: Optional[Callable]            # oneDNN's int8 accumulator where exact here (int8_accumulate)
    engine: Optional[object]            # the engine's own layer kernel where it is the target's rule
    fused: Optional[Callable]           # the native conv + requantization where it is (fused_layer)


@dataclass
class IntegerLayer:
    """The integer constants of one conv/linear node."""

    weight_codes: torch.Tensor          # int8, symmetric
    weight_scale: torch.Tensor          # float32, [out_channels] or scalar
    bias_codes: Optional[torch.Tensor]  # int32 at scale s_in * s_w (float32 if target.float_bias), or None


def max_abs_centered(qp: QParams) -> int:
    """The largest |q - z| a code on this grid can have."""
    zero_point = int(qp.zero_point)
    return max(zero_point - qp.qmin, qp.qmax - zero_point)


def layer_accumulator(plan: AccumulationPlan, geometry: ConvGeometry, x_codes: torch.Tensor, input_qp: QParams,
                      weight_codes: torch.Tensor, bias_codes: Optional[torch.Tensor]) -> torch.Tensor:
    """acc + bias as a float tensor of exact integers (differentiable in the codes)."""
    # One pass: int64 codes minus a float promote to float32 (exact for codes below 2^24).
    centered = (x_codes - float(input_qp.zero_point)).to(torch.float32)
    return accumulate(plan, geometry, centered, weight_codes, bias_codes)


def plan_layer(geometry: ConvGeometry, weight_codes: torch.Tensor, bias_codes: Optional[torch.Tensor],
               input_qp: QParams, target=None) -> AccumulationPlan:
    """How to compute this layer's accumulator: exactly, or as the target's runtime does when it differs."""
    plan = plan_accumulation(geometry, weight_codes, max_abs_centered(input_qp), bias_codes)
    if target is not None and target.layer_target(geometry).accumulation(geometry, tuple(weight_codes.shape)) \
            == "int16_pairs":
        return AccumulationPlan("int16_pairs", plan.bound, input_zero_point=int(input_qp.zero_point))
    return plan


def check_accumulator_range(where: str, weight_codes: torch.Tensor, bias_codes: Optional[torch.Tensor],
                            input_qp: QParams, left_shift: Optional[torch.Tensor] = None) -> None:
    """Raise if any input on the grid could take this layer's int32 accumulator out of range, also after the
    left shift (per output channel) a runtime's requantizer applies to it first (Target.accumulator_left_shift)."""
    bound = accumulator_bounds(weight_codes, max_abs_centered(input_qp), bias_codes)
    worst = int(torch.argmax(bound)) if bound.numel() else 0
    if bound.numel() and float(bound[worst]) > INT32_MAX:
        raise OverflowRiskError(
            f"layer {where}: output channel {worst} can reach |acc + bias| = {float(bound[worst]):.0f} > 2^31 - 1 "
            "for inputs on its grid, which overflows the int32 accumulator of every runtime; reduce the weights "
            "(weight decay), split the layer, or narrow the input range")
    if left_shift is None or not bool((left_shift > 0).any()):
        return
    bits = left_shift.reshape(-1).to(torch.float64).expand_as(bound)
    shifted = bound.to(torch.float64) * torch.exp2(bits)
    worst = int(torch.argmax(shifted))
    if float(shifted[worst]) > INT32_MAX:
        raise OverflowRiskError(
            f"layer {where}: output channel {worst}'s requantization multiplier s_in * s_w / s_out is >= 1, so the "
            f"runtime shifts the int32 accumulator left by {int(bits[worst])} bit(s) first, and |acc + bias| up to "
            f"{float(bound[worst]):.0f} overflows there; widen the output range (a larger output scale) or narrow "
            "the weights")


def check_layer_accumulator(where: str, target, op: str, weight_codes: torch.Tensor, bias,
                            input_qp: QParams, weight_scale: torch.Tensor, output_qp: QParams) -> None:
    """check_accumulator_range for a layer on `target`: the int32 bias codes where the target adds them to the
    accumulator (PyTorch's engines add a float bias after it), and the target's left shift before requantizing."""
    check_accumulator_range(where, weight_codes, None if target.float_bias else bias, input_qp,
                            target.accumulator_left_shift(op, input_qp, weight_scale, output_qp))


# The largest requantization multiplier s_in * s_w / s_out any target takes: TFLite applies M's left shift as
# `x * (1 << left_shift)` in int32 (kernels/internal/common.h), defined for shifts up to 30 (its single-rounding
# build saturates larger ones). Far below this bound every accumulator other than 0 already saturates the
# output (|acc| * M > 255), so only a broken scale (an exploded weight, a hand-set scale) reaches it.
MAX_LAYER_MULTIPLIER = 2.0**30


def check_requantization(where: str, weight_scale: torch.Tensor, input_qp: QParams, output_qp: QParams) -> None:
    """Raise InvalidParameterError, naming the layer and channel, for a weight scale or a layer multiplier that
    the targets' arithmetic cannot represent: not finite, not a positive normal float32, the product
    f(s_in * s_w) that PyTorch's engines divide the bias by not normal, or M = s_in * s_w / s_out too large."""
    scale = weight_scale.detach().cpu().to(torch.float32).reshape(-1)
    product = input_qp.scale.to(torch.float32) * scale
    multiplier = product.to(torch.float64) / output_qp.scale.to(torch.float64)
    valid_scale = torch.isfinite(scale) & (scale >= FLOAT32_TINY)
    valid_product = product >= FLOAT32_TINY
    valid_multiplier = multiplier < MAX_LAYER_MULTIPLIER
    if bool((valid_scale & valid_product & valid_multiplier).all()):  # one test in the common case
        return
    for valid, name, values, problem in (
            (valid_scale, "weight scale", scale, "is not a finite, positive, normal float32"),
            (valid_product, "s_in * s_w", product, "is not a normal float32"),
            (valid_multiplier, "requantization multiplier s_in * s_w / s_out", multiplier, "is not below 2^30")):
        if not bool(valid.all()):
            channel = int(torch.nonzero(~valid)[0])
            raise InvalidParameterError(
                f"layer {where}: the {name} of output channel {channel} ({float(values[channel]):.6g}) {problem} "
                f"(s_in {float(input_qp.scale):.6g}, s_out {float(output_qp.scale):.6g}); no target represents "
                "it: look for exploding weights (learning rate, weight decay) or a scale set by hand")


def check_bias_range(where: str, bias: torch.Tensor, input_qp: QParams, weight_scale: torch.Tensor) -> None:
    """Raise if a bias leaves int32 at scale s_in * s_w (for the layers whose runtime holds it as int32 codes,
    `Target.int32_bias`)."""
    codes = torch.round(bias.detach().cpu().to(torch.float64) / bias_scale(input_qp, weight_scale.detach().cpu()))
    if bool((codes.abs() > INT32_MAX).any()):
        channel = int(torch.argmax(codes.abs()))
        raise OverflowRiskError(f"layer {where}: the bias of output channel {channel} does not fit int32 at scale "
                                f"s_in * s_w (|bias code| {float(codes[channel].abs()):.0f})")


# ---------------------------------------------------------------------------------------------------------
# The operator in both modes
# ---------------------------------------------------------------------------------------------------------
# In the integer runtime's narrow mode the input codes may come in their grid's own dtype (ops/program.py): the
# int8 kernels shift them to uint8 as they are, layer_accumulator centers them in float32 (exact below 2^24),
# and the other kernels get int64. The output is stored in its grid's dtype.
READS_NARROW_CODES = True


def run(ctx, node: Node, x: QValue) -> QValue:
    if not ctx.fake:
        qp = ctx.mode.qparams[node.name]
        kernel = ctx.mode.model.layer_kernels[node.name]
        if callable(kernel):  # a runtime without an integer accumulator (Target.layer_kernel)
            return QValue(kernel(x.codes.to(torch.int64)), qp)
        plan, geometry, weight, bias, requantize, int8, engine, fused = kernel
        # The native conv with the target's requantization fused in (fused_layer), where it is the target's rule.
        codes = fused(x.codes) if fused is not None and ctx.narrow else None
        if codes is not None:
            return QValue(codes, qp)
        # The engine's own kernel where it is the target's rule (engine_kernels), accumulation and requantization.
        codes = engine(x.codes.to(torch.int64)) if engine is not None and x.codes.device.type == "cpu" else None
        if codes is not None:
            return QValue(codes, qp)
        # The same integers as layer_accumulator's, on int8 kernels (int8_accumulate), where they take the input.
        acc = int8(x.codes) if int8 is not None and x.codes.device.type == "cpu" else None
        if acc is None:
            acc = layer_accumulator(plan, geometry, x.codes, x.qparams, weight, bias)
        # acc is this call's own temporary: a requantizer that can, reuses it (float32_requantizer's consume)
        rule = getattr(requantize, "consume", requantize)
        return QValue(rule(acc, TORCH_DTYPES[qp.dtype] if ctx.narrow else torch.int64), qp)
    layer = ctx.mode.model.layers[node.name]
    if layer.training and layer.batch_norm is not None:
        return _batch_norm_training(ctx, node, layer, x)
    weight, bias = layer.folded()
    weight_scale = layer.weight_scale(weight)
    weight_codes = layer.weight_codes(weight, weight_scale)
    acc_bias, float_bias = bias_for_target(ctx.target, bias, x.qparams, weight_scale)
    plan = plan_layer(layer.geometry, weight_codes, acc_bias, x.qparams, ctx.target)
    acc = layer_accumulator(plan, layer.geometry, x.codes, x.qparams, weight_codes, acc_bias)
    real = acc.to(torch.float32) * _channel(bias_scale(x.qparams, weight_scale), layer.geometry, acc)
    if float_bias:
        real = real + _channel(bias, layer.geometry, acc)
    bounds = node.attrs.get("clamp") or (None, None)
    clamped_real = clamped(real, bounds)
    qp = ctx.mode.observe(node, clamped_real)
    check_requantization(layer.where, weight_scale, x.qparams, qp)
    lo, hi = fused_clamp_bounds(ctx.target, node, qp)
    requantize = ctx.target.layer_target(layer.geometry).requantizer(
        layer.geometry.kind, x.qparams, weight_scale, qp, lo, hi, layer.geometry.channel_axis, acc.dim(), **float_bias)
    return ctx.emit(requantize(acc.detach()), real, qp, lo, hi, bounds, clamped_real)


def bias_for_target(target, bias: Optional[torch.Tensor], input_qp: QParams, weight_scale: torch.Tensor):
    """(bias codes for the accumulator, {"bias": float bias} for the requantizer): int32 codes at s_in * s_w,
    or, for the targets that take a float bias (PyTorch's engines), the float bias itself. A trainable bias
    gets the gradient of its unrounded quotient (straight-through)."""
    if bias is None:
        return None, {}
    if target.float_bias:
        return None, {"bias": target.quantize_bias(bias, input_qp.scale, weight_scale)}
    codes = target.quantize_bias(bias, input_qp.scale, weight_scale)
    return straight_through(codes, bias.to(torch.float64) / bias_scale(input_qp, weight_scale)), {}


def prepare_integer_layer(target, node: Node, layer: IntegerLayer, input_qp: QParams, output_qp: QParams):
    """The IntegerModel's constants for one layer: accumulation plan, weights, int32 bias, requantizer, the
    int8 kernel that computes the same accumulator where it is provably exact on this CPU (or None), and the
    engine's own layer kernel where it is the target's rule (fbgemm, x86: engine_kernels; or None); or the
    target's own codes -> codes kernel where its runtime forms no integer accumulator."""
    geometry = ConvGeometry.from_dict(node.attrs["geometry"])
    lo, hi = fused_clamp_bounds(target, node, output_qp)
    kernel = target.layer_kernel(geometry, layer.weight_codes, layer.weight_scale, layer.bias_codes, input_qp,
                                 output_qp, lo, hi)
    if kernel is not None:
        return kernel
    check_requantization(node.path, layer.weight_scale, input_qp, output_qp)
    check_layer_accumulator(f"{node.name!r} ({node.path})", target, node.op, layer.weight_codes, layer.bias_codes,
                            input_qp, layer.weight_scale, output_qp)
    ndim = 4 if geometry.is_conv else 2
    # The stored bias is already what the target takes: int32 codes, or the float32 bias of PyTorch's engines.
    float_bias = {"bias": layer.bias_codes} if target.float_bias else {}
    acc_bias = None if target.float_bias else layer.bias_codes
    try:
        requantize = target.layer_target(geometry).requantizer(geometry.kind, input_qp, layer.weight_scale,
                                                               output_qp, lo, hi, geometry.channel_axis, ndim,
                                                               **float_bias)
    except UnsupportedOpError as error:  # a multiplier this target's runtime refuses (XNNPACK's range)
        raise UnsupportedOpError(f"layer {node.path}: {error}") from None
    weight = layer.weight_codes.to(torch.float32)
    if geometry.is_conv:
        weight = weight.contiguous(memory_format=torch.channels_last)
    plan = plan_layer(geometry, layer.weight_codes, acc_bias, input_qp, target)
    int8 = int8_accumulator(plan, geometry, layer.weight_codes, acc_bias, int(input_qp.zero_point), input_qp.qmin,
                            input_qp.qmax)
    engine = engine_layer(target, plan, geometry, layer.weight_codes, layer.weight_scale, float_bias.get("bias"),
                          input_qp, output_qp, lo, hi)
    fused = fused_conv(plan, geometry, layer.weight_codes, acc_bias, input_qp, output_qp, requantize)
    return LayerKernels(plan, geometry, weight, acc_bias, requantize, int8, engine, fused)


def _batch_norm_training(ctx, node: Node, layer, x: QValue) -> QValue:
    """Weights folded with the running statistics, output normalized with the batch's (torch.ao's scheme)."""
    weight, _ = layer.folded()
    weight_scale = layer.weight_scale(weight)
    weight_codes = layer.weight_codes(weight, weight_scale)
    plan = plan_layer(layer.geometry, weight_codes, None, x.qparams, ctx.target)
    acc = layer_accumulator(plan, layer.geometry, x.codes, x.qparams, weight_codes, None)
    factor = layer.batch_norm_factor()
    unfolded = acc.to(torch.float32) * _channel(bias_scale(x.qparams, weight_scale) / factor, layer.geometry, acc)
    if layer.module.bias is not None:
        unfolded = unfolded + _channel(layer.module.bias, layer.geometry, acc)
    real = layer.normalize(unfolded)
    bounds = node.attrs.get("clamp") or (None, None)
    clamped_real = clamped(real, bounds)
    qp = ctx.mode.observe(node, clamped_real)
    lo, hi = fused_clamp_bounds(ctx.target, node, qp)
    # Batch statistics make this forward an approximation of the deployed layer whatever the rounding,
    # so the codes use the cheapest one (round half even in float32); eval mode and freeze are exact.
    # One float32 quotient c / s serves both the codes and the straight-through grid mask's position c / s + z.
    zero_point = float(qp.zero_point)
    quotient = torch.div(clamped_real, float(qp.scale))
    position = torch.add(quotient, zero_point)
    codes = quotient.round_().add_(zero_point).clamp_(lo, hi)
    return ctx.emit(codes, real, qp, lo, hi, bounds, clamped_real, position)


def bias_scale(input_qp: QParams, weight_scale: torch.Tensor) -> torch.Tensor:
    return input_qp.scale.to(torch.float64) * weight_scale.to(torch.float64)


def _channel(values: torch.Tensor, geometry: ConvGeometry, like: torch.Tensor) -> torch.Tensor:
    """A per-channel float32 vector shaped to broadcast along `like`'s channel axis (the surrogate's dtype)."""
    values = values.to(device=like.device, dtype=torch.float32)
    if values.dim() == 0:
        return values
    shape = [1] * like.dim()
    shape[geometry.channel_axis] = -1
    return values.reshape(shape)
