"""Target `tflite-micro`: TFLite for Microcontrollers' int8 kernels, the same .tflite file as target `tflite`.

TFLM compiles the reference kernels (tensorflow/lite/kernels/internal/reference/) with its own Prepare
functions (tensorflow/lite/micro/kernels/*_common.cc), so everything is target `tflite`'s rule except where
a micro kernel computes its constants or its loop otherwise. Read from tensorflow/tflite-micro at 90b983c
(August 2026; the tflite-micro 0.dev20261023 wheel is built from 8f6596d) and matched with 0 mismatched codes
against that wheel's interpreter (tests/test_tflite_micro.py). MBQM is MultiplyByQuantizedMultiplier (gemmlowp
double rounding: the wheel is not built with TFLITE_SINGLE_ROUNDING), QM QuantizeMultiplier, f() float32.

- linear:    FULLY_CONNECTED runs reference_integer_ops::FullyConnectedPerChannel with MBQM, like a conv
             (LiteRT's reference requantizes in double instead). Multiplier (fully_connected_common.cc):
             per channel QM(double(s_x) double(s_w) / double(s_y)); with one filter scale (one output
             channel: the file stores a scale per channel) GetQuantizedConvolutionMultipler's
             QM(double(f(s_x s_w)) / double(s_y)), the product rounded to float32 first.
- sub:       SUB (sub_common.cc, reference_ops::Sub / BroadcastQuantSubSlow) forms the ADD kernel's three
             ratios in float32, r = double(f(s / f(2 max(s_a, s_b)))) and double(f(f(2 max) / f(2^20 s_y))),
             and subtracts the scaled inputs: MBQM(a') - MBQM(b'), where LiteRT negates input 2's multiplier.
- mul:       MUL (mul_common.cc) takes QM(double(s_a) double(s_b) / double(s_y)); LiteRT's float32 quotient.
- prelu:     PRELU's two multipliers in double (numerics/prelu.py).
- sigmoid, tanh: LOGISTIC and TANH (logistic_common.cc, tanh.cc; reference_integer_ops::Logistic / Tanh) are
             gemmlowp fixed point, not LiteRT's float table: x = q - z; |x| at or past the input radius
             floor(15 * 2^27 / 2^shift) saturates, else gemmlowp::logistic / tanh (numerics/fixedpoint.py) of
             MBQM(x, m, shift) in Q4.27, with (m, shift) from frexp(double(s) * 2^27); out RoundingDivideByPOT
             by 23 (+ -128, LOGISTIC) or 24 (TANH).
- Everything else (QUANTIZE, CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, ADD, AVERAGE_POOL_2D, MAX_POOL_2D,
  CONCATENATION after QUANTIZE, HARD_SWISH, LEAKY_RELU, PADV2, ...) is target `tflite`'s rule: the micro
  Prepare functions compute the same constants (conv_common.cc and transpose_conv.cc call
  PopulateConvolutionQuantizationParams, add_common.cc forms its ratios in double, leaky_relu_common.cc
  and hard_swish_common.cc in float32 as LiteRT does).
TFLM registers no GELU kernel (the registry refuses gelu for this target), and its ELU is not emulated.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from . import fixedpoint
from .arithmetic import multiply_by_quantized_multiplier, quantize_multiplier
from .litert_activations import CODES
from .prelu import tflite_micro_prelu
from .target import channel_view
from .tflite import ADD_LEFT_SHIFT, TFLiteTarget, layer_multiplier

INPUT_INTEGER_BITS = 4  # LOGISTIC and TANH take their input in Q4.27 (kInputIntegerBits)
# (right shift of gemmlowp's Q0.31 result, output zero point) per activation: reference_integer_ops
FIXED_POINT_OUTPUTS = {"sigmoid": (31 - 8, -128), "tanh": (31 - 7, 0)}


def fully_connected_multiplier(input_scale: torch.Tensor, weight_scale: torch.Tensor, output_scale: torch.Tensor,
                               channels: int) -> torch.Tensor:
    """FULLY_CONNECTED's real multiplier (per output channel where the weight scale is), as
    CalculateOpDataFullyConnected forms it for a layer of `channels` outputs."""
    if channels > 1:
        return layer_multiplier(input_scale, weight_scale, output_scale)
    product = (input_scale.to(torch.float32) * weight_scale.to(torch.float32)).to(torch.float64)
    return product / output_scale.to(torch.float64)


def subtract_multipliers(a: QParams, b: QParams, out: QParams):
    """SUB's three (Q31 multiplier, shift) pairs, the ratios in float32 (micro/kernels/sub_common.cc)."""
    s_a, s_b, s_y = (grid.scale.to(torch.float32) for grid in (a, b, out))
    twice_max = 2 * torch.maximum(s_a, s_b)
    return (quantize_multiplier((s_a / twice_max).to(torch.float64)),
            quantize_multiplier((s_b / twice_max).to(torch.float64)),
            quantize_multiplier((twice_max / ((1 << ADD_LEFT_SHIFT) * s_y)).to(torch.float64)))


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
    summary = ("TFLite Micro int8 kernels: target tflite's rules, but FULLY_CONNECTED requantized like a conv and "
               "gemmlowp fixed-point LOGISTIC/TANH")
    prelu = staticmethod(tflite_micro_prelu)

    def accumulator_left_shift(self, op, input_qp, weight_scale, output_qp):
        # FULLY_CONNECTED uses MBQM, which shifts left for M >= 1, like every conv. Its multiplier depends on the
        # channel count; a weight scale shared by all channels does not tell it, so take the larger shift.
        if op != "linear":
            return super().accumulator_left_shift(op, input_qp, weight_scale, output_qp)
        counts = (1, 2) if weight_scale.numel() == 1 else (weight_scale.numel(),)
        shifts = [quantize_multiplier(fully_connected_multiplier(input_qp.scale, weight_scale, output_qp.scale,
                                                                 channels))[1].reshape(-1) for channels in counts]
        return torch.clamp(torch.stack(shifts).amax(0), min=0)

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        if op != "linear":
            return super().requantizer(op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim)
        zero_point = int(output_qp.zero_point)

        def requantize(acc: torch.Tensor) -> torch.Tensor:
            channels = acc.shape[channel_axis]
            m0, shift = quantize_multiplier(fully_connected_multiplier(input_qp.scale, weight_scale,
                                                                       output_qp.scale, channels))
            m0, shift = channel_view(m0, ndim, channel_axis), channel_view(shift, ndim, channel_axis)
            scaled = multiply_by_quantized_multiplier(acc.to(torch.int64), m0.to(acc.device), shift.to(acc.device))
            return scaled.add_(zero_point).clamp_(lo, hi)

        return requantize

    def subtract(self, qa, a, qb, b, out, lo, hi):
        (m_a, s_a), (m_b, s_b), (m_y, s_y) = subtract_multipliers(a, b, out)
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
