"""Target `xnnpack`: LiteRT's default CPU kernels, the XNNPACK delegate that `Interpreter(model_content=...)` applies.

The delegate takes QUANTIZE, CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV, FULLY_CONNECTED, ADD, MAX_POOL_2D and
CONCATENATION (the op list shows one DELEGATE node); int8 AVERAGE_POOL_2D stays with TFLite's optimized built-in kernel, and
so does a QUANTIZE whose scale ratio XNNPACK refuses. f() is rounding to float32, rne round half to even:

- quantize (f32-qs8-vcvt):  q = clamp(rne(f(x * f(1 / s))) + z): a float reciprocal, clamped before rounding
- conv / depthwise / transposed conv / linear (qs8-qc8w gemm, dwconv and deconvolution, fp32 requantization):
                            M = f(f(s_x * s_w) / s_y) per output channel; q = clamp(rne(f(f(acc) * M)) + z_y),
                            the int32 bias inside acc; the delegate refuses M outside [2^-32, 256)
- fused activation bounds (xnn_qs8_quantize of the float clamp): clamp(rne(f(f(v / s) + z)), -128, 127)
- add (qs8-vadd):           r = f(s_a / s_y), f(s_b / s_y); shift = 20 - exponent(max(r_a, r_b)),
                            m = rne(r * 2^shift) (21-bit multipliers); q = clamp(z_y + ((q_a - z_a) m_a +
                            (q_b - z_b) m_b + 2^(shift-1)) >> shift): half up, arithmetic shift. Delegated for
                            ratios in [2^-10, 2^8); others run TFLite's optimized ADD, which is not emulated
- rescale (QUANTIZE int8 -> int8, qs8-vcvt): for r = f(s / s_y) in [2^-8, 2^7], m = rne(f(256 r)),
                            q = clamp(z_y + ((q - z) m + 128) >> 8); other ratios run TFLite's optimized
                            Requantize: Q31 multiplier of the double ratio, SRDHM, then a right shift that
                            rounds halves up
- average (AVERAGE_POOL_2D, TFLite's optimized int8 kernel): as the reference, ties away from zero
- softmax (SOFTMAX int8, LiteRT's optimized kernel: the delegate takes only float SOFTMAX): a float32 expf table,
                            float32 row sum, rha(f(e * f(1 / f(sum * s_y)))) + z_y (numerics/softmax.py)
- MAX_POOL_2D, CONCATENATION of equal grids, MAXIMUM/MINIMUM, PADV2, SLICE, TRANSPOSE, RESHAPE, GATHER move
  codes without arithmetic.

Sources: XNNPACK src/microparams-init.c (xnn_init_qs8_add_minmax_scalar_params, xnn_init_qs8_cvt_scalar_params,
xnn_init_qs8_qc8w_conv_minmax_fp32_scalar_params), src/xnnpack/quantization.h (xnn_qs8_quantize),
src/operators/unary-elementwise-nc.c (the convert's [2^-8, 2^7] ratio check), src/qs8-vadd, src/qs8-vcvt,
src/f32-qs8-vcvt, src/qs8-gemm; tensorflow/lite/delegates/xnnpack/xnnpack_delegate.cc (which ops and scale
ratios it takes); tensorflow/lite/kernels/internal/optimized/optimized_ops.h (Requantize) and
optimized/integer_ops/pooling.h. Every formula matched ai-edge-litert 2.3.0's default interpreter (x86-64,
AVX512) with zero mismatches on random and tie-seeking cases (tests/test_numerics_xnnpack.py).
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedOpError
from ..qparams import TORCH_DTYPES
from .compiled import ElementwiseRule
from .native_add import native_qs8_vadd
from .arithmetic import float32_requantizer, quantize_multiplier, saturating_rounding_doubling_high_mul
from . import resampling
from .prelu import tflite_prelu
from .softmax import litert_optimized_softmax
from .litert_activations import LiteRTActivations, xnnpack_leaky_relu_table, xnnpack_table
from .target import Target, channel_view, grid_views
from .tflite import TFLiteTarget, check_transpose_conv

ADD_MULTIPLIER_BITS = 20          # xnn_init_qs8_add_minmax_scalar_params: the largest multiplier is in [2^20, 2^21)
ADD_RATIO_RANGE = (2.0**-10, 2.0**8)        # delegated ADD: input/output scale ratios in [lo, hi)
CONVERT_RATIO_RANGE = (2.0**-8, 2.0**7)     # delegated QUANTIZE int8 -> int8: ratio in [lo, hi]
MUL_RATIO_RANGE = (2.0**-16, 256.0)         # delegated MUL: s_a * s_b / s_y in [lo, hi)
REQUANTIZATION_RANGE = (2.0**-32, 256.0)    # conv / fully connected: M in [lo, hi), else XNNPACK fails to prepare


def _f32_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator as one float32 division, as XNNPACK computes every scale ratio."""
    return numerator.to(torch.float32) / denominator.to(torch.float32)


def _require_within(values: torch.Tensor, bounds, message) -> None:
    """Raise UnsupportedOpError(message()) unless every value lies in [low, high): the ranges XNNPACK accepts."""
    low, high = bounds
    if bool(((values < low) | (values >= high)).any()):
        raise UnsupportedOpError(message())


def layer_multiplier(input_scale: torch.Tensor, weight_scale: torch.Tensor, output_scale: torch.Tensor) -> torch.Tensor:
    """M = f(f(s_x * s_w) / s_y) per output channel (xnn_init_qs8_qc8w_conv_minmax_fp32_scalar_params)."""
    return _f32_ratio(input_scale * weight_scale.to(torch.float32), output_scale)


def add_parameters(op: str, a, b, out):
    """qs8-vadd's (m_a, m_b) and shift: r = f(s / s_y), shift = 20 - exponent(max r), m = rne(r * 2^shift)."""
    ratios = torch.stack([_f32_ratio(a.scale, out.scale), _f32_ratio(b.scale, out.scale)]).reshape(2)
    _require_within(ratios, ADD_RATIO_RANGE, lambda: (
        f"{op} with input/output scale ratios {ratios.tolist()}: XNNPACK takes ratios in [2^-10, 256) "
        f"only, and LiteRT then runs its optimized {op.upper()}, whose rounding target 'xnnpack' does not model; "
        "use target 'tflite' or keep the add's inputs and output on comparable scales"))
    _, exponent = torch.frexp(ratios.max())  # frexp's exponent is the IEEE exponent plus one
    shift = ADD_MULTIPLIER_BITS - (int(exponent) - 1)
    return torch.round(ratios.to(torch.float64) * 2.0**shift).to(torch.int64).tolist(), shift


def _add_constants(op: str, a, b, out, lo: int, hi: int, sign: int) -> tuple:
    """qs8_vadd's constants after the codes: zero points, multipliers (b's negated for a subtraction), shift,
    output zero point and clamp."""
    (m_a, m_b), shift = add_parameters(op, a, b, out)
    return int(a.zero_point), int(b.zero_point), m_a, sign * m_b, shift, int(out.zero_point), lo, hi


def qs8_vadd(qa: torch.Tensor, qb: torch.Tensor, zero_a: int, zero_b: int, multiplier_a: int, multiplier_b: int,
             shift: int, zero_out: int, lo: int, hi: int, wide: torch.dtype = torch.int64,
             dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """qs8-vadd on integer codes of any dtype: clamp(z_y + ((q_a - z_a) m_a + (q_b - z_b) m_b + 2^(shift-1)) >>
    shift), the sum formed in `wide` (int64, or int32 where `_vadd_sum_dtype` proved that no partial sum wraps, as in
    XNNPACK's own int32 lanes) and the codes returned as `dtype`. Run eagerly or as one compiled kernel."""
    acc = (qa.to(wide) - zero_a) * multiplier_a + (qb.to(wide) - zero_b) * multiplier_b
    return _shift_right_half_up(acc, shift).add_(zero_out).clamp_(lo, hi).to(dtype)


def _vadd_sum_dtype(a, b, constants: tuple) -> torch.dtype:
    """int32 where every partial sum of qs8_vadd stays below 2^31 in magnitude for any codes that a and b's dtypes
    hold (so also for codes outside the grids' clamp ranges), else int64."""
    zero_a, zero_b, m_a, m_b, shift = constants[:5]
    span_a = max(abs(code - zero_a) for code in _dtype_range(a))
    span_b = max(abs(code - zero_b) for code in _dtype_range(b))
    largest = span_a * abs(m_a) + span_b * abs(m_b) + ((1 << shift) >> 1)  # the zero point comes after the shift
    return torch.int32 if largest < 1 << 31 else torch.int64


def _dtype_range(qp) -> tuple:
    info = torch.iinfo(TORCH_DTYPES[qp.dtype])
    return info.min, info.max


def _shift_right_half_up(x: torch.Tensor, shift: int) -> torch.Tensor:
    """(x + 2^(shift-1)) >> shift: ties toward +infinity, the rounding of XNNPACK's fixed-point kernels."""
    return (x + ((1 << shift) >> 1)) >> shift


class XnnpackTarget(LiteRTActivations, Target):
    name = "xnnpack"
    file_format = ".tflite"
    summary = "LiteRT default kernels (XNNPACK): float32 multiplier, round half to even; fixed-point add"
    activation_dtypes = ("int8",)
    transcendental_table = staticmethod(xnnpack_table)  # LOGISTIC, TANH, ELU (GELU: TFLite's)
    prelu = staticmethod(tflite_prelu)  # PRELU: the reference kernel (XNNPACK takes only float PRELU)
    leaky_relu_table = staticmethod(xnnpack_leaky_relu_table)
    softmax = staticmethod(litert_optimized_softmax)  # SOFTMAX int8: LiteRT's optimized kernel (float-only delegate)

    def multiply(self, qa, a, qb, b, out, lo, hi):
        # XNNPACK qs8 vmul (src/microparams-init.c, xnn_init_qs8_mul_minmax_scalar_params; delegate: the scale
        # must lie in [2^-16, 256), else LiteRT runs its builtin MUL, whose int16 vector loop depends on the
        # element's position): s = f(f(s_a * s_b) / s_y), q = clamp(sat16(rne(f(p * s))) + z_y).
        scale = (a.scale.to(torch.float32) * b.scale.to(torch.float32)) / out.scale.to(torch.float32)
        _require_within(scale, MUL_RATIO_RANGE, lambda: (
            f"mul with s_a * s_b / s_y = {float(scale):.6g}: LiteRT's XNNPACK delegate takes MUL only for ratios "
            "in [2^-16, 256); outside it the builtin kernel's result depends on the element's position. Use target "
            "'tflite' or other grids"))
        product = ((qa - int(a.zero_point)) * (qb - int(b.zero_point))).to(torch.float32)
        rounded = torch.round(product * scale).clamp_(-32768, 32767).to(torch.int64)
        return rounded.add_(int(out.zero_point)).clamp_(lo, hi)

    def quantize_unclamped(self, x, qp):
        scale, zero_point = grid_views(qp, x)
        inverse = 1.0 / scale  # float32: xnn convert_nc_f32_qs8
        return torch.round(x.to(torch.float32) * inverse).to(torch.float64) + zero_point

    def activation_bounds(self, min_real, max_real, qp):
        """xnn_qs8_quantize(v, s, z) = lrintf(clamp(v / s + z)) of the delegate's float activation range."""
        def bound(value: float) -> int:
            scaled = torch.tensor(value, dtype=torch.float32) / qp.scale + qp.zero_point.to(torch.float32)
            return int(torch.round(scaled).clamp(qp.qmin, qp.qmax))

        lo = qp.qmin if min_real is None else bound(min_real)
        hi = qp.qmax if max_real is None else bound(max_real)
        return lo, max(lo, hi)

    def accumulation(self, geometry, weight_shape):
        check_transpose_conv(geometry, self.name)  # the delegate takes TRANSPOSE_CONV as it is in the file
        return "exact"

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        multiplier = layer_multiplier(input_qp.scale, weight_scale, output_qp.scale)
        _require_within(multiplier, REQUANTIZATION_RANGE, lambda: (
            f"{op} requantization scale {multiplier.min().item():.4g}..{multiplier.max().item():.4g} "
            f"(s_in * s_w / s_out) is outside XNNPACK's [2^-32, 256): LiteRT's default interpreter fails to "
            "prepare such a model; widen the output range or use target 'tflite'"))
        multiplier = channel_view(multiplier, ndim, channel_axis)
        return float32_requantizer(multiplier, int(output_qp.zero_point), lo, hi)

    add_from_code_terms = True  # qs8-vadd: (q_a - z_a) m_a + (q_b - z_b) m_b, one rounding shift of the sum

    def elementwise_add(self, shape_a, shape_b):
        return True

    def add(self, qa, a, qb, b, out, lo, hi):
        return self._add("add", qa, a, qb, b, out, lo, hi, sign=1)

    def subtract(self, qa, a, qb, b, out, lo, hi):
        # XNNPACK's qs8 subtract is its add with the second input's scale negated (the multiplier's sign).
        return self._add("sub", qa, a, qb, b, out, lo, hi, sign=-1)

    def _add(self, op, qa, a, qb, b, out, lo, hi, sign):
        return qs8_vadd(qa, qb, *_add_constants(op, a, b, out, lo, hi, sign))

    def add_rule(self, a, b, out, lo, hi):
        constants = _add_constants("add", a, b, out, lo, hi, sign=1)
        return ElementwiseRule(qs8_vadd, constants + (_vadd_sum_dtype(a, b, constants),), native_qs8_vadd)

    def rescale(self, q, source, out):
        if source.same_grid(out):
            return q  # CONCATENATION of equal grids copies bytes
        ratio = _f32_ratio(source.scale, out.scale)
        centered = q - int(source.zero_point)
        low, high = CONVERT_RATIO_RANGE
        if low <= float(ratio) <= high:
            multiplier = int(torch.round(ratio * 256.0))  # float32 product, lrintf
            scaled = _shift_right_half_up(centered * multiplier, 8)
        else:
            scaled = _optimized_requantize(centered, source.scale.to(torch.float64) / out.scale.to(torch.float64))
        return scaled.add_(int(out.zero_point)).clamp_(out.qmin, out.qmax)

    def bilinear(self, codes, qp, out_hw, align_corners):
        return resampling.xnnpack_bilinear(codes, out_hw, align_corners)

    # int8 AVERAGE_POOL_2D is not delegated; TFLite's optimized kernel rounds as the reference one does.
    average = TFLiteTarget.average


def _optimized_requantize(centered: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """TFLite's optimized Requantize (int8 -> int8 QUANTIZE that XNNPACK refuses): QuantizeMultiplier of the
    double ratio, a left shift, SRDHM, then a right shift that rounds halves up (not away from zero)."""
    m0, shift = quantize_multiplier(real)
    left, right = max(int(shift), 0), max(-int(shift), 0)
    return _shift_right_half_up(saturating_rounding_doubling_high_mul(centered * (1 << left), m0), right)
