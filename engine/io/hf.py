"""Hugging Face model folders in: ``config.json`` + ``*.safetensors`` as ``save_pretrained``
writes them (one file or a sharded set with ``model.safetensors.index.json``).

The model class is the one the config's ``architectures`` names, looked up in ``transformers``
itself (never code shipped with the folder: a config with ``auto_map`` is refused). Weights
come from safetensors with ``local_files_only``, so nothing is downloaded; a folder holding
only a pickle (``pytorch_model.bin``) is loaded only when the user trusts pickles. Missing,
unexpected or mis-shaped weights are an error, not a silently random layer.

Example inputs come from the config: token ids (and an all-ones attention mask) of
``seq_len`` tokens for text models, ``pixel_values`` from ``num_channels``/``image_size`` for
vision models, a second of 16 kHz audio or ``num_mel_bins`` features for audio models.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.errors import ModelLoadError, one_line

DEFAULT_SEQ_LEN = 32
CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Files that describe a model's weights or its runnable code; everything else a folder holds
# (tokenizer, processor, generation config, chat template, README) is carried to OUT/hf/.
_NOT_CARRIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".py", ".pyc", ".msgpack",
                         ".h5", ".ckpt", ".onnx", ".pt2")
_NOT_CARRIED_NAMES = (CONFIG, SAFETENSORS_INDEX, "pytorch_model.bin.index.json",
                      "model.safetensors.index.json", ".gitattributes")
_CARRIED_MAX_BYTES = 256 * 2**20


@dataclass
class HFSource:
    """What the hf/ exporter needs to know about a transformers model that was captured."""

    model_class: str  # e.g. "LlamaForCausalLM"
    config: Any = field(repr=False)  # the model's PretrainedConfig (as loaded)
    input_names: tuple[str, ...] = ()  # forward() keyword of each positional example input
    folder: Path | None = None  # the source folder (None: a PreTrainedModel given in Python)
    carried: tuple[str, ...] = ()  # non-weight files to copy to OUT/hf/
    # after depth pruning (engine/io/hf_depth.py): the layer list ("model.layers") and the
    # original indices of the whole layers removed, or why no config describes what is left
    layer_list: str | None = None
    removed_layers: tuple[int, ...] = ()
    depth_reason: str | None = None
    _auto_class: str | None = field(default="", repr=False)  # "": not looked up yet

    @property
    def auto_class(self) -> str | None:
        """e.g. "AutoModelForCausalLM": the Auto class that loads it. Looked up when first
        needed (writing hf/): the lookup imports transformers' Auto machinery, seconds on a
        cold process, which a prune that writes no hf/ never needs."""
        if self._auto_class == "":
            self._auto_class = auto_class_for(self.config, self.model_class)
        return self._auto_class


def is_pretrained_model(obj: Any) -> bool:
    """A transformers PreTrainedModel, checked without importing transformers."""
    return any(
        c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
        for c in type(obj).__mro__
    )


def source_of_model(model: torch.nn.Module, input_names: tuple[str, ...] = ()) -> HFSource:
    """HFSource of a PreTrainedModel given in Python."""
    config = model.config
    name = type(model).__name__
    return HFSource(name, config, input_names)


def load_folder(
    path: Path, *, trust_pickle: bool = False, input_shapes: list[tuple[int, ...]] | None = None,
    seq_len: int | None = None,
) -> tuple[torch.nn.Module, tuple, HFSource]:
    """The model of a Hugging Face folder, its example inputs and what hf/ export needs."""
    config_dict = _read_config(path)
    architectures = config_dict.get("architectures") or []
    if not architectures or not isinstance(architectures, list):
        raise ModelLoadError(
            f"model folder {path}: config.json names no 'architectures', so the model class "
            "is unknown; save the model with save_pretrained"
        )
    weights = _weight_files(path, trust_pickle)
    tf = _transformers()
    name = str(architectures[0])
    cls = transformers_class(name, config_dict.get("model_type"))
    if cls is None:
        raise ModelLoadError(
            f"model folder {path}: architecture {name!r} is not a model class of transformers "
            f"{tf.__version__}"
        )
    if weights == "pickle":
        warnings.warn(
            f"loading pickle {path / PICKLE_WEIGHTS[0]}: it runs code from the file "
            "(trusted by the user)", UserWarning, stacklevel=3,
        )
    model = _from_pretrained(cls, path, use_safetensors=weights == "safetensors")
    inputs, names = example_inputs_for(model, input_shapes, seq_len)
    source = HFSource(name, model.config, names, path, tuple(_carried_files(path)))
    return model, inputs, source


def transformers_class(name: str, model_type: str | None = None):
    """The PreTrainedModel class `name` of transformers itself, or None: a top-level export,
    else a class of the model type's own modeling module (``WhisperEncoder``, which
    ``save_pretrained`` of ``WhisperModel.get_encoder()`` names, is not exported at the top).
    Never code from anywhere else."""
    tf = _transformers()
    cls = getattr(tf, name, None)
    if cls is None and isinstance(model_type, str) and model_type.isidentifier():
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        module_name = model_type_to_module_name(model_type)
        try:
            module = importlib.import_module(
                f"transformers.models.{module_name}.modeling_{module_name}")
        except ImportError:
            return None
        cls = getattr(module, name, None)
    if isinstance(cls, type) and issubclass(cls, tf.PreTrainedModel):
        return cls
    return None


def _read_config(path: Path) -> dict[str, Any]:
    config_path = path / CONFIG
    if not config_path.is_file():
        raise ModelLoadError(
            f"model path {path} is a directory without config.json; a Hugging Face model "
            "folder holds config.json and *.safetensors (as save_pretrained writes them)"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model folder {path}: config.json is not valid JSON: {exc}") \
            from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"model folder {path}: config.json must hold a JSON object")
    if config.get("auto_map"):
        raise ModelLoadError(
            f"model folder {path} needs custom code (config.json has 'auto_map'), and "
            "PruneScope never runs code shipped with a model (trust_remote_code); only "
            "architectures built into transformers are loaded"
        )
    return config


def _weight_files(path: Path, trust_pickle: bool) -> str:
    """'safetensors' or 'pickle' (trusted); refuses folders without usable weights."""
    if any(path.glob("*.safetensors")):
        index = path / SAFETENSORS_INDEX
        if index.is_file():
            _check_shards(path, index)
        return "safetensors"
    if any((path / name).is_file() for name in PICKLE_WEIGHTS):
        if not trust_pickle:
            raise ModelLoadError(
                f"model folder {path} holds its weights only as a pickle (pytorch_model.bin), "
                "and loading a pickle runs code from the file; pass --trust-pickle (Python: "
                "trust_pickle=True) only if you trust it, or save it as safetensors"
            )
        return "pickle"
    raise ModelLoadError(
        f"model folder {path} has no weights: expected model.safetensors (or shards listed in "
        f"{SAFETENSORS_INDEX})"
    )


def _check_shards(path: Path, index: Path) -> None:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"model folder {path}: {SAFETENSORS_INDEX} has no weight_map") \
            from None
    missing = sorted(s for s in shards if not (path / s).is_file())
    if missing:
        raise ModelLoadError(
            f"model folder {path}: shard {missing[0]} listed in {SAFETENSORS_INDEX} is missing"
        )


def _transformers():
    try:
        import transformers
    except ImportError:  # pragma: no cover - a runtime dependency
        raise ModelLoadError("loading a model folder needs transformers (pip install "
                             "transformers)") from None
    return transformers


def _from_pretrained(cls, path: Path, *, use_safetensors: bool) -> torch.nn.Module:
    """Local files only, no custom code, float32 (scores and verification run in float32)."""
    try:
        with quiet_transformers():
            model, info = cls.from_pretrained(
                os.fspath(path), local_files_only=True, trust_remote_code=False,
                use_safetensors=use_safetensors, dtype=torch.float32, output_loading_info=True,
            )
    except Exception as exc:  # noqa: BLE001 - any failure means an unloadable folder
        raise ModelLoadError(f"model folder {path} could not be loaded: {one_line(exc)}") \
            from None
    problems = [
        (kind, sorted(str(k) for k in info.get(key) or ()))
        for key, kind in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                          ("mismatched_keys", "mis-shaped"))
    ]
    for kind, keys in problems:
        if keys:
            more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
            raise ModelLoadError(
                f"model folder {path}: the weights do not match config.json: {kind} "
                f"{', '.join(keys[:3])}{more}"
            )
    return model.eval()


def auto_class_for(config: Any, model_class: str) -> str | None:
    """The name of the transformers Auto class that maps this config to `model_class`."""
    tf = _transformers()
    model_type = getattr(config, "model_type", None)
    for attr in _auto_model_names():
        mapping = getattr(getattr(tf, attr, None), "_model_mapping", None)
        names = getattr(mapping, "_model_mapping", None)
        if isinstance(names, dict) and names.get(model_type) == model_class:
            return attr
    return None


@functools.cache
def _auto_model_names() -> tuple[str, ...]:
    """transformers' AutoModel* classes (listing its lazy module takes 0.3 s or more)."""
    return tuple(sorted(a for a in dir(_transformers()) if a.startswith("AutoModel")))


def example_inputs_for(
    model: torch.nn.Module, input_shapes: list[tuple[int, ...]] | None = None,
    seq_len: int | None = None,
) -> tuple[tuple, tuple[str, ...]]:
    """Seeded example inputs implied by the config; ``input_shapes`` override the sizes."""
    config = model.config
    main = getattr(model, "main_input_name", "input_ids")
    seq = seq_len or DEFAULT_SEQ_LEN
    if seq < 1:
        raise ModelLoadError(f"--seq-len {seq} must be a positive integer")
    gen = torch.Generator().manual_seed(0)
    shapes = list(input_shapes or [])
    if main == "input_ids":
        shape = shapes[0] if shapes else (1, seq)
        vocab = int(getattr(config, "vocab_size", None) or 2)
        ids = torch.randint(0, vocab, shape, generator=gen)
        inputs, names = [ids, torch.ones(shape, dtype=torch.long)], ["input_ids", "attention_mask"]
    elif main == "pixel_values":
        channels = int(getattr(config, "num_channels", 3) or 3)
        size = getattr(config, "image_size", 224) or 224
        height, width = (size, size) if isinstance(size, int) else tuple(size)[:2]
        shape = shapes[0] if shapes else (1, channels, height, width)
        inputs, names = [torch.randn(shape, generator=gen)], ["pixel_values"]
    elif main == "input_values" and getattr(config, "num_mel_bins", None):
        # a spectrogram (AST): max_length frames of num_mel_bins
        frames = int(getattr(config, "max_length", None) or 1024)
        shape = shapes[0] if shapes else (1, frames, int(config.num_mel_bins))
        inputs, names = [torch.randn(shape, generator=gen)], ["input_values"]
    elif main == "input_values":  # raw waveform (wav2vec2, HuBERT, ...): one second
        shape = shapes[0] if shapes else (1, 16000)
        inputs, names = [torch.randn(shape, generator=gen)], ["input_values"]
    elif main == "input_features":  # log-mel features (Whisper, Speech2Text)
        bins = int(getattr(config, "num_mel_bins", None) or 80)
        frames = 2 * int(getattr(config, "max_source_positions", None) or 1500)
        shape = shapes[0] if shapes else (1, bins, frames)
        inputs, names = [torch.randn(shape, generator=gen)], ["input_features"]
    else:
        raise ModelLoadError(
            f"{type(model).__name__} takes {main!r}, for which PruneScope cannot make example "
            "inputs from the config; give the model in Python with example inputs"
        )
    if getattr(config, "is_encoder_decoder", False):
        vocab = int(getattr(config, "vocab_size", None) or 2)
        shape = shapes[1] if len(shapes) > 1 else (inputs[0].shape[0], seq)
        inputs.append(torch.randint(0, vocab, shape, generator=gen))
        names.append("decoder_input_ids")
    return tuple(inputs), tuple(names)


def _carried_files(path: Path) -> list[str]:
    """Non-weight files of the folder and its subfolders (tokenizer, processor, generation
    config, a sentence-transformers ``1_Pooling/config.json``), as paths relative to it."""
    carried = []
    for item in sorted(path.rglob("*")):
        rel = item.relative_to(path)
        name = item.name
        if any(part.startswith(".") for part in rel.parts) or not item.is_file() \
                or item.is_symlink():
            continue
        if (len(rel.parts) == 1 and name in _NOT_CARRIED_NAMES) or \
                name.lower().endswith(_NOT_CARRIED_SUFFIXES):
            continue
        if any((path / p).is_symlink() for p in rel.parents if str(p) != ".") or \
                item.stat().st_size > _CARRIED_MAX_BYTES:
            continue
        carried.append(rel.as_posix())
    return carried


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars or advice on stderr while PruneScope saves and reloads folders."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
