"""Compiled elementwise rules (Target.add_rule, numerics/compiled.py ElementwiseRule) give the table's codes.

Inside compiled_kernels() the integer runtime computes an add whose target has a rule (XNNPACK's qs8-vadd) as one
compiled loop instead of looking it up in the pair table that the target's own function filled. These tests hold
the compiled loop to that table with torch.equal on every pair of codes of random grids (so on every input the
grids admit), and whole narrow runs of compiled networks to the uncompiled ones, node by node, dtype and strides
included.
"""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import prepare_and_convert
from networks import NETWORKS
from qparity.bench import ResNetish
from qparity.errors import UnsupportedOpError
from qparity.graph import QValue
from qparity.numerics import get_target
from qparity.numerics.compiled import compiled_kernels, run_kernel
from qparity.numerics.xnnpack import ADD_RATIO_RANGE, _vadd_sum_dtype, qs8_vadd
from qparity.ops.lookup import PairTable
from qparity.ops.program import ProgramExecutor
from qparity.qparams import QParams
from test_compiled_kernels import assert_same, compiled_network, inductor, without_native_kernels  # noqa: F401 (autouse fixtures)

RULE_TARGETS = ["xnnpack", "executorch-xnnpack"]


def every_pair(dtype: torch.dtype):
    """Two (n, n) tensors of `dtype` holding every pair of its codes (a's code along rows, b's along columns)."""
    info = torch.iinfo(dtype)
    codes = torch.arange(info.min, info.max + 1, dtype=torch.int64)
    a = codes.reshape(-1, 1).expand(codes.numel(), codes.numel())
    b = codes.reshape(1, -1).expand(codes.numel(), codes.numel())
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


grids = st.tuples(st.floats(1e-3, 1.0), st.integers(-128, 127))
ratios = st.floats(ADD_RATIO_RANGE[0] * 1.01, ADD_RATIO_RANGE[1] * 0.99)


@settings(max_examples=60, deadline=None)
@given(a=grids, b_ratio=st.floats(2.0**-6, 2.0**6), zero_b=st.integers(-128, 127), ratio=ratios,
       zero_out=st.integers(-128, 127), relu=st.booleans(), target=st.sampled_from(RULE_TARGETS))
def test_the_compiled_add_rule_equals_the_pair_table_on_every_pair_of_codes(a, b_ratio, zero_b, ratio, zero_out,
                                                                           relu, target):
    spec = get_target(target)
    grid_a = QParams(a[0], a[1])
    grid_b = QParams(a[0] * b_ratio, zero_b)
    grid_out = QParams(max(a[0], a[0] * b_ratio) / ratio, zero_out)
    lo, hi = (zero_out, 127) if relu else (-128, 127)
    try:
        rule = spec.add_rule(grid_a, grid_b, grid_out, lo, hi)
    except UnsupportedOpError:  # a ratio XNNPACK does not delegate: the target refuses the add altogether
        with pytest.raises(UnsupportedOpError):
            spec.add(torch.zeros(1, dtype=torch.int64), grid_a, torch.zeros(1, dtype=torch.int64), grid_b,
                     grid_out, lo, hi)
        return
    assert rule.function is qs8_vadd and rule.constants[-1] == torch.int32  # 21-bit multipliers, 8-bit codes
    table = PairTable(lambda qa, qb: spec.add_elementwise(qa, grid_a, qb, grid_b, grid_out, lo, hi),
                      -128, 127, -128, 127)
    qa, qb = every_pair(torch.int8)
    expected = table(qa, qb).to(torch.int8)
    with compiled_kernels(min_elements=0):
        got = run_kernel(rule.function, qa, qb, *rule.constants, torch.int8)
    assert_same(expected, got)
    # and the eager rule in int32, as the compiled one runs, gives the int64 codes
    assert_same(expected, rule.function(qa, qb, *rule.constants, torch.int8))


def test_the_add_sum_is_formed_in_int64_where_int32_could_wrap():
    # 16-bit codes: 65535 * 2^21 is past int32, so the rule keeps int64 (XNNPACK's add takes int8 only; the bound is
    # checked for whatever dtype the grids have)
    wide_a, wide_b = QParams(0.01, 0, "int16"), QParams(0.01, 0, "int16")
    constants = (0, 0, 1 << 20, 1 << 20, 20, 0, -32768, 32767)
    assert _vadd_sum_dtype(wide_a, wide_b, constants) == torch.int64
    narrow = QParams(0.01, -128), QParams(0.01, 127)
    assert _vadd_sum_dtype(*narrow, (-128, 127, (1 << 21) - 1, -((1 << 21) - 1), 30, 0, -128, 127)) == torch.int32


def narrow_run(model, codes):
    """Every node's value of a narrow run (what IntegerModel.run computes), inside compiled_kernels() where the
    model is compiled."""
    executor = ProgramExecutor(model.graph, model.target, model._narrow_mode)
    with compiled_kernels(model.compiled):
        executor.run([codes])
    return executor.values


@pytest.mark.parametrize("network", ["resnetish", "mobilenetv3_small", "small_unet"])
@pytest.mark.parametrize("target", RULE_TARGETS)
def test_every_node_of_a_compiled_narrow_run_gives_the_uncompiled_codes(network, target, monkeypatch):
    if network == "resnetish":
        cls, shape = (lambda: ResNetish((16, 32), in_channels=3)), (3, 16, 16)
    else:
        cls, shape = NETWORKS[network]
    integer, fast, kernels, codes = compiled_network(cls, shape, target, 3, monkeypatch)
    expected, got = narrow_run(integer, codes), narrow_run(fast, codes)
    adds = [node.name for node in integer.graph.nodes if node.op == "add" and fast._narrow_mode.rules.get(node.name)]
    if any(node.op == "add" for node in integer.graph.nodes):
        assert adds and qs8_vadd in kernels, "no add ran on its compiled rule"
    for name, value in expected.items():
        if hasattr(value, "codes"):
            assert_same(value.codes, got[name].codes)


def test_operands_stored_differently_keep_the_table(monkeypatch):
    torch.manual_seed(4)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    _, integer = prepare_and_convert(ResNetish((16,), in_channels=3), (batches[0],), "xnnpack", batches)
    mode = integer._narrow_mode
    node = SimpleNamespace(name="probe")  # the rule is kept per node name: not one of the model's nodes
    grid = QParams(0.05, 3)
    spec = integer.target
    rule = lambda out, lo, hi: spec.add_rule(grid, grid, out, lo, hi)  # noqa: E731
    qa = torch.randint(-128, 128, (2, 8, 4, 4), dtype=torch.int8)
    out = (QParams(0.1, -2), -128, 127)
    with compiled_kernels(min_elements=0):
        channels_last = qa.contiguous(memory_format=torch.channels_last)
        assert mode.rule_codes(node, rule, [QValue(qa, grid), QValue(channels_last, grid)], out) is None
        assert mode.rule_codes(node, rule, [QValue(qa, grid), QValue(qa.to(torch.int64), grid)], out) is None
        broadcast = qa[:, :, :1].expand(2, 8, 4, 4)
        assert mode.rule_codes(node, rule, [QValue(broadcast, grid), QValue(broadcast, grid)], out) is None
        same = mode.rule_codes(node, rule, [QValue(channels_last, grid), QValue(channels_last, grid)], out)
    expected = spec.add(channels_last.to(torch.int64), grid, channels_last.to(torch.int64), grid, *out)
    assert_same(expected.to(torch.int8), same)
