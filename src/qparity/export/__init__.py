"""Export an IntegerModel to a runtime's file format, and verify the file in the real runtime.

`export(model, path)` picks the format from the suffix: `.onnx` (ONNX QOperator graph, target
`onnxruntime`), `.tflite` (TFLite flatbuffer, targets `tflite`, `xnnpack` and `tflite-micro`), `.tosa` (TOSA 1.0
flatbuffer, target `tosa`) or `.pte` (ExecuTorch program lowered to the XNNPACK delegate, target
`executorch-xnnpack`). A model whose target has
other integer semantics than the file's runtime is refused: its codes would silently change.
"""
from __future__ import annotations

import os

from ..errors import ArgumentTypeError, ExportError, ModelFileError
from ..files import path_of, replacing
from ..numerics import TARGETS, get_target
from ..runtime import IntegerModel

# Each file suffix and the targets whose integers its runtime computes, from the targets' own declarations.
FORMATS = {suffix: tuple(t for t in TARGETS if get_target(t).file_format == suffix)
           for suffix in (".onnx", ".tflite", ".tosa", ".pte")}


def export(model: IntegerModel, path) -> None:
    """Write `model` to `path` (.onnx, .tflite, .tosa or .pte), atomically: a failed export leaves no file behind."""
    suffix = file_format(model, path, "export")
    with replacing(path, "the exported file") as temporary:
        if suffix == ".onnx":
            from .onnx import export_onnx
            export_onnx(model, temporary)
        elif suffix == ".tosa":
            from .tosa import export_tosa
            export_tosa(model, temporary)
        elif suffix == ".pte":
            from .pte import export_pte  # imports executorch: only when needed
            export_pte(model, temporary)
        else:
            from .tflite import export_tflite
            export_tflite(model, temporary)


ACTIONS = {"export": ("exported to", "export it to"), "verify": ("verified against", "verify it against")}


def file_format(model: IntegerModel, path, action: str) -> str:
    """The suffix of `path` (.onnx, .tflite, .tosa or .pte) once `model` is known to be a model whose target that file's
    runtime computes; `action` ("export" or "verify") words the error."""
    if not isinstance(model, IntegerModel):
        raise ArgumentTypeError(f"expected an IntegerModel (from qparity.convert or qparity.load), got "
                                f"{type(model).__name__}")
    suffix = os.path.splitext(path_of(path, "the file"))[1].lower()
    if suffix not in FORMATS:
        raise ExportError(f"cannot tell the format of {os.fspath(path)!r}: use a .onnx, .tflite, .tosa or .pte file name")
    if model.target.name not in FORMATS[suffix]:
        right = {v: k for k, vs in FORMATS.items() for v in vs}.get(model.target.name)
        done, do = ACTIONS[action]
        hint = (f"{do} a {right} file instead" if right else "this target has no file format of its own")
        raise ExportError(
            f"a model trained for target {model.target.name!r} cannot be {done} {suffix}: that runtime "
            f"rounds differently, so its codes would change; train with target={FORMATS[suffix][0]!r} for "
            f"{suffix} files, or {hint}")
    return suffix


def require_model_inputs(path, shapes, model: IntegerModel) -> None:
    """An exported file's input shapes against the model's: their count, and every dimension but the batch
    (a symbolic dimension, a str or None in ONNX Runtime's listing, matches any size)."""
    wanted = model.graph.input_shapes
    if len(shapes) != len(wanted) or any(
            len(have) != len(want) or any(isinstance(h, int) and h != w for h, w in zip(have[1:], want[1:]))
            for have, want in zip(shapes, wanted)):
        raise ModelFileError(f"{os.fspath(path)!r} takes inputs of shape {[list(s) for s in shapes]}; the model's "
                             f"are {[list(s) for s in wanted]} (any batch): was it exported from another model?")
