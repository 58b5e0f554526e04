"""Pooling on codes: exact window maxima, and exact window sums with PyTorch's divisor for averages.

The averaging itself (how a sum becomes a code) is target semantics: `Target.average`.
"""
from __future__ import annotations

import functools
from typing import Tuple

import torch
import torch.nn.functional as F

from .accumulate import FLOAT32_EXACT

Pair = Tuple[int, int]


def max_pool2d(codes: torch.Tensor, attrs: dict) -> torch.Tensor:
    """Window maximum of codes; padding never wins (PyTorch pads with -inf), so it equals every runtime."""
    return F.max_pool2d(codes.to(torch.float32), attrs["kernel_size"], attrs["stride"], attrs["padding"],
                        attrs["dilation"], attrs["ceil_mode"])


def average_sums(codes: torch.Tensor, zero_point, attrs: dict, max_abs: int) -> torch.Tensor:
    """Window sums of the centered codes q - z (padding is the real value 0), exact, differentiable. The codes,
    of any dtype, are centered in the float type that holds the sums (exact: integers below 2^24 in float32), so a
    narrow tensor makes no int64 copy of itself."""
    kh, kw = attrs["kernel_size"]
    dtype = torch.float32 if max_abs * kh * kw < FLOAT32_EXACT else torch.float64
    return F.avg_pool2d(codes.to(dtype) - zero_point, attrs["kernel_size"], attrs["stride"], attrs["padding"],
                        attrs["ceil_mode"], True, 1)


def window_sums_and_counts(codes: torch.Tensor, zero_point, attrs: dict):
    """(window sums of the centered codes q - z, exact; PyTorch's divisor at each output position)."""
    if "uneven_output_size" in attrs:
        # int64 first: narrow codes minus a 0-dim zero point would keep (and wrap in) their own dtype
        wide = codes if codes.is_floating_point() else codes.to(torch.int64)
        return uneven_sums_and_counts(wide - zero_point, attrs["uneven_output_size"])
    sums = average_sums(codes, zero_point, attrs, 255)
    return sums, average_counts(tuple(codes.shape[-2:]), tuple(sums.shape[-2:]), attrs, codes.device)


def average_counts(input_hw: Pair, output_hw: Pair, attrs: dict, device=None) -> torch.Tensor:
    """The divisor PyTorch's avg_pool2d uses at each output position, shape [1, 1, OH, OW], int64 (a tensor shared
    between calls with the same sizes and window: read it, never write it).

    aten/src/ATen/native/cpu/AvgPoolKernel.cpp: a window is clipped to the padded input; with
    count_include_pad the divisor is the clipped window's size, otherwise the number of real inputs in it.
    """
    return _average_counts(tuple(input_hw), tuple(output_hw), tuple(attrs["kernel_size"]), tuple(attrs["stride"]),
                           tuple(attrs["padding"]), bool(attrs["count_include_pad"]), torch.device(device or "cpu"))


@functools.lru_cache(maxsize=256)
def _average_counts(input_hw: Pair, output_hw: Pair, kernel: Pair, stride: Pair, padding: Pair, include_pad: bool,
                    device: torch.device) -> torch.Tensor:
    # a run of an integer model asks for the same few (a 6-op computation of ~50 us each time at batch 1)
    per_axis = [_axis_counts(n_in, n_out, k, s, p, include_pad, device)
                for n_in, n_out, k, s, p in zip(input_hw, output_hw, kernel, stride, padding)]
    return (per_axis[0][:, None] * per_axis[1][None, :]).reshape(1, 1, *output_hw)


def _axis_counts(size, out, kernel, stride, pad, include_pad, device):
    start = torch.arange(out, device=device, dtype=torch.int64) * stride - pad
    end = torch.clamp(start + kernel, max=size + pad)
    if include_pad:
        return end - start
    return torch.clamp(end, max=size) - torch.clamp(start, min=0)


def _adaptive_windows(size: int, out: int, device=None):
    """PyTorch's adaptive pooling windows along one axis (aten/src/ATen/native/AdaptivePooling.h start_index /
    end_index): [floor(o * in / out), ceil((o + 1) * in / out)), as an [out, in] 0/1 membership matrix."""
    o = torch.arange(out, device=device, dtype=torch.int64)
    start, end = (o * size) // out, -((-(o + 1) * size) // out)
    i = torch.arange(size, device=device, dtype=torch.int64)
    return ((i >= start[:, None]) & (i < end[:, None])), end - start


def adaptive_window_sizes(input_hw: Pair, out_hw: Pair):
    """The heights [out_h] and widths [out_w] of an adaptive pool's windows (PyTorch's start/end rule)."""
    return _adaptive_windows(input_hw[0], out_hw[0])[1], _adaptive_windows(input_hw[1], out_hw[1])[1]


def uneven_sums_and_counts(centered: torch.Tensor, out_hw: Pair):
    """Window sums and sizes of an adaptive average pool whose output size does not divide the input: the
    windows of PyTorch's rule, as products with membership matrices (exact: |sums| < 2^24 in float32)."""
    rows, heights = _adaptive_windows(centered.shape[-2], out_hw[0], centered.device)
    columns, widths = _adaptive_windows(centered.shape[-1], out_hw[1], centered.device)
    dtype = centered.dtype if centered.is_floating_point() else torch.float64
    sums = rows.to(dtype) @ centered.to(dtype) @ columns.to(dtype).T
    return sums, (heights[:, None] * widths[None, :]).reshape(1, 1, *out_hw)


def adaptive_output_size(input_hw: Pair, output_size) -> Pair:
    out = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    return tuple(i if o is None else o for i, o in zip(input_hw, out))


def adaptive_average_attrs(input_hw: Pair, output_size, where: str) -> dict:
    """An adaptive average pool's windows: an average pool where the output size divides the input, else
    PyTorch's windows of differing sizes ("uneven_output_size"), which only some runtimes have a kernel for."""
    out = adaptive_output_size(input_hw, output_size)
    if any(i % o for i, o in zip(input_hw, out)):
        return {"uneven_output_size": out}
    return adaptive_as_pooling(input_hw, out, where)


def adaptive_as_pooling(input_hw: Pair, output_size, where: str) -> dict:
    """An adaptive pool as a pool with uniform windows (its only form some runtimes can run)."""
    from ..errors import UnsupportedOpError

    out = adaptive_output_size(input_hw, output_size)
    if any(i % o for i, o in zip(input_hw, out)):
        raise UnsupportedOpError(
            f"adaptive_max_pool2d at {where}: output size {out} does not divide the input size {tuple(input_hw)}, "
            "so its windows are not uniform; use an output size that divides the input or a MaxPool2d")
    kernel = tuple(i // o for i, o in zip(input_hw, out))
    return {"kernel_size": kernel, "stride": kernel, "padding": (0, 0), "ceil_mode": False,
            "count_include_pad": True}


def output_size(input_hw: Pair, attrs: dict) -> Pair:
    """PyTorch's pooling output size (with its ceil_mode rule: the last window starts inside the input)."""
    sizes = []
    for size, k, s, p in zip(input_hw, attrs["kernel_size"], attrs["stride"], attrs["padding"]):
        span = size + 2 * p - k
        out = (-(-span // s) if attrs["ceil_mode"] else span // s) + 1
        if attrs["ceil_mode"] and (out - 1) * s >= size + p:
            out -= 1
        sizes.append(out)
    return tuple(sizes)


def windows(values: torch.Tensor, attrs: dict, out_hw: Pair) -> torch.Tensor:
    """[N, C, kh*kw, OH*OW] window elements in row-major window order; zero where a window leaves the input."""
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel_size"], attrs["stride"], attrs["padding"]
    height, width = values.shape[-2:]
    # Extra zeros on the bottom/right give ceil_mode's last windows their full extent.
    extra_h = max(0, (out_hw[0] - 1) * sh + kh - (height + 2 * ph))
    extra_w = max(0, (out_hw[1] - 1) * sw + kw - (width + 2 * pw))
    padded = F.pad(values, (pw, pw + extra_w, ph, ph + extra_h))
    columns = F.unfold(padded, (kh, kw), stride=(sh, sw))
    n, c = values.shape[0], values.shape[1]
    return columns.reshape(n, c, kh * kw, -1)


def window_attrs(attrs: dict, input_hw: Pair, where: str) -> dict:
    """The pooling window for this input size: an adaptive pool's window follows the input it gets."""
    size = attrs.get("adaptive_output_size")
    if size is None:
        return attrs
    return adaptive_average_attrs(input_hw, size, where)
