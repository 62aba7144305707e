"""Datasets for protected fine-tuning: two embedded ones and ImageFolder.

Every dataset yields ``(image, label)`` with ``image`` a float32 ``(C, H, W)``
tensor in [0, 1] *before* any keyed transform or normalization (the
:class:`~kp_plugin.module.ProtectedModel` does both inside its forward), and
``label`` an int.

- ``"digits"``: scikit-learn's handwritten digits (real handwriting, 10
  classes, 1797 images of 8x8), upsampled (bicubic) to RGB at a size that
  is a multiple of every block size the demo uses, with a fixed stratified
  train/test split.
- ``"photos"``: crops of eight real colour photographs shipped with
  scikit-image; the class is the photograph a crop comes from. A crop shows
  only a patch of a scene, so colour and texture statistics carry much of
  the answer, which is what makes block-statistics leaks visible. Train and
  test crops come from disjoint strips of each photograph.
- a directory in ImageFolder layout (one sub-folder per class), read lazily
  and resized to ``image_size``.
- a ``.npz`` file written by :func:`save_npz` (to carry a dataset to a
  machine without scikit-learn / scikit-image).

Example:
    >>> train = load_dataset("digits", split="train")          # doctest: +SKIP
    >>> image, label = train[0]; image.shape                   # doctest: +SKIP
    torch.Size([3, 32, 32])
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .cli import MIN_DATASET_IMAGE_SIZE
from .errors import ConfigurationError, DatasetError, DatasetNameWarning

__all__ = [
    "ImageDataset",
    "TensorImageDataset",
    "ImageFolderDataset",
    "DatasetError",
    "DatasetNameWarning",
    "load_dataset",
    "save_npz",
    "iterate_batches",
    "image_01",
    "DEFAULT_IMAGE_SIZE",
    "EMBEDDED_DATASETS",
    "PHOTO_SOURCES",
    "IMAGE_EXTENSIONS",
]


#: Image side per embedded dataset (a multiple of 2, 4, 8, 16 and 32, so
#: every block size the demo and benchmarks use fits). Digits are 8x8 scans:
#: 32x32 keeps the demo within minutes on two CPU cores at no cost in
#: accuracy (99.4% unprotected vs 99.7% at 64x64, docs/benchmarks.md);
#: photos lose 5 points at 32x32, so they stay at 64x64.
DEFAULT_IMAGE_SIZE = {"digits": 32, "photos": 64, "folder": 224}

EMBEDDED_DATASETS = ("digits", "photos")

#: The scikit-image colour photographs of the "photos" task (all shipped
#: inside the scikit-image wheel, no download).
PHOTO_SOURCES = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)

#: torchvision's ImageFolder extensions, plus .gif.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_SPLITS = ("train", "test")
#: Folder names an ImageFolder split may have, in the order they are tried
#: (timm and torchvision layouts name the held-out split val/ or validation/).
_SPLIT_FOLDERS = {"train": ("train", "training"), "test": ("test", "val", "validation", "valid")}
_DIGITS_TEST_FRACTION = 0.2
_PHOTOS_PER_CLASS = {"train": 160, "test": 60}
# Train crops come from the left part of each photograph, test crops from
# the right strip, so no test pixel was seen in training.
_PHOTOS_TEST_STRIP = 0.3


class ImageDataset(torch.utils.data.Dataset):
    """Base class: ``(image, label)`` pairs, images float32 CHW in [0, 1].

    Attributes:
        classes: class names, index = label.
        image_size: side of the (square) images.
        name: where the dataset came from ("digits", "photos", a path).
        split: "train" or "test" (or "all" for an ImageFolder without split).
    """

    classes: list
    image_size: int
    name: str
    split: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, image_size={self.image_size})"
        )


class TensorImageDataset(ImageDataset):
    """A dataset held in memory as one ``(N, C, H, W)`` float tensor.

    Args:
        images: ``(N, C, H, W)`` float in [0, 1] (uint8 is converted).
        labels: ``(N,)`` integer labels.
        classes: class names.
        name, split: provenance.

    Example:
        >>> ds = TensorImageDataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), classes=["a", "b"])
        >>> ds[1][1]
        1
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        classes: Sequence[str],
        name: str = "tensors",
        split: str = "train",
    ) -> None:
        if images.dtype == torch.uint8:
            images = images.float() / 255
        if images.dim() != 4 or images.shape[2] != images.shape[3]:
            raise DatasetError(f"images must be (N, C, H, W) with H == W, got {tuple(images.shape)}")
        labels = torch.as_tensor(labels, dtype=torch.int64)
        if labels.shape != (images.shape[0],):
            raise DatasetError(f"{images.shape[0]} images but labels have shape {tuple(labels.shape)}")
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(classes)):
            raise DatasetError(f"labels must be in 0..{len(classes) - 1}")
        self.images = images.float().contiguous()
        self.labels = labels
        self.classes = list(classes)
        self.image_size = int(images.shape[-1])
        self.name = name
        self.split = split

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple:
        return self.images[index], int(self.labels[index])


def _image_files(folder: Path) -> Iterator[Path]:
    """The image files under ``folder``, at any depth, through symlinked
    folders too (as torchvision's ImageFolder reads them; ``Path.rglob``
    does not follow them before Python 3.13). A folder reached twice (a
    symlink loop, or two links to one folder) is read once."""
    seen = set()
    for parent, folders, files in os.walk(folder, followlinks=True):
        try:
            info = os.stat(parent)
        except OSError:
            folders[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            folders[:] = []
            continue
        seen.add((info.st_dev, info.st_ino))
        # Hidden folders and files are skipped, as hidden class folders are:
        # .ipynb_checkpoints/ held copies of the images, macOS's ._x.png
        # (AppleDouble metadata) stopped training at its first read.
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(parent) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                yield path


def _split_folder(root: Path, split: str) -> Optional[Path]:
    """The first folder of ``root`` that holds ``split`` (see _SPLIT_FOLDERS)."""
    return next((root / name for name in _SPLIT_FOLDERS[split] if (root / name).is_dir()), None)


class ImageFolderDataset(ImageDataset):
    """Images in ``root/<class>/<file>``, read lazily, converted to RGB and
    resized (bicubic) to ``image_size x image_size``.

    If ``root`` has split sub-folders, ``split`` picks one: ``train/``
    (or ``training/``) and ``test/`` (or, as timm and torchvision layouts
    name it, ``val/``, ``validation/``, ``valid/``); otherwise the whole
    folder is used (split "all"). The classes are the class folders of
    every split together, so a label means the same class in each split
    even where one split lacks a class; a class folder with no image in
    any split is an error. Images are found at any depth of a class
    folder, through symlinked folders too.
    """

    def __init__(self, root: Union[str, os.PathLike], *, image_size: int, split: Optional[str] = None) -> None:
        root = Path(root)
        class_roots = [root]
        found = {name: _split_folder(root, name) for name in _SPLIT_FOLDERS}
        if split is not None and found.get(split) is not None:
            class_roots = [folder for folder in found.values() if folder is not None]
            root = found[split]
        elif split is not None and any(found.values()):
            present = ", ".join(f"{folder.name}/" for folder in found.values() if folder is not None)
            wanted = " or ".join(f"{name}/" for name in _SPLIT_FOLDERS.get(split, (split,)))
            raise DatasetError(f"{root} has the split folder {present} but no {split} split ({wanted})")
        if not root.is_dir():
            raise DatasetError(f"{root} is not a directory; pass 'digits', 'photos' or an ImageFolder directory")
        self.classes = sorted({p.name for folder in class_roots for p in folder.iterdir()
                               if p.is_dir() and not p.name.startswith(".")})
        if not self.classes:
            raise DatasetError(
                f"{root} has no class sub-folders; an ImageFolder directory holds one folder per class "
                "(e.g. root/cat/1.jpg, root/dog/2.jpg)"
            )
        self.samples = [
            (path, label) for label, cls in enumerate(self.classes) for path in sorted(_image_files(root / cls))
        ]
        if not self.samples:
            raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        # A class folder without images in any split would still be a class
        # (an output no image trains, and a wrong chance level);
        # torchvision's ImageFolder refuses one too.
        labelled = {label for _, label in self.samples}
        empty = [
            cls for label, cls in enumerate(self.classes)
            if label not in labelled and not any(next(_image_files(folder / cls), None) for folder in class_roots)
        ]
        if empty:
            folders = ", ".join(str(folder / cls) for cls in empty for folder in class_roots if (folder / cls).is_dir())
            raise DatasetError(
                f"the class folder(s) {folders} hold no images ({', '.join(IMAGE_EXTENSIONS)}), so "
                f"{', '.join(empty)} would be a class with no image; remove the folder(s) or add images to them"
            )
        self.image_size = int(image_size)
        self.name = str(root)
        self.split = split if (split is not None and found.get(split) == root) else "all"
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def use_classes(self, classes: Sequence[str]) -> None:
        """Label the images by their class folder's place in ``classes`` (a
        model's class list that holds every folder here): a test set with
        some of the classes a model was trained on lines up with its
        outputs."""
        classes = [str(name) for name in classes]
        missing = sorted(set(self.classes) - set(classes))
        if missing:
            raise DatasetError(f"{self.name} has class folders that are not among the classes given: {missing}")
        place = {name: index for index, name in enumerate(classes)}
        self.samples = [(path, place[self.classes[label]]) for path, label in self.samples]
        self.classes = classes
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                image = image_01(img)
        except OSError as exc:
            raise DatasetError(f"cannot read image {path}: {exc}; replace or remove that file") from None
        except Image.DecompressionBombError as exc:
            raise DatasetError(
                f"cannot read image {path}: {str(exc).rstrip('.')}; shrink the image, or, if you trust the file, "
                "raise PIL's limit PIL.Image.MAX_IMAGE_PIXELS (None lifts it) before loading the dataset"
            ) from None
        except DatasetError as exc:
            raise DatasetError(f"{path}: {exc}") from None
        return _resize(image[None], self.image_size)[0], label


#: PIL modes of 16-bit grayscale (16-bit PNG, TIFF); convert("RGB") clips
#: them at 255, which turns most of an image white.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")
#: Formats whose 32-bit integer mode ("I") holds samples of up to 16 bits,
#: scaled to 0..65535 by PIL (a 16-bit PGM opens as "I"): read by 65535
#: whatever the values, so a dark image is not read 257 times too bright.
_SIXTEEN_BIT_FORMATS = ("PPM", "PNG")


def image_01(image: Any, channels: int = 3) -> torch.Tensor:
    """A PIL image as float ``(channels, H, W)`` in [0, 1], whatever its
    mode: 8-bit (L, P, RGB, RGBA, CMYK, ...) through PIL's conversion, 16-bit
    grayscale divided by 65535 (PGM and PNG files PIL opens as 32-bit
    integers too), other 32-bit integer images by 65535 when their values
    pass 255 (else by 255), 32-bit float taken as [0, 1] (or 0..255)."""
    if channels not in (1, 3):
        raise DatasetError(f"images can be read as 1 or 3 channels, not {channels}")
    if image.mode in _SIXTEEN_BIT_MODES or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if image.mode == "F":
            if float(values.min(initial=0.0)) < 0 or top > 255:
                raise DatasetError(
                    f"a 32-bit float image with values from {values.min():g} to {top:g}; kp-plugin reads float "
                    "images as [0, 1] (or 0..255): rescale it first"
                )
            scale = 1.0 if top <= 1 else 255.0
        else:
            sixteen = image.mode in _SIXTEEN_BIT_MODES or getattr(image, "format", None) in _SIXTEEN_BIT_FORMATS
            scale = 65535.0 if (sixteen or top > 255) else 255.0
        gray = torch.from_numpy(values / scale).float().clamp_(0, 1)[None]
        return gray.repeat(channels, 1, 1) if channels > 1 else gray
    array = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
    tensor = torch.from_numpy(array.copy()).float().div_(255)
    return tensor.permute(2, 0, 1) if tensor.dim() == 3 else tensor[None]


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bicubic resize of ``(N, C, h, w)`` to ``size x size``, kept in [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


def _check_size(image_size: Optional[int], default: int) -> int:
    size = default if image_size is None else int(image_size)
    if size < MIN_DATASET_IMAGE_SIZE:
        raise DatasetError(f"image_size must be at least {MIN_DATASET_IMAGE_SIZE}, got {size}")
    return size


def _load_digits(split: str, image_size: int, seed: int) -> TensorImageDataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ConfigurationError(
            "the 'digits' dataset needs scikit-learn (`pip install 'kp-plugin[demo]'`, or `pip install scikit-learn`), "
            "or pass a .npz written by kp_plugin.data.save_npz"
        ) from None
    digits = load_digits()
    images = np.asarray(digits.images, dtype=np.float32) / 16.0
    labels = np.asarray(digits.target, dtype=np.int64)
    # Stratified split with numpy's legacy generator (its stream is frozen,
    # so the split is the same on every version and machine).
    rng = np.random.RandomState(seed)
    test = np.zeros(len(labels), dtype=bool)
    for cls in range(10):
        idx = np.flatnonzero(labels == cls)
        idx = idx[rng.permutation(len(idx))]
        test[idx[: int(round(len(idx) * _DIGITS_TEST_FRACTION))]] = True
    keep = test if split == "test" else ~test
    x = torch.from_numpy(images[keep])[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x.contiguous(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    return TensorImageDataset(
        x.clamp_(0, 1),
        torch.from_numpy(labels[keep]),
        classes=[str(i) for i in range(10)],
        name="digits",
        split=split,
    )


def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError:
        raise ConfigurationError(
            "the 'photos' dataset needs scikit-image (`pip install 'kp-plugin[demo]'`, or `pip install scikit-image`), "
            "or pass a .npz written by kp_plugin.data.save_npz"
        ) from None
    image = getattr(skimage.data, name)()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[0]
    return np.asarray(image[..., :3], dtype=np.uint8)


def _load_photos(split: str, image_size: int, seed: int) -> TensorImageDataset:
    # Different streams for train and test; the crops are fixed given seed.
    rng = np.random.RandomState(seed * 2 + (split == "test"))
    count = _PHOTOS_PER_CLASS[split]
    crops, labels = [], []
    for label, name in enumerate(PHOTO_SOURCES):
        photo = torch.from_numpy(_photo(name)).permute(2, 0, 1).float().div_(255)
        _, height, width = photo.shape
        boundary = int(round(width * (1 - _PHOTOS_TEST_STRIP)))
        x_lo, x_hi = (boundary, width) if split == "test" else (0, boundary)
        short = min(height, x_hi - x_lo)
        made = 0
        attempts = 0
        while made < count:
            attempts += 1
            side = int(rng.randint(max(image_size // 2, short // 6), max(image_size // 2, short // 2) + 1))
            side = min(side, short)
            top = int(rng.randint(0, height - side + 1))
            left = int(rng.randint(x_lo, x_hi - side + 1))
            crop = photo[:, top : top + side, left : left + side]
            # Skip crops of flat background (black borders of retina / hubble),
            # which no method could classify.
            if float(crop.std()) < 0.04 and attempts < count * 20:
                continue
            crops.append(_resize(crop[None], image_size)[0])
            labels.append(label)
            made += 1
    return TensorImageDataset(
        torch.stack(crops),
        torch.tensor(labels),
        classes=list(PHOTO_SOURCES),
        name="photos",
        split=split,
    )


def _load_npz(path: Path, image_size: Optional[int]) -> TensorImageDataset:
    try:
        with np.load(path, allow_pickle=False) as data:
            images = torch.from_numpy(data["images"])
            labels = torch.from_numpy(data["labels"])
            classes = [str(c) for c in data["classes"]]
            name = str(data["name"]) if "name" in data else path.stem
            split = str(data["split"]) if "split" in data else "all"
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"{path} is not a dataset written by save_npz ({exc})") from None
    dataset = TensorImageDataset(images, labels, classes=classes, name=name, split=split)
    if image_size is not None and image_size != dataset.image_size:
        dataset.images = _resize(dataset.images, image_size)
        dataset.image_size = int(image_size)
    return dataset


def load_dataset(
    name: str,
    *,
    split: str = "train",
    image_size: Optional[int] = None,
    seed: int = 0,
) -> ImageDataset:
    """Load an embedded dataset or an ImageFolder directory.

    Args:
        name: ``"digits"``, ``"photos"``, an ImageFolder directory (one
            sub-folder per class; ``train/`` and ``test/`` sub-folders are
            used as splits when present), or a ``.npz`` from :func:`save_npz`.
        split: ``"train"`` or ``"test"``.
        image_size: side of the square images; default
            :data:`DEFAULT_IMAGE_SIZE` for the dataset. Must be a multiple
            of the key's block size to be used with that key.
        seed: fixes the split / crops (the default 0 is the documented one).

    Returns:
        An :class:`ImageDataset` of ``(image, label)``, image float32 CHW in [0, 1].

    Raises:
        DatasetError: unknown name, missing directory, bad split or size.

    Example:
        >>> test = load_dataset("digits", split="test")          # doctest: +SKIP
        >>> len(test.classes)                                     # doctest: +SKIP
        10
    """
    if split not in _SPLITS:
        raise DatasetError(f"split must be 'train' or 'test', got {split!r}")
    if name in EMBEDDED_DATASETS:
        if Path(name).is_dir():
            warnings.warn(
                f"{name!r} loads the embedded {name} dataset, so the folder ./{name} here is not used; to load "
                f"the folder, pass it as a path: ./{name}",
                DatasetNameWarning,
                stacklevel=2,
            )
        size = _check_size(image_size, DEFAULT_IMAGE_SIZE[name])
        return _load_digits(split, size, seed) if name == "digits" else _load_photos(split, size, seed)
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        return _load_npz(path, image_size)
    if path.is_dir():
        return ImageFolderDataset(path, image_size=_check_size(image_size, DEFAULT_IMAGE_SIZE["folder"]), split=split)
    raise DatasetError(
        f"unknown dataset {name!r}: use 'digits', 'photos', an ImageFolder directory "
        "(root/<class>/<image>) or a .npz written by save_npz"
    )


def save_npz(dataset: ImageDataset, path: Union[str, os.PathLike]) -> Path:
    """Write a dataset to one ``.npz`` (uint8 images), loadable with
    ``load_dataset(path)`` where scikit-learn / scikit-image are missing.

    Example:
        >>> save_npz(load_dataset("digits", split="test"), "digits-test.npz")   # doctest: +SKIP
    """
    images, labels = _as_tensors(dataset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        images=(images * 255).round().clamp(0, 255).to(torch.uint8).numpy(),
        labels=labels.numpy(),
        classes=np.array(dataset.classes),
        name=np.array(dataset.name),
        split=np.array(dataset.split),
    )
    return path


def _as_tensors(dataset: ImageDataset) -> tuple:
    if isinstance(dataset, TensorImageDataset):
        return dataset.images, dataset.labels
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def iterate_batches(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    shuffle: bool = False,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
) -> Iterator[tuple]:
    """Yield ``(images, labels)`` batches; in-memory datasets are sliced
    directly (no per-item Python work), others go through a DataLoader."""
    n = len(dataset)
    if isinstance(dataset, TensorImageDataset):
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        stop = n - n % batch_size if (drop_last and n >= batch_size) else n
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield dataset.images[idx], dataset.labels[idx]
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last and n >= batch_size
    )
    for images, labels in loader:
        yield images, torch.as_tensor(labels, dtype=torch.int64)
