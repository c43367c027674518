"""Checks on model files before anything in them is loaded.

A ``.pt2`` is a zip archive. ``torch.export.load`` unpickles some parts of it (old-layout
state dicts, weights or constants flagged ``use_pickle``, opaque objects, sample inputs), and
unpickling runs code. Unless the user trusts the file, such archives are refused before
torch reads them, and the rest is loaded with torch's weights-only unpickler forced on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

from engine.errors import ModelLoadError

DEFAULT_MAX_MODEL_BYTES = 16 * 2**30


def env_bytes(name: str, default: int) -> int:
    """A size limit from the environment variable ``name``; ``default`` when unset or not an
    integer."""
    value = os.environ.get(name)
    try:
        return int(value) if value else default
    except ValueError:
        return default


def max_model_bytes() -> int:
    return env_bytes("PRUNESCOPE_MAX_MODEL_BYTES", DEFAULT_MAX_MODEL_BYTES)


def check_size(path: Path, size: int | None = None) -> None:
    limit = max_model_bytes()
    size = path.stat().st_size if size is None else size
    if size > limit:
        raise ModelLoadError(
            f"model file {path} is {size / 2**30:.1f} GiB, larger than the size limit of "
            f"{limit / 2**30:.1f} GiB (set PRUNESCOPE_MAX_MODEL_BYTES to raise it)"
        )


_PICKLED = (
    "contains pickled data, and loading pickled data runs code from the file; pass "
    "--trust-pickle (Python: trust_pickle=True) only if you trust it"
)


# Entries at least this big (weights) may have their checksums verified while torch reads
# the archive (verify_checksums, in a thread): reading a 6 GB archive twice in a row cost 3 s.
LARGE_ENTRY_BYTES = 1 << 20


def inspect_pt2(path: Path, trust_pickle: bool, *, defer_large: bool = False) -> list[str]:
    """Refuse damaged archives, zip bombs and (untrusted) archives that would unpickle.

    With `defer_large`, the checksums of the large entries (weights) are not verified here:
    their names are returned, for verify_checksums before the model is used."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(
            f"model file {path} is not a readable .pt2 (torch.export.save) archive: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    with archive:
        infos = archive.infolist()
        check_size(path, sum(i.file_size for i in infos))
        deferred = [i.filename for i in infos
                    if defer_large and i.file_size >= LARGE_ENTRY_BYTES]
        _check_entries(path, archive, [i for i in infos if i.filename not in set(deferred)])
        names = [i.filename for i in infos]
        if not any(n.endswith(("models/model.json", "serialized_exported_program.json"))
                   or "/models/" in n for n in names):
            raise ModelLoadError(
                f"model file {path} is not a readable .pt2 (torch.export.save) archive: it holds "
                "no exported program (a torch.save pickle is a .pt, loaded with --trust-pickle)"
            )
        if trust_pickle:
            return
        for info in infos:
            name = info.filename
            base = name.rsplit("/", 1)[-1]
            legacy = base in ("serialized_state_dict.pt", "serialized_constants.pt")
            if name == "version" or legacy or base.startswith(("opaque_obj_", "custom_obj_")):
                raise ModelLoadError(f"model file {path} {_PICKLED}")
            if base.endswith("_config.json") and "/data/" in f"/{name}":
                try:
                    config = json.loads(archive.read(info))
                except ValueError:
                    raise ModelLoadError(f"model file {path} has an unreadable {name}") \
                        from None
                entries = config.get("config", {}) if isinstance(config, dict) else {}
                if any(isinstance(e, dict) and e.get("use_pickle") for e in entries.values()):
                    raise ModelLoadError(f"model file {path} {_PICKLED}")
    return deferred


def verify_checksums(path: Path, names: list[str]) -> None:
    """Read the named entries of the archive through their CRC-32 checks."""
    if not names:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            wanted = set(names)
            _check_entries(path, archive, [i for i in archive.infolist()
                                           if i.filename in wanted])
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelLoadError(f"model file {path} is damaged: {exc}") from None


def _check_entries(path: Path, archive: zipfile.ZipFile, infos: list[zipfile.ZipInfo]) -> None:
    """zipfile.testzip for some entries: reading an entry to its end checks its CRC-32."""
    for info in infos:
        try:
            with archive.open(info) as entry:
                while entry.read(1 << 22):
                    pass
        except Exception as exc:  # noqa: BLE001 - a broken archive in any way
            if isinstance(exc, zipfile.BadZipFile) and "CRC" in str(exc):
                raise ModelLoadError(f"model file {path} is damaged: entry {info.filename} "
                                     "fails its checksum") from None
            raise ModelLoadError(f"model file {path} is damaged: {exc}") from None


class _Collector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = f"{type(exc).__name__}: {exc}"
        self.messages.append(text.strip().splitlines()[0] if text.strip() else text)


@contextlib.contextmanager
def quiet_torch_load(weights_only: bool) -> Iterator[_Collector]:
    """Load with torch's logging captured (not printed) and, unless trusted, weights-only."""
    collector = _Collector()
    names = ["torch"] + [
        name for name in logging.Logger.manager.loggerDict
        if name.startswith(("torch.export", "torch._export"))
    ]
    saved = []
    for name in names:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [collector]
        logger.propagate = False
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    if weights_only:
        os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield collector
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
        if weights_only:
            if old is None:
                os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
            else:
                os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def root_cause(exc: BaseException, collector: _Collector) -> str:
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "warnings above" in first or "warning above" in first:
        for message in reversed(collector.messages):
            if message and "warnings above" not in message:
                return message[:300]
    return f"{type(exc).__name__}: {first}"[:300]
