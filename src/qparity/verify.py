"""Run an exported file in its real runtime and compare its output codes with the IntegerModel's.

Every runtime configuration that can run the file is run and reported, never hidden; `ok` holds when the
configurations whose semantics the model's target follows give 0 mismatched codes.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .export import file_format
from .export.report import RuntimeResult, VerifyReport, compare_codes
from .files import require_file
from .runtime import IntegerModel

__all__ = ["RuntimeResult", "VerifyReport", "compare_codes", "verify"]


def verify(model: IntegerModel, path, inputs: Sequence[torch.Tensor] | torch.Tensor) -> VerifyReport:
    """Run `path` (.onnx, .tflite, .tosa or .pte) in its runtime(s) on `inputs` and compare codes with `model`.

    A missing file is a FileAccessError, a file its runtime cannot load (or whose inputs are not the model's) a
    ModelFileError, and a model whose target that runtime does not compute an ExportError: never a report.
    """
    suffix = file_format(model, path, "verify")
    path = require_file(path, "the exported file")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    report = VerifyReport(model.target.name, path)
    if suffix == ".onnx":
        from .export.onnx import verify_onnx  # imports onnx and onnxruntime: only when needed
        report.results = verify_onnx(model, path, inputs)
    elif suffix == ".tosa":
        from .export.tosa import verify_tosa  # imports TOSA's reference model: only when needed
        report.results = verify_tosa(model, path, inputs)
    elif suffix == ".pte":
        from .export.pte import verify_pte  # imports ExecuTorch's runtime: only when needed
        report.results = verify_pte(model, path, inputs)
    else:
        from .export.tflite import verify_tflite  # imports LiteRT: only when needed
        report.results = verify_tflite(model, path, inputs)
    return report
