import os

import warnings

import pytest
import torch
from hypothesis import settings

# Property tests explore widely but stay fast enough for CI's two cores.
settings.register_profile("qparity", max_examples=int(os.environ.get("QPARITY_EXAMPLES", "25")), deadline=None,
                          print_blob=True)
settings.load_profile("qparity")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def pt2e_runtimes():
    """torchao and ExecuTorch (the `executorch` extra), with their deprecation warnings silenced."""
    from helpers import require_optional_runtime

    require_optional_runtime("torchao", "executorch")
    require_optional_runtime("executorch", "executorch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="session")
def default_flow():
    """The PT2E QAT flow of tests/pt2e_case.py (XNNPACKQuantizer, conv+BN+ReLU, residual add, mean, linear) and
    the doctor's report on it, built once: convert_pt2e's BN folding costs about 20 s of CPU."""
    import qparity
    from helpers import require_optional_runtime

    require_optional_runtime("torchao", "executorch")
    require_optional_runtime("executorch", "executorch")
    from pt2e_case import build_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared, converted, x = build_pt2e()
        return prepared, converted, x, qparity.doctor(prepared, converted, x)


@pytest.fixture(scope="session")
def x86_flow():
    """torchao's X86InductorQuantizer QAT flow on tests/pt2e_case.py's X86Net (values left in float32, a float
    model output), built once: convert_pt2e's BN folding costs about 40 s of CPU."""
    from helpers import require_optional_runtime

    require_optional_runtime("torchao", "executorch")
    from pt2e_case import X86Net, build_pt2e, x86_quantizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_pt2e(x86_quantizer(), model=X86Net())
