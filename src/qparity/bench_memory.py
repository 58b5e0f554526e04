"""Peak memory of a QAT step and of integer inference (`qparity bench`, table 4), measured two ways.

1. Peak live tensor bytes (exact, `tensor_peak`, in this process). PyTorch's CPU allocator keeps a running
   total of the bytes it has handed out while the profiler records memory, and reports every allocation and
   free with that total after it (`ProfiledCPUMemoryReporter`, c10/core/CPUAllocator.cpp). The profile's
   [memory] events therefore carry the exact live total at each allocation; the peak of a step is the largest
   total during it minus the total at its start. The events are put in time order and the chain
   total[i] = total[i-1] + bytes[i] is checked, so an event missed or misordered raises instead of giving a
   wrong number. It counts tensor storage from PyTorch's CPU allocator only: not Python objects, nor memory a
   kernel library allocates itself (fbgemm's packed weights, for one). The peak does not depend on load, on
   what ran before, or on the allocator's reuse of freed pages.

   A free is reported only for a block allocated while the profiler recorded, so the profile covers
   `warmup` runs before the measured one: the measured run frees what those runs allocated (last step's
   gradients, say), and first-run caches are allocated there, outside the measured run (reported apart as
   the first run's peak, an upper bound: frees of blocks from before the profile are not seen). Four
   warm-up runs, since the fbgemm and x86 targets' QAT steps fill a cache of 16 add tables (1 MiB each) over
   their first three steps; `steady` says whether the measured run's peak and retained bytes equal those of
   the run before it. The profile starts before the model is built, so `standing` counts the tensors the
   contender holds between runs (weights, gradients, fake-quant state, caches; after a garbage collection);
   a module-level cache is counted to the first contender that fills it. QNNPACK's outputs are reported when
   allocated but not when freed; such a free is found when the address is handed out again
   (`unseen_frees`), and then the peak is an upper bound.

2. Peak resident size (`peak_memory`, one process per contender; the child runs `bench.memory_probe`).
   tracemalloc does not see PyTorch's allocations, and one process that runs every contender reuses the
   memory the previous one freed, so each contender runs in its own Python process: it builds its model,
   runs once to warm up, resets the kernel's peak resident size (`/proc/self/clear_refs` 5, Linux 4.0+), runs
   twice more and reports VmHWM (the peak resident size of the whole process: Python, torch, the model) and
   VmHWM minus the resident size before the runs (the working memory of the step). Where /proc is not
   writable the probe reports nothing (the table says n/a). It moves by +-10 MiB between probes.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from .errors import QParityError

MIB = 1024 * 1024
MEASURED = "qparity.bench_memory: measured run"


class MemoryProfileError(QParityError, RuntimeError):
    """No exact peak can be measured: the profiler's allocation events do not add up (an event missing or out of
    order), or no warm-up run was asked for."""


@dataclass
class TensorPeak:
    """Live CPU tensor bytes of one run, relative to the live bytes at its start."""
    peak: int                 # the most live bytes above the start, during the measured run
    retained: int             # live bytes at its end above the start (0 when runs are in a steady state)
    first_peak: int           # the same peak for the first run (caches, first gradients), above its own start
    steady: bool              # the run before the measured one had the same peak and retained bytes
    standing: int             # live bytes at the measured run's start that building and the runs before made
    unseen_frees: int         # bytes freed without a report (found when the address is handed out again):
                              # where not 0, the peak is an upper bound
    # bytes live at the peak that the measured run allocated, by the operator that allocated them (largest first)
    at_peak: List[Tuple[str, int]] = field(default_factory=list)
    freed_before_peak: int = 0  # bytes live at the start that the run had freed by its peak (peak = sum - this)
    # the standing bytes by the operator that allocated them (largest first)
    held: List[Tuple[str, int]] = field(default_factory=list)


@dataclass
class _Allocation:
    time: int
    bytes: int      # negative for a free
    total: int      # live bytes the allocator counts after this event
    pointer: int
    operator: str   # what allocated: outermost op under the run > innermost op (`sites`: Python function > ops)
    phase: int      # 2k: in run k; 2k + 1: after it; -1: building, before the first run


def tensor_peak(build: Callable[[], Callable[[], object]], warmup: int = 4, sites: bool = False) -> TensorPeak:
    """Exact peak of live CPU tensor bytes during one call of the run `build()` returns, after `warmup` calls,
    all profiled (see above). `sites`: name each allocation by the Python function that made it (slower)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    if warmup < 1:
        raise MemoryProfileError(f"tensor_peak: warmup must be at least 1, got {warmup}: the measured run frees "
                                 "what the run before it allocated, and only frees of blocks the profile saw "
                                 "allocated are reported")
    gc.collect()  # the last contender's garbage, freed now rather than inside this profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=sites) as recorded:
        run = build()
        # Building leaves garbage in reference cycles (capture's example activations, 58 MiB at batch 32 on
        # the bench model: docs/benchmarks.md); what stands between runs is what the model keeps reachable.
        gc.collect()
        for index in range(warmup + 1):
            with record_function(f"{MEASURED} {index}"):
                run()
    events = _allocations(recorded.profiler.kineto_results.experimental_event_tree())
    return _peak(events, warmup)


def _allocations(roots) -> List[_Allocation]:
    runs: List[Tuple[int, int, int]] = []    # (start ns, end ns, run) of each profiled run
    found: List[Tuple[int, int, int, int, str]] = []

    def walk(node, outer: str, site: str) -> None:
        for child in node.children:
            kind = type(child.extra_fields).__name__
            if child.name.startswith(MEASURED):
                runs.append((child.start_time_ns, child.end_time_ns, int(child.name.rsplit(" ", 1)[1])))
                walk(child, "", site)
            elif child.name == "[memory]":
                fields = child.extra_fields
                inner = node.name if type(node.extra_fields).__name__ == "_ExtraFields_TorchOp" else ""
                label = " > ".join(dict.fromkeys(filter(None, (site, outer, inner))))
                found.append((child.start_time_ns, fields.alloc_size, fields.total_allocated, fields.ptr, label))
            elif kind == "_ExtraFields_PyCall":
                # The innermost function outside torch's own Python is the model's code that asked for the tensor.
                walk(child, outer, site if _in_torch(child.name) and site else child.name)
            else:
                walk(child, outer or (child.name if kind == "_ExtraFields_TorchOp" else ""), site)

    class _Root:  # the tree's roots, as the children of one node
        name, children, extra_fields = "", roots, None

    walk(_Root, "", "")
    # With Python stacks the tree nests by frame, not under the run's record_function: runs are found by time.
    # Phase 2k is run k, 2k + 1 the gap after it, -1 the build before the first.
    def phase(time: int) -> int:
        return max((2 * run + (time > end) for begin, end, run in runs if begin <= time), default=-1)

    events = sorted((_Allocation(time, size, total, pointer, label, phase(time))
                     for time, size, total, pointer, label in found), key=lambda event: event.time)
    _check_chain(events)
    return events


def _in_torch(frame: str) -> bool:
    return "torch/" in frame.replace("\\", "/") and "qparity" not in frame


def _check_chain(events: List[_Allocation]) -> None:
    """Each event's total must be the one before plus its bytes; events at one instant may come in either order."""
    i = 1
    while i < len(events):
        if events[i].total != events[i - 1].total + events[i].bytes:
            # Events at the same nanosecond (another thread's) are swapped into the order their totals imply.
            swap = next((j for j in range(i + 1, len(events)) if events[j].time == events[i].time
                         and events[j].total == events[i - 1].total + events[j].bytes), None)
            if swap is None:
                raise MemoryProfileError(
                    f"allocation event {i} of {len(events)} ({events[i].bytes} bytes in {events[i].operator}) "
                    f"leaves {events[i].total} live bytes, not {events[i - 1].total} + {events[i].bytes}: the "
                    "profile missed an event, so no exact peak; rerun with one thread (--threads 1)")
            events[i], events[swap] = events[swap], events[i]
        i += 1


def _peak(events: List[_Allocation], warmup: int) -> TensorPeak:
    baseline = events[0].total - events[0].bytes if events else 0

    def start_total(run: int) -> int:
        return next((e.total for e in reversed(events) if e.phase < 2 * run), baseline)

    def peak_of(run: int) -> Tuple[int, int, int]:
        start = start_total(run)
        inside = [(i, e) for i, e in enumerate(events) if e.phase == 2 * run]
        if not inside:
            return 0, 0, -1
        index, highest = max(inside, key=lambda pair: (pair[1].total, -pair[0]))
        return max(0, highest.total - start), inside[-1][1].total - start, index if highest.total > start else -1

    peak, retained, index = peak_of(warmup)
    measured = 2 * warmup
    live: Dict[int, _Allocation] = {}
    freed_before = unseen = 0
    at_peak: Counter = Counter()
    held: Counter = Counter()
    for position, event in enumerate(events):
        if event.phase == measured and not held:
            for block in live.values():
                held[block.operator] += block.bytes
        if event.bytes > 0:
            # A block handed out again at a live address was freed without a report (QNNPACK's outputs).
            unseen += live[event.pointer].bytes if event.pointer in live else 0
            live[event.pointer] = event
        else:
            allocated = live.pop(event.pointer, None)
            if event.phase == measured and position <= index and (allocated is None or allocated.phase < measured):
                freed_before -= event.bytes
        if position == index:
            for block in live.values():
                if block.phase == measured:
                    at_peak[block.operator] += block.bytes
    return TensorPeak(peak, retained, peak_of(0)[0], peak_of(warmup - 1)[:2] == (peak, retained),
                      start_total(warmup) - baseline, unseen,
                      at_peak.most_common(), freed_before, held.most_common())


def peak_memory(kind: str, contender: str, config) -> Optional[Tuple[float, float]]:
    """(peak MiB, working MiB) of `kind` ("qat" or "inference") for contender "torch.ao", "float" or a target."""
    settings = {name: value for name, value in asdict(config).items() if name != "targets"}
    code = ("import json, sys; from qparity.bench import memory_probe; "
            f"memory_probe({kind!r}, {contender!r}, json.loads(sys.argv[1]))")
    # The child imports this very qparity, installed or not.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(settings)], capture_output=True, text=True,
                              timeout=600, check=True, env=env)
        result = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return None
    return None if result is None else tuple(result)


def reset_peak() -> Optional[int]:
    """Reset the process's peak resident size to its current one; return that (bytes), or None if unsupported."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    return status("VmRSS")


def status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")
