"""User-facing errors: one clear line saying what is wrong and what is allowed."""

from __future__ import annotations

import re


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


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SUMMARY = "## Exception summary"
_SUMMARY_LINE = re.compile(r"<class '([\w.]+)'>: (.*)")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An error as the one line a user sees: a PruneScopeError's own first line, any other
    error's type and first line; for an exporter report, the root cause its 'Exception
    summary' names. Terminal colours are dropped and the line is cut at `limit`."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    if _SUMMARY in lines:
        for line in lines[lines.index(_SUMMARY) + 1:]:
            match = _SUMMARY_LINE.match(line)
            if match:
                return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"[:limit]
    first = lines[0] if lines else ""
    if isinstance(exc, PruneScopeError) and first:
        return first[:limit]
    return (f"{type(exc).__name__}: {first}" if first else type(exc).__name__)[:limit]
