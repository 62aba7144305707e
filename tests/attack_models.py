"""Small real models and data for the attack tests.

``PatchNet`` is the smallest ViT-style model: a conv patch embedding
(kernel = stride = block size), GELU, and a linear head. Trained for a few
epochs on scikit-learn's real handwritten digits at their native 8x8
resolution, it is the "public base"; ``adapt_patch_embedding`` turns it into
a protected model that is exactly as accurate with the key, with no keyed
training, which is what makes it a fast, deterministic target.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from kp_plugin import SecretKey, wrap_model
from kp_plugin.adapt import adapt_patch_embedding
from kp_plugin.data import TensorImageDataset, load_dataset

IMAGE_SIZE = 8
BLOCK_SIZE = 4
MEAN = STD = (0.5, 0.5, 0.5)


class PatchNet(nn.Module):
    """Patch embedding -> GELU -> linear head."""

    def __init__(self, *, block_size: int = BLOCK_SIZE, image_size: int = IMAGE_SIZE, dim: int = 32,
                 num_classes: int = 10) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, block_size, stride=block_size)
        self.head = nn.Linear(dim * (image_size // block_size) ** 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.proj(x)).flatten(1))


class StemNet(nn.Module):
    """A CNN with a small-kernel stem (3x3, stride 2), like EfficientNet's."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.stem(x)).mean((2, 3)))


@functools.lru_cache(maxsize=None)
def digits(split: str) -> TensorImageDataset:
    return load_dataset("digits", split=split, image_size=IMAGE_SIZE)


def normalize(images: torch.Tensor) -> torch.Tensor:
    return (images - 0.5) / 0.5


@functools.lru_cache(maxsize=None)
def public_patchnet() -> PatchNet:
    """PatchNet trained on plain digits (a few seconds); treat as read-only."""
    torch.manual_seed(0)
    train = digits("train")
    net = PatchNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(8):
        order = torch.randperm(len(train), generator=generator)
        for i in range(0, len(train), 128):
            idx = order[i : i + 128]
            loss = F.cross_entropy(net(normalize(train.images[idx])), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def protected_patchnet(key: SecretKey):
    """The public PatchNet adapted to ``key``: accurate with the key only."""
    return adapt_patch_embedding(public_patchnet(), key, mean=MEAN, std=STD).eval()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


class Negated(nn.Module):
    """A model that ranks classes upside down (its logits negated)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.model(x)


def negated_protected(key: SecretKey):
    return wrap_model(Negated(public_patchnet()), key, mean=MEAN, std=STD).eval()
