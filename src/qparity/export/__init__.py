"""Export an IntegerModel to a runtime's file format, and verify the file in the real runtime.

`export(model, path)` picks the format from the suffix: `.onnx` (ONNX QOperator graph, target
`onnxruntime`) or `.tflite` (TFLite flatbuffer, targets `tflite` and `xnnpack`). A model whose target has
other integer semantics than the file's runtime is refused: its codes would silently change.
"""
from __future__ import annotations

import os

from ..errors import ExportError
from ..numerics import TARGETS, get_target
from ..runtime import IntegerModel

# Each file suffix and the targets whose integers its runtime computes, from the targets' own declarations.
FORMATS = {suffix: tuple(t for t in TARGETS if get_target(t).file_format == suffix) for suffix in (".onnx", ".tflite")}


def export(model: IntegerModel, path) -> None:
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix not in FORMATS:
        raise ExportError(f"cannot tell the format of {os.fspath(path)!r}: use a .onnx or .tflite file name")
    if model.target.name not in FORMATS[suffix]:
        right = {v: k for k, vs in FORMATS.items() for v in vs}.get(model.target.name)
        hint = (f"export it to a {right} file instead" if right else
                "this target has no file format of its own")
        raise ExportError(
            f"a model trained for target {model.target.name!r} cannot be exported to {suffix}: that runtime "
            f"rounds differently, so its codes would change; train with target={FORMATS[suffix][0]!r} for "
            f"{suffix} files, or {hint}")
    if suffix == ".onnx":
        from .onnx import export_onnx
        export_onnx(model, path)
    else:
        from .tflite import export_tflite
        export_tflite(model, path)
