"""The integer runtime's narrow codes (ops/program.py): IntegerModel.run holds codes between operators in their
grid's own dtype where an operator makes them so, and every node's codes are the integers the int64 program
computes, with torch.equal, on every target and on networks with every operator the runtime has."""
from unittest.mock import patch

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qparity.ops.lookup as lookup
import qparity.ops.program as program
from helpers import prepare_and_convert
from networks import NETWORKS
from qparity.bench import ResNetish
from qparity.errors import InvalidParameterError
from qparity.graph import QValue, flatten_values
from qparity.numerics.int8_accumulate import uint8_codes
from qparity.ops.lookup import CodeTable, PairTable
from qparity.ops.program import NARROW_CODE_READERS, ProgramExecutor, narrow_dtype, widened
from qparity.qparams import QParams

SETTINGS = settings(max_examples=60, deadline=None)
ALL_TARGETS = ["exact", "tflite", "tflite-micro", "tosa", "xnnpack", "executorch-xnnpack", "onnxruntime",
               "fbgemm", "x86", "qnnpack"]


def node_values(integer, codes, narrow: bool):
    """Every node's value of one run of the program (wide: int64 codes throughout, as the doctor sees them)."""
    mode = integer._narrow_mode if narrow else integer._integer_mode
    executor = ProgramExecutor(integer.graph, integer.target, mode)
    executor.run([codes.to(narrow_dtype(integer.input_qparams[0]) if narrow else torch.int64)])
    return executor.values


def assert_narrow_run_equals_the_int64_run(integer, codes):
    wide, narrow = node_values(integer, codes, False), node_values(integer, codes, True)
    assert wide.keys() == narrow.keys()
    narrowed = 0
    for name, value in wide.items():
        if not isinstance(value, QValue):
            continue
        got = narrow[name]
        if got.codes.dtype != torch.int64:
            assert got.codes.dtype == narrow_dtype(got.qparams), f"{name}: {got.codes.dtype} on {got.qparams.dtype}"
            narrowed += 1
        assert torch.equal(got.codes.to(torch.int64), value.codes), \
            f"{name}: {int((got.codes.to(torch.int64) != value.codes).sum())} codes differ"
        assert got.codes.shape == value.codes.shape
    return narrowed


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_every_node_of_a_narrow_run_has_the_int64_runs_codes(target):
    torch.manual_seed(3)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    _, integer = prepare_and_convert(ResNetish((16, 32, 64), in_channels=3), (batches[0],), target, batches)
    for x in (batches[1], torch.randn(2, 3, 32, 32) * 4, batches[2][:1]):
        narrowed = assert_narrow_run_equals_the_int64_run(integer, integer.quantize(x))
        if integer.engine_program is None:  # PyTorch's engines run EngineProgram (quint8 tensors) instead
            assert narrowed >= 5, "the layers and adds should keep narrow codes"
        assert torch.equal(integer.run(integer.quantize(x)).to(torch.int64),
                           node_values(integer, integer.quantize(x), False)[integer.graph.output.name].codes)


# Every network on each target that runs all of its operators: ONNX Runtime has no quantized hardswish, which
# prepare_qat refuses (tests/test_registry.py).
NETWORK_CASES = [(network, target) for network in sorted(NETWORKS)
                 for target in ("tflite", "tosa", "xnnpack", "onnxruntime", "exact", "qnnpack")
                 if (network, target) != ("mobilenetv3_small", "onnxruntime")]


@pytest.mark.parametrize("network,target", NETWORK_CASES)
def test_networks_run_narrow_with_the_int64_programs_codes(network, target):
    cls, shape = NETWORKS[network]
    torch.manual_seed(4)
    batches = [torch.randn(2, *shape) for _ in range(2)]
    _, integer = prepare_and_convert(cls(), (batches[0],), target, batches)
    assert_narrow_run_equals_the_int64_run(integer, integer.quantize(batches[1]))


def test_operators_that_do_not_declare_narrow_codes_receive_int64(monkeypatch):
    """The dispatcher widens every argument of an operator without READS_NARROW_CODES, nested ones included."""
    seen = []

    class Spy:
        def __init__(self, module):
            self.module = module

        def run(self, ctx, node, *args, **kwargs):
            dtypes = [v.codes.dtype for v in flatten_values((args, kwargs)) if isinstance(v, QValue)]
            seen.append((node.op, dtypes))
            return self.module.run(ctx, node, *args, **kwargs)

    monkeypatch.setattr(program, "IMPLEMENTATIONS", {op: Spy(m) for op, m in program.IMPLEMENTATIONS.items()})
    cls, shape = NETWORKS["small_unet"]  # cat, upsampling, pools, layers
    torch.manual_seed(5)
    batches = [torch.randn(2, *shape) for _ in range(2)]
    _, integer = prepare_and_convert(cls(), (batches[0],), "tflite", batches)
    integer.run(integer.quantize(batches[1]))
    others = [(op, dtypes) for op, dtypes in seen if op not in NARROW_CODE_READERS]
    assert others and any(op == "cat" for op, _ in others)
    assert all(d in (torch.int64, torch.float32) for _, dtypes in others for d in dtypes), others
    assert any(d == torch.int8 for op, dtypes in seen if op in NARROW_CODE_READERS for d in dtypes)


def test_widened_converts_nested_narrow_codes_and_leaves_the_rest():
    grid = QParams(torch.tensor(0.1), torch.tensor(3), "int8")
    narrow = QValue(torch.tensor([-128, 0, 127], dtype=torch.int8), grid)
    floats = torch.tensor([0.5])
    args = (narrow, [narrow, 3], {"x": (narrow,), "y": floats})
    out = widened(args)
    assert out[0].codes.dtype == torch.int64 and torch.equal(out[0].codes, torch.tensor([-128, 0, 127]))
    assert out[1][0].codes.dtype == torch.int64 and out[1][1] == 3
    assert out[2]["x"][0].codes.dtype == torch.int64 and out[2]["y"] is floats
    wide = QValue(torch.tensor([1]), grid)
    assert widened(wide) is wide


narrow_ranges = st.sampled_from([(-128, 127, torch.int8), (0, 255, torch.uint8), (-100, 20, torch.int8),
                                 (3, 250, torch.uint8), (-300, 300, torch.int16), (-40, 90, torch.int32)])


@SETTINGS
@given(a=narrow_ranges, b=narrow_ranges, seed=st.integers(0, 2**16), broadcast=st.booleans(),
       channels_last=st.sampled_from(["neither", "a", "both"]), block=st.sampled_from([1 << 16, 7, 1]))
def test_pair_table_on_narrow_codes_answers_the_int64_tables_codes(a, b, seed, broadcast, channels_last, block):
    """Any layout of either operand; operands stored alike form the index in place, in blocks of INDEX_BLOCK
    elements (here also 7 and 1, so that a block ends inside a row)."""
    with patch.object(lookup, "INDEX_BLOCK", block):
        check_narrow_pair_table(a, b, seed, broadcast, channels_last)


def check_narrow_pair_table(a, b, seed, broadcast, channels_last):
    (a_lo, a_hi, a_dtype), (b_lo, b_hi, b_dtype) = a, b
    if not PairTable.fits(a_lo, a_hi, b_lo, b_hi):
        return
    gen = torch.Generator().manual_seed(seed)
    qa = torch.randint(a_lo, a_hi + 1, (2, 3, 4, 5), generator=gen)
    qb = torch.randint(b_lo, b_hi + 1, (2, 3, 1, 5) if broadcast else (2, 3, 4, 5), generator=gen)
    qa[0, 0, 0, 0], qb[0, 0, 0, 0] = a_lo, b_hi  # the table's corners
    qa[-1, -1, -1, -1], qb[-1, -1, 0, -1] = a_hi, b_lo
    if channels_last != "neither":
        qa = qa.contiguous(memory_format=torch.channels_last)
    if channels_last == "both":
        qb = qb.contiguous(memory_format=torch.channels_last)
    fn = lambda x, y: (x * 3 - y).clamp(-128, 127)  # noqa: E731
    wide = PairTable(fn, a_lo, a_hi, b_lo, b_hi)
    narrow = PairTable(fn, a_lo, a_hi, b_lo, b_hi, dtype=torch.int8)
    got = narrow(qa.to(a_dtype), qb.to(b_dtype))
    assert got.dtype == torch.int8 and torch.equal(got.to(torch.int64), wide(qa, qb))
    assert got.stride() == wide(qa, qb).stride()


@SETTINGS
@given(grid=narrow_ranges, seed=st.integers(0, 2**16))
def test_code_table_on_narrow_codes_answers_the_int64_tables_codes(grid, seed):
    lo, hi, dtype = grid
    q = torch.cat([torch.randint(lo, hi + 1, (64,), generator=torch.Generator().manual_seed(seed)),
                   torch.tensor([lo, hi])])
    fn = lambda x: (x // 2 + 1).clamp(0, 255)  # noqa: E731
    got = CodeTable(fn, lo, hi, dtype=torch.uint8)(q.to(dtype))
    assert got.dtype == torch.uint8 and torch.equal(got.to(torch.int64), CodeTable(fn, lo, hi)(q))


def test_a_pair_index_leaves_its_codes_untouched():
    table = PairTable(lambda x, y: x - y, -40, 90, -40, 90)
    for dtype in (torch.int32, torch.int16, torch.int8):
        qa, qb = torch.tensor([[-40, 3], [90, 0]], dtype=dtype), torch.tensor([[5, -40], [90, 1]], dtype=dtype)
        before = qa.clone(), qb.clone()
        assert torch.equal(table(qa, qb), qa.to(torch.int64) - qb.to(torch.int64))
        assert torch.equal(qa, before[0]) and torch.equal(qb, before[1])


def test_a_pair_index_that_int32_cannot_hold_is_formed_in_int64():
    table = PairTable(lambda x, y: x - y, 2**30 - 2, 2**30, -1, 1)
    assert not table.int32_index_exact
    qa = torch.tensor([2**30 - 2, 2**30], dtype=torch.int32)
    qb = torch.tensor([-1, 1], dtype=torch.int8)
    assert table.pair_index(qa, qb).dtype == torch.int64
    assert torch.equal(table(qa, qb), qa.to(torch.int64) - qb.to(torch.int64))


def test_a_table_refuses_a_dtype_that_cannot_hold_its_codes():
    with pytest.raises(InvalidParameterError, match="cannot hold"):
        CodeTable(lambda q: q, 0, 255, dtype=torch.int8)
    with pytest.raises(InvalidParameterError, match="not torch.float16"):
        CodeTable(lambda q: q, 0, 255, dtype=torch.float16)
    assert CodeTable(lambda q: q, 0, 255, dtype=torch.uint8).table.dtype == torch.uint8


@pytest.mark.parametrize("dtype,shift", [(torch.int8, 128), (torch.uint8, 0), (torch.int64, 128), (torch.int64, 0)])
def test_uint8_codes_of_narrow_codes_leave_the_codes_untouched(dtype, shift):
    lo = -128 if shift else 0
    codes = torch.arange(lo, lo + 256).to(dtype).reshape(4, 64)
    before = codes.clone()
    got = uint8_codes(codes, shift)
    assert got.dtype == torch.uint8 and torch.equal(got.to(torch.int64), before.to(torch.int64) + shift)
    assert torch.equal(codes, before) and codes.dtype == dtype


def test_a_copy_given_another_graph_drops_values_by_its_own_graph():
    """IntegerModel.run keeps the graph's last-use map per graph object: a copy whose graph outputs every node
    (the ONNX exporter's probe) must not drop values by the original graph's map."""
    import copy

    from qparity.graph import Graph, Ref

    torch.manual_seed(6)
    batches = [torch.randn(2, 3, 16, 16) for _ in range(2)]
    _, integer = prepare_and_convert(ResNetish((4, 8), in_channels=3), (batches[0],), "tflite", batches)
    codes = integer.quantize(batches[1])
    integer.run(codes)  # the original graph's map, computed and kept
    probe = copy.copy(integer)
    probe.graph = Graph(integer.graph.nodes, tuple(Ref(n.name) for n in integer.graph.nodes),
                        integer.graph.input_shapes)
    values = probe.run(codes)
    assert len(values) == len(integer.graph.nodes)
    assert torch.equal(values[-1].to(torch.int64), integer.run(codes).to(torch.int64))
