"""safetensors shards read and written one tensor at a time.

Reading: the header of each shard is parsed once; a tensor is read with ``readinto`` into a
tensor torch allocates, and freed by the caller. Pages a memory map touches count in the
process's resident set for as long as the map is open (a 10 GB shard read through
``safe_open`` shows up as 10 GB of RSS), whereas bytes read through the page cache do not.

Writing: the header (names, dtypes, shapes, offsets) is known before any data is written
(the pruned shapes come from the plan), so a shard is written header first and then one
tensor at a time into ``NAME.tmp``, renamed when complete: a shard never exists whole in
memory, and a half-written shard never carries the final name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import torch

from engine.errors import ModelLoadError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
T = TypeVar("T")
_HEADER_LIMIT = 100 * 2**20  # the safetensors library refuses larger headers too

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: where its bytes are and what they hold."""

    shard: str  # file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The entries of one safetensors file and its ``__metadata__``."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("shorter than its 8-byte header length")
            (size,) = struct.unpack("<Q", raw)
            if size > _HEADER_LIMIT:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {exc}") from None
    base = 8 + size
    metadata = header.pop("__metadata__", None) or {}
    entries = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            begin, end = (int(x) for x in info["data_offsets"])
            shape = tuple(int(s) for s in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: tensor {name} has a dtype or layout PruneScope "
                                 "cannot read") from None
        entries[name] = Entry(path.name, dtype, shape, base + begin, base + end)
    return entries, metadata


class ShardSet:
    """The safetensors weights of a model folder (one file or the shards of its index)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        index = folder / SAFETENSORS_INDEX
        if index.is_file():
            try:
                data = json.loads(index.read_text(encoding="utf-8"))
                weight_map = dict(data["weight_map"])
            except (OSError, ValueError, KeyError, TypeError):
                raise ModelLoadError(f"model folder {folder}: {SAFETENSORS_INDEX} has no "
                                     "weight_map") from None
            self.index_metadata = data.get("metadata") or {}
            files = list(dict.fromkeys(weight_map.values()))
        elif (folder / SINGLE_FILE).is_file():
            self.index_metadata = {}
            files = [SINGLE_FILE]
        else:
            raise ModelLoadError(f"model folder {folder} has no {SINGLE_FILE} or "
                                 f"{SAFETENSORS_INDEX}")
        self.files: list[str] = files  # in the index's order
        self.entries: dict[str, Entry] = {}
        self.by_file: dict[str, list[str]] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for name in files:
            entries, metadata = read_header(folder / name)
            self.metadata[name] = metadata
            self.by_file[name] = sorted(entries, key=lambda k: entries[k].start)
            self.entries.update(entries)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def read(self, key: str, *, last_use: bool = False) -> torch.Tensor:
        """A fresh tensor holding the stored weight `key` (its own dtype). `last_use`: the
        bytes will not be read again, so the page cache drops them (room for the weights
        still to be read, where the cache cannot hold the whole model)."""
        entry = self.entries[key]
        out = torch.empty(entry.shape, dtype=entry.dtype)
        view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else b""
        if len(view) != entry.nbytes:
            raise ModelLoadError(f"{self.folder / entry.shard}: tensor {key} holds "
                                 f"{entry.nbytes} bytes for shape {list(entry.shape)}")
        with open(self.folder / entry.shard, "rb", buffering=0) as f:
            f.seek(entry.start)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise ModelLoadError(f"{self.folder / entry.shard} ends inside tensor {key}")
                done += got
            if last_use and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(f.fileno(), entry.start, entry.nbytes, os.POSIX_FADV_DONTNEED)
        return out

    def ordered(self, keys: Iterable[str]) -> list[str]:
        """`keys` in the order they are stored (file, then offset): sequential reads."""
        rank = {f: i for i, f in enumerate(self.files)}
        return sorted(keys, key=lambda k: (rank[self.entries[k].shard], self.entries[k].start))


class Prefetcher(Generic[T]):
    """`read(key)` for keys asked in a known order, the next one read ahead in a thread
    (``readinto`` releases the GIL) while the caller works on the current one: at most one
    result more in memory (`read` may do more than read: the streamed writer also cuts)."""

    def __init__(self, read: Callable[[str], T], order: Iterable[str]) -> None:
        self.read = read
        self.order = list(order)
        self.position = {k: i for i, k in enumerate(self.order)}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prunescope-read")
        self.ahead: tuple[str, Future[T]] | None = None

    def __call__(self, key: str) -> T:
        ahead, self.ahead = self.ahead, None
        if ahead is not None and ahead[0] == key:
            tensor = ahead[1].result()
        else:
            if ahead is not None:  # asked out of order: drop the read-ahead
                ahead[1].cancel()
            tensor = self.read(key)
        i = self.position.get(key)
        if i is not None and i + 1 < len(self.order):
            following = self.order[i + 1]
            self.ahead = (following, self.pool.submit(self.read, following))
        return tensor

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead[1].cancel()
            self.ahead = None
        self.pool.shutdown(wait=True)


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def write_shard(path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                tensor_of: Callable[[str], torch.Tensor],
                metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors `specs` describes (name -> dtype, shape), asking
    `tensor_of(name)` for each one in turn; ``path.tmp`` renamed to `path` at the end. The
    bytes of data written."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    names = list(specs)
    for name in names:
        dtype, shape = specs[name]
        size = _nbytes(dtype, shape)
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name in names:
                dtype, shape = specs[name]
                tensor = tensor_of(name)
                if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"tensor {name} is {tensor.dtype} {list(tensor.shape)}, "
                                     f"its header says {dtype} {list(shape)}")
                data = tensor.detach().contiguous().cpu()
                if data.numel():
                    f.write(memoryview(data.view(-1).view(torch.uint8).numpy()))
                del tensor, data
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return offset


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json`` as save_pretrained writes it (temp + rename)."""
    data = {"metadata": {"total_size": total_size},
            "weight_map": dict(sorted(weight_map.items()))}
    tmp = folder / (SAFETENSORS_INDEX + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / SAFETENSORS_INDEX)
