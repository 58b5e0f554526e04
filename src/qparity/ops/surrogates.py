"""Straight-through estimation: forward values from the integer program, gradients of float surrogates."""
from __future__ import annotations

from typing import Optional, Tuple

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


Bounds = Tuple[Optional[float], Optional[float]]


def inside_bounds(x: torch.Tensor, lo: Optional[float], hi: Optional[float]) -> Optional[torch.Tensor]:
    """lo <= x <= hi (bool; bounds included, a missing bound always holds); None where both are missing."""
    if lo is None and hi is None:
        return None
    if lo is None:
        return x <= hi
    if hi is not None and lo <= hi and _fresh_strides(x):
        return clamp_keeps(x, lo, hi)
    inside = x >= lo
    return inside if hi is None else inside.logical_and_(x <= hi)


def _fresh_strides(x: torch.Tensor) -> bool:
    """Whether x has the strides a new contiguous or (4-D) channels-last tensor of its shape has. Then a comparison
    of x and clamp_keeps' result have them too; for other strides PyTorch's comparisons and clamp may differ in
    the strides they give dimensions of size 1 (a mask's strides decide the backward's layout)."""
    sizes = [max(size, 1) for size in x.shape]
    orders = [range(x.dim() - 1, -1, -1)] + ([(1, 3, 2, 0)] if x.dim() == 4 else [])
    for order in orders:
        strides, step = [0] * x.dim(), 1
        for dim in order:
            strides[dim], step = step, step * sizes[dim]
        if tuple(strides) == x.stride():
            return True
    return False


def clamp_keeps(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """lo <= x <= hi for lo <= hi, as clamp(x, lo, hi) == x (bool, laid out as a comparison of x where x has
    _fresh_strides).

    The same answer for every value: clamp returns x itself inside the bounds (so equal), a bound other than x
    outside them, and NaN for NaN (unequal, as both comparisons are false). Computed in x's float dtype (1.0 /
    0.0, then bool): PyTorch's comparisons vectorize only into their input's dtype, and run element by element
    into bool (measured on this project's x86 VM, 2^19 float32 elements, 1 thread: the two comparisons and their
    `and` 0.72-0.98 ms, this 0.39 ms; 2^17 elements: 0.19 and 0.04 ms).
    """
    kept = torch.clamp(x, lo, hi)  # a new tensor laid out as a comparison's result would be
    return torch.eq(kept, x, out=kept).to(torch.bool)


def clamped(real: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """The values of clamp(real, *bounds), without a gradient: what an observer watches and codes come from."""
    real = real.detach()
    return real if bounds[0] is None and bounds[1] is None else torch.clamp(real, *bounds)


class _QuantizedOutput(torch.autograd.Function):
    """Forward: the integer program's codes. Backward: the gradient of clamp(c / scale + zero_point, lo, hi) with
    c = clamp(real, *bounds) (torch.ao's fake quantization after a fused activation clamp): 1 / scale where both
    clamps pass `real`, bounds included, else 0.

    The masks are computed in the forward pass and saved as bool tensors (1 byte per element), instead of the
    float tensors a chain of autograd nodes would keep (4 bytes each, two of them for a fused clamp); the
    backward is then one multiply and one divide (and a second multiply for a fused clamp, in the unfused
    chain's order, so every gradient value, NaNs and signed zeros included, is the chain's).
    """

    @staticmethod
    def forward(ctx, codes, real, clamped_real, scale: float, zero_point: float, lo: int, hi: int, bounds: Bounds,
                position: Optional[torch.Tensor]):
        if position is None:
            position = torch.div(clamped_real, scale).add_(zero_point)  # real / scale + zero_point, one temporary
        ctx.save_for_backward(inside_bounds(position, lo, hi), inside_bounds(real.detach(), *bounds))
        ctx.scale = scale
        return codes.to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        inside_grid, inside_clamp = ctx.saved_tensors
        grid_factors = mask_factors(inside_grid, grad.dtype)
        if grid_factors.shape == grad.shape and grid_factors.stride() == grad.stride() and _fresh_strides(grad):
            # factor * grad is grad * factor (IEEE multiplication commutes), in the buffer torch.mul would
            # allocate, with the strides it would give its result (both operands have these fresh strides).
            grad_real = grid_factors.mul_(grad)
        else:
            grad_real = torch.mul(grad, grid_factors)
        grad_real.div_(ctx.scale)
        if inside_clamp is not None:
            grad_real.mul_(mask_factors(inside_clamp, grad_real.dtype))
        return None, grad_real, None, None, None, None, None, None, None


def mask_factors(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the 1.0 / 0.0 factors a multiply by it promotes it to, with the mask's strides.

    Read through a uint8 view (the same bytes: 1 for True, 0 for False): PyTorch converts uint8 to float in a
    vectorized loop, while its casts from bool and its mixed-dtype multiplies run element by element (measured
    on this project's x86 VM, 2^19 elements, 1 thread: bool -> float32 0.69 ms, uint8 -> float32 0.10 ms,
    float32 x bool 1.4 ms, float32 x float32 0.23 ms).
    """
    return mask.view(torch.uint8).to(dtype)


def quantized_output(codes: torch.Tensor, real: torch.Tensor, scale: float, zero_point: float, lo: int, hi: int,
                     bounds: Bounds = (None, None), clamped_real: Optional[torch.Tensor] = None,
                     position: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output codes (float32) whose gradient flows to `real` as through clamp(clamp(real, *bounds) / scale +
    zero_point, lo, hi), both clamps passing the gradient at their bounds. clamped_real: clamped(real, bounds),
    where the caller has it already; position: its `torch.div(clamped_real, scale).add_(zero_point)` (float32
    division by the float32 scale, then the zero point), where the caller has it already."""
    if not real.requires_grad:
        return codes.to(torch.float32)
    if clamped_real is None:
        clamped_real = clamped(real, bounds)
    return _QuantizedOutput.apply(codes, real, clamped_real, scale, zero_point, lo, hi, bounds, position)


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
        if not _ordered(lo, hi):  # NaN or inverted bounds: where x equals a bound, clamp would keep it
            inside = torch.ones_like(x, dtype=torch.bool)
            if lo is not None:
                inside &= x >= lo
            if hi is not None:
                inside &= x <= hi
            return grad * inside, None, None
        # The bool mask's 1.0 / 0.0 factors, laid out as that mask (ones_like(x)) so the product is too: clamp_keeps'
        # equality, computed into one buffer (PyTorch's bool comparisons and float x bool multiplies are
        # unvectorized; see mask_factors).
        # x detached: under create_graph the backward runs with gradients on, and out= takes no tensor needing one.
        x = x.detach()
        factors = torch.clamp(x, lo, hi, out=torch.empty_like(x))
        return grad * torch.eq(factors, x, out=factors), None, None


def _ordered(lo: Optional[float], hi: Optional[float]) -> bool:
    """No NaN bound, and lo <= hi where both are given."""
    if lo is not None and hi is not None:
        return lo <= hi
    bound = hi if lo is None else lo
    return bound is None or bound == bound


def clamp(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    """torch.clamp(x, lo, hi) with the gradient of torch.ao's fake quantization: 1 on [lo, hi], bounds included.
    No bounds: x itself."""
    if lo is None and hi is None:
        return x
    if not x.requires_grad:
        return torch.clamp(x, lo, hi)
    return _InclusiveClamp.apply(x, lo, hi)
