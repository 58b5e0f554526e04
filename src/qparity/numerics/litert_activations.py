"""Int8 activation tables as LiteRT computes them: TFLite's kernels (`tflite` target) and XNNPACK's (`xnnpack`).

Each function returns the output code of every int8 input code (-128..127). f() is rounding to float32,
rha rounds half away from zero, rne half to even; QM is tflite::QuantizeMultiplier, MBQM
MultiplyByQuantizedMultiplier (double rounding), SRDHM gemmlowp's SaturatingRoundingDoublingHighMul.
Sources: LiteRT tensorflow/lite/kernels/activations.cc (SigmoidPrepare, TanhPrepare, HardSwishPrepare,
LeakyReluPrepare), kernels/internal/common.h (LUTPopulateInt8), reference/hard_swish.h,
reference/leaky_relu.h; XNNPACK src/reference/unary-elementwise.cc (the table its qs8 sigmoid/tanh fill),
src/microparams-init.c and the qs8-vlrelu kernels; delegates/xnnpack/xnnpack_delegate.cc for what the
delegate accepts. Every function matched ai-edge-litert 2.3.0's interpreter (reference, builtin and default
XNNPACK configurations on x86-64) with 0 mismatched codes on all 256 codes of 80+ random grids per op.

- LOGISTIC / TANH, TFLite: x = f(s * f(q - z)), t = f(1 / f(1 + expf(-x))) or tanhf(x),
  q_y = clamp(rha(f(t * f(1 / s_y))) + z_y). TFLite requires s_y = 1/256 for LOGISTIC (z_y = -128 by
  convention) and uses 1/128, 0 for TANH.
- LOGISTIC / TANH, XNNPACK: x = f(f(q - z) * s), t = f(e / (1 + e)) with e = exp(x) in double (0 or 1 past
  |x| > 100) or tanhf(x), q_y = clamp(rne(f(f(t * f(1 / s_y)) + z_y))).
  expf, tanhf, erfcf and expm1f are the C library's own, called through ctypes, since LiteRT's kernels call
  the host's libm: glibc 2.36's tanhf, erfcf and expm1f are not correctly rounded (1 ulp from float64 rounded
  to float32 on 5 to 12% of 400,000 random inputs). exp (XNNPACK's sigmoid) is double: Python's math.exp is
  the same C function.
- GELU, TFLite (activations.cc GeluPrepare, reference/gelu.h; XNNPACK's delegate takes only float GELU, so
  both targets): LUTPopulateInt8 with t = f(f(0.5 x) * erfcf(f(x * f(-1/sqrt 2)))), or for approximate=True
  t = f(f(0.5 x) * f(1 + tanhf(f(f(sqrt(2/pi)) * f(x + f(f(f(0.044715 x) x) x)))))).
- ELU (alpha 1: TFLite's ELU operator has no alpha), XNNPACK only (the delegate takes int8 ELU; LiteRT's
  reference kernel set has none): its reference ELUOp, alpha * expm1f(x) for x < 0, in the table above
  (xnnpack/src/reference/unary-elementwise.cc; the builtin EluPrepare LUT computes the same expm1f).
- HARD_SWISH (XNNPACK refuses int8 HARD_SWISH, and on x86 the builtin kernel is the reference one, so both
  targets): int16 fixed point, see `hard_swish`.
- LEAKY_RELU, TFLite: z_y + MBQM(x, QM(f(s / s_y))) for x = q - z >= 0, else +-MBQM(x, QM(|f(f(s * alpha) / s_y)|)).
- LEAKY_RELU, XNNPACK: clamp(((x * m + 128) >> 8) + z_y), m = lrintf(256 * f(s / s_y) [* alpha]), where
  the delegate accepts the ratios (else the builtin kernel: the TFLite formula).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math

import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams
from .arithmetic import (multiply_by_quantized_multiplier, quantize_multiplier, round_half_away,
                         rounding_divide_by_pot, saturating_rounding_doubling_high_mul)

F32 = np.float32
CODES = torch.arange(-128, 128, dtype=torch.int64)
LITERT_FIXED_GRIDS = {"sigmoid": QParams(1.0 / 256.0, -128, "int8"), "tanh": QParams(1.0 / 128.0, 0, "int8"),
                      "softmax": QParams(1.0 / 256.0, -128, "int8")}  # SoftmaxPrepare requires it for int8
INT16_SHIFT_LIMIT = 15  # gemmlowp computes int16 RoundingDivideByPOT's mask in int16: validated below 16


@functools.lru_cache(maxsize=None)
def _c_math_library() -> ctypes.CDLL:
    """The host's C math library: libm on Linux and macOS (the one LiteRT's kernels link), the UCRT on Windows."""
    for name in (ctypes.util.find_library("m"), ctypes.util.find_library("c"), "ucrtbase", "msvcrt"):
        if name:
            try:
                return ctypes.CDLL(name)
            except OSError:
                continue
    raise UnsupportedOpError("LiteRT's activation tables call the C library's expf/tanhf/erfcf/expm1f, and no C math "
                             "library could be loaded on this host")


def _libm_function(name: str):
    """The C library's float32 function `name` (expf, tanhf, erfcf, expm1f): LiteRT's kernels call the host's libm.
    Loaded on first use, so importing qparity never depends on it."""
    def call(x):
        function = getattr(_c_math_library(), name)
        function.restype, function.argtypes = ctypes.c_float, [ctypes.c_float]
        return F32(function(float(x)))
    return call


_expf, _tanhf, _erfcf, _expm1f = (_libm_function(name) for name in ("expf", "tanhf", "erfcf", "expm1f"))
SQRT_2_OVER_PI = F32(math.sqrt(2.0 / math.pi))  # gelu.h kSqrt2dPi = M_2_SQRTPI * M_SQRT1_2, a float constexpr


def _gelu(x: np.float32) -> np.float32:
    """reference_ops::GeluTransform: 0.5f * x * erfcf(x * -M_SQRT1_2), left to right in float32."""
    return F32(0.5) * x * _erfcf(x * F32(-math.sqrt(0.5)))


def _gelu_tanh(x: np.float32) -> np.float32:
    """reference_ops::GeluTransformApproximate, left to right in float32."""
    cubic = F32(0.044715) * x * x * x
    return F32(0.5) * x * (F32(1.0) + _tanhf(SQRT_2_OVER_PI * (x + cubic)))


def _elu(x: np.float32) -> np.float32:
    return _expm1f(x) if x < 0 else x


def _tflite_sigmoid(x: np.float32) -> np.float32:
    return F32(1.0) / (F32(1.0) + _expf(-x))


def _xnnpack_sigmoid(x: np.float32) -> np.float32:
    if x > 100:
        return F32(1.0)
    if x < -100:
        return F32(0.0)
    e = math.exp(float(x))
    return F32(e / (1.0 + e))


def _grid(qp: QParams):
    return F32(float(qp.scale)), int(qp.zero_point)


def _transformed(transform, values) -> torch.Tensor:
    """transform (a float32 function of one float32 value, glibc's expf/tanhf emulated) of every value."""
    return torch.tensor([float(transform(F32(v))) for v in values], dtype=torch.float32)


def _tflite_transform(kind: str, attrs: dict):
    if kind == "gelu":
        return _gelu_tanh if attrs["approximate"] == "tanh" else _gelu
    if kind == "elu":  # the registry refuses it for target tflite at prepare_qat
        raise UnsupportedOpError("elu is not emulated for target 'tflite': LiteRT's reference kernel set has no ELU")
    return {"sigmoid": _tflite_sigmoid, "tanh": _tanhf}[kind]


def _require_unit_alpha(kind: str, attrs: dict) -> None:
    if kind == "elu" and float(F32(attrs["alpha"])) != 1.0:
        raise UnsupportedOpError(f"ELU with alpha={attrs['alpha']}: TFLite's ELU operator has no alpha (it computes "
                                 "alpha = 1); use nn.ELU() or target 'exact'")


def tflite_table(kind: str, source: QParams, out: QParams, attrs: dict) -> torch.Tensor:
    """LUTPopulateInt8 with TFLite's transform: LOGISTIC, TANH or GELU of every int8 code."""
    transform = _tflite_transform(kind, attrs)
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    dequantized = [F32(s * F32(v - z)) for v in range(-128, 128)]
    rescaled = _transformed(transform, dequantized) * torch.tensor(F32(1.0) / s_y)
    return (round_half_away(rescaled) + z_y).clamp_(-128, 127).to(torch.int64)


def xnnpack_table(kind: str, source: QParams, out: QParams, attrs: dict) -> torch.Tensor:
    """XNNPACK's qs8 sigmoid/tanh/ELU table, filled by its reference kernel (GELU: TFLite's, not delegated)."""
    if kind == "gelu":
        return tflite_table(kind, source, out, attrs)
    _require_unit_alpha(kind, attrs)
    transform = {"sigmoid": _xnnpack_sigmoid, "tanh": _tanhf, "elu": _elu}[kind]
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    dequantized = [F32(F32(F32(v) - F32(z)) * s) for v in range(-128, 128)]
    value = _transformed(transform, dequantized) * torch.tensor(F32(1.0) / s_y) + float(z_y)
    return torch.round(value).clamp_(-128, 127).to(torch.int64)


def _multiplier(real: float):
    """(Q31 multiplier, shift) of tflite::QuantizeMultiplier, as int64 scalars."""
    return quantize_multiplier(torch.tensor(real, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------
# HARD_SWISH: reference_ops::HardSwish (reference/hard_swish.h), int16 fixed point
# ---------------------------------------------------------------------------------------------------------
HARD_SWISH_HIRES = F32(1.0 / 128.0)           # HardSwishPrepare: hires_input_scale = s / 128
HARD_SWISH_RELUISH_SCALE = F32(3.0) / F32(32768.0)


def hard_swish_table(source: QParams, out: QParams) -> torch.Tensor:
    """HARD_SWISH with LiteRT's HardSwishPrepare: both real multipliers rounded to float32."""
    s, _ = _grid(source)
    s_y, _ = _grid(out)
    hires_scale = HARD_SWISH_HIRES * s
    return gemmlowp_hard_swish_table(source, out, float(F32(hires_scale / s_y)),
                                     float(F32(hires_scale / HARD_SWISH_RELUISH_SCALE)))


def gemmlowp_hard_swish_table(source: QParams, out: QParams, output_real: float, reluish_real: float):
    """reference_ops::HardSwish of every int8 code, given the output and "reluish" real multipliers."""
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    out_m32, out_exp = (int(v) for v in _multiplier(output_real))
    relu_m32, relu_exp = (int(v) for v in _multiplier(reluish_real))
    if out_exp > 0:
        raise UnsupportedOpError(f"hardswish from scale {float(s):.6g} to {float(s_y):.6g}: TFLite's HARD_SWISH "
                                 "refuses input/output scale ratios that need an output exponent > 0 (about 128 "
                                 "and above); widen the output range")
    if -out_exp > INT16_SHIFT_LIMIT or -relu_exp > INT16_SHIFT_LIMIT:
        raise UnsupportedOpError(f"hardswish from scale {float(s):.6g} to {float(s_y):.6g} needs an int16 right shift "
                                 f"above {INT16_SHIFT_LIMIT}, which qparity has not matched with LiteRT; narrow the "
                                 "output range")

    def to_int16(m: int) -> int:  # HardSwishPrepare's DownScaleInt32ToInt16Multiplier
        return 32767 if m >= 2**31 - 1 - (1 << 15) else (m + (1 << 15)) >> 16

    hires = (CODES - z) * 128  # |hires| <= 255 * 128 fits int16
    pre_out = saturating_rounding_doubling_high_mul(hires, torch.tensor(to_int16(out_m32)), bits=16)
    r = hires
    if relu_exp > 0:
        r = torch.clamp(r * (1 << (relu_exp - 1)), -32768, 32767)
    r = saturating_rounding_doubling_high_mul(r, torch.tensor(to_int16(relu_m32)), bits=16)
    if relu_exp > 0:
        r = torch.clamp(r * 2, -32768, 32767)
    if relu_exp < 0:
        r = rounding_divide_by_pot(r, torch.tensor(-relu_exp))
    r = (r + 32768) >> 1
    # gemmlowp SaturatingDoublingHighMul (no rounding): (a * b) / 2^15 truncated toward zero; saturates only
    # for -32768 * -32768
    product = r * pre_out
    truncated = torch.where(product < 0, -((-product) >> 15), product >> 15)
    pre = torch.where((r == -32768) & (pre_out == -32768), torch.full_like(r, 32767), truncated)
    result = rounding_divide_by_pot(pre, torch.tensor(-out_exp)) + z_y
    return result.clamp_(-128, 127)


# ---------------------------------------------------------------------------------------------------------
# LEAKY_RELU
# ---------------------------------------------------------------------------------------------------------
def tflite_leaky_relu_table(source: QParams, out: QParams, alpha: float) -> torch.Tensor:
    """reference_ops::QuantizeLeakyRelu with LeakyReluPrepare's multipliers, in float32."""
    s, _ = _grid(source)
    s_y, _ = _grid(out)
    return gemmlowp_leaky_relu_table(source, out, float(F32(s / s_y)), float(F32(F32(s * F32(alpha)) / s_y)))


def gemmlowp_leaky_relu_table(source: QParams, out: QParams, positive_real: float, negative_real: float):
    """reference_ops::QuantizeLeakyRelu: z_y + MBQM(x, QM(positive_real)) for x = q - z >= 0, else
    MBQM(x, QM(|negative_real|)) negated for a negative slope (QuantizeMultiplier is odd in its argument)."""
    _, z = _grid(source)
    _, z_y = _grid(out)
    x = CODES - z
    positive = multiply_by_quantized_multiplier(x, *_multiplier(positive_real))
    negative = multiply_by_quantized_multiplier(x, *_multiplier(abs(negative_real)))
    negative = -negative if negative_real < 0 else negative
    return (z_y + torch.where(x >= 0, positive, negative)).clamp_(-128, 127)


def xnnpack_leaky_relu_table(source: QParams, out: QParams, alpha: float) -> torch.Tensor:
    """qs8-vlrelu where the delegate takes the op (xnn_init_qs8_lrelu_scalar_params), else TFLite's kernel."""
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    positive_scale = s / s_y
    negative_scale = positive_scale * F32(alpha)
    accepted = (1 / 256 <= positive_scale <= 128 and -127.99609375 <= negative_scale <= 128
                and abs(negative_scale) >= 1 / 256)
    if not accepted:
        return tflite_leaky_relu_table(source, out, alpha)
    m_positive = int(np.rint(F32(256.0) * positive_scale))  # lrintf
    m_negative = int(np.rint(F32(256.0) * negative_scale))
    x = CODES - z
    multiplier = torch.where(x >= 0, m_positive, m_negative)
    return (((x * multiplier + 128) >> 8) + z_y).clamp_(-128, 127)


class LiteRTActivations:
    """What the `tflite` and `xnnpack` targets share about activations (a mixin of their Target classes); each
    names its own `transcendental_table` and `leaky_relu_table` rules."""

    def check_activation(self, kind: str, attrs: dict) -> None:
        _require_unit_alpha(kind, attrs)

    def activation_table(self, kind, source, out, attrs):
        if kind in ("sigmoid", "tanh", "gelu", "elu"):
            return self.transcendental_table(kind, source, out, attrs)
        if kind == "leaky_relu":
            return self.leaky_relu_table(source, out, attrs["negative_slope"])
        return super().activation_table(kind, source, out, attrs)

    def fixed_output_qparams(self, kind: str, dtype: str):
        # TFLite's int8 LOGISTIC requires output scale 1/256 (activations.cc SigmoidPrepare; zero point -128
        # by the converter's convention) and TANH uses 1/128, 0: models then run in every LiteRT configuration.
        return LITERT_FIXED_GRIDS.get(kind)

    def elementwise_hardswish(self, numel: int) -> bool:
        return True

    def hardswish(self, q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
        # XNNPACK refuses int8 HARD_SWISH and LiteRT's builtin kernel on x86 is the reference one, so both
        # LiteRT targets compute reference_ops::HardSwish.
        return hard_swish_table(source, out).to(q.device)[q - source.qmin]
