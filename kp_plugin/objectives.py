"""The training objective of protected fine-tuning: cross-entropy with the
key, plus terms that make the model useless without it.

Cross-entropy alone teaches a protected model whatever works, and some of
what works is the same under every key (a block's statistics survive pixel
shuffling). A suppression term shows the model the same images under a
fresh random *wrong* key (and/or plain, untransformed) and asks for an
answer that carries no information: the uniform distribution. Features
that survive a change of key then cost loss, and the model learns the ones
that depend on the key.

``train.fit`` and the transformers Trainer path (``kp_plugin.hf``) both call
:class:`ProtectionObjective`; there is one implementation.

Example:
    >>> objective = ProtectionObjective(wrong_key_weight=0.5)
    >>> loss, parts = objective(model, images01, labels, model(images01))   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigurationError
from .keys import SecretKey
from .module import KeyedInput, ProtectedModel
from .transforms import blocks_to_image, compile_plan, image_to_blocks

__all__ = [
    "ProtectionObjective",
    "DEFAULT_OBJECTIVE",
    "CROSS_ENTROPY_ONLY",
    "FORMS",
    "logits_of",
    "random_wrong_key",
    "near_key_images",
]

#: How a suppression term scores an output distribution ``p`` that should
#: carry no information about the label:
#: ``uniform``: cross-entropy to the uniform distribution, ``-mean_c log p_c``
#: (minimal when ``p`` is uniform; pushes no class below the others, so the
#: least likely class does not leak the label);
#: ``true_class``: ``relu(log p_true - log(1/K))``, penalizes only a true
#: class above chance (also never pushes it below chance).
FORMS = ("uniform", "true_class")


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: a tensor, an object / dict with
    ``logits`` (transformers), or a tuple whose first item is the logits."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ConfigurationError(f"cannot find logits in a model output of type {type(output).__name__}")
    return logits


def random_wrong_key(key: SecretKey, *, generator: Optional[torch.Generator] = None) -> SecretKey:
    """A random key with ``key``'s settings, drawn from torch's generator so
    that training is reproducible given its seed. It is a training device
    (an example of a wrong key), not a secret."""
    material = torch.randint(0, 256, (32,), dtype=torch.uint8, generator=generator)
    return SecretKey(bytes(material.tolist()), block_size=key.block_size, scheme=key.scheme, channels=key.channels)


def near_key_images(
    keyed01: torch.Tensor,
    block_size: int,
    distance: float,
    *,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Correctly keyed images moved a random ``distance`` away from the key.

    A random block transform ``R`` (the same for every block, like a key's)
    re-shuffles a random ``distance`` fraction of the ``L = M*M*C`` block
    positions among themselves and flips each position (``v -> 1 - v``) with
    probability ``distance / 2``; ``R(T_key(x))`` is what a key that agrees
    with the true one on the rest of the block would give. At ``distance=1``
    it is as far as a random key; below, it is a *near* key, the hard case
    that random keys reach only by luck (the worst of 100 random keys).

    Args:
        keyed01: ``(B, C, H, W)`` images already under the true key, in [0, 1].
        block_size: the key's ``M``.
        distance: in (0, 1].
        generator: torch generator, for reproducible training.

    Example:
        >>> y = torch.rand(2, 3, 8, 8)
        >>> near_key_images(y, 4, 0.5).shape
        torch.Size([2, 3, 8, 8])
    """
    if not 0 < distance <= 1:
        raise ConfigurationError(f"near-key distance must be in (0, 1], got {distance}")
    _, c, h, w = keyed01.shape
    length = block_size * block_size * c
    moved = max(2, round(distance * length))
    chosen = torch.randperm(length, generator=generator)[:moved]
    order = torch.arange(length)
    order[chosen] = chosen[torch.randperm(moved, generator=generator)]
    flips = torch.rand(length, generator=generator) < distance / 2
    blocks = image_to_blocks(keyed01, block_size)[..., order.to(keyed01.device)]
    blocks = torch.where(flips.to(keyed01.device), 1 - blocks, blocks)
    return blocks_to_image(blocks, block_size, c, h, w)


def _true_class_probability(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean probability of the true class: how well a wrong key works."""
    return float(F.softmax(logits.detach().float(), dim=-1).gather(1, labels[:, None]).mean())


@contextlib.contextmanager
def _inference_normalization(model: nn.Module) -> Iterator[None]:
    """Run the wrapped forward as at test time: batch norm uses (and does not
    update) its running statistics, dropout is off. The running statistics
    stay those of correctly keyed images, and the suppression is learned
    under exactly the computation a wrong-key user would run."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@dataclass
class ProtectionObjective:
    """Cross-entropy with the key plus optional suppression terms.

    The total loss is
    ``CE(logits, labels) + wrong_key_weight * S(model(T_wrong(x))) + plain_weight * S(model(x))``
    where ``T_wrong`` is a fresh random key with the same settings at every
    step and ``S`` is the suppression form (see :data:`FORMS`).

    Args:
        wrong_key_weight: weight of the term on images under random wrong keys.
        plain_weight: weight of the term on plain (untransformed, normalized) images.
        form: ``"uniform"`` or ``"true_class"``.
        wrong_keys_per_step: how many random wrong keys per step (their
            terms are averaged).
        label_smoothing: of the cross-entropy with the key.
        suppression_fraction: the suppression terms see only this fraction
            of the batch (its first images; batches are shuffled), which
            makes their passes that much cheaper.
        wrong_key_groups: the wrong-key pass splits the batch into this many
            groups, each under its own random key (same cost as one key;
            the term then averages over many keys each step).
        near_key_weight: weight of the term on images under a *near* key
            (:func:`near_key_images`): the true key's images with a random
            fraction of the block re-shuffled and flipped.
        near_key_distance: ``(low, high)``; each step draws that fraction
            uniformly from this range.
        hard_key_weight: weight of the term on the hardest wrong key found
            so far: every ``hard_key_every`` steps, ``hard_key_candidates``
            fresh random keys and the pool are scored on the batch (mean
            probability of the true class) and the ``hard_key_pool`` best
            kept; each step suppresses the pool's current best, then
            re-scores it. Random keys that happen to work are rare (the worst
            of 100); this term goes looking for them during training.
        distill_weight: weight of a distillation term: the keyed model's
            output with the key is pulled towards a *teacher*'s output on the
            same images, plain (Hinton et al.: KL divergence of the softened
            distributions, times ``distill_temperature ** 2``). The teacher
            is an unprotected fine-tune of the same task (``kp protect
            --distill`` trains one first); :func:`kp_plugin.train.fit` takes
            it as ``teacher=`` and passes its logits as ``teacher_logits``.
        distill_temperature: softening temperature of that term.

    Example:
        >>> objective = ProtectionObjective(wrong_key_weight=0.5)
        >>> objective.describe()
        'ce+wrong0.5(uniform)'
    """

    wrong_key_weight: float = 0.0
    plain_weight: float = 0.0
    form: str = "uniform"
    wrong_keys_per_step: int = 1
    label_smoothing: float = 0.0
    wrong_key_groups: int = 1
    suppression_fraction: float = 1.0
    near_key_weight: float = 0.0
    near_key_distance: tuple = (0.25, 0.75)
    hard_key_weight: float = 0.0
    hard_key_pool: int = 4
    hard_key_candidates: int = 16
    hard_key_every: int = 10
    distill_weight: float = 0.0
    distill_temperature: float = 2.0

    def __post_init__(self) -> None:
        # Training state of the hard-key term (not a dataclass field: it is
        # not configuration and stays out of to_dict / training.json).
        self._pool: list = []
        self._pool_owner: Optional[str] = None
        self._steps = 0
        if self.hard_key_weight < 0:
            raise ConfigurationError("suppression weights must be >= 0")
        if min(self.hard_key_pool, self.hard_key_candidates, self.hard_key_every) < 1:
            raise ConfigurationError("hard_key_pool, hard_key_candidates and hard_key_every must be at least 1")
        self.near_key_distance = tuple(float(d) for d in self.near_key_distance)
        low, high = self.near_key_distance
        if not 0 < low <= high <= 1:
            raise ConfigurationError(
                f"near_key_distance must be (low, high) with 0 < low <= high <= 1, got {self.near_key_distance}"
            )
        if self.near_key_weight < 0:
            raise ConfigurationError("suppression weights must be >= 0")
        if self.form not in FORMS:
            raise ConfigurationError(f"unknown suppression form {self.form!r}; choose from {', '.join(FORMS)}")
        if self.wrong_key_weight < 0 or self.plain_weight < 0:
            raise ConfigurationError("suppression weights must be >= 0")
        if self.wrong_keys_per_step < 1:
            raise ConfigurationError("wrong_keys_per_step must be at least 1")
        if not 0 < self.suppression_fraction <= 1:
            raise ConfigurationError(f"suppression_fraction must be in (0, 1], got {self.suppression_fraction}")
        if self.wrong_key_groups < 1:
            raise ConfigurationError("wrong_key_groups must be at least 1")
        if self.distill_weight < 0 or self.distill_temperature <= 0:
            raise ConfigurationError(
                f"distill_weight must be >= 0 and distill_temperature > 0, got {self.distill_weight} and "
                f"{self.distill_temperature}"
            )

    @property
    def suppresses(self) -> bool:
        weights = (self.wrong_key_weight, self.plain_weight, self.near_key_weight, self.hard_key_weight)
        return any(weight > 0 for weight in weights)

    def describe(self) -> str:
        """A short name for tables, e.g. ``ce+wrong0.5(uniform)``."""
        name = "ce" if not self.label_smoothing else f"ce(smooth {self.label_smoothing:g})"
        if self.wrong_key_weight:
            name += f"+wrong{self.wrong_key_weight:g}"
        if self.plain_weight:
            name += f"+plain{self.plain_weight:g}"
        if self.near_key_weight:
            low, high = self.near_key_distance
            name += f"+near{self.near_key_weight:g}[{low:g}-{high:g}]"
        if self.hard_key_weight:
            pool = f"{self.hard_key_pool}/{self.hard_key_candidates}/{self.hard_key_every}"
            name += f"+hard{self.hard_key_weight:g}[{pool}]"
        if self.distill_weight:
            name += f"+distill{self.distill_weight:g}(T={self.distill_temperature:g})"
        if self.suppresses and self.suppression_fraction < 1:
            name += f"[{self.suppression_fraction:g} of batch]"
        if self.suppresses:
            keys = self.wrong_keys_per_step * self.wrong_key_groups
            several = self.wrong_key_weight and keys > 1
            per_step = f", {keys} keys/step" if several else ""
            name += f"({self.form}{per_step})"
        return name

    def to_dict(self) -> dict:
        return asdict(self)

    def suppression(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The suppression loss of logits that should say nothing."""
        log_p = F.log_softmax(logits.float(), dim=-1)
        if self.form == "uniform":
            return -log_p.mean(dim=-1).mean()
        chance = -math.log(log_p.shape[-1])
        true = log_p.gather(1, labels[:, None]).squeeze(1)
        return F.relu(true - chance).mean()

    def check_teacher(self, teacher: Any) -> None:
        """Raise :class:`ConfigurationError` when the objective distills but
        ``teacher`` (a model, or its logits) is missing: before training
        starts, and on every call."""
        if self.distill_weight and teacher is None:
            raise ConfigurationError(
                "the objective distills (distill_weight > 0) but no teacher was given: pass teacher= (an "
                "unprotected fine-tune of the same task, trained first), or set distill_weight=0"
            )

    def distillation(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``T^2 * KL(softmax(teacher / T) || softmax(logits / T))``, batch mean."""
        t = self.distill_temperature
        target = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
        return F.kl_div(F.log_softmax(logits.float() / t, dim=-1), target, reduction="batchmean", log_target=True) * t * t

    def _wrong_logits(self, base: nn.Module, keyed: KeyedInput, key: SecretKey, images01: torch.Tensor) -> torch.Tensor:
        wrong = KeyedInput(key, mean=keyed.mean, std=keyed.std, check_range=False)
        return logits_of(base(wrong(images01)))

    def _mine_hard_keys(self, model: ProtectedModel, images01: torch.Tensor, labels: torch.Tensor) -> None:
        """Refresh the pool of hard wrong keys: score the pool and
        ``hard_key_candidates`` fresh random keys on this batch (mean
        probability of the true class, no gradient) and keep the
        ``hard_key_pool`` highest."""
        base, keyed = model.unwrap(), model.keyed
        candidates = [entry[0] for entry in self._pool]
        candidates += [random_wrong_key(model.key) for _ in range(self.hard_key_candidates)]
        scored = []
        with torch.no_grad():
            for key in candidates:
                scored.append([key, _true_class_probability(self._wrong_logits(base, keyed, key, images01), labels)])
        scored.sort(key=lambda entry: -entry[1])
        self._pool = scored[: self.hard_key_pool]

    def _hard_key_loss(self, model: ProtectedModel, images01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The suppression term on the hardest wrong key found so far."""
        if self._pool_owner != model.key.fingerprint:
            self._pool, self._pool_owner, self._steps = [], model.key.fingerprint, 0
        if self._steps % self.hard_key_every == 0:
            self._mine_hard_keys(model, images01, labels)
        self._steps += 1
        entry = max(self._pool, key=lambda e: e[1])
        logits = self._wrong_logits(model.unwrap(), model.keyed, entry[0], images01)
        entry[1] = _true_class_probability(logits, labels)
        return self.suppression(logits, labels)

    def __call__(
        self,
        model: nn.Module,
        images01: torch.Tensor,
        labels: torch.Tensor,
        logits: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
    ) -> tuple:
        """Total training loss and its parts.

        Args:
            model: the :class:`ProtectedModel` being trained (a plain model
                is allowed when no suppression term is on).
            images01: the batch in [0, 1], augmented, before the key.
            labels: ``(B,)`` int64, or soft labels ``(B, classes)`` (mixup,
                CutMix) for the cross-entropy; the suppression terms that
                read a label take each image's largest.
            logits: the model's output on ``images01`` with the correct key.
            teacher_logits: a teacher's output on the same images, plain
                (needed when ``distill_weight`` is on).

        Returns:
            ``(loss, parts)``: the total loss tensor and a dict of floats
            (``ce``, ``wrong``, ``plain``, ``distill`` where they apply).
        """
        logits = logits_of(logits)
        ce = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        parts = {"ce": float(ce.detach())}
        loss = ce
        if self.distill_weight:
            self.check_teacher(teacher_logits)
            distill = self.distillation(logits, logits_of(teacher_logits))
            loss = loss + self.distill_weight * distill
            parts["distill"] = float(distill.detach())
        if not self.suppresses:
            return loss, parts
        if not isinstance(model, ProtectedModel):
            raise ConfigurationError(
                "wrong-key and plain-image suppression need a ProtectedModel (from wrap_model); "
                "train the unprotected baseline with ProtectionObjective() (cross-entropy only)"
            )
        base, keyed = model.unwrap(), model.keyed
        if labels.is_floating_point():
            labels = labels.argmax(dim=-1)
        if self.suppression_fraction < 1:
            keep = max(1, math.ceil(self.suppression_fraction * images01.shape[0]))
            images01, labels = images01[:keep], labels[:keep]
        with _inference_normalization(base):
            if self.wrong_key_weight:
                terms = []
                groups = min(self.wrong_key_groups, images01.shape[0])
                for _ in range(self.wrong_keys_per_step):
                    # One pass over the batch, each group of images under its
                    # own random key: more keys per step at the same cost.
                    wrong = torch.cat([
                        KeyedInput(random_wrong_key(model.key), mean=keyed.mean, std=keyed.std, check_range=False)(part)
                        for part in images01.tensor_split(groups)
                    ])
                    terms.append(self.suppression(logits_of(base(wrong)), labels))
                wrong_loss = torch.stack(terms).mean()
                loss = loss + self.wrong_key_weight * wrong_loss
                parts["wrong"] = float(wrong_loss.detach())
            if self.near_key_weight or self.plain_weight:
                mean = torch.tensor(keyed.mean, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
                std = torch.tensor(keyed.std, device=images01.device, dtype=images01.dtype).view(1, -1, 1, 1)
            if self.near_key_weight:
                key = model.key
                with torch.no_grad():
                    plan = compile_plan(key, images01.shape[1], images01.shape[2], images01.shape[3])
                    low, high = self.near_key_distance
                    distance = low + (high - low) * float(torch.rand(()))
                    near = near_key_images(plan.apply(images01, check_range=False), key.block_size, distance)
                near_loss = self.suppression(logits_of(base((near - mean) / std)), labels)
                loss = loss + self.near_key_weight * near_loss
                parts["near"] = float(near_loss.detach())
            if self.hard_key_weight:
                hard_loss = self._hard_key_loss(model, images01, labels)
                loss = loss + self.hard_key_weight * hard_loss
                parts["hard"] = float(hard_loss.detach())
            if self.plain_weight:
                plain_loss = self.suppression(logits_of(base((images01 - mean) / std)), labels)
                loss = loss + self.plain_weight * plain_loss
                parts["plain"] = float(plain_loss.detach())
        return loss, parts


#: Plain cross-entropy: the paper's recipe and the unprotected baseline.
CROSS_ENTROPY_ONLY = ProtectionObjective()

#: The library's default objective, chosen by measurement (docs/recipe.md):
#: cross-entropy with the key plus 2 x cross-entropy to the uniform
#: distribution under a fresh random wrong key at every step, shown half of
#: each batch (1.5 passes per step instead of 2). With the default scheme
#: (block scrambling on) plain images land near chance (8-13% on digits)
#: without a plain-image term, so it is off. At the demo setting (digits
#: 32x32, M=4, 16 epochs) two runs gave 96.9 / 95.8% with the key, 10.2 /
#: 10.0% mean and at most 17.0 / 13.4% for the worst wrong key of each group
#: of 100 (500 wrong keys); at 32 epochs 98.3 / 97.2%, and with distillation
#: from the unprotected fine-tune (opt-in, ``kp protect --distill``; it needs
#: a teacher, so it is not part of this object) 98.9 / 98.1%. For a scheme
#: without ``scramble`` add ``plain_weight=1``: on shuffle+np one run
#: without it reached 30% on plain digits.
DEFAULT_OBJECTIVE = ProtectionObjective(wrong_key_weight=2.0, suppression_fraction=0.5)
