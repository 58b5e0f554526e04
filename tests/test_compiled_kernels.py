"""Compiled kernels (numerics/compiled.py) compute the eager rules' codes, in the eager rules' layout.

Each requantizer compiled is the rule's own function; these tests hold the compiled loop to the eager run with
torch.equal over the whole constant range (the hypothesis cases of test_fused_requantizers.py, whose eager runs
are themselves pinned to the unfused fixed-point chains there), and whole compiled models to uncompiled ones.
"""
import os
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qparity as qp
import qparity.numerics.compiled as compiled
from qparity.numerics import native
from helpers import prepare_and_convert
from networks import NETWORKS
from qparity.bench import ResNetish
from qparity.numerics.arithmetic import ExactRatio, ShiftRequantizer, float32_requantizer, round_half_even_exact
from qparity.numerics.compiled import CompiledKernelsUnavailableError, compiled_kernels
from test_fused_requantizers import gemmlowp_cases, single_rounding_cases

SETTINGS = settings(max_examples=100, deadline=None)
EMULATED_TARGETS = ["tflite", "tflite-micro", "tosa", "xnnpack", "executorch-xnnpack", "onnxruntime", "exact"]


@pytest.fixture(scope="module", autouse=True)
def without_native_kernels():
    """The compiled kernels are the path of machines without the native fused kernels (numerics/native): these
    tests turn those off, so that every layer and add of the models here runs the rule compiled."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(native, "int8_conv", lambda: None)
        yield


@pytest.fixture(scope="module", autouse=True)
def inductor():
    """The compiler these kernels need; CI (QPARITY_REQUIRE_OPTIONAL_RUNTIMES=1) has it, so there it must work.
    Past dynamo's recompile limit a rule would quietly run eagerly, and a comparison with the eager run would
    prove nothing: here every variant the cases need is compiled, or the test fails."""
    problem = compiled._availability_problem()
    if problem:
        if os.environ.get("QPARITY_REQUIRE_OPTIONAL_RUNTIMES") == "1":
            pytest.fail(f"torch.compile cannot build kernels here: {problem}", pytrace=False)
        pytest.skip(f"torch.compile cannot build kernels here: {problem}")
    with torch._dynamo.config.patch(recompile_limit=256, fail_on_recompile_limit_hit=True):
        yield


def both_ways(rule, x):
    """(eager result, compiled result) of rule(x), the compiled kernel taken whatever the size."""
    expected = rule(x)
    with compiled_kernels(min_elements=0):
        return expected, rule(x)


def assert_same(expected, got):
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {expected.numel()} codes differ"
    assert got.dtype == expected.dtype
    # the layout: equal strides wherever a stride means something (a dimension of one element has none)
    assert [s for s, n in zip(got.stride(), got.shape) if n > 1] == \
        [s for s, n in zip(expected.stride(), expected.shape) if n > 1]


def narrow_dtype_for(lo: int, hi: int) -> torch.dtype:
    """The smallest integer dtype holding [lo, hi]: what the integer runtime's narrow codes on such a grid are."""
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype
    return torch.int64


def assert_narrow_output_same(requantize, x, lo: int, hi: int):
    """requantize(x, dtype) for the grid's narrow dtype: the int64 codes converted, eagerly and compiled alike."""
    dtype = narrow_dtype_for(lo, hi)
    if dtype not in (torch.int8, torch.uint8):  # the 8-bit grids' dtypes: each other one is one more kernel
        return
    eager, fast = both_ways(lambda v: requantize(v, dtype), x)
    assert_same(requantize(x).to(dtype), eager)
    assert_same(eager, fast)


def widened(x: torch.Tensor) -> torch.Tensor:
    """x with at least two rows and columns (a per-tensor case's one column repeated): every case then runs on the
    kernels real layers use, instead of one compiled variant per size-one dimension."""
    return x.repeat(2 if x.shape[0] == 1 else 1, 3 if x.shape[1] == 1 else 1)


@SETTINGS
@given(case=gemmlowp_cases(), as_float=st.booleans())
def test_compiled_gemmlowp_requantizer_equals_the_eager_one(case, as_float):
    x, m0, shift, zero_point, (lo, hi) = case
    x = widened(x)
    if as_float:  # conv accumulators come as float32 holding exact integers (|x| <= 2^24)
        x = x.clamp(-(1 << 24), 1 << 24).to(torch.float32)
    requantize = ShiftRequantizer.gemmlowp(m0, shift, zero_point, lo, hi)
    assert_same(*both_ways(requantize, x))
    assert_narrow_output_same(requantize, x, lo, hi)


@SETTINGS
@given(case=single_rounding_cases())
def test_compiled_single_rounding_requantizer_equals_the_eager_one(case):
    x, multiplier, shift, zero_point, (lo, hi) = case
    x = widened(x)
    requantize = ShiftRequantizer.single_rounding(multiplier, shift, zero_point, lo, hi)
    assert_same(*both_ways(requantize, x))
    assert_narrow_output_same(requantize, x, lo, hi)


@SETTINGS
@given(channels=st.integers(2, 5), rows=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1 << 8, 1 << 20, 1 << 24, 1 << 30]), zero_point=st.integers(-128, 255),
       bounds=st.sampled_from([(-128, 127), (0, 255), (0, 127)]))
def test_compiled_float32_requantizer_equals_the_eager_one(channels, rows, seed, magnitude, zero_point, bounds):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-magnitude, magnitude + 1, (rows, channels), generator=g)
    # multipliers from 2^-30 to 2^2, and values on the rounding ties of the small ones
    multiplier = torch.exp2(torch.randint(-30, 3, (1, channels), generator=g).to(torch.float32)) \
        * (1 + torch.rand(1, channels, generator=g))
    requantize = float32_requantizer(multiplier, zero_point, *bounds)
    for x in (acc, acc.to(torch.float32)):
        assert_same(*both_ways(requantize, x))
        assert_narrow_output_same(requantize, x, *bounds)


@SETTINGS
@given(channels=st.integers(2, 5), rows=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1 << 8, 1 << 20, 1 << 24, 1 << 30]), zero_point=st.integers(-128, 255),
       bounds=st.sampled_from([(-128, 127), (0, 255), (0, 127)]), channels_last=st.booleans())
def test_a_float32_requantizer_consuming_its_accumulator_gives_the_same_codes(channels, rows, seed, magnitude,
                                                                            zero_point, bounds, channels_last):
    """`consume` (the integer layer's call: the accumulator is its own temporary) scales a float32 accumulator in
    place eagerly; the codes, dtype and layout are `requantize`'s. Compiled, it leaves the accumulator alone."""
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-magnitude, magnitude + 1, (rows, channels, 2, 3), generator=g).to(torch.float32)
    if channels_last:
        acc = acc.contiguous(memory_format=torch.channels_last)
    multiplier = (torch.exp2(torch.randint(-30, 3, (1, channels, 1, 1), generator=g).to(torch.float32))
                  * (1 + torch.rand(1, channels, 1, 1, generator=g)))
    requantize = float32_requantizer(multiplier, zero_point, *bounds)
    for dtype in (torch.int64, narrow_dtype_for(*bounds)):
        expected = requantize(acc, dtype)
        scratch = acc.clone()
        assert_same(expected, requantize.consume(scratch, dtype))
        assert torch.equal(scratch, expected.to(torch.float32))  # the passes ran in it: the codes, as floats
        scratch = acc.clone()
        with compiled_kernels(min_elements=0):
            assert_same(expected, requantize.consume(scratch, dtype))
        assert torch.equal(scratch, acc)
    as_int64 = acc.to(torch.int64)  # an integer accumulator is converted, never overwritten
    assert_same(requantize(as_int64), requantize.consume(as_int64))
    assert torch.equal(as_int64, acc.to(torch.int64))


@SETTINGS
@given(channels=st.integers(2, 5), rows=st.integers(2, 40), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1 << 4, 1 << 16, 1 << 24, 1 << 31]), zero_point=st.integers(-128, 255),
       binary=st.booleans(), as_float=st.booleans())
def test_compiled_exact_rounding_equals_the_eager_one(channels, rows, seed, magnitude, zero_point, binary, as_float):
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-magnitude, magnitude, (rows, channels), generator=g)
    if as_float:
        k = k.clamp(-(1 << 24), 1 << 24).to(torch.float32)
    if binary:  # short binary fractions: ties everywhere, decided by the exact path after the one-pass kernel
        scales = torch.exp2(torch.randint(-12, 0, (1, channels), generator=g).to(torch.float32))
    else:
        scales = torch.rand(1, channels, generator=g) * 0.01 + 1e-6
    ratio = ExactRatio.of_scales([scales], [torch.tensor(0.05)])
    lo, hi = -128 - zero_point, 127 - zero_point
    def requantize(x, dtype=torch.int64):
        return round_half_even_exact([(x, ratio)], lo, hi, zero_point=zero_point, dtype=dtype)

    assert_same(*both_ways(requantize, k))
    assert_narrow_output_same(requantize, k, -128, 127)


@pytest.mark.parametrize("dtype, lo, hi", [(torch.int16, -32768, 32767), (torch.int32, -(2**31), 2**31 - 1),
                                           (torch.uint8, 0, 255)])
def test_compiled_exact_rounding_gives_wide_codes_exactly(dtype, lo, hi):
    """The compiled one-term rounding converts 8- and 16-bit codes through float32 (exact below 2^24) and wider ones
    directly: codes at the ends of each dtype's range, and past 2^24, come back as the eager run's."""
    k = torch.tensor([[lo, hi], [lo + 1, hi - 1], [(lo + hi) // 2, 3], [2**24 + 1, -(2**24) - 1]],
                     dtype=torch.int64).repeat(4, 1)
    ratio = ExactRatio.of_scales([torch.tensor([0.05, 0.05])], [torch.tensor(0.05)])  # exactly 1: k itself

    def requantize(x, out=torch.int64):
        return round_half_even_exact([(x, ratio)], lo, hi, dtype=out)

    eager, fast = both_ways(lambda x: requantize(x, dtype), k)
    assert_same(k.clamp(lo, hi).to(dtype), eager)
    assert_same(eager, fast)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "sliced"])
def test_compiled_requantizers_keep_the_memory_format(layout):
    x = torch.randint(-2**20, 2**20, (2, 3, 6, 5))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, 1:5]
    m0, shift = torch.full((1, 3, 1, 1), 1 << 30), torch.tensor([-3, 0, 2]).reshape(1, 3, 1, 1)
    for requantize in (ShiftRequantizer.gemmlowp(m0, shift, 5, -128, 127),
                       ShiftRequantizer.single_rounding(m0, shift.abs() + 1, 5, -128, 127),
                       float32_requantizer(torch.tensor([0.01, 0.5, 3.0]).reshape(1, 3, 1, 1), 5, -128, 127)):
        assert_same(*both_ways(requantize, x))


def compiled_twin(integer):
    """The same model loaded again, compiled."""
    return qp.IntegerModel(integer.graph, integer.target, integer.activation_dtype, integer.qparams,
                           integer.layers).compile()


def compiled_network(cls, shape, target: str, seed: int, monkeypatch):
    """(the model of cls() converted for target, its compiled twin, the rules compiled so far: a list the kernels
    fill as they run, input codes of a batch of two), every rule on its compiled kernel whatever the size."""
    torch.manual_seed(seed)
    batches = [torch.randn(2, *shape) for _ in range(2)]
    _, integer = prepare_and_convert(cls(), (batches[0],), target, batches)
    fast = compiled_twin(integer)
    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 0)
    kernels, compile_rule = [], compiled._compiled
    monkeypatch.setattr(compiled, "_compiled", lambda rule: kernels.append(rule) or compile_rule(rule))
    return integer, fast, kernels, integer.quantize(batches[1])


@pytest.mark.parametrize("target", EMULATED_TARGETS + ["fbgemm", "x86", "qnnpack"])
def test_compiled_model_gives_the_codes_of_the_uncompiled_one(target):
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    _, integer = prepare_and_convert(ResNetish((16, 32, 64), in_channels=3), (batches[0],), target, batches)
    fast = compiled_twin(integer)
    assert "compiled kernels" in repr(fast) and "compiled kernels" not in repr(integer)
    for x in (batches[0], torch.randn(6, 3, 32, 32) * 3, batches[1][:1]):  # above and below MIN_ELEMENTS
        codes = integer.quantize(x)
        assert_same(integer.run(codes), fast.run(codes))


@pytest.mark.parametrize("network", ["mobilenetv3_small", "small_unet", "temporal_conv_net"])
@pytest.mark.parametrize("target", ["tflite", "tosa", "xnnpack", "exact"])
def test_every_node_of_a_compiled_network_gives_the_uncompiled_codes(network, target, monkeypatch):
    integer, fast, kernels, codes = compiled_network(*NETWORKS[network], target, 1, monkeypatch)
    expected, got = integer.executor(), fast.executor()
    expected.run([codes.to(torch.int64)])
    with compiled_kernels():
        got.run([codes.to(torch.int64)])
    assert kernels, "no requantization ran on a compiled kernel"
    for name, value in expected.values.items():
        if hasattr(value, "codes"):
            assert_same(value.codes, got.values[name].codes)


def test_a_compiled_model_is_usable_from_several_threads():
    torch.manual_seed(2)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    _, integer = prepare_and_convert(ResNetish((16, 32), in_channels=3), (batches[0],), "tflite", batches)
    fast = compiled_twin(integer)
    codes = integer.quantize(batches[1])
    expected, results = integer.run(codes), []
    threads = [threading.Thread(target=lambda: results.append(fast.run(codes))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(torch.equal(r, expected) for r in results)


def test_compile_where_torch_compile_cannot_build_a_kernel_raises_a_clear_error(monkeypatch):
    def no_compiler(rule):
        raise RuntimeError("no C++ compiler found")

    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8)
    _, integer = prepare_and_convert(ResNetish((4,), in_channels=3), (x,), "tflite", [x])
    monkeypatch.setattr(compiled, "_compiled", no_compiler)
    compiled._availability_problem.cache_clear()
    try:
        with pytest.raises(CompiledKernelsUnavailableError, match="no C\\+\\+ compiler found") as error:
            integer.compile()
        assert isinstance(error.value, qp.QParityError)
        assert not integer.compiled
    finally:
        compiled._availability_problem.cache_clear()


@pytest.mark.parametrize("setting", [("enable_unsafe_math_opt_flag", True, "unsafe math"),
                                     ("enable_floating_point_contract_flag", "fast", "fused multiply-adds")])
def test_compile_refuses_inductor_settings_that_change_float_results(setting):
    from torch._inductor import config as inductor_config

    name, value, message = setting
    compiled._availability_problem.cache_clear()
    try:
        with inductor_config.patch({f"cpp.{name}": value}):
            with pytest.raises(CompiledKernelsUnavailableError, match=message):
                compiled.ensure_available()
    finally:
        compiled._availability_problem.cache_clear()


def test_a_kernel_that_fails_to_build_at_run_time_raises_a_clear_error(monkeypatch):
    def broken(rule):
        def call(*args):
            raise torch._dynamo.exc.InternalTorchDynamoError("g++ vanished")
        return call

    monkeypatch.setattr(compiled, "_compiled", broken)
    requantize = float32_requantizer(torch.tensor([0.5, 0.25]).reshape(1, 2), 3, -128, 127)
    with compiled_kernels(min_elements=0):
        with pytest.raises(CompiledKernelsUnavailableError, match="requantize_float32.*g\\+\\+ vanished"):
            requantize(torch.arange(-8, 8).reshape(8, 2))
