"""engine/io/data_images.py: a folder of images (class subfolders = labels, flat = none)
preprocessed for the model; real PNG/JPEG files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import engine
from engine.errors import DataError
from engine.io.data import DataOptions, load_data
from tests.helpers import cli, one_error_line


class TinyNet(torch.nn.Module):
    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def _image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    gen = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(gen.integers(0, 256, shape, dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture()
def classes(tmp_path) -> Path:
    root = tmp_path / "images"
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            suffix = ".png" if i % 2 else ".jpg"
            _image(root / name / f"{i}{suffix}", (10 + i, 12), seed=10 * label + i)
    return root


def _expected(files: list[Path], size=(8, 8), mean=0.0, std=1.0) -> np.ndarray:
    out = []
    for f in files:
        with Image.open(f) as im:
            a = np.asarray(im.convert("RGB").resize((size[1], size[0]),
                                                    Image.Resampling.BILINEAR), np.float32)
        out.append(((a / 255.0 - mean) / std).transpose(2, 0, 1))
    return np.stack(out)


def test_class_subfolders_become_labels(classes) -> None:
    model = engine.load_model(TinyNet(), (torch.zeros(1, 3, 8, 8),))
    data = load_data(classes, model=model, options=DataOptions(read_batch=2))
    files = sorted((classes / "cat").iterdir()) + sorted((classes / "dog").iterdir())
    np.testing.assert_array_equal(data.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_allclose(data.inputs[0], _expected(files), atol=1e-6)
    assert data.form == "images"
    result = engine.evaluate(model, data)
    assert result["metric"] == "accuracy"
    with torch.no_grad():
        pred = TinyNet()(torch.as_tensor(_expected(files))).argmax(-1).numpy()
    assert result["value"] == pytest.approx(np.mean(pred == [0, 0, 0, 1, 1, 1]))
    # mean/std and a size given by hand
    data = load_data(classes, model=model, options=DataOptions(mean=(0.5,), std=(0.25,),
                                                               image_size=(8, 8)))
    np.testing.assert_allclose(data.inputs[0], _expected(files, mean=0.5, std=0.25), atol=1e-5)
    # a seeded subset
    some = load_data(classes, model=model, options=DataOptions(max_samples=4, seed=3))
    assert len(some) == 4 and set(some.labels) <= {0, 1}


def test_a_flat_folder_has_no_labels(tmp_path) -> None:
    for i in range(3):
        _image(tmp_path / f"{i}.png", (8, 8), seed=i)
    model = engine.load_model(TinyNet(), (torch.zeros(1, 3, 8, 8),))
    data = load_data(tmp_path, model=model)
    assert data.labels is None and data.inputs[0].shape == (3, 3, 8, 8)


def test_bad_images_are_one_line(classes, tmp_path) -> None:
    colour = engine.load_model(TinyNet(), (torch.zeros(1, 3, 8, 8),))
    _image(classes / "dog" / "grey.png", (8, 8), seed=5, mode="L")
    with pytest.raises(DataError) as info:
        load_data(classes, model=colour)
    assert "grey.png is a grey image (mode L); the model takes 3 colour channels" in \
        str(info.value) and "images" in str(info.value)
    grey = engine.load_model(TinyNet(1), (torch.zeros(1, 1, 8, 8),))
    with pytest.raises(DataError, match=r"0.jpg is a colour image \(mode RGB\); the model "
                                         r"takes 1 grey channel"):
        load_data(classes, model=grey)
    (classes / "stray.png").write_bytes((classes / "dog" / "grey.png").read_bytes())
    with pytest.raises(DataError, match="mixes images .* with class subfolders"):
        load_data(classes, model=colour)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="a.png is not a readable image"):
        load_data(broken, model=colour)
    with pytest.raises(DataError, match="--mean gives 2 values for 3 channels"):
        load_data(tmp_path / "images" / "cat", model=colour,
                  options=DataOptions(mean=(0.1, 0.2)))


def test_a_model_folders_image_processor_is_used(tmp_path, classes, capfd) -> None:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=2, intermediate_size=32, num_labels=2,
                       id2label={0: "dog", 1: "cat"}, label2id={"dog": 0, "cat": 1})
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    ViTForImageClassification(config).save_pretrained(folder)
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.4] * 3,
                                  image_std=[0.2] * 3)
    processor.save_pretrained(folder)
    model = engine.load_model(folder)
    data = load_data(classes, model=model)
    files = sorted((classes / "cat").iterdir()) + sorted((classes / "dog").iterdir())
    images = [Image.open(f).convert("RGB") for f in files]
    want = ViTImageProcessor.from_pretrained(folder)(images=images, return_tensors="np")
    np.testing.assert_allclose(data.inputs[0], want["pixel_values"], atol=1e-5)
    # class names follow the config's label2id, not the folder order
    np.testing.assert_array_equal(data.labels, [1, 1, 1, 0, 0, 0])
    rc, out, err = cli(capfd, "evaluate", folder, "--data", classes)
    assert rc == 0, err
    assert out.startswith("accuracy ") and "(6 samples)" in out
    rc, _, err = cli(capfd, "evaluate", folder, "--data", tmp_path / "nothing-here")
    assert rc == 2 and "nothing-here does not exist" in one_error_line(err)
