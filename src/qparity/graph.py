"""The integer program's graph: a list of operator nodes in execution order.

The same `Graph` drives the fake-quant forward (`qat`) and the integer runtime (`runtime`), both through
one executor (ops/program.py), and the exporters. The graph is plain data: it serializes to JSON (`to_dict`) with no code objects.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from .errors import UnsupportedOpError
from .numerics import pooling
from .ops.registry import FLOAT_VALUE_OPS, NEW_GRID_OPS
from .qparams import QParams


@dataclass(frozen=True)
class Ref:
    """A reference to the value another node produced."""

    name: str


@dataclass
class Node:
    name: str
    op: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    path: str = ""

    @property
    def new_grid(self) -> bool:
        """Whether this node's output gets quantization parameters of its own (an observer)."""
        return self.op in NEW_GRID_OPS

    def refs(self) -> List[str]:
        found: List[str] = []
        collect_refs((self.args, self.kwargs), found)
        return found




@dataclass
class Graph:
    nodes: List[Node]
    output: Any
    input_shapes: List[tuple]

    @property
    def inputs(self) -> List[Node]:
        return [n for n in self.nodes if n.op == "input"]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def to_dict(self) -> dict:
        return {"nodes": [{"name": n.name, "op": n.op, "args": encode(n.args), "kwargs": encode(n.kwargs),
                           "attrs": encode(n.attrs), "path": n.path} for n in self.nodes],
                "output": encode(self.output), "input_shapes": [list(s) for s in self.input_shapes]}

    @classmethod
    def from_dict(cls, data: dict) -> "Graph":
        nodes = [Node(d["name"], d["op"], decode(d["args"]), decode(d["kwargs"]), decode(d["attrs"]), d["path"])
                 for d in data["nodes"]]
        return cls(nodes, decode(data["output"]), [tuple(s) for s in data["input_shapes"]])


def collect_refs(value, found):
    if isinstance(value, Ref):
        found.append(value.name)
    elif isinstance(value, (tuple, list)):
        for v in value:
            collect_refs(v, found)
    elif isinstance(value, dict):
        for v in value.values():
            collect_refs(v, found)


def encode(value):
    """Op arguments to JSON-able data (tuples, slices and refs tagged so they come back as they were)."""
    if isinstance(value, Ref):
        return {"$ref": value.name}
    if isinstance(value, tuple):
        return {"$tuple": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[k, encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UnsupportedOpError(f"cannot store the argument {value!r} of type {type(value).__name__} in the graph")


def decode(value):
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if "$ref" in value:
            return Ref(value["$ref"])
        if "$tuple" in value:
            return tuple(decode(v) for v in value["$tuple"])
        if "$dict" in value:
            return {k: decode(v) for k, v in value["$dict"]}
        if "$slice" in value:
            return slice(*(decode(v) for v in value["$slice"]))
        if "$ellipsis" in value:
            return Ellipsis
        if "$dtype" in value:
            return getattr(torch, value["$dtype"].split(".")[-1])
    return value


# ---------------------------------------------------------------------------------------------------------
# Code-preserving calls: functions that move codes around without changing any value or grid.
# ---------------------------------------------------------------------------------------------------------
def _method(name: str) -> Callable:
    return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)


CODE_PRESERVING_METHODS = ("view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze",
                           "unsqueeze", "chunk", "split", "t", "size", "dim")
CODE_PRESERVING_FUNCTIONS: Dict[str, Callable] = {
    "torch.flatten": torch.flatten, "torch.reshape": torch.reshape, "torch.permute": torch.permute,
    "torch.transpose": torch.transpose, "torch.squeeze": torch.squeeze, "torch.unsqueeze": torch.unsqueeze,
    "torch.chunk": torch.chunk, "torch.split": torch.split, "operator.getitem": operator.getitem,
    "torch.pixel_shuffle": torch.pixel_shuffle, "torch.pixel_unshuffle": torch.pixel_unshuffle,
    "getattr": getattr, "operator.add": operator.add, "operator.sub": operator.sub, "operator.mul": operator.mul,
    "operator.floordiv": operator.floordiv, "operator.truediv": operator.truediv, "operator.pow": operator.pow,
}
CALLS: Dict[str, Callable] = {**{f"method:{m}": _method(m) for m in CODE_PRESERVING_METHODS},
                              **{f"function:{k}": v for k, v in CODE_PRESERVING_FUNCTIONS.items()}}


# ---------------------------------------------------------------------------------------------------------
# Execution
# ---------------------------------------------------------------------------------------------------------
def leaves(value) -> list:
    """The values of a nested tuple/list structure (a program's outputs, a chunk's results), depth first."""
    if isinstance(value, (tuple, list)) and not isinstance(value, torch.Size):
        return [leaf for v in value for leaf in leaves(v)]
    return [value]


@dataclass
class QValue:
    """A quantized tensor on its grid: integer codes (any dtype holding integers) and their QParams."""

    codes: torch.Tensor
    qparams: QParams


class Executor:
    """Runs a Graph, calling `dispatch` for each node: the integer program's executor (ops/program.py) and the
    exporters (one `op_<name>` method per operator) build on it."""

    def __init__(self, graph: Graph, target, keep_values: bool = True,
                 released: Optional[Dict[str, List[str]]] = None):
        self.graph = graph
        self.target = target
        # last_uses(graph), where the caller keeps it for a graph that no longer changes (it walks every node)
        self.released = released
        # keep_values: every node's result of the last run stays in `values`, in execution order (the doctor,
        # golden vectors and exporters read them); otherwise each is dropped after its last use, so a run holds
        # only the values still to be read (a model's forward and run: their peak memory).
        self.keep_values = keep_values
        self.values: Dict[str, Any] = {}

    def run(self, inputs: List[Any]) -> Any:
        env: Dict[str, Any] = {}
        self.values = env
        feed = iter(inputs)
        released = {} if self.keep_values else (self.released if self.released is not None
                                                else last_uses(self.graph))
        for node in self.graph.nodes:
            if node.op == "input":
                env[node.name] = self.dispatch(node, (next(feed),), {})
            else:
                env[node.name] = self.dispatch(node, resolve(node.args, env), resolve(node.kwargs, env))
            for name in released.get(node.name, ()):
                del env[name]
        return resolve(self.graph.output, env)

    def dispatch(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return getattr(self, "op_" + node.op)(node, *args, **kwargs)

    def average_pool_attrs(self, node: Node, input_hw) -> dict:
        """The window of an avg_pool2d node for this input size, and whether it came from an adaptive pool
        (PyTorch's engines run adaptive_avg_pool2d and avg_pool2d through kernels that round differently)."""
        attrs = pooling.window_attrs(node.attrs, tuple(input_hw), node.path)
        return {**attrs, "adaptive": "adaptive_output_size" in node.attrs}


def last_uses(graph: Graph) -> Dict[str, List[str]]:
    """Per node, the values whose last reader it is (a value nothing reads: its own node), the graph's outputs
    excepted: what a run may drop once that node has run."""
    last: Dict[str, str] = {}
    for node in graph.nodes:
        last[node.name] = node.name
        refs: List[str] = []
        collect_refs((node.args, node.kwargs), refs)
        for name in refs:
            last[name] = node.name
    outputs: List[str] = []
    collect_refs(graph.output, outputs)
    released: Dict[str, List[str]] = {}
    for name, reader in last.items():
        if name not in outputs:
            released.setdefault(reader, []).append(name)
    return released


def fused_clamp_bounds(target, node: Node, qp: QParams):
    low, high = node.attrs.get("clamp") or (None, None)
    return target.activation_bounds(low, high, qp)


def resolve(value, env):
    if isinstance(value, Ref):
        return env[value.name]
    if isinstance(value, tuple):
        return tuple(resolve(v, env) for v in value)
    if isinstance(value, list):
        return [resolve(v, env) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v, env) for k, v in value.items()}
    return value


def flatten_values(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from flatten_values(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from flatten_values(v)
    else:
        yield value


def map_qvalues(value, fn: Callable[[QValue], Any]):
    """value with fn applied to every QValue in its nested tuples, lists and dicts (anything else as it is)."""
    if isinstance(value, QValue):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_qvalues(v, fn) for v in value)
    if isinstance(value, list):
        return [map_qvalues(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_qvalues(v, fn) for k, v in value.items()}
    return value


def unwrap(value):
    return map_qvalues(value, lambda v: v.codes)


def wrap(value, grid: QParams):
    if isinstance(value, torch.Tensor):
        return QValue(value, grid)
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(wrap(v, grid) for v in value)
    return value


def output_structure(value, leaf: Callable[[QValue], Any]):
    """Apply `leaf` to every quantized tensor of a graph output (a tensor, or tuples/lists of them)."""
    if isinstance(value, QValue):
        return leaf(value)
    if isinstance(value, (tuple, list)):
        return type(value)(output_structure(v, leaf) for v in value)
    return value


def optional_grid(values) -> Optional[QParams]:
    for v in flatten_values(values):
        if isinstance(v, QValue):
            return v.qparams
    return None


def resolve_grids(graph: Graph, qparams: Dict[str, QParams]) -> Dict[str, QParams]:
    """The grid of every quantized value: its own for grid-creating nodes, else its input's (a float32 value of
    an aten_float node has none)."""
    grids: Dict[str, QParams] = {}
    for node in graph.nodes:
        if node.op in FLOAT_VALUE_OPS:
            continue
        if node.new_grid:
            grids[node.name] = qparams[node.name]
        else:
            source = next((r for r in node.refs() if r in grids), None)
            if source is not None:
                grids[node.name] = grids[source]
    return grids
