"""XNNPACK's, TFLite's and ONNX Runtime's adds as native loops, where the integer runtime would otherwise look the
add up in a table.

The residual adds of an XNNPACK model are `qs8_vadd` (numerics/xnnpack.py), those of a TFLite or TFLite Micro model
`TFLiteTarget._add` (numerics/tflite.py), on two int8 code tensors; an ONNX Runtime model's are QLinearAdd
(`OnnxRuntimeTarget.add_elementwise`, numerics/onnxruntime.py) on int8 or uint8 codes. The integer runtime answers them from a pair
table that the target's function filled (an int32 index built from both operands, then a gather), or inside
compiled_kernels() from the compiled function where there is one; `qparity_qs8_vadd`, `qparity_tflite_add` and
`qparity_ort_add` (native/int8_conv.c) run the function's own arithmetic (integers, or float32 fused
multiply-adds) over the codes as they are stored, vectorized, where both operands are codes of the grids' dtype
stored alike and densely (so the result takes their layout, as the table's does). tests/test_native_add.py holds them equal to the targets' functions on every pair of codes with
torch.equal.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import native
from .layout import memory_order


def native_qs8_vadd(qa: torch.Tensor, qb: torch.Tensor, zero_a: int, zero_b: int, multiplier_a: int,
                    multiplier_b: int, shift: int, zero_out: int, lo: int, hi: int, wide: torch.dtype = torch.int64,
                    dtype: torch.dtype = torch.int64) -> Optional[torch.Tensor]:
    """qs8_vadd's codes (same arguments: the loop sums in int32 where `wide` is int32, which xnnpack's
    `_vadd_sum_dtype` gives only where no partial sum can reach 2^31, else in int64), or None where the native loop
    does not take these operands (`_operands`), or for a shift outside 1..62 (1..30 in int32)."""
    int32_sum = wide == torch.int32
    if not 1 <= shift <= (30 if int32_sum else 62) or not _operands(qa, qb, lo, hi, dtype):
        return None
    return _run("qparity_qs8_vadd", native.Add, qa, qb, zero_a, zero_b, multiplier_a, multiplier_b, shift,
                zero_out, lo, hi, int(int32_sum))


def native_tflite_add(qa: torch.Tensor, qb: torch.Tensor, zero_a: int, zero_b: int, multiplier_a: int, shift_a: int,
                      multiplier_b: int, shift_b: int, multiplier_y: int, shift_y: int, zero_out: int, lo: int,
                      hi: int, dtype: torch.dtype = torch.int64) -> Optional[torch.Tensor]:
    """TFLite's int8 ADD (TFLiteTarget._add with the three (Q31 multiplier, shift) pairs of `add_multipliers`), or
    None where the native loop does not take these operands (`_operands`), or for shifts past 31 either way."""
    if any(not -31 <= shift <= 31 for shift in (shift_a, shift_b, shift_y)) or not _operands(qa, qb, lo, hi, dtype):
        return None
    return _run("qparity_tflite_add", native.TfliteAdd, qa, qb, zero_a, zero_b, multiplier_a, shift_a, multiplier_b,
                shift_b, multiplier_y, shift_y, zero_out, lo, hi)


def native_ort_add(qa: torch.Tensor, qb: torch.Tensor, ratio_a: float, ratio_b: float, offset: float, lo: int,
                   hi: int, dtype: torch.dtype = torch.int64) -> Optional[torch.Tensor]:
    """ONNX Runtime's QLinearAdd (OnnxRuntimeTarget.add_elementwise with the float32 r_a, r_b, F of
    `add_parameters`), on int8 or uint8 codes, or None where the native loop does not take these operands
    (`_operands`)."""
    if not _operands(qa, qb, lo, hi, dtype, (torch.int8, torch.uint8)):
        return None
    return _run("qparity_ort_add", native.OrtAdd, qa, qb, ratio_a, ratio_b, offset, lo, hi,
                int(qa.dtype == torch.uint8))


def _operands(qa: torch.Tensor, qb: torch.Tensor, lo: int, hi: int, dtype: torch.dtype,
              dtypes: tuple = (torch.int8,)) -> bool:
    """Whether the loops take these operands: codes of one of `dtypes`, all three the same, of one shape and strides
    stored densely on the CPU, a clamp within the dtype, and a native kernel here."""
    if dtype not in dtypes:
        return False
    info = torch.iinfo(dtype)
    if (qa.dtype != dtype or qb.dtype != dtype or qa.shape != qb.shape
            or qa.stride() != qb.stride() or qa.device.type != "cpu" or qb.device.type != "cpu" or not qa.numel()
            or not info.min <= lo <= hi <= info.max):
        return False
    dense = qa.is_contiguous() or (qa.dim() == 4 and qa.is_contiguous(memory_format=torch.channels_last))
    return (dense or memory_order(qa)[0] is not None) and native.int8_conv() is not None


def _run(entry: str, structure, qa: torch.Tensor, qb: torch.Tensor, *constants) -> Optional[torch.Tensor]:
    out = torch.empty_like(qa)  # a dense tensor's strides (preserve_format)
    if out.stride() != qa.stride():
        return None
    arguments = structure(qa.data_ptr(), qb.data_ptr(), out.data_ptr(), qa.numel(), *constants)
    native.call(getattr(native.int8_conv(), entry), arguments, torch.get_num_threads(), "qparity::native_add")
    return out
