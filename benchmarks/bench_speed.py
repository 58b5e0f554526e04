"""Speed of qparity against torch.ao, side by side in one run, as ratios: the tables of `qparity bench`.

Run: python benchmarks/bench_speed.py [--quick] [--threads N] [--target T ...] [--repeats N]
(src/qparity/bench.py says what is measured and how; no numbers are asserted anywhere.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from qparity.bench import add_arguments, config_from, format_report, run_bench  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    config = config_from(parser.parse_args())
    print(format_report(run_bench(config, progress=lambda stage: print(f"... {stage}", file=sys.stderr))))
