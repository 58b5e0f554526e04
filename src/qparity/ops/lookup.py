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


def _raw_indexed(values: torch.Tensor, first_index: int) -> tuple:
    """(table, offset): `values` (for the consecutive indices first_index, first_index + 1, ...) stored so that
    torch.take(table, index + offset) finds each at its raw index. `take` reads a negative index i as i + N
    (N entries), so where every raw index lies in [-N, N) the table is `values` rotated by first_index and the
    offset is 0: the raw codes index it with no offset pass (int8 and uint8 grids always)."""
    count = values.numel()
    if -count <= first_index and first_index + count - 1 < count:
        return torch.roll(values, first_index), 0
    return values, -first_index


class PairTable:
    """f(qa, qb) for every pair of codes qa in [a_lo, a_hi], qb in [b_lo, b_hi], looked up by the raw index
    qa * b_span + qb (one pass: torch.add's alpha), then one gather. Results keep the index's memory format."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a_lo: int, a_hi: int,
                 b_lo: int, b_hi: int):
        self.b_span = b_hi - b_lo + 1
        qa = torch.arange(a_lo, a_hi + 1, dtype=torch.int64).repeat_interleave(self.b_span)
        qb = torch.arange(b_lo, b_hi + 1, dtype=torch.int64).repeat(a_hi - a_lo + 1)
        self.table, self.offset = _raw_indexed(fn(qa, qb).to(torch.int64), a_lo * self.b_span + b_lo)

    @staticmethod
    def fits(a_lo: int, a_hi: int, b_lo: int, b_hi: int) -> bool:
        return (a_hi - a_lo + 1) * (b_hi - b_lo + 1) <= MAX_TABLE

    def __call__(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        index = torch.add(qb, qa, alpha=self.b_span)  # broadcasts
        if self.offset:
            index.add_(self.offset)
        return take_keeping_layout(self.table.to(qa.device), index)


class CodeTable:
    """f(q) for every code q in [lo, hi], looked up by the raw code."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], lo: int, hi: int):
        self.table, self.offset = _raw_indexed(fn(torch.arange(lo, hi + 1, dtype=torch.int64)).to(torch.int64), lo)

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        index = q.to(torch.int64)
        if self.offset:
            index = index + self.offset
        return take_keeping_layout(self.table.to(q.device), index)


def take_keeping_layout(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """torch.take(table, index) in index's memory format (take itself returns a contiguous tensor): the gather
    runs over index's dimensions in memory order, so channels-last codes stay channels-last with no copy."""
    order = sorted(range(index.dim()), key=lambda d: -index.stride(d))
    in_memory_order = index.permute(order)
    if not in_memory_order.is_contiguous():  # overlapping or gapped strides (a broadcast view): a plain gather
        return torch.empty_like(index).copy_(torch.take(table, index))
    inverse = sorted(range(index.dim()), key=order.__getitem__)
    return torch.take(table, in_memory_order).permute(inverse)
