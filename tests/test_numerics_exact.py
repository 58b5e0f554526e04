"""The `exact` target and the arithmetic primitives equal plain Python references, exactly.

The `exact` target is checked against fractions.Fraction: every scale is taken at its exact float32
value and every result is round-half-even of the exact rational. The primitives in
qparity.numerics.arithmetic (gemmlowp fixed point, float32 emulation, exact rational rounding) are checked
against straightforward reimplementations in Python integers and Fractions.
"""
import math
from fractions import Fraction

import numpy as np
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from qparity.numerics import pooling
from qparity.qparams import DTYPE_RANGES, QParams
from qparity.numerics import get_target
from qparity.numerics.arithmetic import (INT32_MAX, INT32_MIN, ExactRatio, fma_f32, multiply_by_quantized_multiplier,
                                     quantize_multiplier, round_half_away, round_half_even_exact,
                                     rounding_divide_by_pot, saturating_rounding_doubling_high_mul)

from runtime_models import f32, scales, seeds

TARGET = get_target("exact")
SETTINGS = settings(max_examples=60, deadline=None)
dtypes = st.sampled_from(["int8", "uint8"])
zero_points = st.integers(0, 255)


def zero_point(raw: int, dtype: str) -> int:
    return raw + DTYPE_RANGES[dtype][0]


# ---------------------------------------------------------------------------------------------------------
# Python references
# ---------------------------------------------------------------------------------------------------------
def round_half_even(value: Fraction) -> int:
    return round(value)  # Fraction.__round__ rounds ties to even


def round_half_away_ref(value: Fraction) -> int:
    magnitude = math.floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def clamp(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, value))


def c_division(numerator: int, denominator: int) -> int:
    """C's integer division, rounding toward zero."""
    quotient = abs(numerator) // abs(denominator)
    return quotient if (numerator >= 0) == (denominator > 0) else -quotient


def exact(value) -> Fraction:
    return Fraction(float(value))


def round_to_float32(value: Fraction) -> float:
    """The float32 nearest to an exact rational (ties to even), with subnormals and overflow to infinity."""
    if value == 0:
        return 0.0
    magnitude = abs(value)
    exponent = magnitude.numerator.bit_length() - magnitude.denominator.bit_length()
    if Fraction(2) ** exponent > magnitude:
        exponent -= 1
    ulp_exponent = max(exponent - 23, -149)
    mantissa = round_half_even(magnitude / Fraction(2) ** ulp_exponent)
    rounded = Fraction(mantissa) * Fraction(2) ** ulp_exponent
    result = math.inf if rounded >= 2**128 else float(rounded)
    return result if value > 0 else -result


def assert_codes_equal(spec: torch.Tensor, reference) -> None:
    reference = torch.tensor(reference, dtype=torch.int64).reshape(spec.shape)
    differ = spec != reference
    assert torch.equal(spec, reference), (
        f"{int(differ.sum())} of {spec.numel()} differ: spec {spec[differ][:8].tolist()}, "
        f"reference {reference[differ][:8].tolist()}")


# ---------------------------------------------------------------------------------------------------------
# The exact target
# ---------------------------------------------------------------------------------------------------------
def float32_values(rng: np.random.Generator, scale: float) -> np.ndarray:
    """Values around the grid, exact ties (k + 1/2) * scale where float32 holds them, and arbitrary bits."""
    spread = rng.normal(0, 100, size=100) * scale
    ties = (rng.integers(-400, 400, size=100) + 0.5) * np.float64(scale)
    bits = rng.integers(0, 2**32, size=50, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate([spread.astype(np.float32), ties.astype(np.float32), bits])
    return values[np.isfinite(values)]


@SETTINGS
@given(dtype=dtypes, scale=scales(), raw_zp=zero_points, seed=seeds())
def test_exact_quantize_is_round_half_even_of_the_exact_quotient(dtype, scale, raw_zp, seed):
    zp = zero_point(raw_zp, dtype)
    x = float32_values(np.random.default_rng(seed), scale)
    qp = QParams(scale, zp, dtype)
    reference = [clamp(round_half_even(exact(v) / exact(qp.scale)) + zp, qp.qmin, qp.qmax) for v in x]
    assert_codes_equal(TARGET.quantize(torch.from_numpy(x), qp), reference)


@SETTINGS
@given(input_scale=scales(), output_scale=scales(), raw_zp=zero_points, channels=st.integers(1, 5),
       clamp_codes=st.tuples(st.integers(-128, 127), st.integers(-128, 127)), big=st.booleans(), seed=seeds())
def test_exact_requantizer_is_round_half_even_of_the_exact_product(input_scale, output_scale, raw_zp, channels,
                                                                   clamp_codes, big, seed):
    rng = np.random.default_rng(seed)
    zy = zero_point(raw_zp, "int8")
    lo, hi = min(clamp_codes), max(clamp_codes)
    weight_scale = torch.from_numpy(np.where(rng.random(channels) < 0.5, 2.0 ** -rng.integers(0, 12, channels),
                                             10 ** rng.uniform(-4, 0, channels)).astype(np.float32))
    magnitude = 2**31 - 1 if big else 2000
    acc = torch.from_numpy(rng.integers(-magnitude, magnitude + 1, size=(3, channels), dtype=np.int64))
    input_qp, output_qp = QParams(input_scale, 0, "int8"), QParams(output_scale, zy, "int8")
    requantize = TARGET.requantizer("linear", input_qp, weight_scale, output_qp, lo, hi, channel_axis=-1, ndim=2)
    multiplier = [exact(input_qp.scale) * exact(w) / exact(output_qp.scale) for w in weight_scale]
    reference = [[clamp(zy + round_half_even(int(a) * multiplier[c]), lo, hi) for c, a in enumerate(row)]
                 for row in acc.tolist()]
    assert_codes_equal(requantize(acc), reference)


@SETTINGS
@given(scale=scales(), ratio=st.sampled_from([0.5, 0.25, 1.5, 3.0, 0.75]), seed=seeds())
def test_exact_requantizer_rounds_exact_ties_to_even(scale, ratio, seed):
    """acc * M = k + 1/2 exactly: half to even, never away."""
    acc = torch.arange(-64, 65)
    qp = QParams(scale, 0, "int8")
    out = QParams(f32(scale / ratio), 0, "int8")
    requantize = TARGET.requantizer("conv2d", qp, torch.tensor(1.0), out, -128, 127, channel_axis=1, ndim=1)
    multiplier = exact(qp.scale) / exact(out.scale)
    assert_codes_equal(requantize(acc), [clamp(round_half_even(a * multiplier), -128, 127) for a in acc.tolist()])


@SETTINGS
@given(dtype=dtypes, scale_a=scales(), scale_b=scales(), scale_y=scales(),
       raw_zps=st.tuples(zero_points, zero_points, zero_points), ties=st.booleans(), seed=seeds())
def test_exact_add_is_round_half_even_of_the_exact_sum(dtype, scale_a, scale_b, scale_y, raw_zps, ties, seed):
    rng = np.random.default_rng(seed)
    za, zb, zy = (zero_point(z, dtype) for z in raw_zps)
    if ties:
        scale_b, scale_y = scale_a, f32(scale_a * 2)
    lo, hi = DTYPE_RANGES[dtype]
    qa, qb = (torch.from_numpy(rng.integers(lo, hi + 1, size=300)) for _ in range(2))
    a, b, out = QParams(scale_a, za, dtype), QParams(scale_b, zb, dtype), QParams(scale_y, zy, dtype)
    reference = [clamp(zy + round_half_even(((x - za) * exact(a.scale) + (y - zb) * exact(b.scale))
                                            / exact(out.scale)), lo, hi) for x, y in zip(qa.tolist(), qb.tolist())]
    assert_codes_equal(TARGET.add(qa, a, qb, b, out, lo, hi), reference)


@SETTINGS
@given(dtype=dtypes, scale=scales(), out_scale=scales(), raw_zps=st.tuples(zero_points, zero_points),
       ratio=st.sampled_from([None, 0.5, 1.5, 2.5, 1.0]))
def test_exact_rescale_is_round_half_even_of_the_exact_ratio(dtype, scale, out_scale, raw_zps, ratio):
    z, zy = (zero_point(v, dtype) for v in raw_zps)
    if ratio is not None:
        out_scale = f32(scale / ratio)
    lo, hi = DTYPE_RANGES[dtype]
    q = torch.arange(lo, hi + 1)
    source, out = QParams(scale, z, dtype), QParams(out_scale, zy, dtype)
    multiplier = exact(source.scale) / exact(out.scale)
    reference = [clamp(zy + round_half_even((v - z) * multiplier), lo, hi) for v in q.tolist()]
    assert_codes_equal(TARGET.rescale(q, source, out), reference)


def average_pool_reference(codes: np.ndarray, zp: int, attrs: dict) -> np.ndarray:
    """PyTorch's windows and divisors, written out: z + round_half_even(sum(q - z) / divisor)."""
    out_hw = pooling.output_size(codes.shape[-2:], attrs)
    out = np.zeros((*codes.shape[:-2], *out_hw), dtype=np.int64)
    for oy, ox in np.ndindex(*out_hw):
        limits = []
        for o, size, k, s, p in zip((oy, ox), codes.shape[-2:], attrs["kernel_size"], attrs["stride"],
                                    attrs["padding"]):
            start = o * s - p
            end = min(start + k, size + p)
            limits.append((start, end, max(start, 0), min(end, size)))
        (h0, h1, hs, he), (w0, w1, ws, we) = limits
        divisor = (h1 - h0) * (w1 - w0) if attrs["count_include_pad"] else (he - hs) * (we - ws)
        sums = (codes[..., hs:he, ws:we].astype(np.int64) - zp).sum(axis=(-2, -1))
        for index in np.ndindex(*sums.shape):
            out[index + (oy, ox)] = zp + round_half_even(Fraction(int(sums[index]), divisor))
    return out


@SETTINGS
@given(dtype=dtypes, scale=scales(), raw_zp=zero_points, kernel=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), pad=st.tuples(st.integers(0, 2), st.integers(0, 2)),
       ceil_mode=st.booleans(), count_include_pad=st.booleans(), seed=seeds())
def test_exact_average_pool_is_round_half_even_of_the_exact_mean(dtype, scale, raw_zp, kernel, stride, pad,
                                                                 ceil_mode, count_include_pad, seed):
    rng = np.random.default_rng(seed)
    zp = zero_point(raw_zp, dtype)
    lo, hi = DTYPE_RANGES[dtype]
    codes = rng.integers(lo, hi + 1, size=(1, 2, int(rng.integers(kernel[0], 9)), int(rng.integers(kernel[1], 9))))
    attrs = {"kernel_size": kernel, "stride": stride, "padding": tuple(min(p, k // 2) for p, k in zip(pad, kernel)),
             "ceil_mode": ceil_mode, "count_include_pad": count_include_pad}
    spec = TARGET.average_pool(torch.from_numpy(codes), QParams(scale, zp, dtype), attrs)
    assert_codes_equal(spec, average_pool_reference(codes, zp, attrs))


# ---------------------------------------------------------------------------------------------------------
# Exact rational rounding
# ---------------------------------------------------------------------------------------------------------
coefficients = st.one_of(
    st.fractions(min_value=-1000, max_value=1000, max_denominator=64),  # small denominators: exact ties
    scales().map(lambda s: Fraction(s)),
    st.floats(-1e6, 1e6, allow_nan=False, width=32).map(Fraction))


@SETTINGS
@given(coefficient_lists=st.lists(st.lists(coefficients, min_size=3, max_size=3), min_size=1, max_size=3),
       bounds=st.tuples(st.integers(-300, 300), st.integers(-300, 300)), seed=seeds(),
       offset=st.sampled_from([0, 0, -128, 255]))
def test_round_half_even_exact_equals_fraction_rounding(coefficient_lists, bounds, seed, offset):
    rng = np.random.default_rng(seed)
    lo, hi = min(bounds), max(bounds)
    terms = []
    for fractions in coefficient_lists:  # three coefficients broadcast over 40 rows of integers
        k = torch.from_numpy(rng.integers(-2**20, 2**20, size=(40, 3)) // rng.choice([1, 1000, 2**19], size=(40, 3)))
        terms.append((k, ExactRatio.from_fractions(np.array(fractions, dtype=object))))
    reference = [[clamp(round_half_even(sum(int(k[r, c]) * ratio.numerator[c] / Fraction(ratio.denominator[c])
                                            for k, ratio in terms)), lo, hi) + offset for c in range(3)]
                 for r in range(40)]
    assert_codes_equal(round_half_even_exact(terms, lo, hi, zero_point=offset), reference)


def test_round_half_even_exact_decides_ties_closer_than_float64_can_see():
    """1/3 + 1/6 = 1/2 exactly, while the float64 estimate is 0.49999999999999994 or 0.5 by luck."""
    terms = [(torch.tensor([1, 3, 5]), ExactRatio.from_fractions(np.array([Fraction(1, 3)] * 3, dtype=object))),
             (torch.tensor([1, 3, 5]), ExactRatio.from_fractions(np.array([Fraction(1, 6)] * 3, dtype=object)))]
    assert round_half_even_exact(terms, -100, 100).tolist() == [0, 2, 2]


# ---------------------------------------------------------------------------------------------------------
# gemmlowp fixed point
# ---------------------------------------------------------------------------------------------------------
def quantize_multiplier_ref(real: float):
    if real == 0:
        return 0, 0
    fraction, shift = math.frexp(real)
    m0 = round_half_away_ref(Fraction(fraction) * 2**31)
    if m0 == 2**31:
        m0, shift = m0 // 2, shift + 1
    if shift < -31:
        return 0, 0
    return m0, shift


def srdhm_ref(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    product = a * b
    nudge = (1 << 30) if product >= 0 else 1 - (1 << 30)
    return c_division(product + nudge, 1 << 31)


def rounding_divide_by_pot_ref(x: int, exponent: int) -> int:
    return round_half_away_ref(Fraction(x, 2**exponent))


def mbqm_ref(x: int, m0: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    return rounding_divide_by_pot_ref(srdhm_ref(x * 2**left, m0), right)


multipliers = st.one_of(st.floats(1e-12, 1e4), scales().map(lambda s: s / 3),
                        st.sampled_from([0.0, 0.25, 0.5, 1.0, 1 - 2**-40, 2**-31, 2**-32, 2**-33, 0.75 * 2**-31]))


@settings(max_examples=200, deadline=None)
@given(reals=st.lists(multipliers, min_size=1, max_size=20))
def test_quantize_multiplier_equals_python_reference(reals):
    m0, shift = quantize_multiplier(torch.tensor(reals, dtype=torch.float64))
    assert list(zip(m0.tolist(), shift.tolist())) == [quantize_multiplier_ref(r) for r in reals]


int32s = st.one_of(st.integers(INT32_MIN, INT32_MAX), st.sampled_from([INT32_MIN, INT32_MAX, 0, 1, -1, 1 << 30]))


@settings(max_examples=200, deadline=None)
@given(pairs=st.lists(st.tuples(int32s, int32s), min_size=1, max_size=20))
def test_saturating_rounding_doubling_high_mul_equals_python_reference(pairs):
    a, b = (torch.tensor(list(v), dtype=torch.int64) for v in zip(*pairs))
    assert saturating_rounding_doubling_high_mul(a, b).tolist() == [srdhm_ref(x, y) for x, y in pairs]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.tuples(int32s, st.integers(0, 31)), min_size=1, max_size=20))
@example(values=[(x, 1) for x in (-5, -3, -1, 1, 3, 5)] + [(-6, 2), (6, 2), (-2, 2), (2, 2)])
def test_rounding_divide_by_pot_equals_python_reference(values):
    x, exponent = (torch.tensor(list(v), dtype=torch.int64) for v in zip(*values))
    assert rounding_divide_by_pot(x, exponent).tolist() == [rounding_divide_by_pot_ref(v, e) for v, e in values]


@st.composite
def mbqm_cases(draw):
    m0 = draw(st.one_of(st.integers(1 << 30, INT32_MAX), st.just(1 << 30), st.just(0)))
    shift = draw(st.integers(-31, 20))
    bound = INT32_MAX >> max(shift, 0)  # x * 2^shift stays an int32, as the kernels require
    return draw(st.integers(-bound, bound)), m0, shift


@settings(max_examples=200, deadline=None)
@given(cases=st.lists(mbqm_cases(), min_size=1, max_size=20))
@example(cases=[(acc, 1 << 30, -1) for acc in (2, 5, 6, -5, -6)])
def test_multiply_by_quantized_multiplier_equals_python_reference(cases):
    x, m0, shift = (torch.tensor(list(v), dtype=torch.int64) for v in zip(*cases))
    assert multiply_by_quantized_multiplier(x, m0, shift).tolist() == [mbqm_ref(*case) for case in cases]


# ---------------------------------------------------------------------------------------------------------
# float emulation
# ---------------------------------------------------------------------------------------------------------
def float32_neighbours_of_halves() -> list:
    halves = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 1e6 + 0.5, 4194303.5], np.float32)
    return [float(v) for h in halves for v in (np.nextafter(h, np.float32(-np.inf)), h,
                                               np.nextafter(h, np.float32(np.inf)))]


HALF_AWAY_CASES = [0.49999999999999994, -0.49999999999999994, 0.5, -0.5, 2.5, -2.5, 4503599627370495.5,
                   -4503599627370495.5, 2.0**52 + 1, 2.0**53, 1e300, -0.0, 0.0] + float32_neighbours_of_halves()


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False), min_size=1, max_size=20))
@example(values=HALF_AWAY_CASES)
def test_round_half_away_equals_fraction_rounding_for_float64(values):
    spec = round_half_away(torch.tensor(values, dtype=torch.float64))
    assert spec.tolist() == [float(round_half_away_ref(Fraction(v))) for v in values]


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=20))
@example(values=float32_neighbours_of_halves())
def test_round_half_away_equals_fraction_rounding_for_float32(values):
    spec = round_half_away(torch.tensor(values, dtype=torch.float32))
    assert spec.tolist() == [float(round_half_away_ref(Fraction(v))) for v in values]


float32s = st.one_of(st.floats(-2.0**60, 2.0**60, allow_nan=False, width=32),
                     st.integers(-2**24, 2**24).map(float), scales())

# (a, b, c) whose float64 sum a * b + c lands exactly on a float32 midpoint that the exact sum misses:
# (1 + 2^-23)(1 - 2^-23) = 1 - 2^-46, and 2^24 + 2 + 1 - 2^-46 rounds to 2^24 + 2, not to the even 2^24 + 4.
DOUBLE_ROUNDING_TRAPS = [(1 + 2.0**-23, 1 - 2.0**-23, 2.0**24 + 2), (1 + 2.0**-23, 1 - 2.0**-23, -(2.0**24 + 2)),
                         (-(1 + 2.0**-23), 1 - 2.0**-23, -(2.0**24 + 2)), (3.0, 0.1, 0.2), (2.0**-70, 2.0**-70, 0.0)]


@settings(max_examples=200, deadline=None)
@given(triples=st.lists(st.tuples(float32s, float32s, float32s), min_size=1, max_size=20))
@example(triples=DOUBLE_ROUNDING_TRAPS)
@example(triples=[(2.0, 0.5, -1.0), (0.0, 3.0, 0.0)] + DOUBLE_ROUNDING_TRAPS)  # exact zeros beside the traps
def test_fma_f32_equals_the_exact_sum_rounded_once_to_float32(triples):
    a, b, c = (torch.tensor([f32(v) for v in column], dtype=torch.float32) for column in zip(*triples))
    reference = [round_to_float32(exact(x) * exact(y) + exact(z)) for x, y, z in zip(a, b, c)]
    assert torch.equal(fma_f32(a, b, c), torch.tensor(reference, dtype=torch.float32))
def fma_f32_redoing_risky_elements(a, b, c):
    """fma_f32 before its round-to-odd ran in int64 passes: the risky sums found with bool comparisons and redone
    one by one (boolean indexing), with nextafter toward the exact sum."""
    product = a.to(torch.float64) * b.to(torch.float64)
    addend = c.to(torch.float64)
    total = product + addend
    low_bits = total.view(torch.int64) & ((1 << 29) - 1)
    risky = (low_bits == (1 << 28)) | ((total.abs() < 2.0**-125) & (total != 0))
    if bool(risky.any()):
        product, addend = product.expand_as(total)[risky], addend.expand_as(total)[risky]
        part = total[risky]
        virtual = part - product
        error = (product - (part - virtual)) + (addend - virtual)
        needs_odd = (error != 0) & ((part.view(torch.int64) & 1) == 0)
        toward = torch.where(error > 0, torch.full_like(part, float("inf")), torch.full_like(part, float("-inf")))
        total[risky] = torch.where(needs_odd, torch.nextafter(part, toward), part)
    return total.to(torch.float32)


float32_specials = st.sampled_from([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 2.0**-149, -(2.0**-126),
                                    3.4028235e38, 1 + 2.0**-23, 1 - 2.0**-23, 2.0**24 + 2, 0.5])


@settings(max_examples=300, deadline=None)
@given(a=st.lists(float32s | float32_specials, min_size=1, max_size=12),
       c=st.lists(float32s | float32_specials, min_size=1, max_size=12), b=float32s | float32_specials,
       codes=st.booleans())
@example(a=[1 + 2.0**-23, -(1 + 2.0**-23)], c=[2.0**24 + 2, -(2.0**24 + 2), 0.0], b=1 - 2.0**-23, codes=False)
def test_fma_f32_equals_redoing_the_risky_elements_one_by_one(a, c, b, codes):
    """A column times a scalar plus a row (an add table's shape), every bit: NaN payloads, signed zeros,
    infinities, sums near float32's subnormal range and on its midpoints. codes: a column of integer codes."""
    column = torch.tensor([float(round(v)) if codes and math.isfinite(v) and abs(v) < 2**24 else f32(v)
                           for v in a], dtype=torch.float32).reshape(-1, 1)
    row = torch.tensor([f32(v) for v in c], dtype=torch.float32).reshape(1, -1)
    scalar = torch.tensor(f32(b), dtype=torch.float32)
    assert torch.equal(fma_f32(column, scalar, row).view(torch.int32),
                       fma_f32_redoing_risky_elements(column, scalar, row).view(torch.int32))


