"""The fbgemm/x86/qnnpack IntegerModel on PyTorch's engine (engine_program.py) computes, node by node, the codes and
layouts of the targets' emulation (ProgramExecutor), over random models, grids, layouts and batch sizes."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from qparity.convert import convert
from qparity.engine_program import EngineProgram, parallel_chunks
from qparity.errors import UnsupportedOpError
from qparity.graph import QValue
from qparity.numerics import get_target
from qparity.numerics.engine_kernels import engine_selected, qnnpack_bias_fits
from qparity.numerics.int8_accumulate import int32_dot_products
from qparity.qat.prepare import freeze, prepare_qat
from qparity.qparams import QParams

ENGINE_OPS = ("conv2d", "linear", "add", "max_pool2d", "avg_pool2d", "hardswish", "clamp", "call", "dropout")


class RandomNet(nn.Module):
    """A stem conv, then blocks drawn from `blocks`, then a pool and a linear head; `blocks` names each one."""

    def __init__(self, channels: int, blocks, head: str, clamp: str):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.stem_act = {"relu": nn.ReLU(), "relu6": nn.ReLU6(), "none": nn.Identity()}[clamp]
        self.blocks, self.width = blocks, channels
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, groups=g) for g in (1, 2, 1, 1))
        self.bn = nn.BatchNorm2d(channels)
        self.head = head
        self.fc = nn.Linear(channels, 5)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        x = self.stem_act(self.stem(x))
        for i, block in enumerate(self.blocks):
            if block == "residual":
                x = F.relu(self.bn(self.convs[i](x)) + x)
            elif block == "add":  # no ReLU after the add
                x = self.convs[i](x) + x
            elif block == "maxpool":
                x = F.max_pool2d(x, 2, ceil_mode=True)
            elif block == "avgpool":
                x = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
            elif block == "hardswish":
                x = F.hardswish(self.convs[i](x))
            elif block == "relu":  # a ReLU after an add: not fused into a layer
                x = F.relu(self.convs[i](x) + x)
            elif block == "cat":  # the emulation's node: the program falls back and wraps its result again
                x = torch.cat([x, self.convs[i](x)], 1)[:, : self.width]
        if self.head == "adaptive":
            x = F.adaptive_avg_pool2d(x, 1)
        elif self.head == "pool1d":  # flatten of a channels-last tensor: a view of codes, a copy of a quint8 tensor
            x = F.adaptive_avg_pool1d(x.flatten(2), 3).mean(2, keepdim=True)
        elif self.head == "uneven":
            x = F.adaptive_avg_pool2d(x, (3, 2)).mean((2, 3), keepdim=True)
        x = torch.flatten(self.drop(x), 1)
        return self.fc(x)


def integer_model(net, target, x, per_channel=True):
    prepared = prepare_qat(net, (x,), target=target, per_channel=per_channel).train()
    with torch.no_grad():
        for _ in range(2):
            prepared(x)
    freeze(prepared)
    return convert(prepared.eval())


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal strides along every dimension longer than 1 (the others never decide a kernel's loop)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def assert_every_node_equals_the_emulation(model, codes):
    emulation = model.executor()
    expected = emulation.run([codes.to(torch.int64)])
    with engine_selected(model.engine_program.engine):  # as EngineProgram.run: add and pools dispatch on it
        values = model.engine_program._run_nodes([codes])
    for name, value in emulation.values.items():
        if not hasattr(value, "codes"):
            continue
        got = values.codes_of(name).codes
        assert torch.equal(got, value.codes), f"node {name}: {(got != value.codes).sum()} codes differ"
        assert same_layout(got, value.codes), f"node {name}: strides {got.stride()} vs {value.codes.stride()}"
    output = model.run(codes)
    assert torch.equal(output, expected.codes.to(torch.uint8))


blocks = st.lists(st.sampled_from(["residual", "add", "maxpool", "avgpool", "hardswish", "relu", "cat"]),
                  min_size=1, max_size=4)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's deprecation notes on quantized tensors
        yield
    torch.set_num_threads(threads)


@settings(max_examples=25, deadline=None)
@given(target=st.sampled_from(["x86", "fbgemm", "qnnpack"]), channels=st.sampled_from([4, 8, 16, 24]), blocks=blocks,
       head=st.sampled_from(["adaptive", "uneven", "pool1d"]), clamp=st.sampled_from(["relu", "relu6", "none"]),
       size=st.integers(6, 12), batch=st.sampled_from([1, 2, 5]), channels_last=st.booleans(),
       per_channel=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_engine_program_equals_the_emulation_at_every_node(target, channels, blocks, head, clamp, size, batch,
                                                           channels_last, per_channel, seed):
    torch.manual_seed(seed)
    x = torch.randn(batch, 3, size, size) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model = integer_model(RandomNet(channels, blocks, head, clamp), target, x, per_channel)
    if target != "qnnpack" and not int32_dot_products():
        assert model.engine_program is None  # fbgemm's GEMM saturates int16 pairs without VNNI: the emulation runs
        return
    engine_ops = {model.graph.node(name).op for name in model.engine_program.engine_nodes}
    assert {"conv2d", "linear"} <= engine_ops
    assert_every_node_equals_the_emulation(model, model.quantize(torch.randn(batch + 1, 3, size, size) * 3))


@pytest.mark.parametrize("target", ["x86", "fbgemm", "qnnpack"])
def test_add_beyond_one_parallel_chunk_follows_the_recorded_thread_count(target):
    # 2 x 16 x 48 x 48 codes: two chunks on two threads, so qadd's vector loop leaves a scalar tail in each. A model
    # recorded for two threads run on one must keep the emulation's split (the program then emulates that add).
    # QNNPACK's fixed-point add is the same for every element, so qnnpack runs it on the engine either way.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    n = 2 * 16 * 48 * 48
    assert parallel_chunks(n, 2) == 2 and parallel_chunks(n, 1) == 1
    for threads in (1, 2):
        model = integer_model(RandomNet(16, ["residual"], "adaptive", "relu"),
                              get_target(target).configured(threads=threads), x)
        if target == "qnnpack":
            assert "add" in model.engine_program.engine_nodes
        if target == "qnnpack" or int32_dot_products():
            assert_every_node_equals_the_emulation(model, model.quantize(x))


def test_qnnpack_add_outside_its_scale_ratios_keeps_the_emulations_refusal():
    # PyTorch's qnnpack add rejects f(s_a / s_y) outside [2^-14, 2^8) with a RuntimeError; the program leaves
    # such an add to the emulation, which refuses it as an UnsupportedOpError naming qnnpack's add.
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = integer_model(RandomNet(8, ["add"], "adaptive", "relu"), "qnnpack", x)
    add = next(n for n in model.graph.nodes if n.op == "add")
    assert add.name in model.engine_program.engine_nodes
    grid = model.grids[add.name]
    first = add.args[0].name
    for ratio in (2.0**8, 2.0**-15):
        model.grids[first] = QParams(float(grid.scale) * ratio, int(model.grids[first].zero_point), "uint8")
        assert add.name not in EngineProgram(model, "qnnpack").engine_nodes
        codes = torch.zeros(1, 8, 2, 2, dtype=torch.int64)
        with pytest.raises(UnsupportedOpError, match="qnnpack add"):
            model.executor().dispatch(add, [QValue(codes, model.grids[first]),
                                            QValue(codes, model.grids[add.args[1].name])], {})


@pytest.mark.parametrize("margin, fits", [(-128, True), (0, False), (128, False)])  # float32 steps of 128 here
def test_qnnpack_layer_declines_a_bias_whose_int32_sum_could_wrap(margin, fits):
    # QNNPACK adds the bias code to the accumulator in int32 (the emulation in float64): the engine's kernel runs
    # a layer only where |bias code| + 2^24 (the "float32" plan's accumulator bound) stays below 2^31.
    grid = QParams(0.5, 0, "uint8")
    weight_scale = torch.tensor([0.25, 0.125])
    product = 0.5 * weight_scale
    bias = torch.tensor([1.0, 2.0**31 - 2.0**24 + margin]) * product
    assert qnnpack_bias_fits(bias, grid, weight_scale) is fits
    assert qnnpack_bias_fits(-bias, grid, weight_scale) is fits


def test_engine_program_is_only_built_for_the_engine_targets():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for target in ("tflite", "xnnpack", "exact"):
        assert integer_model(RandomNet(8, ["residual"], "adaptive", "relu"), target, x).engine_program is None


@pytest.mark.parametrize("target, caller", [("fbgemm", "qnnpack"), ("qnnpack", "x86")])
def test_engine_program_leaves_the_callers_engine_setting(target, caller):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    model = integer_model(RandomNet(8, ["residual", "avgpool"], "adaptive", "relu"), target, x)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = caller
    try:
        codes = model.quantize(x)
        if target == "qnnpack" or int32_dot_products():
            assert_every_node_equals_the_emulation(model, codes)  # add and pools run the target's kernels
        assert torch.backends.quantized.engine == caller
    finally:
        torch.backends.quantized.engine = previous
