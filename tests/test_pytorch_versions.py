"""The engine targets follow the PyTorch release they were matched against, whichever PyTorch is installed.

tests/data/pytorch_kernels_<release>.json holds codes recorded from each release's quantized kernels on exact
ties (tests/data/record_pytorch_kernels.py); both emulations must reproduce their own release's codes here,
so the release that is not installed stays pinned too. The tests against the installed PyTorch itself are
in test_numerics_pytorch_engines.py.
"""
import json
import pathlib
import warnings

import pytest
import torch
from torch import nn

import qparity as qp
from qparity.errors import ModelFileError, QParityWarning
from qparity.numerics import pooling
from qparity.ops.surrogates import clamp
from qparity.qparams import QParams
from qparity.numerics import get_target
from qparity.numerics import pytorch_versions
from qparity.numerics.pytorch_versions import CHECKED, PyTorchKernels, installed_kernels, kernels_for

DATA = pathlib.Path(__file__).parent / "data"
RELEASES = sorted(CHECKED)


def recorded(release: str) -> dict:
    return json.loads((DATA / f"pytorch_kernels_{release}.json").read_text())


def codes(values, channels_last=False) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def emulate(target, data: dict, name: str) -> list:
    """What the target computes for one recorded case."""
    case = data["cases"][name]
    grid = QParams(data["scale"], data["zero_point"], "uint8")
    if name == "quantize_per_tensor":
        return target.quantize(torch.tensor(case["x"]), grid).tolist()
    if name == "add_scalar_loop":
        out = QParams(case["out_scale"], data["zero_point"], "uint8")
        return target.add(codes(case["a"]), grid, codes(case["b"]), grid, out, 0, 255).tolist()
    if name.startswith("cat_nhwc"):
        out = QParams(case["out_scale"], data["zero_point"], "uint8")
        return target.concatenate([codes(case["x"], True)], [grid], out, 1).tolist()
    x = codes(case["x"], case["channels_last"])
    if name.startswith("adaptive"):
        out_size = tuple(torch.tensor(case["codes"]).shape[-2:])
        attrs = {**pooling.adaptive_as_pooling(tuple(x.shape[-2:]), out_size, "test"), "adaptive": True}
    else:
        attrs = {"kernel_size": (1, 2), "stride": (1, 2), "padding": (0, 0), "ceil_mode": False,
                 "count_include_pad": True, "adaptive": False}
    return target.average_pool(x, grid, attrs).tolist()


@pytest.mark.parametrize("release", RELEASES)
@pytest.mark.parametrize("engine", ["fbgemm", "x86"])
def test_engine_target_reproduces_recorded_codes_of_its_release(release, engine):
    data = recorded(release)
    target = get_target(engine).for_release(release)
    for name, case in data["cases"].items():
        assert emulate(target, data, name) == case["codes"], f"{engine} as PyTorch {release}: {name}"


def test_recorded_releases_differ_where_the_rounding_changed():
    """The recordings are tie cases on which the two releases disagree: otherwise they would pin nothing."""
    old, new = (recorded(r)["cases"] for r in RELEASES)
    changed = {name for name in old if old[name]["codes"] != new[name]["codes"]}
    assert changed == {"quantize_per_tensor", "add_scalar_loop", "avg_pool2d_nhwc", "adaptive_avg_pool2d_nhwc",
                       "avg_pool2d_one_channel", "adaptive_avg_pool2d_one_channel",
                       "adaptive_avg_pool2d_vector_loop", "cat_nhwc_scalar_loop"}


def test_engine_targets_follow_the_installed_pytorch():
    release = pytorch_versions.release_of(torch.__version__)
    assert release in CHECKED, f"PyTorch {torch.__version__} is installed but its kernels were never checked"
    for engine in ("fbgemm", "x86", "qnnpack"):
        assert get_target(engine).kernels.release == release


def test_an_unchecked_pytorch_gets_the_nearest_release_and_one_warning(monkeypatch):
    monkeypatch.setattr(pytorch_versions, "_warned", set())
    with pytest.warns(QParityWarning, match=r"checked bit for bit against PyTorch 2\.13, 2\.14; PyTorch 2\.99\.0"):
        assert kernels_for("2.99.0").release == max(CHECKED, key=lambda r: tuple(map(int, r.split("."))))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels_for("2.99.1")  # the same release: said once
        assert kernels_for("2.13.0+cpu").release == "2.13"
    with pytest.warns(QParityWarning):
        assert kernels_for("1.9.0").release == "2.13"


def test_a_version_string_without_a_release_is_refused():
    with pytest.raises(ValueError, match="cannot read a PyTorch release"):
        kernels_for("nightly")


@pytest.mark.parametrize("release", RELEASES)
def test_saved_engine_model_keeps_the_release_it_was_trained_for(tmp_path, release):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    target = get_target("fbgemm").for_release(release)
    prepared = qp.prepare_qat(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), (x,), target=target)
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    im = qp.convert(prepared)
    im.save(tmp_path / "m.qp")
    loaded = qp.load(tmp_path / "m.qp")
    assert loaded.target.kernels.release == release
    assert torch.equal(loaded(x), prepared.eval()(x))


def test_a_file_naming_an_unchecked_release_is_refused(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    target = type(get_target("fbgemm"))(PyTorchKernels("0.1", True))  # as a newer qparity might write
    prepared = qp.prepare_qat(nn.Linear(3, 2), (x,), target=target)
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    im = qp.convert(prepared)
    im.save(tmp_path / "m.qp")
    with pytest.raises(ModelFileError, match="release '0.1' has no checked kernels"):
        qp.load(tmp_path / "m.qp")


def test_to_torch_warns_when_the_model_follows_another_release():
    other = next(r for r in RELEASES if r != installed_kernels().release)
    torch.manual_seed(0)
    x = torch.randn(4, 3)
    prepared = qp.prepare_qat(nn.Linear(3, 2), (x,), target=get_target("fbgemm").for_release(other))
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    with pytest.warns(QParityWarning, match=f"follows PyTorch {other}'s fbgemm kernels"):
        qp.to_torch(qp.convert(prepared))


def test_clamp_passes_the_gradient_at_its_bounds_as_torch_ao_fake_quantization():
    """PyTorch 2.14 changed torch.clamp's gradient at the bounds; qparity's surrogates must not follow it."""
    x = torch.tensor([-128.0, -127.0, 0.0, 127.0, 128.0], requires_grad=True)
    clamp(x, -127, 127).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    y = torch.tensor([-1.0, 0.0, 5.0], requires_grad=True)
    clamp(y, 0.0, None).sum().backward()
    assert torch.equal(y.grad, torch.tensor([0.0, 1.0, 1.0]))
