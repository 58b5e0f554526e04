"""Straight-through estimation: a forward value from the integer program, the gradient of a float surrogate."""
from __future__ import annotations

import torch


def straight_through(value: torch.Tensor, surrogate: torch.Tensor) -> torch.Tensor:
    """Equals `value` in the forward pass; differentiates like `surrogate`.

    `surrogate + (value - surrogate)` is not always bit-equal to `value` in float, so the forward result is
    `value` itself with the surrogate's graph attached through a zero-valued term that cannot perturb it:
    adding `surrogate - surrogate.detach()` (exactly 0.0 for finite values) to an integer-valued float.
    """
    value = value.to(surrogate.dtype) if surrogate.is_floating_point() else value.to(torch.float32)
    if not surrogate.requires_grad:
        return value
    return value + (surrogate - surrogate.detach())
