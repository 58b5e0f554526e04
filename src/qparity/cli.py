"""The `qparity` console script: `qparity demo` (QAT on 8x8 digits, end to end), `info`, `export`, `verify`,
`golden`, `compare`, `doctor` and `bench`.

Every misuse ends in one line on stderr, "qparity: error: ...", and a non-zero exit status (2 for a bad
command line, 1 for anything qparity refuses, 3 for an unexpected error); `--debug` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional, Sequence

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import __version__
from .bench import add_arguments as add_bench_arguments
from .demo import DemoConfig, DemoResult, run_demo
from .errors import InputError, QParityError
from .files import require_file
from .numerics import TARGETS, get_target

def stage_label(stage: str) -> str:
    """'float:NAME' -> 'float NAME', 'qat:NAME:TARGET' -> 'QAT NAME for TARGET'."""
    parts = stage.split(":")
    return f"float {parts[1]}" if parts[0] == "float" else f"QAT {parts[1]} for {parts[2]}"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (argparse prints the usage first); subcommands inherit it."""

    def error(self, message: str):
        self.exit(2, f"qparity: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qparity", description="Quantization-aware training whose fake-quantized "
                    "forward equals the deployed integer program, bit for bit.")
    parser.add_argument("--version", action="version", version=f"qparity {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # Also accepted after the subcommand; SUPPRESS keeps a subcommand from resetting the top-level flag.
    debug = Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda name, **options: commands.add_parser(name, parents=[debug], **options)  # noqa: E731
    demo = add("demo", help="QAT of a small CNN on scikit-learn's 8x8 digits, then convert "
                            "and compare the fake-quant and integer outputs")
    defaults = DemoConfig()
    demo.add_argument("--target", choices=TARGETS, action="append",
                      help="a target to train for (repeatable; default: every target)")
    demo.add_argument("--epochs", type=_positive, default=defaults.qat_epochs,
                      help=f"quantization-aware training epochs (default {defaults.qat_epochs})")
    demo.add_argument("--float-epochs", type=_non_negative, default=defaults.float_epochs,
                      help=f"float training epochs before QAT (default {defaults.float_epochs})")
    demo.add_argument("--seed", type=_seed, default=defaults.seed, help=f"random seed (default {defaults.seed})")
    add("info", help="print the version and the supported targets")
    export = add("export", help="write a saved model (.qp) as an .onnx, .tflite, .tosa or .pte file")
    export.add_argument("model", help="a model saved with IntegerModel.save")
    export.add_argument("output", help="the file to write: .onnx (target onnxruntime), .tflite (target tflite, "
                        "xnnpack or tflite-micro), .tosa (target tosa) or .pte (target executorch-xnnpack)")
    export.add_argument("--aimet-encodings", nargs="?", const="1.0.0", choices=("1.0.0", "0.6.1"),
                        help="for Qualcomm QNN/SNPE: write OUTPUT (.onnx) as a float model plus OUTPUT's .encodings "
                             "(AIMET's format, version 1.0.0 by default), any target (docs/runtimes.md)")
    verify = add("verify", help="run an exported file in its real runtime(s) and count the codes "
                                "that differ from the saved model's")
    verify.add_argument("model", help="a model saved with IntegerModel.save")
    verify.add_argument("exported", help="the .onnx, .tflite, .tosa or .pte file exported from it")
    verify.add_argument("--inputs", help="a .npy file of float32 inputs (default: random inputs spanning each "
                                         "input's grid and beyond)")
    verify.add_argument("--samples", type=_positive, default=64, help="random inputs to draw (default 64)")
    verify.add_argument("--seed", type=_seed, default=0, help="seed for the random inputs (default 0)")
    golden = add("golden", help="write per-layer integer parameters and input/output codes "
                                "(.npy + index.json) for checking kernels on a DSP or MCU")
    golden.add_argument("model", help="a model saved with IntegerModel.save")
    golden.add_argument("directory", help="where to write index.json and the .npy files")
    golden.add_argument("--inputs", help="a .npy file of float32 inputs (default: random inputs on the grid)")
    golden.add_argument("--samples", type=_positive, default=4, help="random inputs to draw (default 4)")
    golden.add_argument("--seed", type=_seed, default=0, help="seed for the random inputs (default 0)")
    compare = add("compare", help="compare a device's per-layer codes with golden vectors and name the "
                                  "arithmetic rule (target) that reproduces them")
    compare.add_argument("golden", help="a directory written by `qparity golden`")
    compare.add_argument("device", help="a directory of the device's dumps: <node>.npy or <node>.bin per tensor "
                                        "(docs/runtimes.md, 'Checking a device')")
    compare.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw",
                         help="the order of raw .bin dumps, and of .npy dumps whose shape fits both (default nchw)")
    compare.add_argument("--dtype", choices=("int8", "uint8"),
                         help="the type of raw .bin dumps (default: the .npy dumps' type, else the golden's)")
    doctor = add("doctor", help="explain where and why a torch.ao QAT model and its converted "
                                "int8 model disagree")
    doctor.add_argument("script", help="path/to/script.py[:function] (default function: build) returning "
                                       "(prepared, converted, example_inputs); or an ExecuTorch .pte file lowered "
                                       "from a PT2E model, with --reference")
    doctor.add_argument("--reference", help="for a .pte: the converted PT2E model it was lowered from, as "
                                            "script.py[:function] returning (converted, example_inputs) or a .qp "
                                            "saved from qparity.from_torch of it")
    doctor.add_argument("--inputs", help="for a .pte: a .npy file of float32 inputs (default: random inputs "
                                         "spanning the input grid and beyond)")
    doctor.add_argument("--samples", type=_positive, default=64, help="for a .pte: random inputs (default 64)")
    doctor.add_argument("--seed", type=_seed, default=0, help="for a .pte: seed of the random inputs (default 0)")
    doctor.add_argument("--html", help="also write the report as a self-contained HTML page")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    bench = add("bench", help="time QAT steps and integer inference against torch.ao on this machine, side by side, "
                              "and print the ratios")
    add_bench_arguments(bench)
    return parser


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1)


def _non_negative(text: str) -> int:
    return _integer(text, 0)


def _seed(text: str) -> int:
    """A seed torch.Generator takes: 0 <= seed < 2^64."""
    value = _integer(text, 0)
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"must be below 2^64, got {value}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a bad command line (already reported on one line)
        return done.code if isinstance(done.code, int) else 2
    try:
        return run_command(args)
    except Exception as error:
        if args.debug:
            raise
        return report_error(error)


def run_command(args) -> int:
    console = Console(highlight=False)
    if args.command == "info":
        return info(console)
    if args.command == "export":
        return export_command(console, args.model, args.output, args.aimet_encodings)
    if args.command == "verify":
        return verify_command(console, args)
    if args.command == "golden":
        return golden_command(console, args)
    if args.command == "compare":
        return compare_command(console, args)
    if args.command == "doctor":
        from .doctor.command import doctor_command
        return doctor_command(console, args, lambda model: command_inputs(model, args))
    if args.command == "bench":
        return bench_command(console, args)
    config = DemoConfig(targets=tuple(args.target or TARGETS), float_epochs=args.float_epochs,
                        qat_epochs=args.epochs, seed=args.seed)
    return demo(console, config)


def report_error(error: Exception) -> int:
    """One line on stderr: qparity's refusals and what the system says (a file, a missing package) as they
    are; anything else is a bug in qparity or in a script the doctor ran, so say where to look."""
    if isinstance(error, QParityError):
        message, status = f"{type(error).__name__}: {error}", 1
    elif isinstance(error, ImportError):
        message, status = str(error), 2
    elif isinstance(error, OSError):
        message, status = str(error), 1
    else:
        message, status = (f"unexpected {type(error).__name__}: {error} (run again with --debug for the "
                           "traceback)"), 3
    print(f"qparity: error: {' '.join(message.split())}", file=sys.stderr)
    return status


def info(console: Console) -> int:
    from .numerics.pytorch_versions import CHECKED, installed_kernels, release_of

    kernels = installed_kernels()
    console.print(f"qparity {__version__} (torch {torch.__version__})", markup=False)
    status = ("checked bit for bit" if release_of(torch.__version__) in CHECKED
              else f"torch {torch.__version__} is unchecked: the nearest checked release")
    rounding = "round, then add the zero point" if kernels.zero_point_after_rounding else "add the zero point, then round"
    console.print(f"engine semantics (fbgemm, x86, qnnpack): PyTorch {kernels.release}'s kernels, {status} "
                  f"(checked: {', '.join(CHECKED)}); quantize: {rounding}", markup=False)
    table = Table(title="targets")
    table.add_column("target")
    table.add_column("activations")
    table.add_column("integer semantics")
    for name in TARGETS:
        target = get_target(name)
        table.add_row(name, ", ".join(target.activation_dtypes), target.summary)
    console.print(table)
    return 0


def bench_command(console: Console, args) -> int:
    from .bench import config_from, format_report, run_bench

    report = run_bench(config_from(args), progress=lambda stage: console.print(f"... {stage}", style="dim"))
    console.print(format_report(report), markup=False, soft_wrap=True)
    return 0


def export_command(console: Console, model_path: str, output: str, aimet_encodings=None) -> int:
    from . import export, load

    if aimet_encodings:
        from .export.aimet import export_aimet

        written = export_aimet(load(model_path), output, version=aimet_encodings)
        console.print(f"wrote {' and '.join(written)}", markup=False)
        return 0
    export(load(model_path), output)
    console.print(f"wrote {output}", markup=False)
    return 0


def verify_command(console: Console, args) -> int:
    from . import load, verify

    model = load(args.model)
    report = verify(model, args.exported, command_inputs(model, args))
    console.print(verify_table(report))
    console.print(f"{'OK' if report.ok else 'MISMATCH'}: {report.mismatched} mismatched codes in the runtime "
                  f"configurations target {report.target} promises", markup=False)
    return 0 if report.ok else 1


def golden_command(console: Console, args) -> int:
    from . import golden, load

    model = load(args.model)
    index = golden(model, command_inputs(model, args), args.directory)
    console.print(f"wrote {index}", markup=False)
    return 0


def compare_command(console: Console, args) -> int:
    """Exit status 0 when the device computes the golden codes on every dumped tensor, 1 otherwise."""
    from .device_parity import compare

    report = compare(args.golden, args.device, layout=args.layout, dtype=args.dtype)
    console.print(str(report), markup=False)
    return 0 if report.ok else 1


def command_inputs(model, args):
    """The --inputs .npy file, or random inputs spanning the model's input grids."""
    if args.inputs:
        return (read_float_inputs(args.inputs),)
    return random_inputs(model, args.samples, args.seed)


def read_float_inputs(path: str) -> torch.Tensor:
    """A .npy file of finite float inputs as float32: integer (or bool, complex...) arrays are refused, not
    cast, since codes and real values are easily confused; float64 only where float32 holds it exactly."""
    import numpy as np

    path = require_file(path, "the --inputs file")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):  # .npy, or .npz (a zip file)
        raise InputError(f"--inputs {path!r} is not a .npy file (it does not start with numpy's magic "
                         "b'\\x93NUMPY'); save the inputs with numpy.save")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(f"--inputs {path!r} is not a .npy array file: {error}") from error
    if not isinstance(array, np.ndarray):
        raise InputError(f"--inputs {path!r} holds several arrays (.npz); give one array as a .npy file")
    if array.dtype not in (np.float16, np.float32, np.float64):
        raise InputError(f"--inputs {path!r} holds {array.dtype} values; it must hold float inputs (real values, "
                         "not integer codes): save it with .astype(np.float32)")
    if not np.isfinite(array).all():
        raise InputError(f"--inputs {path!r} has {int((~np.isfinite(array)).sum())} NaN or infinite value(s); "
                         "no integer code represents them")
    if array.dtype == np.float64 and not np.array_equal(array.astype(np.float32), array):
        raise InputError(f"--inputs {path!r} holds float64 values that float32 cannot hold exactly; the model "
                         "quantizes float32 inputs: save them with .astype(np.float32)")
    return torch.from_numpy(array.astype(np.float32))


def random_inputs(model, samples: int, seed: int):
    """Inputs spread over each input grid's real range, 10% beyond it on both sides (saturation)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = []
    for shape, qp in zip(model.graph.input_shapes, model.input_qparams):
        low = float((qp.qmin - qp.zero_point) * qp.scale)
        high = float((qp.qmax - qp.zero_point) * qp.scale)
        span = high - low
        uniform = torch.rand((samples, *shape[1:]), generator=generator)
        inputs.append((low - 0.1 * span + uniform * 1.2 * span).to(torch.float32))
    return tuple(inputs)


def verify_table(report) -> Table:
    table = Table(title=f"verify {report.path} (target {report.target})")
    for column in ("runtime", "output", "mismatched", "total", "must match", "first mismatch"):
        table.add_column(column)
    for r in report.results:
        first = "" if r.first_index is None else f"{r.first_index}: qparity {r.expected}, runtime {r.actual}"
        table.add_row(r.runtime, str(r.output), str(r.mismatched), str(r.total), "yes" if r.binding else "no",
                      first + (f" ({r.note})" if r.note else ""))
    return table


def demo(console: Console, config: DemoConfig) -> int:
    console.print(f"qparity {__version__} demo: targets {', '.join(config.targets)}, {config.float_epochs} float + "
                  f"{config.qat_epochs} QAT epochs each, seed {config.seed}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        tasks = {}

        def advance(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage_label(stage), total=total)
            progress.update(tasks[stage], completed=done)

        result = run_demo(config, advance)
    for model in result.models:
        console.print(results_table(result, model))
        for line in runtime_lines(model):
            console.print(line, markup=False, soft_wrap=True)
    console.print(f"finished in {time.perf_counter() - start:.1f} s")
    console.print(mismatch_line(result), markup=False, soft_wrap=True)
    return 0 if result.mismatched == 0 else 1


def results_table(result: DemoResult, model) -> Table:
    table = Table(title=f"{model.name} ({model.description}): test accuracy on {result.test_size} digits "
                        f"(float model: {model.float_accuracy:.2%})")
    for column in ("target", "fake-quant", "integer", "runtime", "fake≠int", "runtime≠int"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for t in model.targets:
        run = t.runtime
        table.add_row(t.target, f"{t.fake_quant_accuracy:.2%}", f"{t.integer_accuracy:.2%}",
                      f"{run.accuracy:.2%}" if run else "-", f"{t.mismatched}/{t.compared}",
                      f"{run.mismatched}/{run.compared}" if run else "-")
    for target, _ in model.refused:
        table.add_row(target, "refused", "-", "-", "-", "-")
    return table


def runtime_lines(model) -> List[str]:
    """Which kernels each runtime column ran, what the kernels qparity does not promise gave, and why a target
    refused the model."""
    lines = []
    for t in model.targets:
        if t.runtime is None:
            lines.append(f"{t.target}: {t.skipped}")
            continue
        lines.append(f"{t.target}: runtime column = {t.runtime.runtime} (must match)")
        lines.extend(f"    also ran {name}: {m} of {n} codes differ (reported, not promised)"
                     for name, m, n in t.runtime.others)
    lines.extend(f"{target}: refused: {reason}" for target, reason in model.refused)
    return lines


def mismatch_line(result: DemoResult) -> str:
    verdict = "bit-exact" if result.mismatched == 0 else "NOT bit-exact: please report this as a bug"
    return (f"fake-quant vs integer vs runtimes: {result.mismatched} mismatched of {result.compared} output codes "
            f"({verdict})")


if __name__ == "__main__":
    sys.exit(main())
