"""One executor for the integer program, in both of its uses.

`ProgramExecutor` runs a Graph node by node, each through its operator's module (`IMPLEMENTATIONS`). The
operator modules make the same target calls in both modes; the mode only says where the grids and weights
come from and what a result carries:

- `FakeQuant` (the prepared model's forward): grids come from observers that watch the real value the
  operator's float surrogate computes; results carry the surrogate's gradient (straight-through).
- `Integer` (IntegerModel.run): grids are frozen; results are bare codes, and elementwise operators whose
  result depends only on their input codes answer from a table the target's own function filled.
  `Integer(model, narrow=True)` (what IntegerModel.run uses) keeps codes between operators in their grid's own
  dtype (int8, uint8, int16, int32) where an operator makes them so (layers, tables, max pools): 1 to 4 bytes
  per code instead of 8 for every later pass. Only the operator modules that declare `READS_NARROW_CODES`
  receive such codes; every other operator gets them as int64 (`ProgramExecutor.dispatch`), so an operator's
  arithmetic never meets a dtype that could wrap.

So for every input `QATModel.eval()(x) == IntegerModel(x)` holds by construction, and a new operator is one
module that both modes run.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..errors import UnsupportedOpError
from ..graph import Executor, Node, QValue, fused_clamp_bounds, map_qvalues
from ..numerics.layout import memory_order
from ..numerics.compiled import ElementwiseRule, compiles, run_kernel
from ..qparams import TORCH_DTYPES, QParams
from . import activation, add, amax, aten_float, avg_pool, call, cat, clamp, constant, dropout, hardswish, input as input_op, layer, matmul, max_pool, mean, mul, pad, parameter, prelu, quantize, rsqrt, softmax, sub, upsample
from .lookup import CodeTable, PairTable
from .surrogates import Bounds, clamped, quantized_output

# (output grid, lo, hi) -> the target's ElementwiseRule for a tabulated op, or None (ProgramExecutor.new_grid)
RuleFunction = Callable[[QParams, int, int], Optional[ElementwiseRule]]
NARROW_INTEGER_DTYPES = frozenset(TORCH_DTYPES.values())
MISSING = object()

IMPLEMENTATIONS = {
    "input": input_op, "conv2d": layer, "conv_transpose2d": layer, "linear": layer, "add": add, "cat": cat, "hardswish": hardswish,
    "clamp": clamp, "max_pool2d": max_pool, "avg_pool2d": avg_pool, "dropout": dropout, "call": call,
    "mul": mul, "sub": sub, "pad": pad, "upsample_nearest": upsample, "upsample_bilinear": upsample, "amax": amax, "sigmoid": activation, "tanh": activation, "hardsigmoid": activation, "leaky_relu": activation,
    "gelu": activation, "elu": activation, "prelu": prelu, "constant": constant,
    "mean": mean, "rsqrt": rsqrt, "parameter": parameter,
    "matmul": matmul, "softmax": softmax, "aten_float": aten_float, "quantize": quantize,
}

# Computes an operator's output codes from detached int64 input codes (the prepared model's float32 ones where
# new_grid's float_codes), the output grid and its clamp.
CodeFunction = Callable[[List[QValue], QParams, int, int], torch.Tensor]


# The operators whose modules take codes in any integer dtype that holds their grid (READS_NARROW_CODES).
NARROW_CODE_READERS = frozenset(op for op, module in IMPLEMENTATIONS.items()
                                if getattr(module, "READS_NARROW_CODES", False))


class ProgramExecutor(Executor):
    def __init__(self, graph, target, mode, keep_values: bool = True, released=None):
        super().__init__(graph, target, keep_values, released)
        self.mode = mode
        self.narrow = getattr(mode, "narrow", False)

    @property
    def fake(self) -> bool:
        return self.mode.fake

    def dispatch(self, node: Node, args: tuple, kwargs: dict):
        if self.narrow and node.op not in NARROW_CODE_READERS:
            args, kwargs = widened(args), widened(kwargs)
        try:
            return IMPLEMENTATIONS[node.op].run(self, node, *args, **kwargs)
        except UnsupportedOpError as error:  # a grid the runtime refuses, known only once the grids are: name where
            if node.path and node.path not in str(error):
                raise UnsupportedOpError(f"{node.op} at {node.path}: {error}") from None
            raise

    # -- what operator modules call -------------------------------------------------------------------------
    def new_grid(self, node: Node, inputs: List[QValue], real: Optional[Callable[[], torch.Tensor]],
                 codes: CodeFunction, table: Optional[str] = None, grid: Optional[QParams] = None,
                 float_codes: bool = False, rule: Optional[RuleFunction] = None) -> QValue:
        """An operator whose output gets its own grid.

        real: the float surrogate of the dequantized inputs (fake mode only; the observer watches it, and the
        gradient flows through it). codes: the integer kernel, the same call in both modes. table: "code" or
        "pair" where the target declares the result a function of the input code(s) only ("pair_terms" where
        it also forms a term per input code before combining them, Target.add_from_code_terms); the integer
        mode then tabulates `codes` once per node, the fake mode once per grid change. grid: the output grid
        where the target derives it from the inputs' (PyTorch's add_scalar); the observer then holds it instead
        of watching. float_codes: `codes` also takes the prepared model's float32 codes as they are
        (Target.add_takes_float_codes); other codes, and every code in the integer mode, come as int64.
        rule: for a tabulated op, (output grid, lo, hi) -> the target's ElementwiseRule of `codes` or None
        (Target.add_rule); the integer mode runs it as one compiled loop in place of the table where kernels are
        compiled (Integer.tabulated).
        """
        value = clamped_value = None
        bounds = node.attrs.get("clamp") or (None, None)
        if self.fake:
            value = real()
            clamped_value = clamped(value, bounds)
            qp = self.mode.observe(node, clamped_value) if grid is None else self.mode.impose(node, grid)
            lo, hi = fused_clamp_bounds(self.target, node, qp)
        else:
            qp = self.mode.qparams[node.name] if grid is None else grid
            lo, hi = self.mode.clamp_bounds(node, qp)
        detached = [QValue(v.codes.detach(), v.qparams) for v in inputs]
        as_given = self.fake and float_codes and all(v.codes.dtype == torch.float32 for v in detached)
        kernel = lambda vs: codes(vs if as_given else int64_codes(vs), qp, lo, hi)  # noqa: E731
        if table is not None:
            result = self.mode.tabulated(node, table, detached, kernel, (qp, lo, hi), rule)
        else:
            result = kernel(detached)
        return self.emit(result, value, qp, lo, hi, bounds, clamped_value)

    def emit(self, codes: torch.Tensor, real: Optional[torch.Tensor], qp: QParams, lo: int, hi: int,
             bounds: Bounds = (None, None), clamped_real: Optional[torch.Tensor] = None,
             position: Optional[torch.Tensor] = None) -> QValue:
        """Codes on qp's grid; in fake mode with the gradient of `real` through clamp(c / s + z, lo, hi), c the
        real value after the node's fused clamp `bounds` (clamped_real: its values, position: c / s + z, where
        the caller has them; quantized_output)."""
        if not self.fake:
            return QValue(codes, qp)
        return QValue(quantized_output(codes, real, float(qp.scale), float(qp.zero_point), lo, hi, bounds,
                                       clamped_real, position), qp)

    def dequantize(self, value: QValue) -> torch.Tensor:
        return self.target.dequantize(value.codes, value.qparams)


class FakeQuant:
    """The prepared model's mode: observers, trainable layers, straight-through gradients."""

    fake = True

    def __init__(self, model):
        self.model = model

    @property
    def training(self) -> bool:
        return self.model.training

    def observe(self, node: Node, real: torch.Tensor) -> QParams:
        observer = self.model.observers[node.name]
        observer.observe(real)
        return observer.qparams()

    def impose(self, node: Node, qp: QParams) -> QParams:
        """Hold a grid the target derives (so freeze and convert record it), and use it."""
        self.model.observers[node.name].fix(qp)
        return qp

    def slope(self, node: Node):
        """A prelu's slope codes (straight-through to the user's slope) and the slope grid's scale."""
        return self.model.slopes[node.name].codes()

    def tabulated(self, node: Node, kind: str, inputs: List[QValue], codes: Callable, output: tuple,
                  rule: Optional[RuleFunction] = None) -> torch.Tensor:
        """The codes from a table of the target's own function while the grids stay the same, else directly
        (`rule` is the integer runtime's).

        Training moves the grids a little every step, so the table (keyed on the exact grid values, one per
        node) is rebuilt when they move, and only where the tensor has at least twice as many elements as the
        table has entries: there even a table used once is faster than `codes` on every element (measured on
        the fixed-point and float-emulating adds, 2^17 to 2^19 elements).
        """
        grids = [v.qparams for v in inputs]
        scale, zero_point, lo, hi = output[0].scale, output[0].zero_point, output[1], output[2]
        key = (kind, tuple(_grid_key(g) for g in grids), (float(scale), int(zero_point), output[0].dtype), lo, hi)
        stored = self.model.fake_tables.get(node.name)
        if stored is not None and stored[0] == key:
            return stored[1](*(v.codes for v in inputs))
        entries = table_entries(kind, grids)
        if entries is None or max(v.codes.numel() for v in inputs) < 2 * entries:
            return codes(inputs)
        # float32 entries, looked up with the float32 codes as they come: no int64 codes in between.
        table = build_table(kind, grids, codes, torch.float32)
        self.model.fake_tables[node.name] = (key, table)
        return table(*(v.codes for v in inputs))


def _grid_key(qp: QParams) -> tuple:
    return float(qp.scale), int(qp.zero_point), qp.dtype


def table_entries(kind: str, grids: List[QParams]) -> Optional[int]:
    """How many entries the table of a code-only op on these input grids has; None where it is too large."""
    if kind == "code":
        return grids[0].qmax - grids[0].qmin + 1
    if not PairTable.fits(grids[0].qmin, grids[0].qmax, grids[1].qmin, grids[1].qmax):
        return None
    return (grids[0].qmax - grids[0].qmin + 1) * (grids[1].qmax - grids[1].qmin + 1)


def build_table(kind: str, grids: List[QParams], codes: Callable, dtype: torch.dtype = torch.int64):
    """A CodeTable or PairTable of `codes` (the target's own function) on every code of the input grids; a
    "pair_terms" table calls it on a column of a's codes and a row of b's (PairTable's broadcast). dtype: the
    codes the table answers (PairTable's)."""
    if kind == "code":
        return CodeTable(lambda q: codes([QValue(q, grids[0])]), grids[0].qmin, grids[0].qmax, dtype)
    return PairTable(lambda qa, qb: codes([QValue(qa, grids[0]), QValue(qb, grids[1])]),
                     grids[0].qmin, grids[0].qmax, grids[1].qmin, grids[1].qmax, broadcast=kind == "pair_terms",
                     dtype=dtype)


def narrow_dtype(qp: QParams) -> torch.dtype:
    """The grid's own integer dtype: what narrow codes on it are stored as."""
    return TORCH_DTYPES[qp.dtype]


def widened(value):
    """A node's resolved arguments with every QValue's narrow integer codes as int64 (nested tuples, lists and
    dicts as they come; anything else untouched)."""
    return map_qvalues(value, _int64_value)


def _int64_value(value: QValue) -> QValue:
    codes = value.codes
    if codes.dtype == torch.int64 or codes.is_floating_point():
        return value
    return QValue(codes.to(torch.int64), value.qparams)


def int64_codes(values: List[QValue]) -> List[QValue]:
    """The values with int64 codes, which every target function takes (the prepared model's are float32)."""
    return [QValue(v.codes.to(torch.int64), v.qparams) for v in values]


class Integer:
    """The IntegerModel's mode: frozen grids and layer constants, tables for code-only elementwise ops.
    narrow: codes between operators in their grid's own dtype where an operator makes them so (module
    docstring); the values of every node are the same integers either way."""

    fake = False
    training = False

    def __init__(self, model, narrow: bool = False):
        self.model = model
        self.narrow = narrow
        self.qparams = model.qparams
        # Each prelu's frozen slope codes and scale, which convert wrote into the node: tensors built once.
        self.slopes = {node.name: (torch.tensor(node.attrs["slope_codes"], dtype=torch.float32),
                                   float(node.attrs["slope_scale"]))
                       for node in model.graph.nodes if node.op == "prelu"}
        self.bounds = {}  # per node: (lo, hi) of its fused clamp
        self.rules = {}  # per node: the target's ElementwiseRule of a tabulated op, or None

    def slope(self, node: Node):
        return self.slopes[node.name]

    def clamp_bounds(self, node: Node, qp: QParams):
        """fused_clamp_bounds of a node, computed on its first run: the grids are frozen, and some targets derive
        the bounds with float32 tensor arithmetic (XNNPACK's), too slow to repeat on every run."""
        bounds = self.bounds.get(node.name)
        if bounds is None:
            bounds = self.bounds[node.name] = fused_clamp_bounds(self.model.target, node, qp)
        return bounds

    def tabulated(self, node: Node, kind: str, inputs: List[QValue], codes: Callable, output: tuple,
                  rule: Optional[RuleFunction] = None) -> torch.Tensor:
        """The codes from a table of the target's own function, built on first use (the grids are frozen). In the
        narrow mode the table answers in the output grid's own dtype and takes the inputs' codes as they come; the
        target's elementwise rule, where it has one, computes them instead as a native loop or, inside
        compiled_kernels(), one compiled loop, where either takes the operands (`rule_codes`)."""
        if rule is not None and self.narrow:
            result = self.rule_codes(node, rule, inputs, output)
            if result is not None:
                return result
        grids = [v.qparams for v in inputs]
        if table_entries(kind, grids) is None:
            return codes(inputs)
        dtype = narrow_dtype(output[0]) if self.narrow else torch.int64
        table = self.model.tables.get((node.name, dtype))
        if table is None:
            table = self.model.tables[(node.name, dtype)] = build_table(kind, grids, codes, dtype)
        return table(*(v.codes for v in (inputs if self.narrow else int64_codes(inputs))))

    def rule_codes(self, node: Node, rule: RuleFunction, inputs: List[QValue], output: tuple
                   ) -> Optional[torch.Tensor]:
        """The op's codes from the target's ElementwiseRule, as the output grid's dtype: its native loop where it
        takes the operands, else inside compiled_kernels() its compiled kernel; None where the table answers instead:
        no rule on the target, or neither takes the operands. The compiled kernel takes only narrow codes stored
        alike (same shape and strides, dense), for which the table's result layout is the operands' own and the
        compiled loop's is certain to be too."""
        found = self.rules.get(node.name, MISSING)
        if found is MISSING:
            found = self.rules[node.name] = rule(*output)  # grids frozen: once per node
        if found is None:
            return None
        codes = [v.codes for v in inputs]
        dtype = narrow_dtype(output[0])
        if found.native is not None:
            result = found.native(*codes, *found.constants, dtype)
            if result is not None:
                return result
        first = codes[0]
        if found.function is None or not compiles(first) or any(q.dtype not in NARROW_INTEGER_DTYPES or q.shape != first.shape
                                      or q.stride() != first.stride() for q in codes):
            return None
        if memory_order(first)[0] is None:
            return None
        return run_kernel(found.function, *codes, *found.constants, dtype)
