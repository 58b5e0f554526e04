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

from ..errors import InvalidParameterError
from ..numerics.layout import memory_order

MAX_TABLE = 1 << 17  # entries; 16-bit codes would need 2^32
FLOAT32_EXACT_INTEGERS = 1 << 24  # float32 holds every integer of smaller magnitude
INT32_LIMIT = 1 << 31


class PairTable:
    """f(qa, qb) for every pair of codes qa in [a_lo, a_hi], qb in [b_lo, b_hi], looked up at the index
    qa * b_span + qb - (a_lo * b_span + b_lo): one add with alpha, the offset where it is not 0 (int8 codes),
    one gather. Results keep the index's memory format.

    broadcast=False calls f once on the flat lists of all pairs; broadcast=True calls it once on a column of a's
    codes and a row of b's, for an f that is elementwise with broadcasting and computes a term per input before
    combining them (Target.add_from_code_terms): each term is then computed once per code, not once per pair.

    dtype: what the table holds and answers: int64 codes, the same codes in float32 (the prepared model's codes,
    `gather_codes`), or in the output grid's own integer dtype (the integer runtime's narrow codes, `table_of`).
    The index takes codes of any of those dtypes (`pair_index`)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a_lo: int, a_hi: int,
                 b_lo: int, b_hi: int, broadcast: bool = False, dtype: torch.dtype = torch.int64):
        self.b_span = b_hi - b_lo + 1
        self.offset = -(a_lo * self.b_span + b_lo)
        a_span = a_hi - a_lo + 1
        qa = torch.arange(a_lo, a_hi + 1, dtype=torch.int64)
        qb = torch.arange(b_lo, b_hi + 1, dtype=torch.int64)
        if broadcast:  # row-major (a_span, b_span): entry qa_i * b_span + qb_j, the flat order below
            table = fn(qa.reshape(-1, 1), qb.reshape(1, -1))
            if tuple(table.shape) != (a_span, self.b_span):
                raise InvalidParameterError(
                    f"a broadcast pair table of shape {tuple(table.shape)}: f must broadcast a column of {a_span} "
                    f"codes and a row of {self.b_span} to ({a_span}, {self.b_span})")
        else:
            table = fn(qa.repeat_interleave(self.b_span), qb.repeat(a_span))
        self.table = table_of(table.reshape(-1), dtype)
        # Whether float32 codes form the index exactly: every partial sum below is an integer below 2^24 in
        # magnitude (always so for 8-bit grids: at most 2^17).
        largest = max(abs(a_lo), abs(a_hi)) * self.b_span + max(abs(b_lo), abs(b_hi)) + abs(self.offset)
        self.float_index_exact = largest < FLOAT32_EXACT_INTEGERS
        self.int32_index_exact = largest < INT32_LIMIT  # likewise for narrow integer codes, formed in int32

    @staticmethod
    def fits(a_lo: int, a_hi: int, b_lo: int, b_hi: int) -> bool:
        return (a_hi - a_lo + 1) * (b_hi - b_lo + 1) <= MAX_TABLE

    def __call__(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        return gather_codes(self.table.to(qa.device), self.pair_index(qa, qb))

    def pair_index(self, qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
        """qa * b_span + qb + offset (broadcast), computed without wrapping: narrow integer codes (int8, uint8,
        int16, int32) form it in int32 where every partial sum of codes in the table's ranges fits
        (int32_index_exact: always for 8-bit grids), float32 codes where float_index_exact, else in int64."""
        if qa.is_floating_point() or qb.is_floating_point():
            if not self.float_index_exact:
                qa, qb = qa.to(torch.int64), qb.to(torch.int64)
        elif qa.dtype != torch.int64 and qb.dtype != torch.int64:
            # int32 + a narrow operand promotes to int32, where no partial sum wraps (int32_index_exact)
            # a copy always (int32 codes would otherwise come back themselves), so the index may be formed in it
            wide = qa.to(torch.int32 if self.int32_index_exact else torch.int64, copy=True)
            # no second buffer for the index where it would have wide's layout anyway (operands stored alike)
            if qb.shape == wide.shape and qb.stride() == wide.stride() == qa.stride():
                index = _add_in_blocks(wide.mul_(self.b_span), qb)
                return index.add_(self.offset) if self.offset else index
            qa = wide
        index = torch.add(qb, qa, alpha=self.b_span)  # broadcasts
        if self.offset:
            index.add_(self.offset)
        return index


# PyTorch adds narrower codes to an int32 (or int64) index by first converting all of them into a temporary of the
# index's dtype: over blocks of this many elements that temporary is one block's (it was the peak of an eager
# batch-32 run of the bench model: xnnpack, executorch-xnnpack, onnxruntime 5.00 -> 3.50 MiB, tflite 5.00 -> 4.69).
INDEX_BLOCK = 1 << 16


def _add_in_blocks(index: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """index += codes in place, for two tensors of the same shape and strides, in blocks of INDEX_BLOCK elements
    along their common memory order (one block for a tensor that is not dense)."""
    flat_index, flat_codes = memory_order(index)[0], memory_order(codes)[0]
    if flat_index is None or flat_codes is None or index.numel() <= INDEX_BLOCK:
        return index.add_(codes)
    flat_index, flat_codes = flat_index.reshape(-1), flat_codes.reshape(-1)
    for start in range(0, flat_index.numel(), INDEX_BLOCK):
        flat_index[start:start + INDEX_BLOCK].add_(flat_codes[start:start + INDEX_BLOCK])
    return index


class CodeTable:
    """f(q) for every code q in [lo, hi], looked up at q - lo; the result keeps the input's memory format.
    dtype: as PairTable's."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], lo: int, hi: int, dtype: torch.dtype = torch.int64):
        self.lo = lo
        self.table = table_of(fn(torch.arange(lo, hi + 1, dtype=torch.int64)), dtype)
        self.float_index_exact = max(abs(lo), abs(hi), hi - lo) < FLOAT32_EXACT_INTEGERS  # q - lo without rounding
        self.int32_index_exact = max(abs(lo), abs(hi), hi - lo) < INT32_LIMIT  # q - lo without wrapping

    def __call__(self, q: torch.Tensor) -> torch.Tensor:
        if q.is_floating_point() and self.float_index_exact:
            return gather_codes(self.table.to(q.device), q - self.lo if self.lo else q)
        # narrow codes form q - lo in int32 where it cannot wrap; int64 codes stay int64
        narrow = q.dtype != torch.int64 and not q.is_floating_point() and self.int32_index_exact
        wide = torch.int32 if narrow else torch.int64
        index = q.to(wide) - self.lo if self.lo else q.to(wide)
        return gather_codes(self.table.to(q.device), index)


# The dtypes a table may answer in: int64 codes, float32 codes (the prepared model's), and the grids' own integer
# dtypes (the integer runtime's narrow codes).
TABLE_DTYPES = (torch.int64, torch.float32, torch.int32, torch.int16, torch.int8, torch.uint8)


def table_of(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The tabulated codes as int64; as float32 for the prepared model (there the int64 codes an op computes
    become float32 in `emit`, `codes.to(torch.float32)`, the very conversion made here, once per entry); or in a
    narrow integer dtype, which must hold every entry (an output grid's own dtype holds its codes)."""
    if dtype not in TABLE_DTYPES:
        raise InvalidParameterError(f"a lookup table holds codes as one of {TABLE_DTYPES}, not {dtype}")
    codes = values.to(torch.int64)
    if not dtype.is_floating_point and dtype != torch.int64 and codes.numel():
        info = torch.iinfo(dtype)
        low, high = int(codes.min()), int(codes.max())
        if low < info.min or high > info.max:
            raise InvalidParameterError(f"a lookup table's codes span [{low}, {high}], which {dtype} cannot hold")
    return codes.to(dtype)


def gather_codes(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] in index's memory format. A float index holds integers (formed from the prepared model's
    float32 codes without rounding: PairTable.float_index_exact; a code minus the low end of its table) and is
    converted to int32, which index_select takes as it takes int64, at half the memory traffic."""
    if index.is_floating_point():
        index = index.to(torch.int32)
    return gather_keeping_layout(table, index)


def gather_keeping_layout(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for non-negative indices, in index's memory format: one `index_select` over index's elements
    in memory order (so channels-last codes stay channels-last with no copy). Measured on this project's x86 VM:
    index_select is the fastest gather PyTorch has here (torch.take and advanced indexing 1.3-2x slower), and
    negative indices, which take and indexing wrap, cost 5-8x (a mispredicted branch per element), hence the
    offsets above rather than raw int8 codes."""
    in_memory_order, order = memory_order(index)
    if in_memory_order is None:  # overlapping or gapped strides (a broadcast view): a plain gather
        return table.index_select(0, index.reshape(-1)).reshape(index.shape)
    inverse = sorted(range(index.dim()), key=order.__getitem__)
    return table.index_select(0, in_memory_order.reshape(-1)).reshape(in_memory_order.shape).permute(inverse)
