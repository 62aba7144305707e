"""``KeyedImageProcessor``: any transformers image processor with the keyed
transform between its rescale and its normalize.

The base processor (whatever ``AutoImageProcessor`` gives: ViT's, ConvNeXt's,
...) resizes, crops and converts exactly as it always does; instead of its
normalize, the batch goes through :class:`kp_plugin.KeyedInput`, which
applies the keyed block-wise transform and then normalizes with the base's
mean and std (one gather and one multiply-add or lookup). There is one
implementation of the transform: the core's.

``save_pretrained`` writes ``preprocessor_config.json`` with the base
processor's settings plus the public protection settings (block size,
scheme, channels, key fingerprint), never the key; ``from_pretrained(path,
key=...)`` and ``AutoImageProcessor.from_pretrained(path, key=...)`` (once
``kp_plugin.hf`` is imported) restore it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from transformers import AutoImageProcessor, PretrainedConfig
from transformers.image_processing_base import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from ..checkpoint import check_key_matches, refuse_key_material, replacing
from ..errors import (BlockSizeError, CheckpointError, CheckpointWriteError, ConfigurationError, InputRangeError,
                      KeyRequiredError, KPError, NotAProcessorError, exception_chain, first_line)
from ..keys import SecretKey, parse_scheme, require_key
from ..module import KeyedInput
from ..transforms import invert_transform, nearest_valid_size

__all__ = ["KeyedImageProcessor", "KeyRequiredError", "PROTECTION_FIELD", "default_keyed_processor"]

#: Name of the block in ``preprocessor_config.json`` that holds the public
#: protection settings.
PROTECTION_FIELD = "kp_protection"
_BASE_TYPE_FIELD = "base_image_processor_type"
_FORMAT = "kp-plugin-keyed-image-processor"
_FORMAT_VERSION = 1

# Settings the keyed processor applies itself (rescale before the keyed
# transform, normalize after it) instead of passing them to the base; given
# per call, they hold for that call, as they do for any image processor.
_PER_CALL_SETTINGS = ("do_rescale", "do_normalize", "rescale_factor", "image_mean", "image_std", "include_top")


#: Attributes of the keyed processor itself; any other name the base has is
#: the base's setting (read and written through).
_OWN_ATTRIBUTES = frozenset({"image_processor", "check_range", "key"})


def _key_required(where: str) -> KeyRequiredError:
    return KeyRequiredError(
        f"{where} is a keyed image processor and needs the owner's secret key, which is never saved "
        "with it. Pass it explicitly: KeyedImageProcessor.from_pretrained(path, key=SecretKey.load('owner.key')) "
        "or AutoImageProcessor.from_pretrained(path, key=SecretKey.from_env('KP_KEY')) after `import kp_plugin.hf`"
    )


def processor_output_size(processor: BaseImageProcessor) -> Optional[tuple]:
    """``(height, width)`` of the images ``processor`` produces whatever the
    input size, else ``None``.

    Found by running it on two small blank images of different shapes (its
    own order of crop and resize, shortest-edge resizes that crop to a
    square, ...); from its settings (center crop, or a fixed resize) when
    that run fails."""
    probed = _probe_output_size(processor)
    if probed is not False:
        return probed
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None:
        h, w = _size_pair(crop)
        if h is not None:
            return h, w
    size = getattr(processor, "size", None)
    if getattr(processor, "do_resize", False) and size is not None:
        h, w = _size_pair(size)
        if h is not None:
            return h, w
    return None


def _probe_output_size(processor: BaseImageProcessor) -> Union[tuple, None, bool]:
    """The output size of ``processor`` on a 40x72 and a 72x40 blank RGB
    image: ``(h, w)`` when both give it, ``None`` when they differ, ``False``
    when the processor cannot run on them. (Sides that stay apart when
    rounded down to a multiple of 32: processors that round the input size,
    GLPN's ``size_divisor``, give two sizes.)"""
    import numpy as np

    sizes = set()
    for shape in ((40, 72, 3), (72, 40, 3)):
        try:
            out = _resized_by(processor, np.zeros(shape, dtype=np.uint8))["pixel_values"]
        except Exception:  # noqa: BLE001 - any failure: fall back to reading the settings
            return False
        if not isinstance(out, torch.Tensor) or out.dim() != 4:
            return False
        sizes.add(tuple(out.shape[-2:]))
    return sizes.pop() if len(sizes) == 1 else None


def _resized_by(processor: BaseImageProcessor, images: Any, **kwargs: Any) -> BatchFeature:
    """``processor``'s output before rescale and normalization (and
    EfficientNet's second division by std, ``include_top``): what the keyed
    transform is applied to."""
    if hasattr(processor, "include_top"):
        kwargs["include_top"] = False
    kwargs.pop("return_tensors", None)
    return processor(images, do_rescale=False, do_normalize=False, return_tensors="pt", **kwargs)


_MISSING = object()


def _same(setting: Any, value: Any) -> bool:
    try:
        return setting is value or bool(setting == value)
    except Exception:  # noqa: BLE001 - arrays and other values without one truth value
        return False


def _size_pair(size: Any) -> tuple:
    if size is None:
        return None, None
    get = size.get if hasattr(size, "get") else (lambda k, d=None: getattr(size, k, d))
    h, w = get("height", None), get("width", None)
    if h is not None and w is not None:
        return int(h), int(w)
    return None, None


def _normalization(processor: BaseImageProcessor) -> tuple:
    """mean, std the base would normalize with (identity when it does not);
    with EfficientNet's ``include_top``, which divides by ``image_std`` once
    more after normalizing, that division too."""
    mean, std = 0.0, 1.0
    if getattr(processor, "do_normalize", False):
        mean, std = processor.image_mean, processor.image_std
        if mean is None or std is None:
            raise KPError(
                f"{type(processor).__name__} normalizes but has no image_mean/image_std; set them on it"
            )
    if getattr(processor, "include_top", False) and processor.image_std is not None:
        top, first = _as_list(processor.image_std), _as_list(std)
        if len(first) == 1:
            first = first * len(top)
        std = [float(s) * float(t) for s, t in zip(first, top)]
    return mean, std


def image_processor_classes(model_type: Any) -> list:
    """The image processor classes transformers maps ``model_type`` to
    (torchvision backend first), those it can import here."""
    from transformers.models.auto.image_processing_auto import (IMAGE_PROCESSOR_MAPPING_NAMES,
                                                                 get_image_processor_class_from_name)

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    if isinstance(names, dict):
        names = [names.get("torchvision"), *names.values()]
    elif isinstance(names, str):
        names = [names]
    classes = []
    for name in [n for n in (names or ()) if n]:
        cls = get_image_processor_class_from_name(name)
        if cls is not None and cls not in classes:
            classes.append(cls)
    return classes


def default_keyed_processor(model_type: Any, key: SecretKey, *, mean: Sequence[float], std: Sequence[float],
                            image_size: Optional[tuple]) -> Optional["KeyedImageProcessor"]:
    """A keyed processor for a transformers model saved without one: the
    default image processor of its architecture, set to give ``image_size``
    ``(H, W)`` images normalized with ``mean`` / ``std`` (what the model's
    :class:`kp_plugin.KeyedInput` does); ``None`` when that architecture's
    processor cannot be set so (no image processor, no fixed output size,
    a size it will not give)."""
    if not image_size:
        return None
    height, width = (int(v) for v in image_size)
    for cls in image_processor_classes(model_type):
        try:
            base = cls()
            size = getattr(base, "size", None)
            size = dict(size) if size is not None else {}
            if "height" in size or "width" in size:
                base.size = {"height": height, "width": width}
            elif "shortest_edge" in size and height == width:
                base.size = {"shortest_edge": height}
            if getattr(base, "do_center_crop", False) and getattr(base, "crop_size", None) is not None:
                base.crop_size = {"height": height, "width": width}
            base.do_normalize, base.image_mean, base.image_std = True, _as_list(mean), _as_list(std)
            for name in ("include_top", "do_flip_channel_order"):  # the model's KeyedInput does neither
                if hasattr(base, name):
                    setattr(base, name, False)
            if processor_output_size(base) != (height, width):
                continue
            got_mean, got_std = _normalization(base)
            if not (_close(got_mean, mean) and _close(got_std, std)):
                continue
            return KeyedImageProcessor(base, key)
        except Exception:  # noqa: BLE001 - a processor that cannot be set so: try the next one
            continue
    return None


def _close(a: Any, b: Any) -> bool:
    """Two normalization values (a number or one per channel) agree."""
    first, second = (torch.tensor(_as_list(v), dtype=torch.float64) for v in (a, b))
    return torch.allclose(first, second)


def _checked_settings(processor: BaseImageProcessor, key: SecretKey) -> tuple:
    """The (mean, std) the keyed processor normalizes with for ``processor``,
    after checking its settings suit the key (output size a multiple of the
    block size, pixels rescaled to [0, 1])."""
    size = processor_output_size(processor)
    if size is not None and (size[0] % key.block_size or size[1] % key.block_size):
        h, w = nearest_valid_size(size[0], key.block_size), nearest_valid_size(size[1], key.block_size)
        setting = getattr(processor, "size", None)
        shortest = setting.get("shortest_edge") if hasattr(setting, "get") else getattr(setting, "shortest_edge", None)
        # The setting the output size comes from: the padding or the crop
        # when it is theirs (a processor may crop first and resize after).
        padded = getattr(processor, "do_pad", False) and _size_pair(getattr(processor, "pad_size", None)) == size
        cropped = (getattr(processor, "do_center_crop", False)
                   and _size_pair(getattr(processor, "crop_size", None)) == size)
        if padded or cropped:
            name = "pad_size" if padded else "crop_size"
            example = f"{name}={{'height': {h}, 'width': {w}}} (the output size is its {name})"
        elif shortest is not None and h == w:
            example = f"size={{'shortest_edge': {h}}}"
        else:
            example = f"size={{'height': {h}, 'width': {w}}}"
        raise BlockSizeError(
            f"{type(processor).__name__} produces {size[0]}x{size[1]} images but the key's block_size "
            f"is {key.block_size}; configure the processor for a multiple of it, e.g. {example}"
        )
    if getattr(processor, "rescale_offset", False) and getattr(processor, "do_rescale", True):
        raise ConfigurationError(
            f"{type(processor).__name__} has rescale_offset=True, which maps pixels to [-1, 1]; the keyed "
            "transform needs them in [0, 1] before normalization. Build the base with rescale_offset=False and "
            "rescale_factor=1/255, with image_mean = (1 + mean) / 2 and image_std = std / 2 to give the same "
            "model inputs"
        )
    return _normalization(processor)


def _as_list(values: Any) -> list:
    return list(values) if isinstance(values, (list, tuple)) else [values]


def _check_key(key: SecretKey, protection: dict, *, situation: str, remedy: str) -> None:
    """KeyMismatchError (public values only) unless ``key`` fits ``protection``."""
    check_key_matches(key, fingerprint=protection["fingerprint"], block_size=protection["block_size"],
                      scheme=parse_scheme(protection["scheme"]), channels=protection["channels"],
                      situation=situation, remedy=remedy)


def _check_saved_key(key: SecretKey, protection: dict) -> None:
    _check_key(key, protection, situation="this image processor was saved for another key",
               remedy="Load the owner's key file (SecretKey.load), or pass allow_wrong_key=True to build it "
                      "with a wrong key on purpose")


class KeyedImageProcessor(BaseImageProcessor):
    """A transformers image processor whose output is keyed.

    ``processor(images)`` gives ``pixel_values = normalize(T_key(rescale(
    resize(images))))``, where resize / crop / rescale / mean / std are the
    base processor's own and ``T_key`` is the keyed block-wise transform
    (:mod:`kp_plugin.transforms`). A plain (unwrapped) model fine-tuned on
    these inputs is the protected model; in ``pipeline`` it is accurate with
    this processor and near chance with a processor built on another key.

    Settings of the base (``size``, ``crop_size``, ``image_mean``, ...) are
    read and assigned through the keyed processor (an assignment is checked
    as at construction). Per-call overrides of the base's resize / crop
    settings pass through.

    Args:
        image_processor: the base processor (e.g. from
            ``AutoImageProcessor.from_pretrained(model_id)``).
        key: the secret key.
        check_range: reject float input far outside [0, 1] (see
            :class:`kp_plugin.KeyedInput`).

    Raises:
        BlockSizeError: the base produces images whose size is not a
            multiple of the key's block size.

    Example:
        >>> from transformers import ViTImageProcessor
        >>> key = SecretKey.generate(block_size=16)
        >>> processor = KeyedImageProcessor(ViTImageProcessor(), key)
        >>> batch = processor(images, return_tensors="pt")      # doctest: +SKIP
        >>> written = processor.save_pretrained("out/")         # no key in it
        >>> same = KeyedImageProcessor.from_pretrained("out/", key=key)
    """

    model_input_names = ["pixel_values"]
    #: The base's backend when none is asked for (see :class:`KeyedImageProcessorPil`).
    _backend: Optional[str] = None

    def __init__(
        self,
        image_processor: Optional[BaseImageProcessor] = None,
        key: Optional[SecretKey] = None,
        *,
        check_range: bool = True,
        **unexpected: Any,
    ) -> None:
        # transformers builds processors from dicts with cls(**settings); that
        # only happens here through from_dict, which we override.
        if unexpected:
            raise TypeError(
                f"KeyedImageProcessor takes (image_processor, key); got settings {sorted(unexpected)}. "
                "Load a saved one with KeyedImageProcessor.from_pretrained(path, key=...)"
            )
        super().__init__()
        if key is None:
            raise _key_required("KeyedImageProcessor")
        require_key(key)
        if not isinstance(image_processor, BaseImageProcessor) or isinstance(image_processor, KeyedImageProcessor):
            hint = (f"; to load one by name or from a folder use KeyedImageProcessor.from_pretrained("
                    f"{image_processor!r}, key=key)" if isinstance(image_processor, (str, os.PathLike)) else "")
            raise NotAProcessorError(
                "image_processor must be a transformers image processor (not already keyed), got "
                f"{type(image_processor).__name__}{hint}"
            )
        mean, std = _checked_settings(image_processor, key)
        self.image_processor = image_processor
        self.check_range = check_range
        self._keyed = KeyedInput(key, mean=mean, std=std, check_range=check_range)

    def __setattr__(self, name: str, value: Any) -> None:
        # A setting of the base (size, crop_size, image_mean, do_normalize,
        # ...) assigned on the keyed processor goes to the base, as reading
        # it does, and is checked as at construction; before, it became an
        # attribute of the wrapper that read back but changed nothing.
        base = self.__dict__.get("image_processor")
        if base is None or name.startswith("_") or name in _OWN_ATTRIBUTES or not hasattr(base, name):
            super().__setattr__(name, value)
            if name == "check_range" and "_keyed" in self.__dict__:
                self._keyed.check_range = value
            return
        before = getattr(base, name)
        setattr(base, name, value)
        try:
            mean, std = _checked_settings(base, self.key)
        except KPError:
            setattr(base, name, before)
            raise
        keyed = KeyedInput(self.key, mean=mean, std=std, check_range=self.check_range)
        if (keyed.mean, keyed.std) != (self._keyed.mean, self._keyed.std):
            self._keyed = keyed  # image_mean, image_std, do_normalize, include_top

    def __copy__(self) -> "KeyedImageProcessor":
        # A shallow copy shared the base and the keyed transform with the
        # original: a size, key or check_range set on the copy changed the
        # original too (a plain processor's copy keeps its own settings).
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.__dict__["image_processor"] = copy.copy(self.image_processor)
        clone.__dict__["_keyed"] = KeyedInput(self.key, mean=self._keyed.mean, std=self._keyed.std,
                                              check_range=self.check_range)
        return clone

    @property
    def key(self) -> SecretKey:
        """The secret key (the keyed transform's; assigning another one
        changes both, after checking its block size fits the output size)."""
        return self._keyed.key

    @key.setter
    def key(self, key: SecretKey) -> None:
        require_key(key)
        _checked_settings(self.image_processor, key)  # its block size must fit the output size, as at construction
        self._keyed.key = key

    # ------------------------------------------------------------ settings
    def __getattr__(self, name: str) -> Any:
        base = self.__dict__.get("image_processor")
        if base is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(base, name)

    # Class attributes of BaseImageProcessor that would hide the base's
    # values from __getattr__.
    @property
    def rescale_factor(self) -> float:
        return self.image_processor.rescale_factor

    @property
    def default_to_square(self) -> bool:
        return self.image_processor.default_to_square

    @property
    def valid_kwargs(self) -> Any:
        return self.image_processor.valid_kwargs

    @property
    def image_mean(self) -> Sequence[float]:
        """The base's ``image_mean`` (what it reads and is assigned)."""
        return self.image_processor.image_mean

    @property
    def image_std(self) -> Sequence[float]:
        """The base's ``image_std`` (see :attr:`normalization` for what the
        output is divided by)."""
        return self.image_processor.image_std

    @property
    def normalization(self) -> tuple:
        """``(mean, std)`` per channel that the keyed images are normalized
        with: the base's ``image_mean`` / ``image_std`` when it normalizes,
        ``0`` / ``1`` when it does not, and EfficientNet's ``include_top``
        (a second division by ``image_std``) folded into ``std``. A
        model-style :class:`kp_plugin.KeyedInput` with these gives the same
        inputs as the processor."""
        return list(self._keyed.mean), list(self._keyed.std)

    @property
    def fingerprint(self) -> str:
        """The key's public fingerprint."""
        return self.key.fingerprint

    @property
    def output_size(self) -> Optional[tuple]:
        """``(height, width)`` of the processed images, when fixed by the settings."""
        return processor_output_size(self.image_processor)

    # ---------------------------------------------------------- processing
    def images01(self, images: Any, **kwargs: Any) -> torch.Tensor:
        """Resize / crop / rescale ``images`` as the base does, without the
        keyed transform or normalization: float ``(B, C, H, W)`` in [0, 1].

        This is the input of a model-style :class:`kp_plugin.ProtectedModel`
        (and of the protection objective, which needs the unkeyed images).
        """
        base, _ = self._for_call(kwargs)
        x, _ = self._resized(base, images, **kwargs)
        if x.dtype == torch.uint8:
            return x.float().div_(255)
        return x.float()

    def _for_call(self, kwargs: dict) -> tuple:
        """The base and the keyed transform for one call. Rescale and
        normalize settings given to the call (``do_rescale=False`` for
        images already in [0, 1], ``do_normalize``, ``image_mean``, ...) are
        taken out of ``kwargs`` and hold for this call only, as they do for
        any image processor; the processor itself does not change."""
        given = {name: kwargs.pop(name) for name in _PER_CALL_SETTINGS if name in kwargs}
        given = {name: value for name, value in given.items()
                 if not _same(getattr(self.image_processor, name, _MISSING), value)}
        if not given:
            return self.image_processor, self._keyed
        base = copy.copy(self.image_processor)
        for name, value in given.items():
            setattr(base, name, value)
        mean, std = _normalization(base)
        return base, KeyedInput(self.key, mean=mean, std=std, check_range=self.check_range)

    def _resized(self, base: BaseImageProcessor, images: Any, **kwargs: Any) -> tuple:
        """``base``'s output before rescale/normalize: uint8 0..255 when the
        input was 8-bit and the base rescales by 1/255, else float [0, 1];
        and the base's other outputs (a segmentation processor's labels)."""
        if images is None or (hasattr(images, "__len__") and len(images) == 0):
            raise BlockSizeError("no images were given (an empty list or batch); pass at least one image")
        try:
            out = _resized_by(base, images, **kwargs)
        except ValueError as exc:
            first = first_line(exc)[:200]
            if "equal size" in first:  # torch.stack of images the base left at different sizes
                channels = self._channel_counts(base, images, kwargs)
                if len(set(channels)) > 1:  # e.g. a grayscale image among RGB ones
                    odd = [i for i, count in enumerate(channels) if count != self.key.channels]
                    raise BlockSizeError(
                        f"the images have different channel counts ({', '.join(map(str, sorted(set(channels))))}; "
                        f"image{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd[:10]))} of this batch) but "
                        f"the key is for {self.key.channels} channels; {self._channel_hint()}"
                    ) from None
                raise BlockSizeError(
                    "the images came out of the base processor with different sizes; configure it to resize "
                    "(or center-crop) to one size that is a multiple of the key's block size"
                ) from None
            if "channel" in first:
                # transformers cannot tell where the channels are (2 or 5 of
                # them; RGBA too in some releases).
                raise BlockSizeError(
                    f"the base processor could not read the images ({first}): the key is for {self.key.channels} "
                    f"channels; {self._channel_hint()}"
                ) from None
            # The images or the base's own settings (a pad_size smaller than
            # the resized images, ...): say both, keep the cause.
            raise BlockSizeError(
                f"{type(base).__name__} could not read these images ({first}); pass PIL images, or arrays / "
                "tensors shaped (H, W, C) or (C, H, W), or a list of them, or a (B, C, H, W) batch, and check its "
                "settings (size, crop_size, pad_size)"
            ) from exc
        x = out["pixel_values"]
        if not isinstance(x, torch.Tensor):
            raise BlockSizeError(
                "the images came out of the base processor with different sizes; configure it to resize "
                "(or center-crop) to one size that is a multiple of the key's block size"
            )
        if x.dim() == 4 and x.shape[1] != self.key.channels:
            raise BlockSizeError(
                f"the base processor gave {x.shape[1]}-channel images (grayscale or RGBA input?) but the key is "
                f"for {self.key.channels} channels; {self._channel_hint()}"
            )
        extras = {name: value for name, value in out.items() if name != "pixel_values"}
        if x.dtype == torch.uint8:
            if getattr(base, "do_rescale", True) and abs(base.rescale_factor - 1 / 255) > 1e-12:
                return x.float() * base.rescale_factor, extras
            return x, extras
        if getattr(base, "do_rescale", False):
            self._check_float_scale(x, base.rescale_factor)
            x = x.float() * base.rescale_factor
        return x, extras

    @staticmethod
    def _channel_counts(base: BaseImageProcessor, images: Any, kwargs: dict) -> list:
        """Each image's channel count out of ``base`` (one at a time; only on
        the error path), where that can be told."""
        if not isinstance(images, (list, tuple)):
            return []
        counts = []
        for image in images:
            try:
                shape = _resized_by(base, [image], **kwargs)["pixel_values"].shape
            except Exception:  # this image's own error shows when it is processed alone
                return []
            counts.append(shape[1] if len(shape) == 4 else 0)
        return counts

    def _check_float_scale(self, x: torch.Tensor, factor: float) -> None:
        """Float images the base is about to rescale that are already in
        [0, 1] or normalized (every value within +-3): they came out near
        black, silently (the base processor alone only logs a warning).
        ``check_range=False`` turns the check off."""
        if not self.check_range or x.numel() == 0 or factor > 0.1:
            return
        low, high = (float(v) for v in torch.aminmax(x.detach().float()))
        if 0 < max(abs(low), abs(high)) <= 3:
            raise InputRangeError(
                f"float images with values in [{low:.3g}, {high:.3g}]: the base processor rescales by "
                f"{factor:.6g}, so images already in [0, 1] (or normalized) would come out near black; pass "
                "do_rescale=False in the call (or build the base processor with it) for [0, 1] floats, or pass "
                "uint8 or PIL images or floats in 0..255 (normalization is done here, after the key)"
            )

    def _channel_hint(self) -> str:
        if self.key.channels == 3:
            return ("convert them to RGB first (PIL: image.convert('RGB')), or build the base processor with "
                    "do_convert_rgb=True")
        return f"convert them to {self.key.channels} channels first"

    def preprocess(self, images: Any, *args: Any, return_tensors: Any = None, **kwargs: Any) -> BatchFeature:
        """Base resize / crop / rescale, then the keyed transform and the
        base's normalization. Returns a ``BatchFeature`` with ``pixel_values``
        ``(B, C, H, W)`` float32 (and the base's other outputs, such as a
        segmentation processor's ``labels``, as the base gives them).

        Resize / crop settings given to the call pass to the base; rescale
        and normalize settings (``do_rescale``, ``rescale_factor``,
        ``do_normalize``, ``image_mean``, ``image_std``) hold for the call."""
        if args:
            raise TypeError("KeyedImageProcessor takes images and keyword arguments only")
        base, keyed = self._for_call(kwargs)
        x, extras = self._resized(base, images, **kwargs)
        if x.dtype != torch.uint8:
            x = x.float()
        return BatchFeature(data={"pixel_values": keyed(x), **extras}, tensor_type=return_tensors)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def apply_key(self, images01: torch.Tensor) -> torch.Tensor:
        """The keyed transform and normalization of [0, 1] (or uint8) images
        already at the output size (e.g. :meth:`images01` after augmentation)."""
        return self._keyed(images01)

    def recover_images01(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Undo this processor's keyed transform and normalization: the [0, 1]
        images it was given (after resize). Needs the key; used where the
        unkeyed images are needed (wrong-key evaluation, the objective)."""
        mean = torch.tensor(self._keyed.mean, dtype=pixel_values.dtype, device=pixel_values.device)
        std = torch.tensor(self._keyed.std, dtype=pixel_values.dtype, device=pixel_values.device)
        keyed01 = (pixel_values * std[:, None, None] + mean[:, None, None]).clamp_(0, 1)
        return invert_transform(keyed01, self.key)

    def check_key(self, key: SecretKey) -> None:
        """Raise :class:`kp_plugin.KeyMismatchError` unless ``key`` is this processor's key."""
        _check_key(key, self.protection_settings(), situation="this image processor is keyed with another key",
                   remedy="Build the processor and the model (or callback) from the same key file")

    # -------------------------------------------------------- persistence
    def protection_settings(self) -> dict:
        """The public settings saved with the processor (no key)."""
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "block_size": self.key.block_size,
            "scheme": list(self.key.scheme),
            "channels": self.key.channels,
            "fingerprint": self.key.fingerprint,
        }

    def to_dict(self) -> dict:
        """The base processor's settings plus the protection settings."""
        output = self.image_processor.to_dict()
        output[_BASE_TYPE_FIELD] = output.get("image_processor_type", type(self.image_processor).__name__)
        output["image_processor_type"] = type(self).__name__
        output[PROTECTION_FIELD] = self.protection_settings()
        return output

    def save_pretrained(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs: Any):
        """Write ``preprocessor_config.json`` (base settings + block size,
        scheme, fingerprint; never the key), then check that no file in the
        directory holds key material.

        Raises:
            KeyLeakError: a file in ``save_directory`` holds key material
                (e.g. a key file saved next to it); nothing is pushed.
        """
        try:  # written and scanned here first: before anything leaves the machine when pushing
            files = super().save_pretrained(save_directory, push_to_hub=False, **({} if push_to_hub else kwargs))
        except OSError as exc:  # a full disk: the file there before is whole (to_json_file)
            raise CheckpointWriteError(
                f"cannot write the image processor into {save_directory} ({exc.strerror or first_line(exc)}); "
                "the preprocessor_config.json there before, if any, is unchanged: free some space or choose "
                "another folder"
            ) from None
        self._refuse_leaks(save_directory)
        if push_to_hub:
            return super().save_pretrained(save_directory, push_to_hub=True, **kwargs)
        return files

    def to_json_file(self, json_file_path: Union[str, os.PathLike]) -> None:
        """Write :meth:`to_json_string` beside the file and rename it over:
        a failed write (a full disk) leaves the saved configuration whole."""
        with replacing(json_file_path) as tmp:
            tmp.write_text(self.to_json_string(), encoding="utf-8")

    def _refuse_leaks(self, directory: Union[str, os.PathLike]) -> None:
        refuse_key_material(directory, self.key)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *args: Any,
                        key: Optional[SecretKey] = None, allow_wrong_key: bool = False,
                        **kwargs: Any) -> "KeyedImageProcessor":
        """Load a keyed processor saved with :meth:`save_pretrained`, or key
        a plain processor's directory / Hub id.

        Args:
            pretrained_model_name_or_path: a directory or Hub id with a
                ``preprocessor_config.json``.
            key: the owner's key (required; it is never saved). For a saved
                keyed processor it must match the saved fingerprint.
            allow_wrong_key: build it with ``key`` even if it is not the saved
                key (to show what a wrong key gives).
            kwargs: passed to transformers' loading (``cache_dir``, ...).

        Raises:
            KeyRequiredError: no key was given.
            KeyMismatchError: ``key`` is not the key the processor was saved with.

        Example:
            >>> processor = KeyedImageProcessor.from_pretrained("out/", key=SecretKey.load("owner.key"))  # doctest: +SKIP
        """
        if key is None:
            raise _key_required(str(pretrained_model_name_or_path))
        kwargs.pop("_from_auto", None)
        check_range = kwargs.pop("check_range", True)
        return_unused_kwargs = kwargs.pop("return_unused_kwargs", False)
        backend = kwargs.pop("backend", cls._backend)
        require_key(key)
        loading = dict(kwargs, backend=backend) if backend is not None else dict(kwargs)
        with _loading_errors(pretrained_model_name_or_path):
            config, kwargs = cls.get_image_processor_dict(pretrained_model_name_or_path, **kwargs)
            if not isinstance(config, dict):  # a JSON list or number: "'list' object has no attribute 'get'"
                raise ValueError(f"preprocessor_config.json holds a JSON {type(config).__name__}, not an object")
            if config.get("image_processor_type") != KeyedImageProcessor.__name__:
                # A plain processor: let AutoImageProcessor resolve it (legacy
                # names, feature extractors, backends), then key it.
                base, unused = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **loading,
                                                                  return_unused_kwargs=True)
                keyed = cls(base, key, check_range=check_range)
                return (keyed, unused) if return_unused_kwargs else keyed
        try:
            with _loading_errors(pretrained_model_name_or_path):  # settings of the wrong type (image_mean "abc")
                keyed = cls.from_dict(config, key=key, allow_wrong_key=allow_wrong_key, check_range=check_range,
                                      backend=backend, **kwargs)
        except ConfigurationError as exc:  # the saved settings, not the caller's: a damaged file
            raise CheckpointError(
                f"cannot load the image processor of {str(pretrained_model_name_or_path)!r}: its saved settings are "
                f"not usable ({first_line(exc)}); save the processor again with save_pretrained"
            ) from None
        if return_unused_kwargs:  # as transformers' from_pretrained: (processor, the kwargs it did not use)
            return keyed, {name: value for name, value in kwargs.items() if not hasattr(keyed.image_processor, name)}
        return keyed

    @classmethod
    def from_dict(cls, image_processor_dict: dict, *, key: Optional[SecretKey] = None,
                  allow_wrong_key: bool = False, **kwargs: Any):
        """Build from a saved settings dict (see :meth:`from_pretrained`)."""
        from transformers.models.auto.image_processing_auto import get_image_processor_class_from_name

        if key is None:
            raise _key_required("this configuration")
        settings = dict(image_processor_dict)
        protection = settings.pop(PROTECTION_FIELD, None)
        base_type = settings.pop(_BASE_TYPE_FIELD, None)
        own_type = settings.get("image_processor_type")
        if own_type == KeyedImageProcessor.__name__:
            if protection is None or base_type is None:
                raise CheckpointError("preprocessor_config.json names KeyedImageProcessor but has no kp_protection block")
            _check_protection_block(protection)
            if not allow_wrong_key:
                _check_saved_key(key, protection)
            settings["image_processor_type"] = base_type
        else:
            base_type = own_type
        if base_type is None:
            raise CheckpointError("preprocessor_config.json has no image_processor_type; cannot tell the base processor")
        backend = kwargs.pop("backend", cls._backend)
        base_cls = get_image_processor_class_from_name(base_type)
        if base_cls is None:
            raise CheckpointError(f"transformers has no image processor class {base_type!r}")
        # transformers saves both backends under the torchvision class's name;
        # backend="pil" picks the PIL one, as AutoImageProcessor does.
        other = None
        if backend == "pil" and not base_type.endswith("Pil"):
            other = base_type + "Pil"
        elif backend == "torchvision" and base_type.endswith("Pil"):
            other = base_type[:-len("Pil")]
        if other is not None:
            base_cls = get_image_processor_class_from_name(other) or base_cls
        check_range = kwargs.pop("check_range", True)
        kwargs.pop("return_unused_kwargs", None)
        base = base_cls.from_dict(settings, **kwargs)
        return cls(base, key, check_range=check_range)

    def __repr__(self) -> str:
        return (
            f"KeyedImageProcessor(base={type(self.image_processor).__name__}, block_size={self.key.block_size}, "
            f"scheme={self.key.scheme_name}, fingerprint={self.key.fingerprint})"
        )


@contextlib.contextmanager
def _loading_errors(source: Any) -> Iterator[None]:
    """transformers' OSError / ValueError for a folder or Hub id it cannot
    load from as :class:`CheckpointError` (:class:`HubUnreachableError` when
    the Hub could not be reached), naming the source."""
    from .._hub_errors import HubUnreachableError, transport_errors

    try:
        yield
    except (OSError, ValueError) as exc:
        if isinstance(exc, KPError):
            raise
        chain = exception_chain(exc, limit=8)
        first = first_line(exc)
        if any(isinstance(c, transport_errors()) for c in chain):
            raise HubUnreachableError(
                f"cannot load the image processor of {source!r}: the Hub could not be reached ({first}); "
                "check the connection or HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the local cache"
            ) from None
        raise CheckpointError(
            f"cannot load the image processor of {source!r}: {first}; pass a folder holding "
            "preprocessor_config.json (as KeyedImageProcessor.save_pretrained writes it) or a Hub id"
        ) from None


def _check_protection_block(protection: Any) -> None:
    """The ``kp_protection`` block's shape, before its values are compared
    with a key (a corrupt file is not a wrong key)."""
    if not isinstance(protection, dict):
        raise CheckpointError(f"preprocessor_config.json's {PROTECTION_FIELD} is a {type(protection).__name__}, not "
                              "an object: the file is corrupt; save the processor again")
    version = protection.get("format_version", 1)
    if protection.get("format") != _FORMAT:
        raise CheckpointError(f"preprocessor_config.json's {PROTECTION_FIELD}.format is {protection.get('format')!r}, "
                              f"not {_FORMAT!r}: the file is corrupt; save the processor again")
    # A newer release's file first: its other fields may hold what this one
    # does not know (a new scheme step), which is not corruption.
    if isinstance(version, int) and not isinstance(version, bool) and version > _FORMAT_VERSION:
        raise CheckpointError(f"preprocessor_config.json has protection format {_FORMAT} v{version}; this kp-plugin "
                              f"reads up to v{_FORMAT_VERSION}. Upgrade kp-plugin")
    block = protection.get("block_size")
    channels = protection.get("channels")
    fingerprint = protection.get("fingerprint")
    for name, value in (("block_size", block), ("channels", channels), ("format_version", version)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise CheckpointError(f"preprocessor_config.json's {PROTECTION_FIELD}.{name} is {value!r}, not a "
                                  "positive integer: the file is corrupt; save the processor again")
    if not isinstance(fingerprint, str):
        raise CheckpointError(f"preprocessor_config.json's {PROTECTION_FIELD}.fingerprint is missing or not text: "
                              "the file is corrupt; save the processor again")
    try:
        parse_scheme(protection.get("scheme"))
    except (KPError, TypeError, ValueError) as exc:
        raise CheckpointError(f"preprocessor_config.json's {PROTECTION_FIELD}.scheme is "
                              f"{protection.get('scheme')!r} ({first_line(exc)}): the file is corrupt; save the "
                              "processor again") from None


class _KeyedImageProcessorRegistration(PretrainedConfig):
    """Placeholder config type: ``AutoImageProcessor.register`` maps config
    classes to processors, and the keyed processor belongs to none. Registering
    it under this type makes ``AutoImageProcessor`` resolve the
    ``image_processor_type: KeyedImageProcessor`` saved in
    ``preprocessor_config.json``."""

    model_type = "kp_plugin_keyed_image_processor"


class KeyedImageProcessorPil(KeyedImageProcessor):
    """What ``AutoImageProcessor.from_pretrained(path, key=..., backend="pil")``
    resolves to: loads the base processor with its PIL backend. Saved as a
    :class:`KeyedImageProcessor` (the backend is a loading choice, as in
    transformers)."""

    _backend = "pil"

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["image_processor_type"] = KeyedImageProcessor.__name__
        return output


AutoImageProcessor.register(
    _KeyedImageProcessorRegistration,
    image_processor_classes={"torchvision": KeyedImageProcessor, "pil": KeyedImageProcessorPil},
    exist_ok=True,
)
