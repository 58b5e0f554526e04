"""Whole models used by the tests and benchmarks: a ResNet-style CNN and an MLP with concatenation."""
import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetish(nn.Module):
    def __init__(self, channels=(16, 32), classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, cin = [], channels[0]
        for i, c in enumerate(channels):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


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
