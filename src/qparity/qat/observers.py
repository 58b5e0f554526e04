"""Activation observers: moving-average min/max in training, frozen quantization parameters after freeze.

Under torch.distributed the batch's min/max is the global batch's (qat/distributed.py), reduced before the
moving-average update, so every rank tracks the same range."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InvalidParameterError, InvalidQParamsError, NotCalibratedError
from ..numerics.layout import flat_view
from ..qparams import QParams, affine_qparams
from .distributed import global_min_max

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class ActivationObserver(nn.Module):
    """Tracks the range of one tensor and turns it into asymmetric QParams (range always includes 0)."""

    def __init__(self, dtype: str, where: str, averaging_constant: float = 0.01):
        super().__init__()
        self.dtype = dtype
        self.where = where
        self.averaging_constant = averaging_constant
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        # Fixed shapes, so a frozen model's state_dict loads into a freshly prepared one.
        self.register_buffer("is_frozen", torch.tensor(False))
        self.register_buffer("frozen_scale", torch.tensor(1.0))
        self.register_buffer("frozen_zero_point", torch.tensor(0, dtype=torch.int64))

    @property
    def frozen(self) -> bool:
        return bool(self.is_frozen)

    @property
    def calibrated(self) -> bool:
        return math.isfinite(float(self.min_val))  # a Python test: no tensor op on every forward

    def observe(self, x: torch.Tensor) -> None:
        if self.frozen or not self.training:
            return
        # In memory order: aminmax flattens its input, which for a channels-last tensor is a full copy. Min and
        # max do not depend on the order of the elements (only which of +0.0 and -0.0, equal values that give
        # the same grid, a min or max of 0 returns; NaN is refused below in any order).
        low, high = torch.aminmax(flat_view(x.detach().to(torch.float32)))
        self._require_representable(low, high)  # on the rank whose data it is, before any collective
        low, high = global_min_max(low, high)
        if not self.calibrated:
            self.min_val.copy_(low)
            self.max_val.copy_(high)
        else:
            self.min_val.add_(self.averaging_constant * (low - self.min_val))
            self.max_val.add_(self.averaging_constant * (high - self.max_val))

    def qparams(self) -> QParams:
        if not self.frozen and not self.calibrated:
            raise NotCalibratedError(
                f"the observer of {self.where} has seen no data: run the model in train mode on some batches "
                "(training or calibration) before evaluating, freezing or converting it")
        try:
            if self.frozen:
                return QParams(self.frozen_scale, self.frozen_zero_point, self.dtype)
            return affine_qparams(self.min_val, self.max_val, self.dtype)
        except InvalidQParamsError as error:  # a range beyond float32, or a frozen scale set by hand
            raise InvalidParameterError(f"the observer of {self.where}: {error}") from None

    def _require_representable(self, low: torch.Tensor, high: torch.Tensor) -> None:
        """Refuse a batch whose range no grid holds: NaN or an infinity (which would also read as "no data
        seen"), or a span beyond float32 (its scale would be infinite)."""
        low, high = float(low), float(high)
        if max(high, 0.0) - min(low, 0.0) <= FLOAT32_MAX:  # the grid always covers 0; False for NaN
            return
        if math.isnan(low) or math.isnan(high):
            problem = "NaN values"
        elif math.isinf(low) or math.isinf(high):
            problem = "infinite values"
        else:
            problem = f"values in [{low:.6g}, {high:.6g}], a span beyond float32's range"
        raise InvalidParameterError(f"the observer of {self.where} saw {problem}; no {self.dtype} grid represents "
                                    "them: check the data and the layers before it (their weights, the learning rate)")

    def fix(self, qp: QParams) -> None:
        """Use `qp` from now on, whatever the data: an output grid the target's runtime imposes."""
        self.frozen_scale.copy_(qp.scale)
        self.frozen_zero_point.copy_(qp.zero_point)
        self.is_frozen.fill_(True)

    def freeze(self) -> None:
        if self.frozen:
            return
        qp = self.qparams()
        self.frozen_scale.copy_(qp.scale)
        self.frozen_zero_point.copy_(qp.zero_point)
        self.is_frozen.fill_(True)

    def extra_repr(self) -> str:
        state = "frozen" if self.frozen else ("calibrated" if self.calibrated else "empty")
        return f"{self.where}, dtype={self.dtype}, {state}"
