"""Peak memory of a QAT step and of integer inference, each contender in a fresh process (`qparity bench`).

tracemalloc does not see PyTorch's allocations, and one process that runs every contender reuses the memory
the previous one freed, so each contender runs in its own Python process: it builds its model (the same
seed and model as the timing tables), runs once to warm up, resets the kernel's peak resident size
(`/proc/self/clear_refs` 5, Linux 4.0+), runs twice more and reports VmHWM (the peak resident size of the
whole process: Python, torch, the model) and VmHWM minus the resident size before the runs (the working
memory of the step itself). Where /proc is not writable the probe reports nothing (the table says n/a).
"""
from __future__ import annotations

import copy
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
    code = ("import json, sys; from qparity.bench_memory import probe; "
            f"probe({kind!r}, {contender!r}, json.loads(sys.argv[1]))")
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


def probe(kind: str, contender: str, settings: dict) -> None:
    """Runs in the child process: print [peak MiB, working MiB] (or null) as the last line of stdout."""
    import warnings

    import torch

    from .bench import BenchConfig, ResNetish, integer_model, torch_ao_int8, torch_ao_qat, train_step, _observed
    from .qat.prepare import prepare_qat

    warnings.simplefilter("ignore")
    config = BenchConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(0)
    base = ResNetish(config.channels, in_channels=3)
    x = torch.randn(config.qat_batch, 3, config.size, config.size)
    y = torch.randint(0, 10, (config.qat_batch,))
    if kind == "qat":
        model = {"torch.ao": lambda: torch_ao_qat(base, x), "float": lambda: copy.deepcopy(base).train()}.get(
            contender, lambda: prepare_qat(copy.deepcopy(base), (x,), target=contender).train())()
        run = train_step(model, x, y)
    else:
        xb = torch.randn(max(config.inference_batches), 3, config.size, config.size)
        if contender == "torch.ao":
            model = torch_ao_int8(_observed(torch_ao_qat(base, x), x))
            run = lambda: model(xb)  # noqa: E731
        else:
            model = integer_model(base, contender, x)
            codes = model.quantize(xb)
            run = lambda: model.run(codes)  # noqa: E731
    with torch.set_grad_enabled(kind == "qat"):
        run()
        before = _reset_peak()
        for _ in range(2):
            run()
    print(json.dumps(None if before is None else [_status("VmHWM") / MIB, (_status("VmHWM") - before) / MIB]))


def _reset_peak() -> Optional[int]:
    """Reset the process's peak resident size to its current one; return that (bytes), or None if unsupported."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    return _status("VmRSS")


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {field}")
