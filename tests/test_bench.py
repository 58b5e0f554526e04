"""`qparity bench` runs end to end and prints its tables (tiny sizes; no timing is asserted)."""
from qparity.bench import BenchConfig, BenchReport, format_report, memory_table, run_bench
from qparity.bench_memory import peak_memory
from qparity.cli import build_parser


def test_bench_reports_every_table_for_a_tiny_model():
    config = BenchConfig(targets=("xnnpack", "fbgemm"), qat_batch=2, inference_batches=(1, 2), scale_batches=(1, 2),
                         widths=(1, 2), channels=(4, 8), size=8, repeats=1, warmup=0, memory=False)
    report = run_bench(config)
    assert [t.name for t in report.qat] == ["xnnpack", "fbgemm"]
    assert set(report.inference) == {1, 2} and set(report.scale) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    text = format_report(report)
    for line in ("| torch.ao (x86) |", "| xnnpack |", "| fbgemm |", "| xnnpack compiled |", "| LiteRT: xnnpack .tflite |",
                 "Scale: integer inference", "time vs batch"):
        assert line in text
    assert "| fbgemm compiled |" not in text  # runs on PyTorch's engine, whose kernels requantize themselves


def test_peak_memory_is_measured_in_a_process_of_its_own():
    config = BenchConfig(targets=("xnnpack",), qat_batch=2, inference_batches=(2,), channels=(4, 8), size=8)
    measured = peak_memory("inference", "xnnpack", config)
    assert measured is not None and measured[0] > 0 and measured[1] >= 0
    report = BenchReport("machine", 1, "torch", config, memory={("inference", "xnnpack"): measured,
                                                                 ("qat", "xnnpack"): None})
    table = memory_table(report)
    assert "| xnnpack | n/a | " in table and "| torch.ao | - | - |" in table


def test_bench_command_line_takes_quick_threads_and_targets():
    from qparity.bench import config_from

    args = build_parser().parse_args(["bench", "--quick", "--threads", "1", "--target", "tflite", "--repeats", "2"])
    config = config_from(args)
    assert (config.threads, config.targets, config.repeats, config.widths) == (1, ("tflite",), 2, (1, 2))
    assert config.memory and not config_from(build_parser().parse_args(["bench", "--no-memory"])).memory
    assert config.compiled and not config_from(build_parser().parse_args(["bench", "--no-compile"])).compiled
