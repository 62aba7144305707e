"""Does the protection hold? Accuracy with the key, with random wrong keys,
and on plain images, measured in one pass over a dataset.

``evaluate_protection(model, dataset)`` reads every batch once and scores it
under the owner's key, under ``num_wrong_keys`` random keys with the same
settings, and without any transform (plain images, normalized as the model
expects). ``write_report(report, directory)`` writes ``report.json``,
``report.md`` and the figures.

Wrong keys are drawn from ``seed`` by hashing, not from the CSPRNG, so a
report can be reproduced; they are public test keys, never secrets.

Example:
    >>> report = evaluate_protection(model, test_set, num_wrong_keys=100)   # doctest: +SKIP
    >>> write_report(report, "out/report")                                  # doctest: +SKIP
    >>> report.wrong_key_accuracy_mean                                      # doctest: +SKIP
    0.12
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .errors import ConfigurationError
from .keys import SecretKey
from .module import KeyedInput, ProtectedModel
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
]

REPORT_FILE = "report.json"
REPORT_MARKDOWN = "report.md"
HISTOGRAM_FILE = "wrong_keys.png"
#: Plain images beside the same images under the key. A plain/protected pair
#: reveals the transform to whoever sees it (known plaintext), so this file
#: is for the owner only: it is written to a separate private directory
#: (default ``<report>/../private/``), never beside the publishable report.
EXAMPLES_FILE = "examples.png"
PRIVATE_DIR = "private"


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


@dataclass
class ProtectionReport:
    """Accuracies of a protected model with its key, wrong keys and no key.

    Accuracies are fractions in [0, 1]. ``to_dict()`` is what ``report.json``
    holds (public values only: the fingerprint, never the key).
    """

    key_accuracy: float
    wrong_key_accuracies: list
    plain_accuracy: float
    num_classes: int
    num_examples: int
    dataset: str
    scheme: str
    block_size: int
    fingerprint: str
    seed: int = 0
    unprotected_accuracy: Optional[float] = None
    extra: dict = field(default_factory=dict)
    # Not serialized: a few plain images and the same under the key, for the
    # example figure (owner-only, see EXAMPLES_FILE).
    example_images: Optional[torch.Tensor] = field(default=None, repr=False)
    example_protected: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def chance(self) -> float:
        """Accuracy of guessing: ``1 / num_classes``."""
        return 1.0 / self.num_classes

    @property
    def num_wrong_keys(self) -> int:
        """How many random wrong keys were tried."""
        return len(self.wrong_key_accuracies)

    @property
    def wrong_key_accuracy_mean(self) -> float:
        """Mean accuracy over the wrong keys."""
        values = self.wrong_key_accuracies
        return float(sum(values) / len(values)) if values else float("nan")

    @property
    def wrong_key_accuracy_std(self) -> float:
        """Sample standard deviation of the wrong-key accuracies."""
        values = self.wrong_key_accuracies
        if len(values) < 2:
            return 0.0 if values else float("nan")
        mean = self.wrong_key_accuracy_mean
        return float(math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)))

    @property
    def wrong_key_accuracy_max(self) -> float:
        """Accuracy under the best of the wrong keys."""
        return float(max(self.wrong_key_accuracies)) if self.wrong_key_accuracies else float("nan")

    def to_dict(self) -> dict:
        """What ``report.json`` holds: the fields, the derived wrong-key
        statistics and ``chance`` (``unprotected_accuracy`` only if known)."""
        out = {
            "key_accuracy": self.key_accuracy,
            "wrong_key_accuracy_mean": self.wrong_key_accuracy_mean,
            "wrong_key_accuracy_std": self.wrong_key_accuracy_std,
            "wrong_key_accuracy_max": self.wrong_key_accuracy_max,
            "wrong_key_accuracies": list(self.wrong_key_accuracies),
            "num_wrong_keys": self.num_wrong_keys,
            "wrong_key_seed": self.seed,
            "plain_accuracy": self.plain_accuracy,
            "chance": self.chance,
            "num_classes": self.num_classes,
            "num_examples": self.num_examples,
            "dataset": self.dataset,
            "scheme": self.scheme,
            "block_size": self.block_size,
            "fingerprint": self.fingerprint,
        }
        if self.unprotected_accuracy is not None:
            out["unprotected_accuracy"] = self.unprotected_accuracy
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "ProtectionReport":
        """Read ``report.json`` (from a directory or the file)."""
        path = Path(directory)
        if path.is_dir():
            path = path / REPORT_FILE
        data = json.loads(path.read_text("utf-8"))
        return cls(
            key_accuracy=data["key_accuracy"], wrong_key_accuracies=list(data["wrong_key_accuracies"]),
            plain_accuracy=data["plain_accuracy"], num_classes=data["num_classes"],
            num_examples=data["num_examples"], dataset=data["dataset"], scheme=data["scheme"],
            block_size=data["block_size"], fingerprint=data["fingerprint"],
            seed=data.get("wrong_key_seed", 0), unprotected_accuracy=data.get("unprotected_accuracy"),
            extra=data.get("extra", {}),
        )


def _device_of(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _batches(dataset, batch_size: int) -> Iterator[tuple]:
    from .data import iterate_batches  # in-memory datasets are sliced, not read item by item

    yield from iterate_batches(dataset, batch_size=batch_size)


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


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _keyed_for(model: ProtectedModel, key: SecretKey, size: tuple, device: torch.device) -> KeyedInput:
    keyed = KeyedInput(key, mean=model.keyed.mean, std=model.keyed.std, input_size=size,
                       check_range=model.keyed.check_range)
    return keyed.to(device)


@contextlib.contextmanager
def _channels_last(base: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a CPU evaluation with channels-last weights (measured 1.6-1.8x
    faster for EfficientNet-Lite0 inference at 64x64 on CPU), then put the
    weights back as they were. The Parameter objects are kept, so an
    optimizer holding them is unaffected."""
    convs = [p for p in base.parameters() if p.dim() == 4]
    if device.type != "cpu" or not convs or not all(p.is_contiguous() for p in convs):
        yield
        return
    base.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        base.to(memory_format=torch.contiguous_format)


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
    if not isinstance(model, ProtectedModel):
        raise ConfigurationError(f"expected a ProtectedModel (from wrap_model), got {type(model).__name__}")
    device = _device_of(model, device)
    base = model.unwrap()
    was_training = model.training
    model.eval()
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
        with torch.inference_mode(), _channels_last(base, device):
            for images, labels in _batches(dataset, batch_size):
                images, labels = images.to(device), labels.to(device)
                total += labels.numel()
                if with_key:
                    key_correct += int((_logits(model(images)).argmax(-1) == labels).sum())
                    bar.update(1)
                if plain:
                    out = _logits(base(_plain_input(model, images)))
                    plain_correct += int((out.argmax(-1) == labels).sum())
                    bar.update(1)
                size = tuple(images.shape[1:])
                for i, key in enumerate(keys):
                    if (i, size) not in keyed:
                        keyed = {k: v for k, v in keyed.items() if k[0] != i}
                        keyed[(i, size)] = _keyed_for(model, key, size, device)
                    out = _logits(base(keyed[(i, size)](images)))
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
    if num_wrong_keys < 0:
        raise ConfigurationError(f"num_wrong_keys must be >= 0, got {num_wrong_keys}")
    key = model.key
    keys = wrong_keys(key, num_wrong_keys, seed=seed)
    key_acc, plain_acc, accs, total = _score(model, dataset, keys, with_key=True, plain=True,
                                             batch_size=batch_size, device=device, progress=progress)
    images, protected = _example_views(model, dataset, num_examples)
    name = dataset_name or getattr(dataset, "name", None) or type(dataset).__name__
    return ProtectionReport(
        key_accuracy=key_acc, wrong_key_accuracies=accs, plain_accuracy=plain_acc,
        num_classes=_num_classes(model, dataset), num_examples=total, dataset=str(name),
        scheme=key.scheme_name, block_size=key.block_size, fingerprint=key.fingerprint, seed=seed,
        unprotected_accuracy=unprotected_accuracy, extra=dict(extra or {}),
        example_images=images, example_protected=protected,
    )


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def report_markdown(report: ProtectionReport, *, figures: Sequence[str] = (),
                    private_examples: Optional[str] = None) -> str:
    """The report as Markdown (what ``report.md`` holds)."""
    rows = [
        ("Unprotected model (same recipe)", _pct(report.unprotected_accuracy)),
        ("Protected, with the key", _pct(report.key_accuracy)),
        (f"Wrong keys, mean over {report.num_wrong_keys}",
         f"{_pct(report.wrong_key_accuracy_mean)} (std {_pct(report.wrong_key_accuracy_std)})"),
        (f"Wrong keys, best of {report.num_wrong_keys}", _pct(report.wrong_key_accuracy_max)),
        ("Plain images (no key)", _pct(report.plain_accuracy)),
        ("Chance", _pct(report.chance)),
    ]
    lines = [
        "# Protection report",
        "",
        f"Dataset `{report.dataset}` ({report.num_examples} images, {report.num_classes} classes); "
        f"scheme `{report.scheme}`, block size {report.block_size}; key fingerprint "
        f"`{report.fingerprint}`; wrong keys drawn with seed {report.seed}.",
        "",
        "| | Accuracy |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value} |" for name, value in rows]
    if HISTOGRAM_FILE in figures:
        lines += ["", f"![Accuracy under wrong keys]({HISTOGRAM_FILE})"]
    if private_examples:
        lines += [
            "",
            f"Plain images beside what the model sees are in `{private_examples}`, kept apart from this "
            "report: a plain/protected pair reveals the transform, so that file is for the owner only.",
        ]
    return "\n".join(lines) + "\n"


def write_report(
    report: ProtectionReport,
    directory: Union[str, os.PathLike],
    *,
    figures: bool = True,
    private_directory: Union[str, os.PathLike, None] = None,
) -> Path:
    """Write ``report.json``, ``report.md`` and (with matplotlib) the
    wrong-key histogram (``wrong_keys.png``, against the correct-key line)
    into ``directory``: public values only, fit to publish with the weights.

    The grid of example images (plain beside protected, ``examples.png``)
    goes to ``private_directory`` instead, because a plain/protected pair
    reveals the transform.

    Args:
        report: from :func:`evaluate_protection`.
        directory: created if needed.
        figures: also draw the PNG figures.
        private_directory: where the example grid goes; default
            ``private/`` beside ``directory`` (e.g. ``out/report`` ->
            ``out/private``).

    Returns:
        The directory.

    Example:
        >>> write_report(report, "out/report")   # doctest: +SKIP
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    drawn = []
    private_examples = None
    if figures:
        from .figures import plot_examples, plot_wrong_key_histogram

        plot_wrong_key_histogram(report, directory / HISTOGRAM_FILE)
        drawn.append(HISTOGRAM_FILE)
        if report.example_images is not None:
            private = Path(private_directory) if private_directory is not None else (
                directory.resolve().parent / PRIVATE_DIR)
            private.mkdir(parents=True, exist_ok=True)
            plot_examples(report.example_images, report.example_protected, private / EXAMPLES_FILE)
            private_examples = os.path.relpath(private / EXAMPLES_FILE, directory.resolve())
    (directory / REPORT_FILE).write_text(json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n")
    (directory / REPORT_MARKDOWN).write_text(
        report_markdown(report, figures=drawn, private_examples=private_examples))
    return directory


def format_summary(report: ProtectionReport) -> str:
    """The report's headline numbers as a plain-text table for a terminal.

    Example:
        >>> print(format_summary(report))   # doctest: +SKIP
    """
    rows = [
        ("unprotected model (same recipe)", _pct(report.unprotected_accuracy)),
        ("protected, with the key", _pct(report.key_accuracy)),
        (f"wrong keys, mean of {report.num_wrong_keys}", _pct(report.wrong_key_accuracy_mean)),
        (f"wrong keys, best of {report.num_wrong_keys}", _pct(report.wrong_key_accuracy_max)),
        ("plain images (no key)", _pct(report.plain_accuracy)),
        ("chance", _pct(report.chance)),
    ]
    width = max(len(name) for name, _ in rows)
    title = f"{report.dataset}: {report.num_examples} images, scheme {report.scheme}, block size {report.block_size}"
    lines = [title, "-" * max(len(title), width + 10)]
    lines += [f"{name.ljust(width)}  {value.rjust(6)}" for name, value in rows]
    return "\n".join(lines)
