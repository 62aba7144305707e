"""Load a protected checkpoint without naming its architecture.

:func:`load_protected` needs a fresh instance of the architecture; a
checkpoint written by :func:`~kp_plugin.save_protected` also carries the
architecture's own ``config.json``, from which the model can be rebuilt:
timm models through timm (:func:`kp_plugin.timm.load_protected_timm`),
transformers models through the class their config names. This is what
``kp evaluate``, ``kp attack`` and :func:`kp_plugin.hub.pull_protected` use.

timm and transformers are imported only for the checkpoint that needs them.

Example:
    >>> from kp_plugin import SecretKey
    >>> from kp_plugin.autoload import load_protected_auto
    >>> model = load_protected_auto("out/", SecretKey.load("owner.key"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from .checkpoint import CONFIG_FILE, ProtectionConfig, load_protected
from .errors import CheckpointError
from .keys import SecretKey
from .module import ProtectedModel

__all__ = ["native_library", "build_transformers_model", "load_protected_auto"]


def native_library(directory: Union[str, os.PathLike]) -> Optional[str]:
    """``"timm"`` or ``"transformers"`` from the checkpoint's ``config.json``
    (``model_type`` means transformers, ``pretrained_cfg`` timm); ``None``
    when there is no readable native config."""
    native = _read_native_config(directory)
    if isinstance(native, dict) and native.get("model_type"):
        return "transformers"
    if isinstance(native, dict) and isinstance(native.get("pretrained_cfg"), dict):
        return "timm"
    return None


def _read_native_config(directory: Union[str, os.PathLike]) -> object:
    """The checkpoint's ``config.json`` as parsed JSON; ``None`` when it is
    missing or not JSON."""
    try:
        return json.loads((Path(directory) / CONFIG_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None


def build_transformers_model(directory: Union[str, os.PathLike]) -> torch.nn.Module:
    """A freshly initialized transformers model of the checkpoint's class:
    ``config.json``'s ``architectures``, else ``protection.json``'s
    ``architecture``, else the image-classification auto class."""
    import transformers

    directory = Path(directory)
    native = _read_native_config(directory)  # None: AutoConfig below says what is wrong
    if isinstance(native, dict) and native.get("auto_map"):
        # Never the repository's own code: transformers would ask on stdin
        # (trust_remote_code) and run its .py files on "y".
        raise CheckpointError(
            f"{directory / CONFIG_FILE} names code of its own (auto_map); kp-plugin never runs a checkpoint's "
            "code. Build the architecture yourself and pass it as model= (kp_plugin.load_protected)"
        )
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE} is not a readable transformers config ({exc})") from None
    names = list(getattr(config, "architectures", None) or []) + [ProtectionConfig.load(directory).architecture]
    # Only a model class: the names come from files a Hub repository chose.
    candidates = (getattr(transformers, n, None) for n in names if isinstance(n, str) and not n.startswith("_"))
    cls = next((c for c in candidates if isinstance(c, type) and issubclass(c, transformers.PreTrainedModel)), None)
    if cls is None:
        return transformers.AutoModelForImageClassification.from_config(config, trust_remote_code=False)
    return cls(config)


def load_protected_auto(
    directory: Union[str, os.PathLike],
    key: SecretKey,
    *,
    model: Optional[torch.nn.Module] = None,
    allow_wrong_key: bool = False,
    device: Union[str, torch.device] = "cpu",
    source: str = "",
) -> ProtectedModel:
    """Load a protected checkpoint, rebuilding the architecture from its
    native ``config.json`` unless ``model`` is given.

    Args:
        directory: written by :func:`kp_plugin.save_protected` (or ``kp protect``).
        key: the owner's key.
        model: a fresh instance of the architecture, for checkpoints of
            neither timm nor transformers.
        allow_wrong_key: load even with another key (wrong-key evaluation).
        device: where to load the weights.
        source: how to name the checkpoint in errors (a Hub id); default the
            directory.

    Raises:
        KeyMismatchError: ``key`` is not the checkpoint's key.
        CheckpointError: files missing or corrupt, or no native config to
            rebuild the architecture from (pass ``model=``).
    """
    directory = Path(directory)
    if model is None:
        library = native_library(directory)
        if library == "timm":
            from .timm import load_protected_timm

            return load_protected_timm(directory, key, allow_wrong_key=allow_wrong_key, device=device)
        if library == "transformers":
            if not allow_wrong_key:
                ProtectionConfig.load(directory).check_key(key, unsigned="ignore")  # before building anything
            model = build_transformers_model(directory)
        else:
            raise CheckpointError(
                f"{source or str(directory)!r} has no timm or transformers config.json to rebuild the architecture "
                "from; pass model= (a fresh instance of the architecture) to kp_plugin.load_protected"
            )
    return load_protected(directory, model, key, allow_wrong_key=allow_wrong_key, device=device)
