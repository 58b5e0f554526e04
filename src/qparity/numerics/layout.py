"""Memory order: a dense tensor seen with its dimensions sorted by stride, so that a flat pass over it (a gather,
a reduction) walks memory once, in place, whatever the memory format (channels-last codes stay channels-last)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def memory_order(x: torch.Tensor) -> Tuple[Optional[torch.Tensor], List[int]]:
    """(x permuted so that it is contiguous, the permutation), or (None, []) for a tensor no permutation makes
    contiguous (overlapping or gapped strides: a broadcast view, a slice)."""
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    permuted = x.permute(order)
    return (permuted, order) if permuted.is_contiguous() else (None, [])


def flat_view(x: torch.Tensor) -> torch.Tensor:
    """x's elements as a 1-D tensor in memory order: a view where x is dense, else a copy (reshape's)."""
    permuted, _ = memory_order(x)
    return (x if permuted is None else permuted).reshape(-1)
