"""The doctor for an ExecuTorch .pte file lowered from a PT2E model: where the file's codes differ from the
converted model's (the reference Q/DQ graph) and why.

The reference is the converted model read by `from_torch` (target pt2e-reference: every code equal to the
converted graph's) or such a model saved as .qp. The same integer program, on the same grids and int8
weights, is built again for target executorch-xnnpack, the arithmetic of ExecuTorch's XNNPACK delegate (exact
int32 accumulation, XNNPACK's requantization, the bias the partitioner quantizes to int32): its codes are the
doctor's prediction of the file. The report gives, per quantized tensor, how many codes the delegate's rule
moves away from the reference rule; for the outputs, how many codes the file differs from the reference by, and
how many it differs from the prediction by (unexplained: 0 when the delegate's requantization is the whole
story, and reported, never hidden, otherwise).

Nodes XNNPACK's partitioner leaves outside the delegate run in ExecuTorch's own kernels on dequantized float32
values. Which ones is read from the file's program (its kernel calls, export/pte_program.py), each matched to the
reference node it computes; the prediction runs the emulated ones by ExecuTorch's portable kernels
(numerics/executorch_portable.py) and names any other, whose codes then count as unexplained.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import QParityError
from ..graph import Graph, Node, Ref, leaves
from ..numerics import executorch_portable as portable
from ..numerics.executorch_xnnpack import ExecutorchXnnpackTarget, delegate_bias_codes
from ..numerics.pooling import adaptive_as_pooling
from ..runtime import IntegerLayer, IntegerModel

REFERENCE = "pt2e-reference"
DELEGATE = "executorch-xnnpack"


class PteDoctorInputError(QParityError):
    """The reference given to the .pte doctor is not a PT2E reference model."""


@dataclass
class TensorCodes:
    """One quantized tensor (or output): codes compared between two rules or files."""
    name: str
    path: str
    total: int
    mismatched: int
    max_code_diff: int


@dataclass
class PteReport:
    path: str
    ok: bool
    outputs: List[TensorCodes]          # the .pte against the converted model (reference rule)
    unexplained: int                    # output codes where the .pte differs from the delegate prediction
    layers: List[TensorCodes]           # delegate rule against reference rule, per quantized tensor
    first_divergence: Optional[str]
    cause: str
    notes: List[str] = field(default_factory=list)

    @property
    def mismatched(self) -> int:
        return sum(o.mismatched for o in self.outputs)

    @property
    def total(self) -> int:
        return sum(o.total for o in self.outputs)

    def to_json(self) -> str:
        import json

        data = asdict(self)
        data.update(mismatched=self.mismatched, total=self.total)
        return json.dumps(data, indent=2)

    def __str__(self) -> str:
        lines = [f"qparity doctor {self.path}: {self.mismatched} of {self.total} output codes differ from the "
                 f"converted PT2E model (max {max((o.max_code_diff for o in self.outputs), default=0)} apart); "
                 f"{self.unexplained} unexplained"]
        lines += [f"  output {o.name}: {o.mismatched} of {o.total} codes differ, max {o.max_code_diff} apart"
                  for o in self.outputs]
        lines.append("per quantized tensor, the file's rule (the delegate's, target executorch-xnnpack; ExecuTorch's "
                     "portable kernels outside it) against the reference rule:")
        lines += [f"  {t.name} ({t.path}): {t.mismatched} of {t.total} codes differ, max {t.max_code_diff} apart"
                  for t in self.layers]
        if self.first_divergence:
            lines.append(f"first divergence: {self.first_divergence}")
        lines += ["why: " + self.cause] + [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _compare(name: str, path: str, expected: torch.Tensor, actual: torch.Tensor) -> TensorCodes:
    diff = (expected.to(torch.int64) - actual.to(torch.int64)).abs()
    return TensorCodes(name, path, diff.numel(), int((diff != 0).sum()), int(diff.max()) if diff.numel() else 0)


class DelegateAndPortableTarget(ExecutorchXnnpackTarget):
    """Target executorch-xnnpack for the doctor's prediction of a file: a `mean` node still in its graph is one the
    file runs outside the delegate, by ExecuTorch's portable kernel (delegate_model writes the delegated means as
    XNNPACK's qs8 mean, an avg_pool2d)."""

    def mean(self, q, source, out, dims, keepdim):
        return portable.mean_codes(q, source, out, dims, keepdim)


def delegate_model(reference: IntegerModel, values: dict, outside: Sequence[str] = ()) -> IntegerModel:
    """The reference model's program for target executorch-xnnpack: the same graph, grids and int8 weights;
    each float32 bias as the partitioner's int32 codes; a mean over H and W as the whole-image average pool
    ExecuTorch lowers to XNNPACK's qs8 mean (as capture writes a spatial mean), but for the means named in
    `outside`, which the file runs in ExecuTorch's portable kernel. `values`: each node's codes from one run of
    the reference (for the means' input sizes)."""
    nodes: List[Node] = []
    for node in reference.graph.nodes:
        delegated_mean = node.op == "mean" and node.name not in outside
        nodes += _as_average_pool(node, values[node.args[0].name].shape) if delegated_mean else [node]
    layers = {name: _delegate_layer(reference, name, layer) for name, layer in reference.layers.items()}
    graph = Graph(nodes, reference.graph.output, reference.graph.input_shapes)
    return IntegerModel(graph, DelegateAndPortableTarget(), reference.activation_dtype, reference.qparams, layers)


@dataclass
class OutsideDelegate:
    """The file's kernel calls outside the delegate: those matched to a reference node whose ExecuTorch kernel
    the prediction emulates (node name -> call), and the others."""
    emulated: Dict[str, str]
    not_emulated: List[str]


# The quantized_decomposed Q/DQ kernels compute XNNPACK's converts (numerics/executorch_portable.py): the ends
# of every float path, already the prediction's.
_CONVERTS = {"quantized_decomposed::quantize_per_tensor", "quantized_decomposed::dequantize_per_tensor"}


def _mean_call_matches(node: Node, values: dict, arguments: tuple) -> bool:
    """mean.out(self, dim, keepdim, dtype, out): the node's input sizes (but the batch), dims and keepdim."""
    sizes, dims, keepdim = arguments[0].sizes, arguments[1] or (), arguments[2]
    shape = values[node.args[0].name].shape
    rank = len(shape)
    return (tuple(sizes[1:]) == tuple(shape[1:]) and bool(keepdim) == bool(node.attrs["keepdim"])
            and sorted(d % rank for d in dims) == sorted(d % rank for d in node.attrs["dims"]))


def _max_pool_call_matches(node: Node, values: dict, arguments: tuple) -> bool:
    """max_pool2d_with_indices.out(self, kernel_size, stride, padding, dilation, ceil_mode, out, indices)."""
    source, kernel, stride, padding, dilation, ceil_mode = arguments[:6]
    sizes, a = source.sizes, node.attrs
    return (tuple(sizes[1:]) == tuple(values[node.args[0].name].shape[1:])
            and [tuple(kernel), tuple(stride or kernel), tuple(padding), tuple(dilation), bool(ceil_mode)]
            == [tuple(a["kernel_size"]), tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]),
                bool(a["ceil_mode"])])


# ExecuTorch operators whose portable kernel the prediction follows, with the reference op each computes. A max
# pool needs nothing of its own: its codes are the delegate's maximum of codes (numerics/executorch_portable.py).
_EMULATED: Dict[str, tuple] = {"aten::mean": ("mean", _mean_call_matches),
                               "aten::max_pool2d_with_indices": ("max_pool2d", _max_pool_call_matches)}


def outside_delegate(reference: IntegerModel, values: dict, calls) -> OutsideDelegate:
    """Match each kernel call of the file (export/pte_program.py, in execution order) to the first reference node
    of its operator, in graph order, with the same arguments that no earlier call took."""
    emulated: Dict[str, str] = {}
    not_emulated: List[str] = []
    for call in calls:
        if call.operator in _CONVERTS:
            continue
        op, matches = _EMULATED.get(call.operator, (None, None))
        node = next((n for n in reference.graph.nodes if op is not None and n.op == op and n.name not in emulated
                     and matches(n, values, call.arguments)), None)
        if node is None:
            not_emulated.append(str(call))
        else:
            emulated[node.name] = str(call)
    return OutsideDelegate(emulated, not_emulated)


def _as_average_pool(node: Node, shape) -> List[Node]:
    dims = sorted(d % len(shape) for d in node.attrs["dims"])
    if len(shape) != 4 or dims != [2, 3]:
        raise PteDoctorInputError(f"mean over dims {dims} of a rank-{len(shape)} tensor at {node.path}: the .pte "
                                  "doctor predicts only means over H and W of NCHW tensors (XNNPACK's qs8 mean)")
    attrs = {**adaptive_as_pooling(tuple(shape[-2:]), 1, node.path), "adaptive_output_size": [1, 1]}
    if node.attrs["keepdim"]:
        return [Node(node.name, "avg_pool2d", node.args, {}, attrs, node.path)]
    pool = Node(node.name + "_pool", "avg_pool2d", node.args, {}, attrs, node.path)
    return [pool, Node(node.name, "call", (Ref(pool.name), (-1, -2)), {}, {"fn": "method:squeeze"}, node.path)]


def _delegate_layer(reference: IntegerModel, name: str, layer: IntegerLayer) -> IntegerLayer:
    if layer.bias_codes is None:
        return layer
    input_qp = reference.grids[reference.graph.node(name).args[0].name]
    return IntegerLayer(layer.weight_codes, layer.weight_scale,
                        delegate_bias_codes(layer.bias_codes, layer.weight_scale, float(input_qp.scale)))


def doctor_pte(path, reference: Any, inputs: Sequence[torch.Tensor]) -> PteReport:
    """Run the .pte file at `path` (ExecuTorch runtime, XNNPACK delegate) on `inputs` and explain where its
    codes differ from `reference`: a convert_pt2e model or an IntegerModel of target pt2e-reference (from
    `qparity.from_torch` of one, or its .qp)."""
    from ..export.pte import _run, input_shapes, load_method
    from ..export.pte_program import kernel_calls
    from ..export.tflite import codes_from_dequantized
    from ..from_pt2e import from_pt2e, is_pt2e

    inputs = tuple(inputs)
    method = load_method(path)
    if is_pt2e(reference):  # run once at the file's batch size, the one the graph was exported (and guarded) with
        batch = input_shapes(method)[0][0]
        reference = from_pt2e(reference, tuple(x[:batch] for x in inputs))
    if not (isinstance(reference, IntegerModel) and reference.target.name == REFERENCE):
        raise PteDoctorInputError(
            f"the reference for {os.fspath(path)!r} must be the convert_pt2e model the file was lowered from, or "
            f"qparity.from_torch of it (target {REFERENCE!r}); got "
            f"{getattr(getattr(reference, 'target', None), 'name', type(reference).__name__)}. For a .qp of target "
            f"{DELEGATE!r} that qparity exported, run `qparity verify`")
    codes = reference.quantize(*inputs)
    codes = codes if isinstance(codes, tuple) else (codes,)
    want = _tensor_codes(reference, codes)
    outside = outside_delegate(reference, want, kernel_calls(path))
    delegate = delegate_model(reference, want, tuple(outside.emulated))
    predicted = _tensor_codes(delegate, codes)
    grids = leaves(reference.output_qparams)
    files = [codes_from_dequantized(real, grid) for real, grid in zip(_run(method, inputs), grids)]
    expected = leaves(reference.run(*codes))
    predicted_out = leaves(delegate.run(*codes))
    if len(files) != len(expected):
        raise PteDoctorInputError(f"{os.fspath(path)!r} has {len(files)} outputs, the reference model "
                                  f"{len(expected)}: was the file lowered from another model?")
    outputs = [_compare(str(i), "", e, f) for i, (e, f) in enumerate(zip(expected, files))]
    unexplained = sum(int((p.to(torch.int64) != f).sum()) for p, f in zip(predicted_out, files))
    layers = [_compare(n.name, n.path, want[n.name], predicted[n.name]) for n in reference.graph.nodes
              if n.name in reference.qparams and n.op != "input"]
    first = next((t.name for t in layers if t.mismatched), None)
    notes = _notes(reference, outside)
    return PteReport(os.fspath(path), ok=sum(o.mismatched for o in outputs) == 0, outputs=outputs,
                     unexplained=unexplained, layers=layers, first_divergence=first,
                     cause=_cause(layers, unexplained, outside), notes=notes)


def _tensor_codes(model: IntegerModel, codes) -> dict:
    executor = model.executor()
    executor.run([q.to(torch.int64) for q in codes])
    return {name: value.codes for name, value in executor.values.items() if hasattr(value, "codes")}


def _notes(reference: IntegerModel, outside: OutsideDelegate) -> List[str]:
    notes = []
    for name, call in outside.emulated.items():
        node = reference.graph.node(name)
        note = (f"{name} ({node.path}): the file runs {call} outside the XNNPACK delegate, in ExecuTorch's portable "
                "float32 kernel between the converts (executorch 1.5.1), which the prediction emulates "
                "(numerics/executorch_portable.py)")
        if node.op == "mean" and not node.attrs["keepdim"]:
            note += "; write x.mean((2, 3), keepdim=True) to have XNNPACK run it"
        notes.append(note)
    notes += [f"the file runs {call} outside the XNNPACK delegate, in an ExecuTorch kernel the prediction does not "
              "emulate: the codes it moves count as unexplained" for call in outside.not_emulated]
    return notes


def _cause(layers: List[TensorCodes], unexplained: int, outside: OutsideDelegate) -> str:
    moved = [t for t in layers if t.mismatched]
    if not moved:
        text = "the delegate's rule and the reference rule agree on every quantized tensor for these inputs"
    else:
        text = ("ExecuTorch's XNNPACK delegate accumulates in int32 and requantizes with XNNPACK's float32 "
                "multiplier (target executorch-xnnpack, numerics/executorch_xnnpack.py), while the converted PT2E "
                "graph computes each operator in float32 on dequantized values and quantizes with "
                "round(y * (1/scale)) (numerics/pt2e_reference.py); values near a rounding boundary land on "
                "different codes: " + ", ".join(f"{t.name} {t.mismatched} of {t.total}" for t in moved)
                + ". Later tensors also inherit the codes that moved before them.")
    if outside.emulated:
        text += (" The file runs " + ", ".join(outside.emulated) + " outside the delegate, in ExecuTorch's portable "
                 "float32 kernels on the dequantized values (numerics/executorch_portable.py).")
    if unexplained:
        reason = (f"it runs {', '.join(outside.not_emulated)} outside the delegate, which qparity does not emulate"
                  if outside.not_emulated else "it computes something neither the delegate's rule nor ExecuTorch's "
                  "portable kernels, as qparity emulates them, explain: a bug to report with the file")
        text += f" {unexplained} output code(s) of the file differ from that prediction too: {reason}."
    return text
