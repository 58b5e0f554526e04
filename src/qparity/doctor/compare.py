"""Run a torch.ao prepared (fake-quant) model and its converted model side by side and record what each
layer computed: the qparams every fake-quant module *actually used*, and every quantized layer's codes.

The effective qparams are recomputed at call time exactly as the module computes them, from a copy of its
state taken just before the call, and checked against the grid its output lies on; module attributes are
never read alone (a fused fake quant ignores a hand-set `scale`: it recomputes scale and zero point from the
observer's min/max on every call, aten/src/ATen/native/quantized/cpu/fused_obs_fake_quant.cpp).
"""
from __future__ import annotations

import copy
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx
from torch import nn
from torch.ao.quantization.fake_quantize import FakeQuantize, FakeQuantizeBase, FusedMovingAvgObsFakeQuantize

from ..errors import QParityError


class DoctorInputError(QParityError, TypeError):
    """`doctor` was given something that is not a torch.ao prepared model and its converted model."""


def fake_quant_classes() -> Tuple[tuple, tuple, tuple]:
    """(any fake quant, observer-then-calculate_qparams FakeQuantize, fused) classes of torch.ao and, once a
    PT2E user has imported it, of torchao (torchao.quantization.pt2e keeps its own copies of these classes)."""
    bases, plain, fused = [FakeQuantizeBase], [FakeQuantize], [FusedMovingAvgObsFakeQuantize]
    if "torchao.quantization.pt2e.fake_quantize" in sys.modules:
        ao = sys.modules["torchao.quantization.pt2e.fake_quantize"]
        bases, plain, fused = bases + [ao.FakeQuantizeBase], plain + [ao.FakeQuantize], \
            fused + [ao.FusedMovingAvgObsFakeQuantize]
    return tuple(bases), tuple(plain), tuple(fused)


@dataclass
class FakeQuantCall:
    """One fake-quant module's first call in the prepared model's forward."""
    path: str
    input: torch.Tensor
    output: torch.Tensor
    scale: Optional[torch.Tensor]  # float64, one value per channel (or one); None when fake quant is off
    zero_point: Optional[torch.Tensor]  # int64, like scale
    axis: Optional[int]
    qmin: int
    qmax: int
    observer_enabled: bool
    range_before: Optional[Tuple[float, float]]  # the observer's min/max before and after the call
    range_after: Optional[Tuple[float, float]]
    scale_before: Optional[torch.Tensor]  # the module's scale attribute before the call
    on_grid: bool  # the recomputed fake quant reproduces the module's output exactly
    source: str  # how scale and zero point were recomputed


@dataclass
class ModuleCall:
    """A module's first call: the module, its first input and its output."""
    module: Any
    input: Any
    output: Any


@dataclass
class Run:
    """Everything recorded from one forward of each model."""
    fake_quants: Dict[str, FakeQuantCall] = field(default_factory=dict)
    order: List[str] = field(default_factory=list)  # activation fake quants in call order
    prepared_modules: Dict[str, ModuleCall] = field(default_factory=dict)
    bn_state: Dict[str, Dict[str, torch.Tensor]] = field(default_factory=dict)  # ConvBn: stats before the call
    converted_outputs: Dict[str, ModuleCall] = field(default_factory=dict)  # layer name -> quantized call
    converted_modules: Dict[str, ModuleCall] = field(default_factory=dict)
    prepared_output: Any = None
    converted_output: Any = None
    layer_names: Dict[str, str] = field(default_factory=dict)  # activation fake-quant path -> layer name


def _observer_range(observer: nn.Module) -> Optional[Tuple[float, float]]:
    lo, hi = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
    if not isinstance(lo, torch.Tensor) or lo.numel() == 0:
        return None
    return float(lo.min()), float(hi.max())


def snapshot(module: FakeQuantizeBase) -> Dict[str, Any]:
    return {"state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "observer": copy.deepcopy(module.activation_post_process),
            "observer_enabled": bool(module.observer_enabled[0]),
            "fake_quant_enabled": bool(module.fake_quant_enabled[0]),
            "range": _observer_range(module.activation_post_process),
            "scale": module.scale.detach().clone().to(torch.float64)}


def _recompute_fused(module: FusedMovingAvgObsFakeQuantize, before: Dict[str, Any], x: torch.Tensor):
    """Replay the fused op on a copy of the pre-call state; it writes the scale/zero point it used there."""
    observer = before["observer"]
    scale, zero_point = before["state"]["scale"].clone(), before["state"]["zero_point"].clone()
    out = torch.fused_moving_avg_obs_fake_quant(
        x.detach(), before["state"]["observer_enabled"].clone(), before["state"]["fake_quant_enabled"].clone(),
        observer.min_val.clone(), observer.max_val.clone(), scale, zero_point, observer.averaging_constant,
        observer.quant_min, observer.quant_max, module.ch_axis, module.is_per_channel, module.is_symmetric_quant)
    return out, scale, zero_point, "replayed torch.fused_moving_avg_obs_fake_quant on the pre-call observer state"


def _recompute_plain(module: FakeQuantizeBase, before: Dict[str, Any], x: torch.Tensor):
    """FakeQuantize: the observer (when enabled) sees x first, then calculate_qparams gives the grid."""
    plain = fake_quant_classes()[1]
    if before["observer_enabled"] and isinstance(module, plain):
        observer = before["observer"]
        observer(x.detach())
        scale, zero_point = observer.calculate_qparams()
        source = "observer updated with this input, then calculate_qparams()"
    else:
        scale, zero_point = before["state"]["scale"], before["state"]["zero_point"]
        source = "the scale and zero_point buffers (observer disabled)"
    qmin, qmax = module.activation_post_process.quant_min, module.activation_post_process.quant_max
    if module.is_per_channel:
        out = torch.fake_quantize_per_channel_affine(x.detach(), scale.float(), zero_point.int(), module.ch_axis,
                                                     qmin, qmax)
    else:
        out = torch.fake_quantize_per_tensor_affine(x.detach(), scale.float(), zero_point.int(), qmin, qmax)
    return out, scale, zero_point, source


def fake_quant_call(path: str, module: FakeQuantizeBase, before: Dict[str, Any], x: torch.Tensor,
                    output: torch.Tensor) -> FakeQuantCall:
    """What one call of a fake-quant module did, from `snapshot(module)` taken just before it."""
    observer = module.activation_post_process
    qmin, qmax = observer.quant_min, observer.quant_max
    if not before["fake_quant_enabled"]:
        scale = zero_point = None
        on_grid, source = torch.equal(x, output), "fake quant disabled: the output is the input"
    else:
        replay = _recompute_fused if isinstance(module, fake_quant_classes()[2]) else _recompute_plain
        out, scale, zero_point, source = replay(module, before, x)
        on_grid = torch.equal(out, output.detach())
        scale = scale.detach().reshape(-1).to(torch.float64)
        zero_point = zero_point.detach().reshape(-1).to(torch.int64)
    return FakeQuantCall(path=path, input=x.detach(), output=output.detach(), scale=scale, zero_point=zero_point,
                         axis=module.ch_axis if module.is_per_channel else None, qmin=qmin, qmax=qmax,
                         observer_enabled=before["observer_enabled"], range_before=before["range"],
                         range_after=_observer_range(observer), scale_before=before["scale"], on_grid=on_grid,
                         source=source)


def _hook_prepared(model: nn.Module, run: Run) -> List[Any]:
    handles = []
    for path, module in model.named_modules():
        if isinstance(module, FakeQuantizeBase):
            handles += _hook_fake_quant(path, module, run)
        elif hasattr(module, "weight_fake_quant"):
            handles.append(module.register_forward_pre_hook(_bn_snapshot(path, run)))
            handles.append(module.register_forward_hook(_first_call(path, run.prepared_modules)))
    return handles


def _hook_fake_quant(path: str, module: FakeQuantizeBase, run: Run) -> List[Any]:
    pending: Dict[str, Any] = {}

    def pre(mod, args):
        if path not in run.fake_quants:
            pending["before"] = snapshot(mod)

    def post(mod, args, output):
        if path in run.fake_quants or not isinstance(args[0], torch.Tensor):
            return
        run.fake_quants[path] = fake_quant_call(path, mod, pending.pop("before"), args[0], output)
        if not path.endswith("weight_fake_quant"):
            run.order.append(path)

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def _bn_snapshot(path: str, run: Run):
    def pre(mod, args):
        bn = getattr(mod, "bn", None)
        if bn is not None and path not in run.bn_state:
            run.bn_state[path] = {"running_mean": bn.running_mean.detach().clone(),
                                  "running_var": bn.running_var.detach().clone(), "training": bn.training}
    return pre


def _first_call(path: str, store: Dict[str, ModuleCall]):
    def post(mod, args, output):
        if path not in store:
            store[path] = ModuleCall(module=mod, input=args[0] if args else None, output=output)
    return post


def _fx_layer_names(model: torch.fx.GraphModule) -> Dict[str, str]:
    """FX: name the layer behind each top-level activation_post_process_N by the node that feeds it."""
    names = {}
    for node in model.graph.nodes:
        if node.op == "call_module" and isinstance(model.get_submodule(node.target), FakeQuantizeBase):
            source = node.args[0]
            names[node.target] = source.target if source.op == "call_module" else source.name
    return names


def _layer_name(path: str, fx_names: Dict[str, str]) -> str:
    if path in fx_names:
        return fx_names[path]
    return path[: -len(".activation_post_process")] if path.endswith(".activation_post_process") else path


class _Recorder(torch.fx.Interpreter):
    """Runs a converted GraphModule node by node and keeps every quantized value by node."""

    def __init__(self, module: torch.fx.GraphModule):
        super().__init__(module)
        self.values: Dict[torch.fx.Node, Any] = {}

    def run_node(self, node):
        value = super().run_node(node)
        self.values[node] = value
        return value


def _fx_converted_layers(model: torch.fx.GraphModule, values: Dict[torch.fx.Node, Any]) -> Dict[str, ModuleCall]:
    """Layer name -> quantized output: modules by path, quantize_per_tensor by what it quantizes, other
    quantized functions (quantized.add ...) by their node name without convert's numeric suffix."""
    layers: Dict[str, ModuleCall] = {}
    for node, value in values.items():
        if not (isinstance(value, torch.Tensor) and value.is_quantized) or node.op in ("placeholder", "get_attr"):
            continue
        first = node.args[0] if node.args else None
        operation = node.target
        if node.op == "call_module":
            name, operation = node.target, model.get_submodule(node.target)
        elif node.target is torch.quantize_per_tensor and isinstance(first, torch.fx.Node):
            name = first.name
        else:
            name = re.sub(r"_\d+$", "", node.name)
            if name in layers:
                name = node.name
        source = values.get(first) if isinstance(first, torch.fx.Node) else None
        layers.setdefault(name, ModuleCall(module=operation, input=source, output=value))
    return layers


def output_tensors(value: Any) -> List[torch.Tensor]:
    """Every tensor in a model's output (nested tuples, lists, dicts), quantized ones dequantized."""
    if isinstance(value, torch.Tensor):
        return [value.dequantize() if value.is_quantized else value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in output_tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in output_tensors(v)]
    return []


def record(prepared: nn.Module, converted: nn.Module, example_inputs: Tuple[Any, ...]) -> Run:
    """Run both models once on `example_inputs` (on copies: the caller's observers and BN stats stay put)."""
    if not isinstance(prepared, nn.Module) or not isinstance(converted, nn.Module):
        raise DoctorInputError(f"doctor needs two nn.Modules (prepared, converted), got "
                               f"{type(prepared).__name__} and {type(converted).__name__}")
    if not any(isinstance(m, FakeQuantizeBase) for m in prepared.modules()):
        raise DoctorInputError(f"the prepared model ({type(prepared).__name__}) has no fake-quant modules: pass the "
                               "model returned by prepare_qat / prepare_qat_fx, before convert")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    prepared = copy.deepcopy(prepared)
    run = Run()
    handles = _hook_prepared(prepared, run)
    try:
        with torch.no_grad():
            run.prepared_output = prepared(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    fx_names = _fx_layer_names(prepared) if isinstance(prepared, torch.fx.GraphModule) else {}
    run.layer_names = {path: _layer_name(path, fx_names) for path in run.order}
    run.converted_output, run.converted_outputs, run.converted_modules = _run_converted(converted, example_inputs)
    return run


def _run_converted(converted: nn.Module, example_inputs):
    modules: Dict[str, ModuleCall] = {}
    handles = [m.register_forward_hook(_first_call(path, modules)) for path, m in converted.named_modules() if path]
    try:
        with torch.no_grad():
            if isinstance(converted, torch.fx.GraphModule):
                recorder = _Recorder(converted)
                output = recorder.run(*example_inputs)
                layers = _fx_converted_layers(converted, recorder.values)
            else:
                output = converted(*example_inputs)
                layers = {}
                named = dict(converted.named_modules())
                for path, call in modules.items():
                    if isinstance(call.output, torch.Tensor) and call.output.is_quantized:
                        name = path[: -len(".activation_post_process")] if path.endswith(".activation_post_process") \
                            else path
                        layers.setdefault(name, ModuleCall(module=named.get(name, call.module), input=call.input,
                                                           output=call.output))
    finally:
        for handle in handles:
            handle.remove()
    return output, layers, modules
