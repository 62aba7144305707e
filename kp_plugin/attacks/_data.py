"""Small data plumbing the attacks share: a dataset as tensors, class-balanced
subsets, and batched accuracy of a model under a candidate key."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..checkpoint import usable_device
from ..transforms import check_float_range
from ._candidate import AttackError

__all__ = [
    "as_tensors",
    "class_balanced_indices",
    "resolve_device",
    "batched_logits",
    "candidate_accuracy",
    "num_classes_of",
    "chance_of",
    "as_dataset",
]


def resolve_device(device=None) -> torch.device:
    return usable_device(device)


def as_tensors(dataset, *, indices: Optional[Sequence[int]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``dataset`` items ``(image, label)`` into ``(images, labels)``
    tensors, or take a pair of tensors: float images in [0, 1] (uint8 ones,
    0..255, are scaled to it; floats clearly outside it are an
    :class:`~kp_plugin.InputRangeError`, as :class:`~kp_plugin.KeyedInput`
    gives: every row of an attack must see the same images)."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and isinstance(dataset[0], torch.Tensor):
        images, labels = dataset
        if indices is not None:
            idx = torch.as_tensor(list(indices), dtype=torch.long)
            images, labels = images[idx], labels[idx]
        return _images01(images), torch.as_tensor(labels, dtype=torch.long)
    order = range(len(dataset)) if indices is None else indices
    items = [dataset[i] for i in order]
    if not items:
        raise AttackError("the dataset is empty; attacks need labelled images")
    images = torch.stack([torch.as_tensor(img) for img, _ in items])
    labels = torch.tensor([int(lbl) for _, lbl in items], dtype=torch.long)
    return _images01(images), labels


def _images01(images: torch.Tensor) -> torch.Tensor:
    """uint8 images scaled to [0, 1]; float ones checked to be in it. (The
    plain-image row of the wrong-key attack read uint8 pairs unscaled.)"""
    if images.dtype == torch.uint8:
        return images.float() / 255
    if not images.is_floating_point():
        raise AttackError(f"images have dtype {images.dtype}; pass float images in [0, 1] or uint8 images in 0..255")
    check_float_range(images)
    return images


def num_classes_of(dataset, labels: torch.Tensor) -> int:
    classes = getattr(dataset, "classes", None)
    return len(classes) if classes else int(labels.max()) + 1


def chance_of(labels: torch.Tensor, num_classes: int) -> float:
    """Accuracy of always answering the most frequent class (the chance level
    a protected model should sit at without the key)."""
    counts = torch.bincount(labels, minlength=num_classes)
    return float(counts.max()) / max(1, labels.numel())


def class_balanced_indices(labels: torch.Tensor, fraction: float, *, seed: int = 0) -> list[int]:
    """Indices of a stratified ``fraction`` of the data (at least one image
    per class), reproducible by ``seed``."""
    if not 0 < fraction <= 1:
        raise AttackError(f"data fraction must be in (0, 1], got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        take = max(1, int(round(fraction * members.numel())))
        chosen.extend(members[:take].tolist())
    return sorted(chosen)


@torch.no_grad()
def batched_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """``forward`` over ``images`` in batches; logits on the CPU."""
    outs = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size]
        if device is not None:
            batch = batch.to(device)
        outs.append(forward(batch).float().cpu())
    return torch.cat(outs)


@torch.no_grad()
def candidate_accuracy(attacked, images: torch.Tensor, labels: torch.Tensor, candidate, *, batch_size: int = 256,
                       device: Optional[torch.device] = None) -> float:
    """Top-1 accuracy of a :class:`~kp_plugin.attacks._candidate.CandidateModel`
    under ``candidate`` (``None``: plain images)."""
    logits = batched_logits(lambda x: attacked(x, candidate), images, batch_size=batch_size, device=device)
    return float((logits.argmax(1) == labels).float().mean())


def as_dataset(dataset):
    """``dataset`` itself, or an ``(images, labels)`` pair as an in-memory
    :class:`~kp_plugin.data.TensorImageDataset` (for APIs that take datasets)."""
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and isinstance(dataset[0], torch.Tensor):
        from ..data import TensorImageDataset

        images, labels = dataset
        labels = torch.as_tensor(labels, dtype=torch.long)
        classes = [str(i) for i in range(int(labels.max()) + 1)]
        return TensorImageDataset(images, labels, classes=classes)
    return dataset
