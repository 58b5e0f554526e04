"""Shared test helpers: calibrate a prepared model, then compare the fake-quant and integer paths."""
import torch

import qparity as qp


def calibrate(prepared, batches, lr: float = 0.0):
    """Run train-mode steps so observers (and BatchNorm) see data; optionally take SGD steps."""
    prepared.train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=lr) if lr else None
    for batch in batches:
        out = prepared(*batch) if isinstance(batch, tuple) else prepared(batch)
        if optimizer is not None:
            loss = sum(o.float().pow(2).mean() for o in (out if isinstance(out, tuple) else (out,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return prepared.eval()


def assert_bit_exact(prepared, integer_model, *inputs):
    fake = prepared.eval()(*inputs)
    real = integer_model(*inputs)
    fakes = fake if isinstance(fake, tuple) else (fake,)
    reals = real if isinstance(real, tuple) else (real,)
    for f, r in zip(fakes, reals):
        mismatched = int((f != r).sum())
        assert torch.equal(f, r), f"{mismatched} of {f.numel()} outputs differ"


def prepare_and_convert(model, example, target, batches, lr=0.0, **options):
    prepared = qp.prepare_qat(model, example, target=target, **options)
    calibrate(prepared, batches, lr)
    qp.freeze(prepared)
    return prepared, qp.convert(prepared)


FILE_SUFFIXES = {"tflite": ".tflite", "xnnpack": ".tflite", "tflite-micro": ".tflite", "onnxruntime": ".onnx",
                 "tosa": ".tosa"}
# The file formats whose runtime comes with an optional extra: (module, extra).
OPTIONAL_RUNTIMES = {".tosa": ("tosa_reference_model", "tosa")}


def assert_runtime_gives_the_same_codes(integer_model, inputs, directory) -> None:
    """Export to the target's file, run it in the real runtime(s): 0 mismatched codes where the target binds."""
    import os

    suffix = FILE_SUFFIXES[integer_model.target.name]
    if suffix in OPTIONAL_RUNTIMES:
        require_optional_runtime(*OPTIONAL_RUNTIMES[suffix])
    path = os.path.join(str(directory), "model" + suffix)
    qp.export(integer_model, path)
    report = qp.verify(integer_model, path, inputs)
    assert report.ok and report.mismatched == 0, str(report)


def require_runtime(module: str):
    """Import a real runtime the tests use as an oracle. A missing one fails the run instead of skipping it:
    a suite whose strongest checks can silently vanish proves less than it says (install `.[dev]`)."""
    import importlib

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as error:
        pytest.fail(f"the runtime {module!r} is a test oracle and is not installed ({error}); "
                    f"install the test dependencies with pip install -e \".[dev]\"", pytrace=False)


def require_optional_runtime(module: str, extra: str):
    """Import a runtime from an optional extra. Without it the test is skipped with the reason, unless
    QPARITY_REQUIRE_OPTIONAL_RUNTIMES=1 (set by CI, which installs every extra): there a missing one fails."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as error:
        message = (f"the runtime {module!r} comes with the optional extra {extra!r} and is not installed ({error}); "
                   f"pip install -e \".[{extra}]\"")
        if os.environ.get("QPARITY_REQUIRE_OPTIONAL_RUNTIMES") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
