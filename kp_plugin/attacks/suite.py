"""Run the attack suite on one protected model with a named budget, and
check the outcome against the protection targets.

Example:
    >>> report = run_attacks(protected, test_set, train_set=train_set,                 # doctest: +SKIP
    ...                      public_base=lambda: load_efficientnet_lite0(num_classes=10),
    ...                      attacks="all", budget="quick")
    >>> write_attack_report(report, "out/attack")                                      # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from torch import nn

from ..module import ProtectedModel
from ._candidate import AttackError
from ._data import as_tensors, class_balanced_indices
from .finetune import DEFAULT_DATA_FRACTIONS, finetune_attack
from .heuristic_search import heuristic_key_search
from .key_estimation import estimate_key
from .partial_key import DEFAULT_FRACTIONS, partial_key_curve
from .random_search import random_key_search
from .weight_matching import weight_matching_attack
from .wrong_keys import wrong_key_attack

__all__ = ["ATTACKS", "BUDGETS", "Budget", "AttackReport", "Target", "run_attacks", "parse_attacks"]

#: Attack names, in the order the suite runs them.
ATTACKS = (
    "wrong_keys",
    "random_search",
    "heuristic_search",
    "partial_key",
    "weight_matching",
    "key_estimation",
    "finetune",
)


@dataclass(frozen=True)
class Budget:
    """How hard each attack tries."""

    wrong_keys: int
    random_keys: int
    search_images: int
    swap_proposals: int
    partial_repeats: int
    partial_fractions: tuple
    estimation_steps: int
    finetune_fractions: tuple
    finetune_epochs: int
    finetune_min_steps: int
    #: fraction of the training data the key-estimation attacker holds
    estimation_data: float = 0.10
    #: stop the random search after this many seconds (None: never)
    random_search_seconds: float | None = None
    #: draws (data subset + training seed) per fraction of the fine-tuning attack
    finetune_repeats: int = 3


BUDGETS = {
    # Seconds, for tests and a first look.
    "smoke": Budget(4, 32, 32, 32, 1, (0.0, 0.5, 1.0), 10, (0.10,), 1, 1, finetune_repeats=1),
    "quick": Budget(20, 1000, 64, 500, 1, DEFAULT_FRACTIONS, 100, DEFAULT_DATA_FRACTIONS, 2, 20),
    "standard": Budget(100, 5000, 64, 2000, 3, DEFAULT_FRACTIONS, 300, DEFAULT_DATA_FRACTIONS, 4, 30),
    # The authors' random search: 20,000 keys.
    "paper": Budget(100, 20000, 64, 20000, 3, DEFAULT_FRACTIONS, 500, DEFAULT_DATA_FRACTIONS, 6, 50),
}


#: Verdicts need the owner's key to score more than this many points above
#: chance: nearer, the key itself would pass the wrong-key target, and a
#: target that looks met only says the model does not work in this run
#: (wrong ``--image-size`` or data), not that it is protected.
KEY_ABOVE_CHANCE_POINTS = 10.0


@dataclass
class Target:
    """One protection target and whether the measurement meets it."""

    name: str
    measured: float
    limit: float
    unit: str = "points"
    #: why this run cannot show the target met (the key itself scores near
    #: chance); ``None`` when it can
    no_verdict: Optional[str] = None

    @property
    def met(self) -> Optional[bool]:
        """``True`` / ``False``; ``None`` (no verdict) when the limit holds but
        :attr:`no_verdict` says that shows nothing. A miss stays a miss: an
        attack that beats the limit did so whatever the key scores."""
        if self.measured > self.limit:
            return False
        return None if self.no_verdict else True

    @property
    def margin(self) -> float:
        """How far below the limit (positive) or above it (negative)."""
        return self.limit - self.measured


@dataclass
class AttackReport:
    """Results of a suite run: ``results[name]`` is the attack's result
    dataclass; ``skipped[name]`` says why an attack did not run."""

    meta: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def key_near_chance(self) -> Optional[str]:
        """Why no target can be met, when the owner's key itself scores
        within :data:`KEY_ABOVE_CHANCE_POINTS` of chance in this run (e.g. at
        an image size the model was not trained at); else ``None``."""
        for name in ATTACKS:
            result = self.results.get(name)
            key_accuracy, chance = getattr(result, "key_accuracy", None), getattr(result, "chance", None)
            if key_accuracy is None or chance is None:
                continue
            if 100 * (key_accuracy - chance) > KEY_ABOVE_CHANCE_POINTS:
                return None
            return f"the key itself scores {100 * key_accuracy:.1f}%, near chance ({100 * chance:.1f}%)"
        return None

    def targets(self) -> list:
        """The protection targets (issue 6) this run can check; each without a
        verdict when :meth:`key_near_chance`."""
        targets = self._targets()
        no_verdict = self.key_near_chance()
        for target in targets:
            target.no_verdict = no_verdict
        return targets

    def _targets(self) -> list:
        out = []
        r = self.results
        if "wrong_keys" in r:
            w = r["wrong_keys"]
            out.append(Target("mean wrong-key accuracy above chance", 100 * (w.mean - w.chance), 10.0))
            out.append(Target("least-likely readout above chance (worst key)",
                              100 * (w.least_likely_max - w.chance), 15.0))
        if "random_search" in r:
            s = r["random_search"]
            out.append(Target(f"best of {s.num_keys} random keys (held out) above chance",
                              100 * (s.best_holdout_accuracy - s.chance), 15.0))
        if "finetune" in r:
            f = r["finetune"]
            near = min(f.rows, key=lambda row: abs(row.fraction - 0.10))
            draws = f", mean of {f.repeats} draws" if f.repeats > 1 else ""
            out.append(Target(f"fine-tuning with {near.fraction:.0%} of the data: gain over the public base{draws}",
                              100 * near.advantage, 2.0))
        if "weight_matching" in r and "shuffle" in str(self.meta.get("scheme", "shuffle")).split("+"):
            # Without pixel shuffling the permutation is the identity on both
            # sides: "100% recovered" says nothing (accuracy there is the measure).
            out.append(Target("weight matching: key positions recovered",
                              100 * r["weight_matching"].recovered_fraction, 10.0, unit="%"))
        return out

    def summary(self) -> dict:
        """JSON-ready: metadata, each attack's summary, the targets."""
        return {
            "meta": self.meta,
            "attacks": {name: res.summary() for name, res in self.results.items()},
            "skipped": self.skipped,
            "seconds": self.seconds,
            "targets": [
                {"name": t.name, "measured": t.measured, "limit": t.limit, "unit": t.unit, "met": t.met,
                 "margin": t.margin, "no_verdict": t.no_verdict}
                for t in self.targets()
            ],
        }


def _count(dataset) -> int:
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2 and hasattr(dataset[1], "numel"):
        return int(dataset[1].numel())
    return len(dataset)


#: The :class:`Budget` fields each attack uses.
_BUDGET_FIELDS = {
    "wrong_keys": ("wrong_keys",),
    "random_search": ("random_keys", "search_images"),
    "heuristic_search": ("swap_proposals", "search_images"),
    "partial_key": ("partial_repeats", "partial_fractions"),
    "key_estimation": ("estimation_steps",),
    "finetune": ("finetune_epochs", "finetune_min_steps", "finetune_repeats", "finetune_fractions"),
}


def _check_budget(budget: Budget, names: list) -> None:
    """:class:`AttackError` for a count the chosen attacks cannot run with
    (0 keys, steps, repeats...), before any attack runs."""
    for field_name in dict.fromkeys(f for name in names for f in _BUDGET_FIELDS.get(name, ())):
        value = getattr(budget, field_name)
        if field_name.endswith("_fractions"):
            if not value:
                raise AttackError(f"budget.{field_name} must name at least one fraction, got {value!r}")
            continue
        least = 0 if field_name == "finetune_min_steps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise AttackError(f"budget.{field_name} must be an integer >= {least}, got {value!r}; "
                              "it says how much an attack tries")


def parse_attacks(spec: Union[str, Sequence[str]]) -> list:
    """``"all"``, ``"wrong_keys,finetune"`` or a list -> attack names."""
    names = list(ATTACKS) if spec == "all" else (spec.split(",") if isinstance(spec, str) else list(spec))
    names = [n.strip().replace("-", "_") for n in names if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise AttackError(f"unknown attack(s) {', '.join(unknown) or '(none)'}; choose 'all' or from {', '.join(ATTACKS)}")
    return [n for n in ATTACKS if n in names]


def run_attacks(
    model: ProtectedModel,
    test_set,
    *,
    train_set=None,
    public_base: Union[None, nn.Module, Callable[[], nn.Module]] = None,
    attacks: Union[str, Sequence[str]] = "all",
    budget: Union[str, Budget] = "quick",
    finetune_config=None,
    seed: int = 0,
    device=None,
    progress: bool = True,
    meta: Optional[dict] = None,
) -> AttackReport:
    """Run the chosen attacks on ``model``.

    Args:
        model: the protected model.
        test_set: labelled plain test images in [0, 1].
        train_set: labelled plain training images (the attacker's data for
            fine-tuning and key estimation); those attacks are skipped
            without it.
        public_base: the public pre-trained model (or a function returning
            a fresh one with this task's head) for fine-tuning and weight
            matching; skipped without it.
        attacks: ``"all"`` or names from :data:`ATTACKS`.
        budget: a name from :data:`BUDGETS` or a :class:`Budget`.
        finetune_config: :class:`kp_plugin.train.TrainConfig` for the
            fine-tuning attack (epochs come from the budget).
        seed: seeds every attack.
        meta: extra facts for the report (dataset name, architecture...).
    """
    names = parse_attacks(attacks)
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise AttackError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
        budget_name, budget = budget, BUDGETS[budget]
    else:
        budget_name = "custom"
    _check_budget(budget, names)
    key = model.key
    num_test = _count(test_set)
    report = AttackReport(meta={
        "scheme": key.scheme_name,
        "block_size": key.block_size,
        "fingerprint": key.fingerprint,
        "budget": budget_name,
        "seed": seed,
        "test_images": num_test,
        "train_images": _count(train_set) if train_set is not None else None,
        **(meta or {}),
    })

    def base_model() -> nn.Module:
        return copy.deepcopy(public_base) if isinstance(public_base, nn.Module) else public_base()

    common = dict(seed=seed, device=device, progress=progress)
    for name in names:
        if name in ("finetune", "key_estimation") and train_set is None:
            report.skipped[name] = "needs labelled training data (train_set / --data with a train split)"
            continue
        if name in ("finetune", "weight_matching") and public_base is None:
            report.skipped[name] = "needs the public pre-trained base (public_base / --base)"
            continue
        start = time.perf_counter()
        if name == "wrong_keys":
            result = wrong_key_attack(model, test_set, num_keys=budget.wrong_keys, **common)
        elif name == "random_search":
            result = random_key_search(model, test_set, num_keys=budget.random_keys,
                                       search_images=min(budget.search_images, num_test // 2),
                                       max_seconds=budget.random_search_seconds, **common)
        elif name == "heuristic_search":
            result = heuristic_key_search(model, test_set, budget=budget.swap_proposals,
                                          search_images=min(budget.search_images, num_test // 2), **common)
        elif name == "partial_key":
            result = partial_key_curve(model, test_set, fractions=budget.partial_fractions,
                                       repeats=budget.partial_repeats, **common)
        elif name == "weight_matching":
            result = weight_matching_attack(model, base_model(), test_set, seed=seed, device=device)
        elif name == "key_estimation":
            images, labels = as_tensors(train_set)
            idx = class_balanced_indices(labels, budget.estimation_data, seed=seed)
            result = estimate_key(model, (images[idx], labels[idx]), test_set, steps=budget.estimation_steps,
                                  **common)
        else:  # finetune
            from ..train import TrainConfig

            config = dataclasses.replace(finetune_config or TrainConfig(), epochs=budget.finetune_epochs)
            result = finetune_attack(model, train_set, test_set, public_base=base_model,
                                     fractions=budget.finetune_fractions, config=config,
                                     min_steps=budget.finetune_min_steps, repeats=budget.finetune_repeats,
                                     **common)
        report.results[name] = result
        report.seconds[name] = time.perf_counter() - start
    return report
