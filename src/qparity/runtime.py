"""The integer runtime: `IntegerModel` runs the converted program on integer codes.

Per-layer constants (weights as exact float32 codes, int32 bias, the target's requantizer, and oneDNN's packed
int8 weights where its int8 kernels compute the same accumulator: numerics/int8_accumulate.py) are built once
when the model is created. fbgemm, x86 and qnnpack models run on PyTorch's quantized engine itself, node by node where
its kernel is the target's (engine_program.py). Every operator calls the same accumulation and target functions as the
fake-quant forward, so for every input `IntegerModel(x) == QATModel.eval()(x)` bit for bit. The result
does not depend on the batch size, the thread count or the machine: all sums are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Dict, Optional, Tuple

import torch

from .engine_program import engine_program
from .errors import InputError, QParityError
from .graph import Graph, Node, QValue, last_uses, output_structure, resolve_grids
from .ops.aten_float import float_layer_constants
from .ops.input import require_float_input
from .ops.layer import IntegerLayer, prepare_integer_layer
from .ops.program import Integer, ProgramExecutor
from .ops.registry import LAYER_OPS, refuse_if_target_cannot_run
from .qparams import TORCH_DTYPES, QParams
from .serialize import invalid_content, read_model, save_model
from .numerics import Target, get_target
from .numerics.compiled import compiled_kernels, ensure_available


class IntegerModel:
    """A converted model: integer codes in, integer codes out, exactly as the target runtime computes."""

    def __init__(self, graph: Graph, target: Target | str, activation_dtype: str, qparams: Dict[str, QParams],
                 layers: Dict[str, IntegerLayer]):
        self.graph = graph
        # Settings a model from convert or load already carries; any left open are fixed here (no example
        # inputs: PyTorch's default layout), so the codes never follow the caller's threads or layout.
        self.target = get_target(target).with_defaults_for(())
        self.activation_dtype = activation_dtype
        self.qparams = qparams
        self.layers = layers
        self.grids = resolve_grids(graph, qparams)
        # per (node, dtype of the codes it answers), built on first use from the target's own function
        self.tables: Dict[Tuple[str, torch.dtype], object] = {}
        self.layer_kernels = {name: prepare_integer_layer(self.target, graph.node(name), layer,
                                                          self.grids[graph.node(name).args[0].name],
                                                          qparams[name])
                              for name, layer in layers.items() if graph.node(name).op in LAYER_OPS}
        # A float conv/linear read from a PT2E graph (aten_float): its float32 weight and bias, dequantized once.
        self.float_layer_constants = {name: float_layer_constants(layer) for name, layer in layers.items()
                                      if graph.node(name).op not in LAYER_OPS}
        # fbgemm, x86, qnnpack: the program on the engine's own kernels where they are the target's (engine_program.py)
        self.engine_program = engine_program(self)
        self.compiled = False  # compile(): the rules' elementwise passes as compiled kernels (numerics/compiled.py)

    # -- public API -----------------------------------------------------------------------------------------
    @property
    def input_qparams(self) -> Tuple[QParams, ...]:
        return tuple(self.qparams[n.name] for n in self.graph.inputs)

    @property
    def output_qparams(self):
        """The grid of each output; None for a float32 output (a PT2E model's value its quantizer left in float)."""
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
        """Input codes to output codes: the integer program itself (a float32 output, which only a model read from
        a PT2E graph has, comes back as the float32 tensor the graph returns)."""
        self.check_codes(*codes)
        with compiled_kernels(self.compiled):
            if self.engine_program is not None and all(q.device.type == "cpu" for q in codes):
                result = self.engine_program.run(list(codes))
            else:
                # each node's codes dropped after their last use, and held in their grid's own dtype between the
                # operators that read them so (ops/program.py): the run's peak memory and memory traffic
                executor = ProgramExecutor(self.graph, self.target, self._narrow_mode, keep_values=False,
                                           released=self._last_uses())
                result = executor.run([q.to(TORCH_DTYPES[node_grid.dtype]) for q, node_grid
                                       in zip(codes, self.input_qparams)])
        return output_structure(result, lambda v: v.codes.to(TORCH_DTYPES[v.qparams.dtype]))

    def compile(self) -> "IntegerModel":
        """Run the requantizations as compiled kernels from now on (numerics/compiled.py): each layer's
        requantization becomes one fused loop instead of four to six int64 passes; the codes do not change.
        The first run compiles each kernel (seconds, once per process). Raises CompiledKernelsUnavailableError
        where torch.compile cannot build a kernel on this machine. Returns the model."""
        ensure_available()
        self.compiled = True
        return self

    def check_codes(self, *codes: torch.Tensor) -> None:
        """Raise InputError unless `codes` are one integer tensor per input, of its shape, within its grid."""
        self._check_count(codes)
        for node, q, shape in zip(self.graph.inputs, codes, self.graph.input_shapes):
            _check_codes(node, q, shape, self.qparams[node.name])

    def executor(self) -> ProgramExecutor:
        """The program's executor in integer mode (its `values` keep every node's result of a run)."""
        return ProgramExecutor(self.graph, self.target, self._integer_mode)

    @cached_property
    def _integer_mode(self) -> Integer:
        return Integer(self)  # its per-node constants are built once, not per run

    @cached_property
    def _narrow_mode(self) -> Integer:
        return Integer(self, narrow=True)

    def _last_uses(self):
        """last_uses of the model's graph, computed once per graph object (a copy of the model may be given
        another graph: the ONNX exporter's probe outputs every node)."""
        cached = self.__dict__.get("_last_uses_of")
        if cached is None or cached[0] is not self.graph:
            cached = self._last_uses_of = (self.graph, last_uses(self.graph))
        return cached[1]

    def dequantize(self, codes):
        """Output codes to float32 real values (`(q - z) * s`); a float32 output is returned as it is."""
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
        compiled = "; compiled kernels" if self.compiled else ""
        return (f"IntegerModel(target={self.target.label()}, activations={self.activation_dtype}, "
                f"{len(self.layers)} layers; {listing}{'; ' + note if note else ''}{compiled})")


def load(path) -> IntegerModel:
    """Load a model saved with `IntegerModel.save`.

    Raises ModelFileError for anything but an intact, well-formed file, including one whose checksum was
    recomputed after an edit that lets an int32 accumulator overflow (a real runtime would wrap where the
    file's numbers saturate); FileAccessError when the file cannot be read.
    """
    saved = read_model(path)
    try:
        for node in saved.graph.nodes:  # an edited file may name an operator its target cannot run
            refuse_if_target_cannot_run(node.op, node.path, saved.target.name)
        model = IntegerModel(saved.graph, saved.target, saved.activation_dtype, saved.qparams, saved.layers)
        _run_once(model)
    except (QParityError, KeyError, TypeError, ValueError, RuntimeError, IndexError) as error:
        raise invalid_content(saved.where, error) from error
    return model


def _run_once(model: IntegerModel) -> None:
    """Run the program once (every code at the zero point) on one sample of its declared input shapes, or on the
    declared shapes themselves for a program tied to its batch size: arguments the header checks cannot judge
    alone (a reshape to a size that does not fit, a bad dimension) fail here, at load, not at the first call."""
    def run(batch):
        codes = [torch.full((batch or shape[0],) + tuple(shape[1:]), int(model.qparams[node.name].zero_point),
                            dtype=torch.int64) for node, shape in zip(model.graph.inputs, model.graph.input_shapes)]
        model.executor().run(codes)

    try:
        run(1)
    except (RuntimeError, IndexError, TypeError, ValueError):
        try:
            run(None)
        except (RuntimeError, IndexError, TypeError, ValueError) as error:
            raise ValueError(f"the program fails on its own declared input shapes: {error}") from error


def _output_grids(graph: Graph, grids: Dict[str, QParams]):
    from .graph import Ref

    def visit(value):
        if isinstance(value, Ref):
            return QValue(torch.empty(0), grids[value.name]) if value.name in grids else None
        if isinstance(value, (tuple, list)):
            return type(value)(visit(v) for v in value)
        return value

    return visit(graph.output)


def _zip_structure(values, grids, fn):
    if grids is None:  # a float32 output
        return values
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
    require_float_input(node, x)
    _check_shape(node, x, shape)


def _check_codes(node: Node, q, shape: tuple, qp: QParams) -> None:
    if not isinstance(q, torch.Tensor):
        raise InputError(f"codes for input '{node.name}' must be a torch.Tensor, got {type(q).__name__}")
    if q.is_floating_point() or q.is_complex() or q.dtype == torch.bool:
        raise InputError(f"codes for input '{node.name}' must be an integer tensor ({qp.dtype}), got {q.dtype}; "
                         "use quantize() for float inputs")
    _check_shape(node, q, shape)
    low, high = torch.aminmax(q) if q.numel() else (qp.qmin, qp.qmax)  # one pass
    if int(low) < qp.qmin or int(high) > qp.qmax:
        raise InputError(f"codes for input '{node.name}' leave the {qp.dtype} range [{qp.qmin}, {qp.qmax}]")
