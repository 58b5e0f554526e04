"""Quantization parameters: the affine map between integer codes and real values.

A real value r is represented by an integer code q with `r = scale * (q - zero_point)`. Scales are
float32 (every runtime stores them so), zero points are integers inside the code dtype's range. A QParams
is per-tensor (scalar scale) or per-channel along `axis` (one scale and zero point per channel).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import InvalidQParamsError

DTYPE_RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int16": (-32768, 32767),
    "int32": (-(2**31), 2**31 - 1),
}
TORCH_DTYPES = {"int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# The smallest normal float32: a subnormal scale has no float32 reciprocal (1 / s is infinite), which the
# runtimes that quantize by multiplying with 1 / s (PyTorch's engines) would then use.
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)

# The smallest scale an observer produces: a constant input must still give a usable grid.
MIN_SCALE = float(torch.finfo(torch.float32).eps)

Number = Union[float, int, torch.Tensor]


@dataclass(eq=False)
class QParams:
    """Validated quantization parameters (scale > 0 and finite, zero point inside the dtype range)."""

    scale: Number
    zero_point: Number
    dtype: str = "int8"
    axis: Optional[int] = None

    def __post_init__(self) -> None:
        self.dtype = code_dtype_name(self.dtype)
        if self.axis is None and self._scalar_tensors_taken():
            return
        scale = torch.as_tensor(self.scale, dtype=torch.float64).detach().cpu()
        zero_point = torch.as_tensor(self.zero_point).detach().cpu()
        if zero_point.is_floating_point():
            if not torch.equal(zero_point, zero_point.round()):
                raise InvalidQParamsError(f"zero point must be an integer, got {zero_point.tolist()}")
        zero_point = zero_point.to(torch.int64)
        if self.axis is None:
            if scale.numel() != 1 or zero_point.numel() != 1:
                raise InvalidQParamsError(
                    f"per-tensor qparams need one scale and one zero point, got {scale.numel()} and "
                    f"{zero_point.numel()}; pass axis= for per-channel qparams")
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        else:
            if scale.dim() != 1 or zero_point.numel() not in (1, scale.numel()):
                raise InvalidQParamsError(
                    f"per-channel qparams (axis={self.axis}) need a 1-D scale and matching zero points, got "
                    f"shapes {tuple(scale.shape)} and {tuple(zero_point.shape)}")
            zero_point = zero_point.reshape(-1).expand(scale.numel()).clone()
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise InvalidQParamsError(f"scale must be finite and > 0, got {scale.tolist()}")
        scale32 = scale.to(torch.float32)
        if not bool((scale32 > 0).all()) or not bool(torch.isfinite(scale32).all()):
            raise InvalidQParamsError(f"scale {scale.tolist()} is not representable as a positive float32")
        if not bool((scale32 >= FLOAT32_TINY).all()):
            raise InvalidQParamsError(f"scale {scale.tolist()} is subnormal in float32 (below {FLOAT32_TINY:.6g}): "
                                      "its reciprocal is infinite")
        qmin, qmax = DTYPE_RANGES[self.dtype]
        if not bool(((zero_point >= qmin) & (zero_point <= qmax)).all()):
            raise InvalidQParamsError(
                f"zero point {zero_point.tolist()} is outside the {self.dtype} range [{qmin}, {qmax}]")
        self.scale = scale32
        self.zero_point = zero_point

    def _scalar_tensors_taken(self) -> bool:
        """What the checks below make of a valid 0-dim CPU scale and zero point (an observer's grid, every training
        step), checked on Python numbers instead of tensors: a fresh float32 scale, an int64 zero point. False,
        the fields untouched, for anything else, which the checks below then accept or refuse with their message."""
        scale, zero_point = self.scale, self.zero_point
        if not (isinstance(scale, torch.Tensor) and isinstance(zero_point, torch.Tensor) and scale.dim() == 0
                and zero_point.dim() == 0 and scale.is_floating_point() and zero_point.dtype != torch.bool
                and not zero_point.is_complex() and scale.device.type == "cpu" and zero_point.device.type == "cpu"):
            return False
        scale32 = scale.detach().to(torch.float32, copy=True)  # one rounding, as float64 then float32 rounds
        wide, narrow = float(scale), float(scale32)
        if not (math.isfinite(wide) and wide > 0 and math.isfinite(narrow) and narrow >= FLOAT32_TINY):
            return False
        code = float(zero_point) if zero_point.is_floating_point() else int(zero_point)
        qmin, qmax = DTYPE_RANGES[self.dtype]
        if not (math.isfinite(code) and code == math.floor(code) and qmin <= code <= qmax):
            return False
        self.scale, self.zero_point = scale32, zero_point.detach().to(torch.int64)
        return True

    @property
    def qmin(self) -> int:
        return DTYPE_RANGES[self.dtype][0]

    @property
    def qmax(self) -> int:
        return DTYPE_RANGES[self.dtype][1]

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def to_dict(self) -> dict:
        return {"scale": self.scale.tolist(), "zero_point": self.zero_point.tolist(), "dtype": self.dtype,
                "axis": self.axis}

    @classmethod
    def from_dict(cls, data: dict) -> "QParams":
        return cls(data["scale"], data["zero_point"], data["dtype"], data["axis"])

    def same_grid(self, other: "QParams") -> bool:
        return (self.dtype == other.dtype and self.axis == other.axis
                and torch.equal(self.scale, other.scale) and torch.equal(self.zero_point, other.zero_point))

    def __repr__(self) -> str:
        if self.axis is None:
            return f"QParams(scale={self.scale.item():.9g}, zero_point={self.zero_point.item()}, dtype={self.dtype})"
        return f"QParams(per-channel axis={self.axis}, {self.scale.numel()} scales, dtype={self.dtype})"


def code_dtype_name(dtype) -> str:
    """The name of a code dtype given as a name ("int8") or a torch dtype (torch.int8)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise InvalidQParamsError(f"code dtype {dtype} is not one of {sorted(DTYPE_NAMES, key=str)}")
        return DTYPE_NAMES[dtype]
    if not isinstance(dtype, str) or dtype not in DTYPE_RANGES:
        raise InvalidQParamsError(f"unknown code dtype {dtype!r}; expected one of {sorted(DTYPE_RANGES)} "
                                  "or the matching torch dtype")
    return dtype


def affine_qparams(min_val: torch.Tensor, max_val: torch.Tensor, dtype: str) -> QParams:
    """Asymmetric activation qparams covering [min_val, max_val] and always 0 (float32 arithmetic)."""
    qmin, qmax = DTYPE_RANGES[dtype]
    lo = torch.clamp(min_val.detach().to(torch.float32), max=0.0)
    hi = torch.clamp(max_val.detach().to(torch.float32), min=0.0)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=MIN_SCALE)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return QParams(scale, zero_point, dtype)


def symmetric_weight_scale(abs_max: torch.Tensor, qmax: int) -> torch.Tensor:
    """Scale of a symmetric weight grid [-qmax, qmax] covering abs_max (float32, never 0)."""
    return torch.clamp(abs_max.detach().to(torch.float32) / float(qmax), min=MIN_SCALE)


# The smallest nonzero magnitude a constant may have: its grid's scale |c| / 255 must stay a normal float32.
SMALLEST_CONSTANT = 255 * 2.0**-126
LARGEST_CONSTANT = float(torch.finfo(torch.float32).max)


def constant_qparams(value: float, dtype: str) -> QParams:
    """The grid of a number the program uses (`x * 0.5`, `x + 1`): the number at the end of the range, so its
    code is exact up to one float32 rounding: int8 (and other signed codes) symmetric, scale |c| / q_max and
    zero point 0; uint8 with the zero point at the end of the range opposite c. 0 gets scale 1 and code 0."""
    lo, hi = DTYPE_RANGES[dtype]
    magnitude = abs(float(value))
    if magnitude == 0.0:
        return QParams(1.0, 0 if lo <= 0 else lo, dtype)
    if lo < 0:
        return QParams(magnitude / hi, 0, dtype)
    return QParams(magnitude / (hi - lo), lo if value > 0 else hi, dtype)
