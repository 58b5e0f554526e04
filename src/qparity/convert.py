"""convert: a prepared (and usually frozen) QAT model to an `IntegerModel`.

Reads every quantization parameter through the same functions the fake-quant forward uses, so the
integer program is the one the model was trained on. Checks every layer's int32 accumulator range.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .errors import OverflowRiskError
from .graph import Graph
from .ops.layer import check_accumulator_range
from .qat.model import QATModel
from .qat.distributed import require_whole_parameters
from .qat.prepare import require_prepared
from .runtime import IntegerLayer, IntegerModel, resolve_grids
from .numerics.arithmetic import INT32_MAX, INT32_MIN


@torch.no_grad()
def convert(model: QATModel) -> IntegerModel:
    require_prepared(model, "convert")
    require_whole_parameters(model, "convert")
    qparams = {name: observer.qparams() for name, observer in model.observers.items()}
    grids = resolve_grids(model.graph, qparams)
    target = model.target
    layers = {}
    for name, layer in model.layers.items():
        node = model.graph.node(name)
        input_qp = grids[node.args[0].name]
        weight, bias = layer.folded()
        weight_scale = layer.weight_scale(weight).detach().cpu()
        weight_codes = target.quantize_weight(weight.detach().cpu(), weight_scale).to(torch.int8)
        bias_codes = None
        if bias is not None:
            bias_codes = target.quantize_bias(bias.detach().cpu(), input_qp.scale, weight_scale)
            if not target.float_bias:  # PyTorch's engines keep the float32 bias itself
                if bool(((bias_codes < INT32_MIN) | (bias_codes > INT32_MAX)).any()):
                    raise OverflowRiskError(f"layer {layer.where}: a bias does not fit int32 at scale s_in * s_w "
                                            f"(largest |bias code| {float(bias_codes.abs().max()):.0f})")
                bias_codes = bias_codes.to(torch.int32)
        check_accumulator_range(layer.where, weight_codes, None if target.float_bias else bias_codes, input_qp)
        layers[name] = IntegerLayer(weight_codes, weight_scale, bias_codes)
    return IntegerModel(with_slopes(model), target, model.activation_dtype, qparams, layers)


def with_slopes(model: QATModel) -> Graph:
    """The graph with each prelu's slope codes and scale written into its node: the integer program's constants."""
    nodes = []
    for node in model.graph.nodes:
        if node.op == "prelu":
            codes, scale = model.slopes[node.name].codes()
            node = replace(node, attrs={**node.attrs, "slope_codes": [int(c) for c in codes.tolist()],
                                        "slope_scale": scale})
        nodes.append(node)
    return replace(model.graph, nodes=nodes)
