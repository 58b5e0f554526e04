"""`qparity bench` runs end to end and prints its three tables (tiny sizes; no timing is asserted)."""
from qparity.bench import BenchConfig, format_report, run_bench
from qparity.cli import build_parser


def test_bench_reports_every_table_for_a_tiny_model():
    config = BenchConfig(targets=("xnnpack", "fbgemm"), qat_batch=2, inference_batches=(1, 2), scale_batches=(1, 2),
                         widths=(1, 2), channels=(4, 8), size=8, repeats=1, warmup=0)
    report = run_bench(config)
    assert [t.name for t in report.qat] == ["xnnpack", "fbgemm"]
    assert set(report.inference) == {1, 2} and set(report.scale) == {(1, 1), (1, 2), (2, 1), (2, 2)}
    text = format_report(report)
    for line in ("| torch.ao (x86) |", "| xnnpack |", "| fbgemm |", "Scale: integer inference", "time vs batch"):
        assert line in text


def test_bench_command_line_takes_quick_threads_and_targets():
    from qparity.bench import config_from

    args = build_parser().parse_args(["bench", "--quick", "--threads", "1", "--target", "tflite", "--repeats", "2"])
    config = config_from(args)
    assert (config.threads, config.targets, config.repeats, config.widths) == (1, ("tflite",), 2, (1, 2))
