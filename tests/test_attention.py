"""Attention: matmul of two activations, softmax over the last dimension, F.scaled_dot_product_attention
decomposed, heads split and merged by layout calls, a class token selected by indexing. Fake == integer on every
target that runs them, the exported file gives the integer model's codes in the real runtime (0 mismatches),
the exact softmax is correctly rounded, and what no target emulates is refused by name at prepare_qat."""
import json
import warnings
from fractions import Fraction

import mpmath
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import assert_runtime_gives_the_same_codes, calibrate
from qparity.errors import UnsupportedOpError
from qparity.numerics.softmax import exact_softmax
from qparity.qparams import QParams

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
ATTENTION_TARGETS = ("exact", "tflite", "onnxruntime")


class SelfAttention(nn.Module):
    """Multi-head self-attention on [N, T, D]: Linear QKV, heads split, softmax(Q K^T * scale) V, heads merged,
    out projection, residual add; `fused` uses F.scaled_dot_product_attention, `class_token` returns a head on
    x[:, 0]."""

    def __init__(self, dim=16, heads=2, fused=False, class_token=False):
        super().__init__()
        self.heads, self.fused, self.class_token = heads, fused, class_token
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.fused:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = ((q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5).softmax(dim=-1)
            y = weights @ v
        y = x + self.out(y.transpose(1, 2).reshape(n, t, d))
        return self.head(y[:, 0]) if self.class_token else y


def trained(model, target, seed, activation_dtype=None, steps=3):
    torch.manual_seed(seed)
    x = torch.randn(2, 5, 16)
    prepared = qp.prepare_qat(model, (x,), target=target, activation_dtype=activation_dtype)
    calibrate(prepared, [torch.randn(4, 5, 16) * 2 for _ in range(steps)], lr=0.01)
    qp.freeze(prepared)
    return prepared, qp.convert(prepared), torch.randn(6, 5, 16) * 2


@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_attention_block_fake_equals_integer_on_the_exact_target(seed):
    prepared, integer, x = trained(SelfAttention(), "exact", seed)
    assert torch.equal(prepared.eval()(x), integer(x))


@pytest.mark.parametrize("target, activation_dtype, class_token", [
    ("tflite", None, False), ("tflite", None, True), ("onnxruntime", "uint8", True), ("onnxruntime", "int8", False)])
def test_attention_block_trains_converts_and_runs_bit_exact_in_the_runtime(tmp_path, target, activation_dtype,
                                                                           class_token):
    prepared, integer, x = trained(SelfAttention(class_token=class_token), target, 0, activation_dtype)
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)


@pytest.mark.parametrize("target", ["tflite", "onnxruntime"])
def test_scaled_dot_product_attention_is_exported_as_its_decomposition(tmp_path, target):
    prepared, integer, x = trained(SelfAttention(fused=True), target, 1)
    assert [n.op for n in integer.graph.nodes].count("softmax") == 1
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)


class Linear4d(nn.Module):
    """Linear layers on [N, heads, T, d]: FULLY_CONNECTED / QGemm over the last dimension of a 4-D tensor."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.second(self.first(x).relu())


@pytest.mark.parametrize("target", ["tflite", "onnxruntime"])
def test_linear_on_4d_inputs_runs_bit_exact_in_the_runtime(tmp_path, target):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)
    prepared = qp.prepare_qat(Linear4d(), (x,), target=target)
    calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)


def test_saved_attention_model_loads_with_the_same_codes_and_writes_golden_vectors(tmp_path):
    _, integer, x = trained(SelfAttention(fused=True, class_token=True), "tflite", 2)
    integer.save(tmp_path / "block.qp")
    assert torch.equal(qp.load(tmp_path / "block.qp")(x), integer(x))
    index = qp.golden(integer, x, tmp_path / "golden")
    assert {"matmul", "softmax"} <= {entry["op"] for entry in json.loads(index.read_text())["nodes"]}


class Scores(nn.Module):
    """softmax(a @ b^T * c) @ b for two linear projections of x: matmul and softmax on grids of random widths."""

    def __init__(self, width, gain):
        super().__init__()
        self.a, self.b, self.gain = nn.Linear(width, width), nn.Linear(width, width), gain

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return torch.softmax(torch.matmul(a, b.transpose(1, 2)) * self.gain, dim=-1) @ b


@pytest.mark.parametrize("target", ["tflite", "onnxruntime"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.integers(2, 9), width=st.integers(1, 12),
       gain=st.sampled_from([0.05, 0.5, 3.0]), spread=st.floats(0.1, 8.0))
def test_random_matmul_and_softmax_match_the_runtime(tmp_path_factory, target, seed, tokens, width, gain, spread):
    torch.manual_seed(seed)
    x = torch.randn(2, tokens, width) * spread
    prepared = qp.prepare_qat(Scores(width, gain), (x,), target=target)
    calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("scores"))


class Classifier(nn.Module):
    """A classifier head ending in softmax (the common case without matmul)."""

    def __init__(self, width, gain):
        super().__init__()
        self.logits, self.gain = nn.Linear(width, width), gain

    def forward(self, x):
        return torch.softmax(self.logits(x) * self.gain, dim=-1)


@pytest.mark.parametrize("target", ["tflite", "xnnpack"])
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31), width=st.integers(2, 40), gain=st.sampled_from([0.1, 1.0, 5.0, 30.0]))
def test_random_softmax_matches_litert(tmp_path_factory, target, seed, width, gain):
    torch.manual_seed(seed)
    x = torch.randn(8, 3, width)
    prepared = qp.prepare_qat(Classifier(width, gain), (x,), target=target)
    calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("softmax"))


def softmax_by_mpmath(row, i, s, s_y):
    with mpmath.workprec(300):
        total = mpmath.fsum(mpmath.exp((v - row[i]) * mpmath.mpf(s)) for v in row)
        t = 1 / total / mpmath.mpf(s_y)
        return int(mpmath.nint(t))  # no ties: only constant rows are rational (numerics/softmax.py)


@settings(max_examples=30, deadline=None)
@given(codes=st.lists(st.integers(-128, 127), min_size=2, max_size=12).filter(lambda r: len(set(r)) > 1),
       s=st.floats(2.0**-8, 2.0), s_y=st.floats(2.0**-10, 2.0**-6))
def test_exact_softmax_is_correctly_rounded(codes, s, s_y):
    source, out = QParams(s, 0, "int8"), QParams(s_y, -128, "int8")
    got = exact_softmax(torch.tensor([codes]), source, out)[0].tolist()
    s, s_y = float(source.scale), float(out.scale)
    assert got == [min(max(-128 + softmax_by_mpmath(codes, i, s, s_y), -128), 127) for i in range(len(codes))]


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_exact_softmax_rounds_the_tie_of_a_constant_row_half_to_even(depth):
    # A constant row gives y = 1 / depth exactly; on the grid s_y = 2 / depth that is 0.5 codes: a tie, to 0.
    out = QParams(2.0 / depth, 0, "int8")
    codes = exact_softmax(torch.full((1, depth), 7), QParams(0.1, 0, "int8"), out)
    assert codes.tolist() == [[0] * depth]
    assert round(Fraction(1, depth) / Fraction(2, depth)) == 0


class WithMultiheadAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.proj(x)
        return y + self.attention(y, y, y, need_weights=False)[0]


@pytest.mark.parametrize("target", ["tflite", "onnxruntime"])
def test_multihead_attention_is_written_out_trained_and_bit_exact_in_the_runtime(tmp_path, target):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    prepared = qp.prepare_qat(WithMultiheadAttention(), (x,), target=target)
    in_proj = prepared.layers["attention_output_in_proj"].module.weight
    before = in_proj.detach().clone()
    calibrate(prepared, [x, -x, 2 * x], lr=0.05)
    assert not torch.equal(in_proj.detach(), before)  # QAT trains the module's own packed projection
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)


class Unsupported(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(8, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        y = self.proj(x)
        if self.kind == "mha_weights":
            return self.attention(y, y, y)[1]
        if self.kind == "mha_cross":
            return self.attention(y, x, x)[0]
        if self.kind == "softmax_dim1":
            return torch.softmax(y, dim=1)
        if self.kind == "causal":
            return F.scaled_dot_product_attention(y, y, y, is_causal=True)
        return y @ y.transpose(1, 2)


def test_onnxruntime_refuses_a_softmax_over_one_element_by_name():
    with pytest.raises(UnsupportedOpError, match="softmax at node 'softmax'.*size 1"):
        qp.prepare_qat(Scores(4, 1.0), (torch.randn(2, 1, 4),), target="onnxruntime")(torch.randn(2, 1, 4))


@pytest.mark.parametrize("kind, target, message", [
    ("mha_weights", "tflite", "MultiheadAttention at module 'attention'.*attention weights"),
    ("mha_cross", "exact", "other than self-attention"),
    ("softmax_dim1", "exact", "softmax over dim=1"),
    ("causal", "exact", "is_causal"),
    ("matmul", "fbgemm", "targets that run it: exact, tflite, onnxruntime"),
    ("matmul", "xnnpack", "VisitBatchMatMulNode"),
])
def test_what_no_target_emulates_is_refused_at_prepare_qat_by_name(kind, target, message):
    with pytest.raises(UnsupportedOpError, match=message):
        qp.prepare_qat(Unsupported(kind), (torch.randn(2, 3, 8),), target=target)


class BroadcastMatmul(nn.Module):
    """Per-head queries against one shared key matrix: batch dimensions [N, H] and [N, 1] broadcast."""

    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        return torch.matmul(self.q(x), self.k(x[:, :1]).transpose(-1, -2))


def test_matmul_with_broadcast_batch_dimensions_runs_on_tflite_and_is_refused_by_tosa_at_prepare_qat(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 6)
    prepared = qp.prepare_qat(BroadcastMatmul(), (x,), target="tflite")
    calibrate(prepared, [x, -x])
    integer = qp.convert(qp.freeze(prepared))
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)
    with pytest.raises(UnsupportedOpError, match="matmul at .*batch dimensions broadcast.*'tflite'"):
        qp.prepare_qat(BroadcastMatmul(), (x,), target="tosa")
