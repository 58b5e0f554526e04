"""numerics/executorch_portable.py against ExecuTorch's own portable kernels (executorch 1.5.1): programs of a
single operator lowered with no partitioner, so every node runs in ExecuTorch's portable and quantized kernels,
and compared with torch.equal, float bits and codes."""
import warnings

import torch
import torch.nn.functional as F
from helpers import require_optional_runtime
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from qparity.numerics import executorch_portable as portable
from qparity.numerics.pooling import max_pool2d
from qparity.qparams import QParams

RUNTIME_EXAMPLES = settings(max_examples=12, deadline=None, phases=[Phase.generate])  # each example lowers one


class _Program(torch.nn.Module):
    def __init__(self, forward):
        super().__init__()
        self.body = forward

    def forward(self, x):
        return self.body(x)


def run_portable(forward, x: torch.Tensor) -> torch.Tensor:
    """`forward(x)` as an ExecuTorch program run in the runtime, no delegate."""
    require_optional_runtime("executorch", "executorch")
    import executorch.kernels.quantized  # noqa: F401  the out variants of quantized_decomposed's Q/DQ
    from executorch.exir import to_edge
    from executorch.runtime import Runtime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = to_edge(torch.export.export(_Program(forward), (x,))).to_executorch()
    return Runtime.get().load_program(program.buffer).load_method("forward").execute([x])[0]


def _dequantized(q, qp):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  registers quantized_decomposed

    return torch.ops.quantized_decomposed.dequantize_per_tensor.default(q, float(qp.scale), int(qp.zero_point),
                                                                        -128, 127, torch.int8)


def _quantized(y, qp):
    return torch.ops.quantized_decomposed.quantize_per_tensor.default(y, float(qp.scale), int(qp.zero_point),
                                                                      -128, 127, torch.int8)


@st.composite
def reductions(draw):
    """(shape, dims, keepdim): 1-4 dims, any subset of them reduced (the empty list: all of them)."""
    shape = tuple(draw(st.lists(st.integers(1, 24), min_size=1, max_size=4)))
    dims = draw(st.lists(st.integers(-len(shape), len(shape) - 1), max_size=len(shape),
                         unique_by=lambda d: d % len(shape)))
    return shape, tuple(dims), draw(st.booleans())


grids = st.builds(lambda scale, zero_point: QParams(scale, zero_point), st.floats(1e-3, 2.0), st.integers(-128, 127))


@RUNTIME_EXAMPLES
@given(reductions(), st.integers(0, 2**31 - 1))
def test_portable_mean_equals_executorchs_float_kernel_bit_for_bit(reduction, seed):
    shape, dims, keepdim = reduction
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 4
    real = run_portable(lambda v: torch.mean(v, list(dims), keepdim=keepdim), x)
    assert torch.equal(portable.mean(x, dims, keepdim), real)


@RUNTIME_EXAMPLES
@given(reductions(), grids, grids, st.integers(0, 2**31 - 1))
def test_portable_mean_codes_equal_executorchs_qdq_kernels(reduction, source, out, seed):
    shape, dims, keepdim = reduction
    q = torch.randint(-128, 128, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    real = run_portable(lambda v: _quantized(torch.mean(_dequantized(v, source), list(dims), keepdim=keepdim), out), q)
    assert torch.equal(portable.mean_codes(q, source, out, dims, keepdim), real.to(torch.int64))


def test_the_kernels_summation_order_is_what_moves_the_float_mean():
    """The claim the emulation exists for: PyTorch's own mean (vectorized partial sums) rounds differently."""
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    real = run_portable(lambda v: torch.mean(v, [2, 3]), x)
    assert torch.equal(portable.mean(x, (2, 3), False), real)
    assert not torch.equal(torch.mean(x, (2, 3)), real)


@RUNTIME_EXAMPLES
@given(grids, st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_portable_max_pool_codes_are_the_maximum_of_the_codes(grid, extra_stride, seed):
    """A max pool XNNPACK's partitioner leaves outside (stride above the kernel) runs in ExecuTorch between a
    DEQUANTIZE and a QUANTIZE on its input's grid: the same codes as the delegate's maximum of codes."""
    q = torch.randint(-128, 128, (2, 3, 11, 9), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    attrs = {"kernel_size": [2, 2], "stride": [2 + extra_stride, 2 + extra_stride], "padding": [0, 0],
             "dilation": [1, 1], "ceil_mode": False}
    real = run_portable(lambda v: _quantized(F.max_pool2d(_dequantized(v, grid), 2, 2 + extra_stride), grid), q)
    assert torch.equal(max_pool2d(q, attrs).to(torch.int64), real.to(torch.int64))


@settings(max_examples=200, deadline=None)
@given(grids)
def test_quantize_maps_every_dequantized_code_back_to_itself(grid):
    codes = torch.arange(-128, 128)
    assert torch.equal(portable.quantize(portable.dequantize(codes, grid), grid), codes)

