"""Transformers models with the keyed transform inside (model style).

A transformers config carries no ``image_mean`` / ``image_std``: the image
processor does. :func:`wrap_hf_model` reads them (and the image size) from
the processor and calls :func:`kp_plugin.wrap_model`, so the result keeps the
transformers calling convention (``pixel_values=``, ``labels=``, an output
object with ``loss``) and takes [0, 1] images.
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import nn
from transformers.image_processing_utils import BaseImageProcessor

from ..errors import KPError
from ..keys import SecretKey
from ..module import ProtectedModel, wrap_model
from .processor import KeyedImageProcessor, _normalization, processor_output_size

__all__ = ["wrap_hf_model"]


def wrap_hf_model(
    model: nn.Module,
    key: SecretKey,
    *,
    image_processor: Optional[BaseImageProcessor] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    check_range: bool = True,
) -> ProtectedModel:
    """Put the keyed transform in front of a transformers image model, with
    the normalization of its image processor.

    Args:
        model: e.g. ``AutoModelForImageClassification.from_pretrained(...)``.
        key: the secret key.
        image_processor: the model's processor (plain or a
            :class:`KeyedImageProcessor` on the same key): mean, std and image
            size come from it.
        mean, std: explicit normalization instead of a processor.
        check_range: see :class:`kp_plugin.KeyedInput`.

    Returns:
        A :class:`kp_plugin.ProtectedModel`: ``model(pixel_values=images01,
        labels=labels)`` returns the usual output with ``loss``.

    Raises:
        ConfigurationError: neither a processor nor mean/std was given.
        KeyMismatchError: ``image_processor`` is keyed with another key.

    Example:
        >>> processor = AutoImageProcessor.from_pretrained(model_id)          # doctest: +SKIP
        >>> model = wrap_hf_model(AutoModelForImageClassification.from_pretrained(model_id),
        ...                       key, image_processor=processor)             # doctest: +SKIP
        >>> out = model(pixel_values=images01, labels=labels)                 # doctest: +SKIP
        >>> out.loss.backward()                                               # doctest: +SKIP
    """
    input_size = None
    if image_processor is not None:
        if isinstance(image_processor, KeyedImageProcessor):
            image_processor.check_key(key)
            image_processor = image_processor.image_processor
        proc_mean, proc_std = _normalization(image_processor)
        mean = proc_mean if mean is None else mean
        std = proc_std if std is None else std
        size = processor_output_size(image_processor)
        if size is not None:
            input_size = (key.channels, *size)
    protected = wrap_model(model, key, mean=mean, std=std, input_size=input_size, check_range=check_range)
    if image_processor is not None:
        # push_protected publishes it as preprocessor_config.json (keyed,
        # saved without the key), as the repository layout of a transformers
        # model has it, without asking for processor= again.
        try:
            protected.keyed_image_processor = KeyedImageProcessor(image_processor, key)
        except (KPError, ValueError, TypeError):
            pass  # a processor the keyed one cannot wrap: the model works, processor= publishes one
    return protected
