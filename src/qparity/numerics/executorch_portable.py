"""ExecuTorch's portable CPU kernels (executorch 1.5.1) for the nodes a lowered .pte runs outside its XNNPACK
delegate, on the codes the delegate hands over.

XNNPACK's partitioner leaves some nodes of a Q/DQ program in ExecuTorch itself (mean.dim without keepdim: the
partitioner's MeanDimConfig takes only keepdim means over H and W; max pools whose stride exceeds the kernel:
MaxPool2dConfig). The file then runs, for such a node:

- DEQUANTIZE: XNNPACK's qs8 -> f32 convert as the last node of the delegate before it (src/qs8-f32-vcvt), or
  ExecuTorch's dequantize_per_tensor where no delegate took it (kernels/quantized/cpu/op_dequantize.cpp:
  `(q - zero_point) * static_cast<float>(scale)`). Both are f((q - z) * f(s)): one float32 product.
- the operator in float32, ExecuTorch's portable kernel (kernels/portable/cpu/).
- QUANTIZE: XNNPACK's f32 -> qs8 convert as the first node of the next delegate (src/f32-qs8-vcvt), or
  ExecuTorch's quantize_per_tensor (kernels/quantized/cpu/op_quantize.cpp quantize_val: inv_scale = 1.0f /
  (float)scale, nearbyint((float)(inv_scale * value)) + zero_point, clamped). Both are
  clamp(rne(f(y * f(1 / f(s)))) + z): ties to even.

These operators have no optimized kernel (kernels/optimized/optimized.yaml lists neither), so the runtime
calls the portable ones. The portable mean (kernels/portable/cpu/op_mean.cpp, with MapReduceOverDimListPlan of util/reduce_util.h)
accumulates in the output's type, float32, one element at a time in the input's row-major order over the reduced
dims, starting from the first element, and divides the sum once by the count as a float: f(sum / f(n)). The
portable max pool (op_max_pool2d_with_indices.cpp) takes the exact maximum of the dequantized values; since the
dequantize above is monotone and the quantize maps each dequantized code of a grid back to itself, its codes are
the maximum of the codes, as the delegate computes it (tests/test_executorch_portable.py checks both claims).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..qparams import QParams
from .xnnpack import XnnpackTarget


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


# The converts are the xnnpack target's own QUANTIZE/DEQUANTIZE (one rule, numerics/xnnpack.py and target.py).
_CONVERTS = XnnpackTarget()


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """ExecuTorch's dequantize_per_tensor and XNNPACK's qs8 -> f32 convert: f((q - z) * f(s))."""
    return _CONVERTS.dequantize(q.to(torch.int64), qp)


def quantize(y: torch.Tensor, qp: QParams) -> torch.Tensor:
    """ExecuTorch's quantize_per_tensor and XNNPACK's f32 -> qs8 convert: clamp(rne(f(y * f(1 / s))) + z)."""
    return _CONVERTS.quantize(y.to(torch.float32), qp)


def mean(x: torch.Tensor, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    """The portable mean.out of a contiguous float32 tensor: a float32 sum in row-major order over `dims` (all
    dims where empty), then one float32 division by the count."""
    reduced = sorted({d % x.dim() for d in dims}) if len(dims) else list(range(x.dim()))
    kept = [d for d in range(x.dim()) if d not in reduced]
    rows = x.to(torch.float32).permute(kept + reduced).reshape([x.shape[d] for d in kept] + [-1])
    total = rows[..., 0].clone()
    for j in range(1, rows.shape[-1]):  # one rounding per element, in the kernel's order
        total = total + rows[..., j]
    out = total / _f32(float(rows.shape[-1]))
    if keepdim:
        out = out.reshape([1 if d in reduced else n for d, n in enumerate(x.shape)])
    return out


def mean_codes(q: torch.Tensor, source: QParams, out: QParams, dims: Sequence[int], keepdim: bool) -> torch.Tensor:
    """A mean node the .pte runs outside the delegate: dequantize, the portable float32 mean, quantize."""
    return quantize(mean(dequantize(q, source), dims, keepdim), out)
