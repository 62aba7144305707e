"""Heuristic key search: hill-climb on the key with pairwise swaps of the
permutation (and single negative/positive bit flips), keeping every move
that does not lower accuracy on a batch (the authors' code does the swaps).

Moves are proposed in groups of ``parallel`` and scored in one forward
pass; the best of a group is kept if it does not lower the batch accuracy.
Value maps of ``shift``/``ffx`` schemes are not searched (they stay those of
the random starting key): the search space there is far larger still.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from ..module import ProtectedModel
from ._candidate import CandidateKey, check_count, leaves_model_as_found, seeded_key
from .random_search import SearchSetup

__all__ = ["HeuristicSearchResult", "heuristic_key_search"]


@dataclass
class HeuristicSearchResult:
    """Outcome of the swap search (accuracies 0..1).

    ``recovered_fraction``: permutation entries that match the true key
    (the start has about ``1/L``); ``history``: ``(proposals, batch
    accuracy)`` after each accepted improvement.
    """

    budget: int
    search_images: int
    initial_search_accuracy: float
    final_search_accuracy: float
    final_holdout_accuracy: float
    initial_recovered_fraction: float
    recovered_fraction: float
    accepted_moves: int
    key_accuracy: float
    chance: float
    seed: int
    seconds: float
    history: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


def _propose(current: CandidateKey, generator: torch.Generator, with_flip: bool) -> CandidateKey:
    perm = current.permutation.clone()
    flip = None if current.flip is None else current.flip.clone()
    if with_flip and flip is not None and torch.rand((), generator=generator) < 0.5:
        p = int(torch.randint(current.length, (), generator=generator))
        flip[p] = ~flip[p]
    else:
        i, j = torch.randperm(current.length, generator=generator)[:2].tolist()
        perm[i], perm[j] = perm[j].clone(), perm[i].clone()
    return current.with_permutation(perm, flip)


@leaves_model_as_found
@torch.no_grad()
def heuristic_key_search(
    model: ProtectedModel,
    dataset,
    *,
    budget: int = 2000,
    search_images: int = 64,
    parallel: int = 16,
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> HeuristicSearchResult:
    """Hill-climb from a random key by swapping permutation entries.

    Args:
        model: the protected model (its key only scores the result).
        dataset: labelled images in [0, 1], or an ``(images, labels)`` pair.
        budget: total proposals scored (forward passes over the batch).
        search_images: batch the proposals are scored on; the rest is
            held out for the final score.
        parallel: proposals per forward pass.
        seed: makes the start, the moves and the split reproducible.

    Example:
        >>> res = heuristic_key_search(protected, test_set, budget=2000)   # doctest: +SKIP
        >>> res.recovered_fraction                                         # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    check_count("parallel", parallel, "proposals scored in one forward pass")
    setup = SearchSetup(model, dataset, search_images, seed=seed, device=device)
    key = setup.key
    truth = setup.candidate(key)
    generator = torch.Generator().manual_seed(seed)
    with_flip = "np" in key.scheme
    batch_accuracy = setup.batch_accuracies

    start = time.perf_counter()
    # The start is a random key, from a stream the random search does not use.
    current = setup.candidate(seeded_key(key, seed + 1_000_003, 0))
    current_acc = initial_acc = batch_accuracy([current])[0]
    initial_rec = current.recovered_fraction(truth)
    history = [(0, current_acc)]
    accepted = used = 0
    bar = tqdm(total=budget, desc="swap search", disable=not progress, leave=False)
    while used < budget:
        count = min(parallel, budget - used)
        proposals = [_propose(current, generator, with_flip) for _ in range(count)]
        accs = batch_accuracy(proposals)
        used += count
        bar.update(count)
        best = max(range(count), key=accs.__getitem__)
        if accs[best] >= current_acc:
            if accs[best] > current_acc:
                history.append((used, accs[best]))
            current, current_acc = proposals[best], accs[best]
            accepted += 1
            bar.set_postfix(acc=f"{current_acc:.3f}")
    bar.close()
    seconds = time.perf_counter() - start

    holdout = setup.holdout_accuracy

    return HeuristicSearchResult(
        budget=budget,
        search_images=search_images,
        initial_search_accuracy=initial_acc,
        final_search_accuracy=current_acc,
        final_holdout_accuracy=holdout(current),
        initial_recovered_fraction=initial_rec,
        recovered_fraction=current.recovered_fraction(truth),
        accepted_moves=accepted,
        key_accuracy=holdout(truth),
        chance=setup.chance,
        seed=seed,
        seconds=seconds,
        history=history,
    )
