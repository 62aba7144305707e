"""The protection objective: cross-entropy with the key plus suppression
terms under random wrong keys and on plain images."""

import math

import pytest
import timm
import torch

from kp_plugin import SecretKey, wrap_model
from kp_plugin.errors import ConfigurationError
from kp_plugin.objectives import ProtectionObjective, random_wrong_key
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
