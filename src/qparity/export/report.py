"""What `verify` reports: each runtime configuration's output codes compared with the IntegerModel's.

The exporters (which run their files) and `verify` (which picks the exporter) both use these records, so
they live apart from both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from ..errors import ExportError


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
