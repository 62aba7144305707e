"""Datasets: images in [0, 1] before any key, fixed reproducible splits."""

import os
import warnings

import numpy as np
import pytest
import torch

from kp_plugin.data import (
    DatasetError,
    DatasetNameWarning,
    ImageFolderDataset,
    PHOTO_SOURCES,
    image_01,
    iterate_batches,
    load_dataset,
    save_npz,
)

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def digits_train():
    return load_dataset("digits", split="train", image_size=16)


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", split="test", image_size=16)


def test_digits_are_rgb_images_in_unit_range(digits_train):
    image, label = digits_train[0]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert 0 <= float(digits_train.images.min()) and float(digits_train.images.max()) <= 1
    assert isinstance(label, int) and digits_train.classes == [str(i) for i in range(10)]


def test_digits_split_is_disjoint_stratified_and_reproducible(digits_train, digits_test):
    assert len(digits_train) + len(digits_test) == 1797
    counts = torch.bincount(digits_test.labels, minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37
    again = load_dataset("digits", split="test", image_size=16)
    assert torch.equal(again.images, digits_test.images)
    train_rows = {tuple(x.flatten().tolist()) for x in digits_train.images[:, 0, ::2, ::2]}
    shared = sum(tuple(x.flatten().tolist()) in train_rows for x in digits_test.images[:, 0, ::2, ::2])
    assert shared <= 5  # a handful of identical scans exist in sklearn's digits; no real overlap


def test_another_seed_gives_another_split(digits_test):
    other = load_dataset("digits", split="test", image_size=16, seed=1)
    assert not torch.equal(other.images, digits_test.images)


def test_photos_have_one_class_per_photograph():
    pytest.importorskip("skimage")
    test = load_dataset("photos", split="test", image_size=32)
    assert test.classes == list(PHOTO_SOURCES)
    assert torch.bincount(test.labels).tolist() == [60] * len(PHOTO_SOURCES)
    assert test.images.shape[1:] == (3, 32, 32)
    # colour matters: per-class mean colours differ
    means = torch.stack([test.images[test.labels == c].mean(dim=(0, 2, 3)) for c in range(len(PHOTO_SOURCES))])
    assert float(torch.cdist(means, means).max()) > 0.2


def test_image_folder_reads_class_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    dataset = load_dataset(str(tmp_path), image_size=16)
    assert isinstance(dataset, ImageFolderDataset) and dataset.classes == ["cat", "dog"]
    image, label = dataset[3]
    assert image.shape == (3, 16, 16) and label == 1 and 0 <= float(image.min()) <= float(image.max()) <= 1
    batches = list(iterate_batches(dataset, batch_size=3))
    assert [b[0].shape[0] for b in batches] == [3, 1]


def test_split_folders_share_one_class_list(tmp_path):
    # A class missing from one split must not shift the labels of the others.
    from PIL import Image

    for split, classes in (("train", ("ant", "bee", "cat")), ("test", ("bee", "cat", "dog"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    train = load_dataset(str(tmp_path), split="train", image_size=8)
    test = load_dataset(str(tmp_path), split="test", image_size=8)
    assert train.classes == test.classes == ["ant", "bee", "cat", "dog"]
    assert train.labels.tolist() == [0, 1, 2] and test.labels.tolist() == [1, 2, 3]


@pytest.mark.parametrize("held_out", ["test", "val", "validation", "valid"])
def test_a_val_folder_is_the_test_split_as_in_timm_layouts(tmp_path, held_out):
    from PIL import Image

    for split, classes in (("train", ("ant", "bee")), (held_out, ("ant", "bee", "cat"))):
        for cls in classes:
            (tmp_path / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / split / cls / "0.png")
    train = load_dataset(str(tmp_path), split="train", image_size=8)
    test = load_dataset(str(tmp_path), split="test", image_size=8)
    assert (train.split, test.split) == ("train", "test")  # no 'trained and evaluated on the same images' warning
    assert train.classes == test.classes == ["ant", "bee", "cat"]
    assert len(train) == 2 and test.labels.tolist() == [0, 1, 2]


def test_a_folder_with_a_train_split_only_names_the_folders_it_looked_for(tmp_path):
    from PIL import Image

    (tmp_path / "train" / "ant").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "train" / "ant" / "0.png")
    with pytest.raises(DatasetError, match=r"has the split folder train/ but no test split \(test/ or val/"):
        load_dataset(str(tmp_path), split="test", image_size=8)


def _write_images(folder, count=1, size=(8, 8)):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_an_empty_class_folder_is_rejected_by_name(tmp_path):
    # It would be a class no image belongs to: one output too many and a
    # misstated chance level (torchvision's ImageFolder refuses it too).
    _write_images(tmp_path / "cat")
    _write_images(tmp_path / "dog")
    (tmp_path / "emu").mkdir()
    with pytest.raises(DatasetError, match=r"emu hold no images .* remove the folder\(s\) or add images"):
        load_dataset(str(tmp_path), image_size=8)


def test_a_class_without_images_in_any_split_is_rejected_but_one_split_may_lack_it(tmp_path):
    for split in ("train", "test"):
        _write_images(tmp_path / split / "cat")
        _write_images(tmp_path / split / "dog")
    (tmp_path / "train" / "emu").mkdir()
    (tmp_path / "test" / "emu").mkdir()
    for split in ("train", "test"):
        with pytest.raises(DatasetError, match=r"train/emu, .*test/emu hold no images"):
            load_dataset(str(tmp_path), split=split, image_size=8)
    _write_images(tmp_path / "test" / "emu")
    train = load_dataset(str(tmp_path), split="train", image_size=8)
    assert train.classes == ["cat", "dog", "emu"] and train.labels.tolist() == [0, 1]


def test_an_image_over_pils_pixel_limit_is_a_dataset_error_naming_the_file(tmp_path, monkeypatch):
    from PIL import Image

    _write_images(tmp_path / "cat", size=(32, 32))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 is over twice the limit: DecompressionBombError
    dataset = load_dataset(str(tmp_path), image_size=8)
    with pytest.raises(DatasetError, match=r"cat/0\.png: .*PIL\.Image\.MAX_IMAGE_PIXELS"):
        dataset[0]


def test_a_folder_named_like_an_embedded_dataset_warns_and_loads_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_images(tmp_path / "digits" / "cat")
    _write_images(tmp_path / "digits" / "dog")
    with pytest.warns(DatasetNameWarning, match=r"folder \./digits here is not used; .* pass it as a path: \./digits"):
        embedded = load_dataset("digits", split="test", image_size=8)
    assert embedded.classes == [str(i) for i in range(10)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folder = load_dataset("./digits", image_size=8)
    assert isinstance(folder, ImageFolderDataset) and folder.classes == ["cat", "dog"]


def test_ppm_and_pgm_images_are_read_as_torchvision_reads_them(tmp_path):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "cat" / "0.ppm")
    (tmp_path / "dog").mkdir()
    Image.fromarray(np.full((8, 8), 255, dtype=np.uint8)).save(tmp_path / "dog" / "0.pgm")
    dataset = load_dataset(str(tmp_path), image_size=8)
    assert [path.name for path, _ in dataset.samples] == ["0.ppm", "0.pgm"]
    assert float(dataset[1][0].min()) == 1.0


@pytest.mark.skipif(os.name != "posix", reason="symlinks")
def test_images_in_a_symlinked_folder_are_read_and_a_symlink_loop_ends(tmp_path):
    _write_images(tmp_path / "elsewhere", count=2)
    _write_images(tmp_path / "data" / "cat")
    (tmp_path / "data" / "cat" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "data" / "cat" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    dataset = load_dataset(str(tmp_path / "data"), image_size=8)
    names = [str(path.relative_to(tmp_path / "data")) for path, _ in dataset.samples]
    assert names == ["cat/0.png", "cat/linked/0.png", "cat/linked/1.png"]


def _ramp(bits: int) -> np.ndarray:
    top = (1 << bits) - 1
    return np.linspace(0, top, 24 * 32).reshape(24, 32).astype(np.uint16 if bits == 16 else np.uint8)


@pytest.mark.parametrize("name, make", [
    ("16-bit PNG", lambda Image: Image.fromarray(_ramp(16))),
    ("32-bit integer", lambda Image: Image.fromarray(_ramp(16).astype(np.int32))),
    ("32-bit integer holding 8-bit values", lambda Image: Image.fromarray(_ramp(8).astype(np.int32))),
    ("float TIFF in [0, 1]", lambda Image: Image.fromarray((_ramp(8) / 255).astype(np.float32))),
])
def test_high_bit_depth_images_read_like_their_8_bit_version(tmp_path, name, make):
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image) and
    # reads float [0, 1] as 0 or 1: each mode is scaled to [0, 1] instead.
    from PIL import Image

    (tmp_path / "a").mkdir()
    make(Image).save(tmp_path / "a" / ("x.png" if name == "16-bit PNG" else "x.tiff"))
    Image.fromarray(_ramp(8)).save(tmp_path / "eight.png")
    with Image.open(tmp_path / "eight.png") as img:
        expected = image_01(img)
    image, _ = ImageFolderDataset(tmp_path, image_size=32)[0]
    resized = torch.nn.functional.interpolate(expected[None], size=(32, 32), mode="bicubic", antialias=True)[0]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image, resized.clamp(0, 1), atol=2 / 255, rtol=0)


def test_image_01_keeps_8_bit_modes_and_rejects_unreadable_floats():
    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    torch.testing.assert_close(image_01(Image.fromarray(rgb)), torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert image_01(Image.fromarray(rgb).convert("RGBA")).shape == (3, 6, 8)
    assert image_01(Image.fromarray(rgb), channels=1).shape == (1, 6, 8)
    with pytest.raises(DatasetError, match="rescale it first"):
        image_01(Image.fromarray(np.full((4, 4), 1000.0, dtype=np.float32)))


def test_npz_round_trip_keeps_images_to_8_bits(tmp_path, digits_test):
    path = save_npz(digits_test, tmp_path / "digits.npz")
    loaded = load_dataset(str(path))
    assert loaded.classes == digits_test.classes and torch.equal(loaded.labels, digits_test.labels)
    assert float((loaded.images - digits_test.images).abs().max()) <= 0.5 / 255 + 1e-6


def test_unknown_dataset_says_what_is_accepted(tmp_path):
    with pytest.raises(DatasetError, match="digits"):
        load_dataset("cifar-not-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="class sub-folders"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", split="validation")


def test_a_dark_16_bit_pgm_is_read_by_65535_whatever_its_values(tmp_path):
    # PIL opens a 16-bit PGM as 32-bit integers; one whose values stayed at
    # or below 255 (a dark image) was divided by 255: 257 times too bright.
    from PIL import Image

    dark = (np.arange(24 * 32).reshape(24, 32) % 256).astype(">u2")  # at most 255 of 65535
    path = tmp_path / "dark.pgm"
    path.write_bytes(b"P5 32 24 65535\n" + dark.tobytes())
    with Image.open(path) as img:
        assert img.mode == "I"  # what this test is about
        torch.testing.assert_close(image_01(img, channels=1)[0], torch.from_numpy(dark.astype(np.float32) / 65535))


def test_hidden_files_and_folders_in_class_folders_are_skipped(tmp_path):
    # .ipynb_checkpoints/ copies became training images; macOS's ._x.png
    # (AppleDouble metadata, not an image) stopped training when read.
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls / ".ipynb_checkpoints").mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / "0.png")
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / ".ipynb_checkpoints" / "0-checkpoint.png")
        (tmp_path / cls / "._0.png").write_bytes(b"\x00\x05\x16\x07 not an image")
    dataset = ImageFolderDataset(tmp_path, image_size=8)
    assert sorted(path.relative_to(tmp_path).as_posix() for path, _ in dataset.samples) == ["a/0.png", "b/0.png"]
    assert [label for _, label in iterate_batches(dataset, batch_size=2)][0].tolist() == [0, 1]


def test_an_unreadable_image_is_named_with_what_to_do(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / cls / "0.png")
    (tmp_path / "b" / "0.png").write_bytes((tmp_path / "b" / "0.png").read_bytes()[:30])  # truncated
    with pytest.raises(DatasetError, match=r"b/0\.png.*replace or remove that file"):
        ImageFolderDataset(tmp_path, image_size=8)[1]
