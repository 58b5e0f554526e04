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
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..errors import InvalidParameterError
from .compiled import compiles, run_kernel

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
                          k_max: Optional[Sequence[float]] = None, zero_point: int = 0,
                          dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """clamp(round_half_even(sum(k * c for k, c in terms)), lo, hi) + zero_point computed exactly; an int64
    result, or `dtype`, an integer dtype that holds every code in [lo + zero_point, hi + zero_point].

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
    if len(terms) == 1 and terms[0][0].numel():
        # The common case in one pass (one compiled kernel where the model is compiled): no element near a tie
        k, c = terms[0]
        codes, farthest = run_kernel(_round_one_term, k, c.estimate.to(k.device), lo, hi, zero_point, dtype,
                                     chunked=True)
        if float(farthest) < 0.5 - error_bound:
            return codes
    estimate = None
    for k, c in terms:
        # int64 or float32 k promotes to float64 inside the product (exact: |k| < 2^53): one pass, no copy
        part = torch.mul(k, c.estimate.to(k.device))
        if estimate is None:
            estimate = part
        elif estimate.shape == part.shape:
            estimate.add_(part)
        else:
            estimate = estimate + part  # the terms broadcast
    rounded = torch.round(estimate)
    distance = estimate.sub_(rounded).abs_()  # estimate (a new tensor) is used up here
    # One reduction decides the common case (no element near a tie) without a mask
    if distance.numel() and float(distance.amax()) >= 0.5 - error_bound:
        near_tie = distance >= 0.5 - error_bound
        near_tie &= rounded.abs() <= reach + 1  # holds wherever |estimate| <= reach: recomputing more is exact too
        if bool(near_tie.any()):
            rounded[near_tie] = _round_exact_at(terms, near_tie).to(rounded)
    codes = rounded.clamp_(lo, hi)
    if zero_point:
        codes.add_(zero_point)  # in float64, exact: |clamped + zero_point| < 2^53
    return codes.to(dtype)


def _round_one_term(k: torch.Tensor, coefficient: torch.Tensor, lo: int, hi: int, zero_point: int,
                    dtype: torch.dtype = torch.int64) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clamp(rne(k * c), lo, hi) + zero_point as `dtype`, the largest distance |k * c - rne(k * c)|) from the
    float64 estimate of one term, exactly as round_half_even_exact's general path computes them."""
    estimate = torch.mul(k, coefficient)
    rounded = torch.round(estimate)
    # estimate is this call's own tensor; amax, not max(): the same value, and PyTorch's full max() of a float64
    # tensor is several times slower (32,768 channels-last elements: 6.5 against 43.6 us, torch 2.14.1)
    farthest = estimate.sub_(rounded).abs_().amax()
    # the zero point added in float64 is exact: |clamped + zero_point| < 2^53
    codes = rounded.clamp_(lo, hi).add_(zero_point)
    if torch.compiler.is_compiling() and dtype in SMALL_INTEGER_DTYPES:
        # inductor's float64 -> int8 conversion runs at half the speed of float64 -> float32 -> int8 (a 524,288-element
        # layer: 1,150 against 611 us, torch 2.14.1); exact, as codes of these dtypes are integers below 2^24
        codes = codes.to(torch.float32)
    return codes.to(dtype), farthest


SMALL_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.int16)


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


# The int64 headroom of a folded addend: |x * multiplier| < 2^62 (an int32 value times a Q31 multiplier, or the
# int32 value after MBQM's left shift times it), so an addend of magnitude <= 2^62 keeps the sum inside int64.
ADDEND_LIMIT = 1 << 62
NEGATIVE_TIE_FIX = 1 << 31


@dataclass(frozen=True)
class ShiftRequantizer:
    """x -> clamp(((x * multiplier + addend - sign_weight * [x < 0]) >> shift) + zero_point, lo, hi): a whole
    fixed-point requantization (rounding constants, zero point and clamp included) as one int64 multiply-add,
    a sign correction where the rule has one, one shift and one clamp, for int64 x within int32.

    Every constant broadcasts along the output channels and is computed once, when the layer is built. The sign
    correction (gemmlowp's RoundingDivideByPOT rounds negative ties away from zero) is `x >> 63` added with a
    constant weight: two plain int64 passes (`torch.where` and bool operands take PyTorch's unvectorized loops,
    5-10x a plain pass). The constructors prove each folding equal to the chain it replaces;
    tests/test_fused_requantizers.py holds them equal with torch.equal over the whole multiplier and shift range.
    `zero_point` is 0 where it was folded into the addend.
    """

    multiplier: torch.Tensor                # int64
    addend: torch.Tensor                    # int64
    shift: torch.Tensor                     # int64, 1..62
    zero_point: int
    lo: int
    hi: int
    sign_weight: Union[None, int, torch.Tensor] = None  # None: no sign correction; or one weight, or per channel

    @classmethod
    def gemmlowp(cls, m0: torch.Tensor, shift: torch.Tensor, zero_point: int, lo: int, hi: int
                 ) -> "ShiftRequantizer":
        """clamp(MultiplyByQuantizedMultiplier(x, m0, shift) + zero_point, lo, hi) (TFLite's double rounding).

        For m0 in [0, 2^31) and x whose left-shifted value a = x * 2^l (l = max(shift, 0)) is an int32, as
        TFLite requires. With M = m0 * 2^l and P = x * M = a * m0, the reference computes
        r1 = (P + 2^30) >> 31 (SRDHM; it saturates only for m0 = INT32_MIN, excluded here) and, with
        e = max(-shift, 0) > 0, r2 = (r1 + 2^(e-1) - n) >> e with n = [r1 < 0]. Two facts about floor shifts
        fold that into one: (y >> 31) + c = (y + c * 2^31) >> 31 for every integer c, and
        (y >> 31) >> e = y >> (31 + e). So
            r2 + z = (P + 2^30 + (2^(e-1) + z * 2^e) * 2^31 - n * 2^31) >> (31 + e).
        n may be replaced by [x < 0]: r1 < 0 implies P < 0 and so x < 0, and where x < 0 but r1 >= 0, r1 is 0
        (P + 2^30 lies in [0, 2^30]) and both (2^(e-1) - 1) >> e and 2^(e-1) >> e are 0. For e = 0 there is no
        second rounding (sign weight 0). |P| < 2^62, so the zero point is folded where the addend and the
        addend minus 2^31 stay within 2^62.
        """
        m0s, shifts = m0.to(torch.int64), shift.to(torch.int64).expand_as(m0)
        if bool((m0s < 0).any()) or bool((m0s > INT32_MAX).any()):
            raise InvalidParameterError(f"a Q31 multiplier outside [0, 2^31): {m0s.min().item()}..{m0s.max().item()}"
                                        "; the fused requantizer takes the non-negative multipliers of "
                                        "QuantizeMultiplier only (multiply_by_quantized_multiplier takes any)")
        multipliers, addends, total_shifts, weights = [], [], [], []
        for m, s in zip(m0s.reshape(-1).tolist(), shifts.reshape(-1).tolist()):
            left, right = max(s, 0), max(-s, 0)
            multipliers.append(m << left)
            addends.append((1 << 30) + (((1 << (right - 1)) if right else 0) << 31))
            total_shifts.append(31 + right)
            weights.append(NEGATIVE_TIE_FIX if right else 0)
        addends, zero_point = _fold_zero_point(addends, total_shifts, zero_point)
        if len(set(weights)) == 1:
            sign_weight = weights[0] or None
        else:
            sign_weight = _int64(weights, m0.shape)
        return cls(_int64(multipliers, m0.shape), _int64(addends, m0.shape), _int64(total_shifts, m0.shape),
                   zero_point, lo, hi, sign_weight)

    @classmethod
    def single_rounding(cls, multiplier: torch.Tensor, shift: torch.Tensor, zero_point: int, lo: int, hi: int
                        ) -> "ShiftRequantizer":
        """clamp(((x * m + 2^(shift - 1)) >> shift) + zero_point, lo, hi), shift >= 1 (TOSA's apply_scale_32
        with SINGLE_ROUND), for |x| < 2^31 and m in [0, 2^31): (y >> s) + z = (y + z * 2^s) >> s folds the zero
        point into the addend where it stays within 2^62."""
        shape = multiplier.shape
        shifts = shift.to(torch.int64).expand(shape).reshape(-1).tolist()
        addends, zero_point = _fold_zero_point([1 << (s - 1) for s in shifts], shifts, zero_point)
        return cls(multiplier.to(torch.int64), _int64(addends, shape), _int64(shifts, shape), zero_point, lo, hi)

    def __call__(self, values: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The codes of integer values (int64, or float32 holding exact integers, as accumulators come) as int64,
        or `dtype` (an integer dtype holding [lo, hi]): a new tensor of their shape and memory format."""
        multiplier, addend, shift, sign_weight = self._on(values.device)
        return run_kernel(ShiftRequantizer.requantize, values, multiplier, addend, shift, sign_weight,
                          self.zero_point, self.lo, self.hi, dtype, chunked=True)

    @staticmethod
    def requantize(values: torch.Tensor, multiplier: torch.Tensor, addend: torch.Tensor, shift: torch.Tensor,
                   sign_weight: Union[None, int, torch.Tensor], zero_point: int, lo: int, hi: int,
                   dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """The arithmetic itself, on the constants of one device (run eagerly or as one compiled kernel), in int64;
        the clamped codes converted to `dtype` last."""
        x = values.to(torch.int64)
        y = torch.addcmul(addend, x, multiplier)
        if sign_weight is not None:
            # -1 where x < 0, else 0; computed in place where x is a copy (values not int64: `to` made one)
            sign = x.bitwise_right_shift_(63) if values.dtype != torch.int64 else x >> 63
            if isinstance(sign_weight, int):
                y.add_(sign, alpha=sign_weight)
            else:
                y.addcmul_(sign, sign_weight)
        y.bitwise_right_shift_(shift)
        if zero_point:
            y.add_(zero_point)
        return y.clamp_(lo, hi).to(dtype)

    def _on(self, device: torch.device):
        values = (self.multiplier, self.addend, self.shift, self.sign_weight)
        if device == self.multiplier.device:
            return values
        return tuple(v.to(device) if isinstance(v, torch.Tensor) else v for v in values)


def _fold_zero_point(addends, shifts, zero_point: int):
    """(addends + zero_point * 2^shift, 0) where every one stays within ADDEND_LIMIT, else (addends, zero_point)."""
    folded = [a + zero_point * (1 << s) for a, s in zip(addends, shifts)]
    if all(abs(a) <= ADDEND_LIMIT and abs(a - NEGATIVE_TIE_FIX) <= ADDEND_LIMIT for a in folded):
        return folded, 0
    return addends, zero_point


def _int64(values, shape) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64).reshape(shape)


class Float32Rule(NamedTuple):
    """float32_requantizer's constants: M (float32, broadcast along the output channels), z, lo, hi."""

    multiplier: torch.Tensor
    zero_point: int
    lo: int
    hi: int


def float32_requantizer(multiplier: torch.Tensor, zero_point: int, lo: int, hi: int):
    """acc -> clamp(rne(f(f(acc) * M)) + z, lo, hi): a float32 multiplier on the accumulator cast to float32.

    ONNX Runtime's QLinearConv/QGemm (MLAS) and XNNPACK's fp32 requantization both compute this; `f(acc)`
    drops the bits of an accumulator above 2^24 exactly as they do. M is a float32 tensor shaped to
    broadcast along the output channels.
    """
    def requantize(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return run_kernel(requantize_float32, acc, multiplier.to(acc.device), zero_point, lo, hi, dtype)

    def consume(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """requantize(acc, dtype) for an accumulator that is the caller's own temporary: the eager passes scale a
        float32 one in place instead of into a new tensor of its size (one allocation and one write of the largest
        tensor of the layer fewer: 8% of an eager XNNPACK run of the bench model at batch 32, and its peak tensor
        memory 5.50 -> 5.00 MiB). The compiled kernel takes it as it is (one loop, no temporary)."""
        here = multiplier.to(acc.device)
        if acc.dtype != torch.float32 or compiles(acc):
            return run_kernel(requantize_float32, acc, here, zero_point, lo, hi, dtype)
        return requantize_float32(acc, here, zero_point, lo, hi, dtype, overwrite=True)

    # consume must not refer to requantize: the cycle would keep the multiplier alive until the garbage collector
    # runs (a prepared model builds requantizers every step; test_bench counts the bytes a step leaves behind)
    requantize.consume = consume
    # the rule's constants, for a kernel that applies it while the accumulator is in registers (fused_layer.py)
    requantize.float32_rule = Float32Rule(multiplier, zero_point, lo, hi)
    return requantize


def requantize_float32(acc: torch.Tensor, multiplier: torch.Tensor, zero_point: int, lo: int, hi: int,
                       dtype: torch.dtype = torch.int64, overwrite: bool = False) -> torch.Tensor:
    """float32_requantizer's arithmetic (run eagerly or as one compiled kernel); codes as `dtype`. overwrite: a
    float32 acc is scaled in place (the same float32 products), for an accumulator no one else holds."""
    scaled = acc.mul_(multiplier) if overwrite and acc.dtype == torch.float32 else acc.to(torch.float32) * multiplier
    return scaled.round_().add_(zero_point).clamp_(lo, hi).to(dtype)  # exact: small integers in float32


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
    (a rounding cannot step over a midpoint, which float64 represents). Only where some sum is, or lies near
    float32's subnormal range, the sums are redone with round-to-odd (TwoSum finds the error; an inexact even
    result steps one ulp toward the truth), which makes the final rounding correct (53 >= 2 * 24 + 2) for every
    element, whether it was at risk or not.
    """
    product = a.to(torch.float64) * b.to(torch.float64)
    addend = c.to(torch.float64)
    total = product + addend
    if _may_round_twice(total):
        total = _sum_round_to_odd(product, addend, total)
    return total.to(torch.float32)


FLOAT64_MAGNITUDE = (1 << 63) - 1  # the bits of |x|: all but the sign
FLOAT32_MIDPOINT_BITS, FLOAT32_MIDPOINT = (1 << 29) - 1, 1 << 28  # float64's last 29 bits at a float32 midpoint
NEAR_FLOAT32_SUBNORMAL = (1023 - 125) << 52  # the bits of 2^-125


def _may_round_twice(total: torch.Tensor) -> bool:
    """Whether some float64 sum is exactly a float32 midpoint, or nonzero and below 2^-125 in magnitude.

    An exact zero is no risk (a float64 sum is 0 only when the exact sum is, with the fused operation's sign);
    zeros are common (q = z in a dequantization) and would send every call down the slower path. Read off the
    bits with int64 passes and min reductions: PyTorch's comparisons into bool run element by element.
    """
    if total.numel() == 0:
        return False
    bits = total.view(torch.int64)
    off_midpoint = torch.bitwise_and(bits, FLOAT32_MIDPOINT_BITS).bitwise_xor_(FLOAT32_MIDPOINT)  # 0 at a midpoint
    # |x| bits - 1, with 0's -1 taken to the largest int64 (so only a nonzero |x| below 2^-125 falls under it)
    magnitude_less_one = torch.bitwise_and(bits, FLOAT64_MAGNITUDE).sub_(1).bitwise_and_(FLOAT64_MAGNITUDE)
    return int(off_midpoint.min()) == 0 or int(magnitude_less_one.min()) < NEAR_FLOAT32_SUBNORMAL - 1


def _sum_round_to_odd(product: torch.Tensor, addend: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """product + addend rounded to odd: total (its float64 rounding) where it is exact or odd, else the float64
    neighbour toward the exact sum (whose last bit is then 1). In int64 passes: that neighbour's bits are total's
    plus 1 where the error and total have the same sign (the magnitude grows), minus 1 where they differ. NaN and
    infinite sums (whose error is NaN) stay as they are."""
    virtual = total - product
    error = (product - (total - virtual)) + (addend - virtual)
    bits = total.view(torch.int64)
    toward_exact = torch.sign(error).mul_(torch.sign(total)).nan_to_num_(0.0).to(torch.int64)  # 0 where exact
    even = torch.bitwise_and(bits, 1).neg_().add_(1)
    return torch.add(bits, toward_exact.mul_(even)).view(torch.float64)
