"""Elementwise activations of one code: their real functions, and the exact (correctly rounded) tables.

An 8-bit activation has at most 256 input codes, so every runtime that computes it as a pure function of the
code is described completely by a table of output codes, one per input code; each target builds that table
with its runtime's own arithmetic (`Target.activation_table`). This module holds what is common: the names
and parameters, and the analytical answer that the `exact` target gives.

Parameters are float32, as every runtime stores them: LeakyReLU's slope is alpha = f(negative_slope), ELU's
alpha = f(alpha).
The exact answer is round half to even of the exact real value f(x) / s_y, x = s * (q - z) taken exactly:
- hardsigmoid(x) = clamp(x + 3, 0, 6) / 6 and leaky_relu(x) = x or alpha * x are rational in x: computed
  with Fractions; so are elu(x) = x for x >= 0 and gelu(0) = 0;
- sigmoid(x) = 1 / (1 + e^-x), tanh(x) and elu(x) = alpha (e^x - 1) for x < 0 are transcendental for every
  rational x != 0 (Lindemann), so no exact tie exists there; gelu(x) = x/2 erfc(-x / sqrt 2) and its tanh form
  x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (0.044715 exactly) are evaluated the same way. All of them
  use mpmath at a precision raised until the value is provably on one side of the rounding boundary; a value
  that stays within 10^-310 of it is refused, never guessed.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Dict, Optional

import mpmath
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UnsupportedOpError
from ..qparams import QParams

NAMES = ("sigmoid", "tanh", "hardsigmoid", "leaky_relu", "gelu", "elu")
TRANSCENDENTAL = ("sigmoid", "tanh", "gelu", "elu")


def real_function(kind: str, attrs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """The float function QAT differentiates (the surrogate)."""
    if kind == "sigmoid":
        return torch.sigmoid
    if kind == "tanh":
        return torch.tanh
    if kind == "hardsigmoid":
        return F.hardsigmoid
    if kind == "leaky_relu":
        return lambda x: F.leaky_relu(x, float32(attrs["negative_slope"]))
    if kind == "gelu":
        return lambda x: F.gelu(x, approximate=attrs["approximate"])
    if kind == "elu":
        return lambda x: F.elu(x, float32(attrs["alpha"]))
    raise KeyError(kind)


def float32(value: float) -> float:
    return float(np.float32(value))


def codes(qp: QParams) -> torch.Tensor:
    """Every code of a grid, in order: the index of an activation table."""
    return torch.arange(qp.qmin, qp.qmax + 1, dtype=torch.int64)


def _rational(kind: str, attrs: dict, x: Fraction) -> Fraction:
    if kind == "hardsigmoid":
        return min(max(x + 3, Fraction(0)), Fraction(6)) / 6
    alpha = Fraction(float32(attrs["negative_slope"]))
    return x if x >= 0 else alpha * x


def _rational_value(kind: str, attrs: dict, x: Fraction) -> Optional[Fraction]:
    """f(x) where a transcendental activation takes a rational value (then it may be a tie), else None."""
    if x == 0:
        return Fraction(1, 2) if kind == "sigmoid" else Fraction(0)
    if kind == "elu" and (x > 0 or float32(attrs["alpha"]) == 0):
        return x if x > 0 else Fraction(0)
    return None


def _transcendental(kind: str, attrs: dict, x: Fraction):
    value = mpmath.mpf(x.numerator) / x.denominator
    if kind == "sigmoid":
        return 1 / (1 + mpmath.exp(-value))
    if kind == "tanh":
        return mpmath.tanh(value)
    if kind == "elu":
        return mpmath.mpf(float32(attrs["alpha"])) * mpmath.expm1(value)
    if attrs["approximate"] == "tanh":
        inner = mpmath.sqrt(2 / mpmath.pi) * (value + mpmath.mpf(44715) / 10**6 * value**3)
        return value / 2 * (1 + mpmath.tanh(inner))
    return value / 2 * mpmath.erfc(-value / mpmath.sqrt(2))


def _round_transcendental(kind: str, attrs: dict, x: Fraction, out_scale: Fraction) -> int:
    """round(f(x) / s_y), correctly: raise the precision until the quotient is off every half-integer."""
    rational = _rational_value(kind, attrs, x)
    if rational is not None:
        return round(rational / out_scale)
    for digits in (40, 80, 160, 320):
        with mpmath.workdps(digits):
            quotient = _transcendental(kind, attrs, x) / (mpmath.mpf(out_scale.numerator) / out_scale.denominator)
            nearest_half = mpmath.floor(quotient) + mpmath.mpf(1) / 2
            if abs(quotient - nearest_half) > mpmath.mpf(10) ** (10 - digits):
                return int(mpmath.floor(quotient + mpmath.mpf(1) / 2))
    raise UnsupportedOpError(f"{kind}({x}) / {out_scale} is within 10^-310 of a rounding boundary; qparity cannot "
                             "round it exactly (choose another output scale)")


def exact_table(kind: str, attrs: dict, source: QParams, out: QParams) -> torch.Tensor:
    """The exact target's output code for every input code of `source`."""
    s, s_y = Fraction(float(source.scale)), Fraction(float(out.scale))
    z, z_y = int(source.zero_point), int(out.zero_point)
    table = []
    for code in range(source.qmin, source.qmax + 1):
        x = (code - z) * s
        if kind in TRANSCENDENTAL:
            value = z_y + _round_transcendental(kind, attrs, x, s_y)
        else:
            value = z_y + round(_rational(kind, attrs, x) / s_y)  # round() on a Fraction: half to even
        table.append(min(max(value, out.qmin), out.qmax))
    return torch.tensor(table, dtype=torch.int64)


class TableCache:
    """A target's activation tables, keyed by operator, parameters and grids (training changes the grids
    every step; a few hundred tables are kept)."""

    def __init__(self, size: int = 512):
        self.size = size
        self.tables: Dict[tuple, torch.Tensor] = {}

    def get(self, kind: str, attrs: dict, source: QParams, out: QParams, build) -> torch.Tensor:
        key = (kind, tuple(sorted(attrs.items())), float(source.scale), int(source.zero_point), source.dtype,
               float(out.scale), int(out.zero_point), out.dtype)
        table = self.tables.get(key)
        if table is None:
            if len(self.tables) >= self.size:
                self.tables.pop(next(iter(self.tables)))
            table = self.tables[key] = build()
        return table
