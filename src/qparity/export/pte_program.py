"""What an ExecuTorch .pte file runs outside its delegates, read from the file's program rather than guessed from
the model: every KernelCall of the `forward` execution plan, in the order the runtime runs them, with its
arguments decoded (executorch 1.5.1 exir/schema.py: a KernelCall names an operator and the indices of its
argument values; DelegateCall instructions are the delegates' work and are not listed).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Tuple

from ..errors import ModelFileError


@dataclass(frozen=True)
class TensorArgument:
    sizes: Tuple[int, ...]


@dataclass(frozen=True)
class KernelCall:
    """One operator the runtime calls from its own kernel libraries (portable, quantized, optimized)."""

    operator: str       # "aten::mean" (the out variant the file calls is the overload)
    overload: str
    arguments: tuple    # TensorArgument, int, float, bool, None, tuples of those; the outputs come last

    def __str__(self) -> str:
        return f"{self.operator}.{self.overload}"


def kernel_calls(path) -> List[KernelCall]:
    """The kernel calls of the file's `forward` method, in execution order."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    with open(path, "rb") as f:
        data = f.read()
    try:
        program = deserialize_pte_binary(data).program
    except Exception as error:  # the flatbuffer reader raises its own errors for a damaged file
        raise ModelFileError(f"cannot read the program of {os.fspath(path)!r} ({type(error).__name__}: {error}); "
                             "is it a .pte file?") from None
    plan = next((p for p in program.execution_plan if p.name == "forward"), None)
    if plan is None:
        raise ModelFileError(f"{os.fspath(path)!r} has no forward method: "
                             f"{', '.join(p.name for p in program.execution_plan)}")
    calls = []
    for chain in plan.chains:
        for instruction in chain.instructions:
            kernel = instruction.instr_args
            if type(kernel).__name__ == "KernelCall":
                operator = plan.operators[kernel.op_index]
                calls.append(KernelCall(operator.name, operator.overload,
                                        tuple(_value(plan.values, i) for i in kernel.args)))
    return calls


def _value(values, index: int):
    """The value at `index` of the plan's table, as Python values (lists of ints hold indices of Int values)."""
    val = values[index].val
    kind = type(val).__name__
    if kind == "Tensor":
        return TensorArgument(tuple(val.sizes))
    if kind == "Int":
        return val.int_val
    if kind == "Double":
        return val.double_val
    if kind == "Bool":
        return val.bool_val
    if kind == "Null":
        return None
    if kind == "IntList":
        return tuple(_value(values, i) for i in val.items)
    if kind in ("BoolList", "DoubleList"):
        return tuple(val.items)
    if kind in ("TensorList", "OptionalTensorList"):
        return tuple(None if i < 0 else _value(values, i) for i in val.items)
    if kind == "String":
        return val.string_val
    return kind  # another kind: named, so a caller that needs it says what it got
