"""The `fbgemm`, `x86` and `qnnpack` targets' conv/linear layers on the engine's own quantized kernels
(IntegerModel only).

Those targets are defined as what PyTorch's quantized engine computes (pytorch_engines.py emulates
`quantized::conv2d` / `quantized::linear` step by step, and tests/test_numerics_pytorch_engines.py holds the
emulation to the real kernels with torch.equal). Where the real kernel is provably the one the target
describes, the IntegerModel runs it instead of the emulation: one kernel per layer, accumulation and
requantization included, on qparity's own codes, weights, float bias and grids. That is the case when:

- the installed PyTorch is the release the target reproduces (`PyTorchKernels.release`: the requantization
  rules changed between releases);
- fbgemm, x86: the CPU sums u8 x s8 products in int32 without an int16 step (VNNI or AMX,
  `int32_dot_products`): on older CPUs fbgemm's GEMM (vpmaddubsw) saturates pairs of products, which the targets
  do not model. QNNPACK widens (q - z) to int16 and multiplies-adds pairs into int32 (q8gemm/q8conv/q8dwconv
  SSE2 and NEON kernels, _mm_madd_epi16: |2 * 255 * 255| fits), exact on every CPU;
- qnnpack: the int32 sum of the accumulator and the bias code cannot wrap (`qnnpack_bias_fits`): QNNPACK adds
  the bias code in int32 before its float conversion, the emulation in float64;
- the layer is a conv2d whose accumulator the target computes exactly (its "float32" plan: not fbgemm's
  saturating depthwise kernels, which keep the emulation), or a linear;
- the result's memory layout is the emulation's (channels-last; the shapes whose strides are ambiguous, one
  channel or a 1x1 image, are declined), because later kernels of these engines choose their loops by it.

A fused ReLU runs in the kernel (conv2d_relu / linear_relu); another fused clamp (ReLU6, ...) is applied to
the codes afterwards: the engine saturates to [0, 255] and rounding is monotone, so clamp(saturate(q), lo, hi)
is the emulation's clamp(q, lo, hi). engine_program.py chains these layers on quint8 tensors.
The fake-quant forward keeps the emulation; the fake == integer property tests hold the two equal.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Optional

import torch

from .accumulate import FLOAT32_EXACT, AccumulationPlan, ConvGeometry
from .int8_accumulate import int32_dot_products
from .pytorch_engines import bias_in_accumulator_units
from .pytorch_versions import release_of


class EngineLayer:
    """One conv/linear layer on the engine's kernel: `on_quantized` maps the input's quint8 tensor to the
    output's (engine_program.py chains these), calling it on int64 codes returns int64 codes (the emulation's
    executor); both return None for the shapes the kernel declines."""

    def __init__(self, kind: str, packed, input_qp, output_qp, out_channels: int, lo: int, hi: int):
        self.kind, self.packed, self.out_channels = kind, packed, out_channels
        self.scale_x, self.zero_x = float(input_qp.scale), int(input_qp.zero_point)
        self.scale_y, self.zero_y = float(output_qp.scale), int(output_qp.zero_point)
        self.lo, self.hi = lo, hi
        # A fused ReLU is the kernels' own (conv2d_relu / linear_relu clamp their saturated codes at z_y:
        # fbgemm's ReQuantizeOutput FUSE_RELU, oneDNN's relu post-op before the output scale, which maps every
        # negative value to z_y, QNNPACK's output_min = z_y from activationLimits); any other clamp is applied
        # to the codes afterwards.
        relu = (lo, hi) == (self.zero_y, 255)
        self.clamp = None if relu or (lo, hi) == (0, 255) else (lo, hi)
        ops = torch.ops.quantized  # the overloads themselves: the packet's per-call overload resolution is slower
        if kind == "linear":
            self.kernel = (ops.linear_relu if relu else ops.linear).default
        else:
            self.kernel = (ops.conv2d_relu if relu else ops.conv2d).new  # (qx, packed weight, scale, zero point)

    def on_quantized(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The output quint8 tensor for the quint8 input `x` (on the input grid), or None where declined."""
        if self.kind == "linear":
            if x.dim() != 2 or not x.shape[0]:
                return None
            result = self.kernel(x.contiguous(), self.packed, self.scale_y, self.zero_y)
        else:
            n, channels, height, width = x.shape
            if not n or 1 in (channels, self.out_channels, height * width):
                return None  # strides the emulation may leave NCHW (int8_accumulate.py)
            result = self.kernel(x.contiguous(memory_format=torch.channels_last), self.packed, self.scale_y,
                                 self.zero_y)
            if result.shape[2] * result.shape[3] == 1:
                return None
        if self.clamp is None:
            return result
        codes = result.int_repr().clamp_(*self.clamp)
        return torch._make_per_tensor_quantized_tensor(codes, self.scale_y, self.zero_y)

    def __call__(self, codes: torch.Tensor) -> Optional[torch.Tensor]:
        x = torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), self.scale_x, self.zero_x)
        result = self.on_quantized(x)
        if result is None:
            return None
        codes = result.int_repr().to(torch.int64)
        return codes if self.kind == "linear" else codes.contiguous(memory_format=torch.channels_last)


def _exact_in_int32(engine: str, plan: AccumulationPlan) -> bool:
    """Whether the engine's int32 accumulator holds this layer's sums exactly, as the emulation's plan does.

    fbgemm's and oneDNN's VNNI/AMX GEMMs sum u8 x s8 products in int32 (the zero point's row sums too, each
    bounded like the accumulator), so below 2^31 they give the exact integer any plan of the emulation computes
    (float32, chunks of float32 or float64): the requantization after it is then the same function. fbgemm's
    saturating int16-pair kernels are the emulation's "int16_pairs" plan and keep it. QNNPACK's int32 sum of
    accumulator and bias is checked by qnnpack_bias_fits for accumulators below 2^24, so qnnpack keeps that plan.
    """
    if engine == "qnnpack":
        return plan.path == "float32"
    return plan.path in ("float32", "chunks", "float64") and plan.bound < 2**31


def engine_layer(target, plan: AccumulationPlan, geometry: ConvGeometry, weight_codes: torch.Tensor,
                 weight_scale: torch.Tensor, bias: Optional[torch.Tensor], input_qp, output_qp, lo: int, hi: int
                 ) -> Optional[EngineLayer]:
    """The layer on the engine's kernel (an EngineLayer), or None where that kernel is not provably the
    target's here."""
    engine = engine_of(target)
    if (engine is None or not _exact_in_int32(engine, plan) or geometry.kind not in ("conv2d", "linear")
            or isinstance(geometry.padding, str) or input_qp.dtype != "uint8" or output_qp.dtype != "uint8"
            or weight_codes.device.type != "cpu"):
        return None
    if engine == "qnnpack":
        if not qnnpack_bias_fits(bias, input_qp, weight_scale):
            return None
    elif not int32_dot_products():
        return None
    scale_w = weight_scale.detach().to(torch.float64)
    weight = weight_codes.detach().to(torch.int8)
    if scale_w.dim() == 0:
        qweight = torch._make_per_tensor_quantized_tensor(weight, float(scale_w), 0)
    else:
        qweight = torch._make_per_channel_quantized_tensor(weight, scale_w.reshape(-1),
                                                           torch.zeros(weight.shape[0], dtype=torch.int64), 0)
    bias = None if bias is None else bias.detach().to(torch.float32).reshape(-1)
    with engine_selected(engine):
        if geometry.kind == "linear":
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
        else:
            packed = torch.ops.quantized.conv2d_prepack(qweight, bias, list(geometry.stride),
                                                        list(geometry.padding), list(geometry.dilation),
                                                        geometry.groups)
    return EngineLayer(geometry.kind, packed, input_qp, output_qp, weight.shape[0], lo, hi)


def qnnpack_bias_fits(bias: Optional[torch.Tensor], input_qp, weight_scale: torch.Tensor) -> bool:
    """Whether acc + bias code stays inside int32 for every accumulator the "float32" plan allows (|acc| < 2^24):
    QNNPACK quantizes the float bias at P = s_x * s_w (quant_utils::QuantizeBias) and adds it in int32."""
    if bias is None:
        return True
    product = input_qp.scale.to(torch.float32) * weight_scale.detach().to(torch.float32)
    codes = bias_in_accumulator_units("qnnpack", bias.detach().to(torch.float32).reshape(-1), product.reshape(-1))
    return bool((codes.abs() < 2.0**31 - FLOAT32_EXACT).all())


def engine_of(target) -> Optional[str]:
    """The quantized engine whose kernels are this target's layers here, or None."""
    if target.name not in ("fbgemm", "x86", "qnnpack") or target.name not in torch.backends.quantized.supported_engines:
        return None
    kernels = getattr(target, "kernels", None)
    if kernels is None or kernels.release != release_of(torch.__version__):
        return None
    return target.name


# torch.backends.quantized.engine is one setting for the whole process: a run that selected qnnpack would get x86's
# add and pools halfway through if another thread restored its own setting meanwhile (tests/test_models.py runs
# one IntegerModel from several threads). Runs that select an engine take turns; each kernel still uses PyTorch's
# intra-op threads.
_ENGINE_SETTING = threading.RLock()


@contextmanager
def engine_selected(engine: str):
    """Run (or pack) with `engine`, leaving the caller's setting as it was; one selection at a time in the process
    (re-entrant within a thread). Code outside qparity that changes the setting during a run is not guarded."""
    with _ENGINE_SETTING:
        previous = torch.backends.quantized.engine
        torch.backends.quantized.engine = engine
        try:
            yield
        finally:
            torch.backends.quantized.engine = previous
