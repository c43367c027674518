"""The ONNX exporter's chatter stays out of the user's log (a served dashboard logs at INFO,
where it wrote about a thousand lines per export); its failures still raise."""

from __future__ import annotations

import logging
import warnings

import pytest

import engine
from engine.errors import ExportError
from engine.io.export import export_onnx


def test_onnx_export_logs_and_warns_nothing_at_info(tmp_path, caplog):
    captured = engine.load_model("demo")
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_onnx(captured.program, tmp_path / "demo.onnx")
    assert path.stat().st_size > 10_000
    chatter = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert not chatter, [f"{r.name}: {r.getMessage()[:80]}" for r in chatter[:5]]
    assert not caught, [str(w.message)[:80] for w in caught[:5]]
    # the loggers are as they were once the export is over
    assert logging.getLogger("onnxscript").level == logging.NOTSET


def test_onnx_export_errors_still_raise(tmp_path):
    with pytest.raises(ExportError, match="opset"):
        export_onnx(engine.load_model("demo").program, tmp_path / "old.onnx", opset=7)
