"""`IntegerModel.run` for the fbgemm, x86 and qnnpack targets on PyTorch's quantized engine itself.

Those targets are defined as what PyTorch's quantized engine computes (numerics/pytorch_engines.py emulates each
kernel; tests/test_numerics_pytorch_engines.py holds the emulation to the real kernels). Where the engine's own
kernel is provably the one the emulation describes, the program runs it on quint8 tensors that flow from one
kernel to the next, as torch.ao's converted model does, and int codes appear only at the program's edges and
around the nodes that keep the emulation. Which node runs where is decided once, when the model is built:

- conv2d / linear: the layer's EngineLayer (numerics/engine_kernels.py: the installed release is the target's,
  an exact accumulator: VNNI/AMX for fbgemm/x86, an int32 bias sum that cannot wrap for qnnpack), at run time
  only for the shapes whose layout is unambiguous;
- add (two tensors of one shape): quantized::add / add_relu. fbgemm, x86: qadd_kernel, while the tensor is
  split into the same parallel chunks as the target's recorded thread count splits it (vector_loop_mask);
  qnnpack: QNNPACK's fixed-point add (elementwise, no chunk condition), for the grids it accepts (scale ratios
  in [2^-14, 2^8), a non-empty ReLU range: the emulation refuses the others with PyTorch);
- hardswish: quantized::hardswish. fbgemm, x86: qhardswish_kernel, under the same chunk condition; qnnpack:
  QNNPACK's lookup table (elementwise);
- max_pool2d, avg_pool2d, adaptive_avg_pool2d: the quantized pools (exact maxima; the average pools' nhwc/nchw
  kernels, which keep the input's grid; on qnnpack, QNNPACK's average pooling where PyTorch runs it, and the
  emulation, which refuses them, for the pools QNNPACK rejects: 1x1 windows, divisor_override);
- a ReLU that is not fused: quantized relu (max(q, z), in the input's layout);
- dropout (the identity here) and flatten/reshape/view where the quint8 result has the codes' strides.

Every other node, and a node whose condition fails for this call's shapes or thread count, runs the emulation
(`ProgramExecutor.dispatch`) on int64 codes of its inputs, and its result is wrapped again for the next kernel.
The engine setting (`torch.backends.quantized.engine`) is the target's during a run: PyTorch's add and pools
dispatch on it. tests/test_engine_program.py compares every node's codes and strides with the emulation.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .errors import UnsupportedOpError
from .graph import CALLS, Node, QValue, Ref, fused_clamp_bounds, last_uses, resolve
from .numerics.engine_kernels import EngineLayer, engine_of, engine_selected
from .numerics.pytorch_engines import PARALLEL_GRAIN
from .qparams import QParams

# Shape calls run on quint8 tensors where the result has the strides of the codes' own result.
VIEW_CALLS = ("function:torch.flatten", "method:flatten", "method:view", "method:reshape", "function:torch.reshape")

# Steps whose codes and layout do not depend on how a 4-D input with ambiguous strides is stored (the layers
# decline those shapes themselves). The others choose kernels or output layouts by strides that the emulation's
# codes may hold differently along dimensions of size 1, so an ambiguous input (_ambiguous_layout) takes the
# emulation.
LAYOUT_FREE = ("conv2d", "linear", "call", "dropout")

# A step computes a node's quint8 result from its resolved arguments, or returns None to hand the node to the
# emulation for this call.
Step = Callable[..., Optional[torch.Tensor]]


def quantized(codes: torch.Tensor, grid: QParams) -> torch.Tensor:
    """Codes on `grid` as a quint8 tensor with the same strides."""
    return torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), float(grid.scale), int(grid.zero_point))


def codes_of(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The codes of a quint8 tensor with its strides: int_repr keeps them for 4-D layouts only (a flattened
    channels-last view comes back contiguous), and later kernels choose their loops by them."""
    codes = q.int_repr()
    if codes.stride() != q.stride():
        codes = torch.empty_strided(q.size(), q.stride(), dtype=codes.dtype).copy_(codes)
    return codes if dtype == codes.dtype else codes.to(dtype)


def _is_quantized(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_quantized


def _ambiguous_layout(value) -> bool:
    """A 4-D tensor that is not dense in exactly one of NCHW and channels-last: both (one channel, a 1x1 image,
    where size-1 strides decide PyTorch's choice) or neither (a slice's view)."""
    return (isinstance(value, torch.Tensor) and value.dim() == 4
            and value.is_contiguous() == value.is_contiguous(memory_format=torch.channels_last))


@lru_cache(maxsize=64)  # a few tensor sizes per model, called per add/hardswish and run
def parallel_chunks(n: int, threads: int) -> int:
    """How many chunks at::parallel_for splits n elements into (GRAIN_SIZE; vector_loop_mask's split)."""
    return max(1, min(threads, -(-n // PARALLEL_GRAIN)))


class EngineProgram:
    """The integer program of an fbgemm, x86 or qnnpack IntegerModel, node by node on the engine's kernels where they
    are the target's (see the module docstring), on the emulation elsewhere."""

    def __init__(self, model, engine: str):
        self.model = model
        self.engine = engine
        self.graph = model.graph
        self.grids: Dict[str, QParams] = model.grids
        self.steps: Dict[str, Optional[Step]] = {node.name: self._step(node) for node in self.graph.nodes}
        self.released = last_uses(self.graph)  # what a run may drop after each node

    @property
    def engine_nodes(self) -> List[str]:
        """The nodes that run on the engine's kernels (where their call-time conditions hold)."""
        return [name for name, step in self.steps.items() if step is not None]

    def run(self, codes: List[torch.Tensor]):
        """Input codes to the output structure of QValues (uint8 codes), as ProgramExecutor.run returns it."""
        with engine_selected(self.engine):
            values = self._run_nodes(codes, keep_values=False)
        return resolve(self.graph.output, {name: values.output(name) for name in self._output_names()})

    # -- the loop -------------------------------------------------------------------------------------------
    def _run_nodes(self, codes: List[torch.Tensor], keep_values: bool = True) -> "_Values":
        """Every node's result (keep_values), or only the outputs: each value dropped after its last use."""
        values = _Values(self.grids)
        feed = iter(codes)
        executor = self.model.executor()
        released = {} if keep_values else self.released
        for node in self.graph.nodes:
            if node.op == "input":
                values.set(node.name, quantized(self.model.target.arrange_input(next(feed)), self.grids[node.name]))
            else:
                step = self.steps[node.name]
                args = None if step is None else [values.quantized(a) for a in node.args]
                result = None if args is None or any(isinstance(a, QValue) for a in args) else step(*args)
                if result is None:
                    result = executor.dispatch(node, values.codes(node.args), values.codes(node.kwargs))
                values.set(node.name, result)
            for name in released.get(node.name, ()):
                values.drop(name)
        return values

    def _output_names(self) -> List[str]:
        names: List[str] = []

        def visit(value):
            if isinstance(value, Ref):
                names.append(value.name)
            elif isinstance(value, (tuple, list)):
                for v in value:
                    visit(v)
        visit(self.graph.output)
        return names

    # -- which kernel runs a node ---------------------------------------------------------------------------
    def _step(self, node: Node) -> Optional[Step]:
        if node.kwargs or any(isinstance(a, (tuple, list, dict)) for a in node.args):
            return None
        build = getattr(self, "_step_" + node.op, None)
        step = None if build is None else build(node)
        if step is None or node.op in LAYOUT_FREE:
            return step
        return lambda *args: None if any(_ambiguous_layout(a) for a in args) else step(*args)

    def _step_conv2d(self, node: Node) -> Optional[Step]:
        kernel = self.model.layer_kernels[node.name]
        engine_layer = None if callable(kernel) else kernel.engine
        return engine_layer.on_quantized if isinstance(engine_layer, EngineLayer) else None

    _step_linear = _step_conv2d

    def _step_add(self, node: Node) -> Optional[Step]:
        if len(node.args) != 2 or not all(isinstance(a, Ref) for a in node.args):
            return None
        grid = self.grids[node.name]
        scale, zero_point = float(grid.scale), int(grid.zero_point)
        lo, hi = fused_clamp_bounds(self.model.target, node, grid)
        if self.engine == "qnnpack" and not qnnpack_add_accepts(self.grids, node, lo, hi):
            return None  # the emulation raises PyTorch's refusal as an UnsupportedOpError
        if (lo, hi) == (0, 255):
            kernel = torch.ops.quantized.add.default
        elif (lo, hi) == (zero_point, 255):
            kernel = torch.ops.quantized.add_relu.default  # qadd_kernel<ReLUFused>: max(q, z_y) in both loops
        else:
            return None

        def add(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
            if not (_is_quantized(a) and _is_quantized(b)) or a.shape != b.shape or not self._split_alike(a.numel()):
                return None  # the emulation refuses broadcasting; other chunks split the loops elsewhere
            return kernel(a, b, scale, zero_point)

        return add

    def _step_hardswish(self, node: Node) -> Optional[Step]:
        grid = self.grids[node.name]
        scale, zero_point = float(grid.scale), int(grid.zero_point)

        def hardswish(x: torch.Tensor) -> Optional[torch.Tensor]:
            return torch.ops.quantized.hardswish.default(x, scale, zero_point) if self._split_alike(x.numel()) else None

        return hardswish

    def _step_max_pool2d(self, node: Node) -> Optional[Step]:
        a = node.attrs
        if self.engine == "qnnpack":
            try:
                self.model.target.check_max_pool(a)
            except UnsupportedOpError:  # a 1x1 window QNNPACK asserts on (prepare_qat refuses it; a loaded model may
                return None             # still hold one): the emulation's max over one code
        return lambda x: F.max_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"])

    def _step_avg_pool2d(self, node: Node) -> Optional[Step]:
        a = node.attrs
        if "adaptive_output_size" in a:
            size = tuple(a["adaptive_output_size"])
            return lambda x: F.adaptive_avg_pool2d(x, size) if x.dim() == 4 else None
        if self.engine == "qnnpack" and not a["ceil_mode"] and (
                tuple(a["kernel_size"]) == (1, 1) or a.get("divisor_override")):
            return None  # QNNPACK rejects these; the emulation refuses them with PyTorch
        return lambda x: (F.avg_pool2d(x, a["kernel_size"], a["stride"], a["padding"], a["ceil_mode"],
                                       a["count_include_pad"], a.get("divisor_override"))
                          if x.dim() == 4 else None)

    def _step_clamp(self, node: Node) -> Optional[Step]:
        if node.attrs.get("min") not in (0, 0.0) or node.attrs.get("max") is not None:
            return None
        return torch.relu  # qrelu: max(q, z), allocated in the input's suggest_memory_format (clamp_codes)

    def _step_dropout(self, node: Node) -> Optional[Step]:
        return lambda x: x

    def _step_call(self, node: Node) -> Optional[Step]:
        if node.attrs["fn"] not in VIEW_CALLS or not isinstance(node.args[0], Ref):
            return None
        fn = CALLS[node.attrs["fn"]]

        def view(x: torch.Tensor, *rest) -> Optional[torch.Tensor]:
            # A quint8 reshape copies where a plain tensor's is a view (channels-last flattened), so the result
            # must have the strides the same call gives an integer tensor of x's strides, or the emulation runs.
            result = fn(x, *rest)
            like = fn(torch.empty_strided(x.size(), x.stride(), dtype=torch.uint8), *rest)
            return result if result.stride() == like.stride() else None

        return view

    def _split_alike(self, n: int) -> bool:
        """Whether the kernel's loops split n elements as the target's recorded thread count does (QNNPACK's
        elementwise kernels give every element the same arithmetic wherever the split falls)."""
        if self.engine == "qnnpack":
            return True
        return parallel_chunks(n, torch.get_num_threads()) == parallel_chunks(n, self.model.target.engine_threads())


class _Values:
    """Every node's result in a run: a quint8 tensor (engine kernels) or a QValue (the emulation), each converted
    to the other form at most once, when a node of the other kind reads it."""

    def __init__(self, grids: Dict[str, QParams]):
        self.grids = grids
        self.as_quantized: Dict[str, Any] = {}
        self.as_codes: Dict[str, Any] = {}

    def set(self, name: str, value) -> None:
        if _is_quantized(value):
            self.as_quantized[name] = value
        elif isinstance(value, QValue):
            self.as_codes[name] = value
        else:  # a Python number or a structure of results (split): both forms are the value itself
            self.as_quantized[name] = self.as_codes[name] = value

    def drop(self, name: str) -> None:
        self.as_quantized.pop(name, None)
        self.as_codes.pop(name, None)

    def quantized(self, arg):
        """An argument for an engine kernel: a node's quint8 tensor, or a constant as it is."""
        if not isinstance(arg, Ref):
            return arg
        value = self.as_quantized.get(arg.name)
        if value is None:
            codes = self.as_codes[arg.name]
            value = codes
            # Only activations (uint8) become quint8, and only where the copy keeps the strides (a slice's view
            # does not): the kernels choose their loops by the layout. Others stay for the emulation.
            if isinstance(codes, QValue) and codes.qparams.dtype == "uint8":
                copy = quantized(codes.codes, codes.qparams)
                value = copy if copy.stride() == codes.codes.stride() else codes
            self.as_quantized[arg.name] = value
        return value

    def codes(self, args):
        """Arguments for the emulation: QValues of int64 codes (resolved through nested structures)."""
        return resolve(args, _CodesOf(self))

    def codes_of(self, name: str):
        value = self.as_codes.get(name)
        if value is None:
            value = QValue(codes_of(self.as_quantized[name], torch.int64), self.grids[name])
            self.as_codes[name] = value
        return value

    def output(self, name: str):
        """An output: its QValue, with the uint8 codes of a quint8 result (no int64 step)."""
        value = self.as_quantized.get(name)
        if _is_quantized(value) and name not in self.as_codes:
            return QValue(codes_of(value, torch.uint8), self.grids[name])
        return self.codes_of(name)


class _CodesOf(dict):
    def __init__(self, values: _Values):
        super().__init__()
        self.values = values

    def __missing__(self, name: str):
        return self.values.codes_of(name)


def qnnpack_add_accepts(grids: Dict[str, QParams], node: Node, lo: int, hi: int) -> bool:
    """Whether PyTorch's qnnpack add takes these grids (qnnpack/src/add.c pytorch_qnnp_create_add_nc_q8: each
    f(s / s_y) in [2^-14, 2^8), output_min < output_max), as the emulation (_qnnpack_add) checks them."""
    out = grids[node.name].scale
    ratios = [float(grids[a.name].scale / out) for a in node.args]
    return lo < hi and all(2.0**-14 <= r < 2.0**8 for r in ratios)


def engine_program(model) -> Optional[EngineProgram]:
    """The model's EngineProgram, or None for targets that are not run on PyTorch's engine here."""
    engine = engine_of(model.target)
    if engine is None or not any(isinstance(k, tuple) and isinstance(k.engine, EngineLayer)
                                 for k in model.layer_kernels.values()):
        return None
    return EngineProgram(model, engine)
