"""`prunescope --help` and `import engine` stay light: heavy libraries load only when a
command runs (checked on sys.modules in a fresh interpreter, not by timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "streamlit", "numpy",
         "scipy", "sklearn", "ray")

PROBE = """
import contextlib, io, json, sys
from engine.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
print(json.dumps({"code": code, "help": out.getvalue(),
                  "loaded": [m for m in HEAVY if m in sys.modules]}))
""".replace("HEAVY", repr(HEAVY))


def _probe(*argv: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("argv", [("--help",), ("prune", "--help"), ("scores", "--help"),
                                  ("dashboard", "--help"), ("evaluate", "--help"),
                                  ("sweep", "--help"), ("sensitivity", "--help")])
def test_help_imports_no_heavy_library(argv):
    result = _probe(*argv)
    assert result["code"] == 0
    assert "usage: prunescope" in result["help"]
    assert result["loaded"] == []


def test_import_engine_is_lazy_but_complete():
    code = ("import sys, engine; before = [m for m in HEAVY if m in sys.modules]; "
            "import json; prune = engine.prune; pipeline = engine.pipeline; "
            "print(json.dumps({'before': before, 'prune': prune.__module__, "
            "'pipeline': pipeline.__name__, 'torch': 'torch' in sys.modules, "
            "'all': all(hasattr(engine, n) for n in engine.__all__)}))")
    code = code.replace("HEAVY", repr(HEAVY))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result == {"before": [], "prune": "engine.pipeline", "pipeline": "engine.pipeline",
                      "torch": True, "all": True}


def test_unknown_attribute_is_an_attribute_error():
    import engine

    with pytest.raises(AttributeError, match="no_such_thing"):
        engine.no_such_thing  # noqa: B018
