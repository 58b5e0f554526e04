"""prepare_qat captures through torch.export where torch.fx cannot trace (Python control flow on shapes, asserts,
loops over sizes, tuple unpacking of tensors), and says which capture it used. The exported capture is the fx
capture: the same program, trained, frozen and converted bit for bit, exported and verified in the runtimes."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import qparity as qp
from helpers import assert_bit_exact, assert_runtime_gives_the_same_codes, calibrate
from networks import NETWORKS
from qparity.capture_export import export_as_fx
from qparity.errors import CaptureError, UnsupportedOpError
from test_vit import TinyViT


class ShapeDependent(nn.Module):
    """Control flow torch.fx cannot trace: an assert on the rank, a branch on the width, a loop over channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        assert x.dim() == 4, "NCHW input"
        y = self.stem(x)
        while y.shape[-1] > 4:
            y = self.pool(y)
        for _ in range(y.size(1) // 4):
            y = y + F.relu(self.body(y))
        return self.head(torch.cat([y[:, :4], y[:, 4:]], 1).reshape(y.shape[0], -1))


class Untraceable(nn.Module):
    """Any model behind an assert on its input's rank: torch.fx fails, torch.export runs it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        assert x.dim() > 2
        return self.model(x)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        tokens = self.embed(x)
        if tokens.shape[1] > 1:
            tokens = tokens + self.attention(tokens, tokens, tokens)[0]
        return tokens.mean(1)


class CumulativeSum(nn.Module):
    def forward(self, x):
        return torch.cumsum(x, -1) if x.shape[-1] > 1 else x


class WithCumulativeSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.scan = nn.Conv2d(1, 2, 1), CumulativeSum()

    def forward(self, x):
        return self.scan(self.conv(x))


class InPlace(nn.Module):
    """In-place ops, `c - x` and split, behind an assert: export reads each mutated tensor through its in-place node."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        assert x.dim() == 4
        y = self.conv(x)
        y += 1
        z = F.relu(y, inplace=True)
        return (1 - z) * 2 + y + x.split([1, 1], 1)[0]


class MutatedView(InPlace):
    def forward(self, x):
        assert x.dim() == 4
        y = self.conv(x)
        y[:, :1] += 1
        return y


class TensorConstant(InPlace):
    def forward(self, x):
        assert x.dim() == 4
        return self.conv(x) + torch.tensor(3.0)


class BatchFromLen(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.reshape(len(x), -1))


def prepare_trained(model, x, target="exact", lr=0.05):
    torch.manual_seed(0)
    prepared = qp.prepare_qat(model, (x[:1],), target=target)  # a batch of one: export must not fix it
    calibrate(prepared, [x, x.flip(0) * 0.5], lr=lr)
    qp.freeze(prepared)
    return prepared


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), target=st.sampled_from(["exact", "tflite", "onnxruntime", "fbgemm"]),
       batch=st.integers(1, 6))
def test_fake_equals_integer_for_a_shape_dependent_model_captured_by_torch_export(seed, target, batch):
    torch.manual_seed(seed)
    model, x = ShapeDependent(), torch.randn(4, 3, 8, 8)
    prepared = prepare_trained(model, x, target)
    assert prepared.capture_method == "torch.export"
    assert_bit_exact(prepared, qp.convert(prepared), torch.randn(batch, 3, 8, 8) * 2)


def test_export_capture_folds_batch_norm_and_owns_the_models_parameters():
    prepared = qp.prepare_qat(ShapeDependent(), (torch.randn(2, 3, 8, 8),))
    ops = [n.op for n in prepared.graph.nodes]
    assert "batch_norm" not in ops and ops.count("conv2d") == 3 and ops.count("clamp") == 0  # folded, fused
    stem = prepared.layers["stem_0"]
    assert isinstance(stem.module, nn.Conv2d) and isinstance(stem.batch_norm, nn.BatchNorm2d)
    assert "captured with torch.export" in repr(prepared)


@pytest.mark.parametrize("name", ["preact_resnet", "vit"])
def test_export_capture_computes_what_the_fx_capture_computes(name):
    build, shape = (TinyViT, (1, 8, 8)) if name == "vit" else NETWORKS[name]
    torch.manual_seed(0)
    model, x = build(), torch.randn(2, *shape)
    traced, exported = prepare_trained(model, x), prepare_trained(Untraceable(model), x)
    assert (traced.capture_method, exported.capture_method) == ("torch.fx", "torch.export")
    assert [n.op for n in traced.graph.nodes if n.op != "call"] == [n.op for n in exported.graph.nodes if n.op != "call"]
    y = torch.randn(3, *shape)
    assert torch.equal(traced.eval()(y), exported.eval()(y))
    assert torch.equal(qp.convert(traced)(y), qp.convert(exported)(y))


def test_multihead_attention_is_captured_as_one_module_by_torch_export():
    prepared = prepare_trained(SelfAttention(), torch.randn(4, 5, 4))
    assert prepared.capture_method == "torch.export"
    assert {"matmul", "softmax"} <= {n.op for n in prepared.graph.nodes}
    assert_bit_exact(prepared, qp.convert(prepared), torch.randn(3, 5, 4))


@pytest.mark.parametrize("target", ["tflite", "onnxruntime"])
def test_export_captured_model_verifies_in_the_runtime_with_no_mismatches(tmp_path, target):
    x = torch.randn(4, 3, 8, 8)
    integer = qp.convert(prepare_trained(ShapeDependent(), x, target))
    assert_runtime_gives_the_same_codes(integer, torch.randn(3, 3, 8, 8), tmp_path)


@pytest.mark.parametrize("build, shape", [(ShapeDependent, (3, 8, 8)), (SelfAttention, (5, 4)), (InPlace, (2, 4, 4))],
                         ids=["shape_dependent", "self_attention", "in_place"])
def test_the_rewritten_graph_computes_the_models_forward(build, shape):
    torch.manual_seed(0)
    model, x = build().eval(), torch.randn(3, *shape)
    assert torch.equal(export_as_fx(model, (x[:1],))(x), model(x))


def test_a_traceable_model_still_uses_torch_fx():
    prepared = qp.prepare_qat(NETWORKS["small_unet"][0](), (torch.randn(1, 3, 16, 16),))
    assert prepared.capture_method == "torch.fx"
    assert "captured with torch.fx" in repr(prepared)


def test_an_unmapped_aten_op_names_the_op_and_the_module():
    with pytest.raises(UnsupportedOpError, match=r"aten\.cumsum\.default at node 'cumsum' in module 'scan' "
                                                 r"\(CumulativeSum\).*torch\.export"):
        qp.prepare_qat(WithCumulativeSum(), (torch.randn(1, 1, 3, 3),))


@pytest.mark.parametrize("build, phrase", [(MutatedView, r"aten\.add_\.Tensor .*in-place op on a tensor that is a view"),
                                           (TensorConstant, r"a tensor created in the forward")],
                         ids=["mutated_view", "tensor_constant"])
def test_what_the_export_capture_cannot_read_is_refused_by_name(build, phrase):
    with pytest.raises(UnsupportedOpError, match=phrase):
        qp.prepare_qat(build(), (torch.randn(1, 2, 3, 3),))


def test_a_forward_that_fixes_the_batch_size_is_refused():
    with pytest.raises(CaptureError, match=r"'len' is not supported.*fixes the batch size.*x\.size\(0\)"):
        qp.prepare_qat(BatchFromLen(), (torch.randn(2, 3, 4),))
