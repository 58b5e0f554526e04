"""Target `onnxruntime`: the ONNX QLinear operators as ONNX Runtime's CPU kernels compute them.

f() is rounding to float32, rne round half to even, sat the clamp to the code dtype:
- quantize (QuantizeLinear):       q = sat(rne(f(x / s)) + z): true division, z after rounding; NaN -> qmin
- conv/linear (QLinearConv/MatMul): M = f(f(s_x * s_w) / s_y); q = sat(rne(f(f(acc) * M)) + z_y); the int32
                                    bias is in acc, and f(acc) drops bits above 2^24 as ORT does
- add (com.microsoft QLinearAdd):  r_a = f(s_a / s_y), r_b = f(s_b / s_y),
                                    F = f(z_y) - fma(r_a, z_a, f(r_b * z_b)),
                                    q = sat(rne(fma(q_a, r_a, fma(q_b, r_b, F))));
                                    A broadcast along the output's innermost dimension (or a one-element
                                    A) swaps the roles of A and B: ORT's broadcast loop calls its scalar-A
                                    functor with B as the span (qlinear_binary_op.cc)
- rescale (QLinearConcat input):   q = sat(rne(f(f((q - z) * s) / s_y)) + z_y)
- rescale is an exact copy when the grids are equal (qlinear_concat.cc)
- average (QLinearAveragePool):    each input dequantized f(s * (q - z)), summed in float32 window order
                                    (rows outer, columns inner, clipped to the real input), divided by the
                                    count (the full kernel with count_include_pad), then
                                    q = sat(rne(f(f(avg / s) + z))): the zero point enters before rounding
- global average (a window covering the whole input, no padding, which ORT routes to
  QLinearGlobalAveragePool): q = sat(rne(f(f(sum(q - z)) * M)) + z), M = f(s / f(s * N))
- sigmoid, leaky_relu (com.microsoft QLinearSigmoid / QLinearLeakyRelu): a 256-entry table built in float
                                    (qlinear_lookup_table.cc): x = f(s * f(q - z)), y = g(x), then
                                    MlasQuantizeLinear: q = rne(clamp(f(y / s_y), qmin - z_y, qmax - z_y)) + z_y;
                                    g = MLAS's FMA3 logistic (logistic.cpp, MlasLogisticKernelFma3: a rational
                                    polynomial in fma steps on clamp(x, -18, 18), then f(p / q) + 0.5, max 0),
                                    or x >= 0 ? x : f(alpha * x)
- matmul (QLinearMatMul):          as conv/linear: M = f(f(s_a * s_b) / s_y), q = sat(rne(f(f(acc) * M)) + z_y)
                                    (quantize_linear_matmul.cc, MlasRequantizeOutput)
- softmax (com.microsoft QLinearSoftmax): a float32 exp table and a float32 row sum (numerics/softmax.py);
                                    output grids 1/256, 0 (uint8) and 1/255, -128 (int8), whose largest code the
                                    kernel's int8 cast never wraps
Sources: onnxruntime/core/mlas/lib/quantize.cpp, providers/cpu/quantization/qlinearconv.cc,
contrib_ops/cpu/quantization/{qladd.cc, qlinear_concat.cc, qlinear_pool.cc, qlinear_global_average_pool.cc}.
Each formula matched ORT 1.32 (CPU EP, x86-64) with zero mismatches on random and tie-seeking cases.
"""
from __future__ import annotations

import torch

from . import pooling
from ..errors import UnsupportedOpError
from ..qparams import QParams
from .arithmetic import float32_requantizer, fma_f32
from .compiled import ElementwiseRule
from .native_add import native_ort_add
from .softmax import ONNXRUNTIME_GRIDS, onnxruntime_softmax
from .target import Target, channel_view, grid_views


def layer_multiplier(input_scale: torch.Tensor, weight_scale: torch.Tensor, output_scale: torch.Tensor):
    """QLinearConv / QGemm's float32 multiplier M = f(f(s_x * s_w) / s_y) (qlinearconv.cc)."""
    return (input_scale * weight_scale.to(torch.float32)) / output_scale


def add_parameters(a: QParams, b: QParams, out: QParams):
    """QLinearAdd's float32 r_a = f(s_a / s_y), r_b = f(s_b / s_y), F = f(z_y) - fma(r_a, z_a, f(r_b z_b))."""
    ratio_a = (a.scale / out.scale).reshape(())
    ratio_b = (b.scale / out.scale).reshape(())
    offset = out.zero_point.to(torch.float32) - fma_f32(ratio_a, a.zero_point.to(torch.float32),
                                                        ratio_b * b.zero_point.to(torch.float32))
    return ratio_a, ratio_b, offset


def swaps_operands(shape_a, shape_b) -> bool:
    """Whether QLinearAdd's broadcast loop (element_wise_ops.h BroadcastLooper) hands A to its scalar-A functor,
    which passes B as the span and A as the scalar: A is one element along each span, i.e. A broadcasts along
    the output's innermost dimension of size > 1 (or A has one element)."""
    out = torch.broadcast_shapes(tuple(shape_a), tuple(shape_b))
    aligned_a = (1,) * (len(out) - len(shape_a)) + tuple(shape_a)
    inner = [d for d in range(len(out)) if out[d] > 1]
    return aligned_a[inner[-1]] == 1 if inner else True


def global_average_multiplier(scale: torch.Tensor, count: int):
    """QLinearGlobalAveragePool's M = f(s / f(s * N)) (qlinear_global_average_pool.cc)."""
    return scale / (scale * float(count))


# MLAS's logistic on x86-64 with FMA3 (mlas/lib/logistic.cpp, MlasLogisticKernelFma3; constants as there).
LOGISTIC_NUMERATOR = (4.37031012579801e-11, 1.15627324459942e-07, 6.08574864600143e-05, 8.51377133304701e-03,
                      2.48287947061529e-01)
LOGISTIC_DENOMINATOR = (6.10247389755681e-13, 5.76102136993427e-09, 6.29106785017040e-06, 1.70198817374094e-03,
                        1.16817656904453e-01, 9.93151921023180e-01)


def mlas_logistic(x: torch.Tensor) -> torch.Tensor:
    """float32 logistic as MLAS's FMA3 kernel computes it: Horner steps in fma, then f(x p / q) + 0.5."""
    x = torch.clamp(x.to(torch.float32), -18.0, 18.0)
    x2 = x * x

    def horner(coefficients):
        constants = [torch.tensor(c, dtype=torch.float32) for c in coefficients]
        value = fma_f32(x2, constants[0].expand_as(x2), constants[1].expand_as(x2))
        for c in constants[2:]:
            value = fma_f32(x2, value, c.expand_as(x2))
        return value

    ratio = (x * horner(LOGISTIC_NUMERATOR)) / horner(LOGISTIC_DENOMINATOR)
    return torch.clamp(ratio + 0.5, min=0.0)


class OnnxRuntimeTarget(Target):
    name = "onnxruntime"
    file_format = ".onnx"
    summary = "ONNX Runtime QLinear kernels: float32 multiplier, round half to even"
    activation_dtypes = ("uint8", "int8")

    def quantize_unclamped(self, x, qp):
        scale, zero_point = grid_views(qp, x)
        return torch.round(x.to(torch.float32) / scale).to(torch.float64) + zero_point

    softmax = staticmethod(onnxruntime_softmax)

    def fixed_output_qparams(self, kind, dtype):
        return ONNXRUNTIME_GRIDS[dtype] if kind == "softmax" else None

    def matmul_requantizer(self, a, b, out, lo, hi, ndim):
        return self.requantizer("matmul", a, b.scale, out, lo, hi, 0, ndim)

    def multiply(self, qa, a, qb, b, out, lo, hi):
        # com.microsoft QLinearMul (mlas/lib/qlmul.cpp, MlasQLinearMulKernel): M = f(f(s_a * s_b) / s_y),
        # q = sat(sat16(rne(f(f(p * M) + f(z_y))))) with p = (q_a - z_a)(q_b - z_b) exact in float32 (|p| <= 2^16).
        multiplier = (a.scale.to(torch.float32) * b.scale.to(torch.float32)) / out.scale.to(torch.float32)
        if float(multiplier) * (1 << 16) >= 2.0**31:  # the kernel's float-to-int32 conversion would overflow
            raise UnsupportedOpError(f"mul with s_a * s_b / s_y = {float(multiplier):.6g}: ONNX Runtime's QLinearMul "
                                     "wraps such products to the lowest code; widen the output grid")
        product = ((qa - int(a.zero_point)) * (qb - int(b.zero_point))).to(torch.float32)
        value = torch.round(product * multiplier + float(out.zero_point))
        return value.clamp_(-32768, 32767).clamp_(lo, hi).to(torch.int64)

    def activation_table(self, kind, source, out, attrs):
        # qlinear_lookup_table.cc: every code dequantized in float, g applied, then MlasQuantizeLinear: this
        # target's own dequantize and quantize (the clamp before rounding there changes nothing: its bounds
        # are integers).
        if kind == "sigmoid":
            g = mlas_logistic
        elif kind == "leaky_relu":
            alpha = torch.tensor(attrs["negative_slope"], dtype=torch.float32)
            g = lambda x: torch.where(x >= 0, x, alpha * x)  # noqa: E731
        else:
            return super().activation_table(kind, source, out, attrs)
        codes = torch.arange(source.qmin, source.qmax + 1)
        return self.quantize(g(self.dequantize(codes, source)), out)

    def quantize(self, x, qp):
        codes = torch.clamp(self.quantize_unclamped(x, qp), qp.qmin, qp.qmax)
        return torch.nan_to_num(codes, nan=float(qp.qmin)).to(torch.int64)  # MLAS maps NaN to qmin

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        multiplier = channel_view(layer_multiplier(input_qp.scale, weight_scale, output_qp.scale), ndim, channel_axis)
        return float32_requantizer(multiplier, int(output_qp.zero_point), lo, hi)

    # QLinearAdd's b term fma(q_b, r_b, F) once per code, then the fused multiply-add of a's onto it per pair.
    add_from_code_terms = True

    def elementwise_add(self, shape_a, shape_b):
        # Equal shapes of more than one element: the operands' roles are fixed, whatever the batch size.
        return tuple(shape_a) == tuple(shape_b) and not swaps_operands(shape_a, shape_b)

    def add(self, qa, a, qb, b, out, lo, hi):
        if swaps_operands(qa.shape, qb.shape):
            return self.add_elementwise(qb, b, qa, a, out, lo, hi)
        return self.add_elementwise(qa, a, qb, b, out, lo, hi)

    def subtract(self, qa, a, qb, b, out, lo, hi):
        # ONNX has no quantized Sub: the file mirrors b's codes (BitwiseNot: q_max + q_min - q) onto the mirrored
        # grid, which holds -b exactly, and adds them (QLinearAdd).
        mirrored, grid = negated(qb, b)
        return self.add(qa, a, mirrored, grid, out, lo, hi)

    def add_rule(self, a, b, out, lo, hi):
        # add_elementwise as a native loop of hardware fused multiply-adds (numerics/native_add.py); no compiled
        # kernel: inductor does not promise a single rounding for an fma
        ratio_a, ratio_b, offset = add_parameters(a, b, out)
        return ElementwiseRule(None, (float(ratio_a), float(ratio_b), float(offset), lo, hi), native_ort_add)

    def add_elementwise(self, qa, a, qb, b, out, lo, hi):
        ratio_a, ratio_b, offset = add_parameters(a, b, out)
        inner = fma_f32(qb.to(torch.float32), ratio_b, offset)
        value = fma_f32(qa.to(torch.float32), ratio_a, inner)
        return torch.clamp(torch.round(value).to(torch.int64), lo, hi)

    def rescale(self, q, source, out):
        if source.same_grid(out):
            return q
        real = (q - int(source.zero_point)).to(torch.float32) * source.scale
        scaled = torch.round(real / out.scale).to(torch.int64)
        return torch.clamp(scaled + int(out.zero_point), out.qmin, out.qmax)

    def average_pool(self, codes, qp, attrs):
        height, width = codes.shape[-2:]
        if tuple(attrs["kernel_size"]) == (height, width) and tuple(attrs["padding"]) == (0, 0):
            return self._global_average(codes, qp)
        return self._window_average(codes, qp, attrs)

    def _global_average(self, codes, qp):
        count = codes.shape[-1] * codes.shape[-2]
        # sum(q - z) as sum(q) - count z, summed in int64 from codes of any integer dtype (no centered copy)
        sums = codes.sum(dim=(-2, -1), keepdim=True, dtype=torch.int64) - count * int(qp.zero_point)
        multiplier = global_average_multiplier(qp.scale, count)
        value = torch.round(sums.to(torch.float32) * multiplier.to(codes.device)).to(torch.int64)
        return torch.clamp(value + int(qp.zero_point), qp.qmin, qp.qmax)

    def _window_average(self, codes, qp, attrs):
        # q - z centered in float32 (exact: integers below 2^24), from codes of any integer dtype
        real = (codes.to(torch.float32) - float(qp.zero_point)) * qp.scale.to(codes.device)
        out_hw = pooling.output_size(tuple(codes.shape[-2:]), attrs)
        windows = pooling.windows(real, attrs, out_hw)  # [N, C, kh*kw, OH*OW], zeros where padded
        total = windows[:, :, 0]
        for i in range(1, windows.shape[2]):
            total = total + windows[:, :, i]  # float32, one rounding per step, in ORT's order
        total = total.reshape(*codes.shape[:-2], *out_hw)
        if attrs["count_include_pad"]:
            counts = torch.full_like(total, float(attrs["kernel_size"][0] * attrs["kernel_size"][1]))
        else:
            counts = pooling.average_counts(tuple(codes.shape[-2:]), out_hw, attrs, codes.device).to(torch.float32)
        mean = total / counts
        value = torch.round(mean / qp.scale.to(codes.device) + qp.zero_point.to(torch.float32).to(codes.device))
        return torch.clamp(value.to(torch.int64), qp.qmin, qp.qmax)


def negated(q: torch.Tensor, qp: QParams):
    """-x exactly, as codes and grid: q_max + q_min - q (BitwiseNot of uint8 or int8 codes) on (s, q_max + q_min - z)."""
    return qp.qmax + qp.qmin - q, QParams(qp.scale, qp.qmax + qp.qmin - int(qp.zero_point), qp.dtype)
