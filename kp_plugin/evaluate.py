"""Does the protection hold? Accuracy with the key, with random wrong keys,
and on plain images, measured in one pass over a dataset.

``evaluate_protection(model, dataset)`` reads every batch once and scores it
under the owner's key, under ``num_wrong_keys`` random keys with the same
settings, and without any transform (plain images, normalized as the model
expects). The result is a :class:`~kp_plugin.protection_report.ProtectionReport`;
``write_report(report, directory)`` writes ``report.json``, ``report.md``
and the figures (both re-exported here from :mod:`kp_plugin.protection_report`).

Wrong keys are drawn from ``seed`` by hashing, not from the CSPRNG, so a
report can be reproduced; they are public test keys, never secrets.

Example:
    >>> report = evaluate_protection(model, test_set, num_wrong_keys=100)   # doctest: +SKIP
    >>> write_report(report, "out/report")                                  # doctest: +SKIP
    >>> report.wrong_key_accuracy_mean                                      # doctest: +SKIP
    0.12
"""

from __future__ import annotations

import copy
import hashlib
import math
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .checkpoint import _uncompiled, usable_device, weights_digest
from .errors import ConfigurationError, first_line
from .keys import SecretKey
from .module import KeyedInput, ProtectedModel, require_protected
from .objectives import logits_of
from .protection_report import (  # noqa: F401  (re-exported: the report is part of this API)
    EXAMPLES_FILE,
    HISTOGRAM_FILE,
    PRIVATE_DIR,
    REPORT_FILE,
    ProtectionReport,
    format_summary,
    report_markdown,
    write_report,
)
from .transforms import apply_transform

__all__ = [
    "ProtectionReport",
    "evaluate_protection",
    "wrong_key_accuracies",
    "wrong_keys",
    "write_report",
    "report_markdown",
    "format_summary",
    "REPORT_FILE",
    "HISTOGRAM_FILE",
    "EXAMPLES_FILE",
    "PRIVATE_DIR",
]


def wrong_keys(key: SecretKey, num_keys: int, *, seed: int = 0) -> list:
    """``num_keys`` reproducible random keys with ``key``'s block size, scheme
    and channels (never ``key`` itself).

    Args:
        key: the owner's key (only its public settings are used).
        num_keys: how many keys.
        seed: the same seed gives the same keys on every machine.

    Example:
        >>> keys = wrong_keys(SecretKey.generate(block_size=4), 3, seed=0)
        >>> len(keys)
        3
    """
    out = []
    counter = 0
    while len(out) < num_keys:
        material = hashlib.sha256(f"kp-plugin/wrong-key/{seed}/{counter}".encode()).digest()
        counter += 1
        candidate = SecretKey(material, block_size=key.block_size, scheme=key.scheme, channels=key.channels)
        if candidate.fingerprint != key.fingerprint:
            out.append(candidate)
    return out


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return usable_device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


#: The most wrong keys one evaluation tries (as ``kp evaluate --wrong-keys``).
MAX_WRONG_KEYS = 100_000


def _batches(dataset, batch_size: int) -> Iterator[tuple]:
    from .data import iterate_batches  # in-memory datasets are sliced, not read item by item

    try:
        yield from iterate_batches(dataset, batch_size=batch_size)
    except TypeError as exc:
        if "default_collate" not in str(exc):
            raise
        # torch's collate on PIL images (a torchvision-style dataset without a transform)
        raise ConfigurationError(
            f"the dataset gives items torch cannot batch ({first_line(exc)[:160]}); give it a transform to tensors "
            "(torchvision.transforms.ToTensor(): float (C, H, W) in [0, 1]), or use kp_plugin.data.load_dataset"
        ) from None


def _check_labels(labels: torch.Tensor, logits: torch.Tensor) -> None:
    """Labels the model has no output for scored 0% with no error."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        raise ConfigurationError(
            f"the dataset's labels run from {int(labels.min())} to {int(labels.max())} but the model has "
            f"{logits.shape[-1]} outputs (labels 0 to {logits.shape[-1] - 1}); use data labelled as in training"
        )


def _num_classes(model: ProtectedModel, dataset) -> int:
    classes = getattr(dataset, "classes", None)
    if classes:
        return len(classes)
    n = getattr(model.unwrap(), "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    raise ConfigurationError("cannot tell the number of classes: give the dataset a .classes list")


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, leave=False)


def _keyed_for(model: ProtectedModel, key: SecretKey, size: tuple, device: torch.device) -> KeyedInput:
    keyed = KeyedInput(key, mean=model.keyed.mean, std=model.keyed.std, input_size=size,
                       check_range=model.keyed.check_range)
    return keyed.to(device)


def _evaluation_copy(base: nn.Module, device: torch.device) -> nn.Module:
    """On CPU, a channels-last copy of a convolutional base model; the
    caller's model is never touched. Measured on one CPU thread for the demo's
    EfficientNet-Lite0: 20 wrong keys on the 359 digits test images at 32x32
    took 4.6 s of CPU with channels-last weights against 11.0 s with
    channels-last input alone (about 2x at 64x64 against contiguous)."""
    if device.type != "cpu" or not any(p.dim() == 4 for p in base.parameters()):
        return base
    return copy.deepcopy(base).to(memory_format=torch.channels_last).eval()


def _model_input(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """The transformed batch as the base model takes it: in the weights'
    dtype, and channels-last on CPU (to match :func:`_evaluation_copy`)."""
    if dtype is not None and x.dtype != dtype:
        x = x.to(dtype)
    if x.device.type == "cpu" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _plain_input(model: ProtectedModel, images: torch.Tensor) -> torch.Tensor:
    """Plain images normalized as the model expects (no keyed transform)."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    mean = torch.tensor(model.keyed.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(model.keyed.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def _score(
    model: ProtectedModel,
    dataset,
    keys: Sequence[SecretKey],
    *,
    with_key: bool,
    plain: bool,
    batch_size: int,
    device,
    progress: bool,
) -> tuple:
    """Correct counts under ``model``'s key, each of ``keys``, and plain
    images, in one pass over ``dataset``."""
    model = require_protected(model, "the evaluation")  # also through torch.compile / DDP
    device = _device_of(model, device)
    if _device_of(model, None) != device:
        model.to(device)
    was_training = model.training
    model.eval()
    base = _evaluation_copy(model.unwrap(), device)
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    keyed = {}
    key_correct = 0
    plain_correct = 0
    wrong_correct = [0] * len(keys)
    total = 0
    length = len(dataset)
    num_batches = max(1, math.ceil(length / batch_size))
    passes = len(keys) + int(with_key) + int(plain)
    bar = _progress(num_batches * passes, "evaluating", progress)
    try:
        with torch.inference_mode():
            for images, labels in _batches(dataset, batch_size):
                images, labels = images.to(device), labels.to(device)
                total += labels.numel()
                if with_key:
                    out = logits_of(base(_model_input(model.keyed(images), dtype)))
                    _check_labels(labels, out)
                    key_correct += int((out.argmax(-1) == labels).sum())
                    bar.update(1)
                if plain:
                    out = logits_of(base(_model_input(_plain_input(model, images), dtype)))
                    plain_correct += int((out.argmax(-1) == labels).sum())
                    bar.update(1)
                size = tuple(images.shape[1:])
                for i, key in enumerate(keys):
                    if (i, size) not in keyed:
                        keyed = {k: v for k, v in keyed.items() if k[0] != i}
                        keyed[(i, size)] = _keyed_for(model, key, size, device)
                    out = logits_of(base(_model_input(keyed[(i, size)](images), dtype)))
                    wrong_correct[i] += int((out.argmax(-1) == labels).sum())
                    bar.update(1)
    finally:
        bar.close()
        model.train(was_training)
    if total == 0:
        raise ConfigurationError("the dataset is empty")
    return key_correct / total, plain_correct / total, [c / total for c in wrong_correct], total


def wrong_key_accuracies(
    model: ProtectedModel,
    dataset,
    *,
    num_keys: int,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = True,
) -> list:
    """Accuracy of ``model`` on ``dataset`` under ``num_keys`` random wrong
    keys with the same settings as its key (reproducible via ``seed``).

    The base weights are shared, not copied; only the keyed input changes.

    Args:
        model: a :class:`ProtectedModel`.
        dataset: items ``(image, label)``, images float in [0, 1] or uint8, CHW.
        num_keys: how many wrong keys.
        seed: picks the wrong keys (see :func:`wrong_keys`).
        batch_size: images per forward pass.
        device: where to run; defaults to the model's device.
        progress: show a progress bar (stderr).

    Returns:
        One accuracy (0..1) per wrong key, in the order of ``wrong_keys``.

    Example:
        >>> accs = wrong_key_accuracies(model, test_set, num_keys=20)   # doctest: +SKIP
    """
    model = require_protected(model, "wrong_key_accuracies")  # also through DataParallel / DDP / torch.compile
    keys = wrong_keys(model.key, num_keys, seed=seed)
    _, _, accs, _ = _score(model, dataset, keys, with_key=False, plain=False,
                           batch_size=batch_size, device=device, progress=progress)
    return accs


def _example_views(model: ProtectedModel, dataset, count: int) -> tuple:
    count = min(count, len(dataset))
    if count <= 0:
        return None, None
    images = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(count)])
    if images.dtype == torch.uint8:
        images = images.float() / 255
    images = images.float().clamp(0, 1)
    return images, apply_transform(images, model.key, check_range=False)


def evaluate_protection(
    model: ProtectedModel,
    dataset,
    *,
    num_wrong_keys: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = True,
    dataset_name: Optional[str] = None,
    unprotected_accuracy: Optional[float] = None,
    num_examples: int = 6,
    extra: Optional[dict] = None,
) -> ProtectionReport:
    """Measure a protected model: accuracy with its key, with
    ``num_wrong_keys`` random wrong keys, and on plain images.

    Args:
        model: a :class:`ProtectedModel` (with the owner's key).
        dataset: items ``(image, label)``; images in [0, 1] (or uint8), CHW,
            at a size the key accepts.
        num_wrong_keys: random wrong keys to try (same block size and scheme).
        seed: picks the wrong keys; same seed, same keys.
        batch_size, device, progress: as in :func:`wrong_key_accuracies`.
        dataset_name: recorded in the report (default: ``dataset.name`` or
            the class name).
        unprotected_accuracy: accuracy of an unprotected model trained with
            the same recipe, if measured, to show the cost of protection.
        num_examples: images kept for the example figure.
        extra: public values to record (e.g. epochs).

    Example:
        >>> report = evaluate_protection(model, test_set, num_wrong_keys=100)  # doctest: +SKIP
        >>> print(report.key_accuracy, report.wrong_key_accuracy_max)         # doctest: +SKIP
    """
    if not isinstance(num_wrong_keys, int) or isinstance(num_wrong_keys, bool) or not (
            0 <= num_wrong_keys <= MAX_WRONG_KEYS):
        # 1e6 (a float) started a pass that grew to gigabytes; 2.5 ran 3 keys.
        raise ConfigurationError(f"num_wrong_keys must be a whole number from 0 to {MAX_WRONG_KEYS}, "
                                 f"got {num_wrong_keys!r}")
    if unprotected_accuracy is not None and not (
            isinstance(unprotected_accuracy, (int, float)) and not isinstance(unprotected_accuracy, bool)
            and 0 <= unprotected_accuracy <= 1):
        raise ConfigurationError(f"unprotected_accuracy must be a fraction in [0, 1], got {unprotected_accuracy!r}")
    model = require_protected(model, "evaluate_protection")  # also through DataParallel / DDP / torch.compile
    key = model.key
    num_classes = _num_classes(model, dataset)  # before the long pass, which cannot tell it either
    keys = wrong_keys(key, num_wrong_keys, seed=seed)
    key_acc, plain_acc, accs, total = _score(model, dataset, keys, with_key=True, plain=True,
                                             batch_size=batch_size, device=device, progress=progress)
    images, protected = _example_views(model, dataset, num_examples)
    name = dataset_name or getattr(dataset, "name", None) or type(dataset).__name__
    return ProtectionReport(
        key_accuracy=key_acc, wrong_key_accuracies=accs, plain_accuracy=plain_acc,
        num_classes=num_classes, num_examples=total, dataset=str(name),
        scheme=key.scheme_name, block_size=key.block_size, fingerprint=key.fingerprint, seed=seed,
        unprotected_accuracy=unprotected_accuracy, extra=dict(extra or {}),
        example_images=images, example_protected=protected,
        weights_digest=weights_digest(_uncompiled(model.unwrap())),
    )
