"""The result of a protection evaluation and its files.

:class:`ProtectionReport` holds what :func:`kp_plugin.evaluate.evaluate_protection`
measured; :func:`write_report` writes it as ``report.json``, ``report.md``
and the wrong-key histogram (public values only, fit to publish with the
weights), and the example grid into a separate private directory.

Example:
    >>> report = ProtectionReport.load("out/report")     # doctest: +SKIP
    >>> print(format_summary(report))                    # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from .checkpoint import write_together

__all__ = [
    "ProtectionReport",
    "write_report",
    "report_markdown",
    "format_summary",
    "REPORT_FILE",
    "HISTOGRAM_FILE",
    "EXAMPLES_FILE",
    "PRIVATE_DIR",
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
    #: :func:`kp_plugin.checkpoint.weights_digest` of the model evaluated
    #: (public): ties the report to one checkpoint's weights.
    weights_digest: Optional[str] = None
    # Not serialized: a few plain images and the same under the key, for the
    # example figure (owner-only, see EXAMPLES_FILE).
    example_images: Optional[torch.Tensor] = field(default=None, repr=False)
    example_protected: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def chance(self) -> float:
        """Accuracy of uniform guessing: ``1 / num_classes``. On a test set
        whose classes are not balanced, always answering the largest class
        scores more: the attack suite (:mod:`kp_plugin.attacks`) calls that
        share chance, a stricter bar (10.3% against 10.0% on digits)."""
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
        """Sample standard deviation of the wrong-key accuracies (undefined,
        NaN, for fewer than two keys: null in report.json)."""
        values = self.wrong_key_accuracies
        if len(values) < 2:
            return float("nan")
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
            # null without wrong keys: NaN is not JSON (strict parsers, the Hub card's metrics)
            "wrong_key_accuracy_mean": _or_null(self.wrong_key_accuracy_mean),
            "wrong_key_accuracy_std": _or_null(self.wrong_key_accuracy_std),
            "wrong_key_accuracy_max": _or_null(self.wrong_key_accuracy_max),
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
        if self.weights_digest is not None:
            out["weights_digest"] = self.weights_digest
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
            extra=data.get("extra", {}), weights_digest=data.get("weights_digest"),
        )


def _or_null(value: float) -> Optional[float]:
    return None if math.isnan(value) else value


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
    drawn = [HISTOGRAM_FILE] if figures else []
    private = None
    if figures and report.example_images is not None:
        private = Path(private_directory) if private_directory is not None else (
            directory.resolve().parent / PRIVATE_DIR)
    private_examples = os.path.relpath(private / EXAMPLES_FILE, directory.resolve()) if private is not None else None
    # Both texts before any file is written (a value JSON refuses fails here),
    # then the report's files as one change: each to a temporary beside its
    # place, renamed in together (a failed write or rename puts the previous
    # ones back), so report.json and report.md never come from two runs.
    texts = [(REPORT_FILE, json.dumps(report.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"),
             (REPORT_MARKDOWN, report_markdown(report, figures=drawn, private_examples=private_examples))]
    if private is not None:
        from .figures import plot_examples

        private.mkdir(parents=True, exist_ok=True)
        os.chmod(private, 0o700)  # owner-only: plain images beside protected ones
        plot_examples(report.example_images, report.example_protected, private / EXAMPLES_FILE)
    writes = [(directory / name, functools.partial(Path.write_text, data=text)) for name, text in texts]
    if figures:
        from .figures import plot_wrong_key_histogram

        writes.insert(0, (directory / HISTOGRAM_FILE, functools.partial(plot_wrong_key_histogram, report)))
    write_together(writes)
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
