"""Whole models: train a few steps, freeze, convert; the integer program equals the fake-quant forward."""
import threading

import pytest
import torch

import qparity as qp
from helpers import assert_bit_exact, calibrate, prepare_and_convert
from models import CatMLP, ResNetish


def image_batches(seed, count=4, n=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 12, 12, generator=g) * 1.5 for _ in range(count)]


def vector_batches(seed, count=4, n=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 20, generator=g) * 3 for _ in range(count)]


@pytest.fixture(scope="module", params=qp.TARGETS)
def resnet(request):
    torch.manual_seed(0)
    batches = image_batches(1)
    prepared, integer = prepare_and_convert(ResNetish(), (batches[0],), request.param, batches, lr=0.02)
    return prepared, integer


@pytest.fixture(scope="module", params=qp.TARGETS)
def mlp(request):
    torch.manual_seed(0)
    batches = vector_batches(2)
    return prepare_and_convert(CatMLP(), (batches[0],), request.param, batches, lr=0.02)


def test_resnet_with_batchnorm_and_residual_adds_is_bit_exact(resnet):
    prepared, integer = resnet
    for x in image_batches(7, count=2, n=16):
        assert_bit_exact(prepared, integer, x)


def test_mlp_with_cat_is_bit_exact(mlp):
    prepared, integer = mlp
    for x in vector_batches(8, count=2, n=32):
        assert_bit_exact(prepared, integer, x)


def test_inputs_far_outside_the_calibrated_range_are_bit_exact(resnet):
    prepared, integer = resnet
    x = torch.randn(4, 1, 12, 12) * 1e4
    x[0] = 0.0
    assert_bit_exact(prepared, integer, x)


def test_batch_run_equals_single_sample_runs(resnet):
    _, integer = resnet
    x = image_batches(9, count=1, n=6)[0]
    codes = integer.quantize(x)
    whole = integer.run(codes)
    singles = torch.cat([integer.run(codes[i:i + 1]) for i in range(len(x))])
    assert torch.equal(whole, singles)


def test_one_and_two_threads_give_the_same_codes(resnet):
    _, integer = resnet
    x = image_batches(10, count=1, n=8)[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = integer.run(integer.quantize(x))
        torch.set_num_threads(2)
        two = integer.run(integer.quantize(x))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_save_and_load_give_identical_outputs(resnet, tmp_path):
    _, integer = resnet
    path = tmp_path / "model.qp"
    integer.save(path)
    loaded = qp.load(path)
    x = image_batches(11, count=1, n=8)[0]
    assert torch.equal(loaded(x), integer(x))
    assert loaded.target.name == integer.target.name


def test_quantize_run_dequantize_equals_call(mlp):
    _, integer = mlp
    x = vector_batches(12, count=1)[0]
    assert torch.equal(integer.dequantize(integer.run(integer.quantize(x))), integer(x))


def test_eval_before_freeze_equals_the_converted_program():
    torch.manual_seed(3)
    batches = image_batches(3)
    prepared = qp.prepare_qat(ResNetish(), (batches[0],), target="tflite")
    calibrate(prepared, batches, lr=0.02)
    x = image_batches(4, count=1)[0]
    unfrozen = prepared.eval()(x)
    qp.freeze(prepared)
    assert torch.equal(unfrozen, prepared.eval()(x))
    assert_bit_exact(prepared, qp.convert(prepared), x)


def test_freeze_is_idempotent_and_folds_batchnorm():
    torch.manual_seed(4)
    batches = image_batches(5)
    prepared = qp.prepare_qat(ResNetish(), (batches[0],), target="exact")
    calibrate(prepared, batches, lr=0.02)
    qp.freeze(prepared)
    state = {k: v.clone() for k, v in prepared.state_dict().items()}
    qp.freeze(prepared)
    assert state.keys() == prepared.state_dict().keys()
    assert all(torch.equal(v, prepared.state_dict()[k]) for k, v in state.items())
    assert all(layer.batch_norm is None for layer in prepared.layers.values())
    assert not any("running_mean" in k for k in state)


def test_frozen_model_keeps_training_on_fixed_qparams():
    torch.manual_seed(5)
    batches = vector_batches(6)
    prepared = qp.prepare_qat(CatMLP(), (batches[0],), target="onnxruntime")
    calibrate(prepared, batches, lr=0.02)
    qp.freeze(prepared)
    scales = [o.frozen_scale.clone() for o in prepared.observers.values()]
    calibrate(prepared, batches, lr=0.05)
    assert all(torch.equal(a, o.frozen_scale) for a, o in zip(scales, prepared.observers.values()))
    assert_bit_exact(prepared, qp.convert(prepared), batches[0])


def test_training_reduces_the_loss_through_straight_through_gradients():
    torch.manual_seed(6)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(64, 20, generator=g)
    y = (x[:, :5].sum(1) > 0).long() + 2 * (x[:, 5] > 0).long()
    prepared = qp.prepare_qat(CatMLP(), (x,), target="tflite").train()
    optimizer = torch.optim.Adam(prepared.parameters(), lr=0.01)
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(prepared(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < 0.6 * losses[0]
    assert all(p.grad is not None for p in prepared.parameters() if p.requires_grad)


def test_integer_model_is_usable_from_several_threads(resnet):
    _, integer = resnet
    x = image_batches(13, count=1, n=4)[0]
    expected = integer(x)
    results = []
    threads = [threading.Thread(target=lambda: results.append(integer(x))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, expected) for r in results)


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("value", [0.0, 0.7, -3.0])
def test_constant_input_gives_a_valid_grid_not_scale_zero(target, value):
    # An all-zero input gets the smallest scale; a bias could not be represented at s_in * s_w that small.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=value != 0.0), torch.nn.ReLU())
    x = torch.full((2, 1, 3, 3), value)
    prepared, integer = prepare_and_convert(model, (x,), target, [x, x])
    assert float(integer.input_qparams[0].scale) > 0
    assert_bit_exact(prepared, integer, x)
    assert_bit_exact(prepared, integer, torch.randn(2, 1, 3, 3))


def test_calibrate_sets_ranges_without_touching_batchnorm():
    torch.manual_seed(8)
    batches = image_batches(14)
    prepared = qp.prepare_qat(ResNetish(), (batches[0],), target="tflite")
    before = {k: v.clone() for k, v in prepared.state_dict().items() if "running" in k}
    qp.calibrate(prepared, batches)
    after = prepared.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    assert all(o.calibrated for o in prepared.observers.values())
    assert not prepared.training
    assert_bit_exact(prepared, qp.convert(qp.freeze(prepared)), batches[0])


class ShapeDerivedPool(torch.nn.Module):
    """A pool whose kernel is computed from the input's shape inside forward (a common global-pool idiom)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return torch.nn.functional.max_pool2d(y, y.shape[-1]).flatten(1) + torch.nn.functional.avg_pool2d(
            y, (y.size(2), y.size(3))).flatten(1)


@pytest.mark.parametrize("target", ["exact", "tflite", "onnxruntime"])
def test_pool_kernel_computed_from_the_shape_is_a_captured_constant(target):
    x = torch.randn(4, 2, 6, 6)
    prepared, integer = prepare_and_convert(ShapeDerivedPool(), (x,), target, [x, x * 2])
    assert_bit_exact(prepared, integer, torch.randn(3, 2, 6, 6))
