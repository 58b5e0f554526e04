"""Run an exported file in its real runtime and compare its output codes with the IntegerModel's.

Every runtime configuration that can run the file is run and reported, never hidden; `ok` holds when the
configurations whose semantics the model's target follows give 0 mismatched codes.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .errors import ExportError
from .export.report import RuntimeResult, VerifyReport, compare_codes
from .runtime import IntegerModel

__all__ = ["RuntimeResult", "VerifyReport", "compare_codes", "verify"]


def verify(model: IntegerModel, path, inputs: Sequence[torch.Tensor] | torch.Tensor) -> VerifyReport:
    """Run `path` (.onnx or .tflite) in its runtime(s) on `inputs` and compare codes with `model`."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    report = VerifyReport(model.target.name, os.fspath(path))
    if suffix == ".onnx":
        from .export.onnx import verify_onnx  # imports onnx and onnxruntime: only when needed
        report.results = verify_onnx(model, path, inputs)
    elif suffix == ".tflite":
        from .export.tflite import verify_tflite  # imports LiteRT: only when needed
        report.results = verify_tflite(model, path, inputs)
    else:
        raise ExportError(f"cannot verify {os.fspath(path)!r}: use a .onnx or .tflite file")
    return report
