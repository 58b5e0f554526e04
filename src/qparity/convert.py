"""convert: a prepared and frozen QAT model to an `IntegerModel`.

Reads every quantization parameter through the same functions the fake-quant forward uses, so the
integer program is the one the model was trained on. Checks every layer's parameters again (training may
have gone on after freeze) and its int32 accumulator range.
"""
from __future__ import annotations

from dataclasses import replace

from .errors import NotFrozenError
from .graph import Graph
from .qat.model import QATModel
from .qat.distributed import require_whole_parameters
from .qat.prepare import require_prepared
from .runtime import IntegerModel


def convert(model: QATModel) -> IntegerModel:
    require_prepared(model, "convert")
    require_whole_parameters(model, "convert")
    if not model.frozen:
        # Unfrozen, every train-mode step moves the scales: the integer model would match the forward only
        # until the next one. freeze fixes the program (and folds BatchNorm) once, explicitly.
        raise NotFrozenError("convert needs a frozen model: call qparity.freeze(model) first; it folds BatchNorm "
                             "and fixes every scale, so the integer model is the one model.eval() computes")
    qparams, layers = model.integer_program()
    return IntegerModel(with_slopes(model), model.target, model.activation_dtype, qparams, layers)


def with_slopes(model: QATModel) -> Graph:
    """The graph with each prelu's slope codes and scale, and each parameter's codes, written into its node: the
    integer program's constants."""
    nodes = []
    for node in model.graph.nodes:
        if node.op == "parameter":
            value = model.tensors[node.name].weight.detach()
            codes = model.target.quantize(value, model.qparams(node.name))
            node = replace(node, attrs={**node.attrs, "codes": [int(c) for c in codes.reshape(-1).tolist()]})
        if node.op == "prelu":
            codes, scale = model.slopes[node.name].codes()
            node = replace(node, attrs={**node.attrs, "slope_codes": [int(c) for c in codes.tolist()],
                                        "slope_scale": scale})
        nodes.append(node)
    return replace(model.graph, nodes=nodes)
