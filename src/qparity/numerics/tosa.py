"""Target `tosa`: TOSA 1.0's integer operators, as Arm's compiler (ExecuTorch's Arm backend) lowers a model.

TOSA defines every integer exactly (tosa-specification, pseudocode/library/scale_helpers.tosac and
pseudocode/operators/*.tosac); what is left to a compiler is which RESCALE each layer gets. The choices
below are those of ExecuTorch's Arm backend (executorch 1.5.1, backends/arm/):

- RESCALE(v, M, z_in, z_out) = clamp(z_out + apply_scale_32(v - z_in, m, shift, SINGLE_ROUND)), with
  apply_scale_32 = (v * m + 2^(shift - 1)) >> shift (round half up) and (m, shift) from the double scale
  M: frexp, m = round_half_even(mantissa * 2^31) (Python's round), shift = 31 - exponent, capped at 62
  (operators/op_tosa_rescale.py `_compute_multiplier_and_shift`). Every RESCALE the backend emits is
  SINGLE_ROUND (RescaleVisitor.define_node), so DOUBLE_ROUND is never used.
- quantize:    the TOSA graph takes int8 codes; qparity quantizes on the host as `exact`: rhe(x / s) + z
- conv/linear: exact int32 accumulator + int32 bias, then RESCALE(acc, M = s_x s_w / s_y, 0, z_y) per output
  channel (_passes/rewrite_conv_pass.py insert_output_rescale: (s_in * s_w) / s_out in double); linear runs
  as a 1x1 CONV2D (_passes/decompose_linear_pass.py)
- add / sub:   both inputs RESCALEd to int32 at S = 2 max(s_a, s_b) / 2^20 (M_i = s_i / S), ADD / SUB in
  int32, RESCALE(sum, S / s_y, 0, z_y) (_passes/insert_rescales_pass.py InsertRescaleInt32Pass)
- mul:         both inputs RESCALEd to int32 with M = 1 (the zero points removed), MUL with shift 0, then
  RESCALE(product, (s_a s_b) / s_y, 0, z_y) (the same pass)
- rescale:     RESCALE(q, s / s_y, z, z_y) (cat inputs on other grids)
- average:     AVG_POOL2D: apply_scale_32(sum(q - z), reciprocal_scale(count)) + z, clamped, where
               reciprocal_scale(c) = (((2^30 + 1) << k) // c, 30 + k), k = ceil(log2(c))
- matmul:      MATMUL of the int8 codes with both zero points (exact int32 sums of (q_a - z_a)(q_b - z_b)),
               then RESCALE(acc, (s_a s_b) / s_y in double, 0, z_y) (_passes/rewrite_matmul.py
               RewriteMatmulPass._insert_output_rescale)
- mean:        RESCALE to int32 with M = 1 (the zero point removed), REDUCE_SUM per reduced axis (exact int32),
               then one RESCALE(sum, s_x / (count s_y), 0, z_y). Arm's backend instead requantizes the sum to
               int8 on the grid (count s_x, z_x) and multiplies by a quantized constant 1 / count
               (_passes/decompose_meandim_pass.py), two roundings whose constant grid its quantizer picks;
               qparity writes the one-rounding program, which TOSA defines exactly and the file carries
- softmax:     TOSA has no softmax, and Arm's backend decomposes it (_passes/decompose_softmax_pass.py) into
               amax, sub, an exp TABLE, REDUCE_SUM, a reciprocal TABLE and mul, each onto an int8 grid its
               quantizer observed: a program of intermediate grids qparity's one softmax node does not have.
               qparity writes its own exact int32 program of TOSA operators instead, on the output grid
               (1/256, -128) as TFLite's: k = REDUCE_MAX(q) - q in [0, 255]; e = GATHER of the int32 table
               E[k] = rhe(2^16 exp(-k s)) (float64, computed on the host: data in the file); S = REDUCE_SUM(e);
               code = clamp(-128 + INTDIV(256 e + (S >> 1), S)) = round half up of 256 e / S, minus 128
- clamp, max pool, pad, reshapes, amax, nearest upsampling: exact on codes (CLAMP, MAX_POOL2D, PAD with the
               zero point, REDUCE_MAX, RESIZE NEAREST with Arm's integer-factor parameters)
- parameter:   a CONST of its int8 codes (quantized on the host as `exact`, as the input)
- sigmoid, tanh, hardsigmoid, hardswish, leaky_relu, gelu, elu: a TABLE of 256 int8 codes, each
  quantize(f(dequantize(code))) with torch's float32 f and the decomposed quantized ops' formulas:
  (q - z) * s, then clamp(round_half_even(y * (1 / s)) + z) (_passes/insert_table_ops.py
  generate_8bit_table_values; torch/ao/quantization/fx/_decomposed.py). The table is data in the file, so
  the integer program is a lookup whatever the host's libm gives
- rsqrt:       a TABLE built the same way from torch.rsqrt (insert_table_ops.py maps aten.rsqrt to torch.rsqrt):
               entry(code) = clamp(round_half_even(float32 rsqrt((code - z) * s) * (1 / s_y)) + z_y); the code of
               real 0 gives rsqrt = inf and so the top code

apply_scale_32 REQUIREs -2^(shift - 1) <= v < 2^(shift - 1); a value outside that range makes the TOSA
program invalid (the reference model refuses it), so qparity raises instead of computing it.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

from ..errors import InvalidParameterError, UnsupportedOpError
from ..qparams import QParams
from .activations import codes, real_function
from .arithmetic import INT32_MAX, INT32_MIN, ShiftRequantizer
from .layout import flat_view
from .target import Target, channel_view, grid_views

ADD_LEFT_SHIFT = 20  # InsertRescaleInt32Pass: int8 operands scaled up by 2^20 before the int32 ADD
MAX_SHIFT = 62
SOFTMAX_GRID = QParams(1.0 / 256.0, -128, "int8")
SOFTMAX_EXP_BITS = 16  # E[0] = 2^16: a row of up to 2^14 entries keeps 256 e + S/2 and S below 2^31
SOFTMAX_MAX_ROW = 1 << 14


def rescale_parameters(scale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """RESCALE's (multiplier, shift) for double scales, as ExecuTorch's `_compute_multiplier_and_shift`
    (scale width 32): M ~= multiplier * 2^-shift, multiplier in [2^30, 2^31) unless the shift is capped."""
    multipliers, shifts = [], []
    for value in scale.to(torch.float64).reshape(-1).tolist():
        mantissa, exponent = math.frexp(value)
        multiplier = round(mantissa * (1 << 31))  # Python's round: half to even, as the backend's
        if multiplier == 1 << 31:
            multiplier //= 2
            exponent += 1
        shift = 31 - exponent
        if shift > MAX_SHIFT:
            multiplier >>= min(31, shift - MAX_SHIFT)
            shift = MAX_SHIFT
        if shift < 2:
            raise InvalidParameterError(
                f"a TOSA RESCALE by {value!r} needs a shift of {shift}; TOSA requires 2 <= shift <= 62 "
                "(scales below 2^29): widen the output range")
        multipliers.append(multiplier)
        shifts.append(shift)
    shape = scale.shape
    return (torch.tensor(multipliers, dtype=torch.int64).reshape(shape),
            torch.tensor(shifts, dtype=torch.int64).reshape(shape))


def apply_scale_32(value: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """TOSA's apply_scale_32 with single rounding: (v * m + 2^(shift - 1)) >> shift, int64 tensors.

    |v| < 2^31 and m < 2^31 keep v * m + 2^61 inside int64.
    """
    multiplier, shift = multiplier.to(value.device), shift.to(value.device)
    require_within_shift(value, shift)
    return (value * multiplier + (torch.ones_like(shift) << (shift - 1))) >> shift


def require_within_shift(value: torch.Tensor, shift: torch.Tensor) -> None:
    """Raise InvalidParameterError unless -2^(shift - 1) <= value < 2^(shift - 1) (apply_scale_32's REQUIRE),
    with `shift` broadcasting against `value`. One min/max pass decides the common case: every value within
    the narrowest channel's range."""
    if not value.numel():
        return
    smallest = int(shift.min())
    # over the elements in memory order: PyTorch's full reduction of a channels-last tensor copies it to NCHW first
    low, high = (int(v) for v in torch.aminmax(flat_view(value)))
    if -(1 << (smallest - 1)) <= low and high < 1 << (smallest - 1):
        return
    limit = torch.ones_like(shift) << (shift - 1)
    if bool(((value < -limit) | (value >= limit)).any()):
        worst = int(value.abs().max())
        raise InvalidParameterError(
            f"a TOSA RESCALE with shift {smallest} takes values in [-2^{smallest - 1}, 2^{smallest - 1}) only "
            f"(apply_scale_32's REQUIRE), and |value| reaches {worst}: the scale s_in / s_out is too large for "
            "these inputs; widen the output range")


def rescale(value: torch.Tensor, scale: torch.Tensor, input_zp: int, output_zp: int, lo: int, hi: int,
            channel_axis: int = 0) -> torch.Tensor:
    """RESCALE (SINGLE_ROUND) of int64 values by the double `scale` (a scalar, or one per channel along
    `channel_axis`), then the output zero point and the clamp to [lo, hi]."""
    multiplier, shift = rescale_parameters(scale)
    multiplier = channel_view(multiplier, value.dim(), channel_axis)
    shift = channel_view(shift, value.dim(), channel_axis)
    centered = value - input_zp
    require_within_shift(centered, shift.to(value.device))
    return ShiftRequantizer.single_rounding(multiplier, shift, output_zp, lo, hi)(centered)


def reciprocal_scale(count: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """TOSA's reciprocal_scale (scale_helpers.tosac): (1 << k) / 2 < count <= (1 << k)."""
    count = count.to(torch.int64)
    k = torch.ceil(torch.log2(count.to(torch.float64))).to(torch.int64)
    k = torch.where((torch.ones_like(k) << k) < count, k + 1, k)  # log2's float error, never below count
    k = torch.where(count == 1, torch.zeros_like(k), k)
    multiplier = (torch.full_like(k, (1 << 30) + 1) << k) // count
    return multiplier, 30 + k


def add_scales(a: QParams, b: QParams, out: QParams):
    """The three RESCALE scales of an int8 ADD / SUB: input a, input b (to int32 at S), the int32 sum."""
    common = 2.0 * max(float(a.scale), float(b.scale)) / (1 << ADD_LEFT_SHIFT)
    return (torch.tensor(float(a.scale) / common, dtype=torch.float64),
            torch.tensor(float(b.scale) / common, dtype=torch.float64),
            torch.tensor(common / float(out.scale), dtype=torch.float64))


def table(function, source: QParams, out: QParams) -> torch.Tensor:
    """TABLE's int8 entries for every code of `source` (ExecuTorch's generate_8bit_table_values)."""
    scale, zero_point = float(source.scale), int(source.zero_point)
    real = (codes(source).to(torch.float32) - zero_point) * scale
    result = function(real)
    quantized = torch.round(result * (1.0 / float(out.scale))) + int(out.zero_point)
    return torch.clamp(quantized, out.qmin, out.qmax).to(torch.int64)


def layer_scale(input_scale: torch.Tensor, weight_scale: torch.Tensor, output_scale: torch.Tensor) -> torch.Tensor:
    """(s_in * s_w) / s_out in double, per output channel (rewrite_conv_pass.py insert_output_rescale)."""
    return input_scale.to(torch.float64) * weight_scale.to(torch.float64) / output_scale.to(torch.float64)


def multiply_scale(a: QParams, b: QParams, out: QParams) -> torch.Tensor:
    """The RESCALE scale of an int32 product: math.prod(s_a, s_b) / s_y in double (InsertRescaleInt32Pass)."""
    return torch.tensor(float(a.scale) * float(b.scale) / float(out.scale), dtype=torch.float64)


def mean_scale(count: int, source: QParams, out: QParams) -> torch.Tensor:
    """The RESCALE scale of a mean's int32 sum: s_x / (count s_y), in double."""
    return torch.tensor(float(source.scale) / (count * float(out.scale)), dtype=torch.float64)


def softmax_exp_table(source: QParams) -> torch.Tensor:
    """E[k] = rhe(2^16 exp(-k s)) for k = max(q) - q in 0..255: the int32 table the softmax GATHERs."""
    k = torch.arange(256, dtype=torch.float64)
    return torch.round(torch.exp(-k * float(source.scale)) * (1 << SOFTMAX_EXP_BITS)).to(torch.int64)


def softmax(q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
    """qparity's TOSA softmax program (module docstring): int32 exp table, REDUCE_SUM, INTDIV rounding half up."""
    if q.shape[-1] > SOFTMAX_MAX_ROW:
        raise InvalidParameterError(f"a softmax over {q.shape[-1]} entries on target 'tosa': its int32 sums hold "
                                    f"rows of at most {SOFTMAX_MAX_ROW}; split the row")
    e = softmax_exp_table(source).to(q.device)[q.amax(-1, keepdim=True) - q]
    total = e.sum(-1, keepdim=True)
    quotient = torch.div(e * 256 + (total >> 1), total, rounding_mode="floor")  # INTDIV: positive operands
    return quotient.add_(int(out.zero_point)).clamp_(out.qmin, out.qmax)


class TosaTarget(Target):
    name = "tosa"
    file_format = ".tosa"
    summary = "TOSA 1.0 integer operators as ExecuTorch's Arm backend lowers them: RESCALE, single rounding"
    activation_dtypes = ("int8",)

    def quantize_unclamped(self, x, qp):
        # The TOSA graph starts at int8 codes; quantizing is the host's: round half even of x / s (float64
        # division of float32 values decides ties exactly, see ExactTarget).
        scale, zero_point = grid_views(qp, x)
        return torch.round(x.to(torch.float32).to(torch.float64) / scale.to(torch.float64)) + zero_point

    def check_softmax(self, attrs):
        length = attrs.get("length", 0)
        if length > SOFTMAX_MAX_ROW:
            raise UnsupportedOpError(f"a softmax over {length} entries: qparity's TOSA softmax sums rows of at most "
                                     f"{SOFTMAX_MAX_ROW} in int32; target 'tflite' runs it")

    def check_broadcast(self, op):
        if op == "matmul":
            raise UnsupportedOpError("a matmul whose batch dimensions broadcast: TOSA's MATMUL takes equal batch "
                                     "dimensions (expand the operands to one shape first); target 'tflite' runs it "
                                     "(BATCH_MATMUL broadcasts them)")

    def accumulation(self, geometry, weight_shape):
        # TOSA has CONV2D and DEPTHWISE_CONV2D (one input channel per group) only; ExecuTorch splits other grouped
        # convs into one conv per group (decompose_grouped_conv_pass.py), which qparity's exporter does not.
        if geometry.groups > 1 and weight_shape[1] != 1:
            raise UnsupportedOpError(
                f"a conv with groups={geometry.groups} and {weight_shape[1]} input channels per group on target "
                "'tosa': TOSA has CONV2D (groups=1) and DEPTHWISE_CONV2D (one input channel per group) only; use "
                "one of those, or another target (docs/ops.md lists the targets that run conv2d)")
        return "exact"

    def accumulator_left_shift(self, op, input_qp, weight_scale, output_qp):
        # apply_scale_32 REQUIREs |acc| < 2^(shift - 1), i.e. |acc| * 2^(32 - shift) < 2^31: the overflow check
        # of a left shift by 32 - shift (0 for the usual shifts >= 32, multipliers below 1/2).
        _, shift = rescale_parameters(layer_scale(input_qp.scale, weight_scale, output_qp.scale))
        return torch.clamp(32 - shift.reshape(-1), min=0)

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        multiplier, shift = rescale_parameters(layer_scale(input_qp.scale, weight_scale, output_qp.scale))
        multiplier = channel_view(multiplier, ndim, channel_axis)
        shift = channel_view(shift, ndim, channel_axis)
        # apply_scale_32, the zero point and RESCALE's int8 clip, then CLAMP (one clamp): one multiply-add
        fused = ShiftRequantizer.single_rounding(multiplier, shift, int(output_qp.zero_point), lo, hi)

        def requantize(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            require_within_shift(acc, fused.shift.to(acc.device))
            return fused(acc, dtype)

        return requantize

    add_from_code_terms = True  # a RESCALE to int32 per input, ADD, a RESCALE of the sum

    def elementwise_add(self, shape_a, shape_b):
        return True

    def add(self, qa, a, qb, b, out, lo, hi):
        return self._add(qa, a, qb, b, out, lo, hi, sign=1)

    def subtract(self, qa, a, qb, b, out, lo, hi):
        return self._add(qa, a, qb, b, out, lo, hi, sign=-1)

    def _add(self, qa, a, qb, b, out, lo, hi, sign):
        scale_a, scale_b, scale_sum = add_scales(a, b, out)
        wide_a = rescale(qa, scale_a, int(a.zero_point), 0, INT32_MIN, INT32_MAX)
        wide_b = rescale(qb, scale_b, int(b.zero_point), 0, INT32_MIN, INT32_MAX)
        return rescale(wide_a + sign * wide_b, scale_sum, 0, int(out.zero_point), lo, hi)

    def multiply(self, qa, a, qb, b, out, lo, hi):
        one = torch.tensor(1.0, dtype=torch.float64)
        wide_a = rescale(qa, one, int(a.zero_point), 0, INT32_MIN, INT32_MAX)
        wide_b = rescale(qb, one, int(b.zero_point), 0, INT32_MIN, INT32_MAX)
        return rescale(wide_a * wide_b, multiply_scale(a, b, out), 0, int(out.zero_point), lo, hi)

    def rescale(self, q, source, out):
        if source.same_grid(out):
            return q
        scale = torch.tensor(float(source.scale) / float(out.scale), dtype=torch.float64)
        return rescale(q, scale, int(source.zero_point), int(out.zero_point), out.qmin, out.qmax)

    def matmul_requantizer(self, a, b, out, lo, hi, ndim):
        return self.requantizer("matmul", a, b.scale, out, lo, hi, 0, ndim)  # (s_a s_b) / s_y, as conv's

    def mean(self, q, source, out, dims, keepdim):
        count = math.prod(q.shape[d] for d in dims)
        sums = (q - int(source.zero_point)).sum(dims, keepdim=keepdim)
        return rescale(sums, mean_scale(count, source, out), 0, int(out.zero_point), out.qmin, out.qmax)

    def average(self, sums, counts, qp):
        multiplier, shift = reciprocal_scale(counts)
        scaled = apply_scale_32(sums, multiplier, shift)
        return scaled.add_(int(qp.zero_point)).clamp_(qp.qmin, qp.qmax)

    def fixed_output_qparams(self, kind, dtype):
        return SOFTMAX_GRID if kind == "softmax" else None

    softmax = staticmethod(softmax)

    def activation_table(self, kind, source, out, attrs):
        return table(torch.rsqrt if kind == "rsqrt" else real_function(kind, attrs), source, out)

    def elementwise_hardswish(self, numel):
        return True

    def hardswish(self, q, source, out):
        return table(F.hardswish, source, out).to(q.device)[q - source.qmin]
