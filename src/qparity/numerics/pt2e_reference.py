"""The rule of PyTorch's PT2E reference graph (torchao convert_pt2e): each operator in float32 on dequantized
values, then quantized_decomposed.quantize_per_tensor. The doctor replays it to say which codes that rule
explains, and `Pt2eReferenceTarget` runs it so that `qparity.from_torch` of a converted PT2E model predicts
that model's codes.

Between a DEQUANTIZE and a QUANTIZE the graph runs PyTorch's own float32 kernels (aten conv2d, linear, add,
mean); their sums round in the order of the kernel that runs them (oneDNN/MKL, vectorized reductions), which
no integer formula reproduces. The target therefore calls those same kernels, on the same contiguous float32
tensors the graph gives them, so its codes are the graph's on the same PyTorch build and CPU; the elementwise
steps (dequantize, quantize) are written out and tested against the quantized_decomposed ops.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..qparams import QParams
from .target import Target


def reference_codes(y: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """quantized_decomposed.quantize_per_tensor: clamp(round(y * (1.0 / scale)) + zero_point) with y float32
    (torch/ao/quantization/fx/_decomposed.py, torch 2.13 and 2.14: it multiplies by the reciprocal)."""
    return torch.clamp(torch.round(y * (1.0 / scale)) + zero_point, qmin, qmax).to(torch.int64)


def dequantized_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """quantized_decomposed.dequantize_per_channel (axis 0) / dequantize_per_tensor of int8 weight codes with zero
    point 0: codes * scale in float32, one rounding (torch/ao/quantization/fx/_decomposed.py, torch 2.13 and 2.14),
    contiguous as the graph's constant."""
    scale = scale.to(torch.float32).reshape((-1,) + (1,) * (codes.dim() - 1))
    return (codes.to(torch.float32) * scale).contiguous()


def _codes(y: torch.Tensor, out: QParams, lo: int, hi: int) -> torch.Tensor:
    """y quantized onto `out`, then clamped to [lo, hi]: a ReLU before the QUANTIZE clamps the reals at 0, and
    round(y / s) + z is monotone with 0 -> z, so the clamp in codes at z gives the same codes."""
    return reference_codes(y, float(out.scale), int(out.zero_point), out.qmin, out.qmax).clamp_(lo, hi)


class Pt2eReferenceTarget(Target):
    """The reference Q/DQ graph of convert_pt2e. Read from converted models only (`qparity.from_torch`): it is
    no deployment runtime, so prepare_qat refuses it."""

    name = "pt2e-reference"
    summary = "PyTorch's PT2E reference graph (convert_pt2e): float32 aten ops between quantize/dequantize"
    activation_dtypes = ("int8", "uint8")
    weight_qmax = 128  # PT2E weights may use code -128 (X86InductorQuantizer: [-128, 127])
    float_bias = True
    trainable = False

    def quantize_unclamped(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        return torch.round(x.to(torch.float32) * (1.0 / float(qp.scale))) + int(qp.zero_point)

    def _real(self, q: torch.Tensor, qp: QParams) -> torch.Tensor:
        """dequantize_per_tensor's float32 values, contiguous as the graph holds them."""
        return self.dequantize(q, qp).contiguous()

    def layer_kernel(self, geometry, weight_codes: torch.Tensor, weight_scale: torch.Tensor,
                     bias: Optional[torch.Tensor], input_qp: QParams, output_qp: QParams, lo: int,
                     hi: int) -> Callable[[torch.Tensor], torch.Tensor]:
        weight = dequantized_weight(weight_codes, weight_scale)
        bias = None if bias is None else bias.to(torch.float32)
        if geometry.kind == "linear":
            return lambda q: _codes(F.linear(self._real(q, input_qp), weight, bias), output_qp, lo, hi)
        if geometry.kind != "conv2d":
            raise NotImplementedError(geometry.kind)
        padding = geometry.padding if isinstance(geometry.padding, str) else tuple(geometry.padding)
        return lambda q: _codes(F.conv2d(self._real(q, input_qp), weight, bias, tuple(geometry.stride), padding,
                                         tuple(geometry.dilation), geometry.groups), output_qp, lo, hi)

    def add(self, qa, a, qb, b, out, lo, hi):
        return _codes(self._real(qa, a) + self._real(qb, b), out, lo, hi)

    def mean(self, q, source, out, dims, keepdim):
        return _codes(torch.mean(self._real(q, source), dims, keepdim=keepdim), out, out.qmin, out.qmax)

    def rescale(self, q, source, out):
        return _codes(self._real(q, source), out, out.qmin, out.qmax)
