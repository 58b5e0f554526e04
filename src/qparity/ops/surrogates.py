"""Straight-through estimation: forward values from the integer program, gradients of float surrogates."""
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


class _InclusiveClamp(torch.autograd.Function):
    """clamp whose gradient is 1 on [lo, hi] including both bounds, 0 outside.

    torch.ao's fake quantization passes the gradient at the clamp bounds, and PyTorch <= 2.13's clamp did
    too; PyTorch 2.14 changed clamp's gradient at the bounds (0 with number bounds, 1/2 with tensor bounds).
    Spelling the mask out keeps qparity's gradients the same under every PyTorch release.
    """

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)
        return torch.clamp(x, lo, hi)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = torch.ones_like(x, dtype=torch.bool)
        if lo is not None:
            inside &= x >= lo
        if hi is not None:
            inside &= x <= hi
        return grad * inside, None, None


def clamp(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """torch.clamp(x, lo, hi) with the gradient of torch.ao's fake quantization: 1 on [lo, hi], bounds included.
    No bounds: x itself."""
    if lo is None and hi is None:
        return x
    if not x.requires_grad:
        return torch.clamp(x, lo, hi)
    return _InclusiveClamp.apply(x, lo, hi)
