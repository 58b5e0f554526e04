"""rsqrt of one grid's codes, as a table of every input code: LiteRT's int8 RSQRT and the correctly rounded value.

rsqrt's input in a normalization is a mean of squares (plus epsilon), never negative, so its grid starts at
real 0 (zero point = qmin); the code of real 0 gives the output grid's top code (LiteRT: "any value close to 0
represents the max output value"; exact: +inf clamped).

LiteRT (kernels/elementwise.cc RsqrtEvalQuantizedInt8 and SetRsqrtOutputMultiplier, kernels/internal/common.h
GetInvSqrtQuantizedMultiplierExp; LiteRT 2.3 and main at f6745779):
    v = q - z; v == 0 -> 127
    (m, e) = GetInvSqrtQuantizedMultiplierExp(v, kReverseShift = -1)   # 1/sqrt(v), Newton-Raphson in Q3.28
    data = MBQM(1, m, e + 20)
    q_y = clamp(z_y + MBQM(data, M, shift - 20)), (M, shift) = QuantizeMultiplier(1. / f(sqrtf(s_x) * s_y))
"""
from __future__ import annotations

from fractions import Fraction
from math import isqrt

import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from .arithmetic import (multiply_by_quantized_multiplier, quantize_multiplier, rounding_divide_by_pot,
                         saturating_rounding_doubling_high_mul)

INT32_MAX = (1 << 31) - 1
SHIFT = 20  # RsqrtEvalQuantizedInt8's kShift: "Shift to keep value integer"


def require_nonnegative_grid(source: QParams) -> None:
    if int(source.zero_point) != source.qmin:
        raise UnsupportedOpError(
            f"rsqrt of a grid with zero point {int(source.zero_point)} (its codes below it are negative reals, where "
            "rsqrt is undefined and LiteRT's RSQRT fails); rsqrt takes a nonnegative input, such as a mean of "
            "squares plus epsilon, whose grid starts at 0")


def _multiply_by_pot_saturating(raw: torch.Tensor, exponent: int) -> torch.Tensor:
    """gemmlowp SaturatingRoundingMultiplyByPOT<exponent> for exponent > 0: a left shift saturating to int32."""
    threshold = (1 << (31 - exponent)) - 1
    shifted = raw << exponent
    return torch.where(raw > threshold, INT32_MAX, torch.where(raw < -threshold, -INT32_MAX - 1, shifted))


def inv_sqrt_multiplier(value: torch.Tensor):
    """GetInvSqrtQuantizedMultiplierExp(value, reverse_shift=-1) for int64 values in [2, 2^29): (m, left shift)."""
    shift = torch.full_like(value, 11)
    # max_left_shift_bits = CountLeadingZeros(uint32 value) - 1 = 31 - bit_length; shift by one pair fewer
    bit_length = sum((value >> k > 0).to(torch.int64) for k in range(31))
    pairs = (31 - bit_length) // 2 - 1
    shift = shift - pairs
    scaled = value << (2 * pairs)
    x3_one = 1 << 28  # F3::One()
    half_input = rounding_divide_by_pot(scaled >> 1, torch.tensor(1))  # SaturatingRoundingMultiplyByPOT<-1>
    half_three = (1 << 28) + (1 << 27)
    x = torch.full_like(value, x3_one)
    for _ in range(5):  # Newton-Raphson from x = 1, five iterations
        cube = saturating_rounding_doubling_high_mul(saturating_rounding_doubling_high_mul(x, x), x)  # F9
        cube = _multiply_by_pot_saturating(cube, 6)  # Rescale<3>
        difference = (saturating_rounding_doubling_high_mul(torch.full_like(x, half_three), x)
                      - saturating_rounding_doubling_high_mul(half_input, cube))  # F6 - F6
        x = _multiply_by_pot_saturating(difference, 3)  # Rescale<3>
    m = saturating_rounding_doubling_high_mul(x, torch.full_like(x, 1518500250))  # * sqrt(2) / 2 in Q0.31
    m = torch.where(shift < 0, m << torch.clamp(-shift, min=0), m)
    return m, -torch.clamp(shift, min=0)


def tflite_rsqrt_table(source: QParams, out: QParams) -> torch.Tensor:
    """LiteRT's int8 RSQRT of every code of `source` (the module docstring gives the source)."""
    require_nonnegative_grid(source)
    value = torch.arange(source.qmin, source.qmax + 1, dtype=torch.int64) - int(source.zero_point)
    m, e = inv_sqrt_multiplier(torch.clamp(value, min=2))
    m = torch.where(value <= 1, INT32_MAX, m)  # inputs 0 and 1 take INT32_MAX, shift 0
    e = torch.where(value <= 1, 0, e)
    data = multiply_by_quantized_multiplier(torch.ones_like(value), m, e + SHIFT)
    product = np.float32(np.sqrt(np.float32(source.scale))) * np.float32(out.scale)  # float32 sqrtf and product
    multiplier, shift = quantize_multiplier(torch.tensor(1.0 / float(product), dtype=torch.float64))
    q = multiply_by_quantized_multiplier(data, multiplier, shift - SHIFT) + int(out.zero_point)
    q = torch.where(value == 0, 127, q)
    return torch.clamp(q, -128, 127)


def exact_rsqrt_table(source: QParams, out: QParams) -> torch.Tensor:
    """round_half_even(1 / (s_y sqrt(x))) for every code's x = (q - z) s, decided exactly: its square is rational."""
    require_nonnegative_grid(source)
    s, s_y = Fraction(float(source.scale)), Fraction(float(out.scale))
    z, z_y = int(source.zero_point), int(out.zero_point)
    table = []
    for code in range(source.qmin, source.qmax + 1):
        if code == z:
            table.append(out.qmax)
            continue
        square = 1 / (s_y * s_y * (code - z) * s)  # the quotient's square, exactly
        n = isqrt(square.numerator // square.denominator)  # floor of the quotient
        boundary = Fraction((2 * n + 1) ** 2, 4)  # (n + 1/2)^2
        rounded = n + 1 if square > boundary or (square == boundary and n % 2 == 1) else n
        table.append(min(max(z_y + rounded, out.qmin), out.qmax))
    return torch.tensor(table, dtype=torch.int64)
