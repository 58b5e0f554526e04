"""The fused straight-through output (one autograd node saving bool masks) differentiates exactly like the
unfused chain it replaces: torch.ao-style clamp(real, bounds) (gradient 1 on the bounds), then
clamp(c / scale + zero_point, lo, hi) with the gradient recomputed from the saved float values."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

import qparity as qp
from qparity.bench import ResNetish
from qparity.ops import program
from qparity.ops.surrogates import _InclusiveClamp, _QuantizedOutput, clamped, quantized_output


class ReferenceClamp(_InclusiveClamp):
    """The unfused chain's clamp (gradient 1 on [lo, hi], bounds included): _InclusiveClamp's backward before
    it multiplied by float factors, the bool mask itself."""

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        inside = torch.ones_like(x, dtype=torch.bool)
        if lo is not None:
            inside &= x >= lo
        if hi is not None:
            inside &= x <= hi
        return grad * inside, None, None


class ReferenceOutput(torch.autograd.Function):
    """The unfused chain's output: saves the clamped float values, recomputes the grid mask in backward."""

    @staticmethod
    def forward(ctx, codes, real, scale, zero_point, lo, hi):
        ctx.save_for_backward(real)
        ctx.constants = (scale, zero_point, lo, hi)
        return codes.to(torch.float32)

    @staticmethod
    def backward(ctx, grad):
        (real,) = ctx.saved_tensors
        scale, zero_point, lo, hi = ctx.constants
        position = real / scale + zero_point
        inside = (position >= lo) & (position <= hi)
        return None, grad * inside / scale, None, None, None, None


def reference_output(codes, real, scale, zero_point, lo, hi, bounds=(None, None), clamped_real=None, position=None):
    """The unfused chain, recomputing every mask from `real` itself (a caller's clamped_real and position unused)."""
    if not real.requires_grad:
        return codes.to(torch.float32)
    if bounds != (None, None):
        real = ReferenceClamp.apply(real, *bounds)
    return ReferenceOutput.apply(codes, real, scale, zero_point, lo, hi)


def assert_same_gradients(real, grad, scale, zero_point, lo, hi, bounds):
    codes = torch.randint(lo, hi + 1, real.shape).to(torch.float32)
    results = []
    for output in (quantized_output, reference_output):
        leaf = real.clone().requires_grad_(True)
        value = output(codes, leaf, scale, zero_point, lo, hi, bounds)
        value.backward(grad)
        results.append((value.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    fused, unfused = results[0][1], results[1][1]
    assert torch.equal(fused.isnan(), unfused.isnan())
    assert torch.equal(torch.nan_to_num(fused), torch.nan_to_num(unfused))
    assert torch.equal(fused.signbit(), unfused.signbit())


finite = st.floats(-1e4, 1e4, width=32)


@given(st.lists(finite, min_size=1, max_size=64), st.floats(2.0**-20, 8.0, width=32), st.integers(-128, 127),
       st.sampled_from([(-128, 127), (0, 255), (-20, 90), (5, 5)]),
       st.sampled_from([(None, None), (0.0, None), (0.0, 6.0), (None, 1.5), (-2.0, 2.0)]),
       st.integers(0, 2**31))
def test_fused_output_gradient_equals_the_unfused_chain(values, scale, zero_point, grid, bounds, seed):
    torch.manual_seed(seed)
    real = torch.tensor(values, dtype=torch.float32)
    grad = torch.randn(real.shape) * torch.tensor([1.0, -1.0, 1e30, 0.0])[torch.randint(0, 4, real.shape)]
    lo, hi = grid
    assert_same_gradients(real, grad, scale, float(zero_point), lo, hi, bounds)


@pytest.mark.parametrize("bounds", [(None, None), (0.0, None), (0.0, 6.0)])
def test_fused_output_gradient_on_the_bounds_and_at_grid_edges_equals_the_unfused_chain(bounds):
    scale, zero_point, lo, hi = 0.05, -3.0, -128, 127
    edges = [(lo - zero_point) * scale, (hi - zero_point) * scale, 0.0, 6.0, -0.0]
    nudged = [torch.nextafter(torch.tensor(e), torch.tensor(d)).item() for e in edges for d in (-1e9, 1e9)]
    real = torch.tensor(edges + nudged, dtype=torch.float32)
    grad = torch.tensor([1.0, -2.0, float("inf"), -0.0, 3e38] * 3)[:real.numel()]
    assert_same_gradients(real, grad, scale, zero_point, lo, hi, bounds)


@pytest.mark.parametrize("target", ["x86", "tflite", "xnnpack"])
def test_training_step_gradients_equal_the_unfused_chain(target, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    y = torch.randint(0, 10, (4,))
    base = qp.prepare_qat(ResNetish((8, 16), in_channels=3), (x,), target=target).train()
    qp.calibrate(base, [x]).train()
    grads = []
    for output in (quantized_output, reference_output):
        model = copy.deepcopy(base)
        monkeypatch.setattr(program, "quantized_output", output)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


class BoolMaskOutput(_QuantizedOutput):
    """_QuantizedOutput's backward before mask_factors: the saved bool masks as multiply operands themselves."""

    @staticmethod
    def backward(ctx, grad):
        inside_grid, inside_clamp = ctx.saved_tensors
        grad_real = torch.mul(grad, inside_grid).div_(ctx.scale)
        if inside_clamp is not None:
            grad_real.mul_(inside_clamp)
        return None, grad_real, None, None, None, None, None, None, None


def laid_out(x, layout):
    """x (4-D) contiguous, channels-last, transposed, a gapped slice, or expanded along the batch (stride 0)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        return x.transpose(1, 3).contiguous().transpose(1, 3)
    if layout == "sliced":
        return torch.cat([x, x], dim=3)[..., ::2]
    if layout == "expanded":
        return x[:1].expand_as(x)
    return x


def backward_of(output, real, grad, scale, zero_point, lo, hi, bounds):
    leaf = real.clone().requires_grad_(True)
    codes = torch.zeros(real.shape)
    output.apply(codes, leaf, clamped(leaf, bounds), scale, zero_point, lo, hi, bounds, None).backward(grad)
    return leaf.grad


special = st.sampled_from([0.0, -0.0, 1.0, -3.5, 1e30, -3e38, float("inf"), float("-inf"), float("nan"), 1e-40])
layouts = st.sampled_from(["contiguous", "channels_last", "transposed", "sliced", "expanded"])


@given(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)),
       layouts, layouts, st.lists(st.floats(-300.0, 300.0, width=32) | special, min_size=108, max_size=108),
       st.lists(st.floats(-1e4, 1e4, width=32) | special, min_size=108, max_size=108),
       st.sampled_from([2.0**-126, 1e-30, 2.0**-20, 0.05, 1.0, 8.0]), st.integers(-128, 127),
       st.sampled_from([(-128, 127), (0, 255), (5, 5)]),
       st.sampled_from([(None, None), (0.0, None), (0.0, 6.0), (None, 1.5)]))
def test_backward_through_mask_factors_equals_multiplying_by_the_bool_masks(
        shape, real_layout, grad_layout, reals, grads, scale, zero_point, grid, bounds):
    """Every gradient bit (NaN payloads, signed zeros, overflow to infinity) and the gradient's strides, for
    masks and upstream gradients of every memory layout (the fast path and the fallback)."""
    n = torch.Size(shape).numel()
    real = laid_out(torch.tensor(reals[:n], dtype=torch.float32).reshape(shape), real_layout)
    grad = laid_out(torch.tensor(grads[:n], dtype=torch.float32).reshape(shape), grad_layout)
    lo, hi = grid
    fast, plain = (backward_of(output, real, grad, scale, float(zero_point), lo, hi, bounds)
                   for output in (_QuantizedOutput, BoolMaskOutput))
    assert fast.stride() == plain.stride()
    assert torch.equal(fast.view(torch.int32), plain.view(torch.int32))


@pytest.mark.parametrize("target", ["x86", "tflite", "xnnpack", "exact"])
def test_training_steps_through_mask_factors_and_clamp_masks_equal_the_comparisons_and_bool_masks(target, monkeypatch):
    from qparity.ops import surrogates
    from test_training_fast_paths import assert_same_steps, training_steps

    torch.manual_seed(2)
    x = torch.randn(4, 3, 16, 16) * 2
    y = torch.randint(0, 10, (4,))
    base = qp.prepare_qat(ResNetish((8, 16), in_channels=3), (x,), target=target).train()
    records = [training_steps(copy.deepcopy(base), x, y, steps=3)]
    monkeypatch.setattr(surrogates, "_QuantizedOutput", BoolMaskOutput)
    monkeypatch.setattr(surrogates, "inside_bounds", inside_bounds_by_comparisons)
    monkeypatch.setattr(surrogates, "_InclusiveClamp", ReferenceClamp)
    records.append(training_steps(copy.deepcopy(base), x, y, steps=3))
    assert_same_steps(*records)


def inside_bounds_by_comparisons(x, lo, hi):
    """surrogates.inside_bounds before clamp_keeps: the two comparisons and their `and`."""
    if lo is None and hi is None:
        return None
    if lo is None:
        return x <= hi
    inside = x >= lo
    return inside if hi is None else inside.logical_and_(x <= hi)


bound_values = st.sampled_from([None, -128.0, -3.5, -0.0, 0.0, 5.0, 6.0, 127.0, 255.0, float("inf"), float("-inf"),
                                float("nan")])


@given(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)), layouts,
       st.lists(st.floats(-300.0, 300.0, width=32) | special | st.sampled_from([-128.0, 127.0, 5.0, 6.0]),
                min_size=108, max_size=108),
       bound_values, bound_values, st.sampled_from([torch.float32, torch.float64]))
def test_inside_bounds_equals_the_two_comparisons(shape, layout, values, lo, hi, dtype):
    """Every element (NaN, infinities, signed zeros, values on the bounds), equal, inverted and NaN bounds, and the
    mask's strides, which the backward's fast path compares with the gradient's."""
    from qparity.ops.surrogates import inside_bounds

    n = torch.Size(shape).numel()
    x = laid_out(torch.tensor(values[:n], dtype=dtype).reshape(shape), layout)
    fast, plain = inside_bounds(x, lo, hi), inside_bounds_by_comparisons(x, lo, hi)
    if plain is None:
        assert fast is None
        return
    assert fast.dtype == plain.dtype == torch.bool
    assert fast.stride() == plain.stride()
    assert torch.equal(fast, plain)


@given(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3)), layouts, layouts,
       st.lists(st.floats(-300.0, 300.0, width=32) | special | st.sampled_from([-128.0, 127.0, 5.0, 6.0]),
                min_size=108, max_size=108),
       st.lists(st.floats(-1e4, 1e4, width=32) | special, min_size=108, max_size=108), bound_values, bound_values)
def test_inclusive_clamp_gradient_equals_multiplying_by_the_bool_mask(shape, x_layout, grad_layout, values, grads,
                                                                       lo, hi):
    """_InclusiveClamp's backward through float factors: every gradient bit and its strides, for every layout of
    the input and the upstream gradient, one or two bounds, equal, inverted and NaN bounds."""
    if lo is None and hi is None:
        return  # surrogates.clamp returns x itself
    n = torch.Size(shape).numel()
    x = laid_out(torch.tensor(values[:n], dtype=torch.float32).reshape(shape), x_layout)
    grad = laid_out(torch.tensor(grads[:n], dtype=torch.float32).reshape(shape), grad_layout)
    results = []
    for function in (_InclusiveClamp, ReferenceClamp):
        leaf = x.detach().clone().requires_grad_(True)  # clone keeps a dense layout's strides
        output = function.apply(leaf, lo, hi)
        output.backward(grad)
        results.append((output.detach(), leaf.grad))
    (fast_out, fast), (plain_out, plain) = results
    assert torch.equal(fast_out.nan_to_num(), plain_out.nan_to_num())
    assert fast.stride() == plain.stride()
    assert torch.equal(fast.view(torch.int32), plain.view(torch.int32))


def second_order(model, x, y):
    """The parameter gradients with create_graph=True (their backward runs with gradients on), then the gradients
    of a gradient penalty: what a second-order method or a gradient penalty takes."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    sum((g * g).sum() for g in grads if g is not None).backward()
    return {n: (None if g is None else g.detach(), p.grad) for n, g, p in zip(names, grads, params)}


@pytest.mark.parametrize("target", ["tflite", "x86"])
def test_second_order_gradients_through_the_fast_masks_equal_the_bool_masks(target, monkeypatch):
    from qparity.ops import surrogates

    torch.manual_seed(3)
    x = torch.randn(2, 3, 8, 8) * 2
    y = torch.randint(0, 10, (2,))
    base = qp.prepare_qat(ResNetish((8, 16), in_channels=3), (x,), target=target).train()
    fast = second_order(copy.deepcopy(base), x, y)
    monkeypatch.setattr(surrogates, "_QuantizedOutput", BoolMaskOutput)
    monkeypatch.setattr(surrogates, "inside_bounds", inside_bounds_by_comparisons)
    monkeypatch.setattr(surrogates, "_InclusiveClamp", ReferenceClamp)
    plain = second_order(copy.deepcopy(base), x, y)
    assert fast.keys() == plain.keys()
    for name, values in fast.items():
        for a, b in zip(values, plain[name]):
            assert (a is None) == (b is None), name
            assert a is None or torch.equal(a, b), name
