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


class _QuantizedOutput(torch.autograd.Function):
    """Forward: the integer program's codes. Backward: d codes / d real = 1 / scale inside the clamp, else 0.

    The gradient is that of clamp(real / scale + zero_point, lo, hi), as in torch.ao's fake quantization;
    computing the mask in backward keeps the forward pass to one conversion.
    """

    @staticmethod
    def forward(ctx, codes, real, scale: float, zero_point: float, lo: int, hi: int):
        ctx.save_for_backward(real)
        ctx.constants = (scale, zero_point, lo, hi)
        return codes.to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        (real,) = ctx.saved_tensors
        scale, zero_point, lo, hi = ctx.constants
        position = real / scale + zero_point
        inside = (position >= lo) & (position <= hi)
        return None, grad * inside / scale, None, None, None, None


def quantized_output(codes: torch.Tensor, real: torch.Tensor, scale: float, zero_point: float,
                     lo: int, hi: int) -> torch.Tensor:
    """Output codes (float32) whose gradient flows to `real` as through clamp(real / scale + zero_point)."""
    if not real.requires_grad:
        return codes.to(torch.float32)
    return _QuantizedOutput.apply(codes, real, scale, zero_point, lo, hi)
