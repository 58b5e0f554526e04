"""Bilinear resizing of codes on one grid (F.interpolate / nn.Upsample mode="bilinear"), as each runtime computes it.

Every runtime interpolates the stored codes between the four neighbours of a source position; they differ in
how they place the source position (half-pixel centers or aligned corners), in which number format they hold
the fraction and the sum, and in how they round. Output size and `align_corners` follow PyTorch: False is
"half-pixel centers" (source = (y + 1/2) in/out - 1/2, clamped at 0), True is "aligned corners" (source =
y (in - 1)/(out - 1)). Each function takes codes [..., H, W] (int64) and returns int64 codes [..., OH, OW].
"""
from __future__ import annotations

from typing import Tuple

import torch

from .arithmetic import round_half_even_div, truncating_div

Pair = Tuple[int, int]


def _corners(codes: torch.Tensor, rows: Tuple[torch.Tensor, torch.Tensor], columns: Tuple[torch.Tensor, torch.Tensor]):
    """(top-left, top-right, bottom-left, bottom-right) neighbours of every output position."""
    top, bottom = codes.index_select(-2, rows[0]), codes.index_select(-2, rows[1])
    return (top.index_select(-1, columns[0]), top.index_select(-1, columns[1]),
            bottom.index_select(-1, columns[0]), bottom.index_select(-1, columns[1]))


def _rows(weights: torch.Tensor) -> torch.Tensor:
    return weights.reshape(-1, 1)


# -- exact: the rational source position, round half to even ------------------------------------------------
def _exact_axis(size: int, out: int, align_corners: bool, device):
    """Source positions as num / den (exact integers): lower index, upper index, and the upper weight's numerator."""
    d = torch.arange(out, device=device, dtype=torch.int64)
    if align_corners:
        den = max(out - 1, 1)
        num = d * (size - 1) if out > 1 else torch.zeros_like(d)
    else:
        den = 2 * out
        num = torch.clamp((2 * d + 1) * size - out, min=0)
    low = num // den
    return (low, torch.clamp(low + 1, max=size - 1)), num - low * den, den


def exact_bilinear(codes: torch.Tensor, zero_point: int, out_hw: Pair, align_corners: bool) -> torch.Tensor:
    """z + rhe(sum of w (q - z)) with PyTorch's source positions taken exactly (rational weights)."""
    rows, fy, den_y = _exact_axis(codes.shape[-2], out_hw[0], align_corners, codes.device)
    columns, fx, den_x = _exact_axis(codes.shape[-1], out_hw[1], align_corners, codes.device)
    tl, tr, bl, br = (c - zero_point for c in _corners(codes, rows, columns))
    fy = _rows(fy)
    total = (den_y - fy) * ((den_x - fx) * tl + fx * tr) + fy * ((den_x - fx) * bl + fx * br)
    return zero_point + round_half_even_div(total, torch.tensor(den_y * den_x, device=codes.device))


# -- LiteRT reference: 10-bit fixed point ------------------------------------------------------------------
def _tflite_axis(size: int, out: int, align_corners: bool, device):
    """ComputeInterpolationValues (int32 overload) of tensorflow/lite/kernels/internal/reference/resize_bilinear.h."""
    if align_corners and out > 1:
        scale_10 = ((1 << 10) * (size - 1) + (out - 1) // 2) // (out - 1)
    else:
        scale_10 = ((1 << 10) * size + out // 2) // out
    d = torch.arange(out, device=device, dtype=torch.int64)
    # half_pixel_centers is what PyTorch's align_corners=False means; TFLite forbids it with align_corners.
    scaled = d * scale_10 + (0 if align_corners else scale_10 // 2 - (1 << 9))
    low = torch.clamp(truncating_div(scaled, torch.tensor(1 << 10)), min=0)  # C++ division truncates
    high = torch.clamp(truncating_div(scaled + (1 << 10) - 1, torch.tensor(1 << 10)), max=size - 1)
    return (low, high), scaled - (1 << 10) * low


def tflite_bilinear(codes: torch.Tensor, out_hw: Pair, align_corners: bool) -> torch.Tensor:
    """RESIZE_BILINEAR's int8 reference kernel (reference_ops::ResizeBilinear, int8_t overload, TF 2.16+): the
    raw codes weighted by 10-bit fractions in int64, rounded half away from zero at 2^20."""
    rows, fy = _tflite_axis(codes.shape[-2], out_hw[0], align_corners, codes.device)
    columns, fx = _tflite_axis(codes.shape[-1], out_hw[1], align_corners, codes.device)
    tl, tr, bl, br = _corners(codes, rows, columns)
    one, fy = 1 << 10, _rows(fy)
    total = tl * (one - fy) * (one - fx) + bl * fy * (one - fx) + tr * (one - fy) * fx + br * fy * fx
    half = torch.where(total > 0, 1 << 19, -(1 << 19))
    return truncating_div(total + half, torch.tensor(1 << 20))


# -- XNNPACK: 11-bit weights from float32 positions -----------------------------------------------------------
def _xnnpack_axis(size: int, out: int, align_corners: bool, device):
    """xnn_indirection_init_resize_bilinear2d_hwc_q11 (XNNPACK src/indirection.c): float32 positions, weights
    lrintf(alpha * 2^11)."""
    adjust = int(align_corners and out != 1)
    scale = torch.tensor(size - adjust, dtype=torch.float32) / torch.tensor(out - adjust, dtype=torch.float32)
    d = torch.arange(out, device=device, dtype=torch.float32)
    if align_corners:
        position = d * scale
    else:
        offset = 0.5 * scale - 0.5  # float32 scalars: 0.5f * scale - 0.5f
        position = torch.clamp(d * scale + offset, 0.0, float(size - 1))
    low = position.to(torch.int64)
    alpha = position - low.to(torch.float32)
    return (low, torch.clamp(low + 1, max=size - 1)), torch.round(alpha * 2048.0).to(torch.int64)


def xnnpack_bilinear(codes: torch.Tensor, out_hw: Pair, align_corners: bool) -> torch.Tensor:
    """XNNPACK's qs8/qu8 ibilinear microkernels (src/qs8-ibilinear/scalar.c.in; the SIMD kernels equal it): two
    11-bit lerps in int32, then (acc + 2^21) >> 22."""
    rows, ay = _xnnpack_axis(codes.shape[-2], out_hw[0], align_corners, codes.device)
    columns, ax = _xnnpack_axis(codes.shape[-1], out_hw[1], align_corners, codes.device)
    tl, tr, bl, br = _corners(codes, rows, columns)
    top = tl * 2048 + (tr - tl) * ax
    bottom = bl * 2048 + (br - bl) * ax
    acc = top * 2048 + (bottom - top) * _rows(ay)
    return torch.div(acc + (1 << 21), 1 << 22, rounding_mode="floor")


# -- PyTorch's quantized upsample_bilinear2d: float32 lambdas, round half even -----------------------------
def _pytorch_axis(size: int, out: int, align_corners: bool, device):
    """area_pixel_compute_scale / area_pixel_compute_source_index<float> (aten/src/ATen/native/UpSample.h)."""
    d = torch.arange(out, device=device, dtype=torch.float32)
    if align_corners:
        scale = (torch.tensor(size - 1, dtype=torch.float32) / (out - 1)) if out > 1 else torch.tensor(0.0)
        position = scale * d
    else:
        scale = torch.tensor(size, dtype=torch.float32) / torch.tensor(out, dtype=torch.float32)
        position = torch.clamp(scale * (d + 0.5) - 0.5, min=0.0)
    low = position.to(torch.int64)
    high = torch.where(low < size - 1, low + 1, low)
    upper = position - low.to(torch.float32)
    return (low, high), 1.0 - upper, upper


def pytorch_bilinear(codes: torch.Tensor, zero_point: int, out_hw: Pair, align_corners: bool) -> torch.Tensor:
    """quantized upsample_bilinear2d on an NCHW tensor (aten/src/ATen/native/quantized/cpu/UpSampleBilinear2d.cpp
    upsample_bilinear2d_out_frame): h0 (w0 q00 + w1 q01) + h1 (w0 q10 + w1 q11) - z in float32, which the caller
    quantizes onto the same grid with the release's quantize_val (scale 1). (A channels-last tensor runs
    QuantizedOpKernels.cpp's
    qupsample_bilinear2d_nhwc_kernel instead, built per CPU capability, whose float rounding differs on
    about 1 output in 500, measured; to_torch hands the kernel NCHW tensors.)"""
    rows, h0, h1 = _pytorch_axis(codes.shape[-2], out_hw[0], align_corners, codes.device)
    columns, w0, w1 = _pytorch_axis(codes.shape[-1], out_hw[1], align_corners, codes.device)
    q00, q01, q10, q11 = (c.to(torch.float32) for c in _corners(codes, rows, columns))
    h0, h1 = _rows(h0), _rows(h1)
    return h0 * (w0 * q00 + w1 * q01) + h1 * (w0 * q10 + w1 * q11) - float(zero_point)
