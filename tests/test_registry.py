"""The operator registry is the one declaration of each operator: every (operator, target) and (operator,
file format) pair it states is checked here against the code that implements it."""
import pathlib

import pytest
import torch
from torch import nn

import qparity as qp
from qparity.errors import UnsupportedOpError
from qparity.export.aimet import FLOAT_OPS, _FloatOnnxBuilder
from qparity.export.onnx import _OnnxBuilder
from qparity.export.pte import QDQProgram
from qparity.export.tflite import _Exporter as TFLiteExporter
from qparity.export.tosa import _Exporter as TosaExporter
from qparity.golden import PARAMETERS
from qparity.ops.registry import FILE_FORMATS, OPERATORS, TARGET_NAMES, ops_markdown
from qparity.ops.program import IMPLEMENTATIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
EMITTERS = {"onnx": _OnnxBuilder, "tflite": TFLiteExporter, "tosa": TosaExporter, "pte": QDQProgram}


def handled(cls) -> set:
    return {name[3:] for name in dir(cls) if name.startswith("op_")}


def test_docs_ops_md_is_generated_from_the_registry():
    assert (ROOT / "docs" / "ops.md").read_text() == ops_markdown(), \
        "docs/ops.md is stale: run `python -m qparity.ops.registry > docs/ops.md`"


def test_the_program_executor_runs_every_registered_operator_in_both_modes():
    """One module per operator runs it for the prepared model and the IntegerModel alike."""
    assert set(IMPLEMENTATIONS) == set(OPERATORS)
    assert all(callable(module.run) for module in IMPLEMENTATIONS.values())


@pytest.mark.parametrize("file_format", FILE_FORMATS)
def test_each_emitter_writes_exactly_the_operators_the_registry_gives_its_format(file_format):
    declared = {name for name, op in OPERATORS.items() if file_format in op.formats}
    assert handled(EMITTERS[file_format]) == declared


def test_the_aimet_export_writes_a_float_form_for_exactly_the_operators_the_registry_says():
    declared = {name for name, op in OPERATORS.items() if op.aimet}
    assert set(FLOAT_OPS) == declared and declared <= handled(_FloatOnnxBuilder)
    # An emitter inherited from the QOperator builder moves codes; on floats it is only right for operators that
    # keep their input's grid (layout, max, dropout), never for one that computes a new grid.
    inherited = declared - {name[3:] for name in vars(_FloatOnnxBuilder) if name.startswith("op_")}
    assert inherited and not any(OPERATORS[name].new_grid for name in inherited), inherited


def test_golden_writes_parameters_for_exactly_the_operators_the_registry_says():
    assert set(PARAMETERS) == {name for name, op in OPERATORS.items() if op.golden}


def test_refusals_name_only_known_targets():
    for op in OPERATORS.values():
        assert set(op.refused_by) <= set(TARGET_NAMES), op.name


class Hardswish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.Hardswish()

    def forward(self, x):
        return self.act(self.conv(x))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Conv2d(101, 101, 3, groups=101)

    def forward(self, x):
        return self.wide(x)


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_hardswish_runs_exactly_where_the_registry_says_and_is_refused_at_prepare_elsewhere(target):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    if target in OPERATORS["hardswish"].refused_by:
        runs = ", ".join(OPERATORS["hardswish"].targets())
        with pytest.raises(UnsupportedOpError, match=rf"hardswish at module 'act' cannot run on target "
                                                     rf"'{target}'.*targets that run it: {runs}"):
            qp.prepare_qat(Hardswish(), (x,), target=target)
        return
    prepared = qp.prepare_qat(Hardswish(), (x,), target=target)
    qp.calibrate(prepared, [x, 2 * x])
    qp.freeze(prepared)
    assert torch.equal(prepared.eval()(x), qp.convert(prepared)(x))


def test_x86_runs_convs_with_more_than_100_groups_with_fbgemms_arithmetic():
    """PyTorch's x86 engine hands such convs to fbgemm (tests/test_fbgemm_depthwise.py checks it against
    PyTorch); for a model of that one conv, x86 and fbgemm compute the same codes."""
    torch.manual_seed(0)
    x = torch.randn(2, 101, 5, 5)
    outputs = []
    for target in ("x86", "fbgemm"):
        torch.manual_seed(1)
        prepared = qp.prepare_qat(Grouped(), (x,), target=target)
        qp.calibrate(prepared, [x])
        outputs.append(qp.convert(qp.freeze(prepared))(x))
    assert torch.equal(*outputs)


def test_golden_writes_the_hardswish_table(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    prepared = qp.prepare_qat(Hardswish(), (x,), target="exact")
    qp.calibrate(prepared, [x])
    qp.freeze(prepared)
    im = qp.convert(prepared)
    index = qp.golden(im, x, tmp_path)
    import json

    (entry,) = [n for n in json.loads(pathlib.Path(index).read_text())["nodes"] if n["op"] == "hardswish"]
    params = entry["params"]
    source = qp.QParams.from_dict(params["input_qparams"])
    assert len(params["table"]) == source.qmax - source.qmin + 1
    codes = torch.arange(source.qmin, source.qmax + 1)
    expected = im.target.hardswish(codes, source, qp.QParams.from_dict(params["output_qparams"]))
    assert params["table"] == expected.tolist()


def test_file_formats_come_from_the_targets_declarations():
    from qparity.export import FORMATS
    from qparity.numerics import get_target

    assert set(FORMATS) == {f".{f}" for f in FILE_FORMATS}
    for suffix, targets in FORMATS.items():
        assert targets and all(get_target(t).file_format == suffix for t in targets)
    assert {t for ts in FORMATS.values() for t in ts} == {t for t in qp.TARGETS if get_target(t).file_format}


def test_the_operators_that_take_a_fused_clamp_are_the_layers_and_add():
    from qparity.ops.registry import CLAMP_FUSING_OPS, LAYER_OPS

    assert set(CLAMP_FUSING_OPS) == set(LAYER_OPS) | {"add"}
