"""Conv1d as the integer program runs it: a conv2d with a height-1 kernel between an unsqueeze and a squeeze.

Every runtime qparity targets computes a 1-D convolution exactly as the 2-D one on a [N, C, 1, L] tensor
(TFLite's converter and ONNX Runtime do the same), so a Conv1d (and a BatchNorm1d folded into it) reuses
the conv2d operator and all its per-target arithmetic. The user's Conv1d keeps its own parameters; the
conv2d sees them as views, so training updates them and freeze folds into them.
"""
from __future__ import annotations

import torch
from torch import nn


class Conv1dAs2d(nn.Module):
    """A Conv1d's parameters as a conv2d's: weight [O, I/g, 1, K] (a view of the Conv1d's [O, I/g, K])."""

    def __init__(self, weight: nn.Parameter, bias):
        super().__init__()
        self.register_parameter("weight_1d", weight)
        self.register_parameter("bias_1d", bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_1d.unsqueeze(2)

    @property
    def bias(self):
        return self.bias_1d

    def set_bias(self, bias: nn.Parameter) -> None:
        """A bias for a bias-free Conv1d when BatchNorm1d is folded into it (QATLayer.freeze)."""
        self.register_parameter("bias_1d", bias)


def as_conv2d_arguments(stride, padding, dilation):
    """Conv1d's stride, padding and dilation as conv2d's (height 1, no padding along it)."""
    def first(value):
        return value[0] if isinstance(value, (tuple, list)) else value

    padding = padding if isinstance(padding, str) else (0, first(padding))
    return (1, first(stride)), padding, (1, first(dilation))
