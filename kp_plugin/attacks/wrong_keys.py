"""Wrong keys: how well the protected model does with random keys, without a
key (plain images), and when the *least* likely class is read out.

The least-likely readout matters because a training objective that pushes
the true class down under wrong keys can leak it upside down: measured on
an 8-class task, one such objective took wrong-key accuracy to 6%, below
chance; taking the arg-min of the logits then recovers the label. A model
is protected only if both readouts sit near chance.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..module import ProtectedModel
from ..evaluate import wrong_keys
from ._candidate import AttackError, CandidateKey, CandidateModel, leaves_model_as_found
from ._data import as_tensors, batched_logits, chance_of, num_classes_of, resolve_device

__all__ = ["WrongKeyResult", "wrong_key_attack", "readout_accuracies"]


@dataclass
class WrongKeyResult:
    """Accuracies under random wrong keys and on plain images (0..1).

    ``accuracies[i]`` / ``least_likely[i]``: key ``i``'s top-1 and
    least-likely-class accuracy; keys are reproducible from ``seed``.
    ``chance``: the largest class's share of the test labels (what always
    answering one class scores); the evaluation report's ``chance`` is
    ``1 / num_classes``, the same on a balanced test set.
    """

    key_accuracy: float
    plain_accuracy: float
    plain_least_likely_accuracy: float
    accuracies: list = field(default_factory=list)
    least_likely: list = field(default_factory=list)
    chance: float = 0.0
    num_classes: int = 0
    num_images: int = 0
    seed: int = 0

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((a - m) ** 2 for a in self.accuracies) / max(1, len(self.accuracies) - 1))

    @property
    def max(self) -> float:
        return max(self.accuracies)

    @property
    def least_likely_mean(self) -> float:
        return sum(self.least_likely) / len(self.least_likely)

    @property
    def least_likely_max(self) -> float:
        return max(self.least_likely)

    def summary(self) -> dict:
        """The figures a report shows (no per-key lists)."""
        return {
            "key_accuracy": self.key_accuracy,
            "wrong_key_accuracy_mean": self.mean,
            "wrong_key_accuracy_std": self.std,
            "wrong_key_accuracy_max": self.max,
            "least_likely_accuracy_mean": self.least_likely_mean,
            "least_likely_accuracy_max": self.least_likely_max,
            "plain_accuracy": self.plain_accuracy,
            "plain_least_likely_accuracy": self.plain_least_likely_accuracy,
            "num_wrong_keys": len(self.accuracies),
            "chance": self.chance,
            "num_classes": self.num_classes,
            "num_images": self.num_images,
        }

    def to_dict(self) -> dict:
        return {**asdict(self), **self.summary()}


def readout_accuracies(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top-1 accuracy, least-likely-class accuracy) of ``logits``."""
    top = float((logits.argmax(1) == labels).float().mean())
    bottom = float((logits.argmin(1) == labels).float().mean())
    return top, bottom


@leaves_model_as_found
@torch.no_grad()
def wrong_key_attack(
    model: ProtectedModel,
    dataset,
    *,
    num_keys: int = 100,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = True,
) -> WrongKeyResult:
    """Accuracy of ``model`` with its key, with ``num_keys`` random wrong keys
    (same block size and scheme), and on plain images; each with the top-1
    and the least-likely-class readout.

    Args:
        model: the protected model (its key is used for the reference row only).
        dataset: labelled test images in [0, 1] (items ``(image, label)``), or
            an ``(images, labels)`` pair of tensors.
        num_keys: how many random wrong keys.
        seed: picks the wrong keys (:func:`kp_plugin.evaluate.wrong_keys`,
            the same keys ``kp evaluate`` uses).
        batch_size: images per forward pass.
        device: where to run (default: CUDA if available).
        progress: show a progress bar.

    Example:
        >>> result = wrong_key_attack(protected, test_set, num_keys=100)   # doctest: +SKIP
        >>> result.mean, result.least_likely_max                           # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if isinstance(num_keys, bool) or not isinstance(num_keys, int) or num_keys < 1:
        raise AttackError(f"num_keys must be a positive integer (the mean and maximum need a key), got {num_keys!r}")
    device = resolve_device(device)
    images, labels = as_tensors(dataset)
    num_classes = num_classes_of(dataset, labels)
    attacked = CandidateModel.from_protected(model).to(device).eval()
    key = model.key
    size = tuple(images.shape[-2:])

    def run(candidate: Optional[CandidateKey]) -> tuple[float, float]:
        logits = batched_logits(lambda x: attacked(x, candidate), images, batch_size=batch_size, device=device)
        return readout_accuracies(logits, labels)

    key_acc, _ = run(CandidateKey.from_secret_key(key, image_size=size))
    plain_acc, plain_ll = run(None)
    # The same keys as `kp evaluate` (kp_plugin.evaluate.wrong_keys, same
    # seed), so the top-1 figures agree with the evaluation report (its
    # chance is 1 / num_classes, this one the largest class's share); both
    # readouts come from one pass per key.
    accs, lls = [], []
    for wrong in tqdm(wrong_keys(key, num_keys, seed=seed), desc="wrong keys", disable=not progress, leave=False):
        acc, ll = run(CandidateKey.from_secret_key(wrong, image_size=size))
        accs.append(acc)
        lls.append(ll)
    return WrongKeyResult(
        key_accuracy=key_acc,
        plain_accuracy=plain_acc,
        plain_least_likely_accuracy=plain_ll,
        accuracies=accs,
        least_likely=lls,
        chance=chance_of(labels, num_classes),
        num_classes=num_classes,
        num_images=int(labels.numel()),
        seed=seed,
    )
