"""A folder of images as model inputs.

Layout: class subfolders (``cat/1.png``, ``dog/2.jpg``: the usual image-folder layout) give
labels, the class index of a subfolder being the model config's ``label2id`` entry for its
name when the config names every class, else its place in the sorted list of names; a flat
folder has no labels. Images are preprocessed with the model folder's image processor
(``preprocessor_config.json``), or resized to ``DataOptions.image_size`` (default: the
model's input size) and normalised with ``mean``/``std`` (default 0 and 1: pixels in
[0, 1]). Images are read ``read_batch`` at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import DataError, one_line
from engine.io.hf import quiet_transformers

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROCESSOR_FILE = "preprocessor_config.json"
# modes with one grey channel: a colour model would see three equal channels, which is not
# what it was trained on; refused rather than silently replicated
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def has_images(folder: Path) -> bool:
    """Whether a folder holds images, directly or in class subfolders."""
    if _images_in(folder):
        return True
    return any(_images_in(sub) for sub in folder.iterdir() if sub.is_dir())


def image_files(folder: Path, where: str) -> tuple[list[Path], list[str] | None]:
    """Every image and, with class subfolders, the class name of each."""
    flat = _images_in(folder)
    classes = sorted(sub.name for sub in folder.iterdir()
                     if sub.is_dir() and not sub.name.startswith(".") and _images_in(sub))
    if flat and classes:
        raise DataError(f"{where} mixes images ({flat[0].name}) with class subfolders "
                        f"({classes[0]}/); put every image in a class subfolder, or none")
    if not flat and not classes:
        raise DataError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if flat:
        return flat, None
    files, names = [], []
    for name in classes:
        for image in _images_in(folder / name):
            files.append(image)
            names.append(name)
    return files, names


def class_indices(names: list[str], config: Any) -> np.ndarray:
    label2id = getattr(config, "label2id", None) or {}
    classes = sorted(set(names))
    if label2id and set(classes) <= set(map(str, label2id)):
        lookup = {str(k): int(v) for k, v in label2id.items()}
    else:
        lookup = {name: i for i, name in enumerate(classes)}
    return np.asarray([lookup[n] for n in names], dtype=np.int64)


def image_arrays(folder: Path, where: str, model: Any, options: Any) \
        -> tuple[tuple[np.ndarray, ...], np.ndarray | None, str]:
    """(pixel arrays ``(N, C, H, W)``, labels or None, a note on the preprocessing)."""
    if len(model.shapes) != 1 or len(model.shapes[0]) != 4 or model.integer[0]:
        raise DataError(f"{where} holds images, but {model.source} does not take one image "
                        "tensor (N, C, H, W) of floats")
    files, names = image_files(folder, where)
    if options.max_samples is not None and options.max_samples < len(files):
        keep = np.sort(np.random.default_rng(options.seed).choice(
            len(files), options.max_samples, replace=False))
        files = [files[i] for i in keep]
        names = None if names is None else [names[i] for i in keep]
    labels = None if names is None else class_indices(names, model.config)
    channels = model.shapes[0][1] or 3
    manual = options.image_size is not None or options.mean is not None or \
        options.std is not None
    processor_folder = None if manual or model.folder is None else Path(model.folder)
    if processor_folder is not None and (processor_folder / PROCESSOR_FILE).is_file():
        processor = _processor(processor_folder, where)
        note = f"image processor of {processor_folder}"
    else:
        processor = None
        size = _size(model, options, where)
        mean = _per_channel(options.mean, channels, 0.0, "--mean", where)
        std = _per_channel(options.std, channels, 1.0, "--std", where)
        if np.any(std <= 0):
            raise DataError(f"{where}: --std must be positive")
        note = (f"resized to {size[0]}x{size[1]}, pixels/255 normalised with mean "
                f"{mean.tolist()}, std {std.tolist()}")
    parts = []
    for start in range(0, len(files), options.read_batch):
        images = [_open(f, channels, where) for f in files[start:start + options.read_batch]]
        if processor is not None:
            try:
                out = processor(images=images, return_tensors="np")["pixel_values"]
            except Exception as exc:  # noqa: BLE001 - any failure: images it cannot take
                raise DataError(f"{where}: the image processor failed ({one_line(exc)})") \
                    from None
            parts.append(np.asarray(out, dtype=np.float32))
        else:
            parts.append(np.stack([_manual(im, size, mean, std) for im in images]))
    pixels = np.concatenate(parts)
    expected = model.shapes[0]
    if any(s is not None and s != d for s, d in zip(expected[1:], pixels.shape[1:])):
        want = ", ".join("N" if s is None else str(s) for s in expected)
        raise DataError(f"{where}: preprocessing gives images of shape {pixels.shape[1:]}, but "
                        f"{model.source} takes ({want}); give --image-size H,W")
    return (pixels,), labels, note


def _size(model: Any, options: Any, where: str) -> tuple[int, int]:
    if options.image_size is not None:
        return tuple(int(v) for v in options.image_size)
    height, width = model.shapes[0][2], model.shapes[0][3]
    if height is None or width is None:
        raise DataError(f"{where}: {model.source} takes images of any size; give "
                        "--image-size H,W")
    return int(height), int(width)


def _per_channel(values, channels: int, default: float, flag: str, where: str) -> np.ndarray:
    if values is None:
        return np.full(channels, default, dtype=np.float32)
    values = np.asarray(values, dtype=np.float32).reshape(-1)
    if values.size == 1:
        return np.full(channels, float(values[0]), dtype=np.float32)
    if values.size != channels:
        raise DataError(f"{where}: {flag} gives {values.size} values for {channels} channels; "
                        f"give one value, or one per channel")
    return values


def _open(path: Path, channels: int, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            mode = image.mode
            if channels == 3 and mode in GREY_MODES:
                raise DataError(f"{where}: {path.name} is a grey image (mode {mode}); the model "
                                "takes 3 colour channels (RGB); convert the images to RGB")
            if channels == 1 and mode not in GREY_MODES:
                raise DataError(f"{where}: {path.name} is a colour image (mode {mode}); the "
                                "model takes 1 grey channel (mode L); convert the images")
            if channels not in (1, 3):
                raise DataError(f"{where}: the model takes {channels} channels; images give 1 "
                                "(grey) or 3 (RGB)")
            return image.convert("L" if channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{where}: {path.name} is not a readable image ({one_line(exc)})") \
            from None


def _manual(image, size: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    from PIL import Image

    resized = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32) / 255.0
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    pixels = (pixels - mean) / std
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _processor(folder: Path, where: str):
    try:
        from transformers import AutoImageProcessor


        with quiet_transformers():
            return AutoImageProcessor.from_pretrained(os.fspath(folder), local_files_only=True,
                                                      trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure: an unusable processor
        raise DataError(f"{where}: the image processor of {folder} could not be loaded "
                        f"({one_line(exc)}); give --image-size/--mean/--std instead") \
            from None
