"""Which PyTorch release's quantized kernels the engine targets (`fbgemm`, `x86`, `qnnpack`) reproduce.

PyTorch's own quantized arithmetic changes between releases, so the engine targets are keyed by the release
whose kernels they were matched against, bit for bit, on this project's machines:

- 2.13: the zero point is added before rounding. PyTorch's callers of fbgemm::Quantize (quantize_val and
  quantize_vec in aten/src/ATen/native/quantized/AffineQuantizerBase.cpp) stopped passing LEGACY=false
  (pytorch PR #181067, "Remove LEGACY template parameter from callers of fbgemm::Quantize") while the FBGEMM
  that 2.13 pins still defaulted to LEGACY=true (include/fbgemm/QuantUtils.h, since FBGEMM 91063b0c3, PR
  #362); the 2.13 wheel (pytorch cf30153c) calls fbgemm::Quantize<uint8_t, true>. So quantize_vec
  (quantize_per_tensor; src/QuantUtilsAvx2.cc QuantizeAvx2) adds the zero point inside one fused multiply-add,
  q = rne(fma(x, inv, z)), and quantize_val, which the scalar loops of quantized add, hardswish, cat and the
  nhwc average pools call, gives q = rne(f(f(x * inv) + z)).
- 2.14: the FBGEMM that 2.14 pins removed the legacy path (FBGEMM 798a6037a, PR #5624 "Remove legacy quantize
  path": `zero_point + std::nearbyint(transformed_val)`, and `_mm256_mul_ps` then `_mm256_add_epi32` in
  QuantizeAvx2; de265ff47, PR #5683, dropped the template parameter). The 2.14.1 wheel (pytorch 5c488690)
  rounds first and adds the zero point to the integer, q = rne(f(x * inv)) + z, on both paths.
- Both: PyTorch's own QuantizeAvx2/QuantizeAvx512 (the vector loops of add, cat, pools, hardswish) already
  rounded first; the nchw average pool kernels round with their own expression rne(f(f(x * inv) + z)) in
  both releases (measured); fake_quantize_* is PyTorch's own code and did not change (measured bit for bit).
  Every rule here was measured on exact ties (tests/test_numerics_pytorch_engines.py) and is pinned by recorded
  codes of both releases (tests/test_pytorch_versions.py).

Kernels that round with their own code (QNNPACK's requantization and lookup tables, oneDNN's conv, fbgemm's
ReQuantizeOutput and QuantizeAvx512) did not change. The model remembers the release it was trained for
(`.qp` files store it), so a saved model computes the same integers under any installed PyTorch.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict

import torch

from ..errors import QParityWarning


@dataclass(frozen=True)
class PyTorchKernels:
    """The facts about one PyTorch release's quantized kernels that the engine targets depend on."""

    release: str
    # How quantize_vec and the scalar loops of the elementwise and nhwc kernels round: False adds the zero
    # point before rounding (fbgemm::Quantize LEGACY; inside the fma on the vector path), True rounds x * inv
    # and then adds the zero point to the integer.
    zero_point_after_rounding: bool

    def quantize_vector(self, x: torch.Tensor, inv: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
        """quantize_vec before the clamp (quantize_per_tensor, the adaptive pools' vector loop); float32 in,
        a float tensor of integers out."""
        from .arithmetic import fma_f32

        if self.zero_point_after_rounding:
            return torch.round(x * inv) + zero_point
        return torch.round(fma_f32(x, inv, zero_point))

    def quantize_scalar_loop(self, x: torch.Tensor, inv: torch.Tensor, zero_point) -> torch.Tensor:
        """The scalar loops of qadd, qhardswish, qcat_nhwc and the nhwc pools, before the clamp."""
        if self.zero_point_after_rounding:
            return torch.round(x * inv) + zero_point
        return torch.round(x * inv + zero_point)  # quantize_val, LEGACY: two float32 roundings

    @staticmethod
    def quantize_nchw_pool(x: torch.Tensor, inv: torch.Tensor, zero_point) -> torch.Tensor:
        """The nchw average pool kernels' rounding before the clamp: rne(f(f(x * inv) + z)), two float32
        roundings, in every checked release (measured)."""
        return torch.round(x * inv + zero_point)


CHECKED: Dict[str, PyTorchKernels] = {
    "2.13": PyTorchKernels("2.13", zero_point_after_rounding=False),
    "2.14": PyTorchKernels("2.14", zero_point_after_rounding=True),
}
_warned: set = set()


def release_of(version: str) -> str:
    """'2.14.1+cu130' -> '2.14'."""
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        raise ValueError(f"cannot read a PyTorch release from the version {version!r}")
    return f"{match.group(1)}.{match.group(2)}"


def _key(release: str):
    return tuple(int(part) for part in release.split("."))


def kernels_for(version: str) -> PyTorchKernels:
    """The kernels of a PyTorch version; an unchecked one gets the nearest checked release, with a warning."""
    release = release_of(version)
    if release in CHECKED:
        return CHECKED[release]
    checked = sorted(CHECKED, key=_key)
    nearest = checked[-1] if _key(release) > _key(checked[-1]) else checked[0]
    if release not in _warned:
        _warned.add(release)
        warnings.warn(f"qparity's PyTorch-engine targets (fbgemm, x86, qnnpack) were checked bit for bit against "
                      f"PyTorch {', '.join(checked)}; PyTorch {version} is not one of them, so they follow "
                      f"{nearest}'s kernels, which this PyTorch may not compute", QParityWarning, stacklevel=2)
    return CHECKED[nearest]


def installed_kernels() -> PyTorchKernels:
    """The kernels of the PyTorch running in this process."""
    return kernels_for(torch.__version__)


def kernels_named(release: str) -> PyTorchKernels:
    """A checked release by name ('2.13'), for models saved under another PyTorch."""
    try:
        return CHECKED[release]
    except KeyError:
        raise ValueError(f"PyTorch release {release!r} has no checked kernels; "
                         f"checked: {', '.join(sorted(CHECKED, key=_key))}") from None
