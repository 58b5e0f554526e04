"""Arithmetic primitives the target semantics are written in.

Three families, each defined once and used by every target that needs it:

1. Exact rational rounding (`ExactRatio`, `round_half_even_exact`): round-half-even of `sum(k_i * c_i)`
   where the k_i are integers and the c_i are exact rationals built from float32 scales. No float error:
   a float64 estimate decides every element whose distance to a rounding tie exceeds a proven error bound;
   the rest (ties and near-ties) are decided with Python integers.
2. gemmlowp fixed point (`quantize_multiplier`, `saturating_rounding_doubling_high_mul`,
   `rounding_divide_by_pot`, `multiply_by_quantized_multiplier`), as TFLite's reference kernels use it:
   tensorflow/lite/kernels/internal/common.h and quantization_util.cc, gemmlowp/fixedpoint/fixedpoint.h.
3. IEEE float32 emulation where a runtime computes in float (`round_half_away`, `fma_f32`).

All integer tensors are int64; code tensors never exceed int32 in magnitude, so int64 products of an
int32 and a Q31 multiplier (< 2^62) never overflow.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


# ---------------------------------------------------------------------------------------------------------
# 1. Exact rational rounding
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ExactRatio:
    """Exact rational coefficients (one per element of a broadcastable shape) with a float64 estimate."""

    numerator: np.ndarray    # object array of Python ints
    denominator: np.ndarray  # object array of positive Python ints
    estimate: torch.Tensor   # float64, same shape

    @classmethod
    def from_fractions(cls, fractions: np.ndarray) -> "ExactRatio":
        fractions = np.asarray(fractions, dtype=object)
        num = np.vectorize(lambda f: f.numerator, otypes=[object])(fractions) if fractions.size else fractions
        den = np.vectorize(lambda f: f.denominator, otypes=[object])(fractions) if fractions.size else fractions
        estimate = torch.tensor(np.vectorize(float, otypes=[np.float64])(fractions), dtype=torch.float64)
        return cls(num.reshape(fractions.shape), den.reshape(fractions.shape), estimate.reshape(fractions.shape))

    @classmethod
    def of_scales(cls, numerators: Sequence[torch.Tensor], denominators: Sequence[torch.Tensor] = (),
                  divisor: int = 1) -> "ExactRatio":
        """prod(numerators) / (prod(denominators) * divisor), each a float32 tensor taken at its exact value."""
        tensors = [t.detach().cpu().to(torch.float32) for t in (*numerators, *denominators)]
        shape = torch.broadcast_shapes(*(t.shape for t in tensors)) if tensors else ()
        result = np.full(shape, Fraction(1, divisor), dtype=object)
        for t in numerators:
            result = result * _fractions(t, shape)
        for t in denominators:
            result = result / _fractions(t, shape)
        return cls.from_fractions(result)

    def reshape(self, *shape: int) -> "ExactRatio":
        return ExactRatio(self.numerator.reshape(shape), self.denominator.reshape(shape),
                          self.estimate.reshape(shape))


def _fractions(t: torch.Tensor, shape) -> np.ndarray:
    values = np.broadcast_to(t.numpy().astype(np.float64), shape)
    out = np.empty(shape, dtype=object)
    for index in np.ndindex(*shape):
        out[index] = Fraction(float(values[index]))
    return out


def round_half_even_exact(terms: Sequence[Tuple[torch.Tensor, ExactRatio]], lo: int, hi: int,
                          k_max: Optional[Sequence[float]] = None) -> torch.Tensor:
    """clamp(round_half_even(sum(k * c for k, c in terms)), lo, hi) computed exactly; int64 result.

    The float64 estimate of each product k * c is within |k c| * 2^-51 of the truth (the coefficient and
    the product each round once), and a sum of two within the sum of their magnitudes * 2^-51 (plus one
    more rounding). Only elements that land inside [lo - 1, hi + 1] need their rounding right; for one
    term their |k c| is at most max(|lo|, |hi|) + 2, for several it is at most sum(k_max_i * max|c_i|)
    (k_max: bounds on |k_i|, measured when not given).
    Elements farther than that bound from a tie round correctly from the estimate; the rest (exact ties
    and near-ties, rare unless the multiplier is a short binary fraction) are recomputed with Python
    integers. Elements far outside [lo, hi] clamp whatever their rounding, so they are never recomputed.
    """
    reach = max(abs(lo), abs(hi)) + 2
    if len(terms) == 1:
        magnitude = float(reach)
    else:
        if k_max is None:
            k_max = [float(k.abs().max()) if k.numel() else 0.0 for k, _ in terms]
        magnitude = sum(float(m) * float(c.estimate.abs().max()) for m, (_, c) in zip(k_max, terms))
    error_bound = magnitude * 2.0**-49
    estimate = None
    for k, c in terms:
        part = k.to(torch.float64) * c.estimate.to(k.device)
        estimate = part if estimate is None else estimate + part  # the terms may broadcast
    rounded = torch.round(estimate)
    near_tie = estimate.sub_(rounded).abs_() >= 0.5 - error_bound  # estimate (a new tensor) is used up here
    if bool(near_tie.any()):
        near_tie &= rounded.abs() <= reach + 1  # holds wherever |estimate| <= reach: recomputing more is exact too
        if bool(near_tie.any()):
            rounded[near_tie] = _round_exact_at(terms, near_tie).to(rounded)
    return rounded.clamp_(lo, hi).to(torch.int64)


def _round_exact_at(terms, mask: torch.Tensor) -> torch.Tensor:
    index = tuple(i.cpu().numpy() for i in torch.nonzero(mask, as_tuple=True))
    shape = tuple(mask.shape)
    parts = []
    for k, c in terms:
        kv = np.broadcast_to(k.detach().to(torch.int64).cpu().numpy(), shape)[index].astype(object)
        num = np.broadcast_to(c.numerator, shape)[index]
        den = np.broadcast_to(c.denominator, shape)[index]
        parts.append((kv * num, den))
    # Bring every term over the product of the denominators: exact in Python integers.
    total_den = np.ones(len(index[0]), dtype=object)
    for _, den in parts:
        total_den = total_den * den
    total_num = np.zeros(len(index[0]), dtype=object)
    for num, den in parts:
        total_num = total_num + num * (total_den // den)
    result = [_round_half_even_int(int(n), int(d)) for n, d in zip(total_num, total_den)]
    return torch.tensor(result, dtype=torch.float64)


def _round_half_even_int(numerator: int, denominator: int) -> int:
    quotient, remainder = divmod(numerator, denominator)  # floor division, 0 <= remainder < denominator
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


def round_half_even_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """round_half_even(numerator / denominator) for int64 tensors, denominator > 0, exactly."""
    quotient = torch.div(numerator, denominator, rounding_mode="floor")
    twice_remainder = 2 * (numerator - quotient * denominator)
    round_up = (twice_remainder > denominator) | ((twice_remainder == denominator) & (quotient % 2 == 1))
    return quotient + round_up.to(torch.int64)


def truncating_div(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """C's integer division: the quotient rounded toward zero."""
    return torch.div(numerator, denominator, rounding_mode="trunc")


# ---------------------------------------------------------------------------------------------------------
# 2. gemmlowp / TFLite fixed point
# ---------------------------------------------------------------------------------------------------------
def quantize_multiplier(real_multiplier: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """TFLite's QuantizeMultiplier (tensorflow/lite/kernels/internal/quantization_util.cc).

    M = m0 * 2^(shift - 31) with m0 a Q31 integer in [2^30, 2^31): frexp gives the fraction in [0.5, 1),
    `TfLiteRound(q * 2^31)` rounds it half away from zero (exact in double: q has 53 bits), a result of
    exactly 2^31 is halved with the shift incremented, and shifts below -31 flush the multiplier to zero.
    """
    real = real_multiplier.to(torch.float64)
    fraction, exponent = torch.frexp(real)
    m0 = torch.floor(fraction * 2.0**31 + 0.5).to(torch.int64)
    shift = exponent.to(torch.int64)
    overflowed = m0 == 2**31
    m0 = torch.where(overflowed, m0 // 2, m0)
    shift = torch.where(overflowed, shift + 1, shift)
    flushed = (shift < -31) | (real == 0)
    m0 = torch.where(flushed, torch.zeros_like(m0), m0)
    shift = torch.where(flushed, torch.zeros_like(shift), shift)
    return m0, shift


def saturating_rounding_doubling_high_mul(a: torch.Tensor, b: torch.Tensor, bits: int = 32) -> torch.Tensor:
    """gemmlowp SaturatingRoundingDoublingHighMul: (a * b + nudge) / 2^31 with C's truncating division.

    bits=16 is the int16 form TFLite's HARD_SWISH uses: (a * b + 2^14) >> 15, saturating -32768 * -32768.

    The nudge is 2^30 for a non-negative product and 1 - 2^30 otherwise. For a negative product p,
    trunc((p + 1 - 2^30) / 2^31) = floor((p + 2^30) / 2^31), so both cases are `(a * b + 2^30) >> 31`
    (ties toward +infinity). The one saturating case, a == b == INT32_MIN, only arises when the
    multiplier b is INT32_MIN; Q31 multipliers are never negative, but the case is kept exact.
    Returns a new tensor; the chain after the product runs in place (allocation dominates these ops).
    """
    lowest = -(1 << (bits - 1))
    high = (a * b).add_(1 << (bits - 2)).bitwise_right_shift_(bits - 1)
    if bool((torch.as_tensor(b) == lowest).any()):
        high = torch.where((a == b) & (a == lowest), torch.full_like(high, -lowest - 1), high)
    return high


def rounding_divide_by_pot(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent rounded to nearest, ties away from zero.

    gemmlowp adds 1 when the remainder exceeds `mask / 2 + (x < 0)`. Equivalently
    `(x + 2^(e-1) - [x < 0]) >> e` for e > 0 (the -1 turns negative ties away from zero), and x for e = 0.
    """
    return _rounding_divide_by_pot_(x.clone(), exponent)


def _rounding_divide_by_pot_(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """rounding_divide_by_pot computed in place on x."""
    exponent = torch.as_tensor(exponent, dtype=torch.int64, device=x.device)
    half = (torch.ones_like(exponent) << exponent) >> 1
    negative_tie_fix = (x >> 63).bitwise_and_((exponent > 0).to(torch.int64))  # 1 for negative x when e > 0
    return x.add_(half).sub_(negative_tie_fix).bitwise_right_shift_(exponent)


def multiply_by_quantized_multiplier(x: torch.Tensor, m0: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TFLite's MultiplyByQuantizedMultiplier (double rounding; the shipped build is not single-rounding).

    tensorflow/lite/kernels/internal/common.h: left shift for shift > 0, SRDHM, then a rounding right shift.
    """
    left = torch.clamp(shift, min=0)
    right = torch.clamp(-shift, min=0)
    if bool((left > 0).any()):
        x = x * (torch.ones_like(left) << left)
    return _rounding_divide_by_pot_(saturating_rounding_doubling_high_mul(x, m0), right)


def float32_requantizer(multiplier: torch.Tensor, zero_point: int, lo: int, hi: int):
    """acc -> clamp(rne(f(f(acc) * M)) + z, lo, hi): a float32 multiplier on the accumulator cast to float32.

    ONNX Runtime's QLinearConv/QGemm (MLAS) and XNNPACK's fp32 requantization both compute this; `f(acc)`
    drops the bits of an accumulator above 2^24 exactly as they do. M is a float32 tensor shaped to
    broadcast along the output channels.
    """
    def requantize(acc: torch.Tensor) -> torch.Tensor:
        scaled = (acc.to(torch.float32) * multiplier.to(acc.device)).round_()
        return scaled.add_(zero_point).clamp_(lo, hi).to(torch.int64)  # exact: small integers in float32

    return requantize


# ---------------------------------------------------------------------------------------------------------
# 3. IEEE float32 emulation
# ---------------------------------------------------------------------------------------------------------
def round_half_away(values: torch.Tensor) -> torch.Tensor:
    """C's std::round (ties away from zero) of float32 or float64 values, exactly, as float64.

    `v - trunc(v)` is exact in binary floating point, so the tie test sees the true fraction; the naive
    `floor(|v| + 0.5)` rounds 0.49999999999999994 up.
    """
    v = values.to(torch.float64)
    whole = torch.trunc(v)
    away = (v - whole).abs_().ge_(0.5).to(torch.float64).mul_(torch.sign(v))
    return whole.add_(away)


def fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 fused multiply-add, a * b + c rounded once, emulated exactly.

    a * b of two float32 values is exact in float64; the float64 sum then rounds once more, and rounding
    that to float32 equals rounding the exact sum once unless the float64 sum is exactly a float32 midpoint
    (a rounding cannot step over a midpoint, which float64 represents). Only then, or near float32's
    subnormal range, the sum is redone with round-to-odd (TwoSum finds the error; an inexact even result
    steps one ulp toward the truth), which makes the final rounding correct (53 >= 2 * 24 + 2).
    """
    product = a.to(torch.float64) * b.to(torch.float64)
    addend = c.to(torch.float64)
    total = product + addend
    low_bits = total.view(torch.int64) & ((1 << 29) - 1)
    # An exact zero is no risk (a float64 sum is 0 only when the exact sum is, with the fused operation's sign);
    # zeros are common (q = z in a dequantization) and would send every call down the slow path.
    risky = (low_bits == (1 << 28)) | ((total.abs() < 2.0**-125) & (total != 0))
    if bool(risky.any()):  # usually a few elements: redo only those
        product, addend = product.expand_as(total)[risky], addend.expand_as(total)[risky]
        total[risky] = _sum_round_to_odd(product, addend, total[risky])
    return total.to(torch.float32)


def _sum_round_to_odd(product: torch.Tensor, addend: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    even = (total.view(torch.int64) & 1) == 0
    needs_odd = (error != 0) & even
    toward = torch.where(error > 0, torch.full_like(total, float("inf")), torch.full_like(total, float("-inf")))
    return torch.where(needs_odd, torch.nextafter(total, toward), total)
