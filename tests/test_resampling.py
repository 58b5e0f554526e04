"""Nearest and bilinear upsampling (UNet/FPN decoders), PixelShuffle/PixelUnshuffle, zero padding, AdaptiveMaxPool2d, MaxPool1d and AvgPool1d: exact on
every target, in the real runtimes and in PyTorch's engines."""
import itertools
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError
from qparity.numerics import resampling
from qparity.ops.registry import OPERATORS
from qparity.ops.upsample import float32_rule_is_exact


class Decoder(nn.Module):
    """A UNet-style step: down conv, nearest upsampling (module and functional), skip concatenation."""

    def __init__(self, factor, functional):
        super().__init__()
        self.down = nn.Conv2d(3, 6, 3, stride=factor, padding=1)
        self.up = nn.Upsample(scale_factor=factor, mode="nearest")
        self.out = nn.Conv2d(9, 4, 3, padding=1)
        self.factor, self.functional = factor, functional

    def forward(self, x):
        d = F.relu(self.down(x))
        u = F.interpolate(d, scale_factor=self.factor, mode="nearest") if self.functional else self.up(d)
        return self.out(torch.cat([u, x], 1))


class Pools(nn.Module):
    def __init__(self, adaptive_size):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1)
        self.mp, self.ap = nn.MaxPool1d(2), nn.AvgPool1d(3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, padding=1)
        self.amp = nn.AdaptiveMaxPool2d(adaptive_size)

    def forward(self, x, y):
        return self.ap(self.mp(F.relu(self.c1(x)))), self.amp(self.c2(y)), F.adaptive_max_pool2d(self.c2(y), 1)


class Padded(nn.Module):
    """Zero padding (module and functional, 2-D and 1-D, asymmetric) before convs and at the output."""

    def __init__(self, pad):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.pad = nn.ZeroPad2d(pad)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.conv1d = nn.Conv1d(3, 2, 3)

    def forward(self, x, y):
        a = self.conv2(self.pad(F.relu(self.conv(x))))
        return a, F.pad(a, (1, 0, 2, 1)), F.pad(self.conv1d(y), (2, 1))


class SubPixel(nn.Module):
    """Sub-pixel convolution (ESPCN-style): conv to r^2 C channels, PixelShuffle, and PixelUnshuffle back."""

    def __init__(self, factor):
        super().__init__()
        self.conv = nn.Conv2d(3, 2 * factor * factor, 3, padding=1)
        self.shuffle = nn.PixelShuffle(factor)
        self.conv2 = nn.Conv2d(2, 3, 3, padding=1)
        self.unshuffle = nn.PixelUnshuffle(factor)
        self.factor = factor

    def forward(self, x):
        y = self.conv2(self.shuffle(F.relu(self.conv(x))))
        return self.unshuffle(y), F.pixel_shuffle(F.pixel_unshuffle(y, self.factor), self.factor)


def convert(model, inputs, target):
    prepared = qp.prepare_qat(model, inputs, target=target)
    qp.calibrate(prepared, [inputs])
    qp.freeze(prepared)
    return prepared, qp.convert(prepared)


def outputs(value):
    return value if isinstance(value, tuple) else (value,)


CASES = [("decoder", lambda factor: (Decoder(factor, factor % 2 == 0), (torch.randn(3, 3, 4 * factor, 4 * factor),))),
         ("pools", lambda factor: (Pools(2 if factor % 2 == 0 else 4), (torch.randn(3, 3, 20), torch.randn(3, 3, 8, 8)))),
         ("subpixel", lambda factor: (SubPixel(factor), (torch.randn(3, 3, 4, 4),))),
         ("padding", lambda factor: (Padded((factor - 1, factor, 0, 1)), (torch.randn(3, 3, 8, 8), torch.randn(3, 3, 10))))]


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("case", [name for name, _ in CASES])
@settings(max_examples=4, deadline=None)
@given(factor=st.integers(2, 4), seed=st.integers(0, 1000))
def test_resampling_is_exact_in_the_integer_model_and_every_runtime(tmp_path_factory, target, case, factor, seed):
    torch.manual_seed(seed)
    model, inputs = dict(CASES)[case](factor)
    try:
        prepared, integer = convert(model, inputs, target)
    except UnsupportedOpError as error:  # the targets that do not lower resizing (or windowed pools) yet, by name
        assert target in ("tosa", "executorch-xnnpack") and (
            "cannot run on target" in str(error) or "XNNPACK delegate computes average pools" in str(error)), error
        return
    for fake, deployed in zip(outputs(prepared.eval()(*inputs)), outputs(integer(*inputs))):
        assert torch.equal(fake, deployed)
    if target in FILE_SUFFIXES:
        assert_runtime_gives_the_same_codes(integer, inputs, tmp_path_factory.mktemp("resample"))
    elif target in ("fbgemm", "x86", "qnnpack"):
        torch.backends.quantized.engine = target
        for runtime, deployed in zip(outputs(qp.to_torch(integer)(*inputs)), outputs(integer(*inputs))):
            assert torch.equal(runtime, deployed)


def test_upsampling_other_than_nearest_by_integer_factors_is_refused_by_name():
    class Bicubic(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=2, mode="bicubic")

    class Fractional(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=(7, 7), mode="nearest")

    with pytest.raises(UnsupportedOpError, match="interpolation mode 'bicubic'"):
        qp.prepare_qat(Bicubic(), (torch.randn(1, 2, 4, 4),))
    with pytest.raises(UnsupportedOpError, match=r"upsampling \(4, 4\) to \(7, 7\)"):
        qp.prepare_qat(Fractional(), (torch.randn(1, 2, 4, 4),))


def test_the_float32_index_rule_holds_for_common_sizes_and_factors():
    assert all(float32_rule_is_exact(size, factor) for size in range(1, 129) for factor in range(2, 9))


def test_padding_with_anything_but_zeros_is_refused_by_name():
    class Reflect(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1), mode="reflect")

    class Ones(nn.Module):
        def forward(self, x):
            return F.pad(x, (1, 1), value=1.0)

    with pytest.raises(UnsupportedOpError, match="padding mode 'reflect'"):
        qp.prepare_qat(Reflect(), (torch.randn(1, 2, 4),))
    with pytest.raises(UnsupportedOpError, match="with value 1.0"):
        qp.prepare_qat(Ones(), (torch.randn(1, 2, 4),))


class Bilinear(nn.Module):
    """A decoder step with bilinear upsampling: a module by an integer factor and F.interpolate to a size."""

    def __init__(self, size, align_corners):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=align_corners)
        self.size, self.align_corners = size, align_corners

    def forward(self, x):
        y = self.conv(x)
        return self.up(y), F.interpolate(y, size=self.size, mode="bilinear", align_corners=self.align_corners)


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("align_corners", [False, True])
@settings(max_examples=3, deadline=None)
@given(size=st.tuples(st.integers(2, 17), st.integers(2, 17)), seed=st.integers(0, 1000))
def test_bilinear_is_exact_in_the_integer_model_and_every_runtime(tmp_path_factory, target, align_corners, size, seed):
    torch.manual_seed(seed)
    model, inputs = Bilinear(size, align_corners), (torch.randn(3, 3, 6, 7) * 2,)
    if target in OPERATORS["upsample_bilinear"].refused_by:
        with pytest.raises(UnsupportedOpError, match=f"cannot run on target '{target}'"):
            qp.prepare_qat(model, inputs, target=target)
        return
    prepared, integer = convert(model, inputs, target)
    for fake, deployed in zip(prepared.eval()(*inputs), integer(*inputs)):
        assert torch.equal(fake, deployed)
    if target in FILE_SUFFIXES:
        assert_runtime_gives_the_same_codes(integer, inputs, tmp_path_factory.mktemp("bilinear"))
    elif target != "exact":
        torch.backends.quantized.engine = target
        for runtime, deployed in zip(qp.to_torch(integer)(*inputs), integer(*inputs)):
            assert torch.equal(runtime, deployed)


def _bilinear_by_fractions(codes, zero_point, out_hw, align_corners):
    """PyTorch's bilinear interpolation of centered codes with every position and weight an exact Fraction."""
    def positions(size, out):
        for y in range(out):
            if align_corners:
                source = Fraction(y * (size - 1), out - 1) if out > 1 else Fraction(0)
            else:
                source = max(Fraction((2 * y + 1) * size, 2 * out) - Fraction(1, 2), Fraction(0))
            low = math.floor(source)
            yield low, min(low + 1, size - 1), source - low

    rows, columns = list(positions(codes.shape[-2], out_hw[0])), list(positions(codes.shape[-1], out_hw[1]))
    out = torch.empty(*codes.shape[:-2], *out_hw, dtype=torch.int64)
    for index in itertools.product(*(range(n) for n in codes.shape[:-2])):
        plane = codes[index].tolist()
        for i, (y0, y1, fy) in enumerate(rows):
            for j, (x0, x1, fx) in enumerate(columns):
                value = ((1 - fy) * ((1 - fx) * plane[y0][x0] + fx * plane[y0][x1])
                         + fy * ((1 - fx) * plane[y1][x0] + fx * plane[y1][x1]))
                out[index + (i, j)] = zero_point + round(value - zero_point)  # round(): half to even
    return out


@settings(max_examples=25, deadline=None)
@given(data=st.data(), align_corners=st.booleans())
def test_exact_bilinear_is_the_correctly_rounded_interpolation(data, align_corners):
    h, w = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    out_hw = (data.draw(st.integers(1, 13)), data.draw(st.integers(1, 13)))
    zero_point = data.draw(st.integers(-128, 127))
    codes = torch.tensor(data.draw(st.lists(st.integers(-128, 127), min_size=2 * h * w, max_size=2 * h * w)))
    codes = codes.reshape(1, 2, h, w)
    assert torch.equal(resampling.exact_bilinear(codes, zero_point, out_hw, align_corners),
                       _bilinear_by_fractions(codes, zero_point, out_hw, align_corners))


def test_bilinear_by_a_fractional_factor_or_with_antialias_is_refused_by_name():
    class Fractional(nn.Module):
        def forward(self, x):
            return F.interpolate(x, scale_factor=1.5, mode="bilinear")

    class Antialiased(nn.Module):
        def forward(self, x):
            return F.interpolate(x, size=(2, 2), mode="bilinear", antialias=True)

    with pytest.raises(UnsupportedOpError, match=r"scale_factor=1.5 \(not an integer\): pass size=\(6, 6\)"):
        qp.prepare_qat(Fractional(), (torch.randn(1, 2, 4, 4),))
    with pytest.raises(UnsupportedOpError, match="antialias=True"):
        qp.prepare_qat(Antialiased(), (torch.randn(1, 2, 4, 4),))
