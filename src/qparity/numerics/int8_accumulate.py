"""The integer runtime's conv/linear accumulator on oneDNN's int8 kernels, where it is provably exact.

The accumulator `acc + bias = sum((q_x - z_x) * q_w) + bias` is an integer; `accumulate` computes it with a
float32 kernel, exact below 2^24. oneDNN's int8 convolution and inner product (PyTorch's
`onednn.qconv2d_pointwise` / `qlinear_pointwise`, the kernels of its x86 quantization engine) compute the
same integer from uint8 codes and int8 weights 4-8x faster: on CPUs with VNNI or AMX (vpdpbusd, tdpbusd)
every u8 x s8 product is summed into an int32 register exactly (no int16 step: without VNNI, vpmaddubsw
saturates pairs of products to int16, so those CPUs keep the float32 path), and the zero point is removed as
the integer z_x * sum(q_w) (oneDNN's compensation). Asked for a float32 output with every scale 1.0 and no
post-op, the kernel returns f(f(acc) * 1 * 1 + bias): exact, and equal to `accumulate`'s result, under the
same bound |acc| + |bias| < 2^24 that the float32 path needs. int32 sums wrap modulo 2^32 and the final
value is in range, so the raw sum sum(q_x * q_w) is bounded too (`raw bound < 2^31`) to keep every partial
sum of the kernel in int32 without relying on wrapping.

int8 activations are shifted to uint8 (q + 128 with zero point z + 128): the same centered values. The
kernels only serve the IntegerModel (no gradient); the fake-quant forward keeps `accumulate`, and the
property tests hold the two equal with torch.equal.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from .accumulate import FLOAT32_EXACT, AccumulationPlan, ConvGeometry

INT32_LIMIT = 2**31
UINT8_MAX = 255


def u8_products_fit_int32(weight_codes: torch.Tensor) -> bool:
    """Whether every partial sum of u8 x s8 products stays in int32 for any uint8 input: sum |w| * 255 < 2^31 per
    output channel (the int8 kernels' exactness condition, oneDNN's here and qparity's fused one)."""
    raw = weight_codes.detach().abs().to(torch.float64).reshape(weight_codes.shape[0], -1).sum(dim=1)
    return bool(raw.numel()) and float(raw.max()) * UINT8_MAX < INT32_LIMIT


def layout_is_certain(*sizes: int) -> bool:
    """Whether the float conv's output layout is certainly channels-last for a channels-last input, given channels
    in and out and image sizes (H * W) in and out: not where the strides are ambiguous (one channel in or out, a
    1x1 image in or out), where oneDNN may return NCHW."""
    return 1 not in sizes


def padding_only_windows(geometry: ConvGeometry, kernel_hw) -> bool:
    """Whether some output window lies entirely in the padding (padding > (k - 1) * dilation on an axis). oneDNN's
    qconv2d_pointwise (PyTorch 2.14.1, this VM) leaves some of those outputs uninitialized instead of the bias:
    found by tests/test_export_tflite.py, pinned by test_int8_kernel_accumulator_equals_int64_reference."""
    return any(p > (k - 1) * d for p, k, d in zip(geometry.padding, kernel_hw, geometry.dilation))


def uint8_codes(codes: torch.Tensor, shift: int) -> torch.Tensor:
    """Integer codes + shift (0, or 128 for int8 codes) as uint8, leaving `codes` as they are (uint8 codes with
    no shift come back themselves: the kernels only read them). q + 128 is q's
    low byte with its top bit flipped: the cast to uint8 keeps the low byte (modular, as C++'s conversion to an
    unsigned type), and the xor runs on 1-byte values instead of an int64 add. int8 codes (the integer runtime's
    narrow codes) are already that byte: a view, and one pass for the xor."""
    flip = _TOP_BIT if shift == 128 else shift
    if codes.dtype == torch.int8:
        as_bytes = codes.view(torch.uint8)
        return as_bytes.bitwise_xor(flip) if shift else as_bytes
    return codes.to(torch.uint8).bitwise_xor_(flip) if shift else codes.to(torch.uint8)


# 128 as a 0-dim uint8 tensor: a Python int is wrapped into a new tensor on every call (2 us of a 4 us xor of one
# 16x32x32 image's codes, measured)
_TOP_BIT = torch.tensor(128, dtype=torch.uint8)


@functools.lru_cache(maxsize=1)
def int32_dot_products() -> bool:
    """Whether this CPU sums u8 x s8 products into int32 without an int16 step (VNNI or AMX), and PyTorch
    has oneDNN's int8 kernels."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        return False
    kernels = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")
    return kernels and bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags))


def int8_accumulator(plan: AccumulationPlan, geometry: ConvGeometry, weight_codes: torch.Tensor,
                     bias_codes: Optional[torch.Tensor], zero_point: int, qmin: int, qmax: int
                     ) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """A function of the input codes returning acc + bias as float32 (as `accumulate` on the "float32" plan),
    or None where the int8 kernels are not provably exact here (then the caller keeps `accumulate`).

    The function itself returns None for the shapes whose memory layout could differ from the float path's:
    later operators (PyTorch engines' add, pools, cat) choose their loops by the layout, so the codes must come
    in the same one. The float conv returns channels-last for a channels-last input, except where the strides
    are ambiguous (one channel in or out, a 1x1 image in or out), where oneDNN may return NCHW."""
    shift = 128 if qmin < 0 else 0  # int8 codes -> uint8
    if (plan.path != "float32" or geometry.kind not in ("conv2d", "linear") or isinstance(geometry.padding, str)
            or weight_codes.device.type != "cpu" or qmax + shift > UINT8_MAX or qmin + shift < 0
            or not int32_dot_products()):
        return None
    if geometry.kind == "conv2d" and padding_only_windows(geometry, weight_codes.shape[-2:]):
        return None
    if not u8_products_fit_int32(weight_codes) or plan.bound >= FLOAT32_EXACT:
        return None
    weight = weight_codes.detach().to(torch.int8)
    out_channels = weight.shape[0]
    ones = torch.ones(out_channels, dtype=torch.float32)
    zeros = torch.zeros(out_channels, dtype=torch.int64)
    bias = None if bias_codes is None else bias_codes.detach().to(torch.float32).reshape(-1)
    zero = zero_point + shift

    def to_uint8(codes: torch.Tensor) -> torch.Tensor:
        return uint8_codes(codes, shift)

    if geometry.kind == "linear":
        packed = torch.ops.onednn.qlinear_prepack(weight, None)

        def linear(codes: torch.Tensor) -> Optional[torch.Tensor]:
            if not codes.numel():
                return None
            flat = to_uint8(codes).reshape(-1, codes.shape[-1])
            acc = torch.ops.onednn.qlinear_pointwise(flat, 1.0, zero, packed, ones, zeros, bias, 1.0, 0,
                                                     torch.float32, "none", [], "")
            return acc.reshape(codes.shape[:-1] + (out_channels,))

        return linear

    stride, padding, dilation = list(geometry.stride), list(geometry.padding), list(geometry.dilation)
    packed = torch.ops.onednn.qconv_prepack(weight, ones, 1.0, zero, stride, padding, dilation, geometry.groups,
                                            None)

    def conv(codes: torch.Tensor) -> Optional[torch.Tensor]:
        n, channels, height, width = codes.shape
        if not n or not layout_is_certain(channels, out_channels, height * width):
            return None  # a layout the float path may leave NCHW (see above): let it decide
        x = to_uint8(codes).contiguous(memory_format=torch.channels_last)
        acc = torch.ops.onednn.qconv2d_pointwise(x, 1.0, zero, packed, ones, zeros, bias, stride, padding,
                                                 dilation, geometry.groups, 1.0, 0, torch.float32, "none", [], "")
        if not layout_is_certain(acc.shape[2] * acc.shape[3]):
            return None
        return acc

    return conv
