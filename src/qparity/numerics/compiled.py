"""Compiled kernels: a rule's elementwise integer passes fused into one loop, where a model asks for it.

A requantization written with torch operations runs as four to six passes over int64 tensors (multiply-add,
sign correction, shift, zero point, clamp, conversions), each reading and writing the whole tensor.
torch.compile (inductor's C++ backend) fuses such a function into one loop. The function compiled is the rule
itself (`ShiftRequantizer.requantize`, `requantize_float32` in arithmetic.py): there is no second copy of the
arithmetic to keep in step, and the eager run stays the definition the tests compare against.

Only functions whose every step inductor lowers one to one are compiled: integer arithmetic (exact in C++
whatever the compiler flags), conversions of exact integers, and a float32 product followed by round-half-even
(`std::nearbyint`) and a clamp. Never a division: inductor replaces a division by a constant with a
multiplication by its reciprocal (torch/_inductor/lowering.py `div_prim`, torch 2.13 and 2.14), which is not the
IEEE quotient. tests/test_compiled_kernels.py holds every compiled kernel equal to its eager run with
torch.equal over the whole constant range, and whole compiled models equal to the uncompiled ones.

Compiled kernels are opt-in (`IntegerModel.compile()`): the first call of each kernel compiles it (seconds,
once per process and kernel shape family), which a one-off run should not pay. They run on CPU tensors of at
least MIN_ELEMENTS elements; smaller tensors and other devices keep the eager passes, whose cost there is below
a compiled call's fixed cost (measured, 1 thread: 16 channels, a ShiftRequantizer at 4,096 elements 27 us eager
vs 51 us compiled, at 16,384 61 vs 42 us, at 65,536 228 vs 68 us; float32_requantizer at 65,536 63 vs 51 us).
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from ..errors import QParityError

MIN_ELEMENTS = 1 << 15
_switch = threading.local()  # per thread: a model's run turns its kernels on for that run only
# Compiled kernels run one at a time (each with all of PyTorch's threads): dynamo's guard checks and recompiles are
# not thread-safe. Three threads running one compiled model at once made torch 2.13 report "runtime guards failed
# even though they passed" and recompile until its limit, failing a run (CI, tests/test_compiled_kernels.py).
_ONE_AT_A_TIME = threading.RLock()


class CompiledKernelsUnavailableError(QParityError, RuntimeError):
    """torch.compile cannot build a kernel on this machine (no C++ compiler, an unsupported platform)."""


@contextmanager
def compiled_kernels(enabled: bool = True, min_elements: Optional[int] = None) -> Iterator[None]:
    """Within the block, `run_kernel` calls the compiled kernel of each rule on CPU tensors of at least
    `min_elements` elements (default MIN_ELEMENTS; this thread only)."""
    before = getattr(_switch, "min_elements", None)
    _switch.min_elements = (MIN_ELEMENTS if min_elements is None else min_elements) if enabled else None
    try:
        yield
    finally:
        _switch.min_elements = before


class ElementwiseRule(NamedTuple):
    """An op as one elementwise function of its input codes and constants: `function(*codes, *constants, dtype)`
    gives the codes as `dtype` (a target's `add_rule`). The integer runtime runs it as a compiled kernel where the
    op would otherwise be looked up in a table: one loop of the arithmetic beats the table's index and gather,
    which no compiler vectorizes (a compiled gather measured no faster than the eager one)."""

    function: Optional[Callable[..., torch.Tensor]]  # None: no compiled kernel, only the native loop
    constants: tuple
    # the same function as a native loop, called with the same arguments; None where it does not take them
    native: Optional[Callable[..., Optional[torch.Tensor]]] = None


def compiles(values: torch.Tensor) -> bool:
    """Whether `run_kernel` runs a rule on `values` as its compiled kernel here (inside `compiled_kernels()`)."""
    min_elements = getattr(_switch, "min_elements", None)
    return min_elements is not None and values.device.type == "cpu" and values.numel() >= min_elements


def run_kernel(rule: Callable[..., torch.Tensor], values: torch.Tensor, *args, chunked: bool = False
               ) -> torch.Tensor:
    """`rule(values, *args)`: eagerly, or as its one compiled kernel inside `compiled_kernels()`.

    chunked: the rule is elementwise along values' first dimension and returns a tensor, or a tuple of tensors
    of which the 0-dim ones are maxima over the elements; its eager passes then run over blocks of about
    CHUNK_ELEMENTS elements (`_in_chunks`)."""
    if compiles(values):
        try:
            with _ONE_AT_A_TIME:
                return _compiled(rule)(values, *args)
        except torch._dynamo.exc.TorchDynamoException as error:  # a variant that cannot build (compiler gone)
            raise CompiledKernelsUnavailableError(
                f"torch.compile could not build the kernel of {rule.__qualname__} for a {values.dtype} tensor of "
                f"shape {tuple(values.shape)} ({type(error).__name__}: {str(error).strip()[:300]}); the model "
                "computes the same codes without compile()") from None
    if chunked:
        return _in_chunks(rule, values, args)
    return rule(values, *args)


# Eager passes over a large tensor each make a temporary of its size; over blocks of this many elements the 4-6 int64
# temporaries of a fixed-point requantization are one block's (peak tensor memory of the bench's tflite model at
# batch 32: 11.5 -> 5.0 MiB), and each block's passes find it in the core's cache (1 thread, one 32x16x32x32 layer
# alone: 4.7 -> 2.5 ms; within a whole model, where the int64 multiply-add is the bound, within the noise).
# float32_requantizer is not chunked: its two float32 passes measured 6-8% slower in blocks within a model.
CHUNK_ELEMENTS = 1 << 16


def _in_chunks(rule: Callable[..., torch.Tensor], values: torch.Tensor, args: tuple) -> torch.Tensor:
    """rule(values, *args) computed over slices of values' first dimension, written into one result of the layout
    the whole call gives. Only where that is certain: values stored densely as NCHW or channels-last (so every
    slice is stored alike), every tensor argument broadcast along the first dimension (size 1 there, or fewer
    dimensions), and the first block's result of the slice's own shape and strides; otherwise one call."""
    rows = values.shape[0] if values.dim() else 0
    per_row = values.numel() // rows if rows else 0
    block = CHUNK_ELEMENTS // per_row if per_row else 0
    dense = values.is_contiguous() or (values.dim() == 4 and values.is_contiguous(memory_format=torch.channels_last))
    broadcast = all(a.dim() < values.dim() or (a.dim() == values.dim() and a.shape[0] == 1)
                    for a in args if isinstance(a, torch.Tensor))
    if block < 1 or rows <= block or not dense or not broadcast:
        return rule(values, *args)
    first = rule(values[:block], *args)
    parts = first if isinstance(first, tuple) else (first,)
    # each result: a tensor of the block's shape, written into one of the whole shape; or a 0-dim maximum
    outs = [None if part.dim() == 0 else torch.empty_like(values, dtype=part.dtype) for part in parts]
    if any(out is not None and (part.shape != values[:block].shape or part.stride() != out[:block].stride())
           for part, out in zip(parts, outs)):
        return rule(values, *args)
    totals = list(parts)
    for start in range(0, rows, block):
        block_parts = parts if start == 0 else rule(values[start:start + block], *args)
        for i, part in enumerate(block_parts if isinstance(block_parts, tuple) else (block_parts,)):
            if outs[i] is None:
                totals[i] = torch.maximum(totals[i], part)
            else:
                outs[i][start:start + block] = part
    results = tuple(total if out is None else out for total, out in zip(totals, outs))
    return results if isinstance(first, tuple) else results[0]


@functools.lru_cache(maxsize=None)
def _compiled(rule: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # dynamic: one kernel per rule for every shape, layout and constant value (not one per layer); fullgraph:
    # a rule that inductor could not take whole must fail loudly in the tests, not fall back in pieces.
    return torch.compile(rule, dynamic=True, fullgraph=True)


def ensure_available() -> None:
    """Raise CompiledKernelsUnavailableError naming the cause unless this machine compiles and runs a tiny
    integer kernel correctly (tried once per process)."""
    problem = _availability_problem()
    if problem:
        raise CompiledKernelsUnavailableError(
            f"torch.compile cannot build qparity's kernels here: {problem}. Compiled kernels need inductor's C++ "
            "backend and a C++ compiler (e.g. g++); without compile() the model computes the same codes.")


@functools.lru_cache(maxsize=None)
def _availability_problem() -> str:
    from torch._inductor import config as inductor_config

    # The float32/float64 kernels (a product, then a rounding) are exact only as compiled by default: no
    # contraction of a product into a fused multiply-add, no unsafe math (torch/_inductor/cpp_builder.py).
    if inductor_config.cpp.enable_unsafe_math_opt_flag:
        return "inductor is set to compile with unsafe math (TORCHINDUCTOR_CPP_ENABLE_UNSAFE_MATH_OPT_FLAG=1)"
    if inductor_config.cpp.enable_floating_point_contract_flag != "off":
        return ("inductor is set to contract float products into fused multiply-adds "
                "(TORCHINDUCTOR_CPP_ENABLE_FLOATING_POINT_CONTRACT_FLAG="
                f"{inductor_config.cpp.enable_floating_point_contract_flag})")
    probe = torch.arange(-4, 4, dtype=torch.int64)
    try:
        result = _compiled(_probe)(probe, 3)
    except Exception as error:  # inductor raises many kinds (missing compiler, unsupported CPU, import errors)
        return f"{type(error).__name__}: {str(error).strip()[:300]}"
    if not torch.equal(result, _probe(probe, 3)):
        return "the probe kernel computed wrong integers"
    return ""


def _probe(values: torch.Tensor, shift: int) -> torch.Tensor:
    return ((values * 5 + 7) >> shift).clamp(-2, 2)
