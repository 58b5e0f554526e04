"""The error hierarchy: every failure qparity reports derives from `QParityError`.

Where a built-in exception is the natural category (a bad value, a bad type), the qparity error also
derives from it, so `except ValueError` keeps working for callers who do not know qparity.
"""


class QParityError(Exception):
    """Base class of every error qparity raises."""


class UnknownTargetError(QParityError, ValueError):
    """A target name that is not in `qparity.TARGETS`."""


class InvalidQParamsError(QParityError, ValueError):
    """Quantization parameters that no runtime can represent (scale <= 0, NaN, zero point out of range)."""


class InvalidParameterError(QParityError, ValueError):
    """A weight, bias, weight scale or observed range that no runtime can represent (NaN, infinite, or out of
    the range the target's arithmetic is defined on), named by its layer and channel."""


class UnsupportedOpError(QParityError, TypeError):
    """An operator (or an operator configuration) that qparity cannot quantize exactly."""


class NotPreparedError(QParityError, TypeError):
    """A function that needs a model from `prepare_qat` was given something else."""


class NotFrozenError(QParityError, RuntimeError):
    """A function that needs fixed quantization parameters was given a model that `freeze` has not fixed."""


class CaptureError(QParityError, TypeError):
    """The model could not be captured as a graph."""


class InputError(QParityError, ValueError):
    """An input of the wrong shape, dtype, or value (NaN, infinity) for an integer model."""


class NotCalibratedError(QParityError, RuntimeError):
    """Quantization parameters were needed before any data was observed."""


class OverflowRiskError(QParityError, ValueError):
    """A layer whose int32 accumulator (or fixed-point intermediate) could overflow."""


class ModelFileError(QParityError, ValueError):
    """A model file (.qp, or an exported .onnx/.tflite) that is empty, truncated, corrupted, of another format,
    or whose content is inconsistent (even with a matching checksum)."""


class FileAccessError(QParityError, OSError):
    """A file or directory qparity cannot read or write: missing, a directory where a file is expected, no
    permission, a full disk."""


class ArgumentTypeError(QParityError, TypeError):
    """A public function was given an argument of the wrong type (e.g. a path that is not a str or
    os.PathLike, a model that is not an IntegerModel)."""


class ExportError(QParityError, ValueError):
    """A model that cannot be written to the requested file format (wrong target, inexpressible op)."""


class QParityWarning(UserWarning):
    """Something qparity can do but cannot vouch for (e.g. a PyTorch release its engine targets were not
    checked against)."""


class TargetSettingError(QParityError, ValueError):
    """A target setting outside what its runtime accepts (an engine thread count below 1, an unknown layout)."""
