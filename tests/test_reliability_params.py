"""Parameters, inputs and calibration data that no runtime represents are refused by name, on every target.

Regression cases for issue 11: a NaN, infinite or huge weight (or weight scale) used to be accepted by freeze and
convert, with the fake forward then giving codes off the grid (INT64_MIN) where the integer model gave 0; NaN
inputs went through the fake forward; NaN or huge calibration data gave "has seen no data" or a nameless error.
"""
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import qparity as qp
from qparity.errors import (InputError, InvalidParameterError, InvalidQParamsError, NotCalibratedError,
                            NotFrozenError, OverflowRiskError)
from qparity.ops.layer import check_requantization

LAYER = r"layer module '0'"  # the first conv of `small_model`


def small_model(batch_norm: bool = False):
    layers = [nn.Conv2d(1, 2, 3)] + ([nn.BatchNorm2d(2)] if batch_norm else [])
    return nn.Sequential(*layers, nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def calibrated(target: str, batch_norm: bool = False):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 4, 4)
    prepared = qp.prepare_qat(small_model(batch_norm), (x,), target=target)
    prepared.train()(x)
    return prepared.eval(), x


def first_layer(prepared):
    return prepared.layers[next(iter(prepared.layers))]


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_refused_by_the_forward_freeze_and_convert(target, value):
    prepared, x = calibrated(target)
    with torch.no_grad():
        first_layer(prepared).module.weight[1, 0, 2, 0] = value
    match = LAYER + r": the weight of output channel 1 is NaN or infinite"
    for mode in (prepared.train, prepared.eval):  # training too: no INT64_MIN codes before freeze
        with pytest.raises(InvalidParameterError, match=match):
            mode()(x)
    with pytest.raises(InvalidParameterError, match=match):
        qp.freeze(prepared)
    assert not prepared.frozen  # refused before anything was fixed


@settings(max_examples=20, deadline=None)
@given(target=st.sampled_from(qp.TARGETS), channel=st.integers(0, 1), position=st.integers(0, 8),
       value=st.sampled_from([float("nan"), float("inf"), float("-inf"), 3e38]))
def test_the_refusal_names_the_channel_that_went_bad(target, channel, position, value):
    prepared, _ = calibrated(target)
    with torch.no_grad():
        first_layer(prepared).module.weight[channel].view(-1)[position] = value
    with pytest.raises(InvalidParameterError, match=LAYER + f": the .* of output channel {channel} "):
        qp.freeze(prepared)


@pytest.mark.parametrize("target", qp.TARGETS)
def test_weight_that_turns_nan_after_freeze_is_refused_at_convert(target):
    prepared, x = calibrated(target)
    qp.freeze(prepared)
    with torch.no_grad():
        first_layer(prepared).module.bias[0] = float("nan")
    with pytest.raises(InvalidParameterError, match=LAYER + r": the bias of output channel 0 is NaN"):
        qp.convert(prepared)
    with pytest.raises(InvalidParameterError, match=LAYER):
        prepared(x)


@pytest.mark.parametrize("target", qp.TARGETS)
def test_nan_batch_norm_statistics_are_refused_naming_the_folded_layer(target):
    prepared, _ = calibrated(target, batch_norm=True)
    with torch.no_grad():
        first_layer(prepared).batch_norm.running_var[1] = float("nan")
    with pytest.raises(InvalidParameterError, match=LAYER + r": the weight of output channel 1 .*BatchNorm folded"):
        qp.freeze(prepared)


@pytest.mark.parametrize("target", qp.TARGETS)
def test_huge_weight_is_refused_by_its_requantization_multiplier(target):
    prepared, x = calibrated(target)
    with torch.no_grad():
        first_layer(prepared).module.weight[1, 0, 0, 0] = 1e38
    match = LAYER + r": the requantization multiplier .* of output channel 1 .* is not below 2\^30"
    with pytest.raises(InvalidParameterError, match=match):
        prepared(x)
    with pytest.raises(InvalidParameterError, match=match):
        qp.freeze(prepared)


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("scale, match", [
    (6.5e26, r"requantization multiplier .* of output channel 1 \(.*\) is not below 2\^30"),
    (float("inf"), r"weight scale of output channel 1 \(inf\) is not a finite, positive, normal float32"),
    (0.0, r"weight scale of output channel 1 \(0\) is not a finite"),
    (-0.5, r"weight scale of output channel 1 \(-0.5\) is not a finite"),
    (1e-40, r"weight scale of output channel 1 \(9.99995e-41\) is not a finite, positive, normal"),
])
def test_broken_frozen_weight_scale_is_refused_at_convert_and_in_the_forward(target, scale, match):
    prepared, x = calibrated(target)
    qp.freeze(prepared)
    with torch.no_grad():
        first_layer(prepared).frozen_weight_scale[1] = scale
    with pytest.raises(InvalidParameterError, match=LAYER + ": the " + match):
        qp.convert(prepared)
    with pytest.raises(InvalidParameterError, match=LAYER):
        prepared(x)


def test_loaded_integer_model_with_a_broken_weight_scale_is_refused(tmp_path):
    prepared, _ = calibrated("tflite")
    integer = qp.convert(qp.freeze(prepared))
    layer = next(iter(integer.layers.values()))
    layer.weight_scale[0] = float("inf")
    with pytest.raises(InvalidParameterError, match=LAYER + r": the weight scale of output channel 0"):
        qp.IntegerModel(integer.graph, integer.target, integer.activation_dtype, integer.qparams, integer.layers)


@pytest.mark.parametrize("target", ["exact", "tflite", "onnxruntime", "xnnpack", "qnnpack"])
def test_bias_beyond_int32_is_refused_where_the_runtime_holds_int32(target):
    prepared, _ = calibrated(target)
    with torch.no_grad():
        first_layer(prepared).module.bias[1] = 1e9
    with pytest.raises(OverflowRiskError, match=LAYER + r": the bias of output channel 1 does not fit int32"):
        qp.freeze(prepared)


@pytest.mark.parametrize("target", ["fbgemm", "x86"])
def test_bias_beyond_int32_is_kept_where_the_engine_adds_it_in_float(target):
    prepared, x = calibrated(target)
    with torch.no_grad():
        first_layer(prepared).module.bias[1] = 1e9
    integer = qp.convert(qp.freeze(prepared))
    assert torch.equal(prepared(x), integer(x))


def test_requantization_limit_is_exclusive():
    input_qp, output_qp = qp.QParams(1.0, 0), qp.QParams(1.0, 0)
    check_requantization("module 'x'", torch.tensor([2.0**30 * (1 - 2**-24)]), input_qp, output_qp)
    with pytest.raises(InvalidParameterError, match="module 'x'"):
        check_requantization("module 'x'", torch.tensor([2.0**30]), input_qp, output_qp)


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_fake_forward_refuses_non_finite_inputs_like_the_integer_model(target, value):
    prepared, x = calibrated(target)
    integer = qp.convert(qp.freeze(prepared))
    bad = x.clone()
    bad[0, 0, 1, 1] = value
    with pytest.raises(InputError, match=r"input 'input_1' has 1 NaN or infinite value\(s\)") as refused:
        integer(bad)
    for mode in (prepared.eval, prepared.train):
        with pytest.raises(InputError) as error:
            mode()(bad)
        assert str(error.value) == str(refused.value)


@pytest.mark.parametrize("target", qp.TARGETS)
def test_calibration_with_nan_names_the_input_and_leaves_the_observers_clean(target):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 4, 4)
    prepared = qp.prepare_qat(small_model(), (x,), target=target)
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"input 'input_1' has 1 NaN"):
        qp.calibrate(prepared, [x, bad])
    qp.calibrate(prepared, [x])
    assert all(bool(torch.isfinite(o.min_val)) for o in prepared.observers.values())


@pytest.mark.parametrize("target", qp.TARGETS)
def test_calibration_data_beyond_float32_range_names_the_observer(target):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 4, 4)
    prepared = qp.prepare_qat(small_model(), (x,), target=target)
    huge = x.sign() * 3e38  # finite, but its span (and so its scale) is not
    match = r"observer of node 'input_1' .* saw values in .* beyond float32's range"
    with pytest.raises(InvalidParameterError, match=match):
        qp.calibrate(prepared, [huge])


@pytest.mark.parametrize("target", qp.TARGETS)
def test_layer_output_that_overflows_float32_names_the_layer(target):
    torch.manual_seed(0)
    x = torch.randn(4, 1, 4, 4)
    prepared = qp.prepare_qat(small_model(), (x,), target=target)
    with torch.no_grad():
        first_layer(prepared).module.weight.fill_(1e30)
    with pytest.raises(InvalidParameterError, match=r"observer of module '0' saw infinite values"):
        qp.calibrate(prepared, [x * 1e10])


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, 1e-40])
def test_broken_frozen_activation_scale_names_its_node(target, scale):
    prepared, x = calibrated(target)
    qp.freeze(prepared)
    observer = prepared.observers[next(n for n in prepared.observers if n != "input_1")]
    observer.frozen_scale.fill_(scale)
    match = re.escape(f"the observer of {observer.where}: scale")
    with pytest.raises(InvalidParameterError, match=match):
        qp.convert(prepared)
    with pytest.raises(InvalidParameterError, match=match):
        prepared(x)


def test_observer_refuses_nan_instead_of_reporting_no_data():
    from qparity.qat.observers import ActivationObserver
    observer = ActivationObserver("int8", "module 'head'").train()
    with pytest.raises(InvalidParameterError, match="observer of module 'head' saw NaN values"):
        observer.observe(torch.tensor([1.0, float("nan")]))
    with pytest.raises(NotCalibratedError, match="has seen no data"):  # the NaN batch left no trace
        observer.qparams()


def test_convert_without_freeze_is_refused_with_what_to_do():
    prepared, x = calibrated("exact")
    with pytest.raises(NotFrozenError, match=r"call qparity.freeze\(model\) first"):
        qp.convert(prepared)
    assert issubclass(NotFrozenError, qp.QParityError)
    unfrozen = prepared(x)
    assert torch.equal(qp.convert(qp.freeze(prepared))(x), unfrozen)


@pytest.mark.parametrize("dtype, name", [(torch.int8, "int8"), (torch.uint8, "uint8"), (torch.int16, "int16"),
                                         (torch.int32, "int32"), ("uint8", "uint8")])
def test_qparams_take_torch_dtypes_as_names(dtype, name):
    params = qp.QParams(0.5, 3, dtype)
    assert params.dtype == name and params.same_grid(qp.QParams(0.5, 3, name))
    assert qp.QParams.from_dict(params.to_dict()).same_grid(params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.qint8, 8, ["int8"], None])
def test_qparams_refuse_other_dtypes(dtype):
    with pytest.raises(InvalidQParamsError, match="code dtype"):
        qp.QParams(0.5, 0, dtype)


def test_qparams_refuse_a_subnormal_scale():
    with pytest.raises(InvalidQParamsError, match="subnormal"):
        qp.QParams(1e-40, 0)


def conv_with_output_multiplier(target, multiplier):
    """A 1x1 conv over 64 channels whose output grid is `multiplier` times finer than its accumulator's step."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 3, 3) * 4
    prepared = qp.prepare_qat(nn.Conv2d(64, 1, 1, bias=False), (x,), target=target, per_channel=False)
    qp.calibrate(prepared, [x])
    (name,) = prepared.layers
    layer = prepared.layers[name]
    input_qp = prepared.qparams(prepared.graph.nodes[0].name)
    step = float(input_qp.scale) * float(layer.weight_scale(layer.folded()[0]))
    prepared.observers[name].fix(qp.QParams(step / multiplier, 0, "int8"))
    return prepared


@pytest.mark.parametrize("target", ["tflite", "onnxruntime", "exact"])
def test_an_accumulator_that_tflites_left_shift_overflows_is_refused(target):
    """TFLite shifts the int32 accumulator left by log2(M) bits for M >= 1 before multiplying; where that can
    overflow int32 the tflite target refuses the layer. Other targets multiply without the shift."""
    prepared = conv_with_output_multiplier(target, 2.0**13)
    if target != "tflite":
        qp.convert(qp.freeze(prepared))
        return
    with pytest.raises(OverflowRiskError, match=r"multiplier s_in \* s_w / s_out is >= 1.*left by 14 bit"):
        qp.freeze(prepared)


def test_a_small_left_shift_that_cannot_overflow_is_accepted_on_tflite(tmp_path):
    from helpers import assert_runtime_gives_the_same_codes

    prepared = conv_with_output_multiplier("tflite", 4.0)
    integer = qp.convert(qp.freeze(prepared))
    x = torch.randn(2, 64, 3, 3) * 4
    assert torch.equal(prepared.eval()(x), integer(x))
    assert_runtime_gives_the_same_codes(integer, x, tmp_path)
