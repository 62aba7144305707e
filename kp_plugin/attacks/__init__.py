"""Attacks on a protected model: how much an attacker without the key gets.

Threat model (DESIGN.md): the attacker has the published weights, the
architecture, this library, the scheme and block size, and some labelled
data; not the key. One module per attack, each with one entry function
returning a result dataclass:

- :func:`wrong_key_attack` (``wrong_keys``): random wrong keys, plain images,
  and the least-likely-class readout;
- :func:`random_key_search` (``random_search``): best of K random keys;
- :func:`heuristic_key_search` (``heuristic_search``): pairwise-swap hill climb;
- :func:`partial_key_curve` (``partial_key``): accuracy vs. fraction of the key right;
- :func:`finetune_attack` (``finetune``): fine-tune the protected weights on
  plain data vs. fine-tuning the public base;
- :func:`estimate_key` (``key_estimation``): Gumbel-Sinkhorn key learning;
- :func:`weight_matching_attack` (``weight_matching``): first layer vs. the
  public base.

``run_attacks`` runs a chosen set with a named budget and checks the
protection targets; ``write_attack_report`` writes report.json, report.md
and plots (what ``kp attack`` does).

These modules need scipy and tqdm (``pip install kp-plugin[demo]``); they are
not imported by ``import kp_plugin``.
"""

from ..adapt import adapt_patch_embedding
from ._candidate import AttackError, CandidateKey, CandidateModel
from .finetune import FinetuneResult, FinetuneRow, finetune_attack
from .heuristic_search import HeuristicSearchResult, heuristic_key_search
from .key_estimation import KeyEstimationResult, estimate_key
from .partial_key import PartialKeyResult, partial_key_curve
from .random_search import RandomSearchResult, random_key_search
from .report import write_attack_report
from .suite import ATTACKS, BUDGETS, AttackReport, Budget, run_attacks
from .weight_matching import WeightMatchingResult, weight_matching_attack
from .wrong_keys import WrongKeyResult, wrong_key_attack

__all__ = [
    "adapt_patch_embedding",
    "AttackError",
    "CandidateKey",
    "CandidateModel",
    "WrongKeyResult",
    "wrong_key_attack",
    "RandomSearchResult",
    "random_key_search",
    "HeuristicSearchResult",
    "heuristic_key_search",
    "PartialKeyResult",
    "partial_key_curve",
    "FinetuneResult",
    "FinetuneRow",
    "finetune_attack",
    "KeyEstimationResult",
    "estimate_key",
    "WeightMatchingResult",
    "weight_matching_attack",
    "ATTACKS",
    "BUDGETS",
    "Budget",
    "AttackReport",
    "run_attacks",
    "write_attack_report",
]
