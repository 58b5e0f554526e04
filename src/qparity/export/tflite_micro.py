"""Run a .tflite file in TFLite for Microcontrollers' interpreter (the optional extra `tflm`).

The file is the one `export_tflite` writes for every LiteRT target; TFLM runs it with its own kernels, which
target `tflite-micro` follows (numerics/tflite_micro.py).
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from ..errors import ExportError

ARENA_SLACK = 64 * 1024  # bytes beyond the tensors' own: TFLM's per-op data and alignment


def require_tflite_micro():
    """The `tflite_micro.runtime` module, or an ExportError saying how to install it."""
    try:
        from tflite_micro import runtime
    except ImportError as error:
        raise ExportError(f"TFLite Micro is not installed ({error}); pip install \"qparity[tflm]\"") from None
    return runtime


def arena_size(model: bytes, subgraph) -> int:
    """A tensor arena that holds every tensor of the file twice over: TFLM's default (10x the file size) is too
    small for files whose activations outweigh their weights."""
    tensor_bytes = sum(4 * int(np.prod(t.shape if t.shape is not None else [1])) for t in subgraph.tensors)
    return 2 * (len(model) + tensor_bytes) + ARENA_SLACK


def run_tflite_micro(path, inputs: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The file's float32 outputs for `inputs` in TFLM's interpreter, fed in chunks of the file's batch size."""
    runtime = require_tflite_micro()
    with open(path, "rb") as f:
        model = f.read()
    subgraph = runtime.convert_bytearray_to_object(bytearray(model)).subgraphs[0]
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_size(model, subgraph))
    batch = int(interpreter.get_input_details(0)["shape"][0])
    total = int(inputs[0].shape[0])
    if total % batch:
        raise ExportError(f"the file takes batches of {batch}; {total} samples do not split into them")
    chunks: List[List[np.ndarray]] = []
    for start in range(0, total, batch):
        for index, x in enumerate(inputs):
            interpreter.set_input(np.ascontiguousarray(x[start:start + batch].detach().numpy(), np.float32), index)
        interpreter.invoke()
        chunks.append([np.array(interpreter.get_output(i)) for i in range(len(subgraph.outputs))])
    return [torch.from_numpy(np.concatenate(parts)) for parts in zip(*chunks)]
