"""Speed of qparity against torch.ao, measured side by side in one process, as ratios (`qparity bench`).

Three tables, each a median of interleaved runs (every contender runs once per round, so a machine that
slows down mid-run slows all of them alike):

1. QAT training step (forward, backward, SGD step) of a ResNet-style CNN, each target, as a ratio to
   torch.ao FX QAT with the default x86 qconfig (fused, inexact fake quant) and to the float model's step.
2. Integer inference, `IntegerModel.run` of each target, as a ratio to torch.ao's `convert_fx` model on the
   x86 engine, at each inference batch size.
3. Scale: integer inference time of one target and of torch.ao as the batch (1, 8, 32, 128) and the width
   (channels x1, x2, x4) grow, and a plot of time against batch.
4. Peak memory of a QAT step and of integer inference (bench_memory): the exact peak of live tensor bytes,
   measured in this process, and the peak resident size of a process of each contender's own.
5. With --profile: where each integer run's time goes (bench_profile), per inference batch.

The inference table also times ONNX Runtime and LiteRT running qparity's own exported files (bench_runtimes).

No test asserts a timing; docs/benchmarks.md records measured tables and the machine they came from.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .bench_memory import MIB, TensorPeak, peak_memory, reset_peak, status, tensor_peak
from .bench_profile import RunProfile, profile_runs, profile_table
from .bench_runtimes import exported_runners
from .convert import convert
from .numerics.compiled import CompiledKernelsUnavailableError, ensure_available
from .numerics import TARGETS, native
from .qat.prepare import freeze, prepare_qat
from .runtime import IntegerModel


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetish(nn.Module):
    """The benchmark's (and the tests') ResNet-style CNN: stem conv-BN-ReLU, two basic blocks per width
    (residual adds, 1x1 projection shortcuts), adaptive average pool, linear."""

    def __init__(self, channels=(16, 32), classes=10, in_channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels[0]), nn.ReLU())
        blocks, cin = [], channels[0]
        for i, c in enumerate(channels):
            blocks += [BasicBlock(cin, c, 1 if i == 0 else 2), BasicBlock(c, c)]
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


@dataclass
class BenchConfig:
    targets: Tuple[str, ...] = TARGETS
    threads: int = 0                       # 0: the process's torch.get_num_threads()
    qat_batch: int = 32
    inference_batches: Tuple[int, ...] = (1, 32)
    scale_target: str = "x86"
    scale_batches: Tuple[int, ...] = (1, 8, 32, 128)
    widths: Tuple[int, ...] = (1, 2, 4)
    channels: Tuple[int, ...] = (16, 32, 64)
    size: int = 32
    repeats: int = 7
    warmup: int = 2
    memory: bool = True                    # table 4: tensor peaks, and one process per contender (about 5 s each)
    compiled: bool = True                  # also time IntegerModel.compile() (skipped where it cannot build)
    profile: bool = False                  # table 5: where each integer run's time goes (bench_profile)

    @classmethod
    def quick(cls, **overrides) -> "BenchConfig":
        """A run of about a minute on a quiet 2-core machine: fewer rounds, a smaller scale table."""
        return cls(**{"repeats": 3, "warmup": 1, "scale_batches": (1, 8, 32), "widths": (1, 2), **overrides})


@dataclass
class Timing:
    name: str
    seconds: float
    reference: float  # the seconds of what the ratio divides by

    @property
    def ratio(self) -> float:
        return self.seconds / self.reference


@dataclass
class BenchReport:
    machine: str
    threads: int
    torch_version: str
    config: BenchConfig
    qat: List[Timing] = field(default_factory=list)            # ratio to torch.ao's step
    qat_to_float: List[Timing] = field(default_factory=list)   # ratio to the float model's step
    inference: Dict[int, List[Timing]] = field(default_factory=dict)  # batch -> ratio to torch.ao int8
    scale: Dict[Tuple[int, int], Tuple[float, float]] = field(default_factory=dict)  # (width, batch) -> (qparity, ao)
    # (kind, contender) -> (peak MiB, working MiB), or None where the probe could not measure
    memory: Dict[Tuple[str, str], Optional[Tuple[float, float]]] = field(default_factory=dict)
    tensor_memory: Dict[Tuple[str, str], TensorPeak] = field(default_factory=dict)  # (kind, contender) -> exact peak
    compiled_note: str = ""  # why the compiled rows are missing, where they are
    native_note: str = ""  # why the native fused conv does not run here, where it does not
    profiles: Dict[int, Dict[str, RunProfile]] = field(default_factory=dict)  # batch -> contender -> profile


def side_by_side(contenders: Dict[str, Callable[[], object]], repeats: int, warmup: int) -> Dict[str, float]:
    """Median seconds of each contender over `repeats` rounds in which every contender runs once."""
    for run in contenders.values():
        for _ in range(warmup):
            run()
    samples: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, run in contenders.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def machine_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} of {os.cpu_count()} CPUs used"
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip()


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.backends.quantized.engine = "x86"
    return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def torch_ao_int8(prepared: nn.Module) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    return convert_fx(copy.deepcopy(prepared).eval())


def integer_model(base: nn.Module, target: str, x: torch.Tensor):
    """qparity's IntegerModel of `base` for `target`, its grids observed on a few training forwards of x."""
    prepared = prepare_qat(copy.deepcopy(base), (x,), target=target).train()
    with torch.no_grad():
        for _ in range(2):
            prepared(x)
    freeze(prepared)
    return convert(prepared.eval())


def run_bench(config: BenchConfig, progress: Optional[Callable[[str], None]] = None) -> BenchReport:
    if config.threads:
        torch.set_num_threads(config.threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation warnings
        return _measure(config, progress or (lambda message: None))


def _measure(config: BenchConfig, say: Callable[[str], None]) -> BenchReport:
    report = BenchReport(machine_name(), torch.get_num_threads(), torch.__version__, config)
    torch.manual_seed(0)
    base = ResNetish(config.channels, in_channels=3)
    x = torch.randn(config.qat_batch, 3, config.size, config.size)
    y = torch.randint(0, 10, (config.qat_batch,))

    say("QAT steps")
    ao = torch_ao_qat(base, x)
    float_model = copy.deepcopy(base).train()
    prepared = {t: prepare_qat(copy.deepcopy(base), (x,), target=t).train() for t in config.targets}
    steps = {"torch.ao": train_step(ao, x, y), "float": train_step(float_model, x, y)}
    steps.update({t: train_step(model, x, y) for t, model in prepared.items()})
    seconds = side_by_side(steps, config.repeats, config.warmup)
    report.qat = [Timing(t, seconds[t], seconds["torch.ao"]) for t in config.targets]
    report.qat_to_float = [Timing(t, seconds[t], seconds["float"]) for t in ("torch.ao",) + config.targets]

    say("integer inference")
    ao_int8 = torch_ao_int8(ao)
    integer = {}
    for target, model in prepared.items():
        freeze(model)
        integer[target] = convert(model.eval())
    compiled = _compiled_twins(integer) if config.compiled else {}
    report.compiled_note = "" if compiled or not config.compiled else _compiled_unavailable()
    report.native_note = native.unavailable_reason()
    with tempfile.TemporaryDirectory() as directory:
        exported = exported_runners(integer, directory, torch.get_num_threads())
        for batch in config.inference_batches:
            xb = torch.randn(batch, 3, config.size, config.size)
            runs = {"torch.ao": lambda xb=xb: ao_int8(xb)}
            runs.update({t: _integer_run(model, xb) for t, model in integer.items()})
            runs.update({t: _integer_run(model, xb) for t, model in compiled.items()})
            runs.update({name: make(xb) for name, make in exported.items()})
            with torch.no_grad():  # the warm-up rounds compile the kernels (seconds, not timed)
                seconds = side_by_side(runs, config.repeats, config.warmup + 1 if compiled else config.warmup)
            report.inference[batch] = [Timing(t, seconds[t], seconds["torch.ao"])
                                       for t in config.targets + tuple(compiled) + tuple(exported)]
            if config.profile:
                say(f"profile: batch {batch}")
                with torch.no_grad():
                    report.profiles[batch] = profile_runs({name: runs[name] for name in runs
                                                           if name not in exported}, config.repeats)

    for width in config.widths:
        say(f"scale: width x{width}")
        wide = ResNetish(tuple(c * width for c in config.channels), in_channels=3)
        xw = torch.randn(config.scale_batches[0], 3, config.size, config.size)
        ao_wide = torch_ao_int8(_observed(torch_ao_qat(wide, xw), xw))
        ours = integer_model(wide, config.scale_target, xw)
        for batch in config.scale_batches:
            xb = torch.randn(batch, 3, config.size, config.size)
            with torch.no_grad():
                seconds = side_by_side({"qparity": _integer_run(ours, xb), "torch.ao": lambda xb=xb: ao_wide(xb)},
                                       config.repeats, config.warmup)
            report.scale[(width, batch)] = (seconds["qparity"], seconds["torch.ao"])

    if config.memory:
        for kind, contenders in (("qat", ("torch.ao", "float") + config.targets),
                                 ("inference", ("torch.ao",) + config.targets)):
            say(f"peak memory: {kind}")
            for contender in contenders:
                with torch.set_grad_enabled(kind == "qat"):
                    report.tensor_memory[(kind, contender)] = tensor_peak(
                        lambda: memory_run(kind, contender, config))
                report.memory[(kind, contender)] = peak_memory(kind, contender, config)
    return report


def memory_probe(kind: str, contender: str, settings: dict) -> None:
    """The child process of `bench_memory.peak_memory`: print [peak MiB, working MiB] (or null) as the last line
    of stdout."""
    warnings.simplefilter("ignore")
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    if config.threads:
        torch.set_num_threads(config.threads)
    run = memory_run(kind, contender, config)
    with torch.set_grad_enabled(kind == "qat"):
        run()
        before = reset_peak()
        for _ in range(2):
            run()
    print(json.dumps(None if before is None else [status("VmHWM") / MIB, (status("VmHWM") - before) / MIB]))


def memory_run(kind: str, contender: str, config: BenchConfig) -> Callable[[], object]:
    """One run of the memory table, on a model of its own: a QAT step (batch `qat_batch`) of "torch.ao", "float"
    or a target, or integer inference (the largest inference batch) of "torch.ao" or a target."""
    torch.manual_seed(0)
    base = ResNetish(config.channels, in_channels=3)
    x = torch.randn(config.qat_batch, 3, config.size, config.size)
    y = torch.randint(0, 10, (config.qat_batch,))
    if kind == "qat":
        model = {"torch.ao": lambda: torch_ao_qat(base, x), "float": lambda: copy.deepcopy(base).train()}.get(
            contender, lambda: prepare_qat(copy.deepcopy(base), (x,), target=contender).train())()
        return train_step(model, x, y)
    xb = torch.randn(max(config.inference_batches), 3, config.size, config.size)
    if contender == "torch.ao":
        model = torch_ao_int8(_observed(torch_ao_qat(base, x), x))
        return lambda: model(xb)
    return _integer_run(integer_model(base, contender, x), xb)


def _compiled_twins(integer: Dict[str, IntegerModel]) -> Dict[str, IntegerModel]:
    """'<target> compiled': a second IntegerModel of each target with compiled kernels (IntegerModel.compile), for
    the targets that do not run on PyTorch's engine (whose kernels requantize themselves); {} where this machine
    cannot compile."""
    try:
        ensure_available()
    except CompiledKernelsUnavailableError:
        return {}
    return {f"{target} compiled": IntegerModel(model.graph, model.target, model.activation_dtype, model.qparams,
                                               model.layers).compile()
            for target, model in integer.items() if model.engine_program is None}


def _compiled_unavailable() -> str:
    try:
        ensure_available()
    except CompiledKernelsUnavailableError as error:
        return str(error)
    return ""


def _integer_run(model, x: torch.Tensor) -> Callable[[], object]:
    codes = model.quantize(x)
    return lambda: model.run(codes)


def _observed(prepared: nn.Module, x: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        prepared(x)
    return prepared


# ---------------------------------------------------------------------------------------------------------
# The report as markdown (the CLI prints it; docs/benchmarks.md pastes it)
# ---------------------------------------------------------------------------------------------------------
def format_report(report: BenchReport) -> str:
    config = report.config
    lines = [f"Machine: {report.machine}; {report.threads} thread(s); torch {report.torch_version}; "
             f"medians of {config.repeats} interleaved rounds after {config.warmup} warm-up.",
             f"Model: ResNet-style CNN, channels {list(config.channels)}, inputs 3x{config.size}x{config.size}.",
             "", f"QAT training step, batch {config.qat_batch} (goal: <= 1.1 x torch.ao):", "",
             "| target | seconds | / torch.ao | / float step |", "|---|---|---|---|"]
    to_float = {t.name: t for t in report.qat_to_float}
    reference = report.qat[0].reference if report.qat else 0.0
    lines.append(f"| torch.ao (x86) | {reference:.4f} | 1.00 | {to_float['torch.ao'].ratio:.2f} |")
    for timing in report.qat:
        lines.append(f"| {timing.name} | {timing.seconds:.4f} | {timing.ratio:.2f} | {to_float[timing.name].ratio:.2f} |")
    batches = list(report.inference)
    lines += ["", "Integer inference, IntegerModel.run / torch.ao convert_fx (x86 engine) (goal: <= 1.0):", "",
              "| target | " + " | ".join(f"batch {b}" for b in batches) + " |",
              "|---|" + "---|" * len(batches)]
    if batches:
        lines.append("| torch.ao (x86) | " + " | ".join(
            f"1.00 ({report.inference[b][0].reference * 1e3:.1f} ms)" for b in batches) + " |")
        for i, timing in enumerate(report.inference[batches[0]]):
            lines.append(f"| {timing.name} | " + " | ".join(f"{report.inference[b][i].ratio:.2f}" for b in batches) + " |")
        if any(t.name.endswith(" compiled") for t in report.inference[batches[0]]):
            lines += ["", "(\"compiled\" rows: the same IntegerModel after IntegerModel.compile(), its "
                          "requantizations as compiled kernels; same codes.)"]
        if report.compiled_note:
            lines += ["", f"(No compiled rows: {report.compiled_note})"]
        lines += ["", "(Native fused conv + requantization (numerics/fused_layer.py): "
                  + (f"not used here: {report.native_note})" if report.native_note else
                     "on, for the layers of xnnpack, executorch-xnnpack, onnxruntime, tflite and tflite-micro.)")]
        if any(t.name.startswith(("ONNX Runtime", "LiteRT")) for t in report.inference[batches[0]]):
            lines += ["", "(ONNX Runtime / LiteRT rows: qparity's exported file, float input to float output, its "
                          "QUANTIZE and DEQUANTIZE included; the target rows map codes to codes.)"]
    if report.scale:
        lines += ["", scale_table(report), "", scale_plot(report)]
    if report.memory:
        lines += ["", memory_table(report)]
    for batch, profiles in report.profiles.items():
        lines += ["", profile_table(profiles, batch)]
    return "\n".join(lines)


def memory_table(report: BenchReport) -> str:
    """Peak memory of a QAT step and of integer inference per contender: exact peak live tensor MiB (and its ratio
    to torch.ao's) beside the peak resident MiB of a process of the contender's own (and the part its runs added)."""
    config = report.config
    lines = [f"Peak memory, QAT step batch {config.qat_batch}, integer inference batch "
             f"{max(config.inference_batches)} (goal: no higher than torch.ao):", "",
             "- tensor MiB: the most live CPU tensor bytes during one run above those at its start, counted exactly "
             "by PyTorch's CPU allocator under the profiler, in this process, after four warm-up runs (x torch.ao's; "
             "`*`: not yet in a steady state; `<=`: an upper bound, some frees unreported). It leaves out memory "
             "kernel libraries allocate themselves (fbgemm packing).",
             "- standing MiB: live tensor bytes between runs that building the model and running it made (weights, "
             "gradients, fake-quant state, caches, the input).",
             "- resident MiB: the peak resident size of a process of the contender's own (Python, torch, the "
             "model: all of it), with the MiB its runs added in parentheses; it moves by about 10 MiB between runs.",
             "", "| contender | QAT tensor MiB | QAT standing MiB | QAT resident MiB | inference tensor MiB "
                 "| inference standing MiB | inference resident MiB |",
             "|---|---|---|---|---|---|---|"]

    def resident(kind, contender):
        if (kind, contender) not in report.memory:
            return "-"
        value = report.memory[(kind, contender)]
        return "n/a" if value is None else f"{value[0]:.0f} ({value[1]:.1f})"

    def tensors(kind, contender):
        peak = report.tensor_memory.get((kind, contender))
        if peak is None:
            return "-"
        reference = report.tensor_memory.get((kind, "torch.ao"))
        compared = reference is not None and reference.peak > 0 and contender != "torch.ao"
        ratio = f" ({peak.peak / reference.peak:.2f}x)" if compared else ""
        bound = "<= " if peak.unseen_frees else ""
        return f"{bound}{peak.peak / MIB:.2f}{ratio}{'' if peak.steady else '*'}"

    def standing(kind, contender):
        peak = report.tensor_memory.get((kind, contender))
        return "-" if peak is None else f"{'<= ' if peak.unseen_frees else ''}{peak.standing / MIB:.2f}"

    for contender in ("torch.ao", "float") + tuple(config.targets):
        lines.append(" | ".join([f"| {contender}"] + [cell(kind, contender) for kind in ("qat", "inference")
                                                       for cell in (tensors, standing, resident)]) + " |")
    above = [(kind, contender, peak) for (kind, contender), peak in report.tensor_memory.items()
             if (kind, "torch.ao") in report.tensor_memory and peak.peak > report.tensor_memory[(kind, "torch.ao")].peak
             and contender != "float"]
    if above:
        lines += ["", "Tensors live at the peak, by the operator that allocated them (MiB; the four largest):", ""]
        alike: Dict[Tuple[str, str], List[str]] = {}  # most targets share one breakdown: one line for them
        for kind, contender, peak in above:
            largest = ", ".join(f"{name} {size / MIB:.1f}" for name, size in peak.at_peak[:4])
            alike.setdefault((kind, largest), []).append(contender)
        lines += [f"- {kind}, {', '.join(contenders)}: {largest}" for (kind, largest), contenders in alike.items()]
    return "\n".join(lines)


def scale_table(report: BenchReport) -> str:
    config = report.config
    widths = sorted({w for w, _ in report.scale})
    batches = sorted({b for _, b in report.scale})
    lines = [f"Scale: integer inference ms, qparity {config.scale_target} / torch.ao (ratio)", "",
             "| batch | " + " | ".join(f"width x{w}" for w in widths) + " |", "|---|" + "---|" * len(widths)]
    for batch in batches:
        cells = []
        for width in widths:
            ours, theirs = report.scale[(width, batch)]
            cells.append(f"{ours * 1e3:.1f} / {theirs * 1e3:.1f} ({ours / theirs:.1f})")
        lines.append(f"| {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scale_plot(report: BenchReport, columns: int = 50) -> str:
    """Milliseconds per batch against the batch size (width x1), as text bars: q = qparity, a = torch.ao."""
    width = min(w for w, _ in report.scale)
    batches = sorted(b for w, b in report.scale if w == width)
    longest = max(max(report.scale[(width, b)]) for b in batches)
    lines = ["```", f"time vs batch, width x{width} (q: qparity {report.config.scale_target}, a: torch.ao)"]
    for batch in batches:
        for label, seconds in zip("qa", report.scale[(width, batch)]):
            bar = label * max(1, round(columns * seconds / longest))
            lines.append(f"batch {batch:>4} {bar} {seconds * 1e3:.1f} ms")
    lines.append("```")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line (shared by `qparity bench` and benchmarks/bench_speed.py)
# ---------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer rounds and a smaller scale table (about a "
                                                            "minute on a quiet 2-core machine)")
    parser.add_argument("--threads", type=_count, default=0, help="torch threads (default: the process's)")
    parser.add_argument("--target", choices=TARGETS, action="append", help="a target to time (repeatable; "
                                                                           "default: every target)")
    parser.add_argument("--repeats", type=_count, help="interleaved rounds per measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory table (exact tensor peaks, "
                                                                  "and one process per contender)")
    parser.add_argument("--no-compile", action="store_true", help="skip the rows of compiled IntegerModels "
                                                                   "(IntegerModel.compile)")
    parser.add_argument("--profile", action="store_true", help="also split each integer run's time into kinds of "
                                                                "work (convolutions, requantization passes, tables, "
                                                                "copies, Python) at every inference batch")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
    return int(text)


def config_from(args: argparse.Namespace) -> BenchConfig:
    overrides = {"threads": args.threads, "memory": not args.no_memory, "compiled": not args.no_compile,
                 "profile": args.profile}
    if args.target:
        overrides["targets"] = tuple(args.target)
    if args.repeats:
        overrides["repeats"] = args.repeats
    return BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)
