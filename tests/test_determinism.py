"""The engine targets fix the thread count and the input layout (docs/determinism.md).

PyTorch's fbgemm / x86 add, hardswish, leaky_relu and hardsigmoid split a tensor into one parallel chunk per
thread, and whole 64-element blocks of each chunk take a vector loop that rounds differently from the scalar
loop; the layout of the model's inputs decides the layouts (and so the loops and pool kernels) downstream.
A qparity model records both at prepare_qat, and its codes never depend on the caller's.
"""
from __future__ import annotations

import functools
import hashlib
import json
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import qparity as qp
from qparity.errors import QParityWarning, TargetSettingError
from qparity.numerics import get_target
from qparity.numerics.pytorch_engines import UNRECORDED_MEMORY_FORMAT, UNRECORDED_THREADS
from qparity.qparams import QParams
from qparity.serialize import DIGEST_SIZE, PREFIX

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
ENGINES = ("fbgemm", "x86")
SHAPE = (2, 16, 33, 35)  # 36,960 elements: over GRAIN_SIZE, so 2 threads make 2 chunks of 18,480 (not 64k)


@contextmanager
def threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class ResidualHardswishMean(nn.Module):
    """x + conv(x), hardswish, spatial mean: add follows both layouts, hardswish the chunks, the mean the pools."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.Hardswish()

    def forward(self, x):
        y = self.act(x + self.conv(x))
        return y, y.mean((2, 3))


@functools.lru_cache(maxsize=None)
def tie_prone_model(target, seed: int = 0):
    """A converted model whose grids put add's sums on half codes (s_x = s_conv = s_add / 2), where PyTorch's
    vector and scalar loops disagree most, so thread count and layout show in the codes. Shared: read only."""
    torch.manual_seed(seed)
    x = torch.randn(SHAPE)
    prepared = qp.prepare_qat(ResidualHardswishMean().eval(), x, target=target)
    qp.calibrate(prepared, [x])
    names = {n.op: n.name for n in prepared.graph.nodes}
    half = float(np.float32(0.0371))  # not a power of two: fma and two roundings differ on the half codes
    prepared.observers[names["input"]].fix(QParams(half, 129, "uint8"))
    prepared.observers[names["conv2d"]].fix(QParams(half, 127, "uint8"))
    prepared.observers[names["add"]].fix(QParams(2 * half, 131, "uint8"))
    return qp.convert(qp.freeze(prepared).eval()), prepared.eval(), x


def with_target(im, target):
    return qp.IntegerModel(im.graph, target, im.activation_dtype, im.qparams, im.layers)


def same(a, b) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b))


def codes_under(im, x, count: int, layout):
    with threads(count):
        return im.run(im.quantize(x.contiguous(memory_format=layout)))


@pytest.mark.parametrize("engine", ENGINES)
def test_the_test_model_is_sensitive_to_threads_and_layout(engine):
    """Without the recorded settings the codes would move: each setting alone changes them."""
    im, _, x = tie_prone_model(engine)
    one = with_target(im, im.target.configured(threads=1, memory_format="contiguous"))
    nhwc = with_target(im, im.target.configured(threads=1, memory_format="channels_last"))
    nhwc_two = with_target(im, im.target.configured(threads=2, memory_format="channels_last"))
    codes = [m.run(m.quantize(x)) for m in (one, nhwc, nhwc_two)]
    assert not same(codes[0], codes[1])
    assert not same(codes[1], codes[2])


@pytest.mark.parametrize("engine", ENGINES)
def test_codes_ignore_the_callers_thread_count_and_layout(engine):
    im, prepared, x = tie_prone_model(engine)
    runs = [codes_under(im, x, count, layout) for count in (1, 2)
            for layout in (torch.contiguous_format, torch.channels_last)]
    assert all(same(runs[0], other) for other in runs[1:])
    for count in (1, 2):
        with threads(count):
            assert same(prepared(x.contiguous(memory_format=torch.channels_last)), im(x))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("count,memory_format", [(1, "contiguous"), (2, "contiguous"), (2, "channels_last")])
def test_each_setting_computes_what_pytorch_computes_with_it(engine, count, memory_format):
    """qparity's emulation of a setting equals PyTorch's engine run with that thread count (to_torch), whatever
    layout the caller passes."""
    im, _, x = tie_prone_model(engine)
    pinned = with_target(im, im.target.configured(threads=count, memory_format=memory_format))
    torch.backends.quantized.engine = engine
    with threads(count):
        module = qp.to_torch(pinned)
        theirs = module(x.contiguous(memory_format=torch.channels_last))
    assert same(theirs, pinned(x))


def test_to_torch_warns_when_the_thread_count_differs_from_the_recorded_one():
    im, _, x = tie_prone_model("fbgemm")
    pinned = with_target(im, im.target.configured(threads=3))
    torch.backends.quantized.engine = "fbgemm"
    with threads(1), pytest.warns(QParityWarning, match=r"records 3 engine thread\(s\) but PyTorch runs 1"):
        qp.to_torch(pinned)(x)
    with threads(3), warnings.catch_warnings():
        warnings.simplefilter("error", QParityWarning)
        qp.to_torch(pinned)(x)


def test_prepare_records_this_process_threads_and_the_example_layout():
    x = torch.randn(1, 16, 6, 6)
    with threads(1):
        prepared = qp.prepare_qat(ResidualHardswishMean(), x.contiguous(memory_format=torch.channels_last),
                                  target="x86")
    assert (prepared.target.threads, prepared.target.memory_format) == (1, "channels_last")
    assert "engine_threads=1, memory_format=channels_last" in repr(prepared)
    qp.calibrate(prepared, [x])
    im = qp.convert(qp.freeze(prepared))
    assert im.target.settings() == prepared.target.settings()
    assert "engine_threads=1, memory_format=channels_last" in repr(im)


def test_explicit_settings_are_kept_and_open_ones_filled():
    target = get_target("fbgemm").configured(threads=4)
    with threads(2):
        prepared = qp.prepare_qat(ResidualHardswishMean(), torch.randn(1, 16, 6, 6), target=target)
    assert (prepared.target.threads, prepared.target.memory_format) == (4, "contiguous")
    assert get_target("fbgemm").threads is None  # the registry's target is not changed


def test_example_inputs_with_two_layouts_are_refused():
    class Two(nn.Module):
        def forward(self, a, b):
            return a + b

    a = torch.randn(1, 3, 4, 4)
    with pytest.raises(TargetSettingError, match="mix contiguous and channels_last"):
        qp.prepare_qat(Two(), (a, a.contiguous(memory_format=torch.channels_last)), target="fbgemm")
    qp.prepare_qat(Two(), (a, a.contiguous(memory_format=torch.channels_last)), target="exact")  # no layout rules


@pytest.mark.parametrize("settings_, message", [({"threads": 0}, "thread count 0"),
                                                ({"threads": 1.5}, "thread count 1.5"),
                                                ({"threads": True}, "thread count True"),
                                                ({"memory_format": "nhwc"}, "memory format 'nhwc'")])
def test_invalid_settings_are_refused(settings_, message):
    with pytest.raises(TargetSettingError, match=message) as caught:
        get_target("fbgemm").configured(**settings_)
    assert isinstance(caught.value, (qp.QParityError, ValueError))


def test_targets_without_engine_settings_record_none():
    exact = get_target("exact")
    assert exact.settings() == {} and exact.label() == "exact"
    x = torch.randn(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)
    assert exact.with_defaults_for((x,)) is exact and exact.arrange_input(x) is x


def test_a_qp_file_stores_and_restores_the_settings(tmp_path):
    im, _, x = tie_prone_model("fbgemm")
    pinned = with_target(im, im.target.configured(threads=2, memory_format="channels_last"))
    pinned.save(tmp_path / "model.qp")
    loaded = qp.load(tmp_path / "model.qp")
    assert loaded.target.settings() == pinned.target.settings()
    with threads(1):
        assert same(loaded.run(loaded.quantize(x)), pinned.run(pinned.quantize(x)))


def rewrite_header(path, edit) -> None:
    """Edit a .qp file's JSON header and sign it again (the file a writer without these fields made)."""
    raw = path.read_bytes()
    magic, version, header_len, data_len = PREFIX.unpack_from(raw)
    header = json.loads(raw[PREFIX.size:PREFIX.size + header_len])
    edit(header)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    data = raw[PREFIX.size + header_len:len(raw) - DIGEST_SIZE]
    body = PREFIX.pack(magic, version, len(header_bytes), len(data)) + header_bytes + data
    path.write_bytes(body + hashlib.sha256(body).digest())


def test_a_file_without_the_settings_loads_with_the_documented_defaults(tmp_path):
    im, _, x = tie_prone_model("x86")
    with_target(im, im.target.configured(threads=2, memory_format="channels_last")).save(tmp_path / "old.qp")
    rewrite_header(tmp_path / "old.qp", lambda h: (h.pop("engine_threads"), h.pop("memory_format")))
    loaded = qp.load(tmp_path / "old.qp")
    assert (loaded.target.threads, loaded.target.memory_format) == (UNRECORDED_THREADS, UNRECORDED_MEMORY_FORMAT)
    documented = with_target(im, im.target.configured(threads=1, memory_format="contiguous"))
    with threads(2):
        assert same(loaded.run(loaded.quantize(x)), documented.run(documented.quantize(x)))


@pytest.mark.parametrize("field,value", [("engine_threads", 0), ("engine_threads", None),
                                         ("memory_format", "nhwc")])
def test_a_file_with_a_bad_setting_is_refused(tmp_path, field, value):
    im, _, _ = tie_prone_model("fbgemm")
    im.save(tmp_path / "bad.qp")
    rewrite_header(tmp_path / "bad.qp", lambda h: h.update({field: value}))
    with pytest.raises(qp.QParityError, match="content qparity cannot read"):
        qp.load(tmp_path / "bad.qp")


@settings(max_examples=15, deadline=None)
@given(engine=st.sampled_from(ENGINES), seed=st.integers(0, 2**32 - 1), recorded=st.integers(1, 4),
       running=st.integers(1, 4), length=st.integers(32768, 3 * 32768 + 500))
def test_configured_elementwise_kernels_ignore_torch_get_num_threads(engine, seed, recorded, running, length):
    """add and hardswish of a configured target depend on its recorded count only; they equal the unconfigured
    target run with torch.set_num_threads(recorded) (PyTorch's own semantics)."""
    rng = np.random.default_rng(seed)
    out = QParams(float(np.float32(10 ** rng.uniform(-2, -0.5))), int(rng.integers(0, 256)), "uint8")
    grid = QParams(float(out.scale) / 2, int(rng.integers(0, 128)) * 2 + 1, "uint8")
    qa = torch.from_numpy(rng.integers(0, 256, size=length))
    qb = torch.from_numpy(rng.integers(0, 256, size=length))
    configured, follows = get_target(engine).configured(threads=recorded), get_target(engine)
    with threads(running):
        ours = (configured.add(qa, grid, qb, grid, out, 0, 255), configured.hardswish(qa, grid, out))
    with threads(recorded):
        expected = (follows.add(qa, grid, qb, grid, out, 0, 255), follows.hardswish(qa, grid, out))
    assert all(torch.equal(a, b) for a, b in zip(ours, expected))


class TorchResidual(nn.Module):
    """A torch.ao eager model: quant, x + conv(x) in a FloatFunctional, dequant."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.quant, self.dequant = torch.ao.quantization.QuantStub(), torch.ao.quantization.DeQuantStub()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.quantized.FloatFunctional()

    def forward(self, x):
        x = self.quant(x)
        return self.dequant(self.skip.add(x, self.conv(x)))


def torch_ao_residual(engine: str, tie_prone: bool):
    tq = torch.ao.quantization
    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    x = torch.randn(SHAPE)
    model = TorchResidual().train()
    model.qconfig = tq.get_default_qat_qconfig(engine)
    prepared = tq.prepare_qat(model)
    prepared(x)
    prepared.eval()
    converted = tq.convert(prepared, inplace=False)
    if tie_prone:  # half-code sums, as tie_prone_model
        half = float(np.float32(0.0371))
        converted.quant.scale.fill_(half)
        converted.quant.zero_point.fill_(129)
        converted.conv.scale, converted.conv.zero_point = half, 127
        converted.skip.scale, converted.skip.zero_point = 2 * half, 131
    return prepared, converted, x


@pytest.mark.parametrize("engine", ENGINES)
def test_doctor_counts_what_pytorchs_engine_moves_with_threads_and_layout(engine):
    prepared, converted, x = torch_ao_residual(engine, tie_prone=True)
    nhwc = converted(x.contiguous(memory_format=torch.channels_last))
    moved = int((nhwc != converted(x)).sum())
    assert moved > 0
    notes = [n for n in qp.doctor(prepared, converted, x).notes if "thread" in n]
    assert len(notes) == 1 and "computes other output values" in notes[0]
    assert f"{torch.get_num_threads()} thread(s) with channels_last inputs: {moved}" in notes[0]


def test_doctor_says_when_the_engine_did_not_vary_on_these_inputs():
    prepared, converted, x = torch_ao_residual("fbgemm", tie_prone=False)
    (note,) = [n for n in qp.doctor(prepared, converted, x[:1]).notes if "thread" in n]
    assert "gave the same" in note and "qparity models fix both" in note
