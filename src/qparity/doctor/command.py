"""`qparity doctor script.py[:function]`: load a user's script, call the function that returns
(prepared, converted, example_inputs), and print (and optionally save) the doctor's report.
`qparity doctor MODEL.pte --reference REFERENCE`: the .pte doctor (doctor/pte.py) against the PT2E model the file
was lowered from, a script whose function returns (converted, example_inputs) or a .qp saved from
`qparity.from_torch` of it."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Tuple

from rich.console import Console

from .compare import DoctorInputError

DEFAULT_FUNCTION = "build"


def load_function(spec: str) -> Callable[[], Any]:
    """`path/to/script.py[:function]` -> the function (default `build`)."""
    path_text, colon, name = spec.rpartition(":")
    if not colon or not name.isidentifier():
        path_text, name = spec, DEFAULT_FUNCTION
    path = Path(path_text)
    if not path.is_file():
        raise DoctorInputError(f"no script at {path_text!r}: give path/to/script.py[:function]")
    if path.suffix != ".py":
        raise DoctorInputError(f"{path_text!r} is not a Python script (.py): give path/to/script.py[:function]")
    module_spec = importlib.util.spec_from_file_location(f"qparity_doctor_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, str(path.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's code: report it as theirs, the traceback stays chained (--debug)
        raise DoctorInputError(f"running {path} raised {type(error).__name__}: {error}") from error
    finally:
        sys.path.remove(str(path.parent.resolve()))
    function = getattr(module, name, None)
    if not callable(function):
        raise DoctorInputError(f"{path} has no function {name!r}; name the one that returns (prepared, converted, "
                               f"example_inputs) as {path}:function")
    return function


def models(spec: str) -> Tuple[Any, Any, Any]:
    function = load_function(spec)
    try:
        result = function()
    except Exception as error:  # the user's code, as in load_function
        raise DoctorInputError(f"{spec} raised {type(error).__name__}: {error}") from error
    if not (isinstance(result, (tuple, list)) and len(result) == 3):
        raise DoctorInputError(f"{spec} returned {type(result).__name__}; it must return (prepared, converted, "
                               "example_inputs)")
    return tuple(result)


def pte_reference(spec: str):
    """The reference IntegerModel (target pt2e-reference) from a .qp or a script's (converted, example_inputs)."""
    from ..from_pt2e import from_pt2e, is_pt2e
    from ..runtime import load

    if spec.endswith(".qp"):
        return load(spec)
    function = load_function(spec)
    try:
        result = function()
    except Exception as error:  # the user's code, as in load_function
        raise DoctorInputError(f"{spec} raised {type(error).__name__}: {error}") from error
    if not (isinstance(result, (tuple, list)) and len(result) in (2, 3) and is_pt2e(result[-2])):
        raise DoctorInputError(f"{spec} must return (converted, example_inputs) with the convert_pt2e model the .pte "
                               f"was lowered from (or (prepared, converted, example_inputs)); got "
                               f"{type(result).__name__}")
    inputs = result[-1] if isinstance(result[-1], (tuple, list)) else (result[-1],)
    return from_pt2e(result[-2], tuple(inputs))


def pte_command(console: Console, args, inputs_for) -> int:
    from .pte import doctor_pte

    if not args.reference:
        raise DoctorInputError(f"qparity doctor {args.script} needs --reference: the .qp or script.py[:function] of "
                               "the converted PT2E model the file was lowered from")
    if args.html:
        raise DoctorInputError("--html is written for the QAT doctor's report; use --json for the .pte doctor")
    reference = pte_reference(args.reference)
    report = doctor_pte(args.script, reference, inputs_for(reference))
    console.print(report.to_json() if args.json else str(report), markup=False, highlight=False, soft_wrap=True)
    return 0 if report.ok else 1


def doctor_command(console: Console, args, inputs_for) -> int:
    """Print the report; --json prints JSON instead; --html also writes the page. Exit 0 when ok, 1 otherwise.
    `inputs_for(model)`: the inputs the .pte doctor runs (--inputs, or random ones on the model's input grid)."""
    from . import doctor

    if args.script.endswith(".pte"):
        return pte_command(console, args, inputs_for)

    report = doctor(*models(args.script))
    if args.json:
        console.print(report.to_json(), markup=False, highlight=False, soft_wrap=True)
    else:
        console.print(report)
    if args.html:
        path = report.to_html(args.html)
        if not args.json:
            console.print(f"wrote {path}", markup=False)
    return 0 if report.ok else 1
