"""Statistics over every rank's batch when training under torch.distributed.

Each rank sees its own shard of the global batch. Observers reduce the batch's min and max across ranks
before their moving-average update, so every rank holds the same quantization parameters at every step,
and they are the ones a single process computes on the concatenated batch (min and max are exact). A
`nn.SyncBatchNorm` normalizes with the mean and variance of the global batch, as torch's own does, but on any
device and backend (torch's needs CUDA), so its running statistics, hence the folded weights, agree on every
rank. Outside torch.distributed (or with one rank) none of this runs: one `is_initialized` check per call.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import InputError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size(group: Optional[object] = None) -> int:
    """The size of `group` (default: the whole world); 1 when torch.distributed is not initialized."""
    return dist.get_world_size(group) if is_initialized() else 1


def global_min_max(low: torch.Tensor, high: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The min and max over every rank's batch, given this rank's: one MAX all-reduce of (-low, high).
    Negation is exact, so the result is the exact global min and max on every rank."""
    if world_size() == 1:
        return low, high
    bounds = torch.stack([-low, high])
    dist.all_reduce(bounds, op=dist.ReduceOp.MAX)
    return -bounds[0], bounds[1]


def require_whole_parameters(model: nn.Module, action: str) -> None:
    """Raise InputError when FSDP has sharded `model`'s parameters: folding BatchNorm and fixing weight scales
    need whole tensors on every rank."""
    if not is_initialized():
        return
    from torch.distributed.tensor import DTensor
    sharded = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if sharded:
        raise InputError(
            f"{action} needs whole parameters, but {len(sharded)} are sharded (FSDP), {sharded[0]} first: gather "
            "them with torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True)), load that into a model prepared the same way, "
            f"and {action} that one")


class _SumOverRanks(torch.autograd.Function):
    """A SUM all-reduce that gradients flow through: d(sum over ranks)/d(this rank's term) = 1, so each rank's
    gradient is the sum of every rank's incoming gradient (torch.distributed.nn.functional.all_reduce, which
    torch 2.14 deprecates without a differentiable replacement)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _SumOverRanks.apply(grad, ctx.group), None


class RankSyncedBatchNorm(_BatchNorm):
    """What a SyncBatchNorm becomes in the prepared model (same parameters and buffers): in training under
    torch.distributed it normalizes with `synced_batch_norm`, otherwise it is a plain BatchNorm, as torch's is
    with one process. torch's own would not do on CPU: its synced forward needs CUDA, and
    DistributedDataParallel refuses a CPU module that holds one."""

    def __init__(self, bn: nn.SyncBatchNorm):
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        self.weight, self.bias = bn.weight, bn.bias
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self.process_group = bn.process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise InputError(f"BatchNorm expects [N, C, ...] input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and is_initialized():
            return synced_batch_norm(self, x)
        return super().forward(x)


def without_cuda_requirement(bn: Optional[nn.Module]) -> Optional[nn.Module]:
    """A SyncBatchNorm as a RankSyncedBatchNorm; any other module (or None) as it is."""
    return RankSyncedBatchNorm(bn) if isinstance(bn, nn.SyncBatchNorm) else bn


def synced_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """`bn` in training mode on `x` (channels on dim 1), with the batch statistics of every rank in
    `bn.process_group`: mean and biased variance normalize, the unbiased variance updates running_var
    (F.batch_norm's rule). Two passes (sum, then sum of squared deviations) keep the variance accurate."""
    group = bn.process_group
    dims = [d for d in range(x.dim()) if d != 1]
    count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
    dist.all_reduce(count, group=group)
    if count.item() < 2:
        raise InputError(f"{type(bn).__name__} in training needs more than 1 value per channel over all ranks, "
                         f"got {x.shape} on this rank")
    mean = _SumOverRanks.apply(x.sum(dims), group) / count
    shape = [1, -1] + [1] * (x.dim() - 2)
    centered = x - mean.reshape(shape)
    var = _SumOverRanks.apply(centered.square().sum(dims), group) / count
    _update_running_statistics(bn, mean.detach(), var.detach(), count)
    normalized = centered * torch.rsqrt(var + bn.eps).reshape(shape)
    return normalized * bn.weight.reshape(shape) + bn.bias.reshape(shape)


@torch.no_grad()
def _update_running_statistics(bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor,
                               count: torch.Tensor) -> None:
    bn.num_batches_tracked.add_(1)
    momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.lerp_(mean, momentum)
    bn.running_var.lerp_(var * (count / (count - 1)), momentum)
