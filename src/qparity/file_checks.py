"""What `read_model` checks in a .qp header before it builds anything from it.

A matching SHA-256 proves the file was not damaged, not that it is well made: anyone who edits a file can
recompute the checksum. So every field is checked against what `save` writes, and each failure raises
`HeaderError` naming the field and the value; `read_model` turns it into a ModelFileError.

Budgets (documented in docs/reliability.md, "Model files"):
- MAX_ELEMENTS: the element count of a declared input shape (its batch included), and of any stored array;
- MAX_DEPTH: how deeply the header's JSON nests (what `save` writes nests about 12 deep).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List

import numpy as np
import torch

from .graph import CALLS, Ref
from .numerics.accumulate import ConvGeometry
from .ops.aten_float import FLOAT_CALLS, FLOAT_LAYERS
from .ops.registry import FLOAT_VALUE_OPS, NEW_GRID_OPS, OPERATORS

MAX_ELEMENTS = 2**28
MAX_DEPTH = 64
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
DTYPES = {"int8": np.int8, "int32": np.int32, "float32": np.float32}
WEIGHT_RANKS = {"conv2d": 4, "conv_transpose2d": 4, "linear": 2}  # each layer operator's weight rank
TAGS = ("$ref", "$tuple", "$dict", "$slice", "$ellipsis", "$dtype")


class HeaderError(ValueError):
    """A header field that `save` never writes."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise HeaderError(message)


def require_type(value, kind, field: str):
    """`value` if it is of `kind` (bool is never taken for an int), else a HeaderError naming the field."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    wrong_bool = isinstance(value, bool) and bool not in kinds
    require(isinstance(value, kinds) and not wrong_bool,
            f"{field} must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__} {_show(value)}")
    return value


def require_keys(entry, keys: Iterable[str], field: str) -> dict:
    require_type(entry, dict, field)
    missing = [k for k in keys if k not in entry]
    require(not missing, f"{field} lacks {', '.join(repr(k) for k in missing)}")
    return entry


def check_depth(value, limit: int = MAX_DEPTH) -> None:
    """Iteratively, so that a deep file cannot exhaust the recursion of the checks that follow."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        require(depth <= limit, f"the header nests deeper than {limit} levels")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def check_shape(shape, field: str, minimum: int = 0) -> int:
    """A list of ints >= `minimum` whose element count is within the budget; returns the element count."""
    require_type(shape, list, field)
    for size in shape:
        require(isinstance(size, int) and not isinstance(size, bool) and size >= minimum,
                f"{field} {_show(shape)} must hold integers >= {minimum}")
    count = math.prod(shape)
    require(count <= MAX_ELEMENTS, f"{field} {_show(shape)} has {count} elements, over qparity's budget of "
                                   f"{MAX_ELEMENTS} (2^28) per tensor")
    return count


def check_arrays(table, data_size: int) -> Dict[str, dict]:
    """The array table: known dtypes, shapes matching byte counts, and offsets that tile the data exactly."""
    require_type(table, list, "'arrays'")
    entries: Dict[str, dict] = {}
    end = 0
    for i, entry in enumerate(table):
        field = f"arrays[{i}]"
        require_keys(entry, ("name", "dtype", "shape", "offset", "nbytes"), field)
        name = require_type(entry["name"], str, f"{field}.name")
        require(name not in entries, f"array {name!r} is declared twice")
        require(entry["dtype"] in DTYPES, f"array {name!r} has dtype {_show(entry['dtype'])}; a .qp file holds "
                                          f"{', '.join(DTYPES)}")
        count = check_shape(entry["shape"], f"the shape of array {name!r}")
        offset = require_type(entry["offset"], int, f"the offset of array {name!r}")
        nbytes = require_type(entry["nbytes"], int, f"the byte count of array {name!r}")
        expected = count * np.dtype(DTYPES[entry["dtype"]]).itemsize
        require(nbytes == expected, f"array {name!r} declares {nbytes} bytes; its shape {entry['shape']} of "
                                    f"{entry['dtype']} takes {expected}")
        require(offset >= end, f"array {name!r} at offset {offset} overlaps the array before it (which ends at {end})")
        require(offset == end, f"array {name!r} starts at offset {offset}, leaving bytes {end}..{offset} unused")
        end = offset + nbytes
        require(end <= data_size, f"array {name!r} ends at byte {end}, beyond the {data_size} bytes of array data")
        entries[name] = entry
    require(end == data_size, f"the arrays end at byte {end} of {data_size}: the rest of the data belongs to none")
    return entries


def check_value(value, field: str) -> None:
    """An encoded op argument (graph.encode's output): plain JSON scalars, lists and the tagged forms only."""
    stack = [value]
    while stack:
        item = stack.pop()
        if item is None or isinstance(item, (bool, int, float, str)):
            continue
        if isinstance(item, list):
            stack.extend(item)
            continue
        require(isinstance(item, dict) and len(item) == 1 and next(iter(item)) in TAGS,
                f"{field} holds {_show(item)}, which is not an encoded value")
        tag, body = next(iter(item.items()))
        if tag == "$ref":
            require_type(body, str, f"a reference in {field}")
        elif tag == "$tuple":
            stack.extend(require_type(body, list, f"a tuple in {field}"))
        elif tag == "$dict":
            for pair in require_type(body, list, f"a dict in {field}"):
                require(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str),
                        f"a dict in {field} holds {_show(pair)}, not a [key, value] pair")
                stack.append(pair[1])
        elif tag == "$slice":
            require(isinstance(body, list) and len(body) == 3, f"a slice in {field} must have 3 parts")
            stack.extend(body)
        elif tag == "$ellipsis":
            require(body is True, f"an ellipsis in {field} must be true")
        else:
            name = require_type(body, str, f"a dtype in {field}")
            require(isinstance(getattr(torch, name.split(".")[-1], None), torch.dtype),
                    f"{field} names dtype {name!r}, which is not a torch dtype")


def check_graph(graph) -> None:
    """Nodes of known operators with unique names, each reading only values computed before it (so the
    graph has no cycles and no undefined values), and input shapes within the budget."""
    require_keys(graph, ("nodes", "output", "input_shapes"), "'graph'")
    names: List[str] = []
    for i, node in enumerate(require_type(graph["nodes"], list, "'graph.nodes'")):
        field = f"graph node {i}"
        require_keys(node, ("name", "op", "args", "kwargs", "attrs", "path"), field)
        name = require_type(node["name"], str, f"{field}'s name")
        require(name not in names, f"two graph nodes are named {name!r}")
        op = require_type(node["op"], str, f"node {name!r}'s op")
        require(op in OPERATORS, f"node {name!r} has op {op!r}, which is not a qparity operator")
        require_type(node["path"], str, f"node {name!r}'s path")
        for part, kind in (("args", "$tuple"), ("kwargs", "$dict"), ("attrs", "$dict")):
            require(isinstance(node[part], dict) and kind in node[part],
                    f"node {name!r}'s {part} must be an encoded {kind[1:]}")
            check_value(node[part], f"node {name!r}'s {part}")
        check_references([node["args"], node["kwargs"]], set(names), f"node {name!r}")
        require(not _references(node["attrs"]), f"node {name!r}'s attrs refer to other nodes")
        names.append(name)
    check_value(graph["output"], "the graph output")
    check_references(graph["output"], set(names), "the graph output")
    shapes = require_type(graph["input_shapes"], list, "'graph.input_shapes'")
    inputs = sum(node["op"] == "input" for node in graph["nodes"])
    require(len(shapes) == inputs, f"the graph has {inputs} input node(s) but {len(shapes)} input shape(s)")
    for i, shape in enumerate(shapes):
        check_shape(shape, f"input shape {i}", minimum=1)


def check_references(value, defined: set, field: str) -> None:
    for name in _references(value):
        require(name in defined, f"{field} refers to {name!r}, which is not a node computed before it")


def check_nodes(nodes, layers: dict) -> None:
    """What each decoded node's operator needs from its entry: layers their geometry and constants, inputs
    no arguments, calls a known function, float nodes a known ATen call."""
    ops = {node.name: node.op for node in nodes}
    for node in nodes:
        check_clamp(node)
        check_float_uses(node, ops)
        if node.op == "aten_float":
            check_float_node(node, layers)
        elif node.op == "quantize":
            require(len(node.args) == 1 and isinstance(node.args[0], Ref) and not node.kwargs,
                    f"quantize node {node.name!r} must take one value")
            require(ops[node.args[0].name] in FLOAT_VALUE_OPS, f"quantize node {node.name!r} quantizes "
                                                               f"{node.args[0].name!r}, which is not a float32 value")
        elif node.op in WEIGHT_RANKS:
            require(node.name in layers, f"{node.op} node {node.name!r} has no entry in 'layers'")
            require(len(node.args) == 1 and isinstance(node.args[0], Ref), f"{node.op} node {node.name!r} must take one "
                                                                   "value")
            geometry = node.attrs.get("geometry")
            require(isinstance(geometry, dict), f"{node.op} node {node.name!r} lacks its geometry")
            kind = ConvGeometry.from_dict(geometry).kind
            require(kind == node.op, f"node {node.name!r} is a {node.op} with a {kind!r} geometry")
        elif node.op == "input":
            require(not node.args and not node.kwargs, f"input node {node.name!r} takes arguments")
        elif node.op == "call":
            fn = node.attrs.get("fn")
            require(isinstance(fn, str) and fn in CALLS, f"call node {node.name!r} calls {_show(fn)}, which is "
                                                         "not one of the calls qparity replays")
            if fn == "function:getattr":  # the attributes capture records (shape, ndim), never private ones
                require(len(node.args) == 2 and isinstance(node.args[1], str) and not node.args[1].startswith("_"),
                        f"call node {node.name!r} reads attribute {_show(node.args[1:])}")
    weighted = {n.name for n in nodes
                if n.op in WEIGHT_RANKS or n.op == "aten_float" and n.attrs["aten"] in FLOAT_LAYERS}
    unknown = sorted(set(layers) - weighted)
    require(not unknown, f"'layers' has entries {unknown} that are no layer node ({', '.join(WEIGHT_RANKS)}, or a "
                         "float conv/linear)")


def check_float_node(node, layers: dict) -> None:
    """An aten_float node runs the ATen call it names, so the call must be one qparity evaluates (a closed list);
    a float conv/linear takes one value and its weight and bias from its layer entry."""
    call = node.attrs.get("aten")
    require(isinstance(call, str) and call in FLOAT_CALLS,
            f"aten_float node {node.name!r} calls {_show(call)}, which is not one of the ATen calls qparity "
            f"evaluates in float32 ({', '.join(FLOAT_CALLS)})")
    if call in FLOAT_LAYERS:
        require(node.name in layers, f"aten_float node {node.name!r} ({call}) has no entry in 'layers'")
        require(len(node.args) >= 2 and isinstance(node.args[0], Ref) and all(a is None for a in node.args[1:3]),
                f"aten_float node {node.name!r} ({call}) must take one value, its weight and bias from 'layers'")


def check_float_uses(node, ops: Dict[str, str]) -> None:
    """Only a float node, a quantize node or the graph output may read a float32 value: every other operator
    takes codes."""
    if node.op in FLOAT_VALUE_OPS or node.op == "quantize":
        return
    floats = [name for name in node.refs() if ops.get(name) in FLOAT_VALUE_OPS]
    require(not floats, f"{node.op} node {node.name!r} takes the float32 value(s) {floats}, not codes")


def check_clamp(node) -> None:
    """A fused clamp (every operator may carry one): (low, high), each None or a number finite in float32
    (the dtype the bounds are quantized in)."""
    if "clamp" not in node.attrs:
        return
    bounds = node.attrs["clamp"]
    require(isinstance(bounds, tuple) and len(bounds) == 2
            and all(b is None or isinstance(b, (int, float)) and not isinstance(b, bool) and abs(b) <= FLOAT32_MAX
                    for b in bounds),
            f"node {node.name!r}'s clamp {_show(bounds)} must be (low, high), each null or a number within float32")


def check_qparams(entries, nodes) -> None:
    require_type(entries, dict, "'qparams'")
    names = {node.name for node in nodes}
    for name, entry in entries.items():
        require(name in names, f"qparams for {name!r}, which is not a graph node")
        field = f"the qparams of {name!r}"
        require_keys(entry, ("scale", "zero_point", "dtype", "axis"), field)
        _require_numbers(entry["scale"], (int, float), f"{field}: scale")
        _require_numbers(entry["zero_point"], int, f"{field}: zero point")
        require_type(entry["dtype"], str, f"{field}: dtype")
        require(entry["axis"] is None or isinstance(entry["axis"], int) and not isinstance(entry["axis"], bool),
                f"{field}: axis must be null or an integer, got {_show(entry['axis'])}")
    missing = [n.name for n in nodes if n.op in NEW_GRID_OPS and n.name not in entries]
    require(not missing, f"nodes {missing} have no qparams")


def check_layer_entry(name: str, entry, arrays: Dict[str, dict]) -> Dict[str, str]:
    """The array names of one layer's constants, each declared in the array table."""
    field = f"layer {name!r}"
    require_keys(entry, ("weight_codes", "weight_scale", "weight_scale_per_channel", "bias_codes"), field)
    require_type(entry["weight_scale_per_channel"], bool, f"{field}: weight_scale_per_channel")
    names = {}
    for part in ("weight_codes", "weight_scale", "bias_codes"):
        if part == "bias_codes" and entry[part] is None:
            continue
        reference = require_keys(entry[part], ("array",), f"{field}: {part}")["array"]
        require(isinstance(reference, str) and reference in arrays,
                f"{field}: {part} names array {_show(reference)}, which the file does not declare")
        names[part] = reference
    return names


def check_layer_arrays(name: str, op: str, per_channel: bool, float_bias: bool, weight: torch.Tensor,
                       scale: torch.Tensor, bias) -> None:
    """Dtypes, shapes and values of one layer's constants: int8 weights of the op's rank, positive finite
    scales (one per output channel, or one), and an int32 bias (float32 for the targets that add a float bias)."""
    field = f"layer {name!r}"
    require(weight.dtype == torch.int8 and weight.dim() == WEIGHT_RANKS[op],
            f"{field}: weight codes must be int8 of rank {WEIGHT_RANKS[op]}, got {weight.dtype} {tuple(weight.shape)}")
    channels = weight.shape[0]
    require(scale.dtype == torch.float32 and tuple(scale.shape) == ((channels,) if per_channel else (1,)),
            f"{field}: weight scale must be float32 of shape {(channels,) if per_channel else (1,)}, got "
            f"{scale.dtype} {tuple(scale.shape)}")
    require(bool(torch.isfinite(scale).all() and (scale > 0).all()), f"{field}: a weight scale is not finite "
                                                                       "and positive")
    if bias is None:
        return
    dtype = torch.float32 if float_bias else torch.int32
    require(bias.dtype == dtype and tuple(bias.shape) == (channels,),
            f"{field}: bias must be {dtype} of shape {(channels,)} for this target, got {bias.dtype} "
            f"{tuple(bias.shape)}")
    require(bool(torch.isfinite(bias.to(torch.float64)).all()), f"{field}: a bias is not finite")


def _require_numbers(value, kind, field: str) -> None:
    values = value if isinstance(value, list) else [value]
    require(bool(values), f"{field} is an empty list")
    for v in values:
        require(isinstance(v, kind) and not isinstance(v, bool), f"{field} must be numbers, got {_show(value)}")


def _references(value) -> List[str]:
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if isinstance(item.get("$ref"), str):
                found.append(item["$ref"])
            else:
                stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
