"""A convolution and its float32 requantization in one native pass, where that is the target's rule.

The integer runtime otherwise computes a layer in two steps: oneDNN's int8 convolution returns the exact
accumulator as float32 (int8_accumulate.py), and the target's requantizer turns it into codes. Where that
requantizer is one of two rules with per-channel constants, the native kernel (native/int8_conv.c) does both
while the accumulator is still in registers: `float32_requantizer` (XNNPACK, ExecuTorch's XNNPACK delegate,
ONNX Runtime) and `ShiftRequantizer` (TFLite's and TFLite Micro's convolutions). No float32 tensor of the
layer's size is written or read again (at batch 32 the bench model's largest is 2 MiB), and there is no per-call
setup of a oneDNN primitive (about 40 us per layer at batch 1). The constants are the requantizer's own, and the
arithmetic is the rule's, on the exact int32 accumulator: tests/test_fused_layer.py holds the kernel equal, with
torch.equal, to the two-step path.

Taken only where it is exact and lays its output out as the two-step path does: a linear layer, or a conv2d
with one group and numeric padding; 8-bit codes in and out; an accumulation the target forms exactly (not
XNNPACK's or QNNPACK's int16 pairs); every partial sum of the u8 x s8 products provably within int32; and the
layouts of `int8_accumulator` (channels-last out). Elsewhere `FusedConv` returns None and the two steps run.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import native
from ..qparams import TORCH_DTYPES, QParams
from .accumulate import AccumulationPlan, ConvGeometry
from .arithmetic import Float32Rule, ShiftRequantizer
from .int8_accumulate import INT32_LIMIT, layout_is_certain, padding_only_windows, u8_products_fit_int32

EIGHT_BIT = (torch.int8, torch.uint8)
LANES = 16  # output channels per 512-bit register (int8_conv.c)
# output pixels per band at least: four of the kernel's widest tiles (28 pixels), so that few tiles are partly filled
BAND_PIXELS = 4 * 28


class FusedConv:
    """One conv2d or linear layer's native kernel: its weights packed and constants laid out once, then codes ->
    codes per call."""

    def __init__(self, library, geometry: ConvGeometry, weight_codes: torch.Tensor,
                 bias_codes: Optional[torch.Tensor], input_zero_point: int, input_dtype: torch.dtype,
                 rule: Union[Float32Rule, ShiftRequantizer], output_dtype: torch.dtype):
        self.library = library
        self.geometry = geometry
        self.linear = geometry.kind == "linear"
        if self.linear:  # a linear layer is a 1x1 convolution of 1x1 images: one per row of its input
            weight_codes = weight_codes.reshape(weight_codes.shape + (1, 1))
        out_channels, in_channels, self.kernel_h, self.kernel_w = weight_codes.shape
        self.out_channels, self.in_channels = out_channels, in_channels
        self.channels_padded = -(-in_channels // 4) * 4
        self.flip = 0x80 if input_dtype == torch.int8 else 0
        self.input_dtype, self.output_dtype = input_dtype, output_dtype
        self.pad_value = input_zero_point + self.flip  # the zero point of the uint8 codes the kernel reads
        self.weights = _packed(weight_codes.detach().to(torch.int8), self.channels_padded)
        blocks = -(-out_channels // LANES)
        # bias - z_x * sum(w): the zero point's share of sum(x * w), removed as one integer per channel. Taken
        # modulo 2^32: the kernel's int32 sums wrap, and the true result is within int32.
        offset = -self.pad_value * weight_codes.detach().to(torch.int64).sum(dim=(1, 2, 3))
        if bias_codes is not None:
            offset = offset + bias_codes.detach().to(torch.int64).reshape(-1)
        self.offset = torch.zeros(blocks * LANES, dtype=torch.int32)
        self.offset[:out_channels] = ((offset + INT32_LIMIT) % (2 * INT32_LIMIT) - INT32_LIMIT).to(torch.int32)
        self.zero_point, self.lo, self.hi = rule.zero_point, rule.lo, rule.hi
        self.fixed_point = isinstance(rule, ShiftRequantizer)
        if self.fixed_point:
            self.scale = torch.zeros(0, dtype=torch.float32)
            sign_weight = 0 if rule.sign_weight is None else rule.sign_weight
            self.constants = [_per_channel(value, out_channels, blocks, torch.int64)
                              for value in (rule.multiplier, rule.addend, rule.shift, sign_weight)]
            multipliers = self.constants[0]
            # every multiplier below 2^31 (no left shift: M < 1, as for most layers): a 32 x 32-bit product
            self.rule = 2 if bool(((multipliers >= 0) & (multipliers < INT32_LIMIT)).all()) else 1
        else:
            self.scale = _per_channel(rule.multiplier, out_channels, blocks, torch.float32)
            self.constants = []
            self.rule = 0

    def __call__(self, codes: torch.Tensor) -> Optional[torch.Tensor]:
        """The layer's output codes (output_dtype; channels-last for a conv, dense rows for a linear layer), or
        None where the two-step path must answer: codes that are not integers on the CPU, or a layout the two-step
        path may leave NCHW. Integer codes of another dtype are taken as the input grid's dtype (they are codes on
        that grid)."""
        if codes.dtype != self.input_dtype:
            # wider integer codes (an operator that is not a narrow reader gave them): values on the input grid,
            # so its own dtype holds them exactly
            if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
                return None
            codes = codes.to(self.input_dtype)
        if codes.device.type != "cpu":
            return None
        if self.linear:
            if codes.dim() < 1 or codes.shape[-1] != self.in_channels or not codes.numel():
                return None
            rows = codes.reshape(-1, self.in_channels)
            out = self._run(rows.reshape(rows.shape + (1, 1)), 1, 1, (0, 0), (1, 1), (1, 1))
            return None if out is None else out.reshape(codes.shape[:-1] + (self.out_channels,))
        if codes.dim() != 4:
            return None
        n, channels, height, width = codes.shape
        g = self.geometry
        out_h = (height + 2 * g.padding[0] - g.dilation[0] * (self.kernel_h - 1) - 1) // g.stride[0] + 1
        out_w = (width + 2 * g.padding[1] - g.dilation[1] * (self.kernel_w - 1) - 1) // g.stride[1] + 1
        if (not n or channels != self.in_channels or out_h < 1 or out_w < 1
                or not layout_is_certain(channels, self.out_channels, height * width, out_h * out_w)):
            return None  # int8_accumulator's layout rule: let the two-step path decide
        if padding_only_windows(g, (self.kernel_h, self.kernel_w)):
            return None  # int8_accumulator leaves these to the float path, whose layout follows the input's
        out = self._run(codes, out_h, out_w, g.padding, g.stride, g.dilation)
        return None if out is None else out.permute(0, 3, 1, 2)

    def _run(self, codes: torch.Tensor, out_h: int, out_w: int, padding, stride, dilation) -> Optional[torch.Tensor]:
        """The kernel on 4-d codes (any strides): NHWC output codes; None for sizes past its int32 arguments.

        The kernel reads the codes a band of output rows at a time, their input rows copied (padded, flipped) into
        scratch of its own: BAND_PIXELS output pixels or more per band, so few tiles are partly filled, and a few
        rows per thread rather than a copy of the input (the run's peak tensor memory)."""
        n, channels, height, width = codes.shape
        if max(n, channels, height + 2 * padding[0], width + 2 * padding[1]) >= INT32_LIMIT:
            return None
        band_rows = max(1, min(out_h, -(-BAND_PIXELS // out_w)))
        band_bytes = (((band_rows - 1) * stride[0] + (self.kernel_h - 1) * dilation[0] + 1)
                      * (width + 2 * padding[1]) * self.channels_padded)
        threads = max(1, min(torch.get_num_threads(), n * out_h))
        scratch = torch.empty(threads * band_bytes, dtype=torch.uint8)
        out = torch.empty((n, out_h, out_w, self.out_channels), dtype=self.output_dtype)
        stride_n, stride_c, stride_h, stride_w = codes.stride()
        conv = native.Conv(
            codes.data_ptr(), stride_n, stride_c, stride_h, stride_w, self.flip, scratch.data_ptr(),
            self.weights.data_ptr(), self.offset.data_ptr(), self.scale.data_ptr(), out.data_ptr(), n, channels, height,
            width, self.channels_padded, padding[0], padding[1], self.pad_value, self.out_channels, self.kernel_h,
            self.kernel_w, out_h, out_w, stride[0], stride[1], dilation[0], dilation[1], self.zero_point, self.lo,
            self.hi, band_rows, band_bytes, self.rule, *(constant.data_ptr() for constant in self.constants))
        native.call(self.library.qparity_int8_conv, conv, threads, "qparity::native_conv")
        return out


def fused_conv(plan: AccumulationPlan, geometry: ConvGeometry, weight_codes: torch.Tensor,
               bias_codes: Optional[torch.Tensor], input_qp: QParams, output_qp: QParams, requantize
               ) -> Optional[FusedConv]:
    """The layer's FusedConv, or None where the kernel is not exact for it or not available here."""
    rule = requantize if isinstance(requantize, ShiftRequantizer) else getattr(requantize, "float32_rule", None)
    input_dtype, output_dtype = TORCH_DTYPES[input_qp.dtype], TORCH_DTYPES[output_qp.dtype]
    shape = 2 if geometry.kind == "linear" else 4
    if (rule is None or geometry.kind not in ("conv2d", "linear") or geometry.groups != 1
            or isinstance(geometry.padding, str) or plan.path == "int16_pairs" or weight_codes.device.type != "cpu"
            or weight_codes.dim() != shape or input_dtype not in EIGHT_BIT or output_dtype not in EIGHT_BIT):
        return None
    info = torch.iinfo(output_dtype)
    if not info.min <= rule.lo <= rule.hi <= info.max or (bias_codes is not None and bias_codes.is_floating_point()):
        return None
    if not u8_products_fit_int32(weight_codes):
        return None
    library = native.int8_conv()
    if library is None:
        return None
    return FusedConv(library, geometry, weight_codes, bias_codes, int(input_qp.zero_point), input_dtype, rule,
                     output_dtype)


def _per_channel(value: Union[int, torch.Tensor], out_channels: int, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """A constant of the rule (a number, or a tensor broadcast along the output channels) as one value per output
    channel, padded with zeros to whole blocks of LANES."""
    values = torch.zeros(blocks * LANES, dtype=dtype)
    values[:out_channels] = torch.as_tensor(value).detach().to(dtype).reshape(-1).expand(out_channels)
    return values


def _packed(weight: torch.Tensor, channels_padded: int) -> torch.Tensor:
    """[OC, IC, KH, KW] int8 -> [ceil(OC/16)][KH][KW][Cp/4][16][4]: per tap and quad of input channels, the 64
    bytes one vpdpbusd multiplies (16 output channels x 4 input channels), zeros past OC and IC."""
    out_channels, in_channels, kernel_h, kernel_w = weight.shape
    blocks = -(-out_channels // LANES)
    padded = torch.zeros((blocks * LANES, channels_padded, kernel_h, kernel_w), dtype=torch.int8)
    padded[:out_channels, :in_channels] = weight
    packed = padded.reshape(blocks, LANES, channels_padded // 4, 4, kernel_h, kernel_w).permute(0, 4, 5, 2, 1, 3)
    return packed.contiguous()
