"""Peak memory of a QAT step and of integer inference, each contender in a fresh process (`qparity bench`;
the child runs `bench.memory_probe`, which builds the models).

tracemalloc does not see PyTorch's allocations, and one process that runs every contender reuses the memory
the previous one freed, so each contender runs in its own Python process: it builds its model (the same
seed and model as the timing tables), runs once to warm up, resets the kernel's peak resident size
(`/proc/self/clear_refs` 5, Linux 4.0+), runs twice more and reports VmHWM (the peak resident size of the
whole process: Python, torch, the model) and VmHWM minus the resident size before the runs (the working
memory of the step itself). Where /proc is not writable the probe reports nothing (the table says n/a).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from typing import Optional, Tuple

MIB = 1024 * 1024


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
    import gc

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
