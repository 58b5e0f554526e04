"""qparity: what you train quantized is what you deploy, bit for bit.

    qm = qparity.prepare_qat(model, example_inputs, target="tflite")
    ...train qm...
    qparity.freeze(qm)
    im = qparity.convert(qm)
    assert torch.equal(qm.eval()(x), im(x))
"""
from .convert import convert
from .errors import QParityError
from .export import export
from .golden import golden
from .qat.model import QATModel
from .qat.prepare import calibrate, freeze, prepare_qat
from .qparams import QParams
from .runtime import IntegerModel, load
from .numerics import TARGETS
from .verify import VerifyReport, verify
from .doctor import doctor, doctor_pte
from .device_parity import CompareReport, compare

__version__ = "0.1.0"

__all__ = ["TARGETS", "CompareReport", "IntegerModel", "QATModel", "QParams", "QParityError", "VerifyReport",
           "calibrate", "compare", "convert", "doctor", "export", "freeze", "golden", "load", "prepare_qat", "verify"]
from .from_torch import from_torch  # noqa: E402
from .to_torch import to_torch  # noqa: E402
__all__ += ["doctor_pte", "from_torch", "to_torch"]
from .export.aimet import export_aimet  # noqa: E402  (Qualcomm QNN: float ONNX + AIMET encodings)
__all__ += ["export_aimet"]
