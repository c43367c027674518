"""Text data as model inputs: records read in batches from text files, parquet and Hugging
Face datasets, tokenized with the model's own tokenizer and mapped to its inputs by name.

Forms: ``.txt`` (one sample a line, blank lines skipped), ``.jsonl`` (one JSON object a line)
and ``.json`` (a list of objects; a list of strings also works), ``.csv``/``.tsv``/
``.parquet`` (columns), a ``datasets`` ``save_to_disk`` folder, ``hf:NAME[:CONFIG]:SPLIT``.
The text is the field/column ``text`` (or ``DataOptions.text_field``), the optional label
``label`` (or ``label_field``): integer class indices, or class names the model's config
(``label2id``) names.

Two modes (``DataOptions.text_mode``): ``pad`` makes one sample per record, padded or
truncated to the model's sequence length (with the attention mask saying which tokens are
real); ``stream`` concatenates every record and cuts the token stream into windows of the
sequence length (the usual perplexity protocol of causal language models; labels unused).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

from engine.errors import DataError, one_line
from engine.io.hf import quiet_transformers
from engine.offline import HUB_OFFLINE

TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# a model whose input names are unknown (a .pt2 exported by position) takes them in the
# order transformers' text models declare them in forward()
POSITIONAL_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                   "tokenizer.model", "spiece.model")
SAVE_TO_DISK_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
Record = tuple[str, Any]  # (text, label or None)


# ------------------------------------------------------------------------------ records

def file_records(opener: Callable[[], IO[bytes]], suffix: str, where: str, text_field: str,
                 label_field: str, batch: int) -> Iterator[list[Record]]:
    """Batches of (text, label) records of a text file (``opener`` opens its bytes)."""
    if suffix == ".parquet":
        yield from _parquet(opener, where, text_field, label_field, batch)
        return
    with opener() as raw:
        stream = io.TextIOWrapper(raw, encoding="utf-8", newline="" if suffix in (
            ".csv", ".tsv") else None)
        try:
            if suffix == ".txt":
                rows = ((line.rstrip("\r\n"), None) for line in stream)
                yield from _batched((r for r in rows if r[0].strip()), batch)
            elif suffix == ".jsonl":
                yield from _batched(_jsonl(stream, where, text_field, label_field), batch)
            elif suffix == ".json":
                yield from _batched(_json(stream, where, text_field, label_field), batch)
            else:
                yield from _batched(_csv(stream, where, text_field, label_field,
                                         "\t" if suffix == ".tsv" else ","), batch)
        except UnicodeDecodeError as exc:
            raise DataError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                            "save it as UTF-8") from None


def _batched(records: Iterator[Record], batch: int) -> Iterator[list[Record]]:
    chunk: list[Record] = []
    for record in records:
        chunk.append(record)
        if len(chunk) >= batch:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _record(obj: Any, where: str, text_field: str, label_field: str) -> Record:
    if isinstance(obj, str):
        return obj, None
    if not isinstance(obj, dict):
        raise DataError(f"{where} holds a {type(obj).__name__}; expected objects with a "
                        f"'{text_field}' field (and an optional '{label_field}')")
    if text_field not in obj:
        fields = ", ".join(sorted(map(str, obj))) or "none"
        raise DataError(f"{where} has a record without the field '{text_field}' (fields: "
                        f"{fields}); name the text field with --text-field")
    text = obj[text_field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field '{text_field}' holds a {type(text).__name__}, not text")
    return text, obj.get(label_field)


def _jsonl(stream: IO[str], where: str, text_field: str, label_field: str) -> Iterator[Record]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{where}: line {number} is not JSON ({exc}); a .jsonl holds one "
                            "JSON object a line") from None
        yield _record(obj, f"{where} (line {number})", text_field, label_field)


def _json(stream: IO[str], where: str, text_field: str, label_field: str) -> Iterator[Record]:
    try:
        data = json.load(stream)
    except ValueError as exc:
        raise DataError(f"{where} is not valid JSON ({exc}); a .json holds a list of "
                        f"objects with a '{text_field}' field") from None
    if not isinstance(data, list):
        raise DataError(f"{where} holds a JSON {type(data).__name__}; expected a list of "
                        f"objects with a '{text_field}' field (or a .jsonl, one a line)")
    for obj in data:
        yield _record(obj, where, text_field, label_field)


def _csv(stream: IO[str], where: str, text_field: str, label_field: str,
         delimiter: str) -> Iterator[Record]:
    reader = csv.DictReader(stream, delimiter=delimiter)
    columns = reader.fieldnames or []
    _check_columns(columns, where, text_field)
    has_label = label_field in columns
    for row in reader:
        text = row.get(text_field)
        if text is None or not text.strip():
            continue
        yield text, row.get(label_field) if has_label else None


def _check_columns(columns: list[str], where: str, text_field: str) -> None:
    if not columns:
        raise DataError(f"{where} is empty; expected a header row naming a '{text_field}' "
                        "column, then one sample a row")
    if text_field not in columns:
        raise DataError(f"{where} has no column '{text_field}' (columns: "
                        f"{', '.join(map(str, columns))}); name the text column with "
                        "--text-field")


def _parquet(opener, where: str, text_field: str, label_field: str,
             batch: int) -> Iterator[list[Record]]:
    import pyarrow.parquet as pq

    with opener() as raw:
        try:
            file = pq.ParquetFile(raw)
        except Exception as exc:  # noqa: BLE001 - any failure: not a parquet file
            raise DataError(f"{where} is not a readable parquet file ({one_line(exc)})") \
                from None
        columns = list(file.schema_arrow.names)
        _check_columns(columns, where, text_field)
        wanted = [text_field, *([label_field] if label_field in columns else [])]
        for table in file.iter_batches(batch_size=batch, columns=wanted):
            yield from _columns_batch(table.to_pydict(), where, text_field, label_field)


def _columns_batch(columns: dict[str, list], where: str, text_field: str,
                   label_field: str) -> Iterator[list[Record]]:
    texts = columns[text_field]
    labels = columns.get(label_field) or [None] * len(texts)
    chunk = []
    for text, label in zip(texts, labels):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{where}: column '{text_field}' holds {type(text).__name__} "
                            "values, not text")
        if text.strip():
            chunk.append((text, label))
    if chunk:
        yield chunk


def is_saved_dataset(path: Path) -> bool:
    """Whether a folder is one that ``datasets``' ``save_to_disk`` wrote."""
    return any((path / name).is_file() for name in SAVE_TO_DISK_FILES)


def dataset_records(source: str, where: str, text_field: str, label_field: str,
                    batch: int) -> Iterator[list[Record]]:
    """Batches of records of a ``save_to_disk`` folder or an ``hf:NAME[:CONFIG]:SPLIT``."""
    dataset = _dataset(source, where)
    columns = list(dataset.column_names)
    _check_columns(columns, where, text_field)
    wanted = [text_field, *([label_field] if label_field in columns else [])]
    for part in dataset.select_columns(wanted).iter(batch_size=batch):
        yield from _columns_batch(part, where, text_field, label_field)


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("Hugging Face datasets need the datasets package "
                        "(pip install datasets==5.2.0)") from None
    return datasets


def _dataset(source: str, where: str):
    datasets = _datasets()
    if not source.startswith("hf:"):
        try:
            loaded = datasets.load_from_disk(source)
        except Exception as exc:  # noqa: BLE001 - any failure: an unreadable folder
            raise DataError(f"{where} is not a readable datasets save_to_disk folder "
                            f"({one_line(exc)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if len(splits) != 1:
                raise DataError(f"{where} holds the splits {', '.join(splits)}; give one "
                                f"split's folder ({os.path.join(source, splits[0])})")
            loaded = loaded[splits[0]]
        return loaded
    parts = source[3:].split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise DataError(f"{where}: write a Hugging Face dataset as hf:NAME:SPLIT or "
                        "hf:NAME:CONFIG:SPLIT (e.g. hf:wikitext:wikitext-2-raw-v1:test)")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - no network, unknown name or split
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{where} is not in the local datasets cache "
                            f"({one_line(exc, limit=200)}); PruneScope does not download "
                            f"(set {HUB_OFFLINE}=0 to let datasets fetch it), or give a "
                            "save_to_disk folder") from None
        raise DataError(f"{where} could not be loaded through datasets ({one_line(exc)}); "
                        "without network, save it with save_to_disk where you have one and "
                        "give that folder") from None


def sample_records(batches: Iterator[list[Record]], n: int, seed: int) -> list[Record]:
    """A seeded random subset of ``n`` records in their original order, reading the source
    once and holding only ``n`` records (reservoir sampling)."""
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, Record]] = []
    seen = 0
    for chunk in batches:
        for record in chunk:
            if len(kept) < n:
                kept.append((seen, record))
            else:
                slot = int(rng.integers(0, seen + 1))
                if slot < n:
                    kept[slot] = (seen, record)
            seen += 1
    return [record for _, record in sorted(kept, key=lambda item: item[0])]


# ---------------------------------------------------------------------------- tokenizing

def load_tokenizer(folder: Path | None, given: str | None, where: str, model_source: str):
    """The model folder's own tokenizer, or the ``--tokenizer`` folder; never remote code."""
    if given is not None:
        path, what = Path(given), f"--tokenizer {given}"
        if not path.is_dir():
            raise DataError(f"{what} is not a folder; give a folder holding a tokenizer "
                            "(tokenizer.json, tokenizer_config.json, ...)")
    elif folder is not None:
        path, what = Path(folder), f"model folder {folder}"
    else:
        raise DataError(f"{where} is text, and tokenizing it needs a tokenizer, which "
                        f"{model_source} does not have; give --tokenizer FOLDER (a folder "
                        "holding the model's tokenizer)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise DataError(f"{where} is text, but {what} has no tokenizer (expected one of "
                        f"{', '.join(TOKENIZER_FILES)}); give --tokenizer FOLDER")
    try:
        from transformers import AutoTokenizer


        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True,
                                                      trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure: an unusable tokenizer
        raise DataError(f"{what}: its tokenizer could not be loaded ({one_line(exc)})") \
            from None
    if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token or \
            tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def text_input_names(names: tuple[str, ...], integer: tuple[bool, ...], where: str,
                     model_source: str) -> tuple[str, ...]:
    """Which text array feeds each model input, by name; positional where names are
    unknown; a model input text cannot fill is one error."""
    if not names or not integer or not integer[0]:
        raise DataError(f"{where} is text, but {model_source} does not take token ids (its "
                        "first input is floating point); give arrays (.npz) or images")
    if all(not n for n in names):
        if len(names) > len(POSITIONAL_TEXT_INPUTS):
            raise DataError(f"{where} is text, but {model_source} takes {len(names)} unnamed "
                            f"inputs; text fills {', '.join(POSITIONAL_TEXT_INPUTS)}")
        return POSITIONAL_TEXT_INPUTS[:len(names)]
    unknown = [n for n in names if n not in TEXT_INPUTS]
    if unknown:
        raise DataError(f"{where} is text, but {model_source} also takes {', '.join(unknown)}; "
                        f"text fills only {', '.join(TEXT_INPUTS)}")
    return names


def text_arrays(batches: Iterator[list[Record]], tokenizer, names: tuple[str, ...],
                seq_len: int, mode: str, where: str) -> tuple[tuple[np.ndarray, ...], list]:
    """The model's input arrays (one per name) and the raw labels of every record."""
    ids_parts, mask_parts, type_parts, labels = [], [], [], []
    if mode == "stream":
        stream: list[np.ndarray] = []
        separator = list(tokenizer("\n", add_special_tokens=False)["input_ids"])
        for chunk in batches:
            encoded = tokenizer([t for t, _ in chunk], add_special_tokens=False)["input_ids"]
            for ids in encoded:
                stream.append(np.asarray(list(ids) + separator, dtype=np.int64))
        tokens = np.concatenate(stream) if stream else np.zeros(0, np.int64)
        windows = len(tokens) // seq_len
        if windows == 0:
            raise DataError(f"{where} holds {len(tokens)} tokens, fewer than one window of "
                            f"{seq_len} (the sequence length); give more text or a smaller "
                            "--seq-len")
        ids = tokens[:windows * seq_len].reshape(windows, seq_len)
        mask, types = np.ones_like(ids), np.zeros_like(ids)
    else:
        for chunk in batches:
            encoded = tokenizer([t for t, _ in chunk], padding="max_length", truncation=True,
                                max_length=seq_len, return_tensors="np")
            ids_parts.append(encoded["input_ids"].astype(np.int64))
            mask_parts.append(encoded["attention_mask"].astype(np.int64)
                              if "attention_mask" in encoded else np.ones_like(ids_parts[-1]))
            type_parts.append(encoded["token_type_ids"].astype(np.int64)
                              if "token_type_ids" in encoded else np.zeros_like(ids_parts[-1]))
            labels.extend(label for _, label in chunk)
        if not ids_parts:
            raise DataError(f"{where} is empty; expected text samples (one a line or record)")
        ids, mask = np.concatenate(ids_parts), np.concatenate(mask_parts)
        types = np.concatenate(type_parts)
    filled = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
              "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    return tuple(filled[name] for name in names), labels


def class_indices(raw: list, where: str, config: Any) -> np.ndarray | None:
    """Integer labels from raw label values: integers, or class names the model's config
    names in ``label2id``. None when no record has a label."""
    present = [label for label in raw if label is not None]
    if not present:
        return None
    if len(present) != len(raw):
        raise DataError(f"{where}: {len(raw) - len(present)} of {len(raw)} samples have no "
                        "label; give a label for every sample or for none")
    if all(_integral(v) for v in present):
        return np.asarray([int(float(v)) for v in present], dtype=np.int64)
    label2id = getattr(config, "label2id", None) or {}
    names = {str(v) for v in present}
    if label2id and names <= set(map(str, label2id)):
        lookup = {str(k): int(v) for k, v in label2id.items()}
        return np.asarray([lookup[str(v)] for v in present], dtype=np.int64)
    example = next(v for v in present if not _integral(v))
    raise DataError(f"{where}: label {example!r} is not a class index, and the model's config "
                    "names no such class (label2id); give integer class indices")


def _integral(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int | np.integer):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return False
