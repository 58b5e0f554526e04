"""Where the time of an integer inference run goes (`qparity bench --profile`): each contender's run split into
kinds of work, in milliseconds per run, beside its wall time.

The split comes from PyTorch's profiler: the self CPU time of every operator and compiled region recorded during a
few runs, sorted into the kinds below by name (`kind_of`). What the profiler does not see (Python: the executor's
loop, the operator modules, the rules' own Python; PyTorch's dispatch between operators) is the wall time of those
profiled runs minus their operators' total, shown as "Python and dispatch". Each kind's share of the profiled time,
times the wall time of unprofiled runs (the median of interleaved runs, as the inference table's), is its
milliseconds per run: the profiler slows what it records, so the shares are what it measures, not its times.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

# (kind, fragments of the lower-cased operator or region name that put it there): the first match decides. The
# native kernels (numerics/native) record themselves as "qparity::native_conv" and "qparity::native_add".
KINDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("conv and linear kernels", ("conv", "linear", "addmm", "::mm", "matmul", "bmm")),
    ("compiled kernels", ("compiled", "dynamo", "aotdispatcher", "pregraph", "cpp_fused")),
    ("engine and native adds", ("quantized::add", "qparity::native_add")),
    ("table lookups", ("index_select", "aten::take", "gather")),
    ("copies, conversions, views", ("copy", "clone", "contiguous", "empty", "resize", "aten::to", "view",
                                    "reshape", "permute", "as_strided", "expand", "slice", "select", "squeeze",
                                    "flatten", "detach", "alias")),
    ("element-wise passes", ("aten::",)),
)
OTHER = "other kernels"
REST = "Python and dispatch"
COLUMNS = tuple(kind for kind, _ in KINDS) + (OTHER, REST)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(fragment in lowered for fragment in fragments):
            return kind
    return OTHER


@dataclass
class RunProfile:
    wall: float                  # seconds per run, unprofiled (median of interleaved runs)
    kinds: Dict[str, float]      # kind -> seconds per run: its share of the profiled runs times `wall`
    operators: int               # operator calls per run


def profile_runs(runs: Dict[str, Callable[[], object]], rounds: int = 5, profiled: int = 3
                 ) -> Dict[str, RunProfile]:
    """Each run's wall time (median of `rounds` interleaved rounds, after one warm-up round) and its split into
    kinds: in every round each contender also makes `profiled` runs under the profiler, whose operator self times
    and wall time (the Python and dispatch the profiler does not see: that wall time minus the operators') give each
    kind's share; the shares times the unprofiled wall time are the milliseconds shown. Interleaving the profiled
    runs too keeps a machine that slows down mid-measure from skewing one contender's split."""
    walls: Dict[str, List[float]] = {name: [] for name in runs}
    totals: Dict[str, Dict[str, float]] = {name: dict.fromkeys(COLUMNS, 0.0) for name in runs}
    calls: Dict[str, int] = dict.fromkeys(runs, 0)
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            walls[name].append(time.perf_counter() - start)
            with profile(activities=[ProfilerActivity.CPU]) as recorded:
                start = time.perf_counter()
                for _ in range(profiled):
                    run()
                elapsed = time.perf_counter() - start
            operators = 0.0
            for event in recorded.key_averages():
                seconds = event.self_cpu_time_total / 1e6
                totals[name][kind_of(event.key)] += seconds
                operators += seconds
                calls[name] += event.count
            totals[name][REST] += max(0.0, elapsed - operators)
    profiles = {}
    for name in runs:
        wall = statistics.median(walls[name])
        whole = sum(totals[name].values()) or 1.0
        kinds = {kind: wall * seconds / whole for kind, seconds in totals[name].items()}
        profiles[name] = RunProfile(wall, kinds, calls[name] // (rounds * profiled))
    return profiles


def profile_table(profiles: Dict[str, RunProfile], batch: int) -> str:
    """The profiles as a markdown table: milliseconds per run of each kind, the wall time and the operator calls."""
    lines = [f"Where an integer inference run goes, batch {batch} (ms per run: each kind's share of profiled runs, "
             "PyTorch's profiler, times the unprofiled wall time; \"Python and dispatch\": what the profiler does "
             "not see):", "",
             "| contender | " + " | ".join(COLUMNS) + " | wall ms | operator calls |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, found in profiles.items():
        cells = [f"{found.kinds[kind] * 1e3:.2f}" for kind in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {found.wall * 1e3:.2f} | {found.operators} |")
    return "\n".join(lines)
