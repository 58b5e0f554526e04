"""What a target is: the integer semantics of one runtime, as a small set of functions.

Every operator of the integer program calls these and nothing else for its arithmetic, in the fake-quant
forward and in the integer runtime alike, so a target's rounding rules exist exactly once.

Codes are int64 tensors holding the integer values; float inputs are float32. `lo`/`hi` are the output
clamp in codes (the dtype range narrowed by a fused activation).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..errors import UnsupportedOpError
from . import pooling
from ..qparams import QParams
from .activations import TableCache
from .compiled import ElementwiseRule

# acc -> codes; an optional `dtype` (default int64) names the integer dtype of the codes returned, which must
# hold the output grid (the integer runtime's narrow codes: ops/program.py).
Requantizer = Callable[..., torch.Tensor]


def channel_view(values: torch.Tensor, ndim: int, axis: int) -> torch.Tensor:
    """Reshape a per-channel vector so it broadcasts along `axis` of an ndim tensor (scalars pass)."""
    if values.dim() == 0:
        return values
    shape = [1] * ndim
    shape[axis] = values.numel()
    return values.reshape(shape)


def grid_views(qp: QParams, like: torch.Tensor):
    """qp's float32 scale and int64 zero point, shaped to broadcast against `like` (per-channel along qp.axis)."""
    ndim, axis = like.dim(), qp.axis or 0
    return (channel_view(qp.scale.to(like.device), ndim, axis),
            channel_view(qp.zero_point.to(like.device), ndim, axis))


class Target:
    """Base class: the semantics shared by every target, and the hooks each one defines."""

    name: str = ""
    summary: str = ""
    activation_dtypes: Tuple[str, ...] = ("int8",)
    weight_qmax: int = 127  # weights are symmetric in [-weight_qmax, weight_qmax], zero point 0
    # True for runtimes that take the bias as float32 (PyTorch's engines): quantize_bias then returns that
    # float bias, the accumulator excludes it, and the requantizer gets it as `bias=`.
    float_bias: bool = False
    # The file whose runtime computes this target's integers (".tflite", ".onnx"), or None where qparity has no
    # exporter for it; export() and verify() choose by it instead of by target name.
    file_format: str | None = None
    # Whether the runtime has a kernel for adaptive average pools whose output size does not divide the input
    # (windows of differing sizes, PyTorch's start/end rule): PyTorch's engines do, LiteRT and ONNX Runtime do not.
    uneven_adaptive_pool: bool = False
    # Whether the runtime's transposed conv takes per-output-channel weight scales (PyTorch's engines: no).
    per_channel_transposed_conv: bool = True
    # False for a target that describes a converted model qparity reads (from_torch) rather than a runtime to
    # train for: prepare_qat refuses it and TARGETS leaves it out.
    trainable: bool = True

    # -- quantize / dequantize ------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        """Float32 real values to codes (the QUANTIZE op at the model's input): `quantize_unclamped`, clamped."""
        return torch.clamp(self.quantize_unclamped(x, qp), qp.qmin, qp.qmax).to(torch.int64)

    def dequantize(self, codes: torch.Tensor, qp: QParams) -> torch.Tensor:
        """Codes to float32 real values: `(q - zero_point) * scale`, one float32 rounding, as every runtime."""
        scale, zero_point = grid_views(qp, codes)
        return (codes - zero_point).to(torch.float32) * scale

    def activation_bounds(self, min_real: float | None, max_real: float | None, qp: QParams) -> Tuple[int, int]:
        """Clamp bounds in codes for a fused activation clamping reals to [min_real, max_real]."""
        lo, hi = qp.qmin, qp.qmax
        if min_real is not None:
            lo = max(lo, int(self.quantize_unclamped(torch.tensor([min_real]), qp).item()))
        if max_real is not None:
            hi = min(hi, int(self.quantize_unclamped(torch.tensor([max_real]), qp).item()))
        return lo, max(lo, hi)

    def quantize_unclamped(self, x: torch.Tensor, qp: QParams) -> torch.Tensor:
        raise NotImplementedError

    # -- weights and bias -----------------------------------------------------------------------------------
    def quantize_weight(self, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Float weights to symmetric codes: round half even of w / scale (float32), clamped.

        Weight codes are data in the deployed file, so one definition serves every target.
        """
        scale = channel_view(scale, weight.dim(), 0)
        return torch.clamp(torch.round(weight / scale), -self.weight_qmax, self.weight_qmax)

    def quantize_bias(self, bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """Float bias to int32 codes at scale `s_in * s_w`: round half even of the float64 quotient.

        Like weights, the bias codes are stored in the deployed file; every target uses this definition.
        """
        bias_scale = input_scale.to(torch.float64) * weight_scale.to(torch.float64)
        return torch.round(bias.detach().to(torch.float64) / bias_scale)

    def int32_bias(self, op: str) -> bool:
        """Whether the runtime holds a conv ("conv2d") or fully connected ("linear") bias as int32 codes at scale
        s_in * s_w, so that a bias beyond int32 has no code: every target but PyTorch's float-bias engines."""
        return not self.float_bias

    # -- operators ------------------------------------------------------------------------------------------
    def requantizer(self, op: str, input_qp: QParams, weight_scale: torch.Tensor, output_qp: QParams,
                    lo: int, hi: int, channel_axis: int, ndim: int) -> Requantizer:
        """acc -> output codes for a conv ("conv2d", "conv_transpose2d") or fully connected ("linear") layer.

        acc (bias included) arrives as a float tensor holding exact integers (float32 below 2^24, else
        float64); the requantizer converts it as its runtime does: `requantize(acc, dtype=torch.int64)`
        returns the codes as `dtype` (int64, or the output grid's own dtype).
        """
        raise NotImplementedError

    def layer_kernel(self, geometry, weight_codes: torch.Tensor, weight_scale: torch.Tensor, bias,
                     input_qp: QParams, output_qp: QParams, lo: int, hi: int):
        """input codes -> output codes for a conv/linear layer whose runtime forms no integer accumulator (PT2E's
        reference graph runs PyTorch's float32 conv); None for the accumulator + requantizer path."""
        return None

    def add(self, qa: torch.Tensor, a: QParams, qb: torch.Tensor, b: QParams, out: QParams,
            lo: int, hi: int) -> torch.Tensor:
        """Elementwise sum of two quantized tensors on different grids."""
        raise NotImplementedError

    def subtract(self, qa: torch.Tensor, a: QParams, qb: torch.Tensor, b: QParams, out: QParams,
                 lo: int, hi: int) -> torch.Tensor:
        """Elementwise difference a - b of two quantized tensors (broadcasting), onto the output grid."""
        raise UnsupportedOpError(f"sub is not emulated for target {self.name!r}")

    def scalar_grid(self, op: str, value: float, source: QParams) -> QParams | None:
        """The output grid of `x + c` ("add") or `x * c` ("mul") with a Python number c, where the runtime
        derives it from x's grid (PyTorch's add_scalar / mul_scalar); None where the runtime takes the number
        as a constant tensor on a grid of its own (operator constant) and the output grid is observed."""
        return None

    def scalar_arithmetic(self, op: str, value: float, q: torch.Tensor, source: QParams, out: QParams,
                          lo: int, hi: int) -> torch.Tensor:
        """The codes of `x + c` / `x * c` on the grid `scalar_grid` gave."""
        raise UnsupportedOpError(f"{op} with a number is not emulated for target {self.name!r}")

    def check_broadcast(self, op: str) -> None:
        """Raise UnsupportedOpError when the target's kernel for `op` cannot take operands of different shapes."""

    def check_softmax(self, attrs: dict) -> None:
        """Raise UnsupportedOpError when the target's softmax cannot take rows of this length (attrs["length"])."""

    def check_average_pool(self, attrs: dict) -> None:
        """Raise UnsupportedOpError when the target's runtime cannot run this avg_pool2d (its captured attrs)."""

    def check_max_pool(self, attrs: dict) -> None:
        """Raise UnsupportedOpError when the target's runtime cannot run this max_pool2d (its captured attrs)."""

    def clamp_codes(self, q: torch.Tensor, lo: int, hi: int, clamp=torch.clamp) -> torch.Tensor:
        """A standalone clamp of codes (ReLU, ReLU6, hardtanh not fused into a layer); `clamp` is the function
        that computes it (the QAT surrogate passes its own). A runtime may store the result in another layout."""
        return clamp(q, lo, hi)

    def multiply(self, qa: torch.Tensor, a: QParams, qb: torch.Tensor, b: QParams, out: QParams,
                 lo: int, hi: int) -> torch.Tensor:
        """Elementwise product of two quantized tensors (broadcasting), onto the output grid."""
        raise UnsupportedOpError(f"mul is not emulated for target {self.name!r}")

    def matmul_requantizer(self, a: QParams, b: QParams, out: QParams, lo: int, hi: int, ndim: int) -> Requantizer:
        """acc -> output codes for the product of two activations (acc = sum (q_a - z_a)(q_b - z_b), exact)."""
        raise UnsupportedOpError(f"matmul is not emulated for target {self.name!r}")

    def softmax(self, q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
        """Softmax of the codes q along the last dimension, as codes on the output grid (numerics/softmax.py)."""
        raise UnsupportedOpError(f"softmax is not emulated for target {self.name!r}")

    def layer_target(self, geometry) -> "Target":
        """The target whose kernels run a layer of this geometry: this one, unless the runtime hands some layers
        to other kernels (PyTorch's x86 engine: convs with more than 100 groups run in fbgemm)."""
        return self

    def accumulator_left_shift(self, op: str, input_qp: QParams, weight_scale: torch.Tensor,
                               output_qp: QParams) -> torch.Tensor:
        """Bits by which the requantizer shifts the int32 accumulator left, per output channel, before its
        multiply (0 unless the runtime does: TFLite for multipliers M >= 1); the overflow check accounts for it."""
        return torch.zeros(weight_scale.numel(), dtype=torch.int64)

    def accumulation(self, geometry, weight_shape) -> str:
        """How the runtime forms a conv/linear accumulator: "exact" int32, or a named kernel-specific rule
        ("int16_pairs": fbgemm's depthwise kernels). Raises UnsupportedOpError for kernels not emulated."""
        return "exact"

    # Whether `add_elementwise` forms a term of one code per input before combining them per pair: r(g(q_a) +
    # h(q_b)) (the fixed-point adds: each input left-shifted and rescaled to int32, then the sum requantized), or
    # ONNX Runtime's fma(q_a, r_a, h(q_b)). Then its pair table is `add_elementwise` on a column of a's codes and a
    # row of b's: each term is computed once per code and only the combination runs on every pair (a grid change,
    # every QAT step, rebuilds the table).
    add_from_code_terms: bool = False
    # Whether `add` takes the prepared model's float32 codes (integers held exactly) as they come, instead of int64
    # ones, answering float32 codes where it looks them up in a table (int64 otherwise): the prepared model turns
    # any codes into float32 (emit), so the int64 conversions around the add are saved (PyTorch's engines, whose
    # adds are not elementwise tables of ops/lookup.py but tables of their own).
    add_takes_float_codes: bool = False

    def add_elementwise(self, qa: torch.Tensor, a: QParams, qb: torch.Tensor, b: QParams, out: QParams,
                        lo: int, hi: int) -> torch.Tensor:
        """`add` with a as the first operand whatever the shapes, elementwise with broadcasting: the function a
        pair table tabulates. Where `elementwise_add` holds, `add` computes exactly this."""
        return self.add(qa, a, qb, b, out, lo, hi)

    def elementwise_add(self, shape_a, shape_b) -> bool:
        """Whether `add` is a pure function of each element's two codes for operands of these shapes.

        Then the integer runtime may tabulate it (ops/lookup.py). False unless a target says so: kernels
        whose result depends on the position or the tensor length must not be tabulated.
        """
        return False

    def add_rule(self, a: QParams, b: QParams, out: QParams, lo: int, hi: int) -> Optional[ElementwiseRule]:
        """`add_elementwise` on these grids as one elementwise function of the two codes and constants
        (numerics/compiled.py ElementwiseRule), the function `add` itself computes with: the integer runtime runs
        its native loop (numerics/native_add.py), or inside compiled_kernels() its compiled kernel, where it would
        look the add up in a table. A compiled function only for arithmetic that inductor compiles exactly
        (integer operations; no division, no float step whose rounding could change); None where a target has no
        rule (the table stays)."""
        return None

    def hardswish(self, q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
        """Hardswish (x * clamp(x + 3, 0, 6) / 6) of the codes q on `source`, as codes on the output grid `out`."""
        raise UnsupportedOpError(f"hardswish is not emulated for target {self.name!r}: its runtime's kernel was not "
                                 "matched bit for bit (docs/ops.md lists the targets that run hardswish)")

    def prelu(self, q: torch.Tensor, source: QParams, slope: torch.Tensor, slope_scale: float,
              out: QParams) -> torch.Tensor:
        """PReLU of the codes q: slope codes (int64, broadcast along q's channel axis) on the grid
        slope_scale, zero point 0 (numerics/prelu.py), as codes on the output grid."""
        raise UnsupportedOpError(f"prelu is not emulated for target {self.name!r}")

    def elementwise_hardswish(self, numel: int) -> bool:
        """Whether `hardswish` is a pure function of each code for tensors of `numel` elements (then the integer
        runtime tabulates it once for all codes, ops/lookup.py). False unless a target says so."""
        return False

    # -- elementwise activations (numerics/activations.py) ------------------------------------------------
    def activation(self, kind: str, q: torch.Tensor, source: QParams, out: QParams, attrs: dict) -> torch.Tensor:
        """An activation (sigmoid, tanh, hardsigmoid, leaky_relu, gelu, elu) of the codes q: the target's table, gathered."""
        table = self._tables().get(kind, attrs, source, out,
                                   lambda: self.activation_table(kind, source, out, attrs).to(torch.int64))
        return torch.empty_like(q, dtype=torch.int64).copy_(table.to(q.device)[q - source.qmin])  # q's layout

    def activation_table(self, kind: str, source: QParams, out: QParams, attrs: dict) -> torch.Tensor:
        """The output code of every input code of `source`, as the target's runtime computes it."""
        raise UnsupportedOpError(f"{kind} is not emulated for target {self.name!r}")

    def check_activation(self, kind: str, attrs: dict) -> None:
        """Raise UnsupportedOpError for activation parameters the runtime's kernel cannot take (TFLite's ELU has
        no alpha); prepare_qat calls it before any training."""

    def fixed_output_qparams(self, kind: str, dtype: str) -> QParams | None:
        """The output grid the runtime imposes on an operator (TFLite's int8 LOGISTIC: 1/256, -128), if any."""
        return None

    def _tables(self):
        if "_activation_tables" not in self.__dict__:
            self._activation_tables = TableCache()
        return self._activation_tables

    def rescale(self, q: torch.Tensor, source: QParams, out: QParams) -> torch.Tensor:
        """Move codes from one grid to another (each input of a concatenation)."""
        raise NotImplementedError

    def concatenate(self, codes: List[torch.Tensor], grids: List[QParams], out: QParams, dim: int) -> torch.Tensor:
        """Concatenation onto the output grid: each input rescaled on its own (a target may look at all)."""
        return torch.cat([self.rescale(q, grid, out) for q, grid in zip(codes, grids)], dim=dim)

    def bilinear(self, codes: torch.Tensor, qp: QParams, out_hw: Tuple[int, int], align_corners: bool) -> torch.Tensor:
        """Bilinear resizing of NCHW codes to out_hw on their own grid (numerics/resampling.py)."""
        raise UnsupportedOpError(f"upsample_bilinear is not emulated for target {self.name!r}")

    # Whether `average_pool` takes codes in any integer dtype holding the grid (the integer runtime's narrow codes);
    # else it receives int64 codes. This one does: its window sums are formed in float (pooling.average_sums).
    average_pool_takes_narrow_codes: bool = True

    def average_pool(self, codes: torch.Tensor, qp: QParams, attrs: dict) -> torch.Tensor:
        """2-D average pooling on one grid (input and output share qparams), PyTorch's windows and divisors."""
        sums, counts = pooling.window_sums_and_counts(codes, qp.zero_point.to(codes.device), attrs)
        return self.average(sums.to(torch.int64), counts, qp)

    def mean(self, q: torch.Tensor, source: QParams, out: QParams, dims: Tuple[int, ...],
             keepdim: bool) -> torch.Tensor:
        """The mean of the codes q over `dims` (the runtime's MEAN / ReduceMean), as codes on the output grid."""
        raise UnsupportedOpError(f"mean is not emulated for target {self.name!r}")

    def average(self, sums: torch.Tensor, counts: torch.Tensor, qp: QParams) -> torch.Tensor:
        """Window sums of centered codes (q - zero_point) over `counts` elements to codes."""
        raise NotImplementedError

    # -- settings a model fixes ---------------------------------------------------------------------------
    def with_defaults_for(self, example_inputs) -> "Target":
        """This target with every setting the caller left open fixed as its runtime would choose it for these
        example inputs (prepare_qat calls it). Most targets have no settings."""
        return self

    def settings(self) -> dict:
        """The settings a model records with its target (a .qp file stores them); {} where there are none."""
        return {}

    def arrange_input(self, x: torch.Tensor) -> torch.Tensor:
        """A model input as the runtime stores it before the first operator (its memory layout)."""
        return x

    def label(self) -> str:
        """The name with the settings: 'fbgemm (pytorch_kernels=2.14, engine_threads=2, ...)'."""
        settings = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"{self.name} ({settings})" if settings else self.name

    def machine_note(self) -> str:
        """Which of the runtime's machine-dependent code paths this machine takes ("" if none)."""
        return ""

    def describe(self) -> str:
        return f"{self.name}: {self.summary}"
