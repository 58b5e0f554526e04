"""The prepared model's tables for code-only ops (add, hardswish): the same codes as the target's own function,
reused only while every grid stays the same."""
import types

import torch
from hypothesis import given, strategies as st

import qparity as qp
from qparity.numerics import get_target
from qparity.graph import Node, QValue
from qparity.ops.program import FakeQuant, build_table
from qparity.qparams import QParams

ADD_TARGETS = [t for t in qp.TARGETS if get_target(t).elementwise_add((4096,), (4096,))]
TERM_ADD_TARGETS = [t for t in ADD_TARGETS if get_target(t).add_from_code_terms]
HARDSWISH_TARGETS = [t for t in qp.TARGETS if get_target(t).elementwise_hardswish(4096)]

# Scales within a factor of 10 of each other: XNNPACK refuses add ratios far from 1.
grids = st.builds(lambda scale, zero_point, dtype: QParams(scale, zero_point if dtype == "int8" else zero_point + 128,
                                                           dtype),
                  st.floats(0.01, 0.1), st.integers(-128, 127), st.sampled_from(["int8", "uint8"]))


def add_table_kind(target) -> str:
    """The table the add operator asks for on this target (ops/add.py)."""
    return "pair_terms" if target.add_from_code_terms else "pair"


def fake_mode():
    return FakeQuant(types.SimpleNamespace(fake_tables={}))


def codes_on(grid: QParams, n: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(grid.qmin, grid.qmax + 1, (n,), generator=generator)


@given(st.sampled_from(ADD_TARGETS), grids, grids, grids, st.integers(0, 2**31))
def test_fake_add_table_equals_the_targets_add_and_is_rebuilt_when_a_grid_moves(target_name, a, b, out, seed):
    target = get_target(target_name)
    mode, node = fake_mode(), Node("add_1", "add")
    n = 2 * 256 * 256  # large enough for the table
    qa, qb = codes_on(a, n, seed), codes_on(b, n, seed + 1)

    def add(grid_out, function):
        return lambda vs: function(vs[0].codes, vs[0].qparams, vs[1].codes, vs[1].qparams, grid_out,
                                   grid_out.qmin, grid_out.qmax)

    for grid_b, grid_out in ((b, out), (b, out), (QParams(float(b.scale) * 1.5, int(b.zero_point), b.dtype), out),
                             (b, QParams(out.scale, int(out.zero_point) // 2, out.dtype))):
        inputs = [QValue(qa, a), QValue(qb, grid_b)]
        # The table tabulates add_elementwise (ops/add.py), on a column and a row of codes for "pair_terms".
        result = mode.tabulated(node, add_table_kind(target), inputs, add(grid_out, target.add_elementwise),
                                (grid_out, grid_out.qmin, grid_out.qmax))
        assert torch.equal(result, add(grid_out, target.add)(inputs))


@given(st.sampled_from(HARDSWISH_TARGETS), grids, grids, st.integers(0, 2**31))
def test_fake_hardswish_table_equals_the_targets_hardswish_and_is_rebuilt_when_a_grid_moves(target_name, x, out,
                                                                                              seed):
    target = get_target(target_name)
    mode, node = fake_mode(), Node("hardswish_1", "hardswish")
    q = codes_on(x, 1000, seed)
    hardswish = lambda vs, grid_out: target.hardswish(vs[0].codes, vs[0].qparams, grid_out)  # noqa: E731
    for grid_x, grid_out in ((x, out), (x, out), (QParams(float(x.scale) * 0.75, int(x.zero_point), x.dtype), out)):
        inputs = [QValue(q, grid_x)]
        result = mode.tabulated(node, "code", inputs, lambda vs: hardswish(vs, grid_out),
                                (grid_out, grid_out.qmin, grid_out.qmax))
        assert torch.equal(result, hardswish(inputs, grid_out))


def test_fake_table_is_reused_while_the_grids_stay_the_same_and_replaced_when_they_move():
    target = get_target("tflite")
    mode, node = fake_mode(), Node("add_1", "add")
    a, b, out = QParams(0.05, 3), QParams(0.07, -5), QParams(0.1, -2)
    qa, qb = codes_on(a, 2 * 256 * 256, 0), codes_on(b, 2 * 256 * 256, 1)
    add = lambda vs: target.add(vs[0].codes, vs[0].qparams, vs[1].codes, vs[1].qparams, out, -128, 127)  # noqa: E731
    mode.tabulated(node, "pair", [QValue(qa, a), QValue(qb, b)], add, (out, -128, 127))
    first = mode.model.fake_tables["add_1"][1]
    mode.tabulated(node, "pair", [QValue(qa, a), QValue(qb, b)], add, (out, -128, 127))
    assert mode.model.fake_tables["add_1"][1] is first
    moved = QParams(0.05000001, 3)
    mode.tabulated(node, "pair", [QValue(qa, moved), QValue(qb, b)], add, (out, -128, 127))
    assert mode.model.fake_tables["add_1"][1] is not first


def test_fake_mode_computes_small_tensors_directly():
    target = get_target("tflite")
    mode, node = fake_mode(), Node("add_1", "add")
    a, b, out = QParams(0.05, 3), QParams(0.07, -5), QParams(0.1, -2)
    add = lambda vs: target.add(vs[0].codes, vs[0].qparams, vs[1].codes, vs[1].qparams, out, -128, 127)  # noqa: E731
    inputs = [QValue(codes_on(a, 100, 0), a), QValue(codes_on(b, 100, 1), b)]
    assert torch.equal(mode.tabulated(node, "pair", inputs, add, (out, -128, 127)), add(inputs))
    assert "add_1" not in mode.model.fake_tables


@given(st.sampled_from([t for t in ADD_TARGETS if get_target(t).elementwise_add((8, 64, 16, 16), (8, 64, 1, 1))]),
       grids, grids, grids, st.integers(0, 2**31))
def test_fake_add_table_of_a_broadcast_add_equals_the_targets_add(target_name, a, b, out, seed):
    target = get_target(target_name)
    mode, node = fake_mode(), Node("add_1", "add")
    qa = codes_on(a, 8 * 64 * 16 * 16, seed).reshape(8, 64, 16, 16)
    qb = codes_on(b, 8 * 64, seed + 1).reshape(8, 64, 1, 1)
    inputs = [QValue(qa, a), QValue(qb, b)]
    add = lambda vs: target.add(vs[0].codes, vs[0].qparams, vs[1].codes, vs[1].qparams,  # noqa: E731
                                out, out.qmin, out.qmax)
    result = mode.tabulated(node, add_table_kind(target), inputs, add, (out, out.qmin, out.qmax))
    assert torch.equal(result, add(inputs))
    assert "add_1" in mode.model.fake_tables


@st.composite
def add_grids(draw, target):
    """Input and output grids in one of the target's activation dtypes, and a clamp within the output's range."""
    dtype = draw(st.sampled_from(target.activation_dtypes))
    offset = 0 if dtype == "int8" else 128
    a, b, out = (QParams(draw(st.floats(0.01, 0.1)), draw(st.integers(-128, 127)) + offset, dtype) for _ in range(3))
    lo = draw(st.integers(out.qmin, out.qmax))
    return a, b, out, lo, draw(st.integers(lo, out.qmax))


@given(st.data())
def test_add_table_from_per_code_terms_equals_the_targets_add_on_every_code_pair(data):
    """The table from a column of a's codes and a row of b's (each input's term once per code, the output rescale
    on the broadcast sums) holds the target's add of every pair of codes, computed pair by pair."""
    target = get_target(data.draw(st.sampled_from(TERM_ADD_TARGETS)))
    a, b, out, lo, hi = data.draw(add_grids(target))
    table = build_table("pair_terms", [a, b],
                        lambda vs: target.add_elementwise(vs[0].codes, a, vs[1].codes, b, out, lo, hi))
    qa = torch.arange(a.qmin, a.qmax + 1).repeat_interleave(b.qmax - b.qmin + 1)
    qb = torch.arange(b.qmin, b.qmax + 1).repeat(a.qmax - a.qmin + 1)
    assert torch.equal(table.table, target.add(qa, a, qb, b, out, lo, hi))
    assert torch.equal(table(qa, qb), target.add(qa, a, qb, b, out, lo, hi))


@given(st.sampled_from(ADD_TARGETS), grids, grids, grids, st.integers(0, 2**31))
def test_fake_add_table_answers_the_prepared_models_float32_codes_in_float32(target_name, a, b, out, seed):
    """The prepared model's codes are float32: its table takes them as they are and answers float32 codes, the
    float32 of the target's add on the int64 codes (what emit would make of them)."""
    target = get_target(target_name)
    mode, node = fake_mode(), Node("add_1", "add")
    n = 2 * 256 * 256
    qa, qb = codes_on(a, n, seed), codes_on(b, n, seed + 1)
    add = lambda vs: target.add_elementwise(vs[0].codes.to(torch.int64), vs[0].qparams,  # noqa: E731
                                            vs[1].codes.to(torch.int64), vs[1].qparams, out, out.qmin, out.qmax)
    inputs = [QValue(qa.to(torch.float32), a), QValue(qb.to(torch.float32), b)]
    result = mode.tabulated(node, add_table_kind(target), inputs, add, (out, out.qmin, out.qmax))
    assert "add_1" in mode.model.fake_tables
    assert result.dtype == torch.float32
    assert torch.equal(result, target.add(qa, a, qb, b, out, out.qmin, out.qmax).to(torch.float32))
