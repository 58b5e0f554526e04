"""The numerics spec: one `Target` per runtime, each a handful of functions that define its integers.

Read `arithmetic.py` (the primitives), then `target.py` (what every target defines), then one file per
target. docs/numerics.md is the same content as a document.
"""
from __future__ import annotations

from typing import Dict

from ..errors import UnknownTargetError
from .exact import ExactTarget
from .executorch_xnnpack import ExecutorchXnnpackTarget
from .onnxruntime import OnnxRuntimeTarget
from .pt2e_reference import Pt2eReferenceTarget
from .pytorch_engines import FbgemmTarget, QnnpackTarget, X86Target
from .target import Target
from .tflite import TFLiteTarget
from .tflite_micro import TFLiteMicroTarget
from .tosa import TosaTarget
from .xnnpack import XnnpackTarget

_REGISTRY: Dict[str, Target] = {t.name: t for t in (ExactTarget(), TFLiteTarget(), OnnxRuntimeTarget(),
                                                    XnnpackTarget(), FbgemmTarget(), X86Target(),
                                                    QnnpackTarget(), TFLiteMicroTarget(), TosaTarget(),
                                                    ExecutorchXnnpackTarget(), Pt2eReferenceTarget())}
TARGETS = tuple(name for name, target in _REGISTRY.items() if target.trainable)


def get_target(name: str) -> Target:
    if isinstance(name, Target):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownTargetError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None


__all__ = ["TARGETS", "Target", "get_target"]
