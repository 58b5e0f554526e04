"""The one-pass requantizers (`ShiftRequantizer`) equal the fixed-point chains they fold, with torch.equal.

`ShiftRequantizer.gemmlowp` folds TFLite's MultiplyByQuantizedMultiplier (left shift, SRDHM, RoundingDivideByPOT),
the zero point and the clamp into one multiply-add, a sign correction and one shift; `single_rounding` folds
TOSA's apply_scale_32 the same way. Both are held to the unfused reference (`multiply_by_quantized_multiplier`,
`apply_scale_32`, themselves checked against Python integers in test_numerics_exact.py) over the whole Q31
multiplier and shift range, on random values, values at the sign threshold, and the small values where the
roundings meet ties.
"""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qparity.numerics.compiled as compiled
from qparity.errors import InvalidParameterError
from qparity.numerics.arithmetic import (INT32_MAX, INT32_MIN, ExactRatio, ShiftRequantizer, multiply_by_quantized_multiplier,
                                        round_half_even_exact)
from qparity.numerics.tosa import apply_scale_32

SETTINGS = settings(max_examples=300, deadline=None)
q31_multipliers = st.one_of(st.integers(0, INT32_MAX), st.integers(1 << 30, INT32_MAX),
                            st.sampled_from([0, 1, 1 << 30, (1 << 30) + 1, INT32_MAX, 3 << 29]))
zero_points = st.one_of(st.integers(-300, 300), st.integers(-(1 << 40), 1 << 40))
bounds = st.one_of(st.just((-128, 127)), st.just((0, 255)), st.just((INT32_MIN, INT32_MAX)),
                   st.tuples(st.integers(INT32_MIN, INT32_MAX), st.integers(INT32_MIN, INT32_MAX)).map(sorted))


def values_for(draw, limit: int, scale: int, count: int) -> list:
    """Values in [-limit, limit]: anywhere, near 0 at the granularity `scale` where ties live, and the ends."""
    near_zero = st.integers(-min(limit, 4 * scale), min(limit, 4 * scale))
    anywhere = st.integers(-limit, limit)
    ends = st.sampled_from(sorted({-limit, limit, -min(limit, 1), 0, min(limit, 1)}))
    return draw(st.lists(st.one_of(anywhere, near_zero, ends),
                         min_size=count, max_size=count))


@st.composite
def gemmlowp_cases(draw):
    channels = draw(st.integers(1, 4))
    m0 = draw(st.lists(q31_multipliers, min_size=channels, max_size=channels))
    shift = draw(st.lists(st.integers(-31, 30), min_size=channels, max_size=channels))
    rows = draw(st.integers(1, 12))
    columns = []
    for m, s in zip(m0, shift):
        limit = INT32_MAX >> max(s, 0)  # x * 2^left stays an int32, as TFLite's kernels require
        columns.append(values_for(draw, limit, 1 << max(-s, 0), rows))
    x = torch.tensor(columns, dtype=torch.int64).T.reshape(rows, channels)
    return x, torch.tensor(m0).reshape(1, channels), torch.tensor(shift).reshape(1, channels), \
        draw(zero_points), draw(bounds)


@SETTINGS
@given(case=gemmlowp_cases())
@example(case=(torch.tensor([[-3], [-2], [-1], [0], [1], [2], [3]]), torch.tensor([[1 << 30]]), torch.tensor([[-1]]),
               0, (INT32_MIN, INT32_MAX)))
@example(case=(torch.tensor([[-7, -7], [-6, -6], [-5, -5], [6, 6]]), torch.tensor([[1 << 30, (1 << 30) + 1]]),
               torch.tensor([[-2, -2]]), 255, (INT32_MIN, INT32_MAX)))
@example(case=(torch.tensor([[INT32_MIN], [INT32_MAX]]), torch.tensor([[INT32_MAX]]), torch.tensor([[-31]]),
               -(1 << 40), (INT32_MIN, INT32_MAX)))
def test_gemmlowp_shift_requantizer_equals_multiply_by_quantized_multiplier(case):
    x, m0, shift, zero_point, (lo, hi) = case
    expected = multiply_by_quantized_multiplier(x, m0, shift).add_(zero_point).clamp_(lo, hi)
    assert torch.equal(ShiftRequantizer.gemmlowp(m0, shift, zero_point, lo, hi)(x), expected)


@st.composite
def single_rounding_cases(draw):
    channels = draw(st.integers(1, 4))
    multiplier = draw(st.lists(q31_multipliers, min_size=channels, max_size=channels))
    shift = draw(st.lists(st.integers(1, 62), min_size=channels, max_size=channels))
    rows = draw(st.integers(1, 12))
    # apply_scale_32 REQUIREs -2^(shift - 1) <= x < 2^(shift - 1); RESCALE's input is an int32
    columns = [values_for(draw, min(INT32_MAX, (1 << (s - 1)) - 1), 1 << max(s - 31, 0), rows) for s in shift]
    x = torch.tensor(columns, dtype=torch.int64).T.reshape(rows, channels)
    return x, torch.tensor(multiplier).reshape(1, channels), torch.tensor(shift).reshape(1, channels), \
        draw(zero_points), draw(bounds)


@SETTINGS
@given(case=single_rounding_cases())
@example(case=(torch.tensor([[-1], [0], [1]]), torch.tensor([[INT32_MAX]]), torch.tensor([[62]]), 255, (-128, 127)))
def test_single_rounding_shift_requantizer_equals_apply_scale_32(case):
    x, multiplier, shift, zero_point, (lo, hi) = case
    expected = apply_scale_32(x, multiplier, shift).add_(zero_point).clamp_(lo, hi)
    assert torch.equal(ShiftRequantizer.single_rounding(multiplier, shift, zero_point, lo, hi)(x), expected)


def test_shift_requantizers_keep_the_memory_format():
    x = torch.randint(-2**20, 2**20, (2, 3, 4, 5)).contiguous(memory_format=torch.channels_last)
    m0, shift = torch.full((1, 3, 1, 1), 1 << 30), torch.tensor([-3, 0, 2]).reshape(1, 3, 1, 1)
    for requantize in (ShiftRequantizer.gemmlowp(m0, shift, 5, -128, 127),
                       ShiftRequantizer.single_rounding(m0, shift.abs() + 1, 5, -128, 127)):
        assert requantize(x).stride() == x.stride()


def test_a_scalar_requantizer_serves_any_shape():
    x = torch.arange(-1000, 1000).reshape(4, 5, 100)
    m0, shift = torch.tensor(1518500250), torch.tensor(-7)
    expected = multiply_by_quantized_multiplier(x, m0, shift).add_(-3).clamp_(-128, 127)
    assert torch.equal(ShiftRequantizer.gemmlowp(m0, shift, -3, -128, 127)(x), expected)


@pytest.mark.parametrize("m0", [-1, -(1 << 30), INT32_MIN, 1 << 31])
def test_gemmlowp_shift_requantizer_refuses_multipliers_outside_q31(m0):
    with pytest.raises(InvalidParameterError, match="outside"):
        ShiftRequantizer.gemmlowp(torch.tensor([m0]), torch.tensor([-1]), 0, -128, 127)


def test_shift_requantizers_take_float32_accumulators_and_leave_their_input_alone():
    acc = torch.arange(-(1 << 20), 1 << 20, 997, dtype=torch.int64).reshape(1, -1)
    m0, shift = torch.tensor([[1 << 30]]), torch.tensor([[-5]])
    requantize = ShiftRequantizer.gemmlowp(m0, shift, 7, -128, 127)
    expected = multiply_by_quantized_multiplier(acc, m0, shift).add_(7).clamp_(-128, 127)
    as_float = acc.to(torch.float32)  # exact integers, as the conv accumulators are
    for values in (acc, as_float):
        before = values.clone()
        assert torch.equal(requantize(values), expected)
        assert torch.equal(values, before)


def whole_and_chunked(requantize, x, monkeypatch, block_elements):
    """(one call, the call in blocks of about block_elements elements along the first dimension)."""
    monkeypatch.setattr(compiled, "CHUNK_ELEMENTS", 1 << 62)
    whole = requantize(x)
    monkeypatch.setattr(compiled, "CHUNK_ELEMENTS", block_elements)
    return whole, requantize(x)


@SETTINGS
@given(case=gemmlowp_cases(), block=st.integers(1, 30), narrow=st.booleans())
def test_shift_requantizer_in_blocks_equals_one_call(case, block, narrow):
    x, m0, shift, zero_point, (lo, hi) = case
    requantize = ShiftRequantizer.gemmlowp(m0, shift, zero_point, lo, hi)
    dtype = torch.int8 if narrow and -128 <= lo and hi <= 127 else torch.int64
    with pytest.MonkeyPatch.context() as monkeypatch:
        whole, chunked = whole_and_chunked(lambda v: requantize(v, dtype), x, monkeypatch, block)
    assert torch.equal(chunked, whole) and chunked.dtype == whole.dtype and chunked.stride() == whole.stride()


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "sliced", "batch_constants"])
def test_shift_requantizer_blocks_keep_the_layout_or_run_whole(layout, monkeypatch):
    x = torch.randint(-2**20, 2**20, (7, 3, 4, 5))
    m0, shift = torch.full((1, 3, 1, 1), 1 << 30), torch.tensor([-3, 0, 2]).reshape(1, 3, 1, 1)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, 1:3]
    elif layout == "batch_constants":  # a constant that varies along the first dimension: no blocks
        m0 = torch.full((7, 3, 1, 1), 1 << 30)
    requantize = ShiftRequantizer.gemmlowp(m0, shift, 5, -128, 127)
    calls = []
    monkeypatch.setattr(compiled, "CHUNK_ELEMENTS", 1 << 62)
    whole = requantize(x)
    rule = ShiftRequantizer.requantize
    monkeypatch.setattr(ShiftRequantizer, "requantize", staticmethod(lambda v, *a: calls.append(v.shape) or rule(v, *a)))
    monkeypatch.setattr(compiled, "CHUNK_ELEMENTS", 2 * x[0].numel())
    chunked = requantize(x)
    assert torch.equal(chunked, whole) and chunked.stride() == whole.stride()
    assert len(calls) == (4 if layout in ("channels_last", "contiguous") else 1)


@SETTINGS
@given(channels=st.integers(1, 5), rows=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1 << 4, 1 << 16, 1 << 24]), zero_point=st.integers(-128, 127),
       binary=st.booleans(), block=st.integers(1, 40))
def test_exact_rounding_in_blocks_equals_one_call(channels, rows, seed, magnitude, zero_point, binary, block):
    """round_half_even_exact's one-pass common case in blocks: the codes and the farthest distance from a tie
    (a maximum over the blocks) decide as one call does, ties included."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-magnitude, magnitude, (rows, channels), generator=g).to(torch.float32)
    if binary:  # short binary fractions: exact ties, which send the whole tensor to the exact path
        scales = torch.exp2(torch.randint(-12, 0, (1, channels), generator=g).to(torch.float32))
    else:
        scales = torch.rand(1, channels, generator=g) * 0.01 + 1e-6
    ratio = ExactRatio.of_scales([scales], [torch.tensor(0.05)])
    lo, hi = -128 - zero_point, 127 - zero_point

    def requantize(x):
        return round_half_even_exact([(x, ratio)], lo, hi, zero_point=zero_point, dtype=torch.int8)

    with pytest.MonkeyPatch.context() as monkeypatch:
        whole, chunked = whole_and_chunked(requantize, k, monkeypatch, block)
    assert torch.equal(chunked, whole) and chunked.dtype == torch.int8 and chunked.stride() == whole.stride()


def test_blocks_combine_a_rules_scalar_results_as_maxima(monkeypatch):
    def rule(v, factor):
        return v * factor, v.abs().max()

    x = torch.zeros(9, 4, dtype=torch.int64)
    x[8, 3] = -50  # the largest magnitude in the last block
    monkeypatch.setattr(compiled, "CHUNK_ELEMENTS", 8)
    codes, largest = compiled.run_kernel(rule, x, torch.full((1, 4), 3), chunked=True)
    assert torch.equal(codes, x * 3) and int(largest) == 50
