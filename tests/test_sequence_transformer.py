"""A small transformer encoder over sequences learns sklearn's digits through the integer program: each image is a
sequence of 8 tokens (its rows) of 8 features, embedded by a linear layer plus a learned position embedding, two
pre-norm encoder blocks (LayerNorm, nn.MultiheadAttention self-attention, LayerNorm, ReLU MLP, residual adds),
LayerNorm, token mean pooling and a linear head (a ReLU MLP: TFLite Micro registers no GELU kernel). It trains
with QAT, freezes, converts, and fake == integer bit for bit; the exported file gives the same codes in LiteRT and
in TFLite Micro and TOSA's reference model (0 mismatches); every other target refuses it at prepare_qat, naming the operator."""
import copy
import functools
import warnings

import pytest
import torch
from torch import nn

import qparity as qp
from helpers import assert_runtime_gives_the_same_codes
from qparity.errors import UnsupportedOpError
from test_vit import accuracy, train

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
DIM, TOKENS, FEATURES, HEADS = 16, 8, 8, 2


class EncoderBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attention = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.ReLU(), \
            nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attention(y, y, y, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class SequenceEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(FEATURES, DIM)
        self.position = nn.Parameter(torch.randn(TOKENS, DIM) * 0.1)
        self.blocks = nn.Sequential(EncoderBlock(), EncoderBlock())
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x) + self.position)).mean(1))


def digit_rows():
    """sklearn's digits as [N, 8 rows, 8 pixels] sequences in [0, 1]: 1,400 to train, 397 to test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


@functools.lru_cache(maxsize=None)
def float_trained() -> SequenceEncoder:
    torch.manual_seed(0)
    x, y, _, _ = digit_rows()
    model = SequenceEncoder()
    train(model, x, y, epochs=8, lr=1e-2)
    return model


@pytest.mark.parametrize("target", ["tflite", "tflite-micro", "tosa"])
def test_sequence_transformer_learns_digits_and_runs_bit_exact_in_the_runtime(tmp_path, target):
    x, y, x_test, y_test = digit_rows()
    x_test, y_test = x_test[:200], y_test[:200]  # the integer program's cost, on a shared test machine
    model = copy.deepcopy(float_trained())
    float_accuracy = accuracy(model.eval()(x_test).detach(), y_test)
    torch.manual_seed(0)
    prepared = qp.prepare_qat(model, (x[:8],), target=target)
    train(prepared, x[:400], y[:400], epochs=1, lr=5e-4)
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    fake, integer_logits = prepared.eval()(x_test), integer(x_test)
    assert torch.equal(fake, integer_logits)
    fake_accuracy, integer_accuracy = accuracy(fake, y_test), accuracy(integer_logits, y_test)
    print(f"sequence transformer ({target}) digits: float {float_accuracy:.3f}, fake "
          f"{fake_accuracy:.3f}, integer {integer_accuracy:.3f}")
    assert float_accuracy > 0.8 and integer_accuracy > float_accuracy - 0.05  # chance is 0.1
    assert_runtime_gives_the_same_codes(integer, x_test[:32], tmp_path)


# The first operator of the model each other target refuses (docs/ops.md says why).
REFUSALS = {"onnxruntime": "mean at module 'blocks.0.norm1'", "xnnpack": "mean at module 'blocks.0.norm1'",
            "fbgemm": "add at node 'add'", "x86": "add at node 'add'", "qnnpack": "add at node 'add'",
            "executorch-xnnpack": "rsqrt at module 'blocks.0.norm1'"}


def test_every_target_runs_it_or_is_listed_as_refusing_it():
    assert set(qp.TARGETS) == set(REFUSALS) | {"exact", "tflite", "tflite-micro", "tosa"}


@pytest.mark.parametrize("target", sorted(REFUSALS))
def test_targets_without_its_operators_refuse_it_at_prepare_qat_by_name(target):
    with pytest.raises(UnsupportedOpError, match=REFUSALS[target]):
        qp.prepare_qat(SequenceEncoder(), (torch.rand(2, TOKENS, FEATURES),), target=target)


def test_the_exact_target_runs_it_fake_equals_integer():
    torch.manual_seed(0)
    x = torch.rand(2, TOKENS, FEATURES)
    prepared = qp.prepare_qat(SequenceEncoder(), (x,), target="exact")
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    assert torch.equal(prepared.eval()(x), qp.convert(prepared)(x))
