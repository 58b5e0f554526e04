"""The training step's fast paths compute what their plain formulations (kept here as the oracles) compute:
the same values, bit for bit, whatever the memory format, grid and values (signed zeros included)."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

import qparity as qp
from qparity.bench import ResNetish
from qparity.numerics import TARGETS, get_target
from qparity.ops import program
from qparity.numerics.layout import flat_view, memory_order
from qparity.errors import InvalidQParamsError
from qparity.qat.observers import ActivationObserver
from qparity.qparams import QParams

values = st.sampled_from([0.0, -0.0, 1.5, -2.25, 3e-39, -7.0, 1e30])


def laid_out(flat, shape, layout):
    """A tensor of `shape` filled from `flat`, contiguous, channels-last, transposed or a gapped slice."""
    x = torch.tensor(flat, dtype=torch.float32)[:torch.Size(shape).numel()].reshape(shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(1, 3).contiguous().transpose(1, 3)
    if layout == "sliced":
        return torch.cat([x, x], dim=3)[..., ::2]
    return x


shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3))
layouts = st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])


@given(shapes, layouts, st.lists(values, min_size=108, max_size=108))
def test_flat_view_holds_every_element_once(shape, layout, flat):
    x = laid_out(flat, shape, layout)
    assert torch.equal(flat_view(x).sort().values, x.reshape(-1).sort().values)
    permuted, order = memory_order(x)
    if permuted is not None:
        assert flat_view(x).data_ptr() == x.data_ptr()  # a view, no copy
        assert torch.equal(permuted, x.permute(order))


@given(shapes, layouts, st.lists(values, min_size=108, max_size=108), st.sampled_from(["int8", "uint8"]))
def test_observer_range_in_memory_order_equals_aminmax_of_the_tensor(shape, layout, flat, dtype):
    x = laid_out(flat, shape, layout)
    observer = ActivationObserver(dtype, "test").train()
    observer.observe(x)
    observer.observe(x * 0.5)
    reference = ActivationObserver(dtype, "reference").train()
    for batch in (x, x * 0.5):  # the plain formulation: aminmax of the tensor as given
        low, high = torch.aminmax(batch)
        if not reference.calibrated:
            reference.min_val.copy_(low)
            reference.max_val.copy_(high)
        else:
            reference.min_val.add_(reference.averaging_constant * (low - reference.min_val))
            reference.max_val.add_(reference.averaging_constant * (high - reference.max_val))
    assert torch.equal(observer.min_val, reference.min_val) and torch.equal(observer.max_val, reference.max_val)
    assert observer.qparams().same_grid(reference.qparams())


def training_steps(model, x, y, steps: int = 2):
    """Outputs, parameter gradients and observer ranges of a few SGD steps (the state each step leaves)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    record = []
    for _ in range(steps):
        output = model(x)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(output, y).backward()
        record.append((output.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()},
                       {n: (o.min_val.clone(), o.max_val.clone()) for n, o in model.observers.items()}))
        optimizer.step()
    return record


def assert_same_steps(fast, plain):
    for (out_a, grads_a, ranges_a), (out_b, grads_b, ranges_b) in zip(fast, plain):
        assert torch.equal(out_a, out_b)
        assert grads_a.keys() == grads_b.keys()
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name
        for name in ranges_a:
            assert torch.equal(ranges_a[name][0], ranges_b[name][0]) and torch.equal(ranges_a[name][1], ranges_b[name][1])


@pytest.mark.parametrize("target", TARGETS)
def test_training_steps_with_the_prepared_models_tables_equal_the_targets_own_functions(target, monkeypatch):
    """The float32 tables the prepared model looks its adds up in (rebuilt each step, as the grids move) give the
    outputs, gradients and observer ranges of calling the target's add on every element."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)  # 8 x 16 x 32 x 32 codes: enough for a table of 256 x 256 entries
    y = torch.randint(0, 10, (8,))
    base = qp.prepare_qat(ResNetish((16, 32), in_channels=3), (x,), target=target).train()
    fast = copy.deepcopy(base)
    records = [training_steps(fast, x, y)]
    plain = copy.deepcopy(base)
    monkeypatch.setattr(program, "table_entries", lambda kind, grids: None)
    records.append(training_steps(plain, x, y))
    assert not plain.fake_tables
    assert fast.fake_tables or not get_target(target).elementwise_add((8, 16, 32, 32), (8, 16, 32, 32))
    assert_same_steps(*records)


scalar_scales = st.sampled_from([0.02, 1.0, 3e-39, 1.2e-38, 1e-45, 0.0, -0.5, float("nan"), float("inf"), 1e39, 3.4e38,
                                 1.1920929e-07, 2.0**-126, 0.1])
scalar_zero_points = st.sampled_from([0, -128, 127, 128, 255, -129, 3.0, -0.0, 2.5, float("nan"), float("inf"), 1e20])


def qparams_or_error(scale, zero_point, dtype):
    try:
        qp = QParams(scale, zero_point, dtype)
    except InvalidQParamsError as error:
        return str(error)
    return qp.scale, qp.zero_point


@given(scalar_scales, scalar_zero_points, st.sampled_from([torch.float32, torch.float64, torch.float16]),
       st.sampled_from([torch.float32, torch.int64, torch.int32]), st.sampled_from(["int8", "uint8", "int16"]))
def test_qparams_from_scalar_tensors_equal_the_general_checks(scale, zero_point, scale_dtype, zero_point_dtype,
                                                              dtype):
    """0-dim CPU tensors (every observer's grid, each step) are checked on Python numbers: the same float32 scale
    and int64 zero point as the tensor checks give, and where those refuse, the same refusal."""
    if not zero_point_dtype.is_floating_point and (zero_point != zero_point or abs(zero_point) == float("inf")
                                                   or zero_point != int(zero_point) or abs(zero_point) > 2**31 - 1):
        return  # not an integer tensor's value
    scale_tensor = torch.tensor(scale, dtype=scale_dtype)
    zero_point_tensor = torch.tensor(zero_point, dtype=zero_point_dtype)
    fast = qparams_or_error(scale_tensor, zero_point_tensor, dtype)
    taken = QParams._scalar_tensors_taken
    QParams._scalar_tensors_taken = lambda self: False
    try:
        general = qparams_or_error(scale_tensor, zero_point_tensor, dtype)
    finally:
        QParams._scalar_tensors_taken = taken
    if isinstance(general, str):
        assert fast == general
        return
    assert not isinstance(fast, str), fast
    for mine, theirs in zip(fast, general):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)
    assert fast[0].data_ptr() != scale_tensor.data_ptr()  # a fresh scale, never the caller's tensor


special = st.sampled_from([0.0, -0.0, 1e-45, -3e-39, 0.49999997, 0.5, 2.5, -127.5, 1e30, -3.4e38, float("inf"),
                           float("nan"), 1234.5678])


@given(st.lists(st.one_of(special, st.floats(-1e6, 1e6, width=32)), min_size=1, max_size=300),
       st.floats(2.0**-126, 1e4, width=32), st.integers(-128, 255))
def test_quotient_by_the_python_scale_equals_the_quotient_by_the_scale_tensor(values, scale, zero_point):
    """The batch-norm layer's codes divided by the grid's float32 scale tensor, the straight-through mask by
    float(scale): one float32 division either way, so one quotient now serves both (every element, vector and
    scalar loops: up to 300 elements)."""
    c = torch.tensor(values, dtype=torch.float32)
    by_tensor = c / torch.tensor(scale, dtype=torch.float32)
    by_number = torch.div(c, float(torch.tensor(scale, dtype=torch.float32)))
    assert torch.equal(by_tensor.isnan(), by_number.isnan())
    assert torch.equal(by_tensor.nan_to_num(), by_number.nan_to_num())
    assert torch.equal(by_tensor.signbit(), by_number.signbit())
    assert torch.equal(torch.add(by_number, float(zero_point)).nan_to_num(),
                       torch.div(c, float(scale)).add_(float(zero_point)).nan_to_num())


def batch_norm_training_before(ctx, node, layer, x):
    """ops/layer.py's _batch_norm_training before the shared quotient: the oracle."""
    from qparity.graph import fused_clamp_bounds
    from qparity.ops.layer import _channel, bias_scale, layer_accumulator, plan_layer
    from qparity.ops.surrogates import clamped

    weight, _ = layer.folded()
    weight_scale = layer.weight_scale(weight)
    weight_codes = layer.weight_codes(weight, weight_scale)
    plan = plan_layer(layer.geometry, weight_codes, None, x.qparams, ctx.target)
    acc = layer_accumulator(plan, layer.geometry, x.codes, x.qparams, weight_codes, None)
    factor = layer.batch_norm_factor()
    unfolded = acc.to(torch.float32) * _channel(bias_scale(x.qparams, weight_scale) / factor, layer.geometry, acc)
    if layer.module.bias is not None:
        unfolded = unfolded + _channel(layer.module.bias, layer.geometry, acc)
    real = layer.normalize(unfolded)
    bounds = node.attrs.get("clamp") or (None, None)
    clamped_real = clamped(real, bounds)
    qp = ctx.mode.observe(node, clamped_real)
    lo, hi = fused_clamp_bounds(ctx.target, node, qp)
    codes = (clamped_real / qp.scale.to(real.device)).round_().add_(float(qp.zero_point)).clamp_(lo, hi)
    return ctx.emit(codes, real, qp, lo, hi, bounds, clamped_real)


@pytest.mark.parametrize("target", ["exact", "tflite", "x86", "onnxruntime"])
def test_training_steps_through_batch_norm_layers_equal_the_formulation_before(target, monkeypatch):
    from qparity.ops import layer as layer_op

    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16) * 3
    y = torch.randint(0, 10, (4,))
    base = qp.prepare_qat(ResNetish((8, 16), in_channels=3), (x,), target=target).train()
    records = [training_steps(copy.deepcopy(base), x, y, steps=3)]
    monkeypatch.setattr(layer_op, "_batch_norm_training", batch_norm_training_before)
    records.append(training_steps(copy.deepcopy(base), x, y, steps=3))
    assert_same_steps(*records)


@pytest.mark.parametrize("target", ["fbgemm", "x86", "qnnpack"])
def test_training_steps_with_float32_codes_into_the_engines_add_equal_int64_codes(target, monkeypatch):
    """PyTorch's engines' add takes the prepared model's float32 codes as they are (no int64 codes around its
    table): the outputs, gradients and observer ranges of converting them to int64 first."""
    from qparity.numerics.pytorch_engines import PyTorchEngineTarget

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)  # 8 x 16 x 32 x 32 codes: the engines' add tables answer
    y = torch.randint(0, 10, (8,))
    base = qp.prepare_qat(ResNetish((16, 32), in_channels=3), (x,), target=target).train()
    records = [training_steps(copy.deepcopy(base), x, y)]
    monkeypatch.setattr(PyTorchEngineTarget, "add_takes_float_codes", False)
    records.append(training_steps(copy.deepcopy(base), x, y))
    assert_same_steps(*records)
