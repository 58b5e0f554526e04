"""prepare_qat and freeze: from a float nn.Module to a trainable model whose forward is the integer program."""
from __future__ import annotations

import copy
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..capture import capture
from ..errors import InvalidQParamsError, NotPreparedError, UnsupportedOpError
from ..graph import Graph
from ..numerics.accumulate import ConvGeometry
from ..numerics import Target, get_target
from ..ops.registry import OPERATORS
from .layers import QATLayer
from .model import QATModel


def prepare_qat(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, target: str = "exact",
                *, per_channel: bool = True, activation_dtype: Optional[str] = None) -> QATModel:
    """Capture `model` (a copy; the original is untouched) and make it quantization-aware for `target`.

    per_channel: one weight scale per output channel (True) or per tensor.
    activation_dtype: the activation code dtype where the target allows a choice (`target.activation_dtypes`).
    """
    spec = get_target(target)
    dtype = activation_dtype or spec.activation_dtypes[0]
    if dtype not in spec.activation_dtypes:
        raise InvalidQParamsError(f"target {spec.name!r} supports activation dtypes {spec.activation_dtypes}, "
                                  f"not {dtype!r}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    graph, layers = capture(copy.deepcopy(model), inputs)
    refuse_what_the_target_cannot_run(graph, layers, spec)
    qat_layers = {}
    for node in graph.nodes:
        if node.op in ("conv2d", "linear"):
            geometry = ConvGeometry.from_dict(node.attrs["geometry"])
            qat_layers[node.name] = QATLayer(layers[node.name], geometry, spec, per_channel, node.path)
    prepared = QATModel(graph, qat_layers, spec, dtype, per_channel)
    return prepared.train(model.training)


def refuse_what_the_target_cannot_run(graph: Graph, layers, target: Target) -> None:
    """Raise UnsupportedOpError, naming the module, for an operator (or a conv configuration) the target's
    runtime cannot run exactly: before any training, not at the first forward."""
    for node in graph.nodes:
        op = OPERATORS[node.op]
        if target.name in op.refused_by:
            raise UnsupportedOpError(
                f"{node.op} at {node.path} cannot run on target {target.name!r}: {op.refused_by[target.name]}; "
                f"targets that run it: {', '.join(op.targets())}")
        if node.op in ("conv2d", "linear"):
            geometry = ConvGeometry.from_dict(node.attrs["geometry"])
            try:
                target.accumulation(geometry, tuple(layers[node.name].module.weight.shape))
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None


def freeze(model: QATModel) -> QATModel:
    """Stop observers, fold BatchNorm with its running statistics, fix every scale and zero point.

    Idempotent. After freeze the model's forward (in eval mode) is exactly the integer program that
    `convert` produces. Refuses, before changing anything, a model whose integer program no runtime can
    represent (NaN or infinite parameters, out-of-range scales, int32 overflow), naming the layer.
    """
    require_prepared(model, "freeze")
    model.integer_program()
    for observer in model.observers.values():
        observer.freeze()
    for layer in model.layers.values():
        layer.freeze()
    return model


def require_prepared(model, action: str) -> None:
    if not isinstance(model, QATModel):
        raise NotPreparedError(f"{action} expects the model returned by qparity.prepare_qat, got "
                               f"{type(model).__name__}")


@torch.no_grad()
def calibrate(model: QATModel, batches: Iterable) -> QATModel:
    """Let the observers see `batches` without training: BatchNorm keeps its running statistics.

    Each batch is a tensor or a tuple of the model's inputs. Returns the model in eval mode.
    """
    require_prepared(model, "calibrate")
    model.eval()
    observers = list(model.observers.values())
    for observer in observers:
        observer.train()
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for observer in observers:
            observer.eval()
    return model
