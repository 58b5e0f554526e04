"""Conv1d (with BatchNorm1d folded), F.conv1d, the temporal mean and AdaptiveAvgPool1d: the 2-D operators
on [N, C, 1, L], exact on every target, in the real runtimes and in PyTorch's engines (to_torch)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from qparity.errors import UnsupportedOpError



class TemporalNet(nn.Module):
    def __init__(self, cin, cout, kernel, stride, padding, dilation, groups, bias, batch_norm):
        super().__init__()
        self.conv = nn.Conv1d(cin, cout, kernel, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm1d(cout) if batch_norm else nn.Identity()
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(cout, 3)

    def forward(self, x):
        y = F.relu(self.bn(self.conv(x)))
        return self.fc(self.pool(y).flatten(1)), y.mean(-1)


geometries = st.fixed_dictionaries({
    "groups": st.sampled_from([1, 2]), "per_group": st.integers(1, 3), "out_per_group": st.integers(1, 3),
    "kernel": st.integers(1, 5), "stride": st.integers(1, 3), "padding": st.sampled_from([0, 1, 2, "same"]),
    "dilation": st.integers(1, 2), "bias": st.booleans(), "batch_norm": st.booleans(),
    "length": st.integers(9, 20)})  # at least the widest dilated kernel, (5 - 1) * 2 + 1


def build(g):
    stride = 1 if g["padding"] == "same" else g["stride"]
    model = TemporalNet(g["groups"] * g["per_group"], g["groups"] * g["out_per_group"], g["kernel"], stride,
                        g["padding"], g["dilation"], g["groups"], g["bias"], g["batch_norm"])
    x = torch.randn(6, g["groups"] * g["per_group"], g["length"])
    return model, x


def train_and_convert(model, x, target):
    prepared = qp.prepare_qat(model, (x,), target=target)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):  # BatchNorm1d learns in train mode, then folds into the conv at freeze
        loss = sum(o.square().mean() for o in prepared(x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qp.freeze(prepared)
    return prepared, qp.convert(prepared)


@pytest.mark.parametrize("target", qp.TARGETS)
@settings(max_examples=8, deadline=None)
@given(g=geometries, seed=st.integers(0, 1000))
def test_conv1d_fake_equals_integer(target, g, seed):
    torch.manual_seed(seed)
    model, x = build(g)
    try:
        prepared, integer = train_and_convert(model, x, target)
    except UnsupportedOpError as error:  # xnnpack's requantization range; tosa's grouped convs: named
        assert (target == "xnnpack" and "XNNPACK" in str(error)) or \
            (target == "tosa" and "DEPTHWISE_CONV2D (one input channel per group) only" in str(error)), error
        return
    for fake, deployed in zip(prepared.eval()(x), integer(x)):
        assert torch.equal(fake, deployed)


@pytest.mark.parametrize("target", list(FILE_SUFFIXES))
@settings(max_examples=4, deadline=None)
@given(g=geometries, seed=st.integers(0, 1000))
def test_exported_conv1d_gives_the_integer_models_codes_in_the_real_runtime(tmp_path_factory, target, g, seed):
    torch.manual_seed(seed)
    model, x = build(g)
    try:
        _, integer = train_and_convert(model, x, target)
    except UnsupportedOpError:
        return
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("conv1d"))


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_conv1d_runs_in_pytorchs_engine_through_to_torch(engine):
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    model, x = build({"groups": 1, "per_group": 3, "out_per_group": 2, "kernel": 3, "stride": 1, "padding": 1,
                      "dilation": 1, "bias": True, "batch_norm": True, "length": 16})
    _, integer = train_and_convert(model, x, engine)
    for torch_out, ours in zip(qp.to_torch(integer)(x), integer(x)):
        assert torch.equal(torch_out, ours)


def test_conv1d_keeps_training_the_users_parameters():
    torch.manual_seed(0)
    model, x = build({"groups": 1, "per_group": 2, "out_per_group": 2, "kernel": 3, "stride": 1, "padding": 1,
                      "dilation": 1, "bias": False, "batch_norm": True, "length": 10})
    prepared = qp.prepare_qat(model, (x,), target="exact")
    conv = prepared.layers[next(iter(prepared.layers))].module
    before = conv.weight_1d.detach().clone()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    loss = sum(o.square().mean() for o in prepared(x))
    loss.backward()
    optimizer.step()
    assert not torch.equal(conv.weight_1d, before) and conv.weight_1d.shape == (2, 2, 3)
    qp.freeze(prepared)  # BatchNorm1d folds into a new bias of the bias-free Conv1d
    assert conv.bias is not None


def test_batch_norm1d_on_a_sequence_no_conv1d_feeds_is_refused_by_name():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x + x)

    with pytest.raises(UnsupportedOpError, match="BatchNorm1d on a rank-3 tensor that no Conv1d feeds"):
        qp.prepare_qat(Model(), (torch.randn(2, 3, 5),))
