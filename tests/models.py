"""Whole models used by the tests and benchmarks: a ResNet-style CNN and an MLP with concatenation."""
import torch
import torch.nn.functional as F
from torch import nn

from qparity.bench import BasicBlock, ResNetish  # noqa: F401  (the benchmark's model, shared)


class CatMLP(nn.Module):
    def __init__(self, features=20, hidden=32, classes=5):
        super().__init__()
        self.a = nn.Linear(features, hidden)
        self.b = nn.Linear(features, hidden // 2)
        self.head = nn.Sequential(nn.Linear(hidden + hidden // 2 + features, hidden), nn.ReLU6(), nn.Dropout(0.1),
                                  nn.Linear(hidden, classes))

    def forward(self, x):
        h = torch.cat([F.relu(self.a(x)), torch.clamp(self.b(x), -1.0, 1.0), x], dim=1)
        return self.head(h)
