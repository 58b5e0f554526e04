"""gemmlowp's fixed-point logistic and tanh (fixedpoint/fixedpoint.h), on Python ints, one value at a time.

TFLite Micro's int8 LOGISTIC and TANH (reference_integer_ops::Logistic / Tanh) evaluate these on the input
rescaled to Q4.27; qparity tabulates them over the 256 input codes, so plain Python integers suffice. A value
of FixedPoint<int32, n> is its raw int32; every helper below is named after the gemmlowp function it is.
Sources: google/gemmlowp fixedpoint/fixedpoint.h (exp_on_negative_values, one_over_one_plus_x_for_x_in_0_1,
one_minus_x_over_one_plus_x_for_x_in_0_1, logistic, tanh).
"""
from __future__ import annotations

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def srdhm(a: int, b: int) -> int:
    """SaturatingRoundingDoublingHighMul: (a * b + nudge) / 2^31, C division (truncation toward zero)."""
    if a == b == INT32_MIN:
        return INT32_MAX
    product = a * b
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    total = product + nudge
    quotient = abs(total) >> 31
    return quotient if total >= 0 else -quotient


def rounding_divide_by_pot(x: int, exponent: int) -> int:
    """RoundingDivideByPOT: x / 2^exponent, ties away from zero."""
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


def multiply_by_pot(x: int, exponent: int) -> int:
    """SaturatingRoundingMultiplyByPOT<exponent>: a saturating left shift, or a rounding right shift."""
    if exponent < 0:
        return rounding_divide_by_pot(x, -exponent)
    threshold = (1 << (31 - exponent)) - 1
    if x > threshold:
        return INT32_MAX
    if x < -threshold:
        return INT32_MIN
    return x << exponent


def rounding_half_sum(a: int, b: int) -> int:
    """RoundingHalfSum for int32: (a + b + sign) / 2 in int64, C division."""
    total = a + b
    total += 1 if total >= 0 else -1
    return total // 2 if total >= 0 else -((-total) // 2)


def _exp_on_interval_between_negative_one_quarter_and_0_excl(a: int) -> int:
    """exp(a) for a in [-1/4, 0), Q0.31: a Taylor expansion around -1/8."""
    constant_term, one_third = 1895147668, 715827883   # exp(-1/8), 1/3
    x = a + (1 << 28)                                  # a + 1/8
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    x4_over_4 = multiply_by_pot(x4, -2)
    polynomial = multiply_by_pot(srdhm(x4_over_4 + x3, one_third) + x2, -1)
    return constant_term + srdhm(constant_term, x + polynomial)


# exp_on_negative_values' barrel shifter: (exponent, Q0.31 raw of exp(-2^exponent))
_EXP_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401),
               (4, 242))


def exp_on_negative_values(a: int, integer_bits: int) -> int:
    """exp(a) for a <= 0 in Q(integer_bits), as Q0.31 (gemmlowp::exp_on_negative_values; integer_bits <= 5)."""
    fractional_bits = 31 - integer_bits
    one_quarter = 1 << (fractional_bits - 2)
    a_mod_quarter_minus_one_quarter = (a & (one_quarter - 1)) - one_quarter
    result = _exp_on_interval_between_negative_one_quarter_and_0_excl(
        multiply_by_pot(a_mod_quarter_minus_one_quarter, integer_bits))
    remainder = a_mod_quarter_minus_one_quarter - a
    for exponent, multiplier in _EXP_BARREL:
        if integer_bits > exponent and remainder & (1 << (fractional_bits + exponent)):
            result = srdhm(result, multiplier)
    return INT32_MAX if a == 0 else result


def _newton_reciprocal_of_half_denominator(half_denominator: int) -> int:
    """x ~ 1 / half_denominator in Q2.29: three Newton-Raphson steps from 48/17 - 32/17 * d."""
    one = 1 << 29
    x = 1515870810 + srdhm(half_denominator, -1010580540)
    for _ in range(3):
        one_minus_half_denominator_times_x = one - srdhm(half_denominator, x)
        x = x + multiply_by_pot(srdhm(x, one_minus_half_denominator_times_x), 2)
    return x


def one_over_one_plus_x_for_x_in_0_1(a: int) -> int:
    """1 / (1 + a), Q0.31 in and out."""
    x = _newton_reciprocal_of_half_denominator(rounding_half_sum(a, INT32_MAX))
    return multiply_by_pot(x, 1)  # Rescale<0>(ExactMulByPot<-1>(x)): from Q1.30


def one_minus_x_over_one_plus_x_for_x_in_0_1(a: int) -> int:
    """(1 - a) / (1 + a), Q0.31 in and out."""
    x = _newton_reciprocal_of_half_denominator(rounding_half_sum(a, INT32_MAX))
    return multiply_by_pot(x - (1 << 29), 2)  # Rescale<0>(x - 1) from Q2.29


def logistic(a: int, integer_bits: int) -> int:
    """gemmlowp::logistic: 1 / (1 + exp(-a)) for a in Q(integer_bits), as Q0.31."""
    if a == 0:
        return 1 << 30
    positive = one_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(-abs(a), integer_bits))
    return positive if a > 0 else INT32_MAX - positive


def tanh(a: int, integer_bits: int) -> int:
    """gemmlowp::tanh: for a in Q(integer_bits), as Q0.31."""
    if a == 0:
        return 0
    # neg_tanh_on_negative_values: exp(2n) as ExactMulByPot<1>, the same raw value with one more integer bit
    t = one_minus_x_over_one_plus_x_for_x_in_0_1(exp_on_negative_values(-abs(a), integer_bits + 1))
    return -t if a < 0 else t
