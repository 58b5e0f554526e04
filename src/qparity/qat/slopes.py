"""Quantization-aware PReLU slopes: the user's learned slope on its int8 grid (numerics/prelu.py), with a
straight-through gradient, as weights are."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from ..numerics.prelu import SLOPE_QMAX, slope_codes, slope_grid
from ..ops.surrogates import clamp, straight_through


class QATSlope(nn.Module):
    """Owns one nn.PReLU (its `weight` stays the user's parameter) and gives its slope codes and scale."""

    def __init__(self, module: nn.PReLU, where: str):
        super().__init__()
        self.module = module
        self.where = where
        slope_grid(module.weight, where)  # a slope no int8 grid holds is refused at prepare_qat, naming the module

    def codes(self) -> Tuple[torch.Tensor, float]:
        """Integer-valued float32 slope codes whose gradient flows to the slope, and the grid's scale."""
        slopes = self.module.weight
        k, scale = slope_grid(slopes, self.where)
        codes = slope_codes(slopes, k).to(torch.float32)
        return straight_through(codes, clamp(slopes * k, -SLOPE_QMAX, SLOPE_QMAX)), scale
