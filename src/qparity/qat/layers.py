"""Quantization-aware Conv2d / Linear: weights on the target's grid, BatchNorm folded as deployed."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..capture import Layer
from ..errors import InvalidParameterError
from ..numerics.accumulate import ConvGeometry
from ..ops.layer import IntegerLayer, check_bias_range, check_layer_accumulator, check_requantization
from ..qparams import QParams, symmetric_weight_scale
from ..numerics import Target
from ..ops.surrogates import clamp, straight_through
from . import distributed


class QATLayer(nn.Module):
    """Owns one conv/linear module (and the BatchNorm that follows it) and defines its integer weights.

    The parameters stay the user's own `nn.Conv2d`/`nn.Linear`/`nn.BatchNorm2d` parameters, so optimizers
    and state dicts work as before. Weight scales are symmetric (zero point 0) per output channel, or per
    tensor, recomputed from the weights until `freeze` fixes them.
    """

    def __init__(self, layer: Layer, geometry: ConvGeometry, target: Target, per_channel: bool, where: str):
        super().__init__()
        self.module = layer.module
        self.batch_norm = distributed.without_cuda_requirement(layer.batch_norm)
        self.geometry = geometry
        self.target = target
        self.per_channel = per_channel
        self.where = where
        out_channels = self.module.weight.shape[0]
        self.register_buffer("is_frozen", torch.tensor(False))
        self.register_buffer("frozen_weight_scale", torch.ones(out_channels if per_channel else 1))

    @property
    def frozen(self) -> bool:
        return bool(self.is_frozen)

    def folded(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Weight and bias with BatchNorm folded in using its running statistics (how it deploys).

        Raises InvalidParameterError for a NaN or infinite value: its codes would leave the grid silently.
        """
        weight, bias = self.module.weight, self.module.bias
        if self.batch_norm is not None:
            factor = self.batch_norm_factor()
            base = bias if bias is not None else torch.zeros_like(self.batch_norm.running_mean)
            weight = weight * factor.reshape(-1, *([1] * (weight.dim() - 1)))
            bias = (base - self.batch_norm.running_mean) * factor + self.batch_norm.bias
        self._require_finite("weight", weight)
        if bias is not None:
            self._require_finite("bias", bias)
        return weight, bias

    def _require_finite(self, name: str, values: torch.Tensor) -> None:
        if bool(torch.isfinite(values.detach()).all()):
            return
        finite = torch.isfinite(values.detach()).reshape(values.shape[0], -1).all(dim=1)
        channel = int(torch.nonzero(~finite)[0])
        folded = "" if self.batch_norm is None else " (BatchNorm folded in: check its weight and running statistics)"
        raise InvalidParameterError(
            f"layer {self.where}: the {name} of output channel {channel} is NaN or infinite{folded}; no integer "
            "code represents it: look for exploding gradients (learning rate, loss scale)")

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The BatchNorm in training mode on the layer's (conv2d-shaped) output; a BatchNorm1d after a Conv1d
        sees the [N, C, L] tensor it was written for."""
        if isinstance(self.batch_norm, nn.BatchNorm1d) and x.dim() == 4:
            return self.batch_norm(x.squeeze(2)).unsqueeze(2)
        return self.batch_norm(x)

    def batch_norm_factor(self) -> torch.Tensor:
        bn = self.batch_norm
        return bn.weight / torch.sqrt(bn.running_var + bn.eps)

    def weight_scale(self, weight: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            return self.frozen_weight_scale if self.per_channel else self.frozen_weight_scale.reshape(())
        magnitude = weight.detach().abs()
        abs_max = magnitude.reshape(magnitude.shape[0], -1).amax(dim=1) if self.per_channel else magnitude.max()
        return symmetric_weight_scale(abs_max, self.target.weight_qmax)

    def weight_codes(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Integer-valued float weight codes whose gradient flows to the float weights (STE)."""
        codes = self.target.quantize_weight(weight.detach(), scale)
        shape = [-1] + [1] * (weight.dim() - 1) if scale.dim() else []
        surrogate = weight / scale.reshape(shape) if shape else weight / scale
        return straight_through(codes, clamp(surrogate, -self.target.weight_qmax, self.target.weight_qmax))

    @torch.no_grad()
    def integer(self, input_qp: QParams, output_qp: QParams) -> IntegerLayer:
        """The deployed constants (int8 weight codes, weight scale, int32 bias codes or PyTorch's engines' float32
        bias), computed by the functions the fake forward uses; refuses what no runtime represents."""
        target = self.target
        weight, bias = self.folded()
        weight_scale = self.weight_scale(weight).detach().cpu()
        check_requantization(self.where, weight_scale, input_qp, output_qp)
        weight_codes = target.quantize_weight(weight.detach().cpu(), weight_scale).to(torch.int8)
        bias_codes = None
        if bias is not None:
            if target.int32_bias(self.geometry.kind):
                check_bias_range(self.where, bias, input_qp, weight_scale)
            bias_codes = target.quantize_bias(bias.detach().cpu(), input_qp.scale, weight_scale)
            if not target.float_bias:
                bias_codes = bias_codes.to(torch.int32)
        check_layer_accumulator(self.where, target, self.geometry.kind, weight_codes, bias_codes, input_qp,
                                weight_scale, output_qp)
        return IntegerLayer(weight_codes, weight_scale, bias_codes)

    @torch.no_grad()
    def freeze(self) -> None:
        """Fold BatchNorm into the conv's parameters and fix the weight scale; idempotent."""
        if self.frozen:
            return
        weight, bias = self.folded()
        if self.batch_norm is not None:
            if hasattr(self.module, "set_weight"):  # a ConvTranspose2d seen as a conv (ops/conv_transpose2d.py)
                self.module.set_weight(weight)
            else:
                self.module.weight.copy_(weight)
            if self.module.bias is None:
                new_bias = nn.Parameter(bias.detach().clone())
                if hasattr(self.module, "set_bias"):  # a Conv1d seen as a conv2d (ops/conv1d.py)
                    self.module.set_bias(new_bias)
                else:
                    self.module.bias = new_bias
            else:
                self.module.bias.copy_(bias)
            self.batch_norm = None
        self.frozen_weight_scale.copy_(self.weight_scale(self.module.weight).reshape(-1))
        self.is_frozen.fill_(True)

    def extra_repr(self) -> str:
        parts = [self.where, "per-channel" if self.per_channel else "per-tensor"]
        if self.batch_norm is not None:
            parts.append("BatchNorm folded at run time")
        if self.frozen:
            parts.append("frozen")
        return ", ".join(parts)
