"""Capture through torch.export, for a forward torch.fx cannot trace (Python control flow on shapes, asserts,
loops over sizes): the model is exported (non-strict, so the forward runs as Python with concrete shapes and
its branches resolve), and the ATen graph is rewritten into the torch-level fx graph `capture` reads:

- the ATen nodes of each call of a torch.nn leaf module (outermost in the node's `nn_module_stack`) become one
  call_module of the model's own module, so BatchNorm folding, module names and parameter ownership are those of
  the fx capture;
- parameters and buffers become get_attr of the model's own tensors;
- every other ATen op becomes the torch function or Tensor method capture already maps, through one table
  (`ATEN_FORMS`); an op outside it raises UnsupportedOpError naming the op and its module.

The batch dimension is exported as dynamic, so sizes read from it stay nodes of the graph (`x.size(0)`) and the
program runs any batch size, as a traced one does; a forward that fixes the batch size is refused.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.export.graph_signature import InputKind, OutputKind
from torch.utils import _pytree

from .errors import CaptureError, UnsupportedOpError

aten = torch.ops.aten
Form = Tuple[str, Any, tuple, dict]  # (fx op, target, args, kwargs)


def is_leaf_module(module: nn.Module) -> bool:
    """A torch.nn module other than a container: a leaf of torch.fx's tracer, one call_module of the capture."""
    return module.__module__.startswith("torch.nn") and not isinstance(module, (nn.Sequential, nn.ModuleList))


def _function(fn: Callable, count: Optional[int] = None) -> Callable[[tuple, dict], Form]:
    """An ATen op whose leading positional arguments are those of `fn` (the rest are ATen's own, e.g.
    layer_norm's cudnn_enable)."""
    return lambda args, kwargs: ("call_function", fn, args[:count], kwargs)


def _method(name: str) -> Callable[[tuple, dict], Form]:
    return lambda args, kwargs: ("call_method", name, args, kwargs)


def _index(dim: int, index) -> tuple:
    return (slice(None),) * dim + (index,)


def _slice(args, kwargs) -> Form:
    x, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    return "call_function", operator.getitem, (x, _index(dim % x.meta["val"].dim(), slice(start, end, step))), {}


def _select(args, kwargs) -> Form:
    x, dim, index = args
    return "call_function", operator.getitem, (x, _index(dim % x.meta["val"].dim(), index)), {}


def _constant_pad(args, kwargs) -> Form:
    return "call_function", F.pad, (args[0], args[1], "constant", args[2] if len(args) > 2 else 0.0), {}


def _reversed_sub(args, kwargs) -> Form:
    """`c - x` (rsub(x, c)) as capture reads `c - x`."""
    return "call_function", torch.sub, (args[1], args[0]), kwargs


def _upsample(mode: str) -> Callable[[tuple, dict], Form]:
    """upsample_*2d.vec (x, size, [align_corners,] scale_factors) as F.interpolate; the .default overloads give
    the output size, which capture reads from the output anyway."""
    def form(args, kwargs) -> Form:
        fixed = 2 if mode == "nearest" else 3
        x, size, align = args[0], args[1], (args[2] if mode == "bilinear" else None)
        scale = args[fixed] if len(args) == fixed + 1 else None
        return "call_function", F.interpolate, (x, size, scale, mode, align), {}
    return form


ATEN_FORMS: Dict[Any, Callable[[tuple, dict], Form]] = {
    aten.conv2d: _function(F.conv2d), aten.conv1d: _function(F.conv1d),
    aten.conv_transpose2d: _function(F.conv_transpose2d), aten.linear: _function(F.linear),
    aten.relu: _function(F.relu), aten.relu6: _function(F.relu6),
    aten.hardtanh: _function(F.hardtanh), aten.clamp: _function(torch.clamp), aten.sigmoid: _function(torch.sigmoid),
    aten.tanh: _function(torch.tanh), aten.hardsigmoid: _function(F.hardsigmoid), aten.hardswish: _function(F.hardswish),
    aten.silu: _function(F.silu), aten.gelu: _function(F.gelu), aten.leaky_relu: _function(F.leaky_relu),
    aten.rsqrt: _function(torch.rsqrt), aten.add: _function(torch.add), aten.sub: _function(torch.sub),
    aten.mul: _function(torch.mul), aten.div: _function(torch.div), aten.pow: _function(torch.pow),
    aten.matmul: _function(torch.matmul), aten.bmm: _function(torch.bmm), aten.mean: _function(torch.mean),
    aten.amax: _function(torch.amax), aten.softmax: _function(torch.softmax, 2),
    aten._softmax: _function(torch.softmax, 2), aten.cat: _function(torch.cat), aten.concat: _function(torch.cat),
    aten.flatten: _function(torch.flatten), aten.max_pool2d: _function(F.max_pool2d),
    aten.avg_pool2d: _function(F.avg_pool2d), aten.adaptive_avg_pool2d: _function(F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool1d: _function(F.adaptive_avg_pool1d), aten.pad: _function(F.pad),
    aten.constant_pad_nd: _constant_pad, aten.layer_norm: _function(F.layer_norm, 5),
    aten.scaled_dot_product_attention: _function(F.scaled_dot_product_attention),
    aten.dropout: _function(F.dropout, 2), aten.pixel_shuffle: _function(torch.pixel_shuffle),
    aten.pixel_unshuffle: _function(torch.pixel_unshuffle), aten.upsample_nearest2d: _upsample("nearest"),
    aten.upsample_bilinear2d: _upsample("bilinear"), aten.slice: _slice, aten.select: _select,
    aten.view: _method("view"), aten._unsafe_view: _method("view"), aten.reshape: _method("reshape"),
    aten.permute: _method("permute"), aten.transpose: _method("transpose"), aten.unsqueeze: _method("unsqueeze"),
    aten.squeeze: _method("squeeze"), aten.chunk: _method("chunk"), aten.split: _method("split"),
    aten.t: _method("t"), aten.contiguous: _method("contiguous"), aten.sym_size: _method("size"),
    aten.split_with_sizes: _method("split"), aten.rsub: _reversed_sub,
}
# In-place ops: export reads the mutated tensor through the in-place node afterwards, so the out-of-place form
# computes the same wherever nothing reads the tensor's old value or a view of it (checked in `_Rewriter`).
IN_PLACE = {aten.add_: aten.add, aten.sub_: aten.sub, aten.mul_: aten.mul, aten.div_: aten.div,
            aten.hardtanh_: aten.hardtanh, aten.clamp_: aten.clamp, aten.sigmoid_: aten.sigmoid, aten.tanh_: aten.tanh,
            aten.hardswish_: aten.hardswish, aten.hardsigmoid_: aten.hardsigmoid, aten.silu_: aten.silu,
            aten.leaky_relu_: aten.leaky_relu}


def _values_only(form: Callable[[tuple, dict], Form]) -> Callable[[tuple, dict, int], Optional[Form]]:
    """A pooling op's (values, indices) outputs: its values as the torch function, its indices refused."""
    return lambda args, kwargs, index: form(args, kwargs) if index == 0 else None


def _unbind_item(args, kwargs, index: int) -> Form:
    """`q, k, v = x` unbinds x along dim 0 (or `x.unbind(dim)`): each item is an index into x, as fx records it."""
    x, dim = (list(args) + [0])[:2]
    return "call_function", operator.getitem, (x, _index(dim % x.meta["val"].dim(), index)), {}


# Ops with several outputs, each written when an `[i]` of it is read; None: that output is refused.
TUPLE_FORMS: Dict[Any, Callable[[tuple, dict, int], Optional[Form]]] = {
    aten.adaptive_max_pool2d: _values_only(_function(F.adaptive_max_pool2d)),
    aten.max_pool2d_with_indices: _values_only(_function(F.max_pool2d, 6)), aten.unbind: _unbind_item,
}
# Ops whose output may share memory with their input.
VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.unsqueeze, aten.squeeze,
         aten.chunk, aten.split, aten.split_with_sizes, aten.unbind, aten.t, aten.contiguous, aten.slice, aten.select,
         aten.flatten, aten.alias, aten.detach, aten.expand}
IDENTITIES = {aten.detach, aten.detach_, aten.alias, aten.clone, aten.lift_fresh_copy}
# Export's runtime checks of shapes and symbols: the captured shapes are those the checks passed for.
CHECKS = {aten._assert_scalar, aten.sym_constrain_range_for_size, aten._assert_tensor_metadata,
          aten.sym_constrain_range}
SYMBOL_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.pow,
                     operator.getitem}


def aten_operators() -> str:
    """The ATen ops this capture maps, for error messages."""
    return ", ".join(sorted(str(op) for op in (*ATEN_FORMS, *TUPLE_FORMS)))


def export_as_fx(model: nn.Module, example_inputs: Tuple[torch.Tensor, ...]) -> fx.GraphModule:
    """`model` exported by torch.export and rewritten as a torch-level fx.GraphModule on the model itself."""
    program = _export(model, example_inputs)
    rewriter = _Rewriter(model, program)
    for node in program.graph.nodes:
        rewriter.add(node)
    traced = fx.GraphModule(model, rewriter.graph)
    traced.graph.eliminate_dead_code()  # parameters read only inside a module call, export's unused outputs
    traced.recompile()
    return traced


def _export(model: nn.Module, inputs: Tuple[torch.Tensor, ...]) -> torch.export.ExportedProgram:
    """Export with a dynamic batch dimension. Export specializes a size of 0 or 1, so a batch of one is exported
    as two copies; the shapes the forward reads otherwise are the example's."""
    batches = {x.shape[0] for x in inputs if x.dim() > 0}
    if len(batches) != 1 or any(x.dim() == 0 for x in inputs):
        raise CaptureError(f"capture through torch.export needs inputs that share a batch dimension 0; got shapes "
                           f"{[tuple(x.shape) for x in inputs]}")
    batch = torch.export.Dim("batch")
    exported_inputs = tuple(torch.cat([x, x]) if x.shape[0] < 2 else x for x in inputs)
    try:
        return torch.export.export(model, exported_inputs, dynamic_shapes=tuple({0: batch} for _ in inputs),
                                   strict=False)
    except Exception as error:  # export raises many kinds; the first line says which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        advice = (BATCH_ADVICE if "Constraints violated (batch)" in first_line else
                  "qparity needs a forward whose Python control flow depends on shapes, not on tensor values")
        raise CaptureError(f"torch.export could not export {type(model).__name__} with a dynamic batch dimension "
                           f"({first_line}). {advice}") from error


BATCH_ADVICE = ("The forward fixes the batch size (it reads it as a Python int: len(x), int(x.shape[0]), a branch "
                "on it), but the program runs any batch size: read it as x.shape[0] or x.size(0), or use -1 in "
                "reshapes")


def _stack_path(node: fx.Node) -> Tuple[str, str]:
    """The innermost module's path and type name from export's nn_module_stack; ('', ...) at top level."""
    stack = node.meta.get("nn_module_stack") or {}
    entries = [v for v in stack.values() if isinstance(v, tuple) and not str(v[0]).startswith("_empty")]
    return (str(entries[-1][0]), str(entries[-1][1]).rsplit(".", 1)[-1]) if entries else ("", "")


class _Rewriter:
    """Builds the torch-level fx graph, one exported node (or one leaf module call) at a time."""

    def __init__(self, model: nn.Module, program: torch.export.ExportedProgram):
        self.model = model
        self.graph = fx.Graph()
        self.env: Dict[str, Any] = {}
        self.state = {spec.arg.name: spec.target for spec in program.graph_signature.input_specs
                      if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
        self.user_inputs = set(program.graph_signature.user_inputs)
        self.user_outputs = [spec.kind == OutputKind.USER_OUTPUT for spec in program.graph_signature.output_specs]
        self.out_spec = program.call_spec.out_spec
        self.order = {n: i for i, n in enumerate(program.graph.nodes)}
        self.group: List[fx.Node] = []  # the nodes of the leaf module call being read
        self.group_key: Optional[str] = None
        self.group_path = ""
        self.called: Dict[str, str] = {}  # nn_module_stack key -> module path, of the calls already made

    # -- reading the exported graph ---------------------------------------------------------------------------
    def add(self, node: fx.Node) -> None:
        key, path = self.leaf_call(node)
        if key != self.group_key:
            self.flush()
        if key is not None:
            self.group.append(node)
            self.group_key = key
            self.group_path = path
            return
        if node.op == "placeholder":
            if node.name in self.state:
                self.env[node.name] = self.graph.get_attr(self.state[node.name])
            elif node.name not in self.user_inputs:
                self.env[node.name] = _Refused("a tensor created in the forward (e.g. torch.tensor(...)); register "
                                               "it as a parameter of a module, or use a Python number")
            else:
                self.env[node.name] = self.graph.placeholder(node.name)
        elif node.op == "output":
            outputs = [v for v, user in zip(node.args[0], self.user_outputs) if user]
            self.graph.output(self.map(_pytree.tree_unflatten(outputs, self.out_spec)))
        elif node.op == "call_function":
            self.add_function(node)
        else:
            raise self.unsupported(node)

    def leaf_call(self, node: fx.Node) -> Tuple[Optional[str], str]:
        """The nn_module_stack key and path of the outermost torch.nn leaf module this node runs inside."""
        for key, entry in (node.meta.get("nn_module_stack") or {}).items():
            try:
                module = self.model.get_submodule(entry[0]) if entry[0] else None
            except (AttributeError, TypeError):
                continue
            if module is not None and is_leaf_module(module):
                return key, entry[0]
        return None, ""

    def add_function(self, node: fx.Node) -> None:
        target = node.target
        packet = getattr(target, "overloadpacket", None)
        if packet in IN_PLACE or packet is aten.relu_:
            self.refuse_unsafe_mutation(node)
            packet = IN_PLACE.get(packet, aten.relu)
        if packet in CHECKS:
            return
        if packet in IDENTITIES:
            self.env[node.name] = self.map(node.args[0], node)
        elif packet in TUPLE_FORMS:
            self.env[node.name] = _Tuple(node, TUPLE_FORMS[packet])
        elif target is operator.getitem and isinstance(self.env.get(getattr(node.args[0], "name", None)), _Tuple):
            source = self.env[node.args[0].name]
            form = source.form(source.node.args, dict(source.node.kwargs), node.args[1])
            if form is None:
                raise self.unsupported(source.node, f"its output [{node.args[1]}] (the indices of return_indices=True)")
            self.emit(node, form)
        elif packet in ATEN_FORMS:
            try:
                form = ATEN_FORMS[packet](node.args, dict(node.kwargs))
            except (TypeError, ValueError, IndexError, KeyError, AttributeError) as error:
                raise self.unsupported(node, f"its arguments {node.args} are not in the form qparity reads "
                                             f"({error})") from error
            self.emit(node, form)
        elif target in SYMBOL_ARITHMETIC:
            self.emit(node, ("call_function", target, node.args, dict(node.kwargs)))
        else:
            raise self.unsupported(node)

    def refuse_unsafe_mutation(self, node: fx.Node) -> None:
        """An in-place op is its out-of-place form unless its input is a view or has views (they would change too),
        or is read after it (that read sees the old value in the graph, the new one in PyTorch)."""
        mutated = node.args[0]
        later = [u for u in mutated.users if u is not node and self.order[u] > self.order[node]]
        is_view = lambda n: n.target is operator.getitem or getattr(n.target, "overloadpacket", None) in VIEWS  # noqa: E731
        if later or is_view(mutated) or any(is_view(u) for u in mutated.users):
            raise self.unsupported(node, "an in-place op on a tensor that is a view, has views, or is read again "
                                         "afterwards (write it out of place: y = y + z)")

    def flush(self) -> None:
        """The nodes of one leaf module call as one call_module of the model's module on its one tensor input."""
        if not self.group:
            return
        group, key, path = self.group, self.group_key, self.group_path
        self.group, self.group_key = [], None
        members = {n.name for n in group}
        module = self.model.get_submodule(path)
        where = f"module '{path}' ({type(module).__name__})"
        if key in self.called:
            raise UnsupportedOpError(f"torch.export split the call of {where} around other operations; capture "
                                     "through torch.export maps one module call to one contiguous run of ops")
        self.called[key] = path
        inputs: List[fx.Node] = []
        for n in group:
            for arg in n.all_input_nodes:
                if (arg.name not in members and arg.name not in self.state and arg not in inputs
                        and isinstance(arg.meta.get("val"), torch.Tensor)):
                    inputs.append(arg)
        results = [n for n in group if any(u.name not in members for u in n.users)]
        if not results:  # a call whose result nothing reads
            return
        if len(inputs) != 1 or len(results) != 1:
            raise UnsupportedOpError(f"{where} takes {len(inputs)} tensor input(s) and gives {len(results)} "
                                     "tensor output(s) in the exported graph; capture through torch.export maps a "
                                     "torch.nn module call with one tensor input and one tensor output")
        x = self.map(inputs[0])
        if isinstance(module, nn.MultiheadAttention):  # self-attention; capture reads its output as [0]
            call = self.graph.call_module(path, (x, x, x))
            self.env[results[0].name] = self.graph.call_function(operator.getitem, (call, 0))
        else:
            self.env[results[0].name] = self.graph.call_module(path, (x,))

    # -- writing the fx graph ---------------------------------------------------------------------------------
    def map(self, value, user: Optional[fx.Node] = None):
        def lookup(n: fx.Node):
            mapped = self.env.get(n.name)
            if mapped is None:
                raise UnsupportedOpError(f"node '{n.name}' ({n.target}) of the exported graph is read where qparity "
                                         "has no value for it (inside a torch.nn module's call)")
            if isinstance(mapped, _Tuple):
                raise self.unsupported(mapped.node, "its outputs read other than one by one ([i])")
            if isinstance(mapped, _Refused):
                raise self.unsupported(user if user is not None else n, f"it reads {mapped.why}")
            return mapped
        return fx.node.map_arg(value, lookup)

    def emit(self, node: fx.Node, form: Form) -> None:
        op, target, args, kwargs = form
        created = self.graph.create_node(op, target, self.map(tuple(args), node), self.map(kwargs, node),
                                         name=node.name)
        path, kind = _stack_path(node)
        if path:
            created.meta["nn_module_stack"] = {path: (path, kind)}
        self.env[node.name] = created

    def unsupported(self, node: fx.Node, why: str = "") -> UnsupportedOpError:
        path, kind = _stack_path(node)
        where = f"module '{path}' ({kind})" if path else "the top-level forward"
        detail = f": {why}" if why else ""
        return UnsupportedOpError(f"unsupported operator {node.target} at node '{node.name}' in {where}{detail} "
                                  f"(captured through torch.export). The ATen operators qparity maps: "
                                  f"{aten_operators()} (their PyTorch forms: docs/ops.md)")


class _Tuple:
    """An op with several outputs, written one `[i]` at a time (`TUPLE_FORMS`)."""

    def __init__(self, node: fx.Node, form: Callable[[tuple, dict, int], Optional[Form]]):
        self.node, self.form = node, form


class _Refused:
    """An input of the exported graph qparity cannot quantize, refused (by name) where a node reads it."""

    def __init__(self, why: str):
        self.why = why
