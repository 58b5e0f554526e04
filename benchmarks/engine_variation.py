"""How PyTorch's own fbgemm / x86 engines vary with the thread count and the input's memory layout.

For each engine, thread count (torch.set_num_threads 1, 2, 4) and input layout (contiguous, channels_last)
it runs PyTorch's quantized kernels and counts the output codes that differ from the run with 1 thread and
contiguous inputs:

1. torch.ops.quantized.add, quantized hardswish and leaky_relu on one [8, 16, 31, 29] tensor (115,072
   elements: over 3 x at::internal::GRAIN_SIZE, so 2 or 4 threads cut it into 2 or 4 parallel chunks), on
   random grids and on tie-prone grids (s_a = s_b = s_y / 2, where the vector and scalar loops disagree most);
2. a torch.ao eager-converted residual block with a spatial mean (conv, relu, conv, add of the input,
   relu, adaptive_avg_pool2d) on [8, 16, 31, 29] inputs, calibrated on them, outputs [8, 16]; once as
   calibrated and once with tie-prone grids at the add (input and conv s, add 2 s, s = f(0.0371)); and the
   same block without the mean (outputs the relu'd sum, [8, 16, 31, 29]).

Each PyTorch run is also computed by qparity's engine target configured with the same thread count and
layout (`get_target(engine).configured(threads=..., memory_format=...)`), and the mismatches are counted
(0 expected). docs/determinism.md records the numbers.

Run: python benchmarks/engine_variation.py
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn
from torch.ao import quantization as tq

import qparity as qp
from qparity.numerics import get_target
from qparity.qparams import QParams

warnings.filterwarnings("ignore")
ENGINES = ("fbgemm", "x86")
THREADS = (1, 2, 4)
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
SHAPE = (8, 16, 31, 29)


def quint8(codes: torch.Tensor, grid: QParams, layout) -> torch.Tensor:
    q = torch._make_per_tensor_quantized_tensor(codes.to(torch.uint8), float(grid.scale), int(grid.zero_point))
    return q.contiguous(memory_format=layout)


def grids(rng, tie_prone: bool):
    out = QParams(float(np.float32(10 ** rng.uniform(-2, -0.5))), int(rng.integers(0, 256)), "uint8")
    if tie_prone:
        half = QParams(float(out.scale) / 2, int(rng.integers(0, 256)), "uint8")
        return half, half, out
    return (QParams(float(np.float32(10 ** rng.uniform(-2, -0.5))), int(rng.integers(0, 256)), "uint8"),
            QParams(float(np.float32(10 ** rng.uniform(-2, -0.5))), int(rng.integers(0, 256)), "uint8"), out)


def op_runs(engine: str, tie_prone: bool, seed: int = 0):
    """{(threads, layout): (pytorch codes of add, hardswish, leaky_relu; qparity's)} for one set of grids."""
    rng = np.random.default_rng(seed)
    a, b, out = grids(rng, tie_prone)
    qa = torch.from_numpy(rng.integers(0, 256, size=SHAPE))
    qb = torch.from_numpy(rng.integers(0, 256, size=SHAPE))
    runs = {}
    for threads in THREADS:
        for name, layout in LAYOUTS.items():
            torch.set_num_threads(threads)
            xa, xb = quint8(qa, a, layout), quint8(qb, b, layout)
            theirs = torch.cat([
                torch.ops.quantized.add(xa, xb, float(out.scale), int(out.zero_point)).int_repr().reshape(-1),
                nn.quantized.Hardswish(float(out.scale), int(out.zero_point))(xa).int_repr().reshape(-1),
                torch.ops.quantized.leaky_relu(xa, 0.1, False, float(out.scale),
                                               int(out.zero_point)).int_repr().reshape(-1)]).to(torch.int64)
            torch.set_num_threads(1)  # qparity's codes must not depend on it: use another count on purpose
            target = get_target(engine).configured(threads=threads, memory_format=name)
            ca, cb = target.arrange_input(qa), target.arrange_input(qb)
            ours = torch.cat([target.add(ca, a, cb, b, out, 0, 255).reshape(-1),
                              target.hardswish(ca, a, out).reshape(-1),
                              target.activation("leaky_relu", ca, a, out, {"negative_slope": 0.1}).reshape(-1)])
            runs[threads, name] = theirs, ours
    return runs


class ResidualMean(nn.Module):
    def __init__(self, channels: int = 16, spatial_mean: bool = True):
        super().__init__()
        self.spatial_mean = spatial_mean
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = nn.quantized.FloatFunctional()
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.quant(x)
        y = self.conv2(self.relu1(self.conv1(x)))
        y = self.relu2(self.skip.add(x, y))
        return self.dequant(self.pool(y).flatten(1) if self.spatial_mean else y)


def model_runs(engine: str, tie_prone: bool, spatial_mean: bool, seed: int = 0):
    torch.manual_seed(seed)
    torch.backends.quantized.engine = engine
    x = torch.randn(SHAPE)
    model = ResidualMean(spatial_mean=spatial_mean).eval()
    model.qconfig = tq.get_default_qconfig(engine)
    prepared = tq.prepare(copy.deepcopy(model))
    prepared(x)
    converted = tq.convert(prepared)
    if tie_prone:
        half = float(np.float32(0.0371))
        converted.quant.scale.fill_(half)
        converted.quant.zero_point.fill_(129)
        converted.conv2.scale, converted.conv2.zero_point = half, 127
        converted.skip.scale, converted.skip.zero_point = 2 * half, 131
    runs = {}
    for threads in THREADS:
        for name, layout in LAYOUTS.items():
            torch.set_num_threads(threads)
            theirs = converted(x.contiguous(memory_format=layout))
            runs[threads, name] = theirs
    return converted, x, runs


def report_ops() -> None:
    for engine in ENGINES:
        torch.backends.quantized.engine = engine
        for tie_prone in (False, True):
            runs = op_runs(engine, tie_prone)
            base = runs[1, "contiguous"][0]
            cells = []
            for (threads, name), (theirs, ours) in runs.items():
                differ = int((theirs != base).sum())
                cells.append(f"{threads}t {name}: {differ} differ (max {int((theirs - base).abs().max())}), "
                             f"qparity mismatches {int((theirs != ours).sum())}")
            print(f"ops {engine} {'tie-prone' if tie_prone else 'random'} grids, {base.numel()} codes")
            print("  " + "\n  ".join(cells))


def report_model() -> None:
    cases = [(e, t, m) for e in ENGINES for t in (False, True) for m in (True, False)]
    for engine, tie_prone, spatial_mean in cases:
        converted, x, runs = model_runs(engine, tie_prone, spatial_mean)
        im = qp.from_torch(converted, x)
        base = runs[1, "contiguous"]
        print(f"residual block{' + spatial mean' if spatial_mean else ''}, {engine}, {'tie-prone' if tie_prone else 'calibrated'} grids, "
              f"{base.numel()} output values")
        for (threads, name), theirs in runs.items():
            target = im.target.configured(threads=threads, memory_format=name)
            pinned = qp.IntegerModel(im.graph, target, im.activation_dtype, im.qparams, im.layers)
            torch.set_num_threads(1)
            ours = pinned(x)
            print(f"  {threads}t {name}: {int((theirs != base).sum())} differ "
                  f"(max {float((theirs - base).abs().max()) / float(im.output_qparams.scale):.0f} codes), "
                  f"qparity mismatches {int((theirs != ours).sum())}")


if __name__ == "__main__":
    print(f"torch {torch.__version__}")
    report_ops()
    report_model()
