"""Run an exported file in its real runtime and compare its output codes with the IntegerModel's.

Every runtime configuration that can run the file is run and reported, never hidden; `ok` holds when the
configurations whose semantics the model's target follows give 0 mismatched codes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from .errors import ExportError
from .runtime import IntegerModel


@dataclass
class RuntimeResult:
    """One output of one runtime configuration compared with qparity's codes."""

    runtime: str                 # e.g. "onnxruntime (CPU)", "LiteRT reference kernels"
    output: int                  # index of the model output
    mismatched: int
    total: int
    binding: bool                # True when the model's target promises equality with this configuration
    first_index: Optional[Tuple[int, ...]] = None
    expected: Optional[int] = None  # qparity's code at first_index
    actual: Optional[int] = None    # the runtime's code at first_index
    note: str = ""
    codes: Optional[torch.Tensor] = field(default=None, repr=False)  # the runtime's output codes


@dataclass
class VerifyReport:
    target: str
    path: str
    results: List[RuntimeResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        binding = [r for r in self.results if r.binding]
        return bool(binding) and all(r.mismatched == 0 for r in binding)

    @property
    def mismatched(self) -> int:
        return sum(r.mismatched for r in self.results if r.binding)

    def __str__(self) -> str:
        lines = [f"verify {self.path} (target {self.target}): {'OK' if self.ok else 'MISMATCH'}"]
        for r in self.results:
            where = "" if r.first_index is None else (
                f", first at {r.first_index}: qparity {r.expected}, runtime {r.actual}")
            role = "must match" if r.binding else "reported"
            lines.append(f"  {r.runtime:<34} output {r.output}: {r.mismatched} mismatched of {r.total} codes "
                         f"({role}){where}{' - ' + r.note if r.note else ''}")
        return "\n".join(lines)


def compare_codes(runtime: str, output: int, expected: torch.Tensor, actual: torch.Tensor, binding: bool,
                  note: str = "") -> RuntimeResult:
    """Compare two code tensors of the same shape element by element (exact equality)."""
    expected = expected.to(torch.int64)
    actual = actual.to(torch.int64)
    if expected.shape != actual.shape:
        raise ExportError(f"{runtime} output {output} has shape {tuple(actual.shape)}, qparity's has "
                          f"{tuple(expected.shape)}")
    differ = expected != actual
    count = int(differ.sum())
    result = RuntimeResult(runtime, output, count, expected.numel(), binding, note=note, codes=actual)
    if count:
        index = tuple(int(i) for i in torch.nonzero(differ)[0])
        result.first_index, result.expected, result.actual = index, int(expected[index]), int(actual[index])
    return result


def verify(model: IntegerModel, path, inputs: Sequence[torch.Tensor] | torch.Tensor) -> VerifyReport:
    """Run `path` (.onnx or .tflite) in its runtime(s) on `inputs` and compare codes with `model`."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    report = VerifyReport(model.target.name, os.fspath(path))
    if suffix == ".onnx":
        from .export.onnx import verify_onnx
        report.results = verify_onnx(model, path, inputs)
    elif suffix == ".tflite":
        from .export.tflite import verify_tflite
        report.results = verify_tflite(model, path, inputs)
    else:
        raise ExportError(f"cannot verify {os.fspath(path)!r}: use a .onnx or .tflite file")
    return report
