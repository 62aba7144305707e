"""The protection objective: cross-entropy with the key plus suppression
terms under random wrong keys and on plain images."""

import math

import pytest
import timm
import torch

from kp_plugin import SecretKey, wrap_model
from kp_plugin.errors import ConfigurationError
from kp_plugin.objectives import ProtectionObjective, near_key_images, random_wrong_key
from kp_plugin.transforms import image_to_blocks
from kp_plugin.train import plain_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def protected():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=4)
    return wrap_model(model, SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np+shift", channels=3))


def test_uniform_suppression_is_smallest_for_uniform_outputs():
    objective = ProtectionObjective(wrong_key_weight=1.0)
    labels = torch.tensor([0, 1])
    uniform = objective.suppression(torch.zeros(2, 4), labels)
    confident = objective.suppression(torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]]), labels)
    assert uniform.item() == pytest.approx(math.log(4))
    assert confident.item() > uniform.item() + 1


def test_true_class_form_ignores_a_true_class_at_or_below_chance():
    objective = ProtectionObjective(wrong_key_weight=1.0, form="true_class")
    labels = torch.tensor([0])
    assert objective.suppression(torch.tensor([[-3.0, 1, 1, 1]]), labels).item() == 0
    assert objective.suppression(torch.tensor([[3.0, 0, 0, 0]]), labels).item() > 0.5


def test_wrong_key_term_adds_to_the_loss_and_reaches_the_weights(protected):
    images, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    protected.train()
    logits = protected(images)
    loss, parts = ProtectionObjective(wrong_key_weight=0.5, plain_weight=0.25)(protected, images, labels, logits)
    assert set(parts) == {"ce", "wrong", "plain"}
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["wrong"] + 0.25 * parts["plain"], rel=1e-5)
    loss.backward()
    assert protected.model.conv_stem.weight.grad.abs().sum() > 0


def test_suppression_passes_leave_batch_norm_statistics_to_the_keyed_images(protected):
    images, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    protected.eval()
    logits = protected(images)  # no statistics update in eval
    protected.train()
    before = {n: b.clone() for n, b in protected.model.named_buffers() if "running" in n}
    ProtectionObjective(wrong_key_weight=1.0, plain_weight=1.0)(protected, images, labels, logits)
    after = dict(protected.model.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert protected.model.training  # modes are restored


def test_suppression_needs_a_protected_model():
    baseline = plain_model(timm.create_model("test_efficientnet", num_classes=4))
    images = torch.rand(2, 3, 16, 16)
    with pytest.raises(ConfigurationError, match="ProtectedModel"):
        ProtectionObjective(wrong_key_weight=1.0)(baseline, images, torch.tensor([0, 1]), baseline(images))


def test_random_wrong_keys_follow_torch_seed_and_keep_the_settings():
    key = SecretKey.generate(block_size=8, scheme="shuffle+np")
    first = random_wrong_key(key, generator=torch.Generator().manual_seed(3))
    again = random_wrong_key(key, generator=torch.Generator().manual_seed(3))
    assert first == again and first != key
    assert (first.block_size, first.scheme, first.channels) == (8, key.scheme, 3)


def test_unknown_form_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="uniform"):
        ProtectionObjective(form="push")


def test_near_key_images_apply_one_block_transform_to_every_block():
    torch.manual_seed(1)
    block = torch.rand(1, 3, 4, 4)
    x = block.repeat(2, 1, 3, 2)  # six identical blocks per image
    y = near_key_images(x, 4, 0.5, generator=torch.Generator().manual_seed(0))
    vectors = image_to_blocks(y, 4)
    assert torch.equal(vectors, vectors[:1, :1].expand_as(vectors))
    # Every output value is an input value of the same block, flipped or not.
    source = image_to_blocks(block, 4)[0, 0]
    folded = torch.minimum(vectors[0, 0], 1 - vectors[0, 0]).sort().values
    assert torch.allclose(folded, torch.minimum(source, 1 - source).sort().values)


@pytest.mark.parametrize("distance", [0.25, 0.5, 1.0])
def test_near_key_distance_sets_how_much_of_the_block_moves_and_flips(distance):
    # Distinct values below 0.5: a flipped value is above 0.5, and folding it
    # back names the position it came from.
    x = (torch.randperm(48).float() + 1).div(100).view(1, 4, 4, 3).permute(0, 3, 1, 2).contiguous()
    moved, flipped = [], []
    for seed in range(40):
        y = image_to_blocks(near_key_images(x, 4, distance, generator=torch.Generator().manual_seed(seed)), 4)[0, 0]
        flipped.append((y > 0.5).float().mean().item())
        moved.append((torch.minimum(y, 1 - y) - image_to_blocks(x, 4)[0, 0]).abs().gt(1e-6).float().mean().item())
    assert max(moved) <= distance + 1e-6
    assert sum(moved) / len(moved) > distance / 2
    assert sum(flipped) / len(flipped) == pytest.approx(distance / 2, abs=0.05)


def test_near_key_distance_outside_zero_one_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="distance"):
        near_key_images(torch.rand(1, 3, 4, 4), 4, 0.0)
    with pytest.raises(ConfigurationError, match="near_key_distance"):
        ProtectionObjective(near_key_weight=1.0, near_key_distance=(0.5, 0.2))


def test_near_and_hard_key_terms_add_to_the_loss_and_reach_the_weights(protected):
    images, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    protected.train()
    objective = ProtectionObjective(near_key_weight=0.5, hard_key_weight=0.25, hard_key_candidates=3, hard_key_pool=2)
    loss, parts = objective(protected, images, labels, protected(images))
    assert set(parts) == {"ce", "near", "hard"}
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["near"] + 0.25 * parts["hard"], rel=1e-5)
    loss.backward()
    assert protected.model.conv_stem.weight.grad.abs().sum() > 0
    assert "near1" in ProtectionObjective(near_key_weight=1).describe()
    assert "hard1" in ProtectionObjective(hard_key_weight=1).describe()


def test_hard_key_pool_keeps_the_keys_that_work_best_and_resets_for_another_key(protected):
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    objective = ProtectionObjective(hard_key_weight=1.0, hard_key_candidates=5, hard_key_pool=2, hard_key_every=3)
    mined = []
    original = objective._mine_hard_keys

    def spy(model, x, y):
        original(model, x, y)
        mined.append([entry[1] for entry in objective._pool])

    objective._mine_hard_keys = spy
    with torch.no_grad():
        for _ in range(4):
            objective(protected, images, labels, protected(images))
    assert len(mined) == 2  # steps 0 and 3
    assert all(len(scores) == 2 and scores[0] >= scores[1] for scores in mined)
    assert all(entry[0] != protected.key and entry[0].scheme == protected.key.scheme for entry in objective._pool)
    assert "_pool" not in objective.to_dict()
    other = wrap_model(protected.unwrap(), SecretKey.generate(block_size=4, scheme="shuffle+np"))
    with torch.no_grad():
        objective(other, images, labels, other(images))
    assert all(entry[0].scheme == other.key.scheme for entry in objective._pool)


def _wrong_term_and_its_keys(objective, protected, images, labels, num_keys, seed):
    """The objective's ``wrong`` part on ``images``, and the random wrong keys
    it drew (replayed from the same torch seed)."""
    protected.eval()
    with torch.no_grad():
        logits = protected(images)
        torch.manual_seed(seed)
        _, parts = objective(protected, images, labels, logits)
    torch.manual_seed(seed)
    return parts["wrong"], [random_wrong_key(protected.key) for _ in range(num_keys)]


def _suppression_under(objective, protected, keyed_parts, labels):
    """The suppression loss of the base model on ``[(key, images), ...]``, concatenated."""
    from kp_plugin import KeyedInput

    mean, std = protected.keyed.mean, protected.keyed.std
    with torch.no_grad():
        wrong = torch.cat([KeyedInput(k, mean=mean, std=std)(x) for k, x in keyed_parts])
        return objective.suppression(protected.unwrap()(wrong), labels).item()


def test_wrong_key_groups_put_each_group_of_the_batch_under_its_own_key(protected):
    images, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    objective = ProtectionObjective(wrong_key_weight=1.0, wrong_key_groups=3)
    wrong, keys = _wrong_term_and_its_keys(objective, protected, images, labels, 3, seed=5)
    groups = [(k, images[2 * i:2 * i + 2]) for i, k in enumerate(keys)]
    expected = _suppression_under(objective, protected, groups, labels)
    assert len({k.fingerprint for k in keys}) == 3
    assert wrong == pytest.approx(expected, rel=1e-5)
    assert "3 keys/step" in objective.describe()


def test_suppression_fraction_shows_the_wrong_key_only_part_of_the_batch(protected):
    images, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    objective = ProtectionObjective(wrong_key_weight=1.0, suppression_fraction=0.25)
    wrong, keys = _wrong_term_and_its_keys(objective, protected, images, labels, 1, seed=11)
    expected = _suppression_under(objective, protected, [(keys[0], images[:2])], labels[:2])
    assert wrong == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ConfigurationError, match="suppression_fraction"):
        ProtectionObjective(suppression_fraction=0.0)


def test_distillation_is_zero_at_the_teacher_and_grows_away_from_it():
    objective = ProtectionObjective(distill_weight=1.0, distill_temperature=2.0)
    teacher = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.0, 3.0, 0.0, -2.0]])
    assert objective.distillation(teacher.clone(), teacher).item() == pytest.approx(0.0, abs=1e-6)
    near = objective.distillation(teacher + torch.tensor([0.3, 0, 0, 0]), teacher).item()
    far = objective.distillation(-teacher, teacher).item()
    assert 0 < near < far
    # T^2 scaling: with logits and teacher both scaled by T the loss equals T^2 x the T=1 loss
    t1 = ProtectionObjective(distill_weight=1.0, distill_temperature=1.0).distillation(-teacher, teacher).item()
    t3 = ProtectionObjective(distill_weight=1.0, distill_temperature=3.0).distillation(-3 * teacher, 3 * teacher).item()
    assert t3 == pytest.approx(9 * t1, rel=1e-5)


def test_distillation_term_adds_to_the_loss_and_needs_teacher_logits(protected):
    images, labels = torch.rand(6, 3, 16, 16), torch.randint(0, 4, (6,))
    protected.train()
    logits = protected(images)
    objective = ProtectionObjective(wrong_key_weight=0.5, distill_weight=0.7)
    with pytest.raises(ConfigurationError, match="teacher"):
        objective(protected, images, labels, logits)
    teacher_logits = torch.randn(6, 4)
    loss, parts = objective(protected, images, labels, logits, teacher_logits)
    assert set(parts) == {"ce", "wrong", "distill"}
    assert parts["distill"] > 0
    assert loss.item() == pytest.approx(parts["ce"] + 0.5 * parts["wrong"] + 0.7 * parts["distill"], rel=1e-5)
    assert objective.describe() == "ce+wrong0.5+distill0.7(T=2)(uniform)"


@pytest.mark.parametrize("kwargs", [{"distill_weight": -1.0}, {"distill_weight": 1.0, "distill_temperature": 0.0}])
def test_bad_distillation_settings_are_configuration_errors(kwargs):
    with pytest.raises(ConfigurationError, match="distill"):
        ProtectionObjective(**kwargs)
