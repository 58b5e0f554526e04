"""Build one-operator models for the real runtimes and run them: ONNX QOperator graphs and .tflite files.

The spec tests (tests/test_numerics_onnxruntime.py, tests/test_numerics_tflite.py) hand each runtime a model with a
single quantized operator and compare its output codes with the target's spec functions. Everything here
is plumbing; the arithmetic under test lives in qparity.numerics.

Graph builders follow the research scripts in /tmp/research (ort/common.py, tflref.py): ONNX opset 21
plus com.microsoft v1; the .tflite flatbuffer is written with LiteRT's own schema object API and run on
the reference kernels (OpResolverType.BUILTIN_REF), the behaviour the `tflite` target follows, or in TFLite
Micro's interpreter (`tflite-micro`).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------------------
# ONNX Runtime
# ---------------------------------------------------------------------------------------------------------
NUMPY_DTYPES = {"uint8": np.uint8, "int8": np.int8}


def onnx_single_op(op: str, node_inputs: Sequence[str], arrays: Dict[str, np.ndarray], constants: Iterable[str],
                   out_dtype, attrs: Optional[dict] = None, domain: str = "") -> bytes:
    """A serialized ONNX model holding one node; names in `constants` become initializers, the rest inputs."""
    from onnx import TensorProto, helper, numpy_helper

    elem = {np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
            np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32}
    constants = set(constants)
    node = helper.make_node(op, list(node_inputs), ["y"], domain=domain or None, **(attrs or {}))
    graph_inputs = [helper.make_tensor_value_info(n, elem[arrays[n].dtype], list(arrays[n].shape))
                    for n in node_inputs if n and n not in constants]
    initializers = [numpy_helper.from_array(arrays[n], n) for n in node_inputs if n and n in constants]
    output = helper.make_tensor_value_info("y", elem[np.dtype(out_dtype)], None)
    graph = helper.make_graph([node], op, graph_inputs, [output], initializers)
    opsets = [helper.make_opsetid("", 21)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


@lru_cache(maxsize=64)
def _onnx_session(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_onnx_op(op: str, node_inputs: Sequence[str], arrays: Dict[str, np.ndarray], constants: Iterable[str],
                out_dtype, attrs: Optional[dict] = None, domain: str = "") -> np.ndarray:
    """Build, run (single-threaded CPU EP) and return the output of a one-node ONNX model."""
    constants = set(constants)
    model = onnx_single_op(op, node_inputs, arrays, constants, out_dtype, attrs, domain)
    feeds = {n: arrays[n] for n in node_inputs if n and n not in constants}
    return _onnx_session(model).run(None, feeds)[0]


# ---------------------------------------------------------------------------------------------------------
# TFLite / LiteRT
# ---------------------------------------------------------------------------------------------------------
class TFLiteModel:
    """A one-subgraph .tflite model under construction (LiteRT's schema object API)."""

    def __init__(self) -> None:
        from ai_edge_litert import schema_py_generated as schema

        self.schema = schema
        self.tensors: List = []
        self.buffers = [schema.BufferT()]
        self.operators: List = []
        self.opcodes: List[Tuple[int, int]] = []

    def tensor(self, shape, dtype: str, scale=None, zero_point=None, data: Optional[np.ndarray] = None,
               quantized_dimension: int = 0) -> int:
        s = self.schema
        t = s.TensorT()
        t.shape = [int(d) for d in shape]
        t.type = {"int8": s.TensorType.INT8, "int32": s.TensorType.INT32, "float32": s.TensorType.FLOAT32}[dtype]
        t.name = f"t{len(self.tensors)}"
        t.buffer = 0
        if data is not None:
            buffer = s.BufferT()
            buffer.data = list(np.ascontiguousarray(data).tobytes())
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        if scale is not None:
            q = s.QuantizationParametersT()
            q.scale = [float(v) for v in np.atleast_1d(np.asarray(scale, np.float32))]
            q.zeroPoint = [int(v) for v in np.atleast_1d(zero_point)]
            q.quantizedDimension = quantized_dimension
            t.quantization = q
        self.tensors.append(t)
        return len(self.tensors) - 1

    def operator(self, name: str, inputs: Sequence[int], outputs: Sequence[int], options=None,
                 version: int = 1) -> None:
        s = self.schema
        code = getattr(s.BuiltinOperator, name)
        if (code, version) not in self.opcodes:
            self.opcodes.append((code, version))
        o = s.OperatorT()
        o.opcodeIndex = self.opcodes.index((code, version))
        o.inputs, o.outputs = list(inputs), list(outputs)
        if options is not None:
            o.builtinOptionsType = getattr(s.BuiltinOptions, type(options).__name__[:-1])
            o.builtinOptions = options
        self.operators.append(o)

    def build(self, inputs: Sequence[int], outputs: Sequence[int]) -> bytes:
        import flatbuffers

        s = self.schema
        model = s.ModelT()
        model.version = 3
        model.operatorCodes = []
        for code, version in self.opcodes:
            c = s.OperatorCodeT()
            c.builtinCode = code
            c.deprecatedBuiltinCode = min(code, 127)
            c.version = version
            model.operatorCodes.append(c)
        graph = s.SubGraphT()
        graph.tensors, graph.inputs, graph.outputs, graph.operators = self.tensors, list(inputs), list(outputs), \
            self.operators
        model.subgraphs, model.buffers = [graph], self.buffers
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


@lru_cache(maxsize=64)
def _tflite_interpreter(model: bytes):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(model: bytes, *inputs: np.ndarray) -> np.ndarray:
    """Run a model on LiteRT's reference kernels and return its first output (interpreters are cached)."""
    interpreter = _tflite_interpreter(model)
    for detail, value in zip(interpreter.get_input_details(), inputs):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def run_tflm(model: bytes, *inputs: np.ndarray) -> np.ndarray:
    """Run a model in TFLite Micro's interpreter and return its first output."""
    from qparity.export.tflite_micro import arena_size, require_tflite_micro

    runtime = require_tflite_micro()
    subgraph = runtime.convert_bytearray_to_object(bytearray(model)).subgraphs[0]
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_size(model, subgraph))
    for index, value in enumerate(inputs):
        interpreter.set_input(value, index)
    interpreter.invoke()
    return np.array(interpreter.get_output(0))


def tflite_options(name: str, **fields):
    """A builtin options object, e.g. tflite_options("Conv2DOptions", padding=..., strideW=...)."""
    from ai_edge_litert import schema_py_generated as schema

    return getattr(schema, name + "T")(**fields)


def tflite_same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> Tuple[int, int, int]:
    """TFLite SAME padding (tflite/kernels/padding.h): output size, leading pad, trailing pad."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return out, total // 2, total - total // 2


ACTIVATIONS = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3}
ACTIVATION_RANGES = {"NONE": (None, None), "RELU": (0.0, None), "RELU_N1_TO_1": (-1.0, 1.0), "RELU6": (0.0, 6.0)}


# ---------------------------------------------------------------------------------------------------------
# Comparing codes
# ---------------------------------------------------------------------------------------------------------
def as_codes(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(y.astype(np.int64))


def assert_codes_equal(runtime: torch.Tensor, spec: torch.Tensor) -> None:
    assert runtime.shape == spec.shape, f"shapes differ: runtime {tuple(runtime.shape)}, spec {tuple(spec.shape)}"
    differ = runtime != spec
    assert torch.equal(runtime, spec), (
        f"{int(differ.sum())} of {runtime.numel()} codes differ; first at {differ.nonzero()[0].tolist()}: "
        f"runtime {runtime[differ][:8].tolist()}, spec {spec[differ][:8].tolist()}")


# ---------------------------------------------------------------------------------------------------------
# Hypothesis strategies shared by the spec tests
# ---------------------------------------------------------------------------------------------------------
def scales(min_exponent: float = -4.0, max_exponent: float = 0.0):
    """float32 scales: 10**uniform(min, max), or a power of two inside that range (dyadic scales make exact
    rounding ties common, where the runtimes' rounding rules differ)."""
    from hypothesis import strategies as st

    random = st.floats(min_exponent, max_exponent).map(lambda e: float(np.float32(10.0 ** e)))
    lowest = int(np.ceil(-max_exponent * np.log2(10)))
    highest = int(np.floor(-min_exponent * np.log2(10)))
    dyadic = st.integers(lowest, highest).map(lambda n: 2.0 ** -n)
    return st.one_of(random, dyadic)


def seeds():
    """A seed for the numpy generator that fills the tensors (hypothesis draws the parameters)."""
    from hypothesis import strategies as st

    return st.integers(0, 2**32 - 1)


def f32(value) -> float:
    """The float32 nearest to value, as a Python float."""
    return float(np.float32(value))


# Scale regimes for conv / linear cases:
# - "random": every scale 10**uniform(-4, 0), the output scale spread over the accumulators;
# - "dyadic": powers of two, multipliers 2^-1 .. 2^-3 and small codes, so acc * M lands on exact ties
#   (where half-even, half-away and double rounding differ);
# - "decimal": multipliers near 0.1, 0.3, 0.7 ... with small codes: float32 products such as 15 * 0.3f land
#   on ties that the exact product misses (where float32 and exact arithmetic differ).
REGIMES = ("random", "dyadic", "decimal")
DECIMAL_MULTIPLIERS = (0.1, 0.3, 0.7, 0.9, 0.6, 0.15, 0.35)


def layer_scales(rng: np.random.Generator, regime: str, channels: int) -> Tuple[float, np.ndarray]:
    """(input scale, per-channel weight scales) for a regime."""
    if regime == "dyadic":
        return 2.0 ** -int(rng.integers(0, 8)), (2.0 ** -rng.integers(0, 3, size=channels)).astype(np.float32)
    if regime == "decimal":  # channel scales a power of two apart: every channel's multiplier is near a decimal
        base = f32(10 ** rng.uniform(-4, 0))
        return f32(10 ** rng.uniform(-4, 0)), (base * 2.0 ** -rng.integers(0, 2, size=channels)).astype(np.float32)
    return f32(10 ** rng.uniform(-4, 0)), (10.0 ** rng.uniform(-4, 0, size=channels)).astype(np.float32)


def layer_output_scale(rng: np.random.Generator, regime: str, acc: np.ndarray, input_scale: float,
                       weight_scale: np.ndarray) -> float:
    """An output scale for a regime; "random" spreads the accumulators over about 120 codes."""
    if regime == "dyadic":
        return input_scale * float(weight_scale.max()) * 2.0 ** int(rng.integers(1, 4))
    if regime == "decimal":
        return f32(input_scale * float(weight_scale.max()) / rng.choice(DECIMAL_MULTIPLIERS))
    spread = float(np.abs(np.asarray(acc, np.float64)).std()) + 1.0
    return f32(input_scale * float(weight_scale.mean()) * spread / 60 * 10 ** rng.uniform(-0.5, 0.5))


def layer_codes(rng: np.random.Generator, regime: str, shape, zero_point: int, lo: int, hi: int,
                weight_shape) -> Tuple[np.ndarray, np.ndarray, int]:
    """(input codes, int8 weight codes, bias bound): full ranges for "random", small ones otherwise, so
    accumulators stay small where the multiplier is large."""
    if regime == "random":
        x = rng.integers(lo, hi + 1, size=shape)
        return x, rng.integers(-127, 128, size=weight_shape).astype(np.int8), 20000
    x = np.clip(zero_point + rng.integers(-4, 5, size=shape), lo, hi)
    return x, rng.integers(-3, 4, size=weight_shape).astype(np.int8), 20
