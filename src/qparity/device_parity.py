"""Device parity: compare the codes a device computed with golden vectors, and name the rule that reproduces them.

A device qparity cannot run (a phone DSP, an NPU, a microcontroller) is checked with the golden vectors of its
model: the user runs the golden inputs on the device, dumps what it computed per layer, and `compare` reports

- per layer, how many codes differ from the golden vectors (and by how much), and the first layer that differs;
- which known arithmetic rule reproduces the device's codes exactly: every target qparity emulates
  (qparity.numerics: Q31 multipliers with single or double rounding, float32 multipliers with round half even,
  exact rationals, TOSA's round half up...) computes each dumped layer from the device's own inputs to that
  layer, so one layer's difference does not spread into the next, and the rules that give 0 mismatched codes on
  every dumped layer are the ones the device follows: train for that target.

The device directory holds one file per dumped tensor, named after the golden node (index.json's `nodes`):

    <node>.npy     the codes as a numpy array (int8/uint8), in the golden's layout (NCHW, as tensors/<node>.npy)
                   or NHWC (the layout TFLite and most device runtimes keep); the shape says which
    <node>.bin     the same codes as raw bytes (one byte per code), in the layout given by `layout`

A `tensors/` folder inside the device directory is read too (a copy of the golden layout). Any subset of the
nodes may be dumped: at least the model's outputs; the more layers, the more precisely a divergence is placed.

A device may run the other 8-bit type: uint8 where qparity ran int8 (or the reverse), every zero point moved by
128, so every code is the golden's plus 128 and every real value is the same. The .npy dtype says so (`dtype`
does for raw .bin files); its codes are compared after the shift, and each rule runs the program on the type it
supports, the device's first (a uint8-only rule such as fbgemm's then judges an int8 model too). Integer kernels
subtract zero points before they accumulate and add the output's after rounding, so the shift changes no
arithmetic: a rule that reproduces the device on one type does on the other.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from .errors import FileAccessError, InputError, ModelFileError, QParityError
from .files import path_of
from .graph import QValue
from .numerics import TARGETS, get_target
from .ops.layer import IntegerLayer
from .ops.program import ProgramExecutor
from .qparams import QParams
from .runtime import IntegerModel, load

LAYOUTS = ("nchw", "nhwc")
NUMPY_DTYPES = {"int8": np.int8, "uint8": np.uint8}
CODE_OFFSET = {("int8", "uint8"): 128, ("uint8", "int8"): -128, ("int8", "int8"): 0, ("uint8", "uint8"): 0}


@dataclass
class LayerComparison:
    """One dumped tensor: the device's codes against the golden vectors and against each candidate rule."""

    node: str
    op: str
    path: str
    codes: int                       # codes compared
    mismatched: int                  # device vs golden
    max_difference: int              # largest |device - golden|, in codes
    rules: Dict[str, int] = field(default_factory=dict)  # target -> codes that rule gets wrong on this layer


@dataclass
class CompareReport:
    golden_target: str
    layers: List[LayerComparison]
    not_applicable: Dict[str, str]   # target -> why its rule cannot run this model's grids
    missing: List[str]               # golden nodes the device directory has no dump for
    golden_dtype: str = "int8"       # the type of the golden's activation codes
    device_dtype: str = "int8"       # the type of the device's codes
    shifted: Dict[str, str] = field(default_factory=dict)  # target -> the other 8-bit type its rule ran on

    @property
    def mismatched(self) -> int:
        return sum(layer.mismatched for layer in self.layers)

    @property
    def ok(self) -> bool:
        """The device computes the golden vectors' codes on every dumped layer."""
        return self.mismatched == 0

    @property
    def first_divergence(self) -> Optional[LayerComparison]:
        return next((layer for layer in self.layers if layer.mismatched), None)

    @property
    def reproducing_rules(self) -> List[str]:
        """The targets whose arithmetic gives the device's codes on every dumped layer."""
        candidates = [t for t in TARGETS if t not in self.not_applicable]
        return [t for t in candidates if all(layer.rules.get(t, 1) == 0 for layer in self.layers)]

    def label(self, target: str) -> str:
        """A rule's name, with the type it ran on where that is not the golden's."""
        on = self.shifted.get(target)
        return get_target(target).label() + (f" on {on} (zero points moved by 128)" if on else "")

    def __str__(self) -> str:
        lines = [f"device vs golden vectors (target {self.golden_target}): {self.mismatched} mismatched codes "
                 f"over {len(self.layers)} dumped tensor(s)"]
        if self.device_dtype != self.golden_dtype:
            lines.append(f"the device's codes are {self.device_dtype}, the golden's {self.golden_dtype}: compared "
                         f"after moving them by {-CODE_OFFSET[(self.golden_dtype, self.device_dtype)]} (the same "
                         "real values)")
        for layer in self.layers:
            exact = [t for t, n in layer.rules.items() if n == 0]
            status = "equal" if not layer.mismatched else \
                f"{layer.mismatched} of {layer.codes} codes differ (up to {layer.max_difference} apart)"
            lines.append(f"  {layer.node} ({layer.op}{', ' + layer.path if layer.path else ''}): {status}; "
                         f"reproduced by: {', '.join(exact) or 'no known rule'}")
        divergence = self.first_divergence
        lines.append("first diverging layer: " + (f"{divergence.node} ({divergence.op}, {divergence.path})"
                                                  if divergence else "none"))
        rules = self.reproducing_rules
        if rules:
            lines.append("rules that reproduce the device on every dumped layer: " + "; ".join(
                self.label(t) for t in rules))
            if self.golden_target not in rules:
                lines.append(f"the device does not follow target {self.golden_target!r}: train and convert for "
                             f"{rules[0]!r} to deploy to it bit for bit")
        else:
            lines.append("no known rule reproduces the device on every dumped layer: its arithmetic is none of "
                         "qparity's targets (see the per-layer lines for the closest)")
        for target, why in self.not_applicable.items():
            lines.append(f"  rule {target} not tried: {why}")
        if self.missing:
            lines.append(f"not dumped by the device: {len(self.missing)} tensor(s)")
        return "\n".join(lines)


def compare(golden_dir, device_dir, layout: str = "nchw", dtype: Optional[str] = None) -> CompareReport:
    """Compare a device's dumped codes (`device_dir`) with golden vectors written by `qparity.golden`.

    `dtype` (int8/uint8) is the type of raw .bin dumps; by default the .npy dumps' type, else the golden's.
    """
    if layout not in LAYOUTS:
        raise InputError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if dtype is not None and dtype not in NUMPY_DTYPES:
        raise InputError(f"dtype must be one of {', '.join(NUMPY_DTYPES)}, got {dtype!r}")
    golden_root = Path(path_of(golden_dir, "the golden vectors' directory"))
    device_root = Path(path_of(device_dir, "the device's directory"))
    index = _read_index(golden_root)
    model = load(golden_root / index["model"])
    golden_codes = {node["name"]: _read_golden_tensor(golden_root, node) for node in index["nodes"]
                    if isinstance(node.get("output"), str)}
    dumps = {}
    for name, expected in golden_codes.items():
        found = _read_device_tensor(device_root, name, expected, layout, dtype)
        if found is not None:
            dumps[name] = found
    if not dumps:
        raise InputError(f"{str(device_root)!r} holds no dump of any golden tensor (expected files named "
                         f"<node>.npy or <node>.bin, e.g. {next(iter(golden_codes))}.npy)")
    device_dtype = _device_dtype(dumps, dtype, model.activation_dtype)
    device = {name: _in_golden_type(codes, golden_codes[name], model.activation_dtype, device_dtype, path)
              for name, (codes, _, path) in dumps.items()}
    inputs = [golden_codes[node.name] for node in model.graph.inputs]
    ops = {node.name: node for node in model.graph.nodes}
    layers = [LayerComparison(name, ops[name].op, ops[name].path or "", codes.numel(),
                              int((codes != golden_codes[name]).sum()),
                              int((codes.to(torch.int64) - golden_codes[name].to(torch.int64)).abs().max())
                              if codes.numel() else 0)
              for name, codes in device.items()]
    not_applicable: Dict[str, str] = {}
    shifted: Dict[str, str] = {}
    for target in TARGETS:
        run_dtype = _run_dtype(get_target(target), device_dtype, model.activation_dtype)
        try:
            program = _as_target(_shifted(model, run_dtype), target)
            offset = CODE_OFFSET[(model.activation_dtype, run_dtype)]
            moved = {name: _moved(codes, golden_codes[name], model.activation_dtype, offset)
                     for name, codes in device.items()}
            predicted = _teacher_forced(program, [q.to(torch.int64) + offset for q in inputs], moved)
        except QParityError as error:
            not_applicable[target] = str(error)
            continue
        if run_dtype != model.activation_dtype:
            shifted[target] = run_dtype
        for layer in layers:
            predicted_codes = _moved(predicted[layer.node], golden_codes[layer.node], model.activation_dtype,
                                     -offset)
            layer.rules[target] = int((predicted_codes != device[layer.node]).sum())
    missing = [name for name in golden_codes if name not in device]
    return CompareReport(model.target.name, layers, not_applicable, missing, model.activation_dtype,
                         device_dtype, shifted)


# ---------------------------------------------------------------------------------------------------------
# The other 8-bit type: int8 <-> uint8, zero points and codes moved by 128
# ---------------------------------------------------------------------------------------------------------
def _device_dtype(dumps, dtype: Optional[str], golden_dtype: str) -> str:
    """The one type of the device's codes: what its .npy files and `dtype` say, else the golden's."""
    declared = {found[1] for found in dumps.values() if found[1] is not None} | ({dtype} if dtype else set())
    if len(declared) > 1:
        files = ", ".join(f"{found[2].name} ({found[1]})" for found in dumps.values() if found[1] is not None)
        raise InputError(f"the device's dumps mix code types ({', '.join(sorted(declared))}): {files}; a device "
                         "runs one 8-bit type")
    return declared.pop() if declared else golden_dtype


def _run_dtype(target, device_dtype: str, golden_dtype: str) -> str:
    """The type a rule runs the program on: the device's when the target supports it, else the golden's."""
    for dtype in (device_dtype, golden_dtype):
        if dtype in target.activation_dtypes:
            return dtype
    return target.activation_dtypes[0]


def _in_golden_type(codes: torch.Tensor, golden: torch.Tensor, golden_dtype: str, device_dtype: str,
                    path: Path) -> torch.Tensor:
    """A dump's codes checked against the device's type, then moved onto the golden's grid."""
    own = device_dtype if _dtype_name(golden) == golden_dtype else _dtype_name(golden)
    _checked(codes, own, path)
    return _moved(codes, golden, golden_dtype, -CODE_OFFSET[(golden_dtype, device_dtype)])


def _moved(codes: torch.Tensor, golden: torch.Tensor, golden_dtype: str, offset: int) -> torch.Tensor:
    """Activation codes moved by `offset` (the zero points' move); other tensors (int32...) stay."""
    return codes + offset if _dtype_name(golden) == golden_dtype else codes


def _shifted(model: IntegerModel, dtype: str) -> IntegerModel:
    """The same program with its activations on `dtype`: every activation zero point moved by 128."""
    if dtype == model.activation_dtype:
        return model
    stored = [node.path or node.name for node in model.graph.nodes if node.op == "parameter"]
    if stored:
        raise InputError(f"its activations are {dtype} and this model's are {model.activation_dtype}; the codes "
                         f"stored in parameter tensors ({', '.join(stored)}) are not moved to the other type")
    offset = CODE_OFFSET[(model.activation_dtype, dtype)]
    qparams = {name: QParams(qp.scale, qp.zero_point + offset, dtype, qp.axis)
               if qp.dtype == model.activation_dtype else qp for name, qp in model.qparams.items()}
    return IntegerModel(model.graph, model.target, dtype, qparams, model.layers)


def _dtype_name(tensor: torch.Tensor) -> str:
    return np.dtype(tensor.numpy().dtype).name


# ---------------------------------------------------------------------------------------------------------
# Running a candidate rule layer by layer on the device's own inputs
# ---------------------------------------------------------------------------------------------------------
class _TeacherForced(ProgramExecutor):
    """Runs the program, but every dumped tensor continues as the device computed it: each layer's prediction
    is the rule applied to the device's inputs to that layer, so a layer is judged on its own arithmetic."""

    def __init__(self, model: IntegerModel, device: Dict[str, torch.Tensor]):
        super().__init__(model.graph, model.target, model._integer_mode)
        self.device = device
        self.predicted: Dict[str, torch.Tensor] = {}

    def dispatch(self, node, args, kwargs):
        value = super().dispatch(node, args, kwargs)
        if node.name in self.device and isinstance(value, QValue):
            self.predicted[node.name] = value.codes
            return QValue(self.device[node.name].to(torch.int64), value.qparams)
        return value


def _teacher_forced(model: IntegerModel, inputs: List[torch.Tensor], device) -> Dict[str, torch.Tensor]:
    executor = _TeacherForced(model, device)
    executor.run([q.to(torch.int64) for q in inputs])
    return executor.predicted


def _as_target(model: IntegerModel, name: str) -> IntegerModel:
    """The same program (graph, grids, weight and bias codes) under another target's arithmetic."""
    target = get_target(name)
    if model.activation_dtype not in target.activation_dtypes:
        raise InputError(f"its activations are {', '.join(target.activation_dtypes)}; this model's are "
                         f"{model.activation_dtype}")
    widest = max((int(layer.weight_codes.abs().max()) for layer in model.layers.values() if layer.weight_codes.numel()),
                 default=0)
    if widest > target.weight_qmax:
        raise InputError(f"its weights span [-{target.weight_qmax}, {target.weight_qmax}]; this model's do not")
    layers = {name: _bias_as(target, model, name, layer) for name, layer in model.layers.items()}
    return IntegerModel(model.graph, target, model.activation_dtype, model.qparams, layers)


def _bias_as(target, model: IntegerModel, name: str, layer: IntegerLayer) -> IntegerLayer:
    """A layer's bias as `target` takes it: int32 codes at s_in * s_w, or (PyTorch's engines) that value in
    float32. The deployed bias is the same real number either way."""
    if layer.bias_codes is None or target.float_bias == model.target.float_bias:
        return layer
    node = model.graph.node(name)
    bias_scale = model.grids[node.args[0].name].scale * layer.weight_scale.to(torch.float64)
    if target.float_bias:
        bias = (layer.bias_codes.to(torch.float64) * bias_scale).to(torch.float32)
    else:
        bias = torch.round(layer.bias_codes.to(torch.float64) / bias_scale)
    return IntegerLayer(layer.weight_codes, layer.weight_scale, bias)


# ---------------------------------------------------------------------------------------------------------
# Files: the golden directory (written by qparity) and the device's dumps (written by anyone)
# ---------------------------------------------------------------------------------------------------------
def _read_index(root: Path) -> dict:
    from .golden import FORMAT, VERSION

    path = root / "index.json"
    try:
        index = json.loads(path.read_text())
    except OSError as error:
        raise InputError(f"{str(root)!r} is not a golden directory: cannot read index.json "
                         f"({error.strerror or error})") from error
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ModelFileError(f"{str(path)!r} is not a {FORMAT} index of version {VERSION}")
    if not isinstance(index.get("model"), str) or not isinstance(index.get("nodes"), list):
        raise ModelFileError(f"{str(path)!r} names no model file; write the golden vectors again with this "
                             "version of qparity (it saves the model next to them)")
    _inside(root, index["model"], path)
    return index


def _inside(root: Path, relative: str, where) -> Path:
    """A path the index names, refused when it leaves the golden directory (a hostile index)."""
    path = (root / relative).resolve()
    if root.resolve() not in path.parents:
        raise ModelFileError(f"{str(where)!r} names {relative!r}, outside its directory")
    return path


def _read_golden_tensor(root: Path, node: dict) -> torch.Tensor:
    path = _inside(root, node["output"], root / "index.json")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise ModelFileError(f"golden tensor {str(path)!r} cannot be read: {error}") from error
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_device_tensor(root: Path, name: str, golden: torch.Tensor, layout: str, dtype: Optional[str]):
    """The device's codes for one golden tensor in the golden's layout, the code type its file declares (None:
    not said) and the file; None when it was not dumped."""
    for folder in (root, root / "tensors"):
        npy, raw = folder / f"{name}.npy", folder / f"{name}.bin"
        if npy.is_file():
            return (*_from_npy(npy, golden, layout), npy)
        if raw.is_file():
            return _from_raw(raw, golden, layout, dtype), dtype, raw
    return None


def _from_npy(path: Path, golden: torch.Tensor, layout: str) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise InputError(f"device dump {str(path)!r} is not a .npy array: {error}") from error
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu":
        raise InputError(f"device dump {str(path)!r} holds {getattr(array, 'dtype', type(array))} values; it must "
                         f"hold integer codes ({golden.dtype})")
    nchw, nhwc = tuple(golden.shape), _nhwc_shape(golden)
    shapes = [s for s, name in ((nchw, "nchw"), (nhwc, "nhwc")) if s is not None and tuple(array.shape) == s]
    if not shapes:
        raise InputError(f"device dump {str(path)!r} has shape {tuple(array.shape)}; the golden tensor is "
                         f"{nchw} (NCHW){f' or {nhwc} in NHWC' if nhwc else ''}")
    codes = torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))
    channels_last = nhwc is not None and tuple(array.shape) == nhwc and (tuple(array.shape) != nchw or layout == "nhwc")
    declared = array.dtype.name if array.dtype.name in NUMPY_DTYPES else None
    return (codes.permute(0, 3, 1, 2).contiguous() if channels_last else codes), declared


def _from_raw(path: Path, golden: torch.Tensor, layout: str, dtype: Optional[str]) -> torch.Tensor:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise FileAccessError(f"cannot read device dump {str(path)!r}: {error.strerror or error}") from error
    if len(data) != golden.numel():
        raise InputError(f"device dump {str(path)!r} has {len(data)} bytes; the golden tensor has "
                         f"{golden.numel()} codes of one byte")
    array = np.frombuffer(data, dtype=NUMPY_DTYPES.get(dtype) or golden.numpy().dtype).astype(np.int64)
    if layout == "nhwc" and _nhwc_shape(golden) is not None:
        return torch.from_numpy(array.reshape(_nhwc_shape(golden)).copy()).permute(0, 3, 1, 2).contiguous()
    return torch.from_numpy(array.reshape(tuple(golden.shape)).copy())


def _nhwc_shape(golden: torch.Tensor) -> Optional[Tuple[int, ...]]:
    if golden.dim() != 4:
        return None
    n, c, h, w = golden.shape
    return (n, h, w, c)


def _checked(codes: torch.Tensor, dtype: str, path: Path) -> None:
    info = np.iinfo(dtype)
    if codes.numel() and (int(codes.min()) < info.min or int(codes.max()) > info.max):
        raise InputError(f"device dump {str(path)!r} holds codes outside {dtype} "
                         f"[{info.min}, {info.max}]: not this tensor's codes")
