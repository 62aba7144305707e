"""The attack suite on a small real model: a patch-embedding net trained on
real handwritten digits, protected by exact adaptation to a key."""

from __future__ import annotations

import pytest
import torch

from attack_models import (
    MEAN,
    STD,
    StemNet,
    digits,
    negated_protected,
    protected_patchnet,
    public_patchnet,
)
from kp_plugin import InputRangeError, SecretKey, apply_transform, wrap_model
from kp_plugin.attacks import (
    AttackError,
    CandidateKey,
    estimate_key,
    finetune_attack,
    heuristic_key_search,
    partial_key_curve,
    random_key_search,
    weight_matching_attack,
    wrong_key_attack,
)
from kp_plugin.evaluate import wrong_key_accuracies


@pytest.fixture(scope="module")
def key() -> SecretKey:
    return SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")


@pytest.fixture(scope="module")
def protected(key):
    return protected_patchnet(key)


@pytest.fixture(scope="module")
def test_set():
    return digits("test")


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+np", "np+shift", "shuffle+ffx", "shuffle+np+scramble"])
def test_candidate_from_key_reproduces_the_library_transform(scheme):
    key = SecretKey(bytes(32), block_size=4, scheme=scheme)
    images = torch.rand(2, 3, 16, 8)
    candidate = CandidateKey.from_secret_key(key, image_size=(16, 8))
    assert torch.equal(candidate.apply(images), apply_transform(images, key))


def test_wrong_keys_sit_near_chance_while_the_key_works(protected, test_set):
    result = wrong_key_attack(protected, test_set, num_keys=8, progress=False)
    assert result.key_accuracy > 0.9
    assert result.mean < result.chance + 0.15
    assert result.plain_accuracy < result.chance + 0.15
    assert len(result.least_likely) == 8
    # Same keys, same figures as `kp evaluate` (on a separate copy: the
    # evaluation converts weights in place while it runs).
    copy = protected_patchnet(SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np"))
    assert result.accuracies == pytest.approx(wrong_key_accuracies(copy, test_set, num_keys=8, progress=False))


def test_least_likely_readout_exposes_a_model_that_ranks_the_true_class_last(key, test_set):
    upside_down = negated_protected(key)
    result = wrong_key_attack(upside_down, test_set, num_keys=2, progress=False)
    assert result.plain_accuracy < 0.05
    assert result.plain_least_likely_accuracy > 0.9


def test_every_row_of_the_wrong_key_attack_reads_uint8_images_as_the_model_does(key, test_set):
    # An (images, labels) pair of uint8 images reached the plain-image row
    # unscaled (0..255 where the model takes [0, 1]): the leak that row
    # measures came out near chance, without a word.
    upside_down = negated_protected(key)
    images = torch.stack([test_set[i][0] for i in range(len(test_set))])
    labels = torch.tensor([int(test_set[i][1]) for i in range(len(test_set))])
    as_floats = wrong_key_attack(upside_down, (images, labels), num_keys=2, progress=False)
    as_bytes = wrong_key_attack(upside_down, ((images * 255).round().to(torch.uint8), labels), num_keys=2,
                                progress=False)
    assert as_bytes.plain_least_likely_accuracy > 0.9
    assert as_bytes.plain_least_likely_accuracy == pytest.approx(as_floats.plain_least_likely_accuracy, abs=0.02)
    assert as_bytes.key_accuracy == pytest.approx(as_floats.key_accuracy, abs=0.02)
    with pytest.raises(InputRangeError, match="8-bit"):  # 0..255 as floats: refused, not scored
        wrong_key_attack(upside_down, (images * 255, labels), num_keys=2, progress=False)


def test_partial_key_curve_reaches_the_key_accuracy_at_full_fraction(protected, test_set):
    curve = partial_key_curve(protected, test_set, fractions=(0.0, 0.5, 1.0), repeats=1, progress=False)
    assert curve.accuracies[-1] == curve.key_accuracy
    assert curve.accuracies[0] < curve.key_accuracy - 0.5


def test_random_search_scores_its_best_key_on_held_out_images(protected, test_set):
    result = random_key_search(protected, test_set, num_keys=24, search_images=48, keys_per_batch=8, progress=False)
    assert result.holdout_images == len(test_set) - 48
    assert result.best_search_accuracy == max(result.search_accuracies)
    assert result.best_holdout_accuracy < result.key_accuracy - 0.3


def test_random_search_refuses_a_batch_as_large_as_the_data(protected, test_set):
    with pytest.raises(AttackError, match="search_images"):
        random_key_search(protected, test_set, num_keys=1, search_images=len(test_set), progress=False)


def test_swap_search_never_lowers_the_batch_accuracy(protected, test_set):
    result = heuristic_key_search(protected, test_set, budget=48, search_images=48, parallel=8, progress=False)
    assert result.final_search_accuracy >= result.initial_search_accuracy
    climbs = [acc for _, acc in result.history]
    assert climbs == sorted(climbs)


def test_weight_matching_fully_recovers_an_exact_permuted_copy(protected, test_set):
    result = weight_matching_attack(protected, public_patchnet(), test_set)
    assert result.layer_kind == "patch embedding"
    assert result.recovered_fraction == 1.0
    assert result.flip_agreement == 1.0
    assert result.accuracy == result.key_accuracy


def test_weight_matching_finds_nothing_in_a_small_kernel_stem():
    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
    torch.manual_seed(0)
    base = StemNet()
    stolen = StemNet()
    stolen.load_state_dict(base.state_dict())
    with torch.no_grad():  # what fine-tuning with the key leaves: the same stem, nudged
        stolen.stem.weight.add_(0.05 * torch.randn_like(stolen.stem.weight))
    result = weight_matching_attack(wrap_model(stolen, key, mean=MEAN, std=STD), base)
    assert result.layer_kind == "conv 3x3 stride 2"
    assert result.recovered_fraction < 0.1


def test_key_estimation_learns_a_key_that_beats_wrong_keys(protected, test_set):
    train = digits("train")
    result = estimate_key(protected, train, test_set, steps=40, batch_size=64, seed=0, progress=False)
    wrong = wrong_key_attack(protected, test_set, num_keys=4, progress=False)
    assert result.recovered_fraction > 5 * result.chance_fraction
    assert result.accuracy > wrong.max + 0.2


def test_finetune_attack_compares_stolen_weights_with_the_public_base(protected, test_set):
    from kp_plugin.train import TrainConfig

    train = digits("train")
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-3, augment=False, amp=False)
    result = finetune_attack(protected, train, test_set, public_base=public_patchnet(), fractions=(0.05, 0.25),
                             config=config, min_steps=2, progress=False)
    assert [r.fraction for r in result.rows] == [0.05, 0.25]
    assert result.rows[0].images < result.rows[1].images
    # The public base already solves the task: stolen weights buy nothing.
    assert all(r.base_accuracy > 0.9 for r in result.rows)
    assert all(r.advantage < 0 for r in result.rows)


def test_finetune_attack_repeats_draw_other_subsets_and_report_their_mean(protected, test_set):
    from kp_plugin.train import TrainConfig

    config = TrainConfig(epochs=1, batch_size=64, lr=1e-3, augment=False, amp=False)
    once = finetune_attack(protected, digits("train"), test_set, public_base=public_patchnet(), fractions=(0.05,),
                           config=config, min_steps=2, progress=False)
    thrice = finetune_attack(protected, digits("train"), test_set, public_base=public_patchnet(), fractions=(0.05,),
                             config=config, min_steps=2, repeats=3, progress=False)
    row = thrice.rows[0]
    assert thrice.repeats == 3 and len(row.protected_runs) == len(row.base_runs) == 3
    assert row.protected_runs[0] == pytest.approx(once.rows[0].protected_accuracy)  # draw 0 is the seed's draw
    assert row.protected_accuracy == pytest.approx(sum(row.protected_runs) / 3)
    assert row.advantage == pytest.approx(sum(row.advantages) / 3)
    assert len(set(row.base_runs)) > 1 or len(set(row.protected_runs)) > 1  # other subsets, other results
    with pytest.raises(AttackError, match="repeats"):
        finetune_attack(protected, digits("train"), test_set, public_base=public_patchnet(), repeats=0,
                        progress=False)


def test_random_search_stops_at_its_time_budget_and_says_how_many_keys_ran(protected, test_set):
    result = random_key_search(protected, test_set, num_keys=10_000, search_images=16, keys_per_batch=4,
                               max_seconds=0.0, progress=False)
    assert result.num_keys == 4 == len(result.search_accuracies)


@pytest.mark.parametrize("attack", ["wrong_key_attack", "random_key_search", "partial_key_curve"])
def test_attacks_give_the_callers_model_back_in_its_mode(key, test_set, attack):
    # The attacks ran the caller's own base weights in eval mode and left
    # them there (batch norm and dropout of a model in training stayed off).
    model = protected_patchnet(key).train()
    run = {
        "wrong_key_attack": lambda: wrong_key_attack(model, test_set, num_keys=2, progress=False),
        "random_key_search": lambda: random_key_search(model, test_set, num_keys=4, search_images=16,
                                                       keys_per_batch=4, progress=False),
        "partial_key_curve": lambda: partial_key_curve(model, test_set, fractions=(0.0, 1.0), progress=False),
    }[attack]
    run()
    assert all(module.training for module in model.modules())


def test_a_wrong_key_attack_without_keys_is_refused(protected, test_set):
    # num_keys=0 ran to a ZeroDivisionError in the result's mean.
    with pytest.raises(AttackError, match="num_keys"):
        wrong_key_attack(protected, test_set, num_keys=0, progress=False)


def test_finetune_attack_counts_the_steps_fit_takes(protected, test_set):
    # 70 images in batches of 23: fit takes 3 steps an epoch (it skips a last
    # batch of one image); the row said 4, and min_steps was overstated alike.
    from kp_plugin.train import TrainConfig

    config = TrainConfig(epochs=1, batch_size=23, lr=1e-3, augment=False, amp=False)
    few = torch.utils.data.Subset(test_set, range(40))
    result = finetune_attack(protected, digits("train"), few, public_base=public_patchnet(), fractions=(0.05,),
                             config=config, min_steps=6, progress=False)
    row = result.rows[0]
    assert row.images == 70 and row.steps == 6


@pytest.mark.parametrize("call, allowed", [
    (lambda m, d: random_key_search(m, d, num_keys=0, search_images=10, progress=False), "num_keys must be a positive"),
    (lambda m, d: random_key_search(m, d, num_keys=4, keys_per_batch=0, search_images=10, progress=False),
     "keys_per_batch must be a positive"),
    (lambda m, d: heuristic_key_search(m, d, budget=4, parallel=0, search_images=10, progress=False),
     "parallel must be a positive"),
    (lambda m, d: partial_key_curve(m, d, fractions=(0.5,), repeats=0, progress=False), "repeats must be a positive"),
    (lambda m, d: weight_matching_attack(m, None, d), "public_base must be the public pre-trained model"),
], ids=["random_search num_keys", "random_search keys_per_batch", "heuristic_search parallel",
        "partial_key repeats", "weight_matching without a base"])
def test_attacks_refuse_counts_and_arguments_they_cannot_run_with(protected, test_set, call, allowed):
    # These ran to IndexError, ValueError, ZeroDivisionError or AttributeError.
    with pytest.raises(AttackError, match=allowed):
        call(protected, test_set)


@pytest.mark.parametrize("attack, field", [("wrong_keys", "wrong_keys"), ("random_search", "random_keys"),
                                           ("heuristic_search", "swap_proposals"), ("partial_key", "partial_repeats"),
                                           ("finetune", "finetune_repeats")])
def test_run_attacks_refuses_a_budget_with_a_zero_count(protected, test_set, attack, field):
    import dataclasses

    from kp_plugin.attacks import BUDGETS, run_attacks

    budget = dataclasses.replace(BUDGETS["smoke"], **{field: 0})
    with pytest.raises(AttackError, match=f"budget.{field} must be an integer >= 1, got 0"):
        run_attacks(protected, test_set, train_set=test_set, public_base=public_patchnet, attacks=attack,
                    budget=budget, progress=False)


def test_a_candidate_key_is_never_printed_or_pickled():
    # from_secret_key's candidate printed the key's permutations in full and
    # pickled them.
    import copy
    import pickle

    from kp_plugin import KeyPicklingError

    key = SecretKey.generate(block_size=4, scheme="shuffle+np+scramble")
    candidate = CandidateKey.from_secret_key(key, image_size=(8, 8))
    text = repr(candidate) + str(candidate)
    assert "tensor" not in text and str(candidate.permutation.tolist()[:4])[1:-1] not in text
    with pytest.raises(KeyPicklingError):
        pickle.dumps(candidate)
    clone = copy.deepcopy(candidate)
    assert torch.equal(clone.permutation, candidate.permutation) and clone.permutation is not candidate.permutation
