"""ConvTranspose2d as the integer program runs it: the convolution of the zero-inserted input with the flipped,
transposed kernel (numerics/accumulate.py, `zero_inserted`).

The user's ConvTranspose2d keeps its parameters ([in, out / groups, kh, kw]); the layer sees them in conv
layout [out, in / groups, kh, kw] with the kernel flipped, so per-output-channel weight scales, the BatchNorm
fold, the accumulator bound and every target's conv requantizer apply unchanged. Training updates the user's
weight through this view; freeze writes the folded weight back in the user's layout.
"""
from __future__ import annotations

import torch
from torch import nn


def as_conv_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """[in, out / g, kh, kw] transposed-conv weight -> the [out, in / g, kh, kw] conv weight, kernel flipped."""
    cin, out_per_group, kh, kw = weight.shape
    grouped = weight.reshape(groups, cin // groups, out_per_group, kh, kw).transpose(1, 2)
    return grouped.reshape(groups * out_per_group, cin // groups, kh, kw).flip(-2, -1)


def as_transposed_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `as_conv_weight`: the layout PyTorch's ConvTranspose2d and TFLite's TRANSPOSE_CONV read."""
    cout, in_per_group, kh, kw = weight.shape
    grouped = weight.flip(-2, -1).reshape(groups, cout // groups, in_per_group, kh, kw).transpose(1, 2)
    return grouped.reshape(groups * in_per_group, cout // groups, kh, kw)


class ConvTransposeAsConv(nn.Module):
    """A ConvTranspose2d's parameters as a conv's: `weight` is the flipped, transposed view of its weight."""

    def __init__(self, weight: nn.Parameter, bias, groups: int):
        super().__init__()
        self.register_parameter("weight_transposed", weight)
        self.register_parameter("bias", bias)
        self.groups = groups

    @property
    def weight(self) -> torch.Tensor:
        return as_conv_weight(self.weight_transposed, self.groups)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Store a conv-layout weight (the BatchNorm fold at freeze) into the user's transposed parameter."""
        self.weight_transposed.copy_(as_transposed_weight(weight, self.groups))
