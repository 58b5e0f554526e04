"""The native adds (numerics/native_add.py) give the targets' own add codes, on every pair of 8-bit codes.

The integer runtime takes a native loop for an XNNPACK, TFLite, TFLite Micro or ONNX Runtime add whose operands are
codes stored alike; the definitions are `qs8_vadd` (numerics/xnnpack.py), `TFLiteTarget._add` and
`OnnxRuntimeTarget.add_elementwise`, whose tables the runtime used before. These tests hold each loop to its
function with torch.equal on all 65,536 pairs of codes of random grids and clamps (every input the grids admit),
in dense layouts and with several threads, and check what the loops decline.
"""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qparity.errors import UnsupportedOpError
from qparity.numerics import get_target, native
from qparity.numerics.native_add import native_qs8_vadd
from qparity.numerics.xnnpack import ADD_RATIO_RANGE, qs8_vadd
from qparity.qparams import QParams
from test_compiled_rules import every_pair

needs_kernel = pytest.mark.skipif(native.int8_conv() is None,
                                  reason=f"native kernel unavailable here: {native.unavailable_reason()}")
grids = st.tuples(st.floats(1e-3, 1.0), st.integers(-128, 127))


def native_on_every_pair(rule, dtype: torch.dtype, layout: str, threads: int):
    """(a's codes, b's codes, the rule's native loop on them with `threads` threads): every pair of `dtype` codes,
    stored as `layout` says."""
    qa, qb = every_pair(dtype)
    if layout == "transposed":
        qa, qb = qa.t().contiguous().t(), qb.t().contiguous().t()
    elif layout == "channels_last":
        qa, qb = (q.reshape(4, 16, 32, 32).contiguous(memory_format=torch.channels_last) for q in (qa, qb))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return qa, qb, rule.native(qa, qb, *rule.constants, dtype)
    finally:
        torch.set_num_threads(before)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(a=grids, b_ratio=st.floats(2.0**-6, 2.0**6), zero_b=st.integers(-128, 127),
       ratio=st.floats(ADD_RATIO_RANGE[0] * 1.01, ADD_RATIO_RANGE[1] * 0.99), zero_out=st.integers(-128, 127),
       relu=st.booleans(), target=st.sampled_from(["xnnpack", "executorch-xnnpack"]),
       layout=st.sampled_from(["contiguous", "transposed", "channels_last"]), threads=st.sampled_from([1, 2, 3]))
def test_the_native_add_equals_qs8_vadd_on_every_pair_of_codes(a, b_ratio, zero_b, ratio, zero_out, relu, target,
                                                               layout, threads):
    spec = get_target(target)
    grid_a, grid_b = QParams(a[0], a[1]), QParams(a[0] * b_ratio, zero_b)
    grid_out = QParams(max(a[0], a[0] * b_ratio) / ratio, zero_out)
    lo, hi = (zero_out, 127) if relu else (-128, 127)
    try:
        rule = spec.add_rule(grid_a, grid_b, grid_out, lo, hi)
    except UnsupportedOpError:  # a ratio XNNPACK does not delegate: the target refuses the add altogether
        return
    qa, qb, got = native_on_every_pair(rule, torch.int8, layout, threads)
    want = qs8_vadd(qa, qb, *rule.constants[:-1], dtype=torch.int8)  # the sum in int64
    assert rule.constants[-1] == torch.int32  # 8-bit codes: the int32 loop, as XNNPACK's lanes
    assert got is not None and got.stride() == qa.stride()
    assert torch.equal(got, want)
    wide = native_qs8_vadd(qa, qb, *rule.constants[:-1], torch.int64, torch.int8)  # the int64 loop
    assert torch.equal(wide, want)
    assert torch.equal(got.to(torch.int64), spec.add(qa.to(torch.int64), grid_a, qb.to(torch.int64), grid_b,
                                                     grid_out, lo, hi))


@needs_kernel
def test_operands_it_does_not_take_go_to_the_table():
    constants = (3, -5, 1 << 20, 3 << 19, 21, 7, -128, 127)
    qa = torch.randint(-128, 128, (2, 8, 4, 4), dtype=torch.int8)
    channels_last = qa.contiguous(memory_format=torch.channels_last)
    assert native_qs8_vadd(qa, channels_last, *constants, dtype=torch.int8) is None          # stored differently
    assert native_qs8_vadd(qa, qa.to(torch.int64), *constants, dtype=torch.int8) is None     # wide codes
    assert native_qs8_vadd(qa, qa, *constants, dtype=torch.int64) is None                   # a wide result
    broadcast = qa[:, :, :1].expand(2, 8, 4, 4)
    assert native_qs8_vadd(broadcast, broadcast, *constants, dtype=torch.int8) is None      # not dense
    assert native_qs8_vadd(qa[..., ::2], qa[..., ::2], *constants, dtype=torch.int8) is None  # gapped
    assert native_qs8_vadd(qa[:0], qa[:0], *constants, dtype=torch.int8) is None            # empty
    same = native_qs8_vadd(channels_last, channels_last, *constants, dtype=torch.int8)
    assert torch.equal(same, qs8_vadd(channels_last, channels_last, *constants, dtype=torch.int8))


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(a=grids, b_ratio=st.floats(2.0**-8, 2.0**8), zero_b=st.integers(-128, 127), out_ratio=st.floats(2.0**-3, 2.0**3),
       zero_out=st.integers(-128, 127), relu=st.booleans(), target=st.sampled_from(["tflite", "tflite-micro"]),
       layout=st.sampled_from(["contiguous", "transposed"]), threads=st.sampled_from([1, 2]))
def test_the_native_tflite_add_equals_the_target_add_on_every_pair_of_codes(a, b_ratio, zero_b, out_ratio, zero_out,
                                                                           relu, target, layout, threads):
    spec = get_target(target)
    grid_a, grid_b = QParams(a[0], a[1]), QParams(a[0] * b_ratio, zero_b)
    grid_out = QParams((a[0] + a[0] * b_ratio) * out_ratio, zero_out)
    lo, hi = (zero_out, 127) if relu else (-128, 127)
    rule = spec.add_rule(grid_a, grid_b, grid_out, lo, hi)
    qa, qb, got = native_on_every_pair(rule, torch.int8, layout, threads)
    want = spec.add_elementwise(qa.to(torch.int64), grid_a, qb.to(torch.int64), grid_b, grid_out, lo, hi)
    assert got is not None and got.stride() == qa.stride() and got.dtype == torch.int8
    assert torch.equal(got.to(torch.int64), want)


@needs_kernel
@settings(max_examples=60, deadline=None)
@given(a=st.floats(1e-3, 1.0), b_ratio=st.floats(2.0**-8, 2.0**8), out_ratio=st.floats(2.0**-3, 2.0**3),
       dtype=st.sampled_from([torch.int8, torch.uint8]), zeros=st.tuples(*(st.integers(0, 255),) * 3),
       relu=st.booleans(), layout=st.sampled_from(["contiguous", "transposed"]), threads=st.sampled_from([1, 2]))
def test_the_native_onnxruntime_add_equals_the_target_add_on_every_pair_of_codes(a, b_ratio, out_ratio, dtype, zeros,
                                                                                relu, layout, threads):
    spec = get_target("onnxruntime")
    name = "int8" if dtype == torch.int8 else "uint8"
    shift = 128 if dtype == torch.int8 else 0
    grid_a, grid_b = QParams(a, zeros[0] - shift, name), QParams(a * b_ratio, zeros[1] - shift, name)
    grid_out = QParams((a + a * b_ratio) * out_ratio, zeros[2] - shift, name)
    lo, hi = (int(grid_out.zero_point), grid_out.qmax) if relu else (grid_out.qmin, grid_out.qmax)
    rule = spec.add_rule(grid_a, grid_b, grid_out, lo, hi)
    qa, qb, got = native_on_every_pair(rule, dtype, layout, threads)
    want = spec.add_elementwise(qa.to(torch.int64), grid_a, qb.to(torch.int64), grid_b, grid_out, lo, hi)
    assert got is not None and got.stride() == qa.stride() and got.dtype == dtype
    assert torch.equal(got.to(torch.int64), want)
