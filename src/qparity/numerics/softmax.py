"""Softmax over the last dimension of 8-bit codes, as each target's runtime computes it.

Every rule sees one row of codes q_1..q_D on the input grid (s, z) and returns codes on the output grid
(s_y, z_y); only the differences q_j - max(q) matter (softmax is shift invariant).

- exact:        q_y = clamp(z_y + rhe(y_i / s_y)), y_i = 1 / sum_j exp((q_j - q_i) s), correctly rounded. y_i is
                rational only when every code of the row is equal (y_i = 1 / D, rounded with Fractions): otherwise
                1 + sum_{j != i} exp(r_j) with rationals r_j not all 0 is transcendental (Lindemann-Weierstrass),
                so y_i / s_y is never a tie and a float64 estimate farther than its error bound from every
                half-integer decides the rounding; the rest are redone with mpmath until the interval clears it.
- tflite:       LiteRT's reference SOFTMAX (tflite/kernels/internal/reference/softmax.h, the int8 kernel the
                BUILTIN_REF resolver runs; activations.cc SoftmaxPrepare kReference): the input difference
                scaled by a Q31 multiplier of s * 2^26 (PreprocessSoftmaxScaling, beta = 1) to Q5.26, gemmlowp's
                exp_on_negative_values to Q0.31, the sum in Q12.19, GetReciprocal's Newton-Raphson
                1 / (1 + x), then RoundingDivideByPOT to the output grid 1/256, -128 (which SoftmaxPrepare
                requires). Differences below diff_min = -floor(31 * 2^26 / 2^left_shift) give -128.
- xnnpack:      LiteRT's default interpreter runs int8 SOFTMAX with its optimized built-in kernel (the XNNPACK
                delegate takes only float SOFTMAX, xnnpack_delegate.cc VisitSoftmaxNode): optimized_ops::Softmax
                (kernels/internal/optimized/optimized_ops.h) on PopulateSoftmaxLookupTable's e(d) = expf(f(-s * -d)),
                the row sum in float32 from the first element, q_y = rha(f(e * f(1 / f(sum * s_y)))) + z_y (std::round),
                clamped; output grid 1/256, -128.
- onnxruntime:  com.microsoft QLinearSoftmax (contrib_ops/cpu/quantization/qlinear_softmax.cc, ORT 1.32): a
                float32 table e(v) = f(exp((v + b) s)) in double for v = q - max(q) in [-255, 0], with
                b = max(0, log(f(FLT_MAX / D)) - 5) / s; the row sum accumulated in float32 from the first
                element; then q_y = rne(f(f(e * Y) / sum)) + z_y with Y = floor(f(1 / s_y)), stored through the
                kernel's casts (uint8: min(., 255); int8: 255 above 255, then wrapped to int8), which the
                output grids qparity uses for it never reach.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from fractions import Fraction

import mpmath
import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from .arithmetic import (quantize_multiplier, round_half_away, rounding_divide_by_pot,
                         saturating_rounding_doubling_high_mul)

INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


def row_differences(q: torch.Tensor) -> torch.Tensor:
    """q_j - max(q) along the last dimension (every value <= 0)."""
    return q - q.amax(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------------
# exact
# ---------------------------------------------------------------------------------------------------------
def exact_softmax(q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
    d = row_differences(q)
    s, s_y = float(source.scale), float(out.scale)  # float32 values, exact in float64
    e = torch.exp(d.to(torch.float64) * s)  # d * s is exact: |d| < 2^9, s has 24 significant bits
    t = e / e.sum(dim=-1, keepdim=True) / s_y
    # exp, the sum of D terms, two divisions: relative error below (D + 8) 2^-52; 2^-60 covers exp's underflow.
    error_bound = t * ((d.shape[-1] + 8) * 2.0**-50) + 2.0**-60
    rounded = torch.round(t)
    near_tie = (t - torch.floor(t) - 0.5).abs_() <= error_bound
    if bool(near_tie.any()):
        rows = d.reshape(-1, d.shape[-1])
        flat = rounded.reshape(-1, d.shape[-1])
        for r, c in torch.nonzero(near_tie.reshape(flat.shape)).tolist():
            flat[r, c] = _exact_code_offset(rows[r].tolist(), c, Fraction(s), Fraction(s_y))
        rounded = flat.reshape(rounded.shape)
    zero_point = int(out.zero_point)
    return rounded.to(torch.int64).add_(zero_point).clamp_(out.qmin, out.qmax)


def _exact_code_offset(row, i: int, s: Fraction, s_y: Fraction) -> int:
    """rhe(y_i / s_y) for one element, exactly: Fractions for a constant row, else mpmath with a proven margin."""
    if all(v == row[i] for v in row):
        return round(Fraction(1, len(row)) / s_y)  # Python rounds a Fraction half to even
    bits = 128
    while bits <= 4096:
        with mpmath.workprec(bits):
            total = mpmath.fsum(mpmath.exp(mpmath.mpf(v - row[i]) * mpmath.mpf(s.numerator) / s.denominator)
                                for v in row)
            t = mpmath.mpf(s_y.denominator) / (total * s_y.numerator)
            nearest_half = mpmath.floor(t) + mpmath.mpf(0.5)
            if abs(t - nearest_half) > abs(t) * mpmath.mpf(2) ** (16 - bits) * len(row):
                return int(mpmath.floor(t)) + (1 if t > nearest_half else 0)
        bits *= 2
    raise UnsupportedOpError("softmax: an output lies within 2^-4000 of a rounding tie; qparity cannot decide it")


# ---------------------------------------------------------------------------------------------------------
# tflite: gemmlowp fixed point (fixedpoint/fixedpoint.h), int32 values held in int64 tensors
# ---------------------------------------------------------------------------------------------------------
def _srdhm(a: torch.Tensor, b) -> torch.Tensor:
    return saturating_rounding_doubling_high_mul(a, torch.as_tensor(b, dtype=torch.int64))


def _saturating_shift_left(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """SaturatingRoundingMultiplyByPOT<exponent > 0>: x * 2^exponent saturated to int32."""
    threshold = (1 << (31 - exponent)) - 1
    shifted = x * (1 << exponent)
    shifted = torch.where(x > threshold, torch.full_like(x, INT32_MAX), shifted)
    return torch.where(x < -threshold, torch.full_like(x, INT32_MIN), shifted)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: torch.Tensor) -> torch.Tensor:
    """Q0.31 in, Q0.31 out: the Taylor expansion around -1/8."""
    constant_term, one_third = 1895147668, 715827883  # exp(-1/8), 1/3 in Q0.31
    x = a + (1 << 28)
    x2 = _srdhm(x, x)
    x3 = _srdhm(x2, x)
    x4 = _srdhm(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    polynomial = rounding_divide_by_pot(_srdhm(x4_over_4 + x3, one_third) + x2, 1)
    return constant_term + _srdhm(torch.full_like(x, constant_term), x + polynomial)


# exp(-2^k) in Q0.31 for k = -2..4, the barrel shifter of exp_on_negative_values
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401),
               (4, 242))


def _exp_on_negative_values(a: torch.Tensor) -> torch.Tensor:
    """gemmlowp exp_on_negative_values for FixedPoint<int32, 5> (Q5.26 in, Q0.31 out)."""
    fractional_bits, one_quarter = 26, 1 << 24
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        _saturating_shift_left(a_mod_quarter_minus_one_quarter, 5))  # Rescale<0> of Q5.26
    remainder = a_mod_quarter_minus_one_quarter - a
    for exponent, multiplier in _EXP_BARREL:
        bit = (remainder & (1 << (fractional_bits + exponent))) != 0
        result = torch.where(bit, _srdhm(result, multiplier), result)
    return torch.where(a == 0, torch.full_like(result, INT32_MAX), result)


def _one_over_one_plus_x_for_x_in_0_1(a: torch.Tensor) -> torch.Tensor:
    """Q0.31 in and out: Newton-Raphson on the half denominator, three iterations in Q2.29."""
    total = a + INT32_MAX
    half_denominator = torch.div(total + torch.where(total >= 0, 1, -1), 2, rounding_mode="trunc")  # RoundingHalfSum
    x = 1515870810 + _srdhm(half_denominator, -1010580540)  # 48/17 - 32/17 d in Q2.29
    for _ in range(3):
        one_minus_half_denominator_times_x = (1 << 29) - _srdhm(half_denominator, x)
        x = x + _saturating_shift_left(_srdhm(x, one_minus_half_denominator_times_x), 2)  # Rescale<2> of Q4.27
    return _saturating_shift_left(x, 1)  # ExactMulByPot<-1> then Rescale<0>


def _reciprocal(sum_of_exps: torch.Tensor, integer_bits: int):
    """tflite GetReciprocal (kernels/internal/common.h): (Q0.31 1 / (1 + x), num_bits_over_unit)."""
    _, exponent = torch.frexp(sum_of_exps.to(torch.float64))  # sum = m 2^exponent, m in [0.5, 1): exact here
    headroom_plus_one = 32 - exponent.to(torch.int64)  # CountLeadingZeros of the positive int32
    shifted_sum_minus_one = (sum_of_exps << headroom_plus_one) - (1 << 31)
    return _one_over_one_plus_x_for_x_in_0_1(shifted_sum_minus_one), integer_bits - headroom_plus_one


def tflite_softmax_parameters(source: QParams):
    """SoftmaxPrepare (kReference): PreprocessSoftmaxScaling(beta = 1, s, 5) and CalculateInputRadius(5, shift)."""
    real = min(float(source.scale) * (1 << 26), float((1 << 31) - 1))
    multiplier, left_shift = (int(v) for v in quantize_multiplier(torch.tensor(real, dtype=torch.float64)))
    diff_min = -math.floor(31.0 * (1 << 26) / (1 << left_shift))
    return multiplier, left_shift, diff_min


def tflite_softmax(q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
    """reference_ops::Softmax<int8_t, int8_t> (output grid 1/256, -128)."""
    multiplier, left_shift, diff_min = tflite_softmax_parameters(source)
    d = row_differences(q)
    kept = d >= diff_min
    scaled = _srdhm(d * (1 << left_shift), multiplier)  # MultiplyByQuantizedMultiplierGreaterThanOne, Q5.26
    exps = _exp_on_negative_values(torch.where(kept, scaled, torch.zeros_like(scaled)))
    sum_of_exps = torch.where(kept, rounding_divide_by_pot(exps, 12), torch.zeros_like(exps)).sum(-1, keepdim=True)
    shifted_scale, num_bits_over_unit = _reciprocal(sum_of_exps, 12)
    exponent = num_bits_over_unit + 31 - 8
    unsaturated = rounding_divide_by_pot(_srdhm(shifted_scale, exps), exponent)
    codes = (unsaturated - 128).clamp_(-128, 127)
    return torch.where(kept, codes, torch.full_like(codes, -128))


# ---------------------------------------------------------------------------------------------------------
# The C library the runtimes' kernels call (glibc on Linux)
# ---------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _libm(name: str, c_type=ctypes.c_double):
    library = ctypes.CDLL(ctypes.util.find_library("m") or ctypes.util.find_library("c"))
    function = getattr(library, name)
    function.restype, function.argtypes = c_type, [c_type]
    return function


def _row_sum_float32(e: torch.Tensor) -> torch.Tensor:
    """sum over the last dimension in float32, element by element from the first (the kernels' loops)."""
    total = torch.zeros_like(e[..., :1])
    for j in range(e.shape[-1]):
        total = total + e[..., j:j + 1]
    return total


# ---------------------------------------------------------------------------------------------------------
# xnnpack: LiteRT's optimized built-in int8 SOFTMAX
# ---------------------------------------------------------------------------------------------------------
def litert_optimized_softmax(q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
    expf = _libm("expf", ctypes.c_float)
    scale = -np.float32(source.scale)  # PopulateSoftmaxLookupTable: -input_scale * beta, beta = 1
    table = torch.tensor([expf(float(scale * np.float32(v))) for v in range(256)], dtype=torch.float32)
    e = table[-row_differences(q)]
    total = _row_sum_float32(e)
    inverse = torch.tensor(1.0, dtype=torch.float32) / (total * out.scale.to(torch.float32))
    codes = round_half_away(e * inverse).to(torch.int64) + int(out.zero_point)
    return codes.clamp_(out.qmin, out.qmax)


# ---------------------------------------------------------------------------------------------------------
# onnxruntime: QLinearSoftmax
# ---------------------------------------------------------------------------------------------------------


def onnxruntime_exp_table(scale: float, depth: int) -> torch.Tensor:
    """QlinearBuildLookupTableUint32's float32 e(v) for v = q - max(q) = -255..0 (index v + 255)."""
    exp, log = _libm("exp"), _libm("log")
    largest_over_depth = float(np.float32(np.finfo(np.float32).max) / np.float32(depth))
    bit_shift = max(0.0, log(largest_over_depth) - 5.0) / scale
    values = [np.float32(exp((float(i) - 255 + bit_shift) * scale)) for i in range(256)]
    return torch.tensor(np.asarray(values, np.float32))


def onnxruntime_softmax(q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
    if q.shape[-1] == 1:
        # The table is sized so that the row sum stays below FLT_MAX / e^5; for one element e * Y (Y >= 254)
        # still overflows float32 and the kernel converts infinity to an integer (undefined behavior).
        raise UnsupportedOpError("softmax over a dimension of size 1 on target 'onnxruntime': QLinearSoftmax "
                                 "overflows float32 there (e * floor(1 / s_y) > FLT_MAX); the result is the constant "
                                 "1, so drop the softmax")
    table = onnxruntime_exp_table(float(source.scale), q.shape[-1])
    e = table[row_differences(q) + 255]
    total = _row_sum_float32(e)
    y_scale = torch.floor(torch.tensor(1.0, dtype=torch.float32) / out.scale.to(torch.float32))
    stored = torch.round((e * y_scale) / total).to(torch.int64) + int(out.zero_point)
    stored = torch.where(stored > 255, torch.full_like(stored, 255), stored)
    if out.dtype == "uint8":
        return stored
    return (stored + 128).remainder_(256) - 128  # static_cast<int8_t>


ONNXRUNTIME_GRIDS = {"uint8": QParams(1.0 / 256.0, 0, "uint8"), "int8": QParams(1.0 / 255.0, -128, "int8")}
