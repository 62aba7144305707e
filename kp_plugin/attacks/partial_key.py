"""Partial key: accuracy when a fraction ``f`` of the key is right.

For each ``f``, a random set of ``round(f * L)`` block positions gets the
true permutation entry and the true value map (negative/positive bit, shift,
FFX table); the remaining positions get the remaining source pixels in a
random order and the value maps of a random key. The curve says how much
of the key an attacker must find before the model becomes useful, and so
how much a partial recovery (by weight matching or key estimation) buys.
At ``f = 1`` the candidate *is* the key.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..module import ProtectedModel
from ._candidate import AttackError, CandidateKey, CandidateModel, check_count, leaves_model_as_found, seeded_key
from ._data import as_tensors, candidate_accuracy, chance_of, num_classes_of, resolve_device

__all__ = ["PartialKeyResult", "partial_key_curve", "partial_candidate", "DEFAULT_FRACTIONS"]

DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)


@dataclass
class PartialKeyResult:
    """``accuracies[i]``: mean accuracy (over ``repeats`` draws) with a
    fraction ``fractions[i]`` of the key right; ``spread[i]``: max - min."""

    fractions: list
    accuracies: list
    spread: list
    key_accuracy: float
    chance: float
    repeats: int
    seed: int
    curve: list = field(default_factory=list, repr=False)

    def fraction_needed(self, accuracy: float) -> float | None:
        """The smallest fraction whose mean accuracy reaches ``accuracy``."""
        for f, a in zip(self.fractions, self.accuracies):
            if a >= accuracy:
                return f
        return None

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("curve")
        midway = self.chance + 0.5 * (self.key_accuracy - self.chance)
        d["fraction_for_half_way"] = self.fraction_needed(midway)
        return d


def partial_candidate(truth: CandidateKey, other: CandidateKey, fraction: float, generator: torch.Generator) -> CandidateKey:
    """``truth`` on a random ``fraction`` of positions, ``other``'s value maps
    and a random assignment of the remaining sources elsewhere.

    The block order (block scrambling) is the true one at every fraction,
    0 included: the curve gives the attacker the scramble for free, so it
    errs on the attacker's side (an attack that must also find the block
    order, such as weight matching, starts from less)."""
    if not 0 <= fraction <= 1:
        raise AttackError(f"fraction must be in [0, 1], got {fraction}")
    length = truth.length
    keep = torch.zeros(length, dtype=torch.bool)
    keep[torch.randperm(length, generator=generator)[: int(round(fraction * length))]] = True
    perm = truth.permutation.clone()
    rest = torch.nonzero(~keep).flatten()
    if rest.numel():
        sources = truth.permutation[rest]
        perm[rest] = sources[torch.randperm(rest.numel(), generator=generator)]
    flip = table = None
    if truth.flip is not None:
        flip = torch.where(keep, truth.flip, other.flip)
    if truth.value_table is not None:
        table = torch.where(keep[:, None], truth.value_table, other.value_table)
    return CandidateKey(truth.block_size, truth.channels, perm, flip, table, truth.block_permutation)


@leaves_model_as_found
@torch.no_grad()
def partial_key_curve(
    model: ProtectedModel,
    dataset,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    repeats: int = 3,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
    progress: bool = True,
) -> PartialKeyResult:
    """Accuracy of ``model`` when a fraction of its key is right.

    Args:
        model: the protected model (its key is the truth the fractions take from).
        dataset: labelled images in [0, 1], or an ``(images, labels)`` pair.
        fractions: fractions of block positions that are right.
        repeats: random draws per fraction (the mean is reported).
        seed: makes the draws reproducible.

    Example:
        >>> curve = partial_key_curve(protected, test_set)        # doctest: +SKIP
        >>> curve.accuracies[-1] == curve.key_accuracy            # doctest: +SKIP
        True
    """
    from tqdm.auto import tqdm

    check_count("repeats", repeats, "random draws per fraction, whose mean is reported")
    device = resolve_device(device)
    images, labels = as_tensors(dataset)
    attacked = CandidateModel.from_protected(model).to(device).eval()
    key, size = model.key, tuple(images.shape[-2:])
    truth = CandidateKey.from_secret_key(key, image_size=size)
    generator = torch.Generator().manual_seed(seed)

    def accuracy(candidate: CandidateKey) -> float:
        return candidate_accuracy(attacked, images, labels, candidate, batch_size=batch_size, device=device)

    key_acc = accuracy(truth)
    means, spreads, curve = [], [], []
    for i, f in enumerate(tqdm(list(fractions), desc="partial key", disable=not progress, leave=False)):
        accs = []
        for r in range(repeats):
            other = CandidateKey.from_secret_key(seeded_key(key, seed, i * repeats + r), image_size=size)
            accs.append(accuracy(partial_candidate(truth, other, float(f), generator)))
        means.append(sum(accs) / len(accs))
        spreads.append(max(accs) - min(accs))
        curve.append(accs)
    return PartialKeyResult(
        fractions=[float(f) for f in fractions],
        accuracies=means,
        spread=spreads,
        key_accuracy=key_acc,
        chance=chance_of(labels, num_classes_of(dataset, labels)),
        repeats=repeats,
        seed=seed,
        curve=curve,
    )
