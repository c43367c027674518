"""User-facing errors: one clear line saying what is wrong and what is allowed."""

from __future__ import annotations


class PruneScopeError(Exception):
    """Base class of every error the engine raises on purpose (bad input, bad option)."""


class OptionError(PruneScopeError, ValueError):
    """An option has a value outside the allowed set."""


class ModelLoadError(PruneScopeError):
    """A model file or object could not be loaded or captured."""


class ExportError(PruneScopeError):
    """Writing or checking an exported artefact failed."""


class OnnxExportError(ExportError):
    """The ONNX export (or its ONNX Runtime check) failed after everything else was written:
    model.pt2 and report.json are in place, the report names the failure."""

    def __init__(self, message: str, paths: dict | None = None, report: dict | None = None):
        super().__init__(message)
        self.paths = paths or {}
        self.report = report


class DataError(OptionError, ModelLoadError):
    """A calibration or evaluation data file (or in-memory data) cannot be used. It is both
    an OptionError (the data is an option's value) and a ModelLoadError (a file that failed to
    load), as the loaders it replaces raised one or the other."""
