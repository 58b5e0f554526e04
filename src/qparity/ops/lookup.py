"""Lookup tables for elementwise integer ops whose result depends only on the input codes.

`CodeTable` tabulates a one-input op (hardswish: 256 codes), `PairTable` a two-input one (add).

An 8-bit add has at most 256 x 256 input pairs, so the integer runtime evaluates the target's own `add`
once on every pair when the model is built and then answers each element with one gather: the table is
computed by the spec function itself, so it cannot disagree with it, and the fake-quant forward (which
calls the spec function directly) checks that in every test. Targets declare when an op is a pure
function of its codes (`Target.elementwise_add`, `Target.elementwise_hardswish`); position- or
length-dependent kernels are not tabulated.
"""
from __future__ import annotations

from typing import Callable

import torch

MAX_TABLE = 1 << 17  # entries; 16-bit codes would need 2^32


class PairTable:
    """f(qa, qb) for every pair of codes qa in [a_lo, a_hi], qb in [b_lo, b_hi], looked up by index."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a_lo: int, a_hi: int,
                 b_lo: int, b_hi: int):
        self.a_lo, self.b_lo = a_lo, b_lo
        self.b_span = b_hi - b_lo + 1
        qa = torch.arange(a_lo, a_hi + 1, dtype=torch.int64).repeat_interleave(self.b_span)
        qb = torch.arange(b_lo, b_hi + 1, dtype=torch.int64).repeat(a_hi - a_lo + 1)
        self.table = fn(qa, qb).to(torch.int64)

    @staticmethod
    def fits(a_lo: int, a_hi: int, b_lo: int, b_hi: int) -> bool:
        return (a_hi - a_lo + 1) * (b_hi - b_lo + 1) <= MAX_TABLE

    def __call__(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        # (qa - a_lo) * b_span + (qb - b_lo) in two passes (broadcasts)
        index = torch.add(qb, qa, alpha=self.b_span).add_(-(self.a_lo * self.b_span + self.b_lo))
        return torch.take(self.table.to(qa.device), index)


class CodeTable:
    """f(q) for every code q in [lo, hi], looked up by index; the result keeps the input's memory format."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], lo: int, hi: int):
        self.lo = lo
        self.table = fn(torch.arange(lo, hi + 1, dtype=torch.int64)).to(torch.int64)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        index = q.to(torch.int64) - self.lo
        return torch.empty_like(index).copy_(torch.take(self.table.to(q.device), index))
