"""Hugging Face transformers adapter: protect a model without leaving the
transformers workflow (image processor, model, ``Trainer``, ``pipeline``,
``save_pretrained``).

Two styles, same logits for the same image and key:

- processor style: :class:`KeyedImageProcessor` keys the images; the model
  is a plain transformers model (what ``pipeline`` uses);
- model style: :func:`wrap_hf_model` puts the key in the model, which takes
  [0, 1] images (what the protection objective trains).

Importing this module registers :class:`KeyedImageProcessor` with
``AutoImageProcessor``. This is the only part of kp-plugin (besides the hub
adapter) that imports transformers.

Example:
    >>> from kp_plugin.hf import KeyedImageProcessor, KeyProtectionCallback, KeyedTrainer
    >>> processor = KeyedImageProcessor(AutoImageProcessor.from_pretrained(model_id), key)   # doctest: +SKIP
    >>> pipe = pipeline("image-classification", model=model, image_processor=processor)    # doctest: +SKIP
"""

from .processor import KeyedImageProcessor, KeyRequiredError
from .model import wrap_hf_model
from .data import KeyedExampleTransform, KeyedImageCollator
from .callback import PROTECTION_METRICS, KeyProtectionCallback, ProtectionMarginWarning
from .trainer import KeyedTrainer

__all__ = [
    "KeyedImageProcessor",
    "KeyRequiredError",
    "wrap_hf_model",
    "KeyedImageCollator",
    "KeyedExampleTransform",
    "KeyProtectionCallback",
    "ProtectionMarginWarning",
    "PROTECTION_METRICS",
    "KeyedTrainer",
]
