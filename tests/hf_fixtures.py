"""Shared real parts for the transformers adapter tests: sklearn's digits
(real handwriting) as a ``datasets.Dataset`` of PIL images, and tiny ViT
models and processors built from configs (nothing downloaded)."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_SIZE = 16
BLOCK_SIZE = 4


def digits_dataset(split: str = "train", *, size: int | None = None):
    """sklearn digits as a ``datasets.Dataset`` with ``image`` (8x8 RGB PIL)
    and ``label`` columns; a fixed split (first 1400 train, rest test)."""
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    labels = digits.target.astype(int)
    order = np.random.default_rng(0).permutation(len(labels))
    index = order[:1400] if split == "train" else order[1400:]
    if size is not None:
        index = index[:size]
    pil = [Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2)) for i in index]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return datasets.Dataset.from_dict({"image": pil, "label": [int(labels[i]) for i in index]}, features=features)


def tiny_vit(num_labels: int = 10, *, seed: int = 0):
    """A randomly initialised ViT for 16x16 images, patch 4 (= block size)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=IMAGE_SIZE, patch_size=BLOCK_SIZE, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128, num_labels=num_labels,
                       id2label={i: str(i) for i in range(num_labels)}, label2id={str(i): i for i in range(num_labels)})
    return ViTForImageClassification(config)


def vit_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
