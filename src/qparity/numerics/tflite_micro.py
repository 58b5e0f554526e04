"""Target `tflite-micro`: TFLite for Microcontrollers' int8 kernels, the same .tflite file as target `tflite`.

TFLM compiles the reference kernels (tensorflow/lite/kernels/internal/reference/) with its own Prepare
functions (tensorflow/lite/micro/kernels/*_common.cc), so everything is target `tflite`'s rule except where
a micro kernel computes its constants or its loop otherwise. Read from tensorflow/tflite-micro at 90b983c
(August 2026; the tflite-micro 0.dev20261023 wheel is built from 8f6596d) and matched with 0 mismatched codes
against that wheel's interpreter (tests/test_tflite_micro.py). MBQM is MultiplyByQuantizedMultiplier (gemmlowp
double rounding: the wheel is not built with TFLITE_SINGLE_ROUNDING), QM QuantizeMultiplier, f() float32.

- linear:    FULLY_CONNECTED runs reference_integer_ops::FullyConnectedPerChannel with MBQM and
             QM(double(s_x) double(s_w) / double(s_y)) per channel, like a conv (LiteRT's reference FC
             requantizes in double instead). A one-unit layer (one filter scale: per tensor) too: the wheel
             multiplies the scales in double, where the snapshot's GetQuantizedConvolutionMultipler rounds the
             product to float32 (measured: the float32 form misses 10 of 10 grids where the two differ).
- sub:       SUB (reference_ops::Sub / BroadcastQuantSubSlow) subtracts the scaled inputs, MBQM(a') - MBQM(b'),
             where LiteRT negates input 2's multiplier and adds; the ratios are ADD's, in double. (The snapshot's
             sub_common.cc rounds them to float32 first; the wheel does not: measured, the float32 form misses 14
             of 14 grids where the two differ, the double one none.)
- mul:       MUL (mul_common.cc) takes QM(double(s_a) double(s_b) / double(s_y)); LiteRT's float32 quotient.
- prelu:     PRELU's two multipliers in double (numerics/prelu.py).
- leaky_relu: LEAKY_RELU's two multipliers in double: double(s) double(alpha) / double(s_y) and
             double(s) / double(s_y), as tflite-micro commit 3bede66 wrote them. The snapshot's
             leaky_relu_common.cc rounds both to float32 first (the commit was reverted in 2023), but the wheel
             computes in double: measured, the float32 form misses 40 of 40 tie-prone grids, the double one none.
- hardswish: HARD_SWISH's two multipliers in double, double(s / 128) / double(s_y) and / double(3 / 32768); the
             snapshot's hard_swish_common.cc (and LiteRT) round them to float32 (measured: 8 of 8 grids where the
             two differ follow double).
- sigmoid, tanh: LOGISTIC and TANH (logistic_common.cc, tanh.cc; reference_integer_ops::Logistic / Tanh) are
             gemmlowp fixed point, not LiteRT's float table (the two agreed on every code of 200 random
             grids, but only the fixed point is TFLM's definition): x = q - z; |x| at or past the input radius
             floor(15 * 2^27 / 2^shift) saturates, else gemmlowp::logistic / tanh (numerics/fixedpoint.py) of
             MBQM(x, m, shift) in Q4.27, with (m, shift) from frexp(double(s) * 2^27); out RoundingDivideByPOT
             by 23 (+ -128, LOGISTIC) or 24 (TANH).
- Everything else (QUANTIZE, CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, ADD, AVERAGE_POOL_2D, MAX_POOL_2D,
  CONCATENATION after QUANTIZE, PADV2, ...) is target `tflite`'s rule: the micro Prepare functions compute the
  same constants (conv_common.cc and transpose_conv.cc call PopulateConvolutionQuantizationParams,
  add_common.cc and quantize_common.cc form their ratios in double; QUANTIZE divides in float32, measured).
The wheel is newer than the snapshot, and where the two disagree this file follows the wheel, which the tests
measure; each such place says so.
TFLM registers no GELU kernel (the registry refuses gelu for this target), and its ELU is not emulated.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from . import fixedpoint
from .arithmetic import multiply_by_quantized_multiplier, quantize_multiplier
from .litert_activations import (CODES, HARD_SWISH_HIRES, HARD_SWISH_RELUISH_SCALE, gemmlowp_hard_swish_table,
                                 gemmlowp_leaky_relu_table)
from .prelu import tflite_micro_prelu
from .tflite import ADD_LEFT_SHIFT, TFLiteTarget, add_multipliers

CONV_RULE = "conv2d"  # FULLY_CONNECTED requantizes as target tflite's convs do (MBQM, double multiplier)
INPUT_INTEGER_BITS = 4  # LOGISTIC and TANH take their input in Q4.27 (kInputIntegerBits)
# (right shift of gemmlowp's Q0.31 result, output zero point) per activation: reference_integer_ops
FIXED_POINT_OUTPUTS = {"sigmoid": (31 - 8, -128), "tanh": (31 - 7, 0)}


def _multiply_by_quantized_multiplier(x: int, m0: int, shift: int) -> int:
    """MBQM on one Python int."""
    scaled = fixedpoint.srdhm(x * (1 << max(shift, 0)), m0)
    return fixedpoint.rounding_divide_by_pot(scaled, max(-shift, 0))


def fixed_point_table(kind: str, source: QParams) -> torch.Tensor:
    """reference_integer_ops::Logistic or Tanh of every int8 code, with TFLM's Prepare constants."""
    fraction, left_shift = math.frexp(float(source.scale) * float(1 << (31 - INPUT_INTEGER_BITS)))
    if left_shift < 0:  # CalculateInputRadius would shift by a negative count
        raise UnsupportedOpError(f"{kind} on input scale {float(source.scale):.6g}: TFLite Micro's int8 kernel "
                                 "needs an input scale of at least 2^-28; widen the input range")
    multiplier = int(fraction * 2**31)  # exact: a float32 scale has 24 significant bits
    radius = math.floor(((1 << INPUT_INTEGER_BITS) - 1) * 2.0 ** (31 - INPUT_INTEGER_BITS) / 2.0**left_shift)
    function = {"sigmoid": fixedpoint.logistic, "tanh": fixedpoint.tanh}[kind]
    right_shift, zero_point = FIXED_POINT_OUTPUTS[kind]
    table = []
    for x in (CODES - int(source.zero_point)).tolist():
        if abs(x) >= radius:
            table.append(127 if x > 0 else -128)
            continue
        q4 = _multiply_by_quantized_multiplier(x, multiplier, left_shift)
        code = fixedpoint.rounding_divide_by_pot(function(q4, INPUT_INTEGER_BITS), right_shift) + zero_point
        table.append(min(max(code, -128), 127))
    return torch.tensor(table, dtype=torch.int64)


class TFLiteMicroTarget(TFLiteTarget):
    name = "tflite-micro"
    summary = ("TFLite Micro int8 kernels: target tflite's rules, but FULLY_CONNECTED requantized like a conv, "
               "gemmlowp fixed-point LOGISTIC/TANH, multipliers in double")
    prelu = staticmethod(tflite_micro_prelu)

    @staticmethod
    def leaky_relu_table(source: QParams, out: QParams, alpha: float) -> torch.Tensor:
        s, s_y = float(source.scale), float(out.scale)
        return gemmlowp_leaky_relu_table(source, out, s / s_y, s * float(np.float32(alpha)) / s_y)

    def hardswish(self, q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
        hires = float(HARD_SWISH_HIRES) * float(source.scale)  # exact: a power of two times a float32
        table = gemmlowp_hard_swish_table(source, out, hires / float(out.scale),
                                          hires / float(HARD_SWISH_RELUISH_SCALE))
        return table.to(q.device)[q - source.qmin]

    def accumulator_left_shift(self, op, input_qp, weight_scale, output_qp):
        return super().accumulator_left_shift(CONV_RULE, input_qp, weight_scale, output_qp)

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        return super().requantizer(CONV_RULE, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim)

    def subtract(self, qa, a, qb, b, out, lo, hi):
        (m_a, s_a), (m_b, s_b), (m_y, s_y) = add_multipliers(a, b, out)
        scaled_a = multiply_by_quantized_multiplier((qa - int(a.zero_point)) * (1 << ADD_LEFT_SHIFT), m_a, s_a)
        scaled_b = multiply_by_quantized_multiplier((qb - int(b.zero_point)) * (1 << ADD_LEFT_SHIFT), m_b, s_b)
        raw = multiply_by_quantized_multiplier(scaled_a - scaled_b, m_y, s_y)
        return raw.add_(int(out.zero_point)).clamp_(lo, hi)

    def multiply(self, qa, a, qb, b, out, lo, hi):
        real = a.scale.to(torch.float64) * b.scale.to(torch.float64) / out.scale.to(torch.float64)
        m0, shift = quantize_multiplier(real)
        product = (qa - int(a.zero_point)) * (qb - int(b.zero_point))
        return multiply_by_quantized_multiplier(product, m0, shift).add_(int(out.zero_point)).clamp_(lo, hi)

    def activation_table(self, kind, source, out, attrs):
        if kind in FIXED_POINT_OUTPUTS:
            return fixed_point_table(kind, source)
        if kind in ("gelu", "elu"):  # the registry refuses both at prepare_qat
            raise UnsupportedOpError(f"{kind} is not emulated for target {self.name!r}")
        return super().activation_table(kind, source, out, attrs)
