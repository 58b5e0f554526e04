"""Elementwise activations (sigmoid, tanh, hardsigmoid, leaky_relu, hardswish, gelu, elu): fake == integer on every
code for every target that runs them, the exported file's runtime gives the same codes, and the targets that
cannot run one refuse it at prepare_qat."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qparity as qp
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes
from qparity.errors import UnsupportedOpError
from qparity.numerics import get_target
from qparity.numerics.activations import exact_table
from qparity.ops.registry import OPERATORS

ACTIVATIONS = {"sigmoid": lambda: nn.Sigmoid(), "tanh": lambda: nn.Tanh(), "hardsigmoid": lambda: nn.Hardsigmoid(),
               "leaky_relu": lambda: nn.LeakyReLU(0.15), "hardswish": lambda: nn.Hardswish(), "gelu": lambda: nn.GELU(),
               "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "elu": lambda: nn.ELU()}
OPERATOR_OF = {"gelu_tanh": "gelu"}  # cases that are another form of a registered operator
PAIRS = [(op, target) for op in ACTIVATIONS for target in qp.TARGETS]


def every_code_input(scale: float, offset: float, n: int = 600) -> torch.Tensor:
    """Inputs spanning the calibrated range and beyond, so every input code (and the clamp) is used."""
    return torch.linspace(-1.4, 1.4, n).reshape(n, 1) * scale + offset


def convert_activation(op: str, target: str, scale: float, offset: float):
    """A one-activation model calibrated on [offset - scale, offset + scale], and inputs that hit every input code
    of its grid (the grid always spans 0 too) and go beyond it."""
    model = nn.Sequential(ACTIVATIONS[op]())
    x = every_code_input(scale, offset)
    prepared = qp.prepare_qat(model, (x[:4],), target=target)
    qp.calibrate(prepared, [x / 1.4])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    grid = integer.input_qparams[0]
    every_code = integer.target.dequantize(torch.arange(grid.qmin, grid.qmax + 1), grid).reshape(-1, 1)
    beyond = every_code_input(2 * max(abs(float(every_code.min())), abs(float(every_code.max()))), 0.0, 50)
    return prepared, integer, torch.cat([every_code, beyond])


@pytest.mark.parametrize("op, target", PAIRS)
@settings(max_examples=6, deadline=None)
@given(scale=st.floats(0.05, 12), offset=st.floats(-4, 4))
def test_activation_fake_equals_integer_on_every_code_or_is_refused_at_prepare(op, target, scale, offset):
    name = OPERATOR_OF.get(op, op)
    if target in OPERATORS[name].refused_by:
        runs = ", ".join(OPERATORS[name].targets())
        with pytest.raises(UnsupportedOpError, match=rf"{name} at module '0' cannot run on target '{target}'.*"
                                                     rf"targets that run it: {runs}$"):
            convert_activation(op, target, scale, offset)
        return
    try:
        prepared, integer, x = convert_activation(op, target, scale, offset)
    except UnsupportedOpError as error:  # a grid or form the runtime itself refuses, named as such
        assert (op == "hardswish" and "HARD_SWISH refuses" in str(error)) or (
            op == "gelu_tanh" and target == "executorch-xnnpack" and "computes the erf form" in str(error)), error
        return
    assert torch.equal(prepared.eval()(x), integer(x))
    grid = integer.input_qparams[0]
    assert len(torch.unique(integer.quantize(x))) == grid.qmax - grid.qmin + 1  # every input code was used


@pytest.mark.parametrize("op, target", [(op, t) for op, t in PAIRS if t in FILE_SUFFIXES])
@settings(max_examples=4, deadline=None)
@given(scale=st.floats(0.05, 12), offset=st.floats(-4, 4))
def test_exported_activation_gives_the_integer_models_codes_in_the_real_runtime(tmp_path_factory, op, target,
                                                                                 scale, offset):
    if target in OPERATORS[OPERATOR_OF.get(op, op)].refused_by:
        return  # test above
    try:
        _, integer, x = convert_activation(op, target, scale, offset)
    except UnsupportedOpError:
        return
    assert_runtime_gives_the_same_codes(integer, x, tmp_path_factory.mktemp("act"))


@pytest.mark.parametrize("op", ["sigmoid", "tanh"])
def test_exact_transcendental_tables_are_correctly_rounded(op):
    """The exact target's tables agree with float64 evaluation wherever float64 is far from a tie."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        source = qp.QParams(float(np.float32(10 ** rng.uniform(-2, 0))), int(rng.integers(-128, 128)), "int8")
        out = qp.QParams(float(np.float32(10 ** rng.uniform(-3, -1))), int(rng.integers(-128, 128)), "int8")
        table = exact_table(op, {}, source, out)
        for code, value in zip(range(-128, 128), table.tolist()):
            x = float(Fraction(float(source.scale)) * (code - int(source.zero_point)))
            real = (1 / (1 + math.exp(-x)) if op == "sigmoid" else math.tanh(x)) / float(out.scale)
            if abs(real - math.floor(real) - 0.5) > 1e-6:
                assert value == min(max(round(real) + int(out.zero_point), -128), 127)


def _gelu_elu_oracle(op: str, x: float) -> float:
    if op == "gelu":
        return x / 2 * math.erfc(-x / math.sqrt(2))
    if op == "gelu_tanh":
        return x / 2 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x if x >= 0 else 0.75 * math.expm1(x)


@pytest.mark.parametrize("op", ["gelu", "gelu_tanh", "elu"])
def test_exact_gelu_and_elu_tables_are_correctly_rounded(op):
    """Against float64 wherever it is far from a tie (an independent formula: erfc, tanh, expm1 of the math
    module); the rational and tie cases are checked with Fractions below."""
    attrs = {"alpha": 0.75} if op == "elu" else {"approximate": "tanh" if op == "gelu_tanh" else "none"}
    rng = np.random.default_rng(1)
    for _ in range(12):
        source = qp.QParams(float(np.float32(10 ** rng.uniform(-2, -0.5))), int(rng.integers(-128, 128)), "int8")
        out = qp.QParams(float(np.float32(10 ** rng.uniform(-3, -1))), int(rng.integers(-128, 128)), "int8")
        table = exact_table(OPERATOR_OF.get(op, op), attrs, source, out)
        for code, value in zip(range(-128, 128), table.tolist()):
            x = float(Fraction(float(source.scale)) * (code - int(source.zero_point)))
            real = _gelu_elu_oracle(op, x) / float(out.scale)
            if abs(real - math.floor(real) - 0.5) > 1e-6:
                assert value == min(max(round(real) + int(out.zero_point), -128), 127)


def test_exact_elu_rounds_its_rational_values_half_to_even():
    """elu(x) = x for x >= 0 and 0 for alpha = 0: exact halves round to even, as Fractions do."""
    source, out = qp.QParams(0.0625, 0, "int8"), qp.QParams(0.125, 1, "int8")
    for alpha in (1.0, 0.0):
        table = exact_table("elu", {"alpha": alpha}, source, out)
        for i, code in enumerate(range(-128, 128)):
            x = Fraction(code, 16)
            if x >= 0 or alpha == 0:
                expected = round(max(x, Fraction(0)) * 8) + 1  # x / s_y = code / 2: every odd code is a tie
                assert table[i] == min(max(expected, -128), 127), code
    assert exact_table("gelu", {"approximate": "none"}, source, out)[128] == 1  # gelu(0) = 0 exactly


def test_xnnpack_refuses_elu_with_alpha_other_than_one_at_prepare_naming_the_module():
    with pytest.raises(UnsupportedOpError, match=r"elu at module '0'.*TFLite's ELU operator has no alpha"):
        qp.prepare_qat(nn.Sequential(nn.ELU(0.5)), (torch.randn(4, 3),), target="xnnpack")


def test_exact_piecewise_linear_tables_match_fractions():
    source, out = qp.QParams(0.0625, 3, "int8"), qp.QParams(0.03125, -100, "int8")
    hard = exact_table("hardsigmoid", {}, source, out)
    leaky = exact_table("leaky_relu", {"negative_slope": 0.25}, source, out)
    for i, code in enumerate(range(-128, 128)):
        x = Fraction(1, 16) * (code - 3)
        expected_hard = round(min(max(x + 3, 0), 6) / 6 * 32) - 100
        expected_leaky = round((x if x >= 0 else x / 4) * 32) - 100
        assert hard[i] == min(max(expected_hard, -128), 127)
        assert leaky[i] == min(max(expected_leaky, -128), 127)


@pytest.mark.parametrize("target", ["tflite", "xnnpack"])
def test_litert_targets_use_the_output_grids_tflite_requires(target):
    _, integer, _ = convert_activation("sigmoid", target, 3.0, 0.0)
    (node,) = [n for n in integer.graph.nodes if n.op == "sigmoid"]
    assert (float(integer.qparams[node.name].scale), int(integer.qparams[node.name].zero_point)) == (1 / 256, -128)
    _, integer, _ = convert_activation("tanh", target, 3.0, 0.0)
    (node,) = [n for n in integer.graph.nodes if n.op == "tanh"]
    assert (float(integer.qparams[node.name].scale), int(integer.qparams[node.name].zero_point)) == (1 / 128, 0)


@pytest.mark.parametrize("form", [lambda x: torch.sigmoid(x), lambda x: x.sigmoid(), lambda x: torch.tanh(x),
                                  lambda x: x.tanh(), lambda x: torch.nn.functional.hardsigmoid(x),
                                  lambda x: torch.nn.functional.leaky_relu(x, 0.2),
                                  lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                                  lambda x: torch.nn.functional.elu(x, 0.5)])
def test_functional_forms_are_captured(form):
    class Model(nn.Module):
        def forward(self, x):
            return form(x)

    x = torch.randn(8, 5)
    prepared = qp.prepare_qat(Model(), (x,), target="exact")
    assert prepared.graph.nodes[-1].op in ("sigmoid", "tanh", "hardsigmoid", "leaky_relu", "gelu", "elu")
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    assert torch.equal(prepared.eval()(x), qp.convert(prepared)(x))


def test_activation_gradient_is_the_float_functions():
    x = torch.linspace(-3, 3, 50).reshape(50, 1)
    prepared = qp.prepare_qat(nn.Sequential(nn.Linear(1, 1), nn.Sigmoid()), (x,), target="exact")
    qp.calibrate(prepared, [x])
    prepared.train()
    prepared(x).sum().backward()
    assert next(prepared.parameters()).grad is not None and torch.isfinite(next(prepared.parameters()).grad).all()


ENGINE_PAIRS = [(op, engine) for op in ("sigmoid", "tanh", "hardsigmoid", "leaky_relu")
                for engine in ("fbgemm", "x86", "qnnpack") if engine not in OPERATORS[op].refused_by]


def torch_activation(op, q, out, slope):
    if op == "sigmoid":
        return torch.sigmoid(q)
    if op == "tanh":
        return torch.tanh(q)
    if op == "hardsigmoid":
        return torch.nn.functional.hardsigmoid(q)
    return torch.ops.quantized.leaky_relu(q, slope, False, float(out.scale), int(out.zero_point))


@pytest.mark.parametrize("op, engine", ENGINE_PAIRS)
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), length=st.sampled_from([1, 7, 63, 64, 65, 200, 4100]),
       channels_last=st.booleans(), ties=st.booleans())
def test_engine_activation_matches_pytorchs_quantized_kernel(op, engine, seed, length, channels_last, ties):
    """Every input code, in the vector and the scalar loops (positions), NCHW and channels-last; `ties` makes
    y / s_y exact halves (power-of-two scales, an odd output zero point), where the releases' scalar-loop
    rounding rules differ."""
    import warnings

    warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
    torch.backends.quantized.engine = engine
    rng = np.random.default_rng(seed)
    target = get_target(engine)
    source = qp.QParams(float(np.float32(10 ** rng.uniform(-3, -0.5))), int(rng.integers(0, 256)), "uint8")
    out = target.fixed_output_qparams(op, "uint8") or qp.QParams(float(np.float32(10 ** rng.uniform(-3, -1))),
                                                                  int(rng.integers(0, 256)), "uint8")
    slope = float(np.float32(rng.uniform(-0.5, 0.9)))
    if ties and op == "leaky_relu":
        source = qp.QParams(2.0 ** -int(rng.integers(2, 7)), int(rng.integers(0, 256)), "uint8")
        out = qp.QParams(2 * float(source.scale), int(rng.integers(0, 128)) * 2 + 1, "uint8")
        slope = 0.5
    codes = torch.from_numpy(rng.permutation(np.resize(np.arange(256), max(length, 256))))
    if channels_last:
        codes = codes[:(codes.numel() // 4) * 4].reshape(1, -1, 2, 2).contiguous(memory_format=torch.channels_last)
    quint8 = torch._make_per_tensor_quantized_tensor(codes.contiguous().to(torch.uint8), float(source.scale),
                                                     int(source.zero_point))
    if channels_last:
        quint8 = quint8.contiguous(memory_format=torch.channels_last)
    expected = torch_activation(op, quint8, out, slope)
    assert (float(expected.q_scale()), int(expected.q_zero_point())) == (float(out.scale), int(out.zero_point))
    ours = target.activation(op, codes, source, out, {"negative_slope": slope})
    assert torch.equal(ours, expected.int_repr().to(torch.int64))


@pytest.mark.parametrize("engine", ["fbgemm", "x86", "qnnpack"])
def test_to_torch_runs_the_engine_activations_in_pytorch(engine):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.leaky = nn.LeakyReLU(0.2)
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 16, 1), nn.Hardsigmoid())
            self.extra = nn.Sigmoid() if engine == "qnnpack" else nn.Identity()

        def forward(self, x):
            y = self.leaky(self.conv(x))
            return self.extra(y * self.gate(y))

    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    x = torch.randn(4, 3, 8, 8)
    prepared = qp.prepare_qat(Block(), (x,), target=engine)
    qp.calibrate(prepared, [x, 2 * x])
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    assert torch.equal(qp.to_torch(integer)(x), integer(x))
