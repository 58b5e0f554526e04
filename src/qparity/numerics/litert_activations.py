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
  expf, tanhf and exp are glibc's; they are computed here in float64 and rounded to float32, which gave
  identical tables on 3,000 random grids.
- HARD_SWISH (XNNPACK refuses int8 HARD_SWISH, and on x86 the builtin kernel is the reference one, so both
  targets): int16 fixed point, see `hard_swish`.
- LEAKY_RELU, TFLite: z_y + MBQM(x, QM(f(s / s_y))) for x = q - z >= 0, else +-MBQM(x, QM(|f(f(s * alpha) / s_y)|)).
- LEAKY_RELU, XNNPACK: clamp(((x * m + 128) >> 8) + z_y), m = lrintf(256 * f(s / s_y) [* alpha]), where
  the delegate accepts the ratios (else the builtin kernel: the TFLite formula).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import UnsupportedOpError
from ..qparams import QParams

F32 = np.float32
CODES = np.arange(-128, 128, dtype=np.int64)
LITERT_FIXED_GRIDS = {"sigmoid": QParams(1.0 / 256.0, -128, "int8"), "tanh": QParams(1.0 / 128.0, 0, "int8")}


def _expf(x: np.float32) -> np.float32:
    return F32(math.exp(float(x))) if float(x) < 88.8 else F32(np.inf)


def _tanhf(x: np.float32) -> np.float32:
    return F32(math.tanh(float(x)))


def _round_half_away(x: float) -> float:
    return math.copysign(math.floor(abs(x) + 0.5), x)


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


def tflite_table(kind: str, source: QParams, out: QParams) -> torch.Tensor:
    """LUTPopulateInt8 with TFLite's transform: LOGISTIC or TANH of every int8 code."""
    transform = _tflite_sigmoid if kind == "sigmoid" else _tanhf
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    inverse = F32(1.0) / s_y
    table = [min(max(int(_round_half_away(float(F32(transform(F32(s * F32(v - z))) * inverse)))) + z_y, -128),
                 127) for v in range(-128, 128)]
    return torch.tensor(table, dtype=torch.int64)


def xnnpack_table(kind: str, source: QParams, out: QParams) -> torch.Tensor:
    """XNNPACK's qs8 sigmoid/tanh table, filled by its reference kernel."""
    transform = _xnnpack_sigmoid if kind == "sigmoid" else _tanhf
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    inverse = F32(1.0) / s_y
    table = []
    for v in range(-128, 128):
        y = F32(F32(transform(F32(F32(F32(v) - F32(z)) * s)) * inverse) + F32(z_y))
        table.append(int(min(max(np.rint(y), -128.0), 127.0)))
    return torch.tensor(table, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------
# gemmlowp fixed point on int64 numpy arrays carrying int16 / int32 values
# ---------------------------------------------------------------------------------------------------------
def _trunc_div(a, d):
    q = np.abs(a) // d
    return np.where(a < 0, -q, q)


def _wrap16(x):
    return ((np.asarray(x, np.int64) + 32768) & 0xFFFF) - 32768


def _wrap32(x):
    return ((np.asarray(x, np.int64) + 2**31) & 0xFFFFFFFF) - 2**31


def _srdhm(a, b, bits: int):
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    low = -(1 << (bits - 1))
    overflow = (a == b) & (a == low)
    product = a * b
    nudge = np.where(product >= 0, 1 << (bits - 2), 1 - (1 << (bits - 2)))
    result = _trunc_div(product + nudge, 1 << (bits - 1))
    result = _wrap16(result) if bits == 16 else result
    return np.where(overflow, -low - 1, result)


def _rounding_divide_by_pot(x, exponent: int, bits: int = 32):
    """x / 2^exponent rounded half away from zero; an int16 mask is computed in int16, as gemmlowp does."""
    x = np.asarray(x, np.int64)
    mask = (1 << exponent) - 1
    if bits == 16:
        mask = int(_wrap16(mask))
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> exponent) + (remainder > threshold).astype(np.int64)


def quantize_multiplier(real: float):
    """tflite::QuantizeMultiplier (quantization_util.cc): (Q31 multiplier, exponent)."""
    if real == 0.0:
        return 0, 0
    fraction, shift = math.frexp(real)
    fixed = int(_round_half_away(fraction * 2.0**31))
    if fixed == 2**31:
        fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    return fixed, shift


def _mbqm(x, multiplier: int, shift: int):
    left, right = max(shift, 0), max(-shift, 0)
    return _rounding_divide_by_pot(_srdhm(_wrap32(np.asarray(x, np.int64) * (1 << left)), multiplier, 32), right)


# ---------------------------------------------------------------------------------------------------------
# HARD_SWISH: reference_ops::HardSwish (reference/hard_swish.h), int16 fixed point
# ---------------------------------------------------------------------------------------------------------
def hard_swish_table(source: QParams, out: QParams) -> torch.Tensor:
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    hires_scale = F32(1.0 / 128.0) * s
    out_m32, out_exp = quantize_multiplier(float(F32(hires_scale / s_y)))
    relu_m32, relu_exp = quantize_multiplier(float(F32(hires_scale / (F32(3.0) / F32(32768.0)))))
    if out_exp > 0:
        raise UnsupportedOpError(f"hardswish from scale {float(s):.6g} to {float(s_y):.6g}: TFLite's HARD_SWISH "
                                 "refuses input/output scale ratios that need an output exponent > 0 (about 128 "
                                 "and above); widen the output range")

    def to_int16(m: int) -> int:  # HardSwishPrepare's DownScaleInt32ToInt16Multiplier
        return 32767 if m >= 2**31 - 1 - (1 << 15) else (m + (1 << 15)) >> 16

    out_m16, relu_m16 = to_int16(out_m32), to_int16(relu_m32)
    hires = _wrap16(_wrap16(CODES - z) * 128)
    pre_out = _srdhm(hires, out_m16, 16)
    r = hires
    if relu_exp > 0:
        r = np.clip(r * (1 << (relu_exp - 1)), -32768, 32767)
    r = _srdhm(r, relu_m16, 16)
    if relu_exp > 0:
        r = np.clip(r * 2, -32768, 32767)
    if relu_exp < 0:
        r = _rounding_divide_by_pot(r, -relu_exp, 16)
    r = (r + 32768) >> 1
    # SaturatingDoublingHighMul: (a * b) / 2^15 truncated toward zero; saturates only for -32768 * -32768
    pre = np.where((r == -32768) & (pre_out == -32768), 32767, _wrap16(_trunc_div(r * pre_out, 1 << 15)))
    result = _wrap16(_rounding_divide_by_pot(pre, -out_exp, 16) + z_y)
    return torch.from_numpy(np.clip(result, -128, 127).astype(np.int64))


# ---------------------------------------------------------------------------------------------------------
# LEAKY_RELU
# ---------------------------------------------------------------------------------------------------------
def tflite_leaky_relu_table(source: QParams, out: QParams, alpha: float) -> torch.Tensor:
    """reference_ops::QuantizeLeakyRelu with LeakyReluPrepare's multipliers."""
    s, z = _grid(source)
    s_y, z_y = _grid(out)
    alpha = F32(alpha)
    m_alpha, shift_alpha = quantize_multiplier(float(F32(F32(s * alpha) / s_y)))
    m_identity, shift_identity = quantize_multiplier(float(F32(s / s_y)))
    x = CODES - z
    positive = _mbqm(x, m_identity, shift_identity)
    negative = _mbqm(x, abs(m_alpha), shift_alpha)
    negative = -negative if m_alpha < 0 else negative
    return torch.from_numpy(np.clip(z_y + np.where(x >= 0, positive, negative), -128, 127).astype(np.int64))


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
    m_positive = int(np.rint(F32(256.0) * positive_scale))
    m_negative = int(np.rint(F32(256.0) * negative_scale))
    x = CODES - z
    multiplier = np.where(x >= 0, m_positive, m_negative)
    return torch.from_numpy(np.clip(((x * multiplier + 128) >> 8) + z_y, -128, 127).astype(np.int64))


class LiteRTActivations:
    """What the `tflite` and `xnnpack` targets share about activations (a mixin of their Target classes)."""

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
