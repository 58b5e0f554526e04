"""Exact integer accumulation for convolution and fully connected layers.

The accumulator `acc = sum((q_x - z_x) * q_w)` is computed with the float kernels PyTorch already has,
where that is provably exact: every product and partial sum of integers is exact in float32 while the
sum of absolute values stays below 2^24, whatever order the kernel adds in. The bound is taken per
output channel from the real weight codes: `max|q_x - z_x| * sum|q_w|`. A layer above it is split into
input-channel chunks that each satisfy it, and the chunk results are added in float64 (exact below
2^53). Grouped layers above the bound, and any device other than the CPU (where TF32 or transform-based
convolution algorithms could be chosen), use float64 with cuDNN off, exact below 2^53.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

import torch
import torch.nn.functional as F

FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53

Padding = Union[str, Tuple[int, int]]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv or linear layer except its numbers."""

    kind: str  # "conv2d" or "linear"
    stride: Tuple[int, int] = (1, 1)
    padding: Padding = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1

    def to_dict(self) -> dict:
        return {"kind": self.kind, "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}

    @classmethod
    def from_dict(cls, data: dict) -> "ConvGeometry":
        padding = data["padding"] if isinstance(data["padding"], str) else tuple(data["padding"])
        return cls(data["kind"], tuple(data["stride"]), padding, tuple(data["dilation"]), data["groups"])

    @property
    def channel_axis(self) -> int:
        return 1 if self.kind == "conv2d" else -1


def abs_sum_per_output(weight_codes: torch.Tensor) -> torch.Tensor:
    """sum |q_w| over everything but the output channel (float64, exact for integer codes)."""
    return weight_codes.detach().abs().to(torch.float64).reshape(weight_codes.shape[0], -1).sum(dim=1)


def accumulator_bound(weight_codes: torch.Tensor, max_abs_input: int) -> float:
    """The largest |acc| (without bias) any input on the grid can produce, over all output channels."""
    return float(abs_sum_per_output(weight_codes).max()) * max_abs_input if weight_codes.numel() else 0.0


def accumulate(geometry: ConvGeometry, x_centered: torch.Tensor, weight_codes: torch.Tensor,
               max_abs_input: int) -> torch.Tensor:
    """Exact acc as a float tensor of integers (float32 or float64), differentiable in both operands."""
    bound = accumulator_bound(weight_codes, max_abs_input)
    if x_centered.device.type == "cpu" and bound < FLOAT32_EXACT:
        return _apply(geometry, x_centered.to(torch.float32), weight_codes.to(torch.float32))
    if x_centered.device.type == "cpu" and geometry.groups == 1:
        return _accumulate_in_chunks(geometry, x_centered, weight_codes, max_abs_input)
    with torch.backends.cudnn.flags(enabled=False):
        return _apply(geometry, x_centered.to(torch.float64), weight_codes.to(torch.float64))


def _apply(geometry: ConvGeometry, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    if geometry.kind == "linear":
        return F.linear(x, w)
    return F.conv2d(x, w, None, geometry.stride, geometry.padding, geometry.dilation, geometry.groups)


def _input_channel_bounds(weight_codes: torch.Tensor, max_abs_input: int) -> torch.Tensor:
    """[out, in]: the bound each input channel contributes to each output channel's accumulator."""
    per_input = weight_codes.detach().abs().to(torch.float64)
    return per_input.reshape(per_input.shape[0], per_input.shape[1], -1).sum(dim=2) * max_abs_input


def _chunks(bounds: torch.Tensor):
    """Consecutive input-channel ranges whose per-output-channel bound stays below 2^24."""
    start, limit = 0, bounds.shape[1]
    while start < limit:
        running = torch.cumsum(bounds[:, start:], dim=1).max(dim=0).values
        size = max(1, int((running < FLOAT32_EXACT).sum()))
        yield start, start + size
        start += size


def _accumulate_in_chunks(geometry, x_centered, weight_codes, max_abs_input):
    bounds = _input_channel_bounds(weight_codes, max_abs_input)
    if float(bounds.max()) >= FLOAT32_EXACT:
        return _apply(geometry, x_centered.to(torch.float64), weight_codes.to(torch.float64))
    axis = 1 if geometry.kind == "conv2d" else x_centered.dim() - 1
    total = None
    for start, stop in _chunks(bounds):
        part = _apply(geometry, x_centered.narrow(axis, start, stop - start).to(torch.float32),
                      weight_codes[:, start:stop].to(torch.float32)).to(torch.float64)
        total = part if total is None else total + part
    return total
