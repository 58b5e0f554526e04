"""How the converted model's own outputs move with PyTorch's thread count and the inputs' memory layout.

fbgemm and x86 split add, hardswish, leaky_relu and hardsigmoid into one parallel chunk per thread
(torch.get_num_threads()), and the chunks decide which elements the vector loop rounds; the layout of the
inputs decides which loops and pool kernels run downstream (qparity.numerics.pytorch_engines). The doctor
reruns the converted model under other settings and says how many output values move: a deployed torch.ao
model gives these codes only on machines that run it the same way (docs/determinism.md).
"""
from __future__ import annotations

from typing import Any, List, Tuple

import torch
from torch import nn

from .compare import output_tensors

THREAD_COUNTS = (1, 2, 4)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def _in_layout(inputs: Tuple[Any, ...], layout) -> Tuple[Any, ...]:
    return tuple(x.contiguous(memory_format=layout) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                 for x in inputs)


def _run(converted: nn.Module, inputs: Tuple[Any, ...], threads: int) -> List[torch.Tensor]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return output_tensors(converted(*inputs))
    finally:
        torch.set_num_threads(before)


def variation_notes(converted: nn.Module, example_inputs: Any, engine: str) -> List[str]:
    """One note on the fbgemm / x86 engines: the output values that move under each other thread count and
    layout, against the run with this process's thread count and the inputs as given."""
    if engine not in ("fbgemm", "x86"):
        return []
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    running = torch.get_num_threads()
    reference = _run(converted, inputs, running)
    total = sum(t.numel() for t in reference)
    moved = []
    for name, layout in LAYOUTS.items():
        for threads in THREAD_COUNTS:
            outputs = _run(converted, _in_layout(inputs, layout), threads)
            count = sum(int((a != b).sum()) for a, b in zip(outputs, reference))
            if count:
                moved.append(f"{threads} thread(s) with {name} inputs: {count}")
    tried = f"{', '.join(map(str, THREAD_COUNTS))} threads and contiguous / channels_last inputs"
    if not moved:
        return [f"PyTorch's {engine} engine gave the same {total} output values with {tried} on these inputs; its "
                "add, hardswish, leaky_relu and hardsigmoid still depend on the thread count for tensors over 32768 "
                "elements and on the layout (docs/determinism.md); qparity models fix both"]
    return [f"PyTorch's {engine} engine computes other output values with another thread count or input layout "
            f"(of {total}, against {running} thread(s) and the inputs as given): {'; '.join(moved)}. The deployed "
            "model's codes depend on the machine that runs it; qparity models record both "
            "(prepare_qat(..., target=get_target(name).configured(threads=..., memory_format=...)); "
            "docs/determinism.md)"]
