"""The training step's fast paths compute what their plain formulations (kept here as the oracles) compute:
the same values, bit for bit, whatever the memory format, grid and values (signed zeros included)."""
import torch
from hypothesis import given, strategies as st

from qparity.layout import flat_view, memory_order
from qparity.qat.observers import ActivationObserver

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
