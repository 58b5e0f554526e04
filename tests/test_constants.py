"""Numbers in the model (`x * 0.5`, `x + 1`, `1 - x`, `x / 6`): a constant node on a grid of its own feeding add,
sub or mul; fake == integer on every target that runs it, 0 mismatched codes in LiteRT and ONNX Runtime; on
PyTorch's engines the number goes to quantized::add_scalar / mul_scalar, whose own output grid qparity derives
the same way (the same grid and codes as the kernels, and as to_torch)."""
import operator

import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError
from qparity.ops.registry import OPERATORS
from qparity.numerics.pytorch_engines import scalar_arithmetic, scalar_grid
from qparity.qparams import DTYPE_RANGES, SMALLEST_CONSTANT, QParams, constant_qparams
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes, calibrate

ENGINES = ("fbgemm", "x86", "qnnpack")
OPS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv}
# Scale ratios a runtime refuses (e.g. x * 0 makes the output grid collapse): named per-configuration refusals.
REFUSED_RATIOS = (("xnnpack", "XNNPACK"), ("executorch-xnnpack", "XNNPACK"), ("onnxruntime", "QLinearMul wraps"))
numbers = st.one_of(st.floats(-50, 50, allow_nan=False, width=32).filter(lambda v: v == 0 or abs(v) >= 1e-30), st.integers(-20, 20),
                    st.sampled_from([0.0, 1.0, -1.0, 6.0, 1 / 6, 3.0, 1e-3]))


class WithNumber(nn.Module):
    def __init__(self, op, number, first, rank):
        super().__init__()
        self.rank = rank
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.op, self.number, self.first = OPS[op], number, first

    def forward(self, x):
        y = self.conv(x)
        if self.rank == 2:
            y = torch.flatten(y, 1)
        return self.op(self.number, y) if self.first else self.op(y, self.number)


def build(op, number, first, rank):
    if op == "div" and (first or number == 0):
        op = "mul"  # a number divided by a tensor is refused (below); division by zero too
    return WithNumber(op, number, first and op != "div", rank), op


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
@given(value=numbers)
def test_the_constant_grid_holds_the_number_at_the_end_of_its_range(dtype, value):
    assume(value == 0 or abs(value) >= SMALLEST_CONSTANT)
    qp_ = constant_qparams(value, dtype)
    lo, hi = DTYPE_RANGES[dtype]
    code = qp.numerics.get_target("exact").quantize(torch.tensor([float(value)]), qp_)
    if value == 0:
        assert int(code) == int(qp_.zero_point)
        return
    assert int(code) in (lo, hi, -hi)
    real = (float(code) - float(qp_.zero_point)) * float(qp_.scale)
    assert abs(real - float(value)) <= 1e-6 * abs(float(value))


@settings(max_examples=30, deadline=None)
@given(target=st.sampled_from([t for t in qp.TARGETS if t in OPERATORS["constant"].targets()]),
       op=st.sampled_from(sorted(OPS)), number=numbers, first=st.booleans(), rank=st.sampled_from([2, 4]),
       seed=st.integers(0, 10**6), data=st.data())
def test_numbers_in_the_model_are_exact_on_every_target_and_in_the_runtimes(tmp_path_factory, target, op, number,
                                                                            first, rank, seed, data):
    torch.manual_seed(seed)
    model, op = build(op, number, first, rank)
    x = torch.randn(4, 3, 5, 5) * data.draw(st.floats(0.2, 5))
    dtype = data.draw(st.sampled_from(qp.numerics.get_target(target).activation_dtypes))
    kernel = {"add": "add", "mul": "mul", "div": "mul", "sub": "sub" if first else "add"}[op]  # x - c is x + (-c)
    runs = OPERATORS[kernel].targets()
    if target not in runs:
        with pytest.raises(UnsupportedOpError, match="cannot run on target"):
            qp.prepare_qat(model, (x,), target=target, activation_dtype=dtype)
        return
    try:
        prepared = qp.prepare_qat(model, (x,), target=target, activation_dtype=dtype)
        calibrate(prepared, [x, x * 0.5 - 0.2], lr=0.01)
        integer = qp.convert(qp.freeze(prepared))
    except UnsupportedOpError as error:  # the runtimes' documented ranges for scale ratios, named
        assert any(target == t and phrase in str(error) for t, phrase in REFUSED_RATIOS), error
        return
    test = torch.randn(3, 3, 5, 5) * 2
    assert torch.equal(prepared.eval()(test), integer(test))
    if target in FILE_SUFFIXES and (target != "xnnpack" and target != "tflite" or dtype == "int8"):
        assert_runtime_gives_the_same_codes(integer, test, tmp_path_factory.mktemp("constant"))
    elif target in ENGINES:
        torch.backends.quantized.engine = target
        assert torch.equal(qp.to_torch(integer)(test), integer(test))


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(["add", "mul"]), number=numbers, scale=st.floats(1e-3, 2.0),
       zero_point=st.integers(0, 255), engine=st.sampled_from(ENGINES))
def test_add_scalar_and_mul_scalar_grids_and_codes_are_the_engines(op, number, scale, zero_point, engine):
    torch.backends.quantized.engine = engine
    source = QParams(scale, zero_point, "uint8")
    codes = torch.arange(256, dtype=torch.int64)
    x = torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), float(source.scale), zero_point)
    kernel = torch.ops.quantized.add_scalar if op == "add" else torch.ops.quantized.mul_scalar
    theirs = kernel(x, float(number))
    grid = scalar_grid(op, float(number), source)
    assert float(grid.scale) == float(torch.tensor(theirs.q_scale(), dtype=torch.float32))
    assert int(grid.zero_point) == theirs.q_zero_point()
    ours = scalar_arithmetic(op, float(number), codes, source, grid, 0, 255)
    assert torch.equal(ours, theirs.int_repr().to(torch.int64))


def test_a_number_divided_by_a_tensor_is_refused_by_name():
    class Reciprocal(nn.Module):
        def forward(self, x):
            return 1.0 / x

    with pytest.raises(UnsupportedOpError, match="division other than of a tensor by a nonzero Python number"):
        qp.prepare_qat(Reciprocal(), (torch.randn(2, 3),))


def test_x_over_6_is_x_times_one_sixth():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    outputs = []
    for op, number in (("div", 6.0), ("mul", 1.0 / 6.0)):
        torch.manual_seed(1)
        prepared = qp.prepare_qat(WithNumber(op, number, False, 4), (x,), target="tflite")
        calibrate(prepared, [x])
        outputs.append(qp.convert(qp.freeze(prepared))(x))
    assert torch.equal(*outputs)


@pytest.mark.parametrize("number", [1e-40, 1e300, float("inf"), float("nan")])
def test_numbers_no_grid_holds_are_refused_by_name(number):
    with pytest.raises(UnsupportedOpError, match=r"a constant .*a quantization grid holds 0 or magnitudes"):
        qp.prepare_qat(WithNumber("mul", number, False, 4), (torch.randn(2, 3, 5, 5),), target="tflite")


def test_x_minus_a_number_is_an_add_of_its_negative_and_runs_on_onnxruntime(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    prepared = qp.prepare_qat(WithNumber("sub", 1.5, False, 4), (x,), target="onnxruntime")
    (constant,) = [n for n in prepared.graph.nodes if n.op == "constant"]
    assert constant.attrs["value"] == -1.5 and [n.op for n in prepared.graph.nodes][-1] == "add"
    calibrate(prepared, [x])
    integer = qp.convert(qp.freeze(prepared))
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)


@pytest.mark.parametrize("dtype", ["uint8", "int8"])
def test_a_number_minus_x_runs_on_onnxruntime_as_an_add_of_the_mirrored_codes(tmp_path, dtype):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    prepared = qp.prepare_qat(WithNumber("sub", 1.5, True, 4), (x,), target="onnxruntime", activation_dtype=dtype)
    assert [n.op for n in prepared.graph.nodes][-1] == "sub"
    calibrate(prepared, [x])
    integer = qp.convert(qp.freeze(prepared))
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)
