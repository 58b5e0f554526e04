"""Conv2d / Linear in the integer program: exact accumulator plus int32 bias, then the target's requantizer.

The fake-quant forward and the integer runtime both call `layer_accumulator` and the target's
`requantizer`; they differ only in where the weight codes come from (float weights through a
straight-through estimator, or frozen int8 codes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import OverflowRiskError
from ..qparams import QParams
from ..numerics.arithmetic import INT32_MAX
from ..numerics.accumulate import AccumulationPlan, ConvGeometry, accumulate, accumulator_bounds, plan_accumulation


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
    centered = x_codes.to(torch.float32) - float(input_qp.zero_point)
    return accumulate(plan, geometry, centered, weight_codes, bias_codes)


def plan_layer(geometry: ConvGeometry, weight_codes: torch.Tensor, bias_codes: Optional[torch.Tensor],
               input_qp: QParams, target=None) -> AccumulationPlan:
    """How to compute this layer's accumulator: exactly, or as the target's runtime does when it differs."""
    plan = plan_accumulation(geometry, weight_codes, max_abs_centered(input_qp), bias_codes)
    if target is not None and target.accumulation(geometry, tuple(weight_codes.shape)) == "int16_pairs":
        return AccumulationPlan("int16_pairs", plan.bound, input_zero_point=int(input_qp.zero_point))
    return plan


def check_accumulator_range(where: str, weight_codes: torch.Tensor, bias_codes: Optional[torch.Tensor],
                            input_qp: QParams) -> None:
    """Raise if any input on the grid could take this layer's int32 accumulator out of range."""
    bound = accumulator_bounds(weight_codes, max_abs_centered(input_qp), bias_codes)
    worst = int(torch.argmax(bound)) if bound.numel() else 0
    if bound.numel() and float(bound[worst]) > INT32_MAX:
        raise OverflowRiskError(
            f"layer {where}: output channel {worst} can reach |acc + bias| = {float(bound[worst]):.0f} > 2^31 - 1 "
            "for inputs on its grid, which overflows the int32 accumulator of every runtime; reduce the weights "
            "(weight decay), split the layer, or narrow the input range")
