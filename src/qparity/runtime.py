"""The integer runtime: `IntegerModel` runs the converted program on integer codes.

Per-layer constants (weights as exact float32 codes, int32 bias, the target's requantizer) are built once
when the model is created. Every operator calls the same accumulation and target functions as the
fake-quant forward, so for every input `IntegerModel(x) == QATModel.eval()(x)` bit for bit. The result
does not depend on the batch size, the thread count or the machine: all sums are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .errors import InputError, ModelFileError
from .graph import Executor, Graph, Node, QValue, fused_clamp_bounds, output_structure
from .numerics import pooling
from .numerics.accumulate import ConvGeometry
from .ops.lookup import CodeTable, PairTable
from .ops.layer import IntegerLayer, layer_accumulator, plan_layer
from .qparams import TORCH_DTYPES, QParams
from .serialize import read_model, save_model
from .numerics import Target, get_target


class IntegerModel:
    """A converted model: integer codes in, integer codes out, exactly as the target runtime computes."""

    def __init__(self, graph: Graph, target: Target | str, activation_dtype: str, qparams: Dict[str, QParams],
                 layers: Dict[str, IntegerLayer]):
        self.graph = graph
        self.target = get_target(target)
        self.activation_dtype = activation_dtype
        self.qparams = qparams
        self.layers = layers
        self.grids = resolve_grids(graph, qparams)
        self.add_tables: Dict[str, PairTable] = {}  # built on first use from the target's own add
        self.hardswish_tables: Dict[str, CodeTable] = {}  # likewise from the target's own hardswish
        self._kernels = {name: self._prepare(graph.node(name), layer) for name, layer in layers.items()}

    def _prepare(self, node: Node, layer: IntegerLayer):
        geometry = ConvGeometry.from_dict(node.attrs["geometry"])
        input_qp, output_qp = self.grids[node.args[0].name], self.qparams[node.name]
        lo, hi = fused_clamp_bounds(self.target, node, output_qp)
        ndim = 4 if geometry.kind == "conv2d" else 2
        # A float bias (PyTorch's engines) goes to the requantizer; an int32 bias into the accumulator.
        float_bias = {"bias": layer.bias_codes} if self.target.float_bias else {}
        acc_bias = None if self.target.float_bias else layer.bias_codes
        requantize = self.target.requantizer(geometry.kind, input_qp, layer.weight_scale, output_qp, lo, hi,
                                             geometry.channel_axis, ndim, **float_bias)
        weight = layer.weight_codes.to(torch.float32)
        if geometry.kind == "conv2d":
            weight = weight.contiguous(memory_format=torch.channels_last)
        plan = plan_layer(geometry, layer.weight_codes, acc_bias, input_qp, self.target)
        return plan, geometry, weight, acc_bias, requantize

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def input_qparams(self) -> Tuple[QParams, ...]:
        return tuple(self.qparams[n.name] for n in self.graph.inputs)

    @property
    def output_qparams(self):
        return output_structure(_output_grids(self.graph, self.grids), lambda v: v.qparams)

    def __call__(self, *inputs: torch.Tensor):
        return self.dequantize(self.run(*_as_tuple(self.quantize(*inputs))))

    def quantize(self, *inputs: torch.Tensor):
        """Float inputs to input codes (int8/uint8), with the target's QUANTIZE semantics."""
        self._check_count(inputs)
        codes = []
        for node, x, shape in zip(self.graph.inputs, inputs, self.graph.input_shapes):
            _check_float_input(node, x, shape)
            qp = self.qparams[node.name]
            codes.append(self.target.quantize(x, qp).to(TORCH_DTYPES[qp.dtype]))
        return codes[0] if len(codes) == 1 else tuple(codes)

    def run(self, *codes: torch.Tensor):
        """Input codes to output codes: the integer program itself."""
        self._check_count(codes)
        for node, q, shape in zip(self.graph.inputs, codes, self.graph.input_shapes):
            _check_codes(node, q, shape, self.qparams[node.name])
        result = _IntegerExecutor(self).run([q.to(torch.int64) for q in codes])
        return output_structure(result, lambda v: v.codes.to(TORCH_DTYPES[v.qparams.dtype]))

    def dequantize(self, codes):
        """Output codes to float32 real values (`(q - z) * s`)."""
        grids = self.output_qparams
        return _zip_structure(codes, grids, lambda q, qp: self.target.dequantize(q.to(torch.int64), qp))

    def save(self, path) -> None:
        save_model(self, path)

    def _check_count(self, values) -> None:
        if len(values) != len(self.graph.inputs):
            raise InputError(f"the model takes {len(self.graph.inputs)} input(s), got {len(values)}")

    def __repr__(self) -> str:
        ops: Dict[str, int] = {}
        for n in self.graph.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        listing = ", ".join(f"{k} x{v}" for k, v in ops.items())
        note = self.target.machine_note()
        return (f"IntegerModel(target={self.target.name}, activations={self.activation_dtype}, "
                f"{len(self.layers)} layers; {listing}{'; ' + note if note else ''})")


def load(path) -> IntegerModel:
    """Load a model saved with `IntegerModel.save`; raises ModelFileError for anything but an intact file."""
    saved = read_model(path)
    try:
        return IntegerModel(saved.graph, saved.target, saved.activation_dtype, saved.qparams, saved.layers)
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{saved.where!r} has an intact checksum but content qparity cannot read: "
                             f"{error}") from error


class _IntegerExecutor(Executor):
    def __init__(self, model: IntegerModel):
        super().__init__(model.graph, model.target)
        self.model = model

    def op_input(self, node, codes):
        return QValue(codes, self.model.qparams[node.name])

    def op_conv2d(self, node, x):
        plan, geometry, weight, bias, requantize = self.model._kernels[node.name]
        acc = layer_accumulator(plan, geometry, x.codes, x.qparams, weight, bias)
        return QValue(requantize(acc), self.model.qparams[node.name])

    op_linear = op_conv2d

    def op_add(self, node, a, b):
        qp = self.model.qparams[node.name]
        lo, hi = self.output_bounds(node, qp)
        if self.target.elementwise_add(a.codes.numel()) and PairTable.fits(a.qparams.qmin, a.qparams.qmax,
                                                                           b.qparams.qmin, b.qparams.qmax):
            table = self.model.add_tables.get(node.name)
            if table is None:
                def add(qa, qb):
                    return self.target.add(qa, a.qparams, qb, b.qparams, qp, lo, hi)
                table = self.model.add_tables[node.name] = PairTable(add, a.qparams.qmin, a.qparams.qmax,
                                                                     b.qparams.qmin, b.qparams.qmax)
            return QValue(table(a.codes, b.codes), qp)
        return QValue(self.target.add(a.codes, a.qparams, b.codes, b.qparams, qp, lo, hi), qp)

    def op_hardswish(self, node, x):
        qp = self.model.qparams[node.name]
        if not self.target.elementwise_hardswish(x.codes.numel()):
            return QValue(self.target.hardswish(x.codes, x.qparams, qp), qp)
        table = self.model.hardswish_tables.get(node.name)
        if table is None:
            table = self.model.hardswish_tables[node.name] = CodeTable(
                lambda q: self.target.hardswish(q, x.qparams, qp), x.qparams.qmin, x.qparams.qmax)
        return QValue(table(x.codes), qp)

    def op_cat(self, node, tensors):
        qp = self.model.qparams[node.name]
        return QValue(self.target.concatenate([t.codes for t in tensors], [t.qparams for t in tensors], qp,
                                              node.attrs["dim"]), qp)

    def op_max_pool2d(self, node, x):
        return QValue(pooling.max_pool2d(x.codes, node.attrs).to(torch.int64), x.qparams)

    def op_avg_pool2d(self, node, x):
        attrs = self.average_pool_attrs(node, x.codes.shape[-2:])
        return QValue(self.target.average_pool(x.codes, x.qparams, attrs), x.qparams)

    def op_dropout(self, node, x):
        return x


def resolve_grids(graph: Graph, qparams: Dict[str, QParams]) -> Dict[str, QParams]:
    """The grid of every tensor value: its own for grid-creating nodes, else its input's."""
    grids: Dict[str, QParams] = {}
    for node in graph.nodes:
        if node.new_grid:
            grids[node.name] = qparams[node.name]
        else:
            source = next((r for r in node.refs() if r in grids), None)
            if source is not None:
                grids[node.name] = grids[source]
    return grids


def _output_grids(graph: Graph, grids: Dict[str, QParams]):
    from .graph import Ref

    def visit(value):
        if isinstance(value, Ref):
            return QValue(torch.empty(0), grids[value.name])
        if isinstance(value, (tuple, list)):
            return type(value)(visit(v) for v in value)
        return value

    return visit(graph.output)


def _zip_structure(values, grids, fn):
    if isinstance(grids, QParams):
        return fn(values, grids)
    if isinstance(grids, (tuple, list)):
        if not isinstance(values, (tuple, list)) or len(values) != len(grids):
            raise InputError(f"expected {len(grids)} output tensors to dequantize")
        return type(grids)(_zip_structure(v, g, fn) for v, g in zip(values, grids))
    return values


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


def _check_shape(node: Node, x: torch.Tensor, shape: tuple) -> None:
    if x.dim() != len(shape) or tuple(x.shape[1:]) != tuple(shape[1:]):
        raise InputError(f"input '{node.name}' has shape {tuple(x.shape)}; the model was captured with "
                         f"{tuple(shape)} (any batch size, the other dimensions fixed)")


def _check_float_input(node: Node, x, shape: tuple) -> None:
    if not isinstance(x, torch.Tensor):
        raise InputError(f"input '{node.name}' must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise InputError(f"input '{node.name}' must be a float tensor, got {x.dtype}; integer codes go to run()")
    _check_shape(node, x, shape)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"input '{node.name}' has {bad} NaN or infinite value(s); no integer code represents them")


def _check_codes(node: Node, q, shape: tuple, qp: QParams) -> None:
    if not isinstance(q, torch.Tensor):
        raise InputError(f"codes for input '{node.name}' must be a torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise InputError(f"codes for input '{node.name}' must be an integer tensor ({qp.dtype}), got {q.dtype}; "
                         "use quantize() for float inputs")
    _check_shape(node, q, shape)
    if q.numel() and (int(q.min()) < qp.qmin or int(q.max()) > qp.qmax):
        raise InputError(f"codes for input '{node.name}' leave the {qp.dtype} range [{qp.qmin}, {qp.qmax}]")
