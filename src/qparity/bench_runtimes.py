"""ONNX Runtime and LiteRT running qparity's own exported files: extra rows of `qparity bench`'s inference table.

The `onnxruntime` target's IntegerModel exported to .onnx runs in ONNX Runtime (CPU provider), the `xnnpack`
target's to .tflite in LiteRT's default interpreter (the XNNPACK delegate), each with the bench's thread
count. The files take float32 inputs and return float32 outputs (their QUANTIZE and DEQUANTIZE included);
`IntegerModel.run` maps codes to codes, so these rows carry the two end conversions the other rows do not.
A .tflite file has a fixed batch size (export_tflite: 1 by default); a larger batch runs as that many invocations.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

import torch

# (target, file suffix, runtime) of each row; a row whose runtime is not importable is left out.
EXPORTED = (("onnxruntime", ".onnx", "ONNX Runtime"), ("xnnpack", ".tflite", "LiteRT"))

Runner = Callable[[torch.Tensor], Callable[[], object]]  # float input batch -> one timed inference


def exported_runners(models: Dict[str, object], directory: str, threads: int) -> Dict[str, Runner]:
    """Per row name ("ONNX Runtime: onnxruntime .onnx"), a function of the input giving one timed run."""
    from .export import export

    runners: Dict[str, Runner] = {}
    for target, suffix, runtime in EXPORTED:
        if target not in models:
            continue
        make = _onnxruntime if suffix == ".onnx" else _litert
        try:
            path = os.path.join(directory, target + suffix)
            export(models[target], path)
            runners[f"{runtime}: {target} {suffix}"] = make(path, threads)
        except ImportError:
            continue
    return runners


def _onnxruntime(path: str, threads: int) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def runner(x: torch.Tensor) -> Callable[[], object]:
        feed = {name: x.numpy()}
        return lambda: session.run(None, feed)

    return runner


def _litert(path: str, threads: int) -> Runner:
    """The .tflite file holds the batch size it was exported with (its reshapes too), so a larger batch runs as
    consecutive invocations of that size, as `run_tflite` feeds it."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    detail = interpreter.get_input_details()[0]
    size = int(detail["shape"][0])

    def runner(x: torch.Tensor) -> Callable[[], object]:
        chunks = [x[start:start + size].numpy() for start in range(0, x.shape[0], size)]

        def run():
            for chunk in chunks:
                interpreter.set_tensor(detail["index"], chunk)
                interpreter.invoke()

        return run

    return runner
