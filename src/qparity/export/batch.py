"""Whether the integer program computes each sample of a batch on its own.

A .tflite or .pte file has fixed shapes and runs `batch_size` samples at a time (verify feeds larger inputs in chunks),
so a model whose output for one sample depends on another sample of the batch (`x + x[:1]`, a mean over the
batch, a reshape that folds the batch into another dimension) would compute something else in the file. The
check runs the integer program on two random samples together and on each alone and names the first node whose
values differ. Inside the program the batch may sit in another dimension (attention's heads split as
[3, N, heads, T, d]) as long as the samples stay apart there; the model's outputs must lead with it.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..errors import ExportError, QParityError
from ..graph import Node, QValue, Ref, leaves
from ..runtime import IntegerModel

SAMPLES = 2


def first_node_mixing_samples(model: IntegerModel, seed: int = 0) -> Optional[Node]:
    generator = torch.Generator().manual_seed(seed)
    codes = [torch.randint(qp.qmin, qp.qmax + 1, (SAMPLES,) + tuple(shape[1:]), generator=generator)
             for qp, shape in zip(model.input_qparams, model.graph.input_shapes)]
    together = model.executor()
    together.run(codes)
    alone = []
    for i in range(SAMPLES):
        executor = model.executor()
        executor.run([c[i:i + 1] for c in codes])
        alone.append(executor.values)
    outputs = {ref.name for ref in leaves(model.graph.output) if isinstance(ref, Ref)}
    for node in model.graph.nodes:
        if node.op in ("constant", "parameter"):  # the same tensor for every batch, broadcast by its users
            continue
        batch = _codes(together.values[node.name])
        singles = [_codes(values[node.name]) for values in alone]
        for k, tensor in enumerate(batch):
            dims = (0,) if node.name in outputs else range(tensor.dim())
            if not any(_stacks_along(tensor, [single[k] for single in singles], d) for d in dims):
                return node
    return None


def _stacks_along(tensor: torch.Tensor, pieces: List[torch.Tensor], dim: int) -> bool:
    """Whether `tensor` is the one-sample `pieces` concatenated along `dim`."""
    if any(p.dim() != tensor.dim() or p.shape[dim] != 1 for p in pieces):
        return False
    return torch.equal(tensor, torch.cat(pieces, dim=dim))


def _codes(value: Any) -> List[torch.Tensor]:
    return [v.codes for v in leaves(value) if isinstance(v, QValue)]


def refuse_mixed_samples(model: IntegerModel, batch_size: int, file: str) -> None:
    """A file with fixed shapes (`file`: "a .tflite file") runs fixed batches: refuse a program whose samples
    are not computed independently."""
    try:
        node = first_node_mixing_samples(model)
    except (QParityError, RuntimeError, IndexError, TypeError, ValueError) as error:
        raise ExportError(f"the model does not run on batches of other sizes ({error}); {file} runs fixed "
                          f"batches of {batch_size}") from None
    if node is not None:
        raise ExportError(f"{node.op} at {node.path} combines different samples of the batch (or moves the batch "
                          f"dimension); {file} runs fixed batches of {batch_size} samples, so its codes "
                          "would differ")
