"""Learned key estimation: learn the permutation (and the negative/positive
bits) in front of the frozen protected model from labelled plain data.

The permutation is relaxed with Gumbel-Sinkhorn (Mena et al., 2018): a
learned score matrix ``log_alpha`` (L x L) plus Gumbel noise, divided by a
temperature annealed from ``temperature[0]`` to ``temperature[1]``, is
turned into a doubly stochastic matrix by Sinkhorn normalization in log
space; the soft-shuffled block is ``y = S x``. Flip bits are relaxed as
sigmoids: ``y <- y + s (1 - 2 y)``. The cross-entropy of the frozen model
on the soft-keyed images is minimized with Adam; the hard key is then read
out by Hungarian matching on ``log_alpha``
(:func:`scipy.optimize.linear_sum_assignment`) and ``flip_logit > 0``.

Value maps of ``shift``/``ffx`` and the block permutation of ``scramble``
are not learned; the recovered key takes them from a random key (what an
attacker who does not model them would use).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..module import ProtectedModel
from ._candidate import (CandidateKey, CandidateModel, blocks_to_image, image_to_blocks, leaves_model_as_found,
                         logits_of, seeded_key)
from ._data import as_tensors, candidate_accuracy, resolve_device

__all__ = ["KeyEstimationResult", "estimate_key", "sinkhorn"]


@dataclass
class KeyEstimationResult:
    """What the learned estimate recovered (fractions, accuracies 0..1).

    Attributes:
        recovered_fraction: permutation entries right after Hungarian rounding.
        chance_fraction: ``1/L``.
        flip_agreement: negative/positive bits right (``None`` without np).
        accuracy: accuracy with the estimated key on the evaluation images.
        key_accuracy: accuracy with the true key on the same images.
        soft_accuracy: training-batch accuracy of the relaxed key at the end.
        history: ``(step, loss, batch accuracy)`` every few steps.
    """

    recovered_fraction: float
    chance_fraction: float
    flip_agreement: Optional[float]
    accuracy: float
    key_accuracy: float
    soft_accuracy: float
    steps: int
    train_images: int
    seconds: float
    seed: int
    history: list = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("history")
        return d


def sinkhorn(log_alpha: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Doubly stochastic matrix from scores, by alternating row and column
    normalization in log space."""
    for _ in range(iterations):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=0, keepdim=True)
    return log_alpha.exp()


@leaves_model_as_found
def estimate_key(
    model: ProtectedModel,
    train_set,
    eval_set=None,
    *,
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 0.1,
    temperature: tuple = (1.0, 0.05),
    noise: float = 1.0,
    sinkhorn_iterations: int = 20,
    seed: int = 0,
    device=None,
    progress: bool = True,
) -> KeyEstimationResult:
    """Learn a key for the frozen ``model`` from labelled plain images.

    Args:
        model: the protected model (weights frozen; its key only scores the
            estimate).
        train_set: the attacker's labelled images in [0, 1] (or an
            ``(images, labels)`` pair).
        eval_set: images to score the estimated key on (default: ``train_set``).
        steps: optimizer steps.
        batch_size: images per step.
        lr: Adam learning rate of the scores.
        temperature: Sinkhorn temperature at the first and the last step
            (annealed geometrically).
        noise: scale of the Gumbel noise.
        sinkhorn_iterations: normalization rounds per step.
        seed: makes initialization, noise and batches reproducible.

    Example:
        >>> res = estimate_key(protected, attacker_train, test_set, steps=300)   # doctest: +SKIP
        >>> res.recovered_fraction, res.accuracy                                # doctest: +SKIP
    """
    device = resolve_device(device)
    images, labels = as_tensors(train_set)
    eval_images, eval_labels = as_tensors(eval_set) if eval_set is not None else (images, labels)
    attacked = CandidateModel.from_protected(model).to(device).eval()
    with _frozen(attacked):
        return _estimate(attacked, key=model.key, images=images, labels=labels, eval_images=eval_images,
                         eval_labels=eval_labels, steps=steps, batch_size=batch_size, lr=lr,
                         temperature=temperature, noise=noise, sinkhorn_iterations=sinkhorn_iterations,
                         seed=seed, device=device, progress=progress)


@contextlib.contextmanager
def _frozen(module: torch.nn.Module) -> Iterator[None]:
    """No gradients for ``module``'s parameters inside the block; the
    caller's flags are restored after (the weights are the caller's model)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _estimate(attacked: CandidateModel, *, key, images, labels, eval_images, eval_labels, steps, batch_size, lr,
              temperature, noise, sinkhorn_iterations, seed, device, progress) -> KeyEstimationResult:
    from scipy.optimize import linear_sum_assignment
    from tqdm.auto import tqdm

    size = tuple(images.shape[-2:])
    m, c, length = key.block_size, key.channels, key.block_length
    truth = CandidateKey.from_secret_key(key, image_size=size)
    decoy = CandidateKey.from_secret_key(seeded_key(key, seed, 9_999_991), image_size=size)
    learn_perm = "shuffle" in key.scheme
    learn_flip = truth.flip is not None

    generator = torch.Generator().manual_seed(seed)
    log_alpha = (0.01 * torch.randn(length, length, generator=generator)).to(device).requires_grad_(learn_perm)
    flip_logit = torch.zeros(length, device=device, requires_grad=learn_flip)
    params = [t for t, on in ((log_alpha, learn_perm), (flip_logit, learn_flip)) if on]
    optimizer = torch.optim.Adam(params, lr=lr) if params else None
    t0, t1 = temperature

    history = []
    soft_acc = 0.0
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="key estimation", disable=not progress or optimizer is None, leave=False)
    for step in bar if optimizer is not None else []:
        tau = t0 * (t1 / t0) ** (step / max(1, steps - 1))
        idx = torch.randint(images.shape[0], (min(batch_size, images.shape[0]),), generator=generator)
        x, y = images[idx].to(device), labels[idx].to(device)
        v = image_to_blocks(x, m)
        if learn_perm:
            u = torch.rand(length, length, generator=generator).to(device).clamp_(1e-9, 1 - 1e-9)
            gumbel = -torch.log(-torch.log(u))
            soft = sinkhorn((log_alpha + noise * gumbel) / tau, sinkhorn_iterations)
            v = v @ soft.T
        if learn_flip:
            s = torch.sigmoid(flip_logit)
            v = v + s * (1 - 2 * v)
        keyed = blocks_to_image(v, m, c, *size)
        if decoy.block_permutation is not None:
            keyed = blocks_to_image(image_to_blocks(keyed, m)[:, decoy.block_permutation.to(device)], m, c, *size)
        logits = logits_of(attacked.model(attacked.normalize(keyed)))
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        soft_acc = float((logits.argmax(1) == y).float().mean())
        if step % 10 == 0 or step == steps - 1:
            history.append((step, float(loss.detach()), soft_acc))
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{soft_acc:.2f}", tau=f"{tau:.3f}")
    seconds = time.perf_counter() - start

    with torch.no_grad():
        if learn_perm:
            _, cols = linear_sum_assignment(log_alpha.detach().cpu().numpy(), maximize=True)
            perm = torch.as_tensor(cols, dtype=torch.long)
        else:
            perm = truth.permutation
        flip = (flip_logit.detach().cpu() > 0) if learn_flip else None
    estimate = CandidateKey(m, c, perm, flip, decoy.value_table, decoy.block_permutation)
    return KeyEstimationResult(
        recovered_fraction=estimate.recovered_fraction(truth),
        chance_fraction=1.0 / length,
        flip_agreement=estimate.flip_agreement(truth),
        accuracy=candidate_accuracy(attacked, eval_images, eval_labels, estimate, device=device),
        key_accuracy=candidate_accuracy(attacked, eval_images, eval_labels, truth, device=device),
        soft_accuracy=soft_acc,
        steps=steps,
        train_images=int(labels.numel()),
        seconds=seconds,
        seed=seed,
        history=history,
    )
