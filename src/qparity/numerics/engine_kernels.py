"""The `fbgemm` and `x86` targets' conv/linear layers on the engine's own quantized kernels (IntegerModel only).

Those targets are defined as what PyTorch's quantized engine computes (pytorch_engines.py emulates
`quantized::conv2d` / `quantized::linear` step by step, and tests/test_numerics_pytorch_engines.py holds the
emulation to the real kernels with torch.equal). Where the real kernel is provably the one the target
describes, the IntegerModel runs it instead of the emulation: one kernel per layer, accumulation and
requantization included, on qparity's own codes, weights, float bias and grids. That is the case when:

- the installed PyTorch is the release the target reproduces (`PyTorchKernels.release`: the requantization
  rules changed between releases);
- the CPU sums u8 x s8 products in int32 without an int16 step (VNNI or AMX, `int32_dot_products`): on
  older CPUs fbgemm's GEMM (vpmaddubsw) saturates pairs of products, which the targets do not model;
- the layer is a conv2d whose accumulator the target computes exactly (its "float32" plan: not fbgemm's
  saturating depthwise kernels, which keep the emulation), or a linear;
- the result's memory layout is the emulation's (channels-last; the shapes whose strides are ambiguous, one
  channel or a 1x1 image, are declined), because later kernels of these engines choose their loops by it.

A fused clamp (ReLU, ReLU6, ...) is applied to the codes afterwards: the engine saturates to [0, 255] and
rounding is monotone, so clamp(saturate(q), lo, hi) is the emulation's clamp(q, lo, hi).
The fake-quant forward keeps the emulation; the fake == integer property tests hold the two equal.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch

from .accumulate import AccumulationPlan, ConvGeometry
from .int8_accumulate import int32_dot_products
from .pytorch_versions import release_of


def engine_layer(target, plan: AccumulationPlan, geometry: ConvGeometry, weight_codes: torch.Tensor,
                 weight_scale: torch.Tensor, bias: Optional[torch.Tensor], input_qp, output_qp, lo: int, hi: int
                 ) -> Optional[Callable[[torch.Tensor], Optional[torch.Tensor]]]:
    """A function of the input codes returning the layer's output codes (int64), or None where the engine's
    kernel is not provably the target's here; the function itself returns None for shapes it declines."""
    engine = _engine(target)
    if (engine is None or plan.path != "float32" or geometry.kind not in ("conv2d", "linear")
            or isinstance(geometry.padding, str) or input_qp.dtype != "uint8" or output_qp.dtype != "uint8"
            or weight_codes.device.type != "cpu" or not int32_dot_products()):
        return None
    scale_w = weight_scale.detach().to(torch.float64)
    weight = weight_codes.detach().to(torch.int8)
    if scale_w.dim() == 0:
        qweight = torch._make_per_tensor_quantized_tensor(weight, float(scale_w), 0)
    else:
        qweight = torch._make_per_channel_quantized_tensor(weight, scale_w.reshape(-1),
                                                           torch.zeros(weight.shape[0], dtype=torch.int64), 0)
    bias = None if bias is None else bias.detach().to(torch.float32).reshape(-1)
    scale_x, zero_x = float(input_qp.scale), int(input_qp.zero_point)
    scale_y, zero_y = float(output_qp.scale), int(output_qp.zero_point)
    out_channels = weight.shape[0]

    def quantized(codes: torch.Tensor) -> torch.Tensor:
        return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), scale_x, zero_x)

    def codes_of(result: torch.Tensor) -> torch.Tensor:
        codes = result.int_repr().to(torch.int64)
        return codes if (lo, hi) == (0, 255) else codes.clamp_(lo, hi)

    with _engine_selected(engine):
        if geometry.kind == "linear":
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
        else:
            packed = torch.ops.quantized.conv2d_prepack(qweight, bias, list(geometry.stride),
                                                        list(geometry.padding), list(geometry.dilation),
                                                        geometry.groups)

    if geometry.kind == "linear":
        def linear(codes: torch.Tensor) -> Optional[torch.Tensor]:
            if codes.dim() != 2 or not codes.shape[0]:
                return None
            return codes_of(torch.ops.quantized.linear(quantized(codes.contiguous()), packed, scale_y, zero_y))

        return linear

    def conv(codes: torch.Tensor) -> Optional[torch.Tensor]:
        n, channels, height, width = codes.shape
        if not n or 1 in (channels, out_channels, height * width):
            return None
        x = quantized(codes.contiguous(memory_format=torch.channels_last))
        result = torch.ops.quantized.conv2d(x, packed, scale_y, zero_y)
        if result.shape[2] * result.shape[3] == 1:
            return None
        return codes_of(result).contiguous(memory_format=torch.channels_last)

    return conv


def _engine(target) -> Optional[str]:
    """The quantized engine whose kernels are this target's layers here, or None."""
    if target.name not in ("fbgemm", "x86") or target.name not in torch.backends.quantized.supported_engines:
        return None
    kernels = getattr(target, "kernels", None)
    if kernels is None or kernels.release != release_of(torch.__version__):
        return None
    return target.name


@contextmanager
def _engine_selected(engine: str):
    """Pack with `engine` (the packed weights then carry their kernels), leaving the caller's setting as it was."""
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
