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

import math

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


def float_path_table(function, source: QParams, out: QParams) -> torch.Tensor:
    """The delegate's codes for an operator its partitioner takes only in float32 between converts: qs8 -> f32
    (src/qs8-f32-vcvt: f(f(q - z) s)), the float32 kernel `function`, f32 -> qs8 (src/f32-qs8-vcvt:
    clamp(rne(f(y * f(1 / s_y))) + z_y)), for every int8 code."""
    codes = torch.arange(-128, 128, dtype=torch.int64)
    x = (codes - int(source.zero_point)).to(torch.float32) * _f32(source.scale)
    y = function(x)
    return (torch.round(y * (_f32(1.0) / _f32(out.scale))).to(torch.int64) + int(out.zero_point)).clamp_(-128, 127)


def leaky_relu_table(source: QParams, out: QParams, alpha: float) -> torch.Tensor:
    """leaky_relu, which ExecuTorch's partitioner takes only in float (LeakyReLUConfig: FP32): XNNPACK's f32 vlrelu,
    x < 0 ? f(x * f(alpha)) : x, exact in any vector width, between the two converts."""
    slope = _f32(alpha)
    return float_path_table(lambda x: torch.where(x < 0, x * slope, x), source, out)


class ExecutorchXnnpackTarget(XnnpackTarget):
    name = "executorch-xnnpack"
    file_format = ".pte"
    summary = "ExecuTorch XNNPACK delegate: target xnnpack's kernels; spatial means by XNNPACK's qs8 reduce"
    leaky_relu_table = staticmethod(leaky_relu_table)

    def hardswish(self, q, source, out):
        return hardswish_table(source, out).to(q.device)[q - source.qmin]

    def check_average_pool(self, attrs):
        if list(attrs.get("adaptive_output_size") or ()) != [1, 1]:
            window = attrs.get("adaptive_output_size") or attrs["kernel_size"]
            raise UnsupportedOpError(
                f"avg_pool2d {'to' if attrs.get('adaptive_output_size') else 'with window'} {tuple(window)} cannot "
                "run on target 'executorch-xnnpack': ExecuTorch's XNNPACK delegate computes average pools other "
                "than the mean over the whole image in float32 (XNNPACK has no qs8 average pooling: "
                "src/subgraph/rewrites/cvt_to_fp32.cc), whose window sums round in the kernel's order and which "
                "qparity does not emulate; use a global average pool (AdaptiveAvgPool2d(1), mean over H and W), or "
                "target 'xnnpack' (LiteRT) for windowed pools")

    def mean(self, q, source, out, dims, keepdim):
        # The .pte exporter writes every mean as XNNPACK's qs8 mean over the two inner axes of a 4-D view.
        count = math.prod(q.shape[d] for d in dims)
        return reduce_mean(q.sum(dims, keepdim=keepdim), count, source, out)

    def average(self, sums, counts, qp):
        # XNNPACK qs8 reduce-mean; input and output share the grid qp (avg_pool2d keeps its input's grid).
        n = int(counts.reshape(-1)[0])
        return reduce_mean(sums + int(qp.zero_point) * counts, n, qp, qp)


def reduce_mean(raw: torch.Tensor, n: int, source: QParams, out: QParams) -> torch.Tensor:
    """XNNPACK's qs8 mean of n codes from their raw int32 sum (zero points included), as the module docstring says."""
    scale = (_f32(source.scale) / _f32(out.scale)) * (_f32(1.0) / _f32(n))
    shifted_zero_point = _f32(int(out.zero_point)) - _f32(n * int(source.zero_point)) * scale
    return torch.round(raw.to(torch.float32) * scale + shifted_zero_point).to(torch.int64).clamp_(out.qmin, out.qmax)
