"""Where the time of an integer inference run goes (`qparity bench --profile`): each contender's run split into
kinds of work, in milliseconds per run, beside its wall time.

The split comes from PyTorch's profiler: the self CPU time of every operator and compiled region recorded during a
few runs, sorted into the kinds below by name (`kind_of`), per run. What the profiler does not see (Python: the
executor's loop, the operator modules, the rules' own Python; PyTorch's dispatch between operators) is the wall time
of an unprofiled run minus the profiled total, shown as "Python and dispatch". The profiler adds a little to every
operator it records, so that remainder is a lower bound and the kinds are slight overestimates; the proportions are
what a profile is for. The wall time is the median of interleaved unprofiled runs, as the inference table's.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

# (kind, fragments of the lower-cased operator or region name that put it there): the first match decides.
KINDS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("conv and linear kernels", ("conv", "linear", "addmm", "::mm", "matmul", "bmm")),
    ("compiled kernels", ("compiled", "dynamo", "aotdispatcher", "pregraph", "cpp_fused")),
    ("engine adds", ("quantized::add",)),
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
    kinds: Dict[str, float]      # kind -> seconds per run (REST: the wall time the profiler did not see)
    operators: int               # operator calls per run


def profile_runs(runs: Dict[str, Callable[[], object]], rounds: int = 5, profiled: int = 3
                 ) -> Dict[str, RunProfile]:
    """Each run's wall time (median of `rounds` interleaved rounds, after one warm-up round) and its split into
    kinds over `profiled` runs under the profiler."""
    walls: Dict[str, List[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            walls[name].append(time.perf_counter() - start)
    profiles = {}
    for name, run in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as recorded:
            for _ in range(profiled):
                run()
        kinds = dict.fromkeys(COLUMNS, 0.0)
        calls = 0
        for event in recorded.key_averages():
            kinds[kind_of(event.key)] += event.self_cpu_time_total / 1e6 / profiled
            calls += event.count
        wall = statistics.median(walls[name])
        kinds[REST] = max(0.0, wall - sum(kinds.values()))
        profiles[name] = RunProfile(wall, kinds, calls // profiled)
    return profiles


def profile_table(profiles: Dict[str, RunProfile], batch: int) -> str:
    """The profiles as a markdown table: milliseconds per run of each kind, the wall time and the operator calls."""
    lines = [f"Where an integer inference run goes, batch {batch} (ms per run; operator times under PyTorch's "
             "profiler, \"Python and dispatch\" the rest of the unprofiled wall time):", "",
             "| contender | " + " | ".join(COLUMNS) + " | wall ms | operator calls |",
             "|---|" + "---|" * (len(COLUMNS) + 2)]
    for name, found in profiles.items():
        cells = [f"{found.kinds[kind] * 1e3:.2f}" for kind in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {found.wall * 1e3:.2f} | {found.operators} |")
    return "\n".join(lines)
