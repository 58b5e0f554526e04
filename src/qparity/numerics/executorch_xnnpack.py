"""Target `executorch-xnnpack`: ExecuTorch's XNNPACK delegate, the kernels a .pte file from `qparity.export` runs.

ExecuTorch lowers quantized_decomposed Q/DQ programs to the same XNNPACK qs8 operators that LiteRT's XNNPACK
delegate uses, with the same requantization parameters, so this target is target `xnnpack` (numerics/xnnpack.py)
for every operator but two, measured against executorch 1.5.1's runtime (tests/test_export_pte.py):

- mean over H and W (avg_pool2d whose window is the whole image, adaptive pools to 1x1): LiteRT runs int8
  AVERAGE_POOL_2D / MEAN in TFLite's own kernel (ties away from zero); ExecuTorch lowers `mean.dim` to XNNPACK's
  qs8 reduce-mean (src/operators/reduce-nd.c, xnn_init_qs8_reduce_scalar_params and the int32 -> qs8 reference
  convert, src/reference/unary-elementwise.cc): the raw int32 sum S of the codes (zero point included), then
      scale = f(f(s_in / s_out) * f(1 / n)),  z' = f(z_out - f(f(n z_in) * scale)),  q = clamp(rne(f(f(S scale) + z')))
  (nearbyint: ties to even). The same grid in and out gives scale = f(1 / n): 192 of 6,400 codes differ from
  the `xnnpack` rule on a trained model's global pool, all ties.
- hardswish: LiteRT refuses int8 HARD_SWISH to XNNPACK and runs TFLite's int16 fixed-point kernel; ExecuTorch
  runs XNNPACK's qs8 unary operator, a table filled by its float32 reference kernel (src/operators/
  unary-elementwise-nc.c init_lut_op_with_config, src/reference/unary-elementwise.cc HardSwishOp, dequantize and
  quantize of src/xnnpack/reference-utils.h): x = f(f(q - z) s), h = f(f(x / 6) * clamp(f(x + 3), 0, 6)),
  q' = clamp(rne(f(f(h * f(1 / s_y)) + z_y))). 428 of 204,800 codes of a trained stem differ from TFLite's.
- other average pools are refused: XNNPACK has no qs8 average pooling and computes them in float32 inside the
  delegate (src/subgraph/rewrites/cvt_to_fp32.cc), whose window sums round in the kernel's order.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from .xnnpack import XnnpackTarget


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


def hardswish_table(source: QParams, out: QParams) -> torch.Tensor:
    """XNNPACK's qs8 hardswish table: the float32 reference kernel on every dequantized int8 code."""
    codes = torch.arange(-128, 128, dtype=torch.float32)
    x = (codes - _f32(int(source.zero_point))) * _f32(source.scale)
    h = (x / _f32(6.0)) * torch.clamp(x + _f32(3.0), 0.0, 6.0)
    return torch.round(h * (_f32(1.0) / _f32(out.scale)) + _f32(int(out.zero_point))).clamp_(-128, 127).to(torch.int64)


class ExecutorchXnnpackTarget(XnnpackTarget):
    name = "executorch-xnnpack"
    file_format = ".pte"
    summary = "ExecuTorch XNNPACK delegate: target xnnpack's kernels; spatial means by XNNPACK's qs8 reduce"

    def hardswish(self, q, source, out):
        return hardswish_table(source, out).to(q.device)[q - source.qmin]

    def average_pool(self, codes, qp, attrs):
        if tuple(attrs["kernel_size"]) != tuple(codes.shape[-2:]) or tuple(attrs["padding"]) != (0, 0):
            raise UnsupportedOpError(
                f"avg_pool2d with window {tuple(attrs['kernel_size'])} on a {tuple(codes.shape[-2:])} image on target "
                "'executorch-xnnpack': ExecuTorch's XNNPACK delegate computes average pools other than the mean "
                "over the whole image in float32 (XNNPACK has no qs8 average pooling), which qparity does not "
                "emulate; use a global average pool (AdaptiveAvgPool2d(1), mean over H and W)")
        return super().average_pool(codes, qp, attrs)

    def average(self, sums, counts, qp):
        # XNNPACK qs8 reduce-mean; input and output share the grid qp (avg_pool2d keeps its input's grid).
        n = int(counts.reshape(-1)[0])
        zero_point = int(qp.zero_point)
        scale = (_f32(qp.scale) / _f32(qp.scale)) * (_f32(1.0) / _f32(n))
        shifted_zero_point = _f32(zero_point) - _f32(n * zero_point) * scale
        raw = (sums + zero_point * counts).to(torch.float32)  # the int32 sum of codes as XNNPACK converts it
        return torch.round(raw * scale + shifted_zero_point).to(torch.int64).clamp_(qp.qmin, qp.qmax)


def delegate_bias_codes(bias: torch.Tensor, weight_scale: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The int32 codes ExecuTorch's XNNPACK partitioner makes of a float32 conv/linear bias: quantized at
    s_w * s_in by quantized_decomposed's quantize (executorch 1.5.1 backends/xnnpack/operators/quant_params.py
    QuantParams.from_bias and quantize_tensor): a per-tensor weight scale is a Python float there, so the
    product is a double; per-channel scales are a float32 tensor times the input's float."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed

    qd = torch.ops.quantized_decomposed
    bias = bias.to(torch.float32)
    if weight_scale.dim() == 0:
        return qd.quantize_per_tensor(bias, float(weight_scale) * float(input_scale), 0, -(2**31), 2**31 - 1,
                                      torch.int32)
    scale = weight_scale.to(torch.float32) * float(input_scale)
    return qd.quantize_per_channel(bias, scale, torch.zeros_like(scale, dtype=torch.int64), 0, -(2**31),
                                   2**31 - 1, torch.int32)
