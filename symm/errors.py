"""Errors raised by symm. Messages name the parameter, factor, axis and sizes involved."""


class SymmError(Exception):
    """Base class of every error symm raises on purpose."""


class SpecError(SymmError, ValueError):
    """A Spec is malformed, or does not match the parameters it is applied to."""


class CheckpointError(SymmError, ValueError):
    """A checkpoint file cannot be read or written, or its contents are invalid."""


class UnsupportedArchitecture(SymmError, NotImplementedError):
    """No catalogue entry or adapter exists for the requested architecture."""


class UsageError(SymmError, ValueError):
    """A command-line or function argument is out of range (checked before any work)."""


class OutputError(SymmError):
    """An output folder cannot be written, is busy, or writing would endanger an input."""


class FunctionMismatch(SymmError):
    """A transformed model does not compute the original function (a wrong symmetry spec); nothing is written."""


class DataError(SymmError, ValueError):
    """User-supplied evaluation data (``--data FILE|DIR``) cannot be read, is invalid, or does not fit the model."""
