"""Fine-tuning attack: can the stolen weights be fine-tuned on plain data
into a better model than the public pre-trained base gives with the same
data?

For each fraction of the labelled training data (stratified, reproducible),
the attacker fine-tunes (a copy of) the protected model's weights on plain
images, and, as the honest reference, fine-tunes the public base on the
same images with the same recipe. Protection holds when the stolen weights
buy no more than a couple of points over the public base: then the
protected model is worth no more than what was public anyway.

A few dozen optimizer steps on a few hundred images are noisy: on four
digits demo models one draw of the 10% subset and seed gave anything from
-24.5 to +14.2 points of gain (docs/security.md). ``repeats`` draws that many subsets and
seeds and reports the means, with each draw kept.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence, Union

from torch import nn

from ..module import ProtectedModel
from ._candidate import AttackError, leaves_model_as_found
from ._data import as_dataset, as_tensors, class_balanced_indices

__all__ = ["FinetuneResult", "FinetuneRow", "finetune_attack", "DEFAULT_DATA_FRACTIONS"]

DEFAULT_DATA_FRACTIONS = (0.01, 0.05, 0.10, 0.25)


@dataclass
class FinetuneRow:
    """One data fraction: accuracies (0..1) on the plain test images."""

    fraction: float
    images: int
    steps: int
    protected_accuracy: float
    base_accuracy: float
    #: one entry per repeat (subset and seed); the accuracies above are their means
    protected_runs: list = field(default_factory=list)
    base_runs: list = field(default_factory=list)

    @property
    def advantage(self) -> float:
        """Protected minus public base (positive: the stolen weights help),
        mean over the repeats."""
        return self.protected_accuracy - self.base_accuracy

    @property
    def advantages(self) -> list:
        """The gain of each repeat."""
        return [p - b for p, b in zip(self.protected_runs, self.base_runs)]


@dataclass
class FinetuneResult:
    """Outcome of the fine-tuning attack.

    Attributes:
        rows: one :class:`FinetuneRow` per data fraction.
        plain_accuracy: the protected weights on plain images before any
            fine-tuning.
        key_accuracy: the protected model with its key.
    """

    rows: list = field(default_factory=list)
    plain_accuracy: float = 0.0
    key_accuracy: float = 0.0
    train_images: int = 0
    seed: int = 0
    repeats: int = 1

    def row(self, fraction: float) -> FinetuneRow:
        for r in self.rows:
            if math.isclose(r.fraction, fraction):
                return r
        raise KeyError(fraction)

    def summary(self) -> dict:
        d = asdict(self)
        for r, raw in zip(self.rows, d["rows"]):
            raw["advantage"] = r.advantage
        return d


@leaves_model_as_found
def finetune_attack(
    model: ProtectedModel,
    train_set,
    test_set,
    *,
    public_base: Union[nn.Module, Callable[[], nn.Module]],
    fractions: Sequence[float] = DEFAULT_DATA_FRACTIONS,
    config=None,
    min_steps: int = 30,
    seed: int = 0,
    repeats: int = 1,
    device=None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the protected weights and the public base on the same plain
    data, for each data fraction.

    Args:
        model: the protected model (its weights are copied, not changed).
        train_set: labelled plain training images in [0, 1].
        test_set: labelled plain test images in [0, 1].
        public_base: the public pre-trained model with a head for this task,
            or a function returning a fresh one (e.g.
            ``lambda: load_efficientnet_lite0(num_classes=10)``); copied per
            fraction.
        fractions: fractions of ``train_set`` the attacker has.
        config: a :class:`kp_plugin.train.TrainConfig`; both sides use it with
            plain cross-entropy (default: ``TrainConfig(epochs=4)``).
        min_steps: small fractions get more epochs so that both sides take
            at least this many optimizer steps.
        seed: picks the subsets and seeds training.
        repeats: draws per fraction (subset and training seed ``seed``,
            ``seed + 1``, ...); rows hold the means and each draw.

    Example:
        >>> res = finetune_attack(protected, train, test, public_base=lambda: load_efficientnet_lite0(num_classes=10))  # doctest: +SKIP
        >>> res.row(0.10).advantage                                                                                   # doctest: +SKIP
    """
    from ..data import TensorImageDataset
    from ..objectives import CROSS_ENTROPY_ONLY
    from ..train import TrainConfig, _steps_per_epoch, evaluate_accuracy, fit, plain_model

    if not isinstance(model, ProtectedModel):
        raise AttackError(f"expected a ProtectedModel, got {type(model).__name__}")
    if repeats < 1:
        raise AttackError(f"repeats must be at least 1, got {repeats}")
    config = config or TrainConfig(epochs=4)
    mean, std = model.keyed.mean, model.keyed.std
    images, labels = as_tensors(train_set)
    test_set = as_dataset(test_set)
    classes = getattr(train_set, "classes", None) or [str(i) for i in range(int(labels.max()) + 1)]

    def fresh_base() -> nn.Module:
        return copy.deepcopy(public_base) if isinstance(public_base, nn.Module) else public_base()

    def train_and_score(net: nn.Module, subset, epochs: int, run_seed: int) -> float:
        plain = plain_model(net, mean, std)
        cfg = dataclasses.replace(config, epochs=epochs, seed=run_seed, objective=CROSS_ENTROPY_ONLY)
        fit(plain, subset, config=cfg, device=device, progress=progress)
        return evaluate_accuracy(plain, test_set, device=device, amp=config.amp)

    result = FinetuneResult(seed=seed, train_images=int(labels.numel()), repeats=repeats)
    result.plain_accuracy = evaluate_accuracy(plain_model(model.model, mean, std), test_set, device=device,
                                              amp=config.amp)
    result.key_accuracy = evaluate_accuracy(model, test_set, device=device, amp=config.amp)
    for fraction in fractions:
        stolen, base = [], []
        for run_seed in range(seed, seed + repeats):
            idx = class_balanced_indices(labels, float(fraction), seed=run_seed)
            subset = TensorImageDataset(images[idx], labels[idx], classes=classes, name="attacker", split="train")
            steps_per_epoch = _steps_per_epoch(len(idx), config.batch_size)  # as fit counts them
            epochs = max(config.epochs, math.ceil(min_steps / steps_per_epoch))
            stolen.append(train_and_score(copy.deepcopy(model.model), subset, epochs, run_seed))
            base.append(train_and_score(fresh_base(), subset, epochs, run_seed))
        result.rows.append(FinetuneRow(float(fraction), len(idx), epochs * steps_per_epoch,
                                       sum(stolen) / repeats, sum(base) / repeats, stolen, base))
    return result
