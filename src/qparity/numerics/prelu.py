"""PReLU: its learned slope's grid, and each runtime's integer rule for y = x (x >= 0) or a * x (x < 0).

The slope is a parameter, so the integer program holds it as int8 codes on a grid of its own, symmetric
(zero point 0), per tensor (TFLite's PRELU takes one scale and zero point for its alpha tensor):
s_a = f(1 / k) with k = floor(127 / max(1, max|a|)), codes rne(a * k) in [-127, 127]. The grid always holds
1.0 (as k codes) because PyTorch's qprelu multiplies the positive side by the weight grid's code for 1.0
(`qw_one`, saturated when 1.0 is off the grid). Slopes are per channel (dim 1) or one for the tensor.

Rules (x = q - z; the slope codes broadcast along the channel axis; sat clamps to the output dtype):
- exact:   q_y = sat(z_y + rhe(x s / s_y)) for x >= 0, sat(z_y + rhe(x a_q s s_a / s_y)) for x < 0, exactly.
- tflite, xnnpack (reference_ops::BroadcastPrelu4DSlow / Prelu with activations.cc PreluPrepare; LiteRT's
  XNNPACK delegate takes only float PRELU, so the default interpreter runs the builtin kernel, which calls
  the same reference functions): M1 = QM(f(s / s_y)), M2 = QM(f(f(s * s_a) / s_y)),
  q_y = sat(z_y + MBQM(x, M1)) for x >= 0, sat(z_y + MBQM(x * a_q, M2)) for x < 0.
- tflite-micro (micro/kernels/prelu_common.cc): the same with M1 = QM(s / s_y), M2 = QM(s s_a / s_y) in double.
- fbgemm, x86, qnnpack (QuantizedOpKernels.cpp qprelu_out_kernel, every engine; vector and scalar loops
  compute the same integers): p = max(x, 0) * k + min(x, 0) * a_q, M = f(f(s * s_a) * f(1 / s_y)),
  q_y = sat(z_y + rne(f(p * M))) (requantize_from_int).
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

from ..errors import InvalidParameterError
from ..qparams import QParams
from .arithmetic import ExactRatio, multiply_by_quantized_multiplier, quantize_multiplier, round_half_even_exact

SLOPE_QMAX = 127


def slope_grid(slopes: torch.Tensor, where: str) -> Tuple[int, float]:
    """(k, s_a = f(1 / k)): the slope grid, k = floor(127 / max(1, max|a|))."""
    largest = max(1.0, float(slopes.detach().abs().max()))
    if not math.isfinite(largest) or largest > SLOPE_QMAX:
        raise InvalidParameterError(f"prelu at {where}: slope magnitude {largest:g} is outside what an int8 slope grid "
                                 f"that holds 1.0 can express (at most {SLOPE_QMAX})")
    k = int(SLOPE_QMAX // largest)
    return k, float(np.float32(1.0 / k))


def slope_codes(slopes: torch.Tensor, k: int) -> torch.Tensor:
    """rne(a * k) (exact in float64), clamped to [-127, 127]; float64 codes."""
    return torch.clamp(torch.round(slopes.detach().to(torch.float64) * k), -SLOPE_QMAX, SLOPE_QMAX)


def _split(q: torch.Tensor, source: QParams):
    x = q - int(source.zero_point)
    return torch.clamp(x, min=0), torch.clamp(x, max=0)


def _scale(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def exact_prelu(q, source: QParams, slope: torch.Tensor, slope_scale: float, out: QParams) -> torch.Tensor:
    positive, negative = _split(q, source)
    zy = int(out.zero_point)
    terms = [(positive, ExactRatio.of_scales([source.scale], [out.scale])),
             (negative * slope, ExactRatio.of_scales([source.scale, _scale(slope_scale)], [out.scale]))]
    span = source.qmax - source.qmin
    return zy + round_half_even_exact(terms, out.qmin - zy, out.qmax - zy, (span, span * SLOPE_QMAX))


def tflite_prelu(q, source: QParams, slope: torch.Tensor, slope_scale: float, out: QParams) -> torch.Tensor:
    s, s_y = source.scale.to(torch.float32), out.scale.to(torch.float32)
    return _gemmlowp_prelu(q, source, slope, out, (s / s_y).to(torch.float64),
                           ((s * _scale(slope_scale)) / s_y).to(torch.float64))


def tflite_micro_prelu(q, source: QParams, slope: torch.Tensor, slope_scale: float, out: QParams) -> torch.Tensor:
    # TFLite Micro's PreluPrepare (micro/kernels/prelu_common.cc) forms both multipliers in double.
    s, s_y = source.scale.to(torch.float64), out.scale.to(torch.float64)
    return _gemmlowp_prelu(q, source, slope, out, s / s_y, s * _scale(slope_scale).to(torch.float64) / s_y)


def _gemmlowp_prelu(q, source: QParams, slope: torch.Tensor, out: QParams, positive_real: torch.Tensor,
                    negative_real: torch.Tensor) -> torch.Tensor:
    """The reference PRELU: z_y + MBQM(x, QM(positive_real)), or MBQM(x * a_q, QM(negative_real)) below zero."""
    positive, negative = _split(q, source)
    m1 = quantize_multiplier(positive_real)
    m2 = quantize_multiplier(negative_real)
    value = torch.where(positive > 0, multiply_by_quantized_multiplier(positive, *m1),
                        multiply_by_quantized_multiplier(negative * slope, *m2))
    return (value + int(out.zero_point)).clamp_(out.qmin, out.qmax)


def engine_prelu(q, source: QParams, slope: torch.Tensor, slope_scale: float, out: QParams) -> torch.Tensor:
    positive, negative = _split(q, source)
    one = round(1.0 / slope_scale)  # quantize_val(w_scale, 0, 1.0f): k, which the slope grid holds
    product = (positive * one + negative * slope).to(torch.float32)
    multiplier = (source.scale.to(torch.float32) * _scale(slope_scale)) * (1.0 / out.scale.to(torch.float32))
    value = torch.round(product * multiplier).to(torch.int64)
    return (value + int(out.zero_point)).clamp_(out.qmin, out.qmax)
