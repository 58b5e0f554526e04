"""prepare_qat and freeze: from a float nn.Module to a trainable model whose forward is the integer program."""
from __future__ import annotations

import copy
import logging
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..capture import capture
from ..errors import InvalidQParamsError, NotPreparedError, UnsupportedOpError
from ..graph import Graph
from ..numerics.accumulate import ConvGeometry
from ..numerics.activations import NAMES as ACTIVATION_NAMES
from ..numerics import TARGETS, Target, get_target
from ..ops.avg_pool import refuse_uneven_windows
from ..ops.registry import LAYER_OPS, refuse_if_target_cannot_run
from .distributed import require_whole_parameters
from .layers import QATLayer
from .model import QATModel
from .slopes import QATSlope

logger = logging.getLogger(__name__)


def prepare_qat(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor, target: str = "exact",
                *, per_channel: bool = True, activation_dtype: Optional[str] = None) -> QATModel:
    """Capture `model` (a copy; the original is untouched) and make it quantization-aware for `target`.

    The capture is torch.fx's symbolic trace, or torch.export where tracing fails (control flow on shapes);
    the result's `capture_method` says which ("torch.fx" or "torch.export").

    per_channel: one weight scale per output channel (True) or per tensor; a layer whose kernel on the target
        takes per-tensor weights only (ConvTranspose2d on PyTorch's engines) gets one scale per tensor.
    activation_dtype: the activation code dtype where the target allows a choice (`target.activation_dtypes`).
    target: a name, or a configured target such as get_target("fbgemm").configured(threads=4,
    memory_format="channels_last"); settings left open are fixed now (`Target.with_defaults_for`).
    """
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    spec = get_target(target).with_defaults_for(inputs)  # engine threads and input layout (docs/determinism.md)
    if not spec.trainable:
        raise UnsupportedOpError(f"target {spec.name!r} describes converted models qparity reads (from_torch), not a "
                                 f"runtime to train for; choose one of {', '.join(TARGETS)}")
    dtype = activation_dtype or spec.activation_dtypes[0]
    if dtype not in spec.activation_dtypes:
        raise InvalidQParamsError(f"target {spec.name!r} supports activation dtypes {spec.activation_dtypes}, "
                                  f"not {dtype!r}")
    graph, layers, capture_method = capture(copy.deepcopy(model), inputs)
    logger.info("prepare_qat captured %s with %s", type(model).__name__, capture_method)
    refuse_what_the_target_cannot_run(graph, layers, spec)
    qat_layers = {}
    for node in graph.nodes:
        if node.op in LAYER_OPS:
            geometry = ConvGeometry.from_dict(node.attrs["geometry"])
            qat_layers[node.name] = QATLayer(layers[node.name], geometry, spec,
                                             per_channel and layer_takes_per_channel_weights(node.op, spec),
                                             node.path)
    slopes = {node.name: QATSlope(layers[node.name].module, node.path) for node in graph.nodes if node.op == "prelu"}
    tensors = {node.name: layers[node.name].module for node in graph.nodes if node.op == "parameter"}
    prepared = QATModel(graph, qat_layers, spec, dtype, per_channel, slopes, tensors, capture_method)
    return prepared.train(model.training)


def refuse_what_the_target_cannot_run(graph: Graph, layers, target: Target) -> None:
    """Raise UnsupportedOpError, naming the module, for an operator (or a conv configuration) the target's
    runtime cannot run exactly: before any training, not at the first forward."""
    for node in graph.nodes:
        refuse_if_target_cannot_run(node.op, node.path, target.name)
        if node.op in ACTIVATION_NAMES:
            try:
                target.check_activation(node.op, dict(node.attrs))
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None
        if node.op == "avg_pool2d":
            try:
                refuse_uneven_windows(target, node.attrs)
                target.check_average_pool(node.attrs)
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None
        if node.op == "max_pool2d":
            try:
                target.check_max_pool(node.attrs)
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None
        if node.op == "softmax":
            try:
                target.check_softmax(node.attrs)
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None
        if node.attrs.get("broadcast"):
            try:
                target.check_broadcast(node.op)
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None
        if node.op in LAYER_OPS:
            geometry = ConvGeometry.from_dict(node.attrs["geometry"])
            try:
                target.layer_target(geometry).accumulation(geometry, tuple(layers[node.name].module.weight.shape))
            except UnsupportedOpError as error:
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None


def layer_takes_per_channel_weights(op: str, target: Target) -> bool:
    """Whether the target's kernel for this layer takes one weight scale per output channel. PyTorch's quantized
    ConvTranspose2d takes per-tensor weights only (fbgemm, x86: "Per Channel Quantization is currently disabled
    for transposed conv"), so there, as in torch.ao's own qconfigs, that layer gets one scale per tensor."""
    return op != "conv_transpose2d" or target.per_channel_transposed_conv


def freeze(model: QATModel) -> QATModel:
    """Stop observers, fold BatchNorm with its running statistics, fix every scale and zero point.

    Idempotent. After freeze the model's forward (in eval mode) is exactly the integer program that
    `convert` produces. Refuses, before changing anything, a model whose integer program no runtime can
    represent (NaN or infinite parameters, out-of-range scales, int32 overflow), naming the layer.
    """
    require_prepared(model, "freeze")
    require_whole_parameters(model, "freeze")
    model.integer_program()
    for observer in model.observers.values():
        observer.freeze()
    for layer in model.layers.values():
        layer.freeze()
    return model


def require_prepared(model, action: str) -> None:
    if not isinstance(model, QATModel):
        wrapper = (" (a wrapper such as DistributedDataParallel: pass its .module)" if hasattr(model, "module")
                   else "")
        raise NotPreparedError(f"{action} expects the model returned by qparity.prepare_qat, got "
                               f"{type(model).__name__}{wrapper}")


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
