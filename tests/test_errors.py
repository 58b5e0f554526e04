"""Bad input gets a clear QParityError naming the problem; nothing fails silently."""
import pytest
import torch
from torch import nn

import qparity as qp
from qparity.errors import (CaptureError, InputError, InvalidQParamsError, ModelFileError, NotCalibratedError,
                            OverflowRiskError, UnknownTargetError, UnsupportedOpError)
from helpers import prepare_and_convert


def small_model():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 4, 4)
    return prepare_and_convert(small_model(), (x,), "tflite", [x])[1]


def test_unknown_target_names_the_choices():
    with pytest.raises(UnknownTargetError, match="'tpu'") as error:
        qp.prepare_qat(small_model(), (torch.randn(1, 1, 4, 4),), target="tpu")
    assert all(name in str(error.value) for name in qp.TARGETS)
    assert issubclass(UnknownTargetError, ValueError) and issubclass(UnknownTargetError, qp.QParityError)


def test_activation_dtype_the_target_does_not_support():
    with pytest.raises(InvalidQParamsError, match="tflite.*uint8"):
        qp.prepare_qat(small_model(), (torch.randn(1, 1, 4, 4),), target="tflite", activation_dtype="uint8")


class WithSoftplus(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Softplus())

    def forward(self, x):
        return self.body(x)


class WithPow(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.conv(x) ** 3  # a square is captured (as x * x); other powers are not


def test_unsupported_module_names_the_op_and_its_path():
    with pytest.raises(UnsupportedOpError, match=r"Softplus at module 'body.1'"):
        qp.prepare_qat(WithSoftplus(), (torch.randn(1, 1, 2, 2),))


def test_unsupported_function_names_the_op_and_the_node():
    with pytest.raises(UnsupportedOpError, match=r"unsupported operator _operator.pow at node 'pow_1'"):
        qp.prepare_qat(WithPow(), (torch.randn(1, 1, 2, 2),))
    assert issubclass(UnsupportedOpError, TypeError)


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


def test_untraceable_model_is_a_capture_error():
    with pytest.raises(CaptureError, match="torch.fx could not trace DataDependent"):
        qp.prepare_qat(DataDependent(), (torch.randn(1, 3),))


def test_integer_example_input_is_rejected():
    with pytest.raises(CaptureError, match="example input 0 must be a float tensor"):
        qp.prepare_qat(small_model(), (torch.zeros(1, 1, 4, 4, dtype=torch.int64),))


def test_batchnorm_without_running_statistics_is_refused_by_name():
    model = nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False), nn.Conv2d(1, 1, 1))
    with pytest.raises(UnsupportedOpError, match="BatchNorm2d needs affine=True and track_running_stats=True"):
        qp.prepare_qat(model, (torch.randn(2, 1, 2, 2),))


def test_adaptive_pool_with_uneven_windows_is_refused_where_the_runtime_has_no_kernel():
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.AdaptiveAvgPool2d(3))
    with pytest.raises(UnsupportedOpError, match="does not divide"):
        qp.prepare_qat(model, (torch.randn(1, 1, 5, 5),), target="tflite")


@pytest.mark.parametrize("scale, zero_point, dtype, match", [
    (0.0, 0, "int8", "scale must be finite and > 0"),
    (-1.0, 0, "int8", "scale must be finite and > 0"),
    (float("nan"), 0, "int8", "scale must be finite"),
    (float("inf"), 0, "int8", "scale must be finite"),
    (1e-50, 0, "int8", "not representable as a positive float32"),
    (0.1, 200, "int8", "zero point 200 is outside the int8 range"),
    (0.1, -1, "uint8", "outside the uint8 range"),
    (0.1, 0.5, "int8", "zero point must be an integer"),
    (0.1, 0, "int4", "unknown code dtype"),
    ([0.1, 0.2], 0, "int8", "per-tensor qparams need one scale"),
])
def test_invalid_qparams_are_rejected(scale, zero_point, dtype, match):
    with pytest.raises(InvalidQParamsError, match=match):
        qp.QParams(scale, zero_point, dtype)


def test_per_channel_qparams():
    params = qp.QParams([0.1, 0.2], [0, 1], "int8", axis=0)
    assert params.per_channel and params.scale.dtype == torch.float32
    with pytest.raises(InvalidQParamsError, match="per-channel"):
        qp.QParams([[0.1]], 0, "int8", axis=0)


def test_converting_before_any_data_was_observed():
    prepared = qp.prepare_qat(small_model(), (torch.randn(1, 1, 4, 4),))
    with pytest.raises(NotCalibratedError, match="has seen no data"):
        qp.freeze(prepared)
    with pytest.raises(NotCalibratedError):
        prepared.eval()(torch.randn(1, 1, 4, 4))


def test_wrong_input_shape(converted):
    with pytest.raises(InputError, match=r"shape \(2, 1, 5, 5\).*\(4, 1, 4, 4\)"):
        converted(torch.randn(2, 1, 5, 5))


def test_wrong_input_count(converted):
    with pytest.raises(InputError, match="takes 1 input"):
        converted(torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4))


def test_nan_and_infinite_inputs_have_no_code(converted):
    x = torch.randn(2, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    with pytest.raises(InputError, match="2 NaN or infinite"):
        converted(x)


def test_integer_input_to_call_and_float_codes_to_run(converted):
    with pytest.raises(InputError, match="must be a float tensor"):
        converted(torch.zeros(2, 1, 4, 4, dtype=torch.int8))
    with pytest.raises(InputError, match="must be an integer tensor"):
        converted.run(torch.zeros(2, 1, 4, 4))
    with pytest.raises(InputError, match="leave the int8 range"):
        converted.run(torch.full((2, 1, 4, 4), 300, dtype=torch.int32))


def test_int32_overflow_risk_is_caught_at_convert():
    model = nn.Linear(4096, 2)
    x = torch.randn(4, 4096)
    prepared = qp.prepare_qat(model, (x,), target="exact")
    prepared.train()(x)
    with torch.no_grad():
        model_layer = prepared.layers[next(iter(prepared.layers))].module
        model_layer.weight.fill_(1.0)  # every code 127: 4096 * 127 * 255 > 2^31 - 1... per channel 1.3e8, fine
        model_layer.weight[0].fill_(1.0)
    qp.freeze(prepared.eval())
    qp.convert(prepared)  # 4096 * 127 * 255 = 1.3e8 fits int32
    with torch.no_grad():
        model_layer.bias.fill_(3e7)  # bias codes far beyond int32 at scale s_in * s_w
    with pytest.raises(OverflowRiskError, match="does not fit int32|overflows the int32 accumulator"):
        qp.convert(prepared)


def test_accumulator_overflow_names_the_layer():
    model = nn.Sequential(nn.Linear(70000, 1))
    x = torch.randn(2, 70000).abs()  # zero point 0: centered codes reach 255
    prepared = qp.prepare_qat(model, (x,), target="exact", activation_dtype="uint8")
    with torch.no_grad():
        prepared.layers[next(iter(prepared.layers))].module.weight.fill_(0.5)
    prepared.train()(x)
    with pytest.raises(OverflowRiskError, match=r"module '0'.*overflows the int32 accumulator"):
        qp.freeze(prepared.eval())


@pytest.mark.parametrize("mutate, match", [
    (lambda b: b"", "is empty"),
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:len(b) // 2], "truncated"),
    (lambda b: b"PK\x03\x04" + b[4:], "not a qparity model file"),
    (lambda b: b + b"x", "unexpected bytes"),
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "checksum"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum"),
])
def test_damaged_files_are_rejected_with_the_reason(converted, tmp_path, mutate, match):
    path = tmp_path / "model.qp"
    converted.save(path)
    path.write_bytes(mutate(path.read_bytes()))
    with pytest.raises(ModelFileError, match=match):
        qp.load(path)


def test_missing_file(tmp_path):
    from qparity.errors import FileAccessError
    with pytest.raises(FileAccessError, match="does not exist"):
        qp.load(tmp_path / "absent.qp")


def test_saved_file_is_not_a_pickle(converted, tmp_path):
    path = tmp_path / "model.qp"
    converted.save(path)
    raw = path.read_bytes()
    assert raw.startswith(b"QPARITY\n") and b"\x80\x04\x95" not in raw[:64]


def test_freeze_convert_and_calibrate_need_a_prepared_model():
    from qparity.errors import NotPreparedError
    for action in (qp.freeze, qp.convert, lambda m: qp.calibrate(m, [])):
        with pytest.raises(NotPreparedError, match="expects the model returned by qparity.prepare_qat"):
            action(torch.nn.Linear(2, 2))


class CatOfChunks(nn.Module):
    def forward(self, x):
        return torch.cat(x.chunk(2, 1)[::-1], 1)


def test_cat_of_a_computed_sequence_is_refused_clearly():
    with pytest.raises(UnsupportedOpError, match="cat of a sequence computed by another op"):
        qp.prepare_qat(CatOfChunks(), (torch.randn(2, 4),))
