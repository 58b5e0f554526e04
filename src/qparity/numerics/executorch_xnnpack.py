"""Target `executorch-xnnpack`: ExecuTorch's XNNPACK delegate, the kernels a .pte file from `qparity.export` runs.

ExecuTorch lowers quantized_decomposed Q/DQ programs to the same XNNPACK qs8 operators that LiteRT's XNNPACK
delegate uses, with the same requantization parameters, wherever its partitioner takes the operator with static
quantization (backends/xnnpack/partition/config: conv, linear, add, sub, mul, cat, max pool, mean.dim, pad, views,
permutes, clamps). So this target is target `xnnpack` (numerics/xnnpack.py) but where measured otherwise against
executorch 1.5.1's runtime (tests/test_export_pte.py); XNNPACK commit 92a7ad50, the one executorch 1.5.1 pins:

- means (avg_pool2d whose window is the whole image, adaptive pools to 1x1, torch.mean over any dims, which the
  .pte file writes as the mean over the two inner axes of a 4-D view): LiteRT runs int8 AVERAGE_POOL_2D / MEAN in
  TFLite's own kernel (ties away from zero); ExecuTorch lowers `mean.dim` to XNNPACK's qs8 reduce-mean
  (src/operators/reduce-nd.c, xnn_init_qs8_reduce_scalar_params and the int32 -> qs8 reference convert,
  src/reference/unary-elementwise.cc): the raw int32 sum S of the codes (zero point included), then
      scale = f(f(s_in / s_out) * f(1 / n)),  z' = f(z_out - f(f(n z_in) * scale)),  q = clamp(rne(f(f(S scale) + z')))
  (nearbyint: ties to even). The same grid in and out gives scale = f(1 / n): 192 of 6,400 codes differ from
  the `xnnpack` rule on a trained model's global pool, all ties.
- operators the partitioner takes only in float32 (FP32-only configs) run between two converts inside the
  delegate, qs8 -> f32 (src/qs8-f32-vcvt: f(f(q - z) s)) and f32 -> qs8 (src/f32-qs8-vcvt: clamp(rne(f(y *
  f(1 / s_y))) + z_y)); XNNPACK has no rewrite of that sequence to a qs8 operator (src/subgraph.c). Emulated as
  the float kernels compute, in IEEE float32 steps: leaky_relu (f32-vlrelu: f(x * alpha) below 0; LiteRT's delegate runs
  qs8-vlrelu, 8-bit multipliers), hardswish (f32-vhswish: x * clamp(fmaf(x, f(1/6), 1/2), 0, 1); LiteRT refuses
  int8 HARD_SWISH to XNNPACK and runs TFLite's int16 fixed-point kernel: 428 of 204,800 codes of a trained stem
  differ), tanh (f32-vtanh, a rational 9/8 approximation by fmaf; LiteRT's delegate runs qs8 tanh, a table from
  tanhf) and gelu (f32-vgelu, a rational 12/10 erf by fmaf, always the erf form; LiteRT: TFLite's table from
  erfcf). These follow the kernels' FMA variants (x86-64 with FMA3 or AVX-512, ARM64); fmaf is emulated exactly
  (fused_multiply_add). The other float kernels (rsqrt, softmax, float GEMM, bilinear resize) are not emulated
  yet: refused (ops/registry.py).
- a concatenation's input on another grid: the .pte file requantizes it by DEQUANTIZE then QUANTIZE, the same
  two converts (LiteRT: one fixed-point qs8 -> qs8 convert); 136 of 4,096 output codes of a small U-Net differ.
- other average pools are refused at prepare_qat: XNNPACK has no qs8 average pooling and computes them in float32
  inside the delegate (src/subgraph/rewrites/cvt_to_fp32.cc), whose window sums round in the kernel's order.
"""
from __future__ import annotations

import math

import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from .executorch_portable import dequantize, quantize
from .litert_activations import xnnpack_table
from .xnnpack import XnnpackTarget


def _f32(value) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32)


def fused_multiply_add(a: torch.Tensor, b, c) -> torch.Tensor:
    """fmaf(a, b, c) of float32 values: a * b + c rounded once to float32. The float64 product is exact; the
    float64 sum's error (TwoSum) decides the float32 rounding where that sum fell exactly halfway."""
    b, c = (_f32(v).expand_as(a) for v in (b, c))
    product, addend = a.to(torch.float64) * b.to(torch.float64), c.to(torch.float64)
    total = product + addend
    back = total - product
    error = (product - (total - back)) + (addend - back)
    rounded = total.to(torch.float32)
    toward = torch.nextafter(rounded, torch.where(total > rounded.to(torch.float64), torch.inf, -torch.inf)
                             .to(torch.float32))
    halfway = (rounded.to(torch.float64) + toward.to(torch.float64)) / 2 == total
    beyond = torch.nextafter(rounded, torch.where(error > 0, torch.inf, -torch.inf).to(torch.float32))
    return torch.where(halfway & (error != 0), beyond, rounded)


SIXTH = float.fromhex("0x1.555556p-3")  # f32-vhswish's vsixth


def hardswish_table(source: QParams, out: QParams) -> torch.Tensor:
    """hardswish, which ExecuTorch's partitioner takes only in float (HardswishConfig: FP32): XNNPACK's f32-vhswish,
    y = x * clamp(fmaf(x, f(1/6), 1/2), 0, 1) (src/f32-vhswish/gen/f32-vhswish-avx512f.c; fused on CPUs with FMA:
    x86-64 with FMA3 or AVX-512, ARM64), between the two converts."""
    return float_path_table(lambda x: torch.clamp(fused_multiply_add(x, SIXTH, 0.5), 0.0, 1.0) * x, source, out)


# f32-vtanh rational 9/8 (src/f32-vtanh/gen/f32-vtanh-avx512f-rational-9-8-div.c, the FMA variant's constants)
TANH_BOUND = 7.9807181358
TANH_NUMERATOR = (1.4248920266e-08, 2.1235626264e-05, 3.5330520477e-03, 1.3412411511e-01, 1.0)
TANH_DENOMINATOR = (8.1365948290e-07, 3.3472978976e-04, 2.6018999517e-02, 4.6745735407e-01, 1.0)


def tanh_kernel(x: torch.Tensor) -> torch.Tensor:
    """XNNPACK's f32-vtanh on CPUs with FMA (AVX-512, FMA3, ARM64): x clamped to +-7.98, p / q with Horner
    polynomials in x^2 by fmaf, p multiplied by x, one IEEE division."""
    return _odd_rational(torch.clamp(x, -_f32(TANH_BOUND), _f32(TANH_BOUND)), TANH_NUMERATOR, TANH_DENOMINATOR)


def _odd_rational(x: torch.Tensor, numerator, denominator) -> torch.Tensor:
    """x * P(x^2) / Q(x^2), P and Q by Horner's rule in fmaf (highest coefficient first): XNNPACK's rational kernels."""
    square = x * x

    def horner(coefficients):
        acc = fused_multiply_add(square, coefficients[0], coefficients[1])
        for c in coefficients[2:]:
            acc = fused_multiply_add(square, acc, c)
        return acc

    return (x * horner(numerator)) / horner(denominator)


# f32-vgelu rational 12/10 for erf(x / sqrt 2) (src/f32-vgelu/gen/f32-vgelu-avx512f-rational-12-10-div.c, FMA)
GELU_BOUND = 5.1638283730
GELU_NUMERATOR = (4.5835321316e-08, 1.2609783880e-05, 3.2973114867e-04, 9.3065137044e-03, 6.6972173750e-02,
                  7.9788452387e-01)
GELU_DENOMINATOR = (1.1988805682e-06, 7.2267655923e-05, 1.8622842617e-03, 2.8431978077e-02, 2.5060352683e-01, 1.0)


def gelu_kernel(x: torch.Tensor) -> torch.Tensor:
    """XNNPACK's f32-vgelu on CPUs with FMA: f(f(x / 2) * f(erf + 1)), erf a rational 12/10 of x clamped to
    +-5.16 (the erf form: ExecuTorch's op_gelu.py writes no `approximate`)."""
    clamped = torch.clamp(x, -_f32(GELU_BOUND), _f32(GELU_BOUND))
    return (x * _f32(0.5)) * (_odd_rational(clamped, GELU_NUMERATOR, GELU_DENOMINATOR) + _f32(1.0))


def transcendental_table(kind: str, source: QParams, out: QParams, attrs: dict) -> torch.Tensor:
    """tanh and gelu by XNNPACK's float kernels between converts (TanhConfig, GeluConfig: FP32); sigmoid by
    LiteRT's qs8 table, which matched the runtime's f32-vsigmoid on every code tried (docs/runtimes.md)."""
    if kind in ("tanh", "gelu"):
        return float_path_table(tanh_kernel if kind == "tanh" else gelu_kernel, source, out)
    return xnnpack_table(kind, source, out, attrs)


def float_path_table(function, source: QParams, out: QParams) -> torch.Tensor:
    """The delegate's codes for an operator its partitioner takes only in float32 between converts: qs8 -> f32
    (src/qs8-f32-vcvt: f(f(q - z) s)), the float32 kernel `function`, f32 -> qs8 (src/f32-qs8-vcvt:
    clamp(rne(f(y * f(1 / s_y))) + z_y)), for every int8 code: the arithmetic of ExecuTorch's own Q/DQ kernels too
    (numerics/executorch_portable.py)."""
    return quantize(function(dequantize(torch.arange(-128, 128, dtype=torch.int64), source)), out)


def leaky_relu_table(source: QParams, out: QParams, alpha: float) -> torch.Tensor:
    """leaky_relu, which ExecuTorch's partitioner takes only in float (LeakyReLUConfig: FP32): XNNPACK's f32 vlrelu,
    x < 0 ? f(x * f(alpha)) : x, exact in any vector width, between the two converts."""
    slope = _f32(alpha)
    return float_path_table(lambda x: torch.where(x < 0, x * slope, x), source, out)


class ExecutorchXnnpackTarget(XnnpackTarget):
    name = "executorch-xnnpack"
    file_format = ".pte"
    summary = "ExecuTorch XNNPACK delegate: xnnpack's qs8 kernels; means by qs8 reduce; float kernels between converts"
    leaky_relu_table = staticmethod(leaky_relu_table)
    transcendental_table = staticmethod(transcendental_table)

    def hardswish(self, q, source, out):
        return hardswish_table(source, out).to(q.device)[q - source.qmin]

    def rescale(self, q, source, out):
        # The .pte file moves a concatenation's input onto the output grid by DEQUANTIZE then QUANTIZE, which the
        # delegate runs as its two converts (qs8 -> f32 -> qs8), not LiteRT's fixed-point qs8 -> qs8 convert.
        if source.same_grid(out):
            return q
        return float_path_table(lambda x: x, source, out).to(q.device)[q - source.qmin]

    def check_activation(self, kind, attrs):
        super().check_activation(kind, attrs)
        if kind == "gelu" and attrs["approximate"] != "none":
            raise UnsupportedOpError(
                "GELU with approximate='tanh' on target 'executorch-xnnpack': ExecuTorch's XNNPACK delegate computes "
                "the erf form whatever `approximate` says (backends/xnnpack/operators/op_gelu.py writes no "
                "approximate argument to XNNPACK's GELU); use nn.GELU() or target 'xnnpack'")

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
