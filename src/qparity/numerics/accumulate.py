"""Exact integer accumulation for convolution and fully connected layers.

The accumulator `acc = sum((q_x - z_x) * q_w) + bias` is computed with the float kernels PyTorch already
has, where that is provably exact: every product and partial sum of integers is exact in float32 while
the sum of absolute values stays below 2^24, whatever order the kernel adds in. The bound is taken per
output channel from the real weight codes: `max|q_x - z_x| * sum|q_w| + |bias|`.

`plan_accumulation` picks the cheapest exact path once per set of weights:
- "float32": one float32 conv/matmul (channels-last on the CPU, where oneDNN is fastest);
- "chunks": input channels split into ranges that each meet the float32 bound, summed in float64
  (exact below 2^53);
- "float64": float64 throughout with cuDNN off, for grouped layers above the float32 bound and for every
  device other than the CPU (where TF32 or transform-based convolution algorithms could be chosen).
The result is a float tensor of exact integers: float32 for the "float32" path, float64 otherwise. The
IntegerModel computes the "float32" path's integers on oneDNN's int8 kernels where that is exact too
(int8_accumulate.py); the fake-quant forward, which needs the gradient, keeps this module.

A transposed convolution ("conv_transpose2d") is the convolution of the zero-inserted input with the flipped,
transposed kernel (`zero_inserted`); its weight codes are kept in that conv layout [out, in / groups, kh, kw],
so every output's taps are a subset of one output channel's weights and the same bound holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

FLOAT32_EXACT = 2**24
FLOAT64_EXACT = 2**53

Padding = Union[str, Tuple[int, int]]


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a conv or linear layer except its numbers."""

    kind: str  # "conv2d", "conv_transpose2d" or "linear"
    stride: Tuple[int, int] = (1, 1)
    padding: Padding = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    output_padding: Tuple[int, int] = (0, 0)  # conv_transpose2d only

    def to_dict(self) -> dict:
        data = {"kind": self.kind, "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups}
        if self.kind == "conv_transpose2d":
            data["output_padding"] = list(self.output_padding)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ConvGeometry":
        padding = data["padding"] if isinstance(data["padding"], str) else tuple(data["padding"])
        return cls(data["kind"], tuple(data["stride"]), padding, tuple(data["dilation"]), data["groups"],
                   tuple(data.get("output_padding", (0, 0))))

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    @property
    def channel_axis(self) -> int:
        return 1 if self.is_conv else -1


@dataclass(frozen=True)
class AccumulationPlan:
    path: str                              # "float32", "chunks", "float64" or "int16_pairs"
    bound: float                           # the largest |acc + bias| any input on the grid can produce
    chunks: Tuple[Tuple[int, int], ...] = ()
    input_zero_point: int = 0              # for "int16_pairs", which works on raw codes


def abs_sum_per_output(weight_codes: torch.Tensor) -> torch.Tensor:
    """sum |q_w| over everything but the output channel (float64, exact for integer codes)."""
    return weight_codes.detach().abs().to(torch.float64).reshape(weight_codes.shape[0], -1).sum(dim=1)


def accumulator_bounds(weight_codes: torch.Tensor, max_abs_input: int,
                       bias_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per output channel, the largest |acc + bias| any input on the grid can produce (float64)."""
    bound = abs_sum_per_output(weight_codes) * max_abs_input
    if bias_codes is not None:
        bound = bound + bias_codes.detach().to(torch.float64).abs().reshape(-1).to(bound.device)
    return bound


def plan_accumulation(geometry: ConvGeometry, weight_codes: torch.Tensor, max_abs_input: int,
                      bias_codes: Optional[torch.Tensor] = None) -> AccumulationPlan:
    bounds = accumulator_bounds(weight_codes, max_abs_input, bias_codes)
    bound = float(bounds.max()) if bounds.numel() else 0.0
    if weight_codes.device.type != "cpu":
        return AccumulationPlan("float64", bound)
    if bound < FLOAT32_EXACT:
        return AccumulationPlan("float32", bound)
    per_input = _input_channel_bounds(weight_codes, max_abs_input)
    if geometry.groups != 1 or float(per_input.max()) >= FLOAT32_EXACT:
        return AccumulationPlan("float64", bound)
    return AccumulationPlan("chunks", bound, tuple(_chunks(per_input)))


def accumulate(plan: AccumulationPlan, geometry: ConvGeometry, x_centered: torch.Tensor,
               weight_codes: torch.Tensor, bias_codes: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Exact acc + bias as a float tensor of integers, differentiable in the codes."""
    if plan.path == "int16_pairs":
        acc = depthwise_int16_pairs(geometry, x_centered, weight_codes, plan.input_zero_point)
        return acc if bias_codes is None else acc + bias_codes.to(acc.dtype).reshape(1, -1, 1, 1)
    if plan.path == "float32":
        # The bias is inside the float32 bound too, so the kernel may add it exactly.
        bias = None if bias_codes is None else bias_codes.to(torch.float32)
        return _apply(geometry, x_centered.to(torch.float32), weight_codes.to(torch.float32), bias)
    if plan.path == "chunks":
        axis = 1 if geometry.is_conv else x_centered.dim() - 1
        acc = None
        for start, stop in plan.chunks:
            part = _apply(geometry, x_centered.narrow(axis, start, stop - start).to(torch.float32),
                          weight_codes[:, start:stop].to(torch.float32)).to(torch.float64)
            acc = part if acc is None else acc + part
    else:
        with torch.backends.cudnn.flags(enabled=False):
            acc = _apply(geometry, x_centered.to(torch.float64), weight_codes.to(torch.float64))
    if bias_codes is not None:
        shape = [1] * acc.dim()
        shape[geometry.channel_axis] = -1
        acc = acc + bias_codes.to(acc.dtype).reshape(shape)
    return acc


def _apply(geometry: ConvGeometry, x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor] = None):
    if geometry.kind == "linear":
        return F.linear(x, w, bias)
    stride, padding = geometry.stride, geometry.padding
    if geometry.kind == "conv_transpose2d":
        x, stride, padding = zero_inserted(geometry, x, tuple(w.shape[2:])), (1, 1), (0, 0)
    if x.device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
        w = w.contiguous(memory_format=torch.channels_last)
    return F.conv2d(x, w, bias, stride, padding, geometry.dilation, geometry.groups)


def zero_inserted(geometry: ConvGeometry, x: torch.Tensor, kernel: Tuple[int, int]) -> torch.Tensor:
    """The input of the stride-1 conv that equals conv_transpose2d: stride - 1 zeros between neighbours, then
    dilation * (k - 1) - padding zeros on each side (negative: cropped) and output_padding more at the end.

    With the flipped kernel, output i sums x[j] w[k] over i = j * stride - padding + k * dilation, which is
    PyTorch's definition of ConvTranspose2d (and TFLite's TRANSPOSE_CONV scatter loop)."""
    (sh, sw), (ph, pw), (dh, dw) = geometry.stride, geometry.padding, geometry.dilation
    n, c, h, w = x.shape
    spread = x.new_zeros((n, c, (h - 1) * sh + 1, (w - 1) * sw + 1))
    spread[:, :, ::sh, ::sw] = x
    edge_h, edge_w = dh * (kernel[0] - 1) - ph, dw * (kernel[1] - 1) - pw
    extra_h, extra_w = geometry.output_padding
    return F.pad(spread, (edge_w, edge_w + extra_w, edge_h, edge_h + extra_h))


def _input_channel_bounds(weight_codes: torch.Tensor, max_abs_input: int) -> torch.Tensor:
    """[out, in]: the bound each input channel contributes to each output channel's accumulator."""
    per_input = weight_codes.detach().abs().to(torch.float64)
    return per_input.reshape(per_input.shape[0], per_input.shape[1], -1).sum(dim=2) * max_abs_input


def _chunks(bounds: torch.Tensor) -> List[Tuple[int, int]]:
    """Consecutive input-channel ranges whose per-output-channel bound stays below 2^24."""
    ranges, start, limit = [], 0, bounds.shape[1]
    while start < limit:
        running = torch.cumsum(bounds[:, start:], dim=1).max(dim=0).values
        size = max(1, int((running < FLOAT32_EXACT).sum()))
        ranges.append((start, start + size))
        start += size
    return ranges


def depthwise_int16_pairs(geometry: ConvGeometry, x_centered: torch.Tensor, weight_codes: torch.Tensor,
                          zero_point: int) -> torch.Tensor:
    """fbgemm's depthwise accumulator: neighbouring taps of the raw codes summed in int16 with saturation.

    fbgemm's generated depthwise kernels (GenerateI8Depthwise.cc, genMaddEpi16xNPacked) interleave taps
    (kh, kw in row-major order) in pairs and add each pair of uint8 x int8 products with vpmaddubsw, which
    saturates to int16, even on VNNI CPUs; padded taps hold the zero point's code; the zero point is then
    removed as z * sum(w). The taps are exact float32 integers (|pair| < 2^16, at most 25 pairs).
    """
    out_channels, _, kh, kw = weight_codes.shape
    multiplier = out_channels // x_centered.shape[1]
    (sh, sw), (ph, pw) = geometry.stride, geometry.padding
    raw = F.pad(x_centered.to(torch.float32) + zero_point, (pw, pw, ph, ph), value=float(zero_point))
    raw = raw.repeat_interleave(multiplier, dim=1)
    oh = (raw.shape[2] - kh) // sh + 1
    ow = (raw.shape[3] - kw) // sw + 1
    weights = weight_codes.to(torch.float32).reshape(out_channels, kh * kw)
    taps = [raw[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            * weights[:, i * kw + j].reshape(1, -1, 1, 1) for i in range(kh) for j in range(kw)]
    acc = None
    for t in range(0, len(taps), 2):
        pair = torch.clamp(sum(taps[t:t + 2]), -32768, 32767)
        acc = pair if acc is None else acc + pair
    return acc - zero_point * weights.sum(dim=1).reshape(1, -1, 1, 1)
