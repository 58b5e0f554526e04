"""The integer runtime's lookup tables answer exactly what the function they tabulate computes, for the codes of
any grid (ranges starting at 0, or offset to 0), in the codes' own memory format."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qparity.errors import InvalidParameterError
from qparity.ops.lookup import CodeTable, PairTable
from qparity.numerics import get_target
from qparity.qparams import QParams

SETTINGS = settings(max_examples=60, deadline=None)
ranges = st.one_of(st.sampled_from([(-128, 127), (0, 255), (-128, -128), (127, 127)]),
                   st.tuples(st.integers(-400, 400), st.integers(0, 300)).map(lambda t: (t[0], t[0] + t[1])))


def injective_pair(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    return qa * 100_000 + qb  # distinct for every pair: a misplaced entry shows


def codes_in(low: int, high: int, shape, seed: int) -> torch.Tensor:
    return torch.randint(low, high + 1, shape, generator=torch.Generator().manual_seed(seed))


@SETTINGS
@given(a=ranges, b=ranges, seed=st.integers(0, 2**16), broadcast=st.booleans())
def test_pair_table_equals_the_function_on_raw_codes(a, b, seed, broadcast):
    if not PairTable.fits(*a, *b):
        return
    table = PairTable(injective_pair, *a, *b, broadcast=broadcast)
    qa, qb = codes_in(*a, (3, 4, 5, 6), seed), codes_in(*b, (3, 4, 5, 6), seed + 1)
    assert torch.equal(table(qa, qb), injective_pair(qa, qb))
    corners = torch.tensor([a[0], a[0], a[1], a[1]]), torch.tensor([b[0], b[1], b[0], b[1]])
    assert torch.equal(table(*corners), injective_pair(*corners))


@SETTINGS
@given(grid=ranges, seed=st.integers(0, 2**16))
def test_code_table_equals_the_function_on_raw_codes(grid, seed):
    table = CodeTable(lambda q: q * 7 - 3, *grid)
    q = torch.cat([codes_in(*grid, (50,), seed), torch.tensor(grid)])
    assert torch.equal(table(q), q * 7 - 3)


def test_tables_keep_the_memory_format_of_their_codes():
    qa = codes_in(-128, 127, (2, 3, 4, 5), 0).contiguous(memory_format=torch.channels_last)
    qb = codes_in(-128, 127, (2, 3, 4, 5), 1).contiguous(memory_format=torch.channels_last)
    pair, code = PairTable(injective_pair, -128, 127, -128, 127), CodeTable(lambda q: q + 1, -128, 127)
    assert pair(qa, qb).stride() == qa.stride() and torch.equal(pair(qa, qb), injective_pair(qa, qb))
    assert code(qa).stride() == qa.stride() and torch.equal(code(qa), qa + 1)
    pooled = codes_in(-128, 127, (2, 3, 1, 1), 2)  # broadcast against qa: the index takes qa's layout
    assert torch.equal(pair(qa, pooled), injective_pair(qa, pooled))
    expanded = pooled.expand(2, 3, 4, 5)  # a view with zero strides: gathered as a plain tensor
    assert torch.equal(code(expanded), expanded + 1)
    assert torch.equal(code(qa[:, :, ::2]), qa[:, :, ::2] + 1)  # gapped strides


def test_add_table_of_a_target_equals_its_add():
    target = get_target("tflite")
    a, b, out = QParams(0.05, -3, "int8"), QParams(0.02, 10, "int8"), QParams(0.07, 5, "int8")
    table = PairTable(lambda qa, qb: target.add(qa, a, qb, b, out, -128, 127), -128, 127, -128, 127)
    qa, qb = codes_in(-128, 127, (4, 8, 8, 8), 3), codes_in(-128, 127, (4, 8, 8, 8), 4)
    assert torch.equal(table(qa, qb), target.add(qa, a, qb, b, out, -128, 127))


def test_broadcast_pair_table_refuses_a_function_that_does_not_broadcast():
    with pytest.raises(InvalidParameterError, match=r"shape \(256,\)"):
        PairTable(lambda qa, qb: (qa + qb).reshape(-1)[:256], -128, 127, -128, 127, broadcast=True)


@SETTINGS
@given(a=ranges, b=ranges, seed=st.integers(0, 2**16), broadcast=st.booleans(),
       layout=st.sampled_from(["contiguous", "channels_last"]))
def test_float32_pair_table_answers_float32_codes_with_the_int64_tables_values(a, b, seed, broadcast, layout):
    """The prepared model's tables: float32 entries looked up with float32 codes hold exactly the float32 of what
    the int64 table answers for the int64 codes (the conversion the prepared model makes of any op's codes)."""
    if not PairTable.fits(*a, *b):
        return
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    qa = codes_in(*a, (3, 4, 5, 6), seed).contiguous(memory_format=memory_format)
    qb = codes_in(*b, (3, 4, 5, 6), seed + 1).contiguous(memory_format=memory_format)
    exact = PairTable(injective_pair, *a, *b, broadcast=broadcast)
    fast = PairTable(injective_pair, *a, *b, broadcast=broadcast, dtype=torch.float32)
    answer = fast(qa.to(torch.float32), qb.to(torch.float32))
    assert answer.dtype == torch.float32 and answer.stride() == qa.stride()
    assert torch.equal(answer, exact(qa, qb).to(torch.float32))
    pooled = codes_in(*b, (3, 4, 1, 1), seed + 2)  # broadcast operand
    assert torch.equal(fast(qa.to(torch.float32), pooled.to(torch.float32)), exact(qa, pooled).to(torch.float32))


def test_float32_pair_table_forms_a_large_index_in_int64():
    """A range far from 0 (codes near 2^24 times the span) would round a float32 index: the table takes int64."""
    table = PairTable(injective_pair, 70_000, 70_001, -300, 300, dtype=torch.float32)
    assert not table.float_index_exact
    qa, qb = torch.tensor([70_000, 70_001, 70_001]), torch.tensor([-300, 299, 300])
    assert torch.equal(table(qa.to(torch.float32), qb.to(torch.float32)), injective_pair(qa, qb).to(torch.float32))


@SETTINGS
@given(grid=ranges, seed=st.integers(0, 2**16))
def test_float32_code_table_answers_float32_codes_with_the_int64_tables_values(grid, seed):
    q = torch.cat([codes_in(*grid, (50,), seed), torch.tensor(grid)])
    exact, fast = CodeTable(lambda c: c * 7 - 3, *grid), CodeTable(lambda c: c * 7 - 3, *grid, dtype=torch.float32)
    answer = fast(q.to(torch.float32))
    assert answer.dtype == torch.float32 and torch.equal(answer, exact(q).to(torch.float32))

