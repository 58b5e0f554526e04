"""The `fbgemm`, `x86` and `qnnpack` targets' spec functions give the same codes as PyTorch's quantized ops.

Each test sets torch.backends.quantized.engine, runs one torch.ao quantized op (torch.ops.quantized.* or a
torch.ao.nn.quantized module) on random codes and compares `int_repr()` with the spec function, torch.equal.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.ao.nn.quantized as nnq
from hypothesis import given, settings
from hypothesis import strategies as st

from qparity.errors import UnsupportedOpError
from qparity.numerics import pooling
from qparity.qparams import QParams
from qparity.numerics import get_target

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")

ENGINES = st.sampled_from(["fbgemm", "x86", "qnnpack"])
SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def scale_from(rng: np.random.Generator) -> float:
    return float(np.float32(10 ** rng.uniform(-3, 0)))


def quint8(codes: torch.Tensor, qp: QParams) -> torch.Tensor:
    """A quint8 tensor holding these codes, in the codes' memory layout."""
    layout = torch.channels_last if codes.dim() == 4 and not codes.is_contiguous() else torch.contiguous_format
    q = torch._make_per_tensor_quantized_tensor(codes.contiguous().to(torch.uint8), float(qp.scale),
                                                int(qp.zero_point))
    return q.contiguous(memory_format=layout)


def codes_of(q: torch.Tensor) -> torch.Tensor:
    return q.int_repr().to(torch.int64)


def assert_same_codes_and_layout(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal codes, and equal strides along every dimension longer than 1 (the layout later kernels choose by)."""
    assert torch.equal(got, expected)
    assert all(a == b for n, a, b in zip(got.shape, got.stride(), expected.stride()) if n > 1), \
        f"strides {got.stride()}, PyTorch's {expected.stride()}"


def random_qparams(rng) -> QParams:
    return QParams(scale_from(rng), int(rng.integers(0, 256)), "uint8")


def random_codes(rng, shape) -> torch.Tensor:
    return torch.from_numpy(rng.integers(0, 256, size=shape)).to(torch.int64)


@SETTINGS
@given(engine=ENGINES, seed=seeds)
def test_quantize_matches_quantize_per_tensor(engine, seed):
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    qp = random_qparams(rng)
    spread = torch.from_numpy(rng.normal(0, 80, size=500)).to(torch.float32) * qp.scale
    ties = (torch.from_numpy(rng.integers(-300, 300, size=200)) + 0.5).to(torch.float32) * qp.scale
    x = torch.cat([spread, ties])
    real = torch.quantize_per_tensor(x, float(qp.scale), int(qp.zero_point), torch.quint8)
    assert torch.equal(get_target(engine).quantize(x, qp), codes_of(real))


def random_layer(rng, kind, per_channel):
    """A torch.ao quantized conv/linear with random weights, float bias and qparams, and its qparity view."""
    if kind == "conv2d":
        groups = int(rng.choice([1, 2]))
        depthwise = bool(rng.integers(0, 2))
        cin = groups * int(rng.integers(1, 5))
        cout = cin if depthwise else groups * int(rng.integers(1, 5))
        groups = cin if depthwise else groups
        k = int(rng.integers(1, 4))
        stride, padding = int(rng.integers(1, 3)), int(rng.integers(0, 2))
        module = nnq.Conv2d(cin, cout, k, stride, padding, groups=groups)
        wshape = (cout, cin // groups, k, k)
        xshape = (2, cin, k + int(rng.integers(0, 5)), k + int(rng.integers(0, 5)))
    else:
        cin, cout = int(rng.integers(1, 40)), int(rng.integers(1, 20))
        module = nnq.Linear(cin, cout)
        wshape, xshape = (cout, cin), (3, cin)
    weight_codes = torch.from_numpy(rng.integers(-128, 128, size=wshape)).to(torch.int8)
    if per_channel:
        w_scale = torch.from_numpy((10 ** rng.uniform(-3, -1, size=cout)).astype(np.float32))
        qweight = torch._make_per_channel_quantized_tensor(weight_codes, w_scale.double(),
                                                           torch.zeros(cout, dtype=torch.int64), 0)
    else:
        w_scale = torch.tensor(np.float32(10 ** rng.uniform(-3, -1)))
        qweight = torch._make_per_tensor_quantized_tensor(weight_codes, float(w_scale), 0)
    bias = torch.from_numpy(rng.normal(0, 3, size=cout).astype(np.float32)) if rng.integers(0, 4) else None
    module.set_weight_bias(qweight, bias)
    out_qp = random_qparams(rng)
    module.scale, module.zero_point = float(out_qp.scale), int(out_qp.zero_point)
    return module, weight_codes, w_scale, bias, out_qp, xshape


@SETTINGS
@given(engine=ENGINES, kind=st.sampled_from(["conv2d", "linear"]), per_channel=st.booleans(), seed=seeds)
def test_requantizer_matches_quantized_conv_and_linear(engine, kind, per_channel, seed):
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    module, weight_codes, w_scale, bias, out_qp, xshape = random_layer(rng, kind, per_channel)
    if engine == "fbgemm" and kind == "conv2d" and module.groups > 1 and module.kernel_size == (3, 3):
        return  # fbgemm's depthwise 3x3 kernel differs (not pinned down); from_torch refuses it
    in_qp = random_qparams(rng)
    x = random_codes(rng, xshape)
    expected = codes_of(module(quint8(x, in_qp)))
    centered = (x - int(in_qp.zero_point)).to(torch.float64)
    w = weight_codes.to(torch.float64)
    if kind == "conv2d":
        acc = torch.nn.functional.conv2d(centered, w, None, module.stride, module.padding, module.dilation,
                                         module.groups)
    else:
        acc = centered @ w.T
    target = get_target(engine)
    requantize = target.requantizer(kind, in_qp, w_scale, out_qp, 0, 255, 1 if kind == "conv2d" else -1,
                                    acc.dim(), bias=bias)
    assert torch.equal(requantize(acc), expected)


@SETTINGS
@given(engine=ENGINES, relu=st.booleans(), seed=seeds, size=st.integers(1, 700), ties=st.booleans())
def test_add_matches_quantized_add(engine, relu, seed, size, ties):
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    a, b, out = random_qparams(rng), random_qparams(rng), random_qparams(rng)
    if ties:  # half-code sums: the two rounding formulas of fbgemm's loops disagree on every odd zero point
        a = b = QParams(float(out.scale) / 2, a.zero_point, "uint8")
    qa, qb = random_codes(rng, (size,)), random_codes(rng, (size,))
    op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
    target = get_target(engine)
    lo, hi = target.activation_bounds(0.0 if relu else None, None, out)
    ratios = [float(a.scale / out.scale), float(b.scale / out.scale)]
    if engine == "qnnpack" and (lo >= hi or not all(2.0**-14 <= r < 2.0**8 for r in ratios)):
        with pytest.raises(UnsupportedOpError, match="qnnpack add"):  # PyTorch's qnnpack refuses these too
            target.add(qa, a, qb, b, out, lo, hi)
        return
    expected = codes_of(op(quint8(qa, a), quint8(qb, b), float(out.scale), int(out.zero_point)))
    assert torch.equal(target.add(qa, a, qb, b, out, lo, hi), expected)


def pooled_input(rng, qp, shape, channels_last):
    x = random_codes(rng, shape)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@SETTINGS
@given(engine=ENGINES, seed=seeds, channels=st.integers(1, 40), hw=st.integers(2, 9),
       k=st.integers(2, 3), stride=st.integers(1, 2), padding=st.integers(0, 1), ceil=st.booleans(),
       include_pad=st.booleans(), channels_last=st.booleans())
def test_average_pool_matches_quantized_avg_pool2d(engine, seed, channels, hw, k, stride, padding, ceil,
                                                   include_pad, channels_last):
    torch.backends.quantized.engine = engine
    k, padding = min(k, hw), min(padding, min(k, hw) // 2)
    rng = np.random.default_rng(seed)
    qp = random_qparams(rng)
    x = pooled_input(rng, qp, (2, channels, hw, hw), channels_last)
    expected = codes_of(torch.nn.functional.avg_pool2d(quint8(x, qp), k, stride, padding, ceil, include_pad))
    attrs = {"kernel_size": (k, k), "stride": (stride, stride), "padding": (padding, padding), "ceil_mode": ceil,
             "count_include_pad": include_pad, "adaptive": False}
    assert_same_codes_and_layout(get_target(engine).average_pool(x, qp, attrs), expected)


@SETTINGS
@given(engine=ENGINES, seed=seeds, channels=st.integers(1, 40), hw=st.sampled_from([2, 3, 4, 6, 8]),
       out=st.sampled_from([1, 2]), channels_last=st.booleans())
def test_adaptive_average_matches_quantized_adaptive_avg_pool2d(engine, seed, channels, hw, out, channels_last):
    torch.backends.quantized.engine = engine
    out = out if hw % out == 0 else 1
    rng = np.random.default_rng(seed)
    qp = random_qparams(rng)
    x = pooled_input(rng, qp, (2, channels, hw, hw), channels_last)
    expected = codes_of(torch.nn.functional.adaptive_avg_pool2d(quint8(x, qp), out))
    attrs = {**pooling.adaptive_as_pooling((hw, hw), out, "test"), "adaptive": True}
    assert_same_codes_and_layout(get_target(engine).average_pool(x, qp, attrs), expected)


@SETTINGS
@given(engine=ENGINES, seed=seeds, channels=st.integers(1, 40), h=st.integers(2, 13), w=st.integers(2, 13),
       out=st.tuples(st.integers(1, 5), st.integers(1, 5)), channels_last=st.booleans())
def test_uneven_adaptive_average_matches_quantized_adaptive_avg_pool2d(engine, seed, channels, h, w, out,
                                                                       channels_last):
    """Windows of differing sizes (an output size that does not divide the input), codes and output layout; the
    NCHW kernel rounds the raw codes' average (ties: an 11x11 input pooled to (3, 2) has windows of 30)."""
    torch.backends.quantized.engine = engine
    out = (min(out[0], h), min(out[1], w))
    rng = np.random.default_rng(seed)
    qp = random_qparams(rng)
    x = pooled_input(rng, qp, (2, channels, h, w), channels_last)
    expected = codes_of(torch.nn.functional.adaptive_avg_pool2d(quint8(x, qp), out))
    attrs = {**pooling.window_attrs({"adaptive_output_size": list(out)}, (h, w), "test"), "adaptive": True}
    assert_same_codes_and_layout(get_target(engine).average_pool(x, qp, attrs), expected)


@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
@pytest.mark.parametrize("channels", [1, 7, 8, 9, 15, 16, 17, 24, 31, 40])
def test_adaptive_average_vector_loop_covers_8_channel_blocks_on_a_tie(engine, channels):
    """Every window sums to -171 centered codes over 6 (-28.5): the vector loop's quantize_vec and the scalar tail's
    quantize_val round it differently on 2.13 (13 and 14); found by tests/test_engine_program.py on 2.13."""
    torch.backends.quantized.engine = engine
    qp = QParams(0.00903583504, 42, "uint8")
    x = torch.tensor([13, 14, 13, 14, 13, 14]).reshape(1, 1, 2, 3).repeat(2, channels, 1, 1)
    x = x.contiguous(memory_format=torch.channels_last)
    expected = codes_of(torch.nn.functional.adaptive_avg_pool2d(quint8(x, qp), 1))
    attrs = {**pooling.adaptive_as_pooling((2, 3), 1, "test"), "adaptive": True}
    assert_same_codes_and_layout(get_target(engine).average_pool(x, qp, attrs), expected)


@SETTINGS
@given(seed=seeds, channels=st.integers(1, 70), h=st.integers(1, 12), w=st.integers(1, 12),
       kernel=st.tuples(st.integers(1, 7), st.integers(1, 7)), stride=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       padding=st.tuples(st.integers(0, 3), st.integers(0, 3)), ceil=st.booleans(), include_pad=st.booleans(),
       channels_last=st.booleans())
def test_qnnpack_average_pool_matches_quantized_avg_pool2d(seed, channels, h, w, kernel, stride, padding, ceil,
                                                           include_pad, channels_last):
    """QNNPACK (no ceil_mode) divides by kH * kW whatever count_include_pad says; ceil_mode takes fbgemm's kernels."""
    torch.backends.quantized.engine = "qnnpack"
    kernel = (min(kernel[0], h), min(kernel[1], w))
    padding = (min(padding[0], kernel[0] // 2), min(padding[1], kernel[1] // 2))
    if kernel == (1, 1) and not ceil:
        return  # QNNPACK refuses 1x1 pooling (test_qnnpack_refuses_1x1_avg_pool2d)
    rng = np.random.default_rng(seed)
    qp = QParams(float(np.float32(10 ** rng.uniform(-4, 1))), int(rng.integers(0, 256)), "uint8")
    x = pooled_input(rng, qp, (int(rng.integers(1, 3)), channels, h, w), channels_last)
    expected = codes_of(torch.nn.functional.avg_pool2d(quint8(x, qp), kernel, stride, padding, ceil, include_pad))
    attrs = {"kernel_size": kernel, "stride": stride, "padding": padding, "ceil_mode": ceil,
             "count_include_pad": include_pad, "adaptive": False}
    assert_same_codes_and_layout(get_target("qnnpack").average_pool(x, qp, attrs), expected)


def test_qnnpack_refuses_1x1_avg_pool2d():
    """PyTorch's qnnpack fails on it too ("1x1 pooling is meaningless")."""
    attrs = {"kernel_size": (1, 1), "stride": (1, 1), "padding": (0, 0), "ceil_mode": False,
             "count_include_pad": True, "adaptive": False}
    with pytest.raises(UnsupportedOpError, match="avg_pool2d"):
        get_target("qnnpack").average_pool(torch.zeros(1, 2, 4, 4, dtype=torch.int64), QParams(0.1, 3, "uint8"),
                                           attrs)


@pytest.mark.parametrize("ceil_mode", [False, True])
def test_qnnpack_refuses_a_1x1_max_pool_where_pytorch_fails_on_it(ceil_mode):
    """QNNPACK's max pooling operator refuses one-element windows; PyTorch's qnnpack engine takes it without
    ceil_mode and raises an internal assert at run time. prepare_qat refuses it there, naming the module."""
    import qparity as qp

    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.MaxPool2d(1, ceil_mode=ceil_mode))
    x = torch.quantize_per_tensor(torch.randn(1, 4, 6, 6), 0.1, 100, torch.quint8)
    torch.backends.quantized.engine = "qnnpack"
    if ceil_mode:
        torch.nn.functional.max_pool2d(x, 1, ceil_mode=True)  # the generic kernel: runs
        qp.prepare_qat(model, (torch.randn(1, 2, 8, 8),), target="qnnpack")
        return
    with pytest.raises(RuntimeError):
        torch.nn.functional.max_pool2d(x, 1)
    with pytest.raises(UnsupportedOpError, match=r"max_pool2d at .*'1'.*QNNPACK refuses"):
        qp.prepare_qat(model, (torch.randn(1, 2, 8, 8),), target="qnnpack")


@SETTINGS
@given(engine=ENGINES, seed=seeds, same=st.booleans())
def test_rescale_matches_quantized_cat(engine, seed, same):
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    a, b = random_qparams(rng), random_qparams(rng)
    out = a if same else random_qparams(rng)
    qa, qb = random_codes(rng, (2, 3, 4, 4)), random_codes(rng, (2, 5, 4, 4))
    expected = codes_of(torch.ops.quantized.cat([quint8(qa, a), quint8(qb, b)], 1, float(out.scale),
                                                int(out.zero_point)))
    target = get_target(engine)
    assert torch.equal(torch.cat([target.rescale(qa, a, out), target.rescale(qb, b, out)], 1), expected)


@SETTINGS
@given(engine=st.sampled_from(["fbgemm", "x86"]), seed=seeds, shape=st.tuples(st.integers(1, 3), st.integers(1, 9),
       st.integers(1, 9), st.integers(1, 9)), layouts=st.tuples(st.booleans(), st.booleans()))
def test_add_follows_memory_layouts_of_its_inputs(engine, seed, shape, layouts):
    """Same layout: the vector loop runs in memory order; different layouts: the scalar loop runs throughout."""
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    out = random_qparams(rng)
    a = b = QParams(float(out.scale) / 2, int(rng.integers(0, 256)), "uint8")  # half-code sums: loops disagree
    qa, qb = random_codes(rng, shape), random_codes(rng, shape)
    if layouts[0]:
        qa = qa.contiguous(memory_format=torch.channels_last)
    if layouts[1]:
        qb = qb.contiguous(memory_format=torch.channels_last)
    expected = torch.ops.quantized.add(quint8(qa, a), quint8(qb, b), float(out.scale), int(out.zero_point))
    got = get_target(engine).add(qa, a, qb, b, out, 0, 255)
    assert torch.equal(got, codes_of(expected))


@SETTINGS
@given(engine=ENGINES, seed=seeds, channels=st.tuples(st.integers(1, 40), st.integers(1, 40)),
       exact_ratio=st.sampled_from([None, 0.25, 0.5, 1.5, 2.0]))
def test_concatenate_matches_quantized_cat_of_channels_last_inputs(engine, seed, channels, exact_ratio):
    """qcat_nhwc_kernel: 8-channel blocks in its vector loops, the rest scalar; exact ratios put codes on ties."""
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    out = random_qparams(rng)
    grids = [random_qparams(rng), out if seed % 3 == 0 else random_qparams(rng)]
    if exact_ratio is not None:
        grids[0] = QParams(float(out.scale) * exact_ratio, grids[0].zero_point, "uint8")
    codes = [random_codes(rng, (2, c, 3, 3)).contiguous(memory_format=torch.channels_last) for c in channels]
    expected = torch.ops.quantized.cat([quint8(q, g) for q, g in zip(codes, grids)], 1, float(out.scale),
                                       int(out.zero_point))
    got = get_target(engine).concatenate(codes, grids, out, 1)
    assert torch.equal(got, codes_of(expected))


@SETTINGS
@given(engine=ENGINES, seed=seeds, exponent=st.integers(2, 8), channels=st.integers(1, 20), width=st.integers(1, 5),
       channels_last=st.booleans(), length=st.integers(1, 150))
def test_every_kernel_path_matches_pytorch_on_exact_ties(engine, seed, exponent, channels, width, channels_last,
                                                         length):
    """Power-of-two scales and odd zero points make every x * inv an exact half, where the releases' rounding
    rules (zero point before or after rounding; pytorch_versions.py) give different codes, on every path:
    quantize_per_tensor, add's vector and scalar loops, the nchw and nhwc average pools (one channel
    included) and nhwc cat's vector and scalar channels."""
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    target = get_target(engine)
    grid = QParams(2.0**-exponent, int(rng.integers(0, 128)) * 2 + 1, "uint8")
    coarse = QParams(2.0**(1 - exponent), grid.zero_point, "uint8")

    x = (torch.from_numpy(rng.integers(-130, 130, size=length)) + 0.5).to(torch.float32) * grid.scale
    assert torch.equal(target.quantize(x, grid), codes_of(torch.quantize_per_tensor(
        x, float(grid.scale), int(grid.zero_point), torch.quint8)))

    qa, qb = random_codes(rng, (length,)), random_codes(rng, (length,))
    if engine != "qnnpack":  # QNNPACK's add is fixed point (test_add_matches_quantized_add)
        expected = codes_of(torch.ops.quantized.add(quint8(qa, grid), quint8(qb, grid), float(coarse.scale),
                                                    int(coarse.zero_point)))
        assert torch.equal(target.add(qa, grid, qb, grid, coarse, 0, 255), expected)

    pooled = pooled_input(rng, grid, (1, channels, 2, 2 * width), channels_last)
    if engine != "qnnpack":  # QNNPACK's own pools: test_qnnpack_average_pool_matches_quantized_avg_pool2d
        attrs = {"kernel_size": (1, 2), "stride": (1, 2), "padding": (0, 0), "ceil_mode": False,
                 "count_include_pad": True, "adaptive": False}
        expected = codes_of(torch.nn.functional.avg_pool2d(quint8(pooled, grid), (1, 2), (1, 2)))
        assert torch.equal(target.average_pool(pooled, grid, attrs), expected)
        attrs = {**pooling.adaptive_as_pooling((2, 2 * width), (2, width), "test"), "adaptive": True}
        expected = codes_of(torch.nn.functional.adaptive_avg_pool2d(quint8(pooled, grid), (2, width)))
        assert torch.equal(target.average_pool(pooled, grid, attrs), expected)

    nhwc = pooled.contiguous(memory_format=torch.channels_last)
    expected = codes_of(torch.ops.quantized.cat([quint8(nhwc, grid)], 1, float(coarse.scale), int(coarse.zero_point)))
    assert torch.equal(target.concatenate([nhwc], [grid], coarse, 1), expected)


@settings(max_examples=4, deadline=None)
@given(engine=st.sampled_from(["fbgemm", "x86"]), seed=seeds, relu=st.booleans(), channels_last=st.booleans(),
       ties=st.booleans())
def test_add_of_tensors_larger_than_its_table_matches_quantized_add(engine, seed, relu, channels_last, ties):
    """Above ADD_TABLE_MIN_ELEMENTS add answers from FbgemmAddTable: still PyTorch's codes, parallel chunks too."""
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    a, b, out = random_qparams(rng), random_qparams(rng), random_qparams(rng)
    if ties:
        a = b = QParams(float(out.scale) / 2, a.zero_point, "uint8")
    shape = (2, 64, 33, 33)  # 139392 elements: above the table threshold, several 64-blocks per chunk, a tail
    qa, qb = random_codes(rng, shape), random_codes(rng, shape)
    if channels_last:
        qa, qb = (q.contiguous(memory_format=torch.channels_last) for q in (qa, qb))
    target = get_target(engine).configured(threads=torch.get_num_threads())
    lo, hi = target.activation_bounds(0.0 if relu else None, None, out)
    op = torch.ops.quantized.add_relu if relu else torch.ops.quantized.add
    expected = op(quint8(qa, a), quint8(qb, b), float(out.scale), int(out.zero_point))
    got = target.add(qa, a, qb, b, out, lo, hi)
    assert torch.equal(got, codes_of(expected))
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last


@settings(max_examples=5, deadline=None)
@given(seed=seeds, n=st.integers(1, 3000), threads=st.sampled_from([None, 1, 2, 3]),
       release=st.sampled_from(["2.13", "2.14"]))
def test_fbgemm_add_table_equals_the_loops_it_tabulates(seed, n, threads, release):
    from qparity.numerics.pytorch_engines import FbgemmAddTable, fbgemm_add_loops, loop_mask
    from qparity.numerics.pytorch_versions import kernels_named

    rng = np.random.default_rng(seed)
    a, b, out = random_qparams(rng), random_qparams(rng), random_qparams(rng)
    if rng.integers(2):
        a = b = QParams(float(out.scale) / 2, a.zero_point, "uint8")
    lo, hi = sorted(int(v) for v in rng.integers(0, 256, size=2))
    kernels = kernels_named(release)
    ia, ib = random_codes(rng, (n,)), random_codes(rng, (n,))
    table = FbgemmAddTable(a, b, out, lo, hi, kernels)
    expected = fbgemm_add_loops(ia, a, ib, b, out, lo, hi, kernels, loop_mask(n, threads))
    assert torch.equal(table(ia, ib, threads), expected)


@given(seed=seeds, release=st.sampled_from(["2.13", "2.14"]))
def test_fbgemm_add_table_from_per_code_terms_equals_the_loops_on_every_pair(seed, release):
    """The table sums per-code terms by broadcasting; every entry is fbgemm_add_loops on its pair and loop, and
    a lookup on int8 grids (codes below 0) indexes it alike."""
    from qparity.numerics.pytorch_engines import FbgemmAddTable, fbgemm_add_loops, loop_mask
    from qparity.numerics.pytorch_versions import kernels_named

    rng = np.random.default_rng(seed)
    a, b, out = random_qparams(rng), random_qparams(rng), random_qparams(rng)
    if rng.integers(2):
        a, b = (QParams(g.scale, int(g.zero_point) - 128, "int8") for g in (a, b))
    lo, hi = sorted(int(v) for v in rng.integers(out.qmin, out.qmax + 1, size=2))
    kernels = kernels_named(release)
    qa = torch.arange(a.qmin, a.qmax + 1).repeat_interleave(b.qmax - b.qmin + 1).repeat(2)
    qb = torch.arange(b.qmin, b.qmax + 1).repeat(2 * (a.qmax - a.qmin + 1))
    in_vector_loop = torch.arange(qa.numel()) < qa.numel() // 2
    expected = fbgemm_add_loops(qa, a, qb, b, out, lo, hi, kernels, in_vector_loop)
    table = FbgemmAddTable(a, b, out, lo, hi, kernels)
    assert torch.equal(table.table, expected)
    ia = torch.from_numpy(rng.integers(a.qmin, a.qmax + 1, size=5000))
    ib = torch.from_numpy(rng.integers(b.qmin, b.qmax + 1, size=5000))
    assert torch.equal(table(ia, ib, 2), fbgemm_add_loops(ia, a, ib, b, out, lo, hi, kernels, loop_mask(5000, 2)))


@given(st.integers(0, 2**31), st.sampled_from(["int8", "uint8"]), st.sampled_from(["contiguous", "channels_last"]),
       st.sampled_from(["contiguous", "channels_last"]), st.booleans())
@settings(max_examples=25, deadline=None)
def test_qnnpack_add_from_its_table_equals_the_elementwise_definition(seed, dtype, layout_a, layout_b, relu):
    """Above ADD_TABLE_MIN_ELEMENTS qnnpack's add answers from QnnpackAddTable: the same codes as
    _qnnpack_add_codes on every element, in qa's memory format (qnnpack_add's output), whatever qb's."""
    from qparity.numerics.pytorch_engines import ADD_TABLE_MIN_ELEMENTS, _qnnpack_add_codes, _qnnpack_add_multipliers

    generator = torch.Generator().manual_seed(seed)
    offset = 0 if dtype == "int8" else 128
    a, b, out = (QParams(0.02 + 0.03 * float(torch.rand((), generator=generator)),
                         int(torch.randint(-100, 100, (), generator=generator)) + offset, dtype) for _ in range(3))
    lo, hi = (int(out.zero_point), out.qmax) if relu else (out.qmin, out.qmax)
    shape = (2, 16, 64, 64)
    assert torch.Size(shape).numel() >= ADD_TABLE_MIN_ELEMENTS
    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    qa = torch.randint(a.qmin, a.qmax + 1, shape, generator=generator).contiguous(memory_format=formats[layout_a])
    qb = torch.randint(b.qmin, b.qmax + 1, shape, generator=generator).contiguous(memory_format=formats[layout_b])
    target = get_target("qnnpack")
    result = target.add(qa, a, qb, b, out, lo, hi)
    expected = _qnnpack_add_codes(qa, a, qb, b, out, lo, hi, _qnnpack_add_multipliers(a, b, out, lo, hi))
    assert torch.equal(result, expected)
    assert result.is_contiguous(memory_format=formats[layout_a])
    small = target.add(qa[:1, :1], a, qb[:1, :1], b, out, lo, hi)  # below the table's size: the definition itself
    assert torch.equal(small, expected[:1, :1]) and small.is_contiguous(memory_format=formats[layout_a])


@pytest.mark.parametrize("n, threads", [(4096, 1), (4096, 2), (4096 + 7, 1), (128, 3)])
def test_fbgemm_add_table_with_every_element_in_the_vector_loop_equals_the_loops(n, threads):
    """Whole 64-blocks in every chunk (no scalar-loop element, no offsets added) and with a tail alike."""
    from qparity.numerics.pytorch_engines import FbgemmAddTable, fbgemm_add_loops, loop_mask
    from qparity.numerics.pytorch_versions import kernels_named

    rng = np.random.default_rng(n + threads)
    a, b, out = random_qparams(rng), random_qparams(rng), random_qparams(rng)
    kernels = kernels_named("2.14")
    ia, ib = random_codes(rng, (n,)), random_codes(rng, (n,))
    expected = fbgemm_add_loops(ia, a, ib, b, out, 0, 255, kernels, loop_mask(n, threads))
    assert torch.equal(FbgemmAddTable(a, b, out, 0, 255, kernels)(ia, ib, threads), expected)


@settings(max_examples=10, deadline=None)
@given(seed=seeds, engine=st.sampled_from(["fbgemm", "x86", "qnnpack"]), dtype=st.sampled_from(["uint8", "int8"]),
       threads=st.sampled_from([1, 2, 3]), channels_last=st.booleans(), large=st.booleans())
def test_add_of_float32_codes_answers_the_int64_codes_in_float32(seed, engine, dtype, threads, channels_last, large):
    """The prepared model hands its float32 codes to add as they are (add_takes_float_codes): the same codes come
    back, in float32 where a table answers, whichever loop computes each element, in the same memory format."""
    rng = np.random.default_rng(seed)
    a, b, out = random_qparams(rng), random_qparams(rng), random_qparams(rng)
    if dtype == "int8":
        a, b = (QParams(g.scale, int(g.zero_point) - 128, "int8") for g in (a, b))
    shape = (2, 64, 33, 33) if large else (2, 3, 5, 7)  # above the tables' threshold, or below
    qa = torch.from_numpy(rng.integers(a.qmin, a.qmax + 1, size=shape))
    qb = torch.from_numpy(rng.integers(b.qmin, b.qmax + 1, size=shape))
    if channels_last:
        qa, qb = (q.contiguous(memory_format=torch.channels_last) for q in (qa, qb))
    target = get_target(engine).configured(threads=threads)
    assert target.add_takes_float_codes
    lo, hi = out.qmin, out.qmax
    expected = target.add(qa, a, qb, b, out, lo, hi)
    got = target.add(qa.to(torch.float32), a, qb.to(torch.float32), b, out, lo, hi)
    assert got.dtype == (torch.float32 if large else torch.int64)
    assert torch.equal(got, expected.to(got.dtype)) and got.stride() == expected.stride()
