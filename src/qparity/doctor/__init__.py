"""The doctor: where and why a torch.ao QAT model (after prepare_qat / prepare_qat_fx, or torchao's
prepare_qat_pt2e) and its converted int8 model disagree; `pte` does the same for an ExecuTorch .pte file
against the convert_pt2e model it was lowered from. `compare` runs both and records every layer, `causes` explains the differences, `report`
renders them; `command` is the `qparity doctor` console command."""
from __future__ import annotations

from typing import Any, Tuple

import torch
from torch import nn

from .causes import diagnose
from .compare import DoctorInputError, output_tensors, record
from . import pt2e
from .pte import doctor_pte
from .engine_variation import variation_notes
from .report import KINDS, Cause, DoctorReport, LayerResult


def _compare_outputs(prepared: Any, converted: Any) -> Tuple[int, int, float]:
    fake, real = output_tensors(prepared), output_tensors(converted)
    if len(fake) != len(real) or any(a.shape != b.shape for a, b in zip(fake, real)):
        raise DoctorInputError(f"the prepared model returns {[tuple(t.shape) for t in fake]} but the converted model "
                               f"returns {[tuple(t.shape) for t in real]}: pass a model and its own convert")
    mismatched = sum(int((a != b).sum()) for a, b in zip(fake, real))
    total = sum(a.numel() for a in fake)
    largest = max((float((a.double() - b.double()).abs().max()) for a, b in zip(fake, real) if a.numel()), default=0.0)
    return mismatched, total, largest


def doctor(prepared: nn.Module, converted: nn.Module, example_inputs: Any) -> DoctorReport:
    """Run both models on `example_inputs` and report which layers' codes differ and why.

    `prepared` is the model from torch.ao's prepare_qat (eager) or prepare_qat_fx (FX), or torchao's
    prepare_qat_pt2e, in the state it was converted from; `converted` is what convert / convert_fx /
    convert_pt2e made of it. Neither model is modified.
    """
    if pt2e.is_pt2e(converted):
        return _doctor_pt2e(prepared, converted, example_inputs)
    engine = torch.backends.quantized.engine
    run = record(prepared, converted, example_inputs)
    layers, causes, notes = diagnose(run, engine)
    notes += variation_notes(converted, example_inputs, engine)
    causes.sort(key=lambda c: (-c.affected, KINDS.index(c.kind)))
    mismatched, total, largest = _compare_outputs(run.prepared_output, run.converted_output)
    first = next((layer.name for layer in layers if layer.mismatched), None)
    return DoctorReport(ok=mismatched == 0 and first is None, mismatched=mismatched, total=total,
                        max_abs_diff=largest, engine=engine,
                        flow="fx" if isinstance(prepared, torch.fx.GraphModule) else "eager", layers=layers,
                        first_divergence=first, causes=causes, notes=notes)



def _doctor_pt2e(prepared: nn.Module, converted: nn.Module, example_inputs: Any) -> DoctorReport:
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    run = pt2e.record(prepared, converted, inputs)
    layers, causes, notes = pt2e.diagnose(run)
    causes.sort(key=lambda c: (-c.affected, KINDS.index(c.kind)))
    mismatched, total, largest = _compare_outputs(run.prepared_output, run.converted_output)
    first = next((layer.name for layer in layers if layer.mismatched), None)
    return DoctorReport(ok=mismatched == 0 and first is None, mismatched=mismatched, total=total,
                        max_abs_diff=largest, engine=pt2e.ENGINE, flow="pt2e", layers=layers,
                        first_divergence=first, causes=causes, notes=notes)


__all__ = ["KINDS", "Cause", "DoctorInputError", "DoctorReport", "LayerResult", "doctor", "doctor_pte"]
