"""LayerNorm (last dimension, affine) and RMSNorm as the program of int8 operators LiteRT runs for them: fake ==
integer on every target that runs their operators, LiteRT's reference kernels give the same codes, rsqrt's
tables match LiteRT's RSQRT and the exact rounding, and the other targets refuse them at prepare_qat."""
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import assert_runtime_gives_the_same_codes, require_runtime
from qparity.errors import UnsupportedOpError
from qparity.numerics.rsqrt import exact_rsqrt_table, tflite_rsqrt_table
from qparity.ops.registry import OPERATORS
from qparity.qparams import QParams

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
NORM_TARGETS = sorted(set(OPERATORS["mean"].targets()) & set(OPERATORS["rsqrt"].targets()))


class LinearThenLayerNorm(nn.Module):
    def __init__(self, features, affine=True):
        super().__init__()
        self.fc = nn.Linear(features, features)
        self.norm = nn.LayerNorm(features, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                self.norm.weight.uniform_(0.5, 1.5)
                self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.norm(self.fc(x))


class LinearThenRMSNorm(nn.Module):
    def __init__(self, features):
        super().__init__()
        self.fc = nn.Linear(features, features)
        self.weight = nn.Parameter(torch.rand(features) + 0.5)

    def forward(self, x):
        y = self.fc(x)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


MODELS = {"layer_norm": LinearThenLayerNorm, "rms_norm": LinearThenRMSNorm}


def convert(target, model_name, shape, seed):
    torch.manual_seed(seed)
    x = torch.randn(*shape) * float(np.random.default_rng(seed).uniform(0.3, 5))
    model = MODELS[model_name](shape[-1])
    prepared = qp.prepare_qat(model, (x,), target=target)
    qp.calibrate(prepared, [x, -x])
    qp.freeze(prepared)
    return model, prepared, qp.convert(prepared), x


@pytest.mark.parametrize("target", NORM_TARGETS)
@pytest.mark.parametrize("model_name", sorted(MODELS))
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31), tokens=st.booleans())
def test_norm_fake_equals_integer_and_follows_the_float_norm(target, model_name, seed, tokens):
    model, prepared, integer, x = convert(target, model_name, (3, 5, 12) if tokens else (6, 10), seed)
    fake = prepared.eval()(x)
    assert torch.equal(fake, integer(x))
    # int8 steps on each intermediate grid: the normalized values (|y| up to ~3) stay within a few output steps
    assert float((fake - model(x)).detach().abs().max()) < 0.35


@pytest.mark.parametrize("model_name", sorted(MODELS))
@settings(max_examples=1, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_exported_norm_gives_the_integer_models_codes_in_litert(tmp_path_factory, model_name, seed):
    _, _, integer, x = convert("tflite", model_name, (4, 5, 12), seed)
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("norm"))


def test_layer_norm_without_affine_has_no_parameter_tensors():
    torch.manual_seed(0)
    prepared = qp.prepare_qat(LinearThenLayerNorm(6, affine=False), (torch.randn(2, 6),), target="tflite")
    assert [n.op for n in prepared.graph.nodes][-2:] == ["rsqrt", "mul"]


def test_layer_norm_is_litert_s_program_with_learned_affine_tensors(tmp_path):
    _, prepared, integer, x = convert("tflite", "layer_norm", (4, 6), 0)
    integer.save(tmp_path / "norm.qp")  # the parameter codes convert wrote travel in the .qp file
    assert torch.equal(qp.load(tmp_path / "norm.qp")(x), integer(x))
    assert [n.op for n in prepared.graph.nodes] == ["input", "linear", "mean", "sub", "mul", "mean", "constant", "add",
                                                    "rsqrt", "mul", "parameter", "mul", "parameter", "add"]
    prepared.train()
    prepared(x).sum().backward()
    assert all(t.weight.grad is not None and t.weight.grad.abs().sum() > 0 for t in prepared.tensors.values())


@pytest.mark.parametrize("target", sorted(set(qp.TARGETS) - set(NORM_TARGETS)))
def test_layer_norm_is_refused_at_prepare_naming_the_module_and_the_targets_that_run_it(target):
    with pytest.raises(UnsupportedOpError, match=rf"at module 'norm' cannot run on target '{target}'.*targets that "
                                                 rf"run it: "):
        qp.prepare_qat(LinearThenLayerNorm(6), (torch.randn(2, 6),), target=target)


def _litert_rsqrt(source: QParams, out: QParams) -> torch.Tensor:
    """LiteRT's reference RSQRT run on every int8 code of `source`, in a one-operator file."""
    from qparity.export.tflite import _FlatBuffer

    litert = require_runtime("ai_edge_litert.interpreter")
    fb = _FlatBuffer("tflite")
    x, y = fb.tensor("x", [256], "int8", source), fb.tensor("y", [256], "int8", out)
    fb.operator("RSQRT", [x], [y])
    interpreter = litert.Interpreter(model_content=fb.serialize([x], [y]),
                                     experimental_op_resolver_type=litert.OpResolverType.BUILTIN_REF)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], np.arange(-128, 128, dtype=np.int8))
    interpreter.invoke()
    return torch.from_numpy(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).astype(np.int64))


grids = st.tuples(st.floats(-5, 1), st.floats(-3, 1), st.integers(-128, 127))


@settings(max_examples=60, deadline=None)
@given(grid=grids)
def test_rsqrt_table_is_litert_s_rsqrt_on_every_code(grid):
    source = QParams(float(np.float32(10 ** grid[0])), -128, "int8")
    out = QParams(float(np.float32(10 ** grid[1])), grid[2], "int8")
    assert torch.equal(tflite_rsqrt_table(source, out), _litert_rsqrt(source, out))


@settings(max_examples=30, deadline=None)
@given(grid=grids)
def test_exact_rsqrt_is_correctly_rounded(grid):
    import mpmath

    source = QParams(float(np.float32(10 ** grid[0])), -128, "int8")
    out = QParams(float(np.float32(10 ** grid[1])), grid[2], "int8")
    table = exact_rsqrt_table(source, out)
    s, s_y = Fraction(float(source.scale)), Fraction(float(out.scale))
    with mpmath.workdps(60):
        for code in range(-127, 128, 7):
            quotient = 1 / (mpmath.sqrt(mpmath.mpf((code + 128) * s.numerator) / s.denominator)
                            * mpmath.mpf(s_y.numerator) / s_y.denominator)
            expected = min(127, max(-128, grid[2] + int(mpmath.nint(quotient))))
            assert int(table[code + 128]) == expected
    assert int(table[0]) == 127  # real 0: the top code


def test_rsqrt_refuses_a_grid_holding_negative_values():
    with pytest.raises(UnsupportedOpError, match="rsqrt of a grid with zero point 0"):
        tflite_rsqrt_table(QParams(0.1, 0, "int8"), QParams(0.1, 0, "int8"))
