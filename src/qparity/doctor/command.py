"""`qparity doctor script.py[:function]`: load a user's script, call the function that returns
(prepared, converted, example_inputs), and print (and optionally save) the doctor's report."""
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


def doctor_command(console: Console, args) -> int:
    """Print the report; --json prints JSON instead; --html also writes the page. Exit 0 when ok, 1 otherwise."""
    from . import doctor

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
