"""Which PyTorch engine rule a torch.ao layer runs under, and that rule's steps, for the doctor's replay.

The arithmetic is the spec's (`qparity.numerics.pytorch_engines`): this module only routes a layer to the
rule (x86 sends convs with symmetric weights to oneDNN and everything else to fbgemm) and splits out the
bias step so the doctor can say which step moved a code.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..qparams import QParams
from ..numerics import get_target
from ..numerics.pytorch_engines import bias_in_accumulator_units as engine_bias_units

ENGINES = ("fbgemm", "x86", "onednn", "qnnpack")
# The spec target whose conv requantizer is each rule (x86 routes symmetric-weight convs to oneDNN).
RULE_TARGETS = {"fbgemm": "fbgemm", "onednn": "x86", "qnnpack": "qnnpack"}


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
    """The bias in units of the accumulator as the engine adds it (the spec's rule for fbgemm and qnnpack);
    onednn adds the float bias after scaling, so here it is exact (its rounding happens in `requantize`)."""
    if bias is None:
        return torch.zeros_like(sw, dtype=torch.float64)
    if name == "onednn":
        return bias.to(torch.float64) / (sx * sw.to(torch.float64))
    return engine_bias_units(name, bias.to(torch.float32), act_times_weight_scale(sx, sw)).to(torch.float64)


def act_times_weight_scale(sx: float, sw: torch.Tensor) -> torch.Tensor:
    """P = f32(sx * sw), per output channel."""
    return torch.tensor(sx, dtype=torch.float32) * sw.to(torch.float32)


def requantize(acc: torch.Tensor, bias: Optional[torch.Tensor], sx: float, sw: torch.Tensor, sy: float, zy: int,
               qmin: int, qmax: int, name: str, axis: int) -> torch.Tensor:
    """Output codes of the engine rule `name` for the exact accumulator `acc`: the spec's own requantizer
    (target fbgemm, x86 for the oneDNN route, qnnpack), so the doctor and the emulation cannot disagree."""
    target = get_target(RULE_TARGETS[name])
    grid = QParams(sy, zy, "uint8" if qmin >= 0 else "int8")
    requantizer = target.requantizer("conv2d", QParams(sx, 0, grid.dtype), sw.to(torch.float32), grid, qmin, qmax,
                                     axis, acc.dim(), bias=bias)
    return requantizer(acc)
