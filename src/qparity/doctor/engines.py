"""PyTorch's quantized engines' conv/linear requantization, as measured on torch 2.13 (shared/semantics.md,
"PyTorch eager/FX quantized engines"), so the doctor can say which step of the integer path moved a code.

All arithmetic is float32 where the engine's is; `acc` is the exact int32 accumulator.
- fbgemm: `rne((acc + f32(b / P)) * M) + zy` (fbgemm/include/fbgemm/OutputProcessing-inl.h: the float bias
  is divided by the per-channel act_times_w_scale and added to the float accumulator before the multiplier);
- onednn (and x86 for conv with symmetric weights): `rne(((acc * P) + b) * inv_y + zy)`;
- x86 otherwise (weight zero point != 0, and every Linear): as fbgemm;
- qnnpack: `rne((acc + rne(b / P)) * M) + zy` (the bias is quantized to int32 at scale sx * sw first,
  aten/src/ATen/native/quantized/cpu/qconv.cpp, qnnpack path).
"""
from __future__ import annotations

from typing import Optional

import torch

ENGINES = ("fbgemm", "x86", "onednn", "qnnpack")


def channel_view(values: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along `axis` of an `ndim`-dimensional tensor."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def rule(engine: str, is_linear: bool, weight_symmetric: bool) -> str:
    """The requantization rule a layer runs under: 'fbgemm', 'onednn' or 'qnnpack' (x86 routes per layer)."""
    if engine == "x86":
        return "onednn" if (weight_symmetric and not is_linear) else "fbgemm"
    return engine if engine in ("fbgemm", "onednn", "qnnpack") else "fbgemm"


def bias_in_accumulator_units(bias: Optional[torch.Tensor], sx: float, sw: torch.Tensor, name: str) -> torch.Tensor:
    """The bias in units of the accumulator as the engine adds it: rounded to an integer by qnnpack, f32(b / P)
    by fbgemm; onednn adds the float bias after scaling, so here it is exact (its rounding happens in
    `requantize`)."""
    if bias is None:
        return torch.zeros_like(sw, dtype=torch.float64)
    p = act_times_weight_scale(sx, sw)
    if name == "qnnpack":
        return torch.round(bias.to(torch.float32) / p).to(torch.float64)
    if name == "fbgemm":
        return (bias.to(torch.float32) / p).to(torch.float64)
    return bias.to(torch.float64) / (sx * sw.to(torch.float64))


def act_times_weight_scale(sx: float, sw: torch.Tensor) -> torch.Tensor:
    """P = f32(sx * sw), per output channel."""
    return torch.tensor(sx, dtype=torch.float32) * sw.to(torch.float32)


def requantize(acc: torch.Tensor, bias: Optional[torch.Tensor], sx: float, sw: torch.Tensor, sy: float, zy: int,
               qmin: int, qmax: int, name: str, axis: int) -> torch.Tensor:
    """Output codes of the engine rule `name` for the exact accumulator `acc` (float64 holding integers)."""
    p = act_times_weight_scale(sx, sw)
    p_view = channel_view(p, acc.dim(), axis)
    acc32 = acc.to(torch.float32)
    if name == "onednn":
        b = channel_view(bias.to(torch.float32), acc.dim(), axis) if bias is not None else 0.0
        inv_y = (torch.tensor(1.0, dtype=torch.float32) / torch.tensor(sy, dtype=torch.float32))
        codes = torch.round(((acc32 * p_view) + b) * inv_y + zy)
    else:
        m = channel_view(p / torch.tensor(sy, dtype=torch.float32), acc.dim(), axis)
        b = channel_view(bias_in_accumulator_units(bias, sx, sw, name).to(torch.float32), acc.dim(), axis)
        codes = torch.round((acc32 + b) * m) + zy
    return codes.clamp(qmin, qmax).to(torch.int64)
