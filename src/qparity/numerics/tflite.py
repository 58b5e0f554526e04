"""Target `tflite`: TFLite's int8 reference kernels (what MCU/DSP kernel libraries follow; TFLite
Micro's kernels differ in a few places, target `tflite-micro`).

Sources (tensorflow/lite/kernels/internal/): reference/quantize.h (AffineQuantize, Requantize),
reference/integer_ops/conv.h and depthwise_conv.h (ConvPerChannel), reference/integer_ops/add.h,
reference/integer_ops/pooling.h (AveragePool), common.h (MultiplyByQuantizedMultiplier),
quantization_util.cc (QuantizeMultiplier), kernel_util.cc (PopulateConvolutionQuantizationParams,
CalculateActivationRangeQuantized). The shipped LiteRT wheel is not built with TFLITE_SINGLE_ROUNDING,
so every multiplier applies gemmlowp's double rounding.

- quantize:    q = clamp(z + std::round(x / s)), float32 division, ties away from zero
- conv:        M = double(s_x) * double(s_w) / double(s_y) as Q31 m0 and shift;
               q = clamp(z_y + MultiplyByQuantizedMultiplier(acc + bias, m0, shift));
               TRANSPOSE_CONV the same (reference/integer_ops/transpose_conv.h: int32 scatter, + bias, MBQM per
               channel; PopulateConvolutionQuantizationParams), for groups 1 and dilation 1 only
- linear:      the reference FULLY_CONNECTED requantizes in double since April 2025 (LiteRT commit
               921360770, reference/integer_ops/fully_connected.h): q = clamp(z_y + std::round(double(acc) * M)),
               one IEEE double product, ties away from zero
- add:         both inputs scaled by s / (2 max(s_a, s_b)) after a left shift of 20, summed, scaled by
               2 max(s_a, s_b) / (2^20 s_y); each step MultiplyByQuantizedMultiplier
- matmul:      BATCH_MATMUL (kernels/batch_matmul.cc EvalInt8Int8, reference_ops::BatchMatMul): the exact int32
               accumulator of (q_a - z_a)(q_b - z_b), M = double(s_a) * double(s_b) / double(s_y)
               (GetQuantizedConvolutionMultipler) as Q31 m0 and shift; q = clamp(z_y + MBQM(acc, m0, shift))
- softmax:     the reference SOFTMAX's gemmlowp fixed point (numerics/softmax.py), output grid 1/256, -128
- rescale:     Requantize: q = clamp(z_y + MultiplyByQuantizedMultiplier(q - z, M(s / s_y)))
- average:     on raw codes: (sum ± count / 2) / count with C division (ties away from zero)
- rsqrt:       RSQRT's Newton-Raphson inverse square root in gemmlowp fixed point (numerics/rsqrt.py)
- mean:        MEAN (kernels/reduce.cc PrepareMeanOrSum, reference/reduce.h QuantizedMeanOrSum; LiteRT 2.3 and
               main at f6745779): M = double(s_x) / double(s_y) as m0, e; k = min(floor(log2 n), 32, 31 + e);
               q = clamp(z_y + MBQM(sum(q - z), (m0 << k) / n, e - k)), the division C's (truncating)
"""
from __future__ import annotations

import math

import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from .arithmetic import (ShiftRequantizer, multiply_by_quantized_multiplier, quantize_multiplier, round_half_away,
                         truncating_div)
from . import resampling
from .compiled import ElementwiseRule
from .native_add import native_tflite_add
from .prelu import tflite_prelu
from .rsqrt import tflite_rsqrt_table
from .softmax import tflite_softmax
from .litert_activations import LiteRTActivations, tflite_leaky_relu_table, tflite_table
from .target import Target, channel_view, grid_views

ADD_LEFT_SHIFT = 20  # reference int8 ADD: data->left_shift = 20 for 8-bit outputs (kernels/add.cc)


def _multiplier(real: torch.Tensor):
    return quantize_multiplier(real.to(torch.float64))


def check_transpose_conv(geometry, target: str) -> None:
    """TFLite's TRANSPOSE_CONV has no groups and no dilation (TransposeConvOptions: padding, strides, activation)."""
    if geometry.kind == "conv_transpose2d" and (geometry.groups != 1 or tuple(geometry.dilation) != (1, 1)):
        raise UnsupportedOpError(
            f"a transposed conv with groups={geometry.groups}, dilation={tuple(geometry.dilation)} on target "
            f"{target!r}: LiteRT's TRANSPOSE_CONV has neither groups nor dilation; use groups=1, dilation=1, or "
            "another target (docs/ops.md lists the targets that run conv_transpose2d)")


def layer_multiplier(input_scale: torch.Tensor, weight_scale: torch.Tensor, output_scale: torch.Tensor):
    """The real multiplier of a conv/fully connected layer, in double (PopulateConvolutionQuantizationParams)."""
    return input_scale.to(torch.float64) * weight_scale.to(torch.float64) / output_scale.to(torch.float64)


def add_multipliers(a: QParams, b: QParams, out: QParams):
    """The ADD kernel's three (Q31 multiplier, shift) pairs: input a, input b, output (kernels/add.cc)."""
    twice_max = 2.0 * torch.maximum(a.scale, b.scale).to(torch.float64)
    return (_multiplier(a.scale.to(torch.float64) / twice_max), _multiplier(b.scale.to(torch.float64) / twice_max),
            _multiplier(twice_max / ((1 << ADD_LEFT_SHIFT) * out.scale.to(torch.float64))))


def rescale_multiplier(source: QParams, out: QParams):
    """Requantize's (Q31 multiplier, shift) from double(s_in) / double(s_out) (kernels/quantize.cc)."""
    return _multiplier(source.scale.to(torch.float64) / out.scale.to(torch.float64))


def mean_multiplier(count: int, source: QParams, out: QParams):
    """QuantizedMeanOrSum's (multiplier, shift) folding 1 / count into Q31(s_x / s_y) (reference/reduce.h)."""
    m0, exponent = (int(v) for v in rescale_multiplier(source, out))
    # shift <= 32 avoids overflow, shift <= 31 + e keeps MBQM's right shift within 31 (the kernel's comment)
    shift = min(count.bit_length() - 1, 32, 31 + exponent)
    return (m0 << shift) // count, exponent - shift


def mean_requantize(sums: torch.Tensor, count: int, source: QParams, out: QParams) -> torch.Tensor:
    """MultiplyByQuantizedMultiplier of the centered int32 sums by MEAN's multiplier (no zero point, no clamp)."""
    multiplier, shift = mean_multiplier(count, source, out)
    return multiply_by_quantized_multiplier(sums, torch.tensor(multiplier), torch.tensor(shift))


class TFLiteTarget(LiteRTActivations, Target):
    name = "tflite"
    file_format = ".tflite"
    summary = "TFLite int8 reference kernels: Q31 multiplier, gemmlowp double rounding"
    activation_dtypes = ("int8",)
    transcendental_table = staticmethod(tflite_table)  # LOGISTIC, TANH, GELU, ELU
    prelu = staticmethod(tflite_prelu)  # PRELU: the reference kernel (XNNPACK takes only float PRELU)
    leaky_relu_table = staticmethod(tflite_leaky_relu_table)
    softmax = staticmethod(tflite_softmax)  # the reference kernel: the one BUILTIN_REF runs

    def matmul_requantizer(self, a, b, out, lo, hi, ndim):
        return self.requantizer("matmul", a, b.scale, out, lo, hi, 0, ndim)  # conv's rule (no "linear" double path)

    def quantize_unclamped(self, x, qp):
        scale, zero_point = grid_views(qp, x)
        return round_half_away(x.to(torch.float32) / scale) + zero_point

    def accumulation(self, geometry, weight_shape):
        check_transpose_conv(geometry, self.name)
        return "exact"

    def accumulator_left_shift(self, op, input_qp, weight_scale, output_qp):
        # MultiplyByQuantizedMultiplier (kernels/internal/common.h) computes x * (1 << left_shift) in int32 for
        # M >= 1 before SaturatingRoundingDoublingHighMul: an accumulator that overflows there wraps (or worse:
        # signed overflow). FULLY_CONNECTED's reference multiplies in double instead.
        if op == "linear":
            return super().accumulator_left_shift(op, input_qp, weight_scale, output_qp)
        _, shift = _multiplier(layer_multiplier(input_qp.scale, weight_scale, output_qp.scale))
        return torch.clamp(shift.reshape(-1).to(torch.int64), min=0)

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        real = layer_multiplier(input_qp.scale, weight_scale, output_qp.scale)
        zero_point = int(output_qp.zero_point)
        if op == "linear":
            multiplier = channel_view(real, ndim, channel_axis)

            def requantize_in_double(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
                scaled = round_half_away(acc.to(torch.float64) * multiplier.to(acc.device)).to(torch.int64)
                return scaled.add_(zero_point).clamp_(lo, hi).to(dtype)

            return requantize_in_double
        m0, shift = _multiplier(real)
        # MultiplyByQuantizedMultiplier, the zero point and the clamp as one multiply-add and one shift
        return ShiftRequantizer.gemmlowp(channel_view(m0, ndim, channel_axis), channel_view(shift, ndim, channel_axis),
                                         zero_point, lo, hi)

    add_from_code_terms = True  # reference_integer_ops::AddElementwise: MBQM(q - z << 20) per input, MBQM of the sum

    def elementwise_add(self, shape_a, shape_b):
        return True

    def add(self, qa, a, qb, b, out, lo, hi):
        return self._add(qa, a, qb, b, out, lo, hi, sign=1)

    def subtract(self, qa, a, qb, b, out, lo, hi):
        # kernels/sub.cc: PrepareGeneralSubOp(..., op_sign=-1) negates the Q31 multiplier of input 2, and
        # EvalQuantized runs int8 SUB as reference_integer_ops::Add / BroadcastAdd4DSlow with it.
        return self._add(qa, a, qb, b, out, lo, hi, sign=-1)

    def add_rule(self, a, b, out, lo, hi):
        # `add` (the sign-1 `_add`) as a native loop on int8 codes (numerics/native_add.py); no compiled kernel: as
        # one, it measured no faster than the table within a model (docs/benchmarks.md, sixth round)
        (m_a, s_a), (m_b, s_b), (m_y, s_y) = add_multipliers(a, b, out)
        constants = (int(a.zero_point), int(b.zero_point), int(m_a), int(s_a), int(m_b), int(s_b), int(m_y), int(s_y),
                     int(out.zero_point), lo, hi)
        return ElementwiseRule(None, constants, native_tflite_add)

    def _add(self, qa, a, qb, b, out, lo, hi, sign):
        (m_a, s_a), (m_b, s_b), (m_y, s_y) = add_multipliers(a, b, out)
        m_b = m_b * sign
        shifted_a = (qa - int(a.zero_point)) * (1 << ADD_LEFT_SHIFT)
        shifted_b = (qb - int(b.zero_point)) * (1 << ADD_LEFT_SHIFT)
        raw_sum = (multiply_by_quantized_multiplier(shifted_a, m_a, s_a)
                   + multiply_by_quantized_multiplier(shifted_b, m_b, s_b))
        raw = multiply_by_quantized_multiplier(raw_sum, m_y, s_y)
        return raw.add_(int(out.zero_point)).clamp_(lo, hi)

    def multiply(self, qa, a, qb, b, out, lo, hi):
        # mul.cc Prepare: real = f(f(s_a * s_b) / s_y) computed in float, then QuantizeMultiplier(double(real));
        # reference_integer_ops::Mul / BroadcastMul6DSlow: z_y + MBQM((q_a - z_a) * (q_b - z_b)).
        real = (a.scale.to(torch.float32) * b.scale.to(torch.float32)) / out.scale.to(torch.float32)
        m0, shift = _multiplier(real)
        product = (qa - int(a.zero_point)) * (qb - int(b.zero_point))
        return multiply_by_quantized_multiplier(product, m0, shift).add_(int(out.zero_point)).clamp_(lo, hi)

    def rescale(self, q, source, out):
        if source.same_grid(out):
            return q  # the kernels copy tensors that already share scale and zero point
        m0, shift = rescale_multiplier(source, out)
        requantize = ShiftRequantizer.gemmlowp(m0, shift, int(out.zero_point), out.qmin, out.qmax)
        return requantize(q - int(source.zero_point))

    def bilinear(self, codes, qp, out_hw, align_corners):
        return resampling.tflite_bilinear(codes, out_hw, align_corners)
    def mean(self, q, source, out, dims, keepdim):
        count = math.prod(q.shape[d] for d in dims)
        sums = (q - int(source.zero_point)).sum(dims, keepdim=keepdim)
        return mean_requantize(sums, count, source, out).add_(int(out.zero_point)).clamp_(out.qmin, out.qmax)

    def activation_table(self, kind, source, out, attrs):
        if kind == "rsqrt":
            return tflite_rsqrt_table(source, out)
        return super().activation_table(kind, source, out, attrs)

    def average(self, sums, counts, qp):
        raw = sums + int(qp.zero_point) * counts
        half = counts // 2
        rounded = truncating_div(torch.where(raw > 0, raw + half, raw - half), counts)
        return torch.clamp(rounded, qp.qmin, qp.qmax)
