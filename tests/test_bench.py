"""`qparity bench` runs end to end and prints its tables (tiny sizes; no timing is asserted)."""
import pytest
import torch

from qparity.bench import BenchConfig, BenchReport, format_report, memory_run, memory_table, run_bench
from qparity.bench_memory import MemoryProfileError, _Allocation, _check_chain, peak_memory, tensor_peak
from qparity.cli import build_parser

TINY = dict(qat_batch=2, inference_batches=(2,), channels=(4, 8), size=8)


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
    assert not report.memory and not report.tensor_memory and "Peak memory" not in text


def test_peak_memory_is_measured_in_a_process_of_its_own():
    config = BenchConfig(targets=("xnnpack",), **TINY)
    measured = peak_memory("inference", "xnnpack", config)
    assert measured is not None and measured[0] > 0 and measured[1] >= 0
    report = BenchReport("machine", 1, "torch", config, memory={("inference", "xnnpack"): measured,
                                                                 ("qat", "xnnpack"): None})
    table = memory_table(report)
    assert "| xnnpack | - | - | n/a | - | - | " in table and "| torch.ao | - | - | - | - | - | - |" in table


def _holding(extra_bytes, step):
    """`step`, with a tensor of `extra_bytes` alive the whole time it runs."""
    def run():
        extra = torch.empty(extra_bytes, dtype=torch.uint8)
        step()
        return extra.numel()
    return run


@pytest.mark.parametrize("kind, contender", [("qat", "xnnpack"), ("qat", "torch.ao"), ("inference", "tflite")])
def test_tensor_peak_counts_a_known_extra_allocation_exactly(kind, contender):
    config = BenchConfig(targets=(contender,), **TINY)
    with torch.set_grad_enabled(kind == "qat"):
        plain = tensor_peak(lambda: memory_run(kind, contender, config))
        holding = tensor_peak(lambda: _holding(12345, memory_run(kind, contender, config)))
    assert plain.peak > 0 and plain.steady and plain.retained == 0
    assert holding.peak == plain.peak + 12345 and holding.retained == 0 and holding.standing == plain.standing > 0
    assert sum(size for _, size in holding.at_peak) - holding.freed_before_peak == holding.peak


def test_tensor_peak_of_allocations_and_frees_is_their_running_total():
    kept = []

    def run():
        first = torch.empty(1000, dtype=torch.uint8)
        second = torch.empty(3000, dtype=torch.uint8)
        del first
        torch.empty(500, dtype=torch.uint8)
        kept[:] = [second]  # frees the previous run's 3000 bytes, after the peak

    measured = tensor_peak(lambda: run)
    assert (measured.peak, measured.retained, measured.steady, measured.freed_before_peak) == (4000, 0, True, 0)
    assert (measured.standing, measured.unseen_frees) == (3000, 0)  # the run before left its 3000 bytes
    assert measured.at_peak == [("aten::empty", 4000)]


def test_allocation_events_that_do_not_add_up_are_refused():
    events = [_Allocation(1, 100, 100, 1, "a", 0), _Allocation(2, 50, 170, 2, "b", 0)]
    with pytest.raises(MemoryProfileError, match="not 100 \\+ 50"):
        _check_chain(events)
    swapped = [_Allocation(1, 100, 100, 1, "a", 0), _Allocation(2, 50, 170, 2, "b", 0),
               _Allocation(2, 20, 120, 3, "c", 0)]
    _check_chain(swapped)  # two events at one instant, in the order their totals imply
    assert [event.operator for event in swapped] == ["a", "c", "b"]


def test_bench_command_line_takes_quick_threads_and_targets():
    from qparity.bench import config_from

    args = build_parser().parse_args(["bench", "--quick", "--threads", "1", "--target", "tflite", "--repeats", "2"])
    config = config_from(args)
    assert (config.threads, config.targets, config.repeats, config.widths) == (1, ("tflite",), 2, (1, 2))
    assert config.memory and not config_from(build_parser().parse_args(["bench", "--no-memory"])).memory
    assert config.compiled and not config_from(build_parser().parse_args(["bench", "--no-compile"])).compiled
    assert not config.profile and config_from(build_parser().parse_args(["bench", "--profile"])).profile


def test_the_profile_splits_each_integer_run_into_kinds_of_work(monkeypatch):
    import qparity.numerics.compiled as compiled
    from qparity.numerics import native

    monkeypatch.setattr(compiled, "MIN_ELEMENTS", 0)  # the tiny model's requantizations on compiled kernels too
    # and not on the native fused kernels, which take them first where this CPU runs them (their profile names:
    # test_profile_kinds_by_operator_name)
    monkeypatch.setattr(native, "int8_conv", lambda: None)
    config = BenchConfig(targets=("xnnpack", "fbgemm"), inference_batches=(2,), scale_batches=(1,), widths=(1,),
                         channels=(4, 8), size=8, qat_batch=2, repeats=1, warmup=0, memory=False, profile=True)
    report = run_bench(config)
    profiles = report.profiles[2]
    assert set(profiles) == {"torch.ao", "xnnpack", "fbgemm", "xnnpack compiled"}  # not the exported files
    for name, found in profiles.items():
        assert found.wall > 0 and found.operators > 0
        assert all(seconds >= 0 for seconds in found.kinds.values())
        assert sum(found.kinds.values()) == pytest.approx(found.wall)  # the shares of the wall time
        assert found.kinds["conv and linear kernels"] > 0, name
    assert profiles["xnnpack compiled"].kinds["compiled kernels"] > 0
    text = format_report(report)
    assert "Where an integer inference run goes, batch 2" in text and "| xnnpack compiled |" in text


@pytest.mark.parametrize("name, kind", [
    ("onednn::qconv2d_pointwise", "conv and linear kernels"), ("quantized::conv2d_relu", "conv and linear kernels"),
    ("quantized::linear", "conv and linear kernels"), ("quantized::add_relu", "engine and native adds"),
    ("qparity::native_conv", "conv and linear kernels"), ("qparity::native_add", "engine and native adds"),
    ("## Call CompiledFxGraph fabc ##", "compiled kernels"), ("TorchDynamo Cache Lookup", "compiled kernels"),
    ("aten::index_select", "table lookups"), ("aten::_to_copy", "copies, conversions, views"),
    ("aten::empty_strided", "copies, conversions, views"), ("aten::permute", "copies, conversions, views"),
    ("aten::mul", "element-wise passes"), ("aten::bitwise_xor", "element-wise passes"),
    ("aten::round_", "element-wise passes"), ("some::custom_kernel", "other kernels")])
def test_profile_kinds_by_operator_name(name, kind):
    from qparity.bench_profile import kind_of

    assert kind_of(name) == kind


def test_memory_table_compares_tensor_peaks_with_torch_ao_and_names_what_is_live_at_a_higher_peak():
    from qparity.bench_memory import MIB, TensorPeak

    def peak(mib, unseen=0, at_peak=()):
        return TensorPeak(int(mib * MIB), 0, int(mib * MIB), True, MIB, unseen, list(at_peak), 0)

    config = BenchConfig(targets=("tflite", "qnnpack"))
    report = BenchReport("machine", 1, "torch", config, tensor_memory={
        ("qat", "torch.ao"): peak(10), ("qat", "tflite"): peak(15, at_peak=[("aten::mul", int(2.5 * MIB))]),
        ("qat", "qnnpack"): peak(5), ("inference", "torch.ao"): peak(2), ("inference", "qnnpack"): peak(1, unseen=8)})
    table = memory_table(report)
    assert "| tflite | 15.00 (1.50x) | 1.00 | - | - | - | - |" in table
    assert "| qnnpack | 5.00 (0.50x) | 1.00 | - | <= 1.00 (0.50x) | <= 1.00 | - |" in table
    assert "- qat, tflite: aten::mul 2.5" in table and "qnnpack:" not in table


def test_tensor_peak_refuses_a_measure_without_a_warm_up_run():
    with pytest.raises(MemoryProfileError, match="warmup must be at least 1, got 0"):
        tensor_peak(lambda: (lambda: None), warmup=0)
