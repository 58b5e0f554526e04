"""Golden vectors: every node's integer parameters and its input and output codes, as .npy files and one JSON index.

Someone implementing the kernels on a DSP or an MCU runs the same input codes through their own code and
compares each node's output codes bit for bit. The files hold everything the integer program needs and
nothing that needs qparity to read: `np.load(..., allow_pickle=False)` and `json.load`.

A golden directory:

    index.json                  format, version, target, model, inputs, outputs, nodes in execution order
    model.qp                    the model itself (IntegerModel.save), so `qparity compare` can run each
                                target's rule on a device's dumps
    inputs/<input>.float32.npy  the float inputs, where floats were given (the QUANTIZE step's input)
    tensors/<node>.npy          the codes each node produced (int8/uint8, NCHW); `<node>.<i>.npy` per output
                                of a node with several
    params/<node>.weight.npy    int8 weight codes (conv: [out, in / groups, kh, kw]; linear: [out, in];
                                conv_transpose2d: the equivalent conv's, kernel flipped, which runs on the
                                input with stride - 1 zeros inserted (qparity.numerics.accumulate.zero_inserted))
    params/<node>.bias.npy      int32 bias codes at scale s_in * s_w (absent when the layer has no bias)

Each node's entry names its inputs (the tensors of earlier nodes it reads), its output files, and the
constants of its arithmetic in the target's own terms (docs/numerics.md and `qparity.numerics` define them):
tflite and tflite-micro give Q31 multipliers and shifts (QuantizeMultiplier of double(s_in) * double(s_w) /
double(s_out)), tosa RESCALE's int32 multipliers and shifts (ExecuTorch's Arm backend, single rounding),
onnxruntime, xnnpack and executorch-xnnpack float32 multipliers (XNNPACK's add: its fixed-point multipliers and
shift), exact the rational multipliers as decimal numerator/denominator strings; `rule` names how a layer's
accumulator is rounded where a target's layers differ. Clamp ranges are in codes, with any fused activation
already applied.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from .errors import ExportError, FileAccessError
from .files import path_of
from .graph import Node, QValue, collect_refs, encode, fused_clamp_bounds
from .numerics import pooling
from .qparams import QParams
from .runtime import IntegerLayer, IntegerModel
from .numerics import onnxruntime as ort_spec
from .numerics import tflite as tflite_spec
from .numerics import tosa as tosa_spec
from .numerics import xnnpack as xnnpack_spec
from .numerics.arithmetic import ExactRatio, quantize_multiplier
from .numerics.tflite import ADD_LEFT_SHIFT
from .numerics.softmax import tflite_softmax_parameters

FORMAT = "qparity-golden"
VERSION = 1
# the targets whose parameters golden() knows how to write
TARGETS = ("tflite", "tflite-micro", "onnxruntime", "exact", "tosa", "xnnpack", "executorch-xnnpack")
Q31 = ("tflite", "tflite-micro")                 # QuantizeMultiplier's Q31 multipliers and shifts
XNNPACK = ("xnnpack", "executorch-xnnpack")      # XNNPACK's float32 multipliers
NUMPY_DTYPES = {"int8": np.int8, "uint8": np.uint8, "int16": np.int16, "int32": np.int32}


def golden(model: IntegerModel, inputs: Sequence[torch.Tensor] | torch.Tensor, directory) -> Path:
    """Run `model` on `inputs` (float tensors, or integer codes) and write its golden vectors to `directory`.

    Returns the path of index.json.
    """
    if model.target.name not in TARGETS:
        raise ExportError(f"golden vectors for target {model.target.name!r} are not defined; "
                          f"convert for one of {', '.join(TARGETS)}")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    floats = all(x.is_floating_point() for x in inputs)
    codes = _as_tuple(model.quantize(*inputs)) if floats else inputs
    model.check_codes(*codes)  # with the messages users know
    recorder = model.executor()
    recorder.run([q.to(torch.int64) for q in codes])

    root = Path(path_of(directory, "the golden vectors' directory"))
    try:
        return _write(model, inputs, floats, recorder, root)
    except OSError as error:
        raise FileAccessError(f"cannot write golden vectors to {str(root)!r}: {error.strerror or error}") from error


def _write(model: IntegerModel, inputs, floats: bool, recorder, root: Path) -> Path:
    for folder in ("inputs", "tensors", "params"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    files = {name: _save_value(root, name, value) for name, value in recorder.values.items()}
    nodes = [_node_entry(model, node, recorder.values, files, root) for node in model.graph.nodes]
    model_inputs = []
    for node, x in zip(model.graph.inputs, inputs):
        entry = {"name": node.name, "file": files[node.name], "qparams": model.qparams[node.name].to_dict()}
        if floats:
            entry["float_file"] = _save(root, f"inputs/{node.name}.float32.npy", x.detach().cpu().to(torch.float32))
        model_inputs.append(entry)
    found: List[str] = []
    collect_refs(model.graph.output, found)
    index = {"format": FORMAT, "version": VERSION, "target": model.target.name,
             "activation_dtype": model.activation_dtype, "layout": "NCHW", "model": "model.qp",
             "inputs": model_inputs, "outputs": [{"name": name, "file": files[name]} for name in found],
             "output_structure": encode(model.graph.output), "nodes": nodes}
    model.save(root / "model.qp")
    path = root / "index.json"
    path.write_text(json.dumps(index, indent=1))
    return path


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def _save(root: Path, relative: str, tensor: torch.Tensor, dtype=None) -> str:
    array = tensor.detach().cpu().numpy()
    np.save(root / relative, array.astype(dtype) if dtype is not None else array, allow_pickle=False)
    return relative


def _save_value(root: Path, name: str, value):
    """A node's result: the file of its codes, a list of files for several tensors, or a JSON value."""
    if isinstance(value, QValue):
        return _save(root, f"tensors/{name}.npy", value.codes, NUMPY_DTYPES[value.qparams.dtype])
    if isinstance(value, (tuple, list)) and any(isinstance(v, QValue) for v in value):
        return [_save(root, f"tensors/{name}.{i}.npy", v.codes, NUMPY_DTYPES[v.qparams.dtype])
                for i, v in enumerate(value)]
    return {"value": encode(value)}


# ---------------------------------------------------------------------------------------------------------
# Node entries
# ---------------------------------------------------------------------------------------------------------
def _node_entry(model: IntegerModel, node: Node, values: Dict[str, Any], files: Dict[str, Any], root: Path) -> dict:
    refs: List[str] = []
    collect_refs((node.args, node.kwargs), refs)
    entry = {"name": node.name, "op": node.op, "path": node.path,
             "inputs": [_reference(r, files[r]) for r in refs], "output": files[node.name]}
    writer = PARAMETERS.get(node.op)
    if writer is not None:
        entry["params"] = writer(model, node, [values[r] for r in refs], root)
    return entry


def _clamp_params(model: IntegerModel, node: Node, inputs, root: Path) -> dict:
    bounds = model.target.activation_bounds(node.attrs.get("min"), node.attrs.get("max"), inputs[0].qparams)
    return {"clamp": list(bounds)}


def _max_pool_params(model: IntegerModel, node: Node, inputs, root: Path) -> dict:
    return {key: _plain(node.attrs[key]) for key in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}


def _table_params(model: IntegerModel, node: Node, inputs, root: Path) -> dict:
    """The grids, and the output code of every input code (the table a kernel can be checked against)."""
    source, out = inputs[0].qparams, model.qparams[node.name]
    codes = torch.arange(source.qmin, source.qmax + 1, dtype=torch.int64)
    if node.op == "hardswish":
        table = model.target.hardswish(codes, source, out)
    else:
        table = model.target.activation(node.op, codes, source, out, dict(node.attrs))
    return {"input_qparams": source.to_dict(), "output_qparams": out.to_dict(), "attrs": encode(node.attrs),
            "table_first_code": source.qmin, "table": table.tolist()}


# The integer parameters golden() writes per operator (the registry's `golden` column; tests/test_registry.py).
PARAMETERS = {
    "input": lambda model, node, inputs, root: {"qparams": model.qparams[node.name].to_dict()},
    "conv2d": lambda model, node, inputs, root: _layer_params(model, node, model.layers[node.name], root),
    "conv_transpose2d": lambda model, node, inputs, root: _layer_params(model, node, model.layers[node.name], root),
    "linear": lambda model, node, inputs, root: _layer_params(model, node, model.layers[node.name], root),
    "add": lambda model, node, inputs, root: _add_params(model, node, *inputs),
    "sub": lambda model, node, inputs, root: _add_params(model, node, *inputs, sign=-1),
    "cat": lambda model, node, inputs, root: _cat_params(model, node, inputs),
    "mul": lambda model, node, inputs, root: {"input_a": inputs[0].qparams.to_dict(),
                                              "input_b": inputs[1].qparams.to_dict(),
                                              "output": model.qparams[node.name].to_dict()},
    "matmul": lambda model, node, inputs, root: {
        "input_a": inputs[0].qparams.to_dict(), "input_b": inputs[1].qparams.to_dict(),
        "output": model.qparams[node.name].to_dict(),
        **_requantization(model.target.name, inputs[0].qparams, inputs[1].qparams.scale, model.qparams[node.name])},
    "softmax": lambda model, node, inputs, root: _softmax_params(model, node, inputs[0]),
    "hardswish": _table_params,
    "sigmoid": _table_params,
    "tanh": _table_params,
    "hardsigmoid": _table_params,
    "leaky_relu": _table_params,
    "prelu": lambda model, node, inputs, root: {"input_qparams": inputs[0].qparams.to_dict(),
                                                "output_qparams": model.qparams[node.name].to_dict(),
                                                "slope_codes": list(node.attrs["slope_codes"]),
                                                "slope_scale": node.attrs["slope_scale"]},
    "gelu": _table_params,
    "elu": _table_params,
    "rsqrt": _table_params,
    "parameter": lambda model, node, inputs, root: {"qparams": model.qparams[node.name].to_dict(),
                                                    "shape": list(node.attrs["shape"]),
                                                    "codes": list(node.attrs["codes"])},
    "clamp": _clamp_params,
    "max_pool2d": _max_pool_params,
    "pad": lambda model, node, inputs, root: {"pad": list(node.attrs["pad"]),
                                              "value": int(inputs[0].qparams.zero_point)},
    "avg_pool2d": lambda model, node, inputs, root: _average_params(model, node, inputs[0]),
    "amax": lambda model, node, inputs, root: {"dims": list(node.attrs["dim"]), "keepdim": node.attrs["keepdim"],
                                               "qparams": inputs[0].qparams.to_dict()},
    "upsample_nearest": lambda model, node, inputs, root: {"scale_factor": list(node.attrs["scale_factor"]),
                                                           "qparams": inputs[0].qparams.to_dict()},
    "upsample_bilinear": lambda model, node, inputs, root: _bilinear_params(model, node, inputs[0]),
    "mean": lambda model, node, inputs, root: {"input_qparams": inputs[0].qparams.to_dict(),
                                               "output_qparams": model.qparams[node.name].to_dict(),
                                               "dims": list(node.attrs["dims"]), "keepdim": node.attrs["keepdim"]},
    "call": lambda model, node, inputs, root: {"function": node.attrs["fn"], "args": encode(node.args),
                                               "kwargs": encode(node.kwargs)},
}


def _layer_params(model: IntegerModel, node: Node, layer: IntegerLayer, root: Path) -> dict:
    input_qp, output_qp = model.grids[node.args[0].name], model.qparams[node.name]
    weight_scale = layer.weight_scale.to(torch.float32)
    params = {"geometry": node.attrs["geometry"],
              "weight_file": _save(root, f"params/{node.name}.weight.npy", layer.weight_codes, np.int8),
              "bias_file": None if layer.bias_codes is None else
              _save(root, f"params/{node.name}.bias.npy", layer.bias_codes, np.int32),
              "weight_scale": weight_scale.reshape(-1).tolist(),
              "input": input_qp.to_dict(), "output": output_qp.to_dict(),
              "clamp": list(fused_clamp_bounds(model.target, node, output_qp))}
    params.update(_requantization(model.target.name, input_qp, weight_scale, output_qp))
    return params


def _requantization(target: str, input_qp: QParams, weight_scale: torch.Tensor, output_qp: QParams) -> dict:
    """The multiplier acc -> output codes, as each target's requantizer builds it (qparity.numerics)."""
    if target in Q31:
        real = tflite_spec.layer_multiplier(input_qp.scale, weight_scale, output_qp.scale)
        m0, shift = quantize_multiplier(real)
        # tflite: conv MultiplyByQuantizedMultiplier(acc, multiplier, shift), but the reference FULLY_CONNECTED
        # rounds double(acc) * real_multiplier half away from zero (qparity.numerics.tflite); tflite-micro:
        # MultiplyByQuantizedMultiplier (gemmlowp's double rounding) for every layer.
        rule = ("MultiplyByQuantizedMultiplier (conv); double(acc) * real_multiplier rounded half away (linear)"
                if target == "tflite" else "MultiplyByQuantizedMultiplier")
        return {"multiplier": _list(m0), "shift": _list(shift), "real_multiplier": _list(real), "rule": rule}
    if target == "tosa":
        multiplier, shift = tosa_spec.rescale_parameters(
            tosa_spec.layer_scale(input_qp.scale, weight_scale, output_qp.scale))
        return {"multiplier": _list(multiplier), "shift": _list(shift),
                "rule": "RESCALE SINGLE_ROUND: (acc * multiplier + 2^(shift - 1)) >> shift"}
    if target in XNNPACK:
        multiplier = xnnpack_spec.layer_multiplier(input_qp.scale, weight_scale, output_qp.scale)
        return {"multiplier_f32": _list(multiplier), "rule": "rne(f32(acc) * multiplier_f32)"}
    if target == "onnxruntime":
        return {"multiplier_f32": _list(ort_spec.layer_multiplier(input_qp.scale, weight_scale, output_qp.scale))}
    return {"multiplier_exact": _ratio(ExactRatio.of_scales([input_qp.scale, weight_scale], [output_qp.scale]))}


def _softmax_params(model: IntegerModel, node: Node, x: QValue) -> dict:
    """softmax's grids; for tflite also SoftmaxPrepare's input multiplier, left shift and diff_min."""
    params = {"input_qparams": x.qparams.to_dict(), "output_qparams": model.qparams[node.name].to_dict()}
    if model.target.name in Q31:
        multiplier, left_shift, diff_min = tflite_softmax_parameters(x.qparams)
        params.update(input_multiplier=multiplier, input_left_shift=left_shift, diff_min=diff_min)
    return params


def _add_params(model: IntegerModel, node: Node, a: QValue, b: QValue, sign: int = 1) -> dict:
    """add's parameters; sub (sign -1) is the same add with input b's multiplier negated (TFLite's kernels)."""
    out = model.qparams[node.name]
    params = {"input_a": a.qparams.to_dict(), "input_b": b.qparams.to_dict(), "output": out.to_dict(),
              "clamp": list(fused_clamp_bounds(model.target, node, out))}
    target = model.target.name
    if target in Q31:
        (m_a, s_a), (m_b, s_b), (m_y, s_y) = tflite_spec.add_multipliers(a.qparams, b.qparams, out)
        # LiteRT's SUB is its ADD with input b's multiplier negated; TFLite Micro's subtracts the scaled inputs
        # (numerics/tflite_micro.py): the same numbers, and `subtract` says which
        negated = sign < 0 and target == "tflite"
        params.update({"left_shift": ADD_LEFT_SHIFT, "input_a_multiplier": int(m_a), "input_a_shift": int(s_a),
                       "input_b_multiplier": -int(m_b) if negated else int(m_b), "input_b_shift": int(s_b),
                       "output_multiplier": int(m_y), "output_shift": int(s_y),
                       "subtract": sign < 0 and not negated})
    elif target == "tosa":  # RESCALE a and b to int32 at 2 max(s_a, s_b) / 2^20, ADD / SUB, RESCALE the sum
        for key, scale in zip(("input_a", "input_b", "output"), tosa_spec.add_scales(a.qparams, b.qparams, out)):
            multiplier, shift = tosa_spec.rescale_parameters(scale)
            params.update({f"{key}_multiplier": int(multiplier), f"{key}_shift": int(shift)})
        params["subtract"] = sign < 0
    elif target in XNNPACK:  # qs8-vadd: (q_a - z_a) m_a + (q_b - z_b) m_b, >> shift rounding half up
        (m_a, m_b), shift = xnnpack_spec.add_parameters(node.op, a.qparams, b.qparams, out)
        params.update({"input_a_multiplier": int(m_a), "input_b_multiplier": sign * int(m_b), "shift": int(shift)})
    elif target == "onnxruntime":
        # ORT's scalar-A kernel swaps the roles of A and B (qparity.numerics.onnxruntime).
        swapped = ort_spec.swaps_operands(a.codes.shape, b.codes.shape)
        first, second = (b.qparams, a.qparams) if swapped else (a.qparams, b.qparams)
        ratio_first, ratio_second, offset = ort_spec.add_parameters(first, second, out)
        params.update({"swapped": swapped, "ratio_first_f32": float(ratio_first),
                       "ratio_second_f32": float(ratio_second), "offset_f32": float(offset)})
    else:
        params.update({"ratio_a_exact": _ratio(ExactRatio.of_scales([a.qparams.scale], [out.scale])),
                       "ratio_b_exact": _ratio(ExactRatio.of_scales([b.qparams.scale], [out.scale])),
                       "sign_b": sign})
    return params


def _cat_params(model: IntegerModel, node: Node, tensors: List[QValue]) -> dict:
    """Each input moves to the output grid (a copy where the grids are equal), then they are concatenated."""
    out = model.qparams[node.name]
    rescales = []
    for t in tensors:
        entry = {"qparams": t.qparams.to_dict(), "copy": t.qparams.same_grid(out)}
        if model.target.name in Q31 and not entry["copy"]:
            m0, shift = tflite_spec.rescale_multiplier(t.qparams, out)
            entry.update({"multiplier": int(m0), "shift": int(shift)})
        elif model.target.name == "tosa" and not entry["copy"]:
            multiplier, shift = tosa_spec.rescale_parameters(
                torch.tensor(float(t.qparams.scale) / float(out.scale), dtype=torch.float64))
            entry.update({"multiplier": int(multiplier), "shift": int(shift)})
        elif model.target.name == "exact":
            entry["ratio_exact"] = _ratio(ExactRatio.of_scales([t.qparams.scale], [out.scale]))
        rescales.append(entry)
    return {"dim": node.attrs["dim"], "inputs": rescales, "output": out.to_dict()}


def _bilinear_params(model: IntegerModel, node: Node, x: QValue) -> dict:
    """The output size and corner rule; the interpolation's rounding is the target's (numerics/resampling.py)."""
    rules = {"tflite": "LiteRT reference: 10-bit fixed-point positions and weights, rounding half away",
             "tflite-micro": "LiteRT reference: 10-bit fixed-point positions and weights, rounding half away",
             "xnnpack": "XNNPACK qs8 ibilinear: 11-bit weights", "exact": "correctly rounded, half to even"}
    return {"size": list(node.attrs["size"]), "align_corners": node.attrs["align_corners"],
            "qparams": x.qparams.to_dict(), "rule": rules.get(model.target.name, model.target.name)}


def _average_params(model: IntegerModel, node: Node, x: QValue) -> dict:
    """The window (an adaptive pool's, resolved for this input size) and the grid input and output share."""
    input_hw = tuple(x.codes.shape[-2:])
    attrs = pooling.window_attrs(node.attrs, input_hw, node.path)
    if "uneven_output_size" in attrs:  # windows [floor(o in / out), ceil((o + 1) in / out)) on each axis
        return {"adaptive_output_size": list(attrs["uneven_output_size"]), "qparams": x.qparams.to_dict()}
    params = {key: _plain(attrs[key]) for key in ("kernel_size", "stride", "padding", "ceil_mode",
                                                  "count_include_pad")}
    params["qparams"] = x.qparams.to_dict()
    if model.target.name == "onnxruntime":
        whole = tuple(attrs["kernel_size"]) == input_hw and tuple(attrs["padding"]) == (0, 0)
        params["global"] = whole  # QLinearGlobalAveragePool: q = sat(rne(f(f(sum(q - z)) * M)) + z)
        if whole:
            params["multiplier_f32"] = float(ort_spec.global_average_multiplier(x.qparams.scale,
                                                                                 input_hw[0] * input_hw[1]))
    return params


# ---------------------------------------------------------------------------------------------------------
# JSON values
# ---------------------------------------------------------------------------------------------------------
def _reference(name: str, stored) -> dict:
    """An input of a node: the file(s) of its codes, or the plain value (a size, an int) it carries."""
    return {"name": name, **stored} if isinstance(stored, dict) else {"name": name, "file": stored}


def _ratio(ratio: ExactRatio) -> dict:
    """Exact rationals as decimal strings (they exceed 64 bits)."""
    return {"numerator": [str(n) for n in np.asarray(ratio.numerator).reshape(-1)],
            "denominator": [str(d) for d in np.asarray(ratio.denominator).reshape(-1)]}


def _list(values: torch.Tensor) -> list:
    return values.reshape(-1).tolist()


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)
