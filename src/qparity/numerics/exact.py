"""Target `exact`: the analytical answer, with no float error anywhere.

Every result is round-half-even of an exact rational, then clamped:
- quantize:    q = clamp(z + rhe(x / s))
- conv/linear: q = clamp(z_y + rhe((acc + bias) * s_x * s_w / s_y))
- add:         q = clamp(z_y + rhe(((q_a - z_a) * s_a + (q_b - z_b) * s_b) / s_y))
- sub:         q = clamp(z_y + rhe(((q_a - z_a) * s_a - (q_b - z_b) * s_b) / s_y))
- mul:         q = clamp(z_y + rhe((q_a - z_a) * (q_b - z_b) * s_a * s_b / s_y))
- rescale:     q = clamp(z_y + rhe((q - z) * s / s_y))
- average:     q = z + rhe(sum(q - z) / count)
- bilinear:    q = z + rhe(sum of w (q - z)), w PyTorch's interpolation weights as exact rationals
- rsqrt:       q = clamp(z_y + rhe(1 / (s_y sqrt(x)))), decided on the rational square; x = 0 gives qmax
- mean:        q = clamp(z_y + rhe(sum(q - z) * s / (n * s_y))), n the number of elements averaged
- hardswish:   q = clamp(z_y + rhe(h(x) / s_y)), x = (q - z) * s, h(x) = x * clamp(x + 3, 0, 6) / 6 (rational in x)
- sigmoid, tanh, hardsigmoid, leaky_relu, gelu, elu: q = clamp(z_y + rhe(g(x) / s_y)), correctly rounded
  (numerics/activations.py: Fractions for the rational ones, mpmath with a proven margin otherwise)
- prelu:       q = clamp(z_y + rhe(x / s_y or x a / s_y)), a the slope on its int8 grid (numerics/prelu.py)
- matmul:      q = clamp(z_y + rhe(sum_k (q_a - z_a)(q_b - z_b) * s_a * s_b / s_y)), as conv/linear
- softmax:     q = clamp(z_y + rhe(y_i / s_y)), y_i = 1 / sum_j exp((q_j - q_i) s), correctly rounded
  (numerics/softmax.py: a tie only where the row is constant, decided with Fractions; mpmath near ties)
The scales are float32 values taken at their exact binary value.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..qparams import QParams
from . import resampling
from .activations import exact_table
from .prelu import exact_prelu
from .rsqrt import exact_rsqrt_table
from .softmax import exact_softmax
from .arithmetic import ExactRatio, round_half_even_div, round_half_even_exact
from .target import Target, channel_view, grid_views


class ExactTarget(Target):
    name = "exact"
    summary = "round half to even of the exact rational value; no float error"
    activation_dtypes = ("int8", "uint8")
    uneven_adaptive_pool = True

    def quantize_unclamped(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        # x / s in float64 for float32 x and s decides rounding exactly: the exact quotient of two 24-bit
        # mantissas is either a tie itself (representable in float64) or at least 2^-26 relative away from
        # one, far above float64's 2^-53 rounding error. tests/test_numerics_exact.py checks this against Fractions.
        scale, zero_point = grid_views(qp, x)
        scale = scale.to(torch.float64)
        return torch.round(x.to(torch.float32).to(torch.float64) / scale) + zero_point

    def requantizer(self, op, input_qp, weight_scale, output_qp, lo, hi, channel_axis, ndim):
        ratio = ExactRatio.of_scales([input_qp.scale, weight_scale], [output_qp.scale])
        if ratio.estimate.dim():
            ratio = ratio.reshape(*channel_view(ratio.estimate, ndim, channel_axis).shape)
        zero_point = int(output_qp.zero_point)

        def requantize(acc: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return round_half_even_exact([(acc, ratio)], lo - zero_point, hi - zero_point, zero_point=zero_point,
                                         dtype=dtype)

        return requantize

    add_from_code_terms = True  # each input's product (q - z) * s / s_y once per code, one exact rounding of the sum

    def elementwise_add(self, shape_a, shape_b):
        return True

    def add(self, qa, a, qb, b, out, lo, hi):
        za, zb, zy = int(a.zero_point), int(b.zero_point), int(out.zero_point)
        terms = [(qa - za, ExactRatio.of_scales([a.scale], [out.scale])),
                 (qb - zb, ExactRatio.of_scales([b.scale], [out.scale]))]
        k_max = (a.qmax - a.qmin, b.qmax - b.qmin)  # |q - z| never exceeds the dtype's span
        return round_half_even_exact(terms, lo - zy, hi - zy, k_max, zero_point=zy)

    def subtract(self, qa, a, qb, b, out, lo, hi):
        return self.add(qa, a, 2 * int(b.zero_point) - qb, b, out, lo, hi)  # q_b - z_b negated, on b's grid

    def multiply(self, qa, a, qb, b, out, lo, hi):
        zy = int(out.zero_point)
        product = (qa - int(a.zero_point)) * (qb - int(b.zero_point))
        ratio = ExactRatio.of_scales([a.scale, b.scale], [out.scale])
        k_max = ((a.qmax - a.qmin) * (b.qmax - b.qmin),)
        return round_half_even_exact([(product, ratio)], lo - zy, hi - zy, k_max, zero_point=zy)

    def rescale(self, q, source, out):
        zy = int(out.zero_point)
        ratio = ExactRatio.of_scales([source.scale], [out.scale])
        return round_half_even_exact([(q - int(source.zero_point), ratio)], out.qmin - zy, out.qmax - zy,
                                     zero_point=zy)

    def bilinear(self, codes, qp, out_hw, align_corners):
        return resampling.exact_bilinear(codes, int(qp.zero_point), out_hw, align_corners)
    def mean(self, q, source, out, dims, keepdim):
        count = math.prod(q.shape[d] for d in dims)
        sums = (q - int(source.zero_point)).sum(dims, keepdim=keepdim)
        ratio = ExactRatio.of_scales([source.scale], [out.scale], divisor=count)
        zy = int(out.zero_point)
        return round_half_even_exact([(sums, ratio)], out.qmin - zy, out.qmax - zy, zero_point=zy)

    def average(self, sums, counts, qp):
        return int(qp.zero_point) + round_half_even_div(sums, counts)

    def activation_table(self, kind, source, out, attrs):
        if kind == "rsqrt":
            return exact_rsqrt_table(source, out)
        return exact_table(kind, attrs, source, out)

    prelu = staticmethod(exact_prelu)
    softmax = staticmethod(exact_softmax)

    def matmul_requantizer(self, a, b, out, lo, hi, ndim):
        return self.requantizer("matmul", a, b.scale, out, lo, hi, 0, ndim)

    def elementwise_hardswish(self, numel):
        return True

    def hardswish(self, q, source, out):
        # One exact rational per input code (at most 256), then a gather: Python's round() on a Fraction
        # rounds half to even.
        s, s_y = Fraction(float(source.scale)), Fraction(float(out.scale))
        z, z_y = int(source.zero_point), int(out.zero_point)
        table = []
        for code in range(source.qmin, source.qmax + 1):
            x = (code - z) * s
            value = z_y + round(x * min(max(x + 3, 0), 6) / 6 / s_y)
            table.append(min(max(value, out.qmin), out.qmax))
        return torch.tensor(table, dtype=torch.int64, device=q.device)[q - source.qmin]
