"""The prepared model: runs the integer program's graph with observers and straight-through gradients.

In eval mode (and in train mode for every layer without BatchNorm) each operator's forward value is exactly
what the integer runtime computes, because it calls the same accumulation and the same target functions.
Train mode with BatchNorm uses batch statistics, as BatchNorm must while it learns; `freeze` folds it.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from ..errors import InputError
from ..graph import Graph, output_structure, resolve_grids
from ..numerics import Target
from ..ops.layer import IntegerLayer
from ..ops.program import FakeQuant, ProgramExecutor
from ..qparams import QParams, constant_qparams
from .layers import QATLayer
from .observers import ActivationObserver
from .slopes import QATSlope


class QATModel(nn.Module):
    """What `prepare_qat` returns: train it like any module, then `freeze` and `convert` it."""

    def __init__(self, graph: Graph, layers: Dict[str, QATLayer], target: Target, activation_dtype: str,
                 per_channel: bool, slopes: Dict[str, QATSlope] | None = None,
                 tensors: Dict[str, nn.Module] | None = None, capture_method: str = "torch.fx"):
        super().__init__()
        self.capture_method = capture_method  # how prepare_qat captured the model: "torch.fx" or "torch.export"
        self.graph = graph
        self.target = target
        self.activation_dtype = activation_dtype
        self.per_channel = per_channel
        self.layers = nn.ModuleDict(layers)
        self.slopes = nn.ModuleDict(slopes or {})  # prelu node -> its learned slope
        self.tensors = nn.ModuleDict(tensors or {})  # parameter node -> the module holding it as `weight`
        # node -> (its grids, the table of its code-only op on them): reused while the grids stay the same
        self.fake_tables: Dict[str, tuple] = {}
        self.observers = nn.ModuleDict({n.name: ActivationObserver(activation_dtype, n.path)
                                        for n in graph.nodes if n.new_grid})
        for node in graph.nodes:  # grids the target's runtime imposes (TFLite's LOGISTIC: 1/256, -128), constants'
            fixed = target.fixed_output_qparams(node.op, activation_dtype) if node.new_grid else None
            if node.op == "constant":
                fixed = constant_qparams(node.attrs["value"], activation_dtype)
            if fixed is not None:
                self.observers[node.name].fix(fixed)

    @property
    def frozen(self) -> bool:
        return all(o.frozen for o in self.observers.values()) and all(l.frozen for l in self.layers.values())

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self.graph.inputs):
            raise InputError(f"the model takes {len(self.graph.inputs)} input(s), got {len(inputs)}")
        # each node's value dropped after its last use (what the backward needs, autograd keeps)
        result = ProgramExecutor(self.graph, self.target, FakeQuant(self), keep_values=False).run(list(inputs))
        return output_structure(result, lambda v: self.target.dequantize(v.codes, v.qparams))

    def qparams(self, name: str) -> QParams:
        return self.observers[name].qparams()

    @torch.no_grad()
    def integer_program(self) -> Tuple[Dict[str, QParams], Dict[str, IntegerLayer]]:
        """Every grid's qparams and every layer's integer constants as they stand, read through the functions
        the forward uses; raises for a parameter no runtime represents, naming the layer and channel."""
        qparams = {name: observer.qparams() for name, observer in self.observers.items()}
        grids = resolve_grids(self.graph, qparams)
        layers = {name: layer.integer(grids[self.graph.node(name).args[0].name], qparams[name])
                  for name, layer in self.layers.items()}
        return qparams, layers

    def extra_repr(self) -> str:
        return f"target={self.target.label()}, activations={self.activation_dtype}, {len(self.graph.nodes)} nodes, captured with {self.capture_method}"
