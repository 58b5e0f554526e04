"""Single-operator models and random inputs shared by the property tests (fake == integer, exporters)."""
import torch
from torch import nn


def random_batches(seed, shape, count=3, spread=None):
    g = torch.Generator().manual_seed(seed)
    scale = spread if spread is not None else float(torch.empty(1).uniform_(0.05, 20, generator=g))
    offset = float(torch.empty(1).uniform_(-1, 1, generator=g)) * scale
    return [torch.randn(shape, generator=g) * scale + offset for _ in range(count)]


class Conv(nn.Module):
    def __init__(self, cin, cout, k, stride, padding, dilation, groups, bias, bn, act):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = act

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) if self.act is not None else y


class Dense(nn.Module):
    def __init__(self, features, outputs, bias, act):
        super().__init__()
        self.fc = nn.Linear(features, outputs, bias=bias)
        self.act = act

    def forward(self, x):
        y = self.fc(x)
        return self.act(y) if self.act is not None else y


class Pool(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.pool = pool

    def forward(self, x):
        return self.pool(self.conv(x))


class MeanHW(nn.Module):
    def __init__(self, keepdim):
        super().__init__()
        self.keepdim = keepdim

    def forward(self, x):
        return x.mean((2, 3), keepdim=self.keepdim)
