"""Where a model and its evaluation data come from: demo, upload, local path, trusted pickle
(data files are read by the engine's loader, engine.io.data).

Uploads are written once into a private per-session temporary folder (``SessionFiles``,
mode 0700 under the system temp dir). The folder is removed once its session has closed (a
page run of any session, or the background sweeper, notices), when the session's state is
garbage-collected, or when the process exits; folders left by a killed server are removed by
the next server's first sweep.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, PruneScopeError, one_line  # noqa: F401 - sources.one_line
from engine.io.data import DataSet
from engine.io.staging import process_alive

DEMO = "Demo model"
DEMO_LM = "Demo language model (demo-lm)"
UPLOAD_PT2 = "Upload .pt2"
LOCAL_PATH = "Local file path"
UPLOAD_PT = "Upload .pt (pickle)"
SOURCES = (DEMO, DEMO_LM, UPLOAD_PT2, LOCAL_PATH, UPLOAD_PT)
EVAL_FLAG = "evaluation data"  # what error messages call the data the page measures on


PREFIX = "prunescope-"


class SessionFiles:
    """A private temporary folder for one browser session's uploads and outputs."""

    def __init__(self) -> None:
        # mkdtemp makes the folder 0700; the pid in the name lets a later server recognise
        # the folders of one that was killed before it could clean up.
        self.root = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        # Runs when the session state (and this object) is collected, or at interpreter exit.
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.root), True)
        self._written: dict[str, Path] = {}

    def subdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def store_upload(self, file_id: str, name: str, data: bytes | Any) -> Path:
        """Write an uploaded file once (reruns reuse it); returns its path on disk."""
        if file_id in self._written and self._written[file_id].is_file():
            return self._written[file_id]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(name)) or "upload"
        folder = self.subdir(f"upload-{hashlib.sha1(file_id.encode()).hexdigest()[:12]}")
        path = folder / safe
        with open(path, "wb") as out:
            if isinstance(data, bytes | bytearray | memoryview):
                out.write(data)
            else:
                data.seek(0)
                shutil.copyfileobj(data, out, length=16 << 20)
        # Only the latest upload of each kind is kept; older ones would only fill the disk.
        for old_id, old_path in list(self._written.items()):
            if old_path.suffix == path.suffix and old_id != file_id:
                shutil.rmtree(old_path.parent, ignore_errors=True)
                del self._written[old_id]
        self._written[file_id] = path
        return path

    def cleanup(self) -> None:
        self._finalizer()

    @property
    def alive(self) -> bool:
        return self._finalizer.alive


_registry_lock = threading.Lock()
_by_session: dict[str, SessionFiles] = {}


def register(session_id: str, files: SessionFiles) -> None:
    """Remember which session owns ``files`` so ``sweep`` can remove it once it closes."""
    with _registry_lock:
        _by_session[session_id] = files


def sweep(is_alive: Callable[[str], bool],
          on_removed: Callable[[Path], None] | None = None) -> list[Path]:
    """Remove the folders of sessions that are no longer alive; returns what was removed.

    Garbage collection of a closed session's state is not guaranteed to happen promptly (and
    the registry itself holds the folder), so page runs and the background sweeper call this
    with the runtime's idea of which sessions still exist. ``on_removed`` is told each removed
    folder (the page stops the Netron servers that served files from it).
    """
    removed = []
    with _registry_lock:
        for sid in list(_by_session):
            try:
                alive = is_alive(sid)
            except Exception:  # when in doubt keep the folder; a later sweep decides
                alive = True
            if alive:
                continue
            files = _by_session.pop(sid)
            if files.alive:
                files.cleanup()
                removed.append(files.root)
    for root in removed:
        if on_removed is not None:
            try:
                on_removed(root)
            except Exception:
                pass
    return removed


_sweeper: threading.Thread | None = None


def start_sweeper(is_alive: Callable[[str], bool], on_removed: Callable[[Path], None] | None,
                  interval_s: float) -> bool:
    """Sweep every ``interval_s`` seconds in a daemon thread (once per process).

    Without it a closed session's uploads would stay on disk until some other session runs
    the page. Returns True when this call started the thread.
    """
    global _sweeper
    with _registry_lock:
        if _sweeper is not None and _sweeper.is_alive():
            return False

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    sweep(is_alive, on_removed)
                except Exception:  # never let the sweeper die on one bad folder
                    pass

        _sweeper = threading.Thread(target=loop, name="prunescope-sweeper", daemon=True)
        _sweeper.start()
        return True


def remove_orphans(temp_dir: str | Path | None = None) -> list[Path]:
    """Remove this user's session folders whose server process no longer exists.

    A server stopped with SIGKILL (or a crash) cannot run its exit cleanup; its folders are
    recognised by the pid in their name.
    """
    base = Path(temp_dir or tempfile.gettempdir())
    removed = []
    try:
        candidates = list(base.glob(f"{PREFIX}*-*"))
    except OSError:
        return removed
    for folder in candidates:
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-.+", folder.name)
        if not match or int(match.group(1)) == os.getpid() or process_alive(int(match.group(1))):
            continue
        try:
            if not folder.is_dir() or folder.is_symlink() or folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@dataclass(frozen=True)
class ModelRequest:
    """Everything needed to load one model; ``key`` identifies it for caching."""

    key: str
    label: str
    source: str  # "demo" or a file path
    trust_pickle: bool = False
    input_shapes: tuple[tuple[int, ...], ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def demo_request() -> ModelRequest:
    from engine.demo import DEMO_PATH

    stamp = _file_stamp(DEMO_PATH) if Path(DEMO_PATH).is_file() else "missing"
    return ModelRequest(key=f"demo:{stamp}", label="built-in demo (digit classifier)",
                        source="demo")


def demo_lm_request() -> ModelRequest:
    from engine.demo import DEMO_LM_PATH

    stamp = _file_stamp(DEMO_LM_PATH) if Path(DEMO_LM_PATH).is_file() else "missing"
    return ModelRequest(key=f"demo-lm:{stamp}",
                        label="built-in demo-lm (byte-level Llama language model)",
                        source="demo-lm")


def path_request(path: str | Path, *, trust_pickle: bool = False,
                 input_shapes: tuple[tuple[int, ...], ...] | None = None,
                 label: str | None = None, shown_as: str | None = None) -> ModelRequest:
    """A request for a model file on disk (a .pt2, or a trusted .pt with input shapes).

    ``shown_as`` is what messages call the file instead of its path (an upload's own name:
    the server's temporary folder means nothing to the user).
    """
    raw = str(path).strip()
    if not raw:
        raise ModelLoadError("no file path given")
    p = Path(os.path.expanduser(raw))
    if not p.exists():
        raise ModelLoadError(f"file not found: {raw}")
    if p.is_dir():
        return _folder_request(p, raw, label)
    if not p.is_file():
        raise ModelLoadError(f"not a file: {raw}")
    suffix = p.suffix.lower()
    if suffix not in (".pt2", ".pt", ".pth"):
        raise ModelLoadError(
            f"unsupported model file {p.name!r}: expected a .pt2 (torch.export) file, "
            "or a .pt/.pth pickle with 'runs code' ticked and input shapes"
        )
    if suffix in (".pt", ".pth"):
        if not trust_pickle:
            raise ModelLoadError(
                f"{p.name} is a pickle: loading it runs code from the file; tick the box to "
                "trust it, or export it to .pt2 with torch.export"
            )
        if not input_shapes:
            raise ModelLoadError(f"{p.name} is a pickle: give its input shape(s), e.g. 1,3,224,224")
    shapes = tuple(input_shapes) if input_shapes else None
    key = f"path:{_file_stamp(p)}:{trust_pickle}:{shapes}"
    extra: dict[str, Any] = {}
    if shown_as:
        extra = {"shown_as": shown_as, "paths": (str(p.resolve()), raw, str(p))}
    return ModelRequest(key=key, label=label or str(p), source=str(p.resolve()),
                        trust_pickle=trust_pickle, input_shapes=shapes, extra=extra)


def _folder_request(p: Path, raw: str, label: str | None) -> ModelRequest:
    """A Hugging Face model folder (config.json + *.safetensors); the engine loads it."""
    if not (p / "config.json").is_file():
        raise ModelLoadError(
            f"folder {raw} has no config.json: a Hugging Face model folder holds config.json "
            "and *.safetensors (as save_pretrained writes them)"
        )
    weights = sorted(p.glob("*.safetensors")) + sorted(p.glob("*.json"))
    stamp = "|".join(_file_stamp(f) for f in weights)
    return ModelRequest(key=f"folder:{p.resolve()}:{stamp}", label=label or str(p),
                        source=str(p.resolve()))


def readable(message: str, request: ModelRequest) -> str:
    """``message`` with the request's stored path replaced by the name the user knows."""
    shown = request.extra.get("shown_as")
    if not shown:
        return message
    for path in sorted(request.extra.get("paths", ()), key=len, reverse=True):
        message = message.replace(path, shown)
    return message


def _file_stamp(path: str | Path) -> str:
    """Identifies one version of a file without reading it (models can be GBs).

    Inode and ctime are in it because mtime and size alone can be kept by a rewrite
    (``os.utime`` can set mtime; ctime cannot be set back).
    """
    st = os.stat(path)
    return (f"{os.path.realpath(path)}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
            f"{st.st_size}")


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """Parse input shapes such as ``1,3,224,224`` or ``1,16; 1,16`` (one per model input)."""
    shapes = []
    for part in re.split(r"[;\n]", text or ""):
        part = part.strip().strip("()[]")
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in re.split(r"[,x×\s]+", part) if d)
        except ValueError:
            raise ModelLoadError(
                f"bad input shape {part!r}: use integers separated by commas, e.g. 1,3,224,224;"
                " separate several inputs with ';'"
            ) from None
        if not dims or any(d < 1 for d in dims):
            raise ModelLoadError(f"bad input shape {part!r}: every dimension must be >= 1")
        shapes.append(dims)
    if not shapes:
        raise ModelLoadError("no input shape given: e.g. 1,3,224,224 (';' between inputs)")
    return tuple(shapes)


def builtin_eval(name: str) -> DataSet:
    """A built-in model's held-out evaluation set, read by the engine's loader."""
    from engine.io.data import load_eval_data

    return replace(load_eval_data(name, flag=EVAL_FLAG), source=f"{name} evaluation set")


def load_upload(data: bytes, name: str, flag: str = EVAL_FLAG, model: Any = None) -> DataSet:
    """An uploaded data file (``name``: the user's file name), read by the engine's loader;
    text is tokenized for ``model`` (the captured model)."""
    from engine.io.data import load_data

    return load_data(data, flag=flag, name=name, model=model)


def upload_types() -> list[str]:
    """The file types the data upload widgets accept (the engine's list)."""
    from engine.io.data import UPLOAD_SUFFIXES

    return [suffix.lstrip(".") for suffix in UPLOAD_SUFFIXES]

