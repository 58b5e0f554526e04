"""Why the converted model's codes differ from the fake-quant model's: one `Cause` per finding, each backed
by numbers computed here from what `compare.record` saw.

For a conv or linear layer the doctor walks from the fake-quant forward to the integer engine one ingredient
at a time, in float64 (exact enough for 8-bit codes), and counts the output codes each step moves:

    F0 the fake-quant model's codes
    F1 the same layer in exact arithmetic (fake input, fake weights, the prepared bias) -> float_accumulation,
       or bn_folding when BN normalized with batch statistics
    F2 ... on the converted output grid                     -> qparams_mismatch / saturation (activations)
    F3 ... with the converted int8 weights                  -> weight_grid
    F4 ... with the converted input codes                   (inherited from earlier layers)
    F5 ... with the converted float bias                    -> bias_quantization / bn_folding
    F6 ... with the bias as the engine adds it              -> bias_quantization
    F7 the engine's requantization (float32 multiplier)     -> requantization
    A  the converted model's codes; F7 != A is reported as unexplained, never silently.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..numerics import TARGETS
from . import engines
from .compare import FakeQuantCall, ModuleCall, Run
from .report import Cause, LayerResult

_QRANGE = {torch.quint8: (0, 255), torch.qint8: (-128, 127), torch.qint32: (-2 ** 31, 2 ** 31 - 1)}


def fmt(value: float) -> str:
    """Numbers in explanations: 6 significant digits."""
    return f"{value:.6g}"


def fmt_pair(a: float, b: float) -> Tuple[str, str]:
    """Two numbers with as many digits as it takes to show they differ (up to float64's 17)."""
    for digits in (6, 9, 12, 17):
        left, right = f"{a:.{digits}g}", f"{b:.{digits}g}"
        if (left != right) == (a != b):
            break
    return left, right


def _qparity_fix(engine: str) -> str:
    target = engine if engine in TARGETS else None
    return (f"train with qparity for target {target}" if target else
            f"train with qparity for the target you deploy to (qparity.prepare_qat(model, x, target=...); "
            f"targets: {', '.join(TARGETS)})")


def fake_codes(call: FakeQuantCall) -> torch.Tensor:
    """The integer codes behind a fake-quant output: out / scale + zero_point on the grid it used."""
    scale, zero_point = call.scale, call.zero_point
    if call.axis is not None:
        scale = engines.channel_view(scale, call.output.dim(), call.axis)
        zero_point = engines.channel_view(zero_point, call.output.dim(), call.axis)
    return torch.round(call.output.to(torch.float64) / scale).to(torch.int64) + zero_point


def operation_name(operation: Any) -> str:
    """A converted layer's module class, or the function an FX node calls."""
    if isinstance(operation, torch.nn.Module):
        return type(operation).__name__
    return getattr(operation, "__name__", str(operation))


def int_codes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.int_repr().to(torch.int64)


def quantized_qparams(tensor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Optional[int]]:
    """Scale (float64) and zero point (int64) vectors of a quantized tensor, and its channel axis."""
    if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                            torch.per_channel_affine_float_qparams):
        return (tensor.q_per_channel_scales().to(torch.float64), tensor.q_per_channel_zero_points().to(torch.int64),
                tensor.q_per_channel_axis())
    return (torch.tensor([tensor.q_scale()], dtype=torch.float64),
            torch.tensor([tensor.q_zero_point()], dtype=torch.int64), None)


def compare_codes(name: str, module: str, expected: torch.Tensor, actual: torch.Tensor) -> LayerResult:
    diff = actual - expected
    wrong = diff != 0
    mismatched = int(wrong.sum())
    first = None
    if mismatched:
        flat = int(wrong.reshape(-1).nonzero()[0])
        first = [int(i) for i in torch.unravel_index(torch.tensor(flat), expected.shape)]
    values, counts = torch.unique(diff, return_counts=True)
    return LayerResult(name=name, module=module, mismatched=mismatched, total=expected.numel(),
                       max_diff=int(diff.abs().max()) if diff.numel() else 0, first_index=first,
                       expected=int(expected[tuple(first)]) if first else None,
                       actual=int(actual[tuple(first)]) if first else None,
                       diff_histogram={int(v): int(c) for v, c in zip(values, counts)})


@dataclass
class Grid:
    """An output grid: codes = clamp(rne(y / scale) + zero_point, qmin, qmax); a fused ReLU clamps at zero_point."""
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def codes(self, y: torch.Tensor, relu: bool) -> torch.Tensor:
        q = torch.round(y / self.scale) + self.zero_point
        return q.clamp(self.zero_point if relu else self.qmin, self.qmax).to(torch.int64)


def diagnose(run: Run, engine: str) -> Tuple[List[LayerResult], List[Cause], List[str]]:
    """Per-layer code comparison, the causes found, and notes about what could not be compared."""
    layers, causes, notes = [], [], []
    for path in run.order:
        name, call = run.layer_names[path], run.fake_quants[path]
        converted = run.converted_outputs.get(name)
        if converted is None:
            notes.append(f"{name}: fake-quantized by {path}, but the converted model has no quantized output there")
            continue
        if call.scale is None:
            notes.append(f"{name}: fake quant is disabled in {path}, so the prepared model does not quantize it")
            continue
        actual = int_codes(converted.output)
        if actual.shape != call.output.shape or call.axis is not None:
            notes.append(f"{name}: output shapes {tuple(call.output.shape)} and {tuple(actual.shape)} differ")
            continue
        layers.append(compare_codes(name, operation_name(converted.module), fake_codes(call), actual))
        causes += activation_causes(name, call, converted.output, layers[-1], notes)
    for path, call in run.fake_quants.items():
        if call.observer_enabled:
            causes.append(observer_cause(path, call, run))
    for path, prepared in run.prepared_modules.items():
        causes += weighted_layer_causes(path, prepared, run, engine, layers)
    if engine in ("fbgemm", "x86"):
        notes += saturation_risk_notes(run)
    return layers, causes, notes


INT16_MIN, INT16_MAX = -32768, 32767


def saturation_risk_notes(run: Run) -> List[str]:
    """Layers whose codes may differ on fbgemm's other CPU path (AVX2 without VNNI).

    There fbgemm multiplies uint8 activations by int8 weights with vpmaddubsw, which adds each pair of
    neighbouring products along the reduction axis in int16 with saturation (the reason for reduce_range).
    A pair is at risk when its largest possible sum, for activation codes up to the largest code seen
    (255, or 127 with reduce_range), leaves int16. Pairs are taken along the input channels within each
    kernel position, the order fbgemm packs a conv's weights in (channels-last im2col) and a linear's.
    """
    notes = []
    for path, converted in run.converted_modules.items():
        module, qx = converted.module, converted.input
        weight = getattr(module, "weight", None)
        if not callable(weight) or not (isinstance(qx, torch.Tensor) and qx.is_quantized):
            continue
        qw = weight()
        if qw.dim() == 4 and getattr(module, "groups", 1) != 1:
            continue  # grouped and depthwise convs use other kernels, without pairwise int16 sums
        _, zw, _ = quantized_qparams(qw)
        w = int_codes(qw) - (zw.reshape(-1, *[1] * (qw.dim() - 1)) if zw.dim() else zw)
        w = w.permute(0, 2, 3, 1) if w.dim() == 4 else w  # [out, (kh, kw,) in]: pairs along in
        if w.shape[-1] % 2:
            w = torch.nn.functional.pad(w, (0, 1))
        pairs = w.reshape(w.shape[0], -1, 2)
        x_max = 255 if int(int_codes(qx).max()) > 127 else 127
        high = pairs.clamp(min=0).sum(-1) * x_max
        low = pairs.clamp(max=0).sum(-1) * x_max
        risky = (high > INT16_MAX) | (low < INT16_MIN)
        if bool(risky.any()):
            channel = int(torch.nonzero(risky)[0][0])
            worst = int(torch.maximum(high, -low - 1).max())
            notes.append(f"{path}: on a CPU without VNNI (AVX2), fbgemm saturates pairs of products in int16: "
                         f"{int(risky.sum())} weight pairs (first in output channel {channel}) can reach "
                         f"{worst} > {INT16_MAX} with activation codes up to {x_max}, so this layer may give "
                         "other codes there; this machine's path is exact. Use reduce_range=True, or check "
                         "on the target CPU")
    return notes


def _owner(path: str, run: Run) -> str:
    """The layer a fake-quant module belongs to."""
    if path.endswith(".weight_fake_quant"):
        return path[: -len(".weight_fake_quant")]
    return run.layer_names.get(path, path)


def observer_cause(path: str, call: FakeQuantCall, run: Run) -> Cause:
    before, after = call.range_before, call.range_after
    moved = before != after
    used = fmt(float(call.scale[0])) if call.scale is not None else "none"
    if moved:
        text = (f"The observer of {path} was still enabled: this one forward moved its range from "
                f"[{fmt(before[0])}, {fmt(before[1])}] to [{fmt(after[0])}, {fmt(after[1])}], so the qparams it "
                f"trains with change on every call (this call used scale {used}) and convert sees whichever came last.")
    else:
        text = (f"The observer of {path} is still enabled (scale {used} in this call); its range did not move on "
                f"these inputs, but it will on others, and the qparams convert reads will drift from the trained ones.")
    return Cause(kind="observer_not_frozen", layer=_owner(path, run), explanation=text,
                 evidence={"module": path, "range_before": list(before) if before else None,
                           "range_after": list(after) if after else None, "range_moved": moved,
                           "scale_used": call.scale.tolist() if call.scale is not None else None,
                           "scale_attribute_before": call.scale_before.tolist()},
                 fix="call model.apply(torch.ao.quantization.disable_observer) once calibration is over, "
                     "before evaluating and before convert", affected=0)


def activation_causes(name: str, call: FakeQuantCall, output: torch.Tensor, layer: LayerResult,
                      notes: List[str]) -> List[Cause]:
    fake_scale, fake_zp = float(call.scale[0]), int(call.zero_point[0])
    qmin, qmax = _QRANGE[output.dtype]
    if fake_scale != output.q_scale() or fake_zp != output.q_zero_point():
        grid = Grid(output.q_scale(), output.q_zero_point(), qmin, qmax)
        moved = int((grid.codes(call.output.to(torch.float64), relu=False) != fake_codes(call)).sum())
        shown_fake, shown_conv = fmt_pair(fake_scale, output.q_scale())
        text = (f"{call.path} fake-quantized {name}'s output with scale {shown_fake} and zero point {fake_zp} "
                f"in this forward, but convert gave the layer scale {shown_conv} and zero point "
                f"{output.q_zero_point()}; re-quantizing the fake output on convert's grid moves {moved} of "
                f"{layer.total} codes.")
        return [Cause(kind="qparams_mismatch", layer=name, explanation=text,
                      evidence={"tensor": "output", "module": call.path, "fake_scale": fake_scale,
                                "fake_zero_point": fake_zp, "converted_scale": output.q_scale(),
                                "converted_zero_point": output.q_zero_point(), "codes_moved": moved,
                                "recomputed_from": call.source, "fake_output_on_recomputed_grid": call.on_grid},
                      fix="set qparams through the observer (min_val/max_val), not the fake quant's scale buffer: "
                          "convert reads observer.calculate_qparams(); then disable observers before convert",
                      affected=moved)]
    if (call.qmin, call.qmax) != (qmin, qmax):
        clipped = _clipped(call, output)
        if not clipped:
            notes.append(f"{name}: fake quant clamps codes to [{call.qmin}, {call.qmax}] (reduce_range), the "
                         f"converted {output.dtype} to [{qmin}, {qmax}]; no code crossed the difference on these "
                         "inputs, but inputs beyond the observed range will")
            return []
        text = (f"{call.path} clamps {name}'s output codes to [{call.qmin}, {call.qmax}] (reduce_range) while the "
                f"converted {output.dtype} output spans [{qmin}, {qmax}]; {clipped} of {layer.total} codes sit on "
                f"the training clamp and leave it after convert.")
        return [Cause(kind="saturation", layer=name, explanation=text,
                      evidence={"fake_range": [call.qmin, call.qmax], "converted_range": [qmin, qmax],
                                "codes_past_training_clamp": clipped},
                      fix="use the same quant_min/quant_max (reduce_range) in the activation qconfig as the "
                          "converted model's dtype range", affected=clipped)]
    return []


def _clipped(call: FakeQuantCall, output: torch.Tensor) -> int:
    expected, actual = fake_codes(call), int_codes(output)
    above = (expected == call.qmax) & (actual > call.qmax)
    below = (expected == call.qmin) & (actual < call.qmin)
    return int(above.sum() + below.sum())


def _forward(module: Any, x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer's real-valued output in float64."""
    if w.dim() == 2:
        return F.linear(x, w, b)
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.dim()]
    return conv(x, w, b, module.stride, module.padding, module.dilation, module.groups)


def _prepared_bias(path: str, module: Any, run: Run) -> Optional[torch.Tensor]:
    """The bias the fake forward adds in exact arithmetic; with BN, folded with the pre-call running stats."""
    bias = module.bias.detach().to(torch.float64) if module.bias is not None else None
    bn = getattr(module, "bn", None)
    if bn is None:
        return bias
    state = run.bn_state[path]
    gain = bn.weight.detach().to(torch.float64) / torch.sqrt(state["running_var"].to(torch.float64) + bn.eps)
    base = (bias if bias is not None else 0.0) - state["running_mean"].to(torch.float64)
    return base * gain + bn.bias.detach().to(torch.float64)


def _converted_bias(module: Any) -> Optional[torch.Tensor]:
    bias = module.bias()
    return bias.detach() if bias is not None else None


def _output_fake_quant(path: str, run: Run) -> Optional[FakeQuantCall]:
    for fq_path in run.order:
        if run.layer_names[fq_path] == path:
            return run.fake_quants[fq_path]
    return None


@dataclass
class Stages:
    """Codes of one conv/linear layer at each step from the fake forward (F0) to the converted engine (A)."""
    codes: Dict[str, torch.Tensor]
    acc: torch.Tensor
    exact: torch.Tensor  # F1's real values divided by the fake output scale
    rule: str

    def moved(self, a: str, b: str) -> int:
        return int((self.codes[a] != self.codes[b]).sum())

    def first(self, a: str, b: str) -> Optional[Tuple[int, ...]]:
        wrong = (self.codes[a] != self.codes[b]).reshape(-1).nonzero()
        if not len(wrong):
            return None
        return tuple(int(i) for i in torch.unravel_index(wrong[0, 0], self.codes[a].shape))


def stages(path: str, prepared: ModuleCall, converted: ModuleCall, out_call: FakeQuantCall,
           weight_call: FakeQuantCall, run: Run, engine: str) -> Stages:
    pm, cm = prepared.module, converted.module
    qx, qy, qw = converted.input, converted.output, cm.weight()
    relu = "ReLU" in type(pm).__name__
    fake = Grid(float(out_call.scale[0]), int(out_call.zero_point[0]), out_call.qmin, out_call.qmax)
    grid = Grid(qy.q_scale(), qy.q_zero_point(), *_QRANGE[qy.dtype])
    x_f, w_f = prepared.input.detach().to(torch.float64), weight_call.output.to(torch.float64)
    x_c, w_c = qx.dequantize().to(torch.float64), qw.dequantize().to(torch.float64)
    b_p = _prepared_bias(path, pm, run)
    b_c = _converted_bias(cm)
    y1 = _forward(pm, x_f, w_f, b_p)
    codes = {"F0": fake_codes(out_call), "F1": fake.codes(y1, relu), "F2": grid.codes(y1, relu),
             "F3": grid.codes(_forward(pm, x_f, w_c, b_p), relu), "F4": grid.codes(_forward(pm, x_c, w_c, b_p), relu),
             "F5": grid.codes(_forward(pm, x_c, w_c, b_c.to(torch.float64) if b_c is not None else None), relu)}
    sw, zw, _ = quantized_qparams(qw)
    channels = qw.shape[0]
    sw, zw = sw.expand(channels), zw.expand(channels)
    w_int = (int_codes(qw) - engines.channel_view(zw, qw.dim(), 0)).to(torch.float64)
    acc = _forward(pm, (int_codes(qx) - qx.q_zero_point()).to(torch.float64), w_int, None)
    axis = acc.dim() - 1 if qw.dim() == 2 else 1
    rule = engines.rule(engine, qw.dim() == 2, bool((zw == 0).all()))
    units = engines.channel_view(engines.bias_in_accumulator_units(b_c, qx.q_scale(), sw, rule), acc.dim(), axis)
    exact_p = engines.channel_view(qx.q_scale() * sw, acc.dim(), axis)
    codes["F6"] = grid.codes((acc + units) * exact_p, relu)
    codes["F7"] = engines.requantize(acc, b_c, qx.q_scale(), sw, grid.scale, grid.zero_point,
                                     grid.zero_point if relu else grid.qmin, grid.qmax, rule, axis)
    codes["A"] = int_codes(qy)
    return Stages(codes=codes, acc=acc, exact=y1 / fake.scale + fake.zero_point, rule=rule)


def weighted_layer_causes(path: str, prepared: ModuleCall, run: Run, engine: str,
                          layers: List[LayerResult]) -> List[Cause]:
    weight_call = run.fake_quants.get(path + ".weight_fake_quant")
    converted = run.converted_modules.get(path)
    out_call = _output_fake_quant(path, run)
    if weight_call is None or weight_call.scale is None or converted is None \
            or not callable(getattr(converted.module, "weight", None)):
        return []
    causes = weight_causes(path, weight_call, converted.module.weight(), engine)
    layer = next((l for l in layers if l.name == path), None)
    qx = converted.input
    if out_call is None or layer is None or not (isinstance(qx, torch.Tensor) and qx.is_quantized) \
            or getattr(prepared.module, "padding_mode", "zeros") != "zeros":
        return causes
    st = stages(path, prepared, converted, out_call, weight_call, run, engine)
    layer.stages = {step: st.moved(a, b) for step, a, b in (
        ("float arithmetic", "F0", "F1"), ("output grid", "F1", "F2"), ("weights", "F2", "F3"),
        ("input codes", "F3", "F4"), ("bias", "F4", "F5"), ("engine bias", "F5", "F6"),
        ("requantization", "F6", "F7"), ("unexplained", "F7", "A"))}
    layer.unexplained = layer.stages["unexplained"]
    for cause in causes:
        cause.affected = layer.stages["weights"]
        cause.explanation += f" On these inputs this alone moves {cause.affected} of {layer.total} output codes."
        cause.evidence["output_codes_moved"] = cause.affected
    causes += arithmetic_causes(path, prepared, converted, st, run, engine, layer.total)
    return causes


def weight_causes(path: str, call: FakeQuantCall, qw: torch.Tensor, engine: str) -> List[Cause]:
    scale, zero_point, _ = quantized_qparams(qw)
    channels = qw.shape[0]
    fake_s, fake_z = call.scale.expand(channels), call.zero_point.expand(channels)
    conv_s, conv_z = scale.expand(channels), zero_point.expand(channels)
    causes = []
    differ = ((fake_s != conv_s) | (fake_z != conv_z)).nonzero()
    if len(differ):
        c = int(differ[0, 0])
        where = "" if fake_s.numel() == 1 or (call.axis is None and scale.numel() == 1) else \
            f" ({len(differ)} of {channels} output channels differ; channel {c} shown)"
        shown_fake, shown_conv = fmt_pair(float(fake_s[c]), float(conv_s[c]))
        text = (f"{path}'s weights were fake-quantized with scale {shown_fake} and zero point "
                f"{int(fake_z[c])} in this forward, but convert quantized them with scale {shown_conv} "
                f"and zero point {int(conv_z[c])}{where}.")
        causes.append(Cause(kind="qparams_mismatch", layer=path, explanation=text, evidence={
            "tensor": "weight", "module": call.path, "channel": c, "fake_scale": float(fake_s[c]),
            "fake_zero_point": int(fake_z[c]), "converted_scale": float(conv_s[c]),
            "converted_zero_point": int(conv_z[c]), "channels_differing": len(differ),
            "recomputed_from": call.source, "observer_range": list(call.range_before) if call.range_before else None},
            fix=_weight_fix(call, engine), affected=0))
    fake_w, conv_w = call.output.to(torch.float64), qw.dequantize().to(torch.float64)
    wrong = (fake_w != conv_w).reshape(-1).nonzero()
    if len(wrong):
        i = tuple(int(v) for v in torch.unravel_index(wrong[0, 0], fake_w.shape))
        fake_codes_w, conv_codes_w = fake_codes(call), int_codes(qw)
        ch = i[0] if fake_s.numel() > 1 else 0
        shown_fake, shown_conv = fmt_pair(float(fake_w[i]), float(conv_w[i]))
        text = (f"{len(wrong)} of {fake_w.numel()} weights of {path} deploy on other values: weight{list(i)} trains "
                f"as {shown_fake} (code {int(fake_codes_w[i])} at scale {fmt(float(fake_s[ch]))}, zero point "
                f"{int(fake_z[ch])}) and deploys as {shown_conv} (code {int(conv_codes_w[i])} at scale "
                f"{fmt(float(conv_s[ch]))}, zero point {int(conv_z[ch])}).")
        causes.append(Cause(kind="weight_grid", layer=path, explanation=text, evidence={
            "weights_differing": len(wrong), "weights": fake_w.numel(), "first_index": list(i),
            "fake_value": float(fake_w[i]), "converted_value": float(conv_w[i]),
            "fake_code": int(fake_codes_w[i]), "converted_code": int(conv_codes_w[i])},
            fix=f"make the weight grids agree (see the qparams_mismatch fix for {path})" if len(differ) else
            "the weights were changed between the QAT forward and convert: convert again from the prepared model",
            affected=0))
    return causes


def _weight_fix(call: FakeQuantCall, engine: str) -> str:
    return ("use FakeQuantize instead of FusedMovingAvgObsFakeQuantize for weights (the fused op trains on "
            "max(|min|/128, max/127), or an affine grid when min == 0, while convert uses max(|min|, max)/127.5), "
            "or set the weight observer's min_val/max_val so both grids agree; or " + _qparity_fix(engine) if
            "fused" in call.source else
            "give the weight fake quant the qparams its observer computes (convert calls "
            "weight_fake_quant.calculate_qparams()), and disable the observer only after it has seen the weights")


def arithmetic_causes(path: str, prepared: ModuleCall, converted: ModuleCall, st: Stages, run: Run, engine: str,
                      total: int) -> List[Cause]:
    causes = []
    moved = st.moved("F0", "F1")
    bn_state = run.bn_state.get(path)
    if moved and bn_state is not None and bn_state["training"]:
        causes.append(_bn_batch_cause(path, prepared, bn_state, moved, total))
    elif moved:
        i = st.first("F0", "F1")
        text = (f"In {moved} of {total} outputs of {path} the fake forward's float32 arithmetic lands on the other "
                f"side of a rounding boundary: at {list(i)} the exact value is {fmt(float(st.exact[i]))} codes, "
                f"which rounds to {int(st.codes['F1'][i])}, but the fake forward produced {int(st.codes['F0'][i])}.")
        causes.append(Cause(kind="float_accumulation", layer=path, explanation=text, evidence={
            "outputs_moved": moved, "index": list(i), "exact_code_value": float(st.exact[i]),
            "exact_code": int(st.codes["F1"][i]), "fake_code": int(st.codes["F0"][i])},
            fix="expected for values within float32 error of a rounding boundary; to train on the integers the "
                "engine computes, " + _qparity_fix(engine), affected=moved))
    causes += _bias_causes(path, prepared, converted, st, run, engine, total)
    moved = st.moved("F5", "F6")
    if moved:
        i = st.first("F5", "F6")
        text = (f"{engine} ({st.rule} rule) adds {path}'s bias to the accumulator in its own units instead of the "
                f"float bias the fake forward adds; this moves {moved} of {total} output codes (first at {list(i)}: "
                f"{int(st.codes['F5'][i])} becomes {int(st.codes['F6'][i])}).")
        causes.append(Cause(kind="bias_quantization", layer=path, explanation=text, evidence={
            "rule": st.rule, "outputs_moved": moved, "index": list(i), "code_with_float_bias": int(st.codes["F5"][i]),
            "code_with_engine_bias": int(st.codes["F6"][i])},
            fix="keep the bias on the accumulator grid (scale sx*sw) during training: " + _qparity_fix(engine),
            affected=moved))
    moved = st.moved("F6", "F7")
    if moved:
        i = st.first("F6", "F7")
        text = (f"{engine} requantizes {path} with a float32 multiplier ({st.rule} rule); in {moved} of {total} "
                f"outputs that rounding differs from exact arithmetic (first at {list(i)}: accumulator "
                f"{int(st.acc[i])}, exact code {int(st.codes['F6'][i])}, engine code {int(st.codes['F7'][i])}).")
        causes.append(Cause(kind="requantization", layer=path, explanation=text, evidence={
            "rule": st.rule, "outputs_moved": moved, "index": list(i), "acc": int(st.acc[i]),
            "exact_code": int(st.codes["F6"][i]), "engine_code": int(st.codes["F7"][i])},
            fix=_qparity_fix(engine) + " (its fake forward rounds like the engine's multiplier)", affected=moved))
    return causes


def _bn_batch_cause(path: str, prepared: ModuleCall, state: Dict[str, Any], moved: int, total: int) -> Cause:
    bn = prepared.module.bn
    shift = float((bn.running_mean.detach() - state["running_mean"]).abs().max())
    text = (f"{path}.bn was in training mode in the QAT forward: it normalized with batch statistics (and moved its "
            f"running mean by up to {fmt(shift)} in this one call), while convert folds the running statistics into "
            f"the weights; this moves {moved} of {total} output codes.")
    return Cause(kind="bn_folding", layer=path, explanation=text, evidence={
        "bn_training": True, "running_mean_shift": shift, "outputs_moved": moved,
        "running_mean_before": state["running_mean"].tolist(), "running_var_before": state["running_var"].tolist()},
        fix="call model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats) and model.eval() before comparing and "
            "before convert", affected=moved)


def _bias_causes(path: str, prepared: ModuleCall, converted: ModuleCall, st: Stages, run: Run, engine: str,
                 total: int) -> List[Cause]:
    pm = prepared.module
    b_c, b_p = _converted_bias(converted.module), _prepared_bias(path, pm, run)
    if b_c is None and b_p is None:
        return []
    b_c64 = b_c.to(torch.float64) if b_c is not None else torch.zeros_like(b_p)
    b_p = b_p if b_p is not None else torch.zeros_like(b_c64)
    moved = st.moved("F4", "F5")
    c = int((b_c64 - b_p).abs().argmax())
    delta = float((b_c64 - b_p).abs().max())
    bn = getattr(pm, "bn", None)
    if bn is not None and _convert_fold_bias(pm, run.bn_state[path]).equal(b_c64.to(torch.float32)):
        if not moved:
            return []
        text = (f"convert folded {path}.bn into the bias in float32 ({fmt(float(b_c64[c]))} for channel {c}, "
                f"{fmt(float(b_p[c]))} exactly); that difference of {fmt(delta)} moves {moved} of {total} output "
                "codes.")
        return [Cause(kind="bn_folding", layer=path, explanation=text, evidence={
            "channel": c, "converted_bias": float(b_c64[c]), "exact_folded_bias": float(b_p[c]),
            "max_difference": delta, "outputs_moved": moved},
            fix="fold BN before QAT (train the folded conv), or " + _qparity_fix(engine), affected=moved)]
    if delta == 0:
        return []
    text = (f"The converted {path} adds bias {fmt(float(b_c64[c]))} to channel {c} where the prepared model adds "
            f"{fmt(float(b_p[c]))} (largest difference {fmt(delta)}); this moves {moved} of {total} output codes.")
    return [Cause(kind="bias_quantization", layer=path, explanation=text, evidence={
        "channel": c, "converted_bias": float(b_c64[c]), "prepared_bias": float(b_p[c]), "max_difference": delta,
        "outputs_moved": moved},
        fix="edit the bias in the prepared model and convert again, rather than editing the converted model",
        affected=moved)]


def _convert_fold_bias(module: Any, state: Dict[str, Any]) -> torch.Tensor:
    """The bias convert computes: torch.nn.utils.fusion.fuse_conv_bn_weights in float32."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    bn = module.bn
    _, bias = fuse_conv_bn_weights(module.weight.detach(), module.bias.detach() if module.bias is not None else None,
                                   state["running_mean"], state["running_var"], bn.eps, bn.weight.detach(),
                                   bn.bias.detach())
    return bias.detach().to(torch.float32)
