"""A ViT-tiny-style classifier learns sklearn's digits through the integer program: 2x2 patches by a conv, a learned
position embedding, two pre-norm encoder blocks (LayerNorm, token mixing, LayerNorm, GELU MLP, residual adds),
LayerNorm, token mean pooling, a linear head. Tokens mix by multi-head self-attention (F.scaled_dot_product_attention
on a packed QKV projection: matmul, softmax, matmul) or, as a second model, by MLP-Mixer's linear over the
tokens. Fake == integer bit for bit, and the .tflite file gives the same codes in LiteRT's reference kernels (the
attention ViT's .tosa file too, in TOSA's reference model)."""
import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qparity as qp
from helpers import assert_runtime_gives_the_same_codes

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
DIM, TOKENS, HEADS = 16, 16, 2


class Block(nn.Module):
    def __init__(self, attention: bool):
        super().__init__()
        self.attention = attention
        self.norm1 = nn.LayerNorm(DIM)
        if attention:
            self.qkv, self.out = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        else:
            self.mix = nn.Linear(TOKENS, TOKENS)
        self.norm2, self.fc1, self.act, self.fc2 = nn.LayerNorm(DIM), nn.Linear(DIM, 2 * DIM), nn.GELU(), \
            nn.Linear(2 * DIM, DIM)

    def forward(self, x):
        if self.attention:
            n, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(n, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
            x = x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
        else:
            x = x + self.mix(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, attention: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(1, DIM, 2, stride=2)
        self.position = nn.Parameter(torch.randn(TOKENS, DIM) * 0.1)
        self.blocks = nn.Sequential(Block(attention), Block(attention))
        self.norm, self.head = nn.LayerNorm(DIM), nn.Linear(DIM, 10)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.norm(self.blocks(tokens)).mean(1))


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


def train(model, x, y, epochs, lr):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for start in range(0, len(y), 100):
            loss = nn.functional.cross_entropy(model(x[start:start + 100]), y[start:start + 100])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def accuracy(logits, y) -> float:
    return float((logits.argmax(1) == y).float().mean())


@functools.lru_cache(maxsize=None)
def float_trained(attention: bool) -> TinyViT:
    torch.manual_seed(0)
    x, y, _, _ = digits()
    model = TinyViT(attention)
    train(model, x, y, epochs=12 if attention else 5, lr=8e-3)  # attention learns digits more slowly
    return model


@pytest.mark.parametrize("attention, target", [(True, "tflite"), (True, "tosa"), (False, "tflite")],
                         ids=["attention-tflite", "attention-tosa", "mlp_mixing-tflite"])
def test_tiny_vit_learns_digits_and_its_integer_program_is_the_fake_one(tmp_path, attention, target):
    x, y, x_test, y_test = digits()
    model = copy.deepcopy(float_trained(attention))
    torch.manual_seed(0)
    float_accuracy = accuracy(model.eval()(x_test).detach(), y_test)
    prepared = qp.prepare_qat(model, (x[:8],), target=target)
    train(prepared, x[:400], y[:400], epochs=1, lr=5e-4)
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    fake, integer_logits = prepared.eval()(x_test), integer(x_test)
    assert torch.equal(fake, integer_logits)
    fake_accuracy, integer_accuracy = accuracy(fake, y_test), accuracy(integer_logits, y_test)
    print(f"TinyViT ({'attention' if attention else 'MLP mixing'}, {target}) digits: float {float_accuracy:.3f}, fake {fake_accuracy:.3f}, integer {integer_accuracy:.3f}")
    assert float_accuracy > 0.85 and integer_accuracy > float_accuracy - 0.05
    assert_runtime_gives_the_same_codes(integer, x_test[:32], tmp_path)
