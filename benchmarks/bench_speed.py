"""Speed of qparity against torch.ao, side by side in one run, as ratios.

1. QAT training step (forward + backward + SGD step) of a ResNet-style CNN:
   qparity exact QAT (each target) vs torch.ao FX QAT with the default x86 qconfig (inexact fake quant).
2. Integer inference: qparity's IntegerModel vs torch.ao's converted int8 model on the x86 engine.

Run: python benchmarks/bench_speed.py [--batch 32] [--size 32] [--threads N]
No numbers are asserted anywhere; docs/benchmarks.md records measured results and the machine.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from models import ResNetish  # noqa: E402

import qparity as qp  # noqa: E402


def timed(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def train_step(model, optimizer, x, y):
    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def torch_ao_models(model, x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    torch.backends.quantized.engine = "x86"
    prepared = prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))
    return prepared


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 10, (args.batch,))
    base = ResNetish(tuple(args.channels), in_channels=3)
    print(f"ResNet-style CNN, channels {args.channels}, batch {args.batch}x3x{args.size}x{args.size}, "
          f"{args.threads} thread(s), torch {torch.__version__}")

    ao = torch_ao_models(base, x)
    ao_step = timed(train_step(ao, torch.optim.SGD(ao.parameters(), lr=0.01), x, y), args.repeats)
    print("\nQAT step           seconds   ratio to torch.ao")
    print(f"  torch.ao (x86)   {ao_step:8.4f}   1.00")
    converted = {}
    for target in qp.TARGETS:
        prepared = qp.prepare_qat(copy.deepcopy(base), (x,), target=target).train()
        step = timed(train_step(prepared, torch.optim.SGD(prepared.parameters(), lr=0.01), x, y), args.repeats)
        print(f"  qparity {target:<9}{step:8.4f}   {step / ao_step:.2f}")
        qp.freeze(prepared)
        converted[target] = qp.convert(prepared.eval())

    from torch.ao.quantization.quantize_fx import convert_fx
    ao.eval()
    ao_int8 = convert_fx(ao)
    with torch.no_grad():
        ao_run = timed(lambda: ao_int8(x), args.repeats)
    print("\nint8 inference     seconds   ratio to torch.ao")
    print(f"  torch.ao (x86)   {ao_run:8.4f}   1.00")
    with torch.no_grad():
        for target, model in converted.items():
            codes = model.quantize(x)
            run = timed(lambda: model.run(codes), args.repeats)
            print(f"  qparity {target:<9}{run:8.4f}   {run / ao_run:.2f}")


if __name__ == "__main__":
    main()
