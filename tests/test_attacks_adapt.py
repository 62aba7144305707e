"""Zero-training adaptation of ViT-style models to a key, and what weight
matching does to the result."""

from __future__ import annotations

import pytest
import timm
import torch

from kp_plugin import SecretKey
from kp_plugin.adapt import AdaptationError, adapt_patch_embedding
from kp_plugin.attacks import weight_matching_attack

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tiny_vit(*, patch_size: int = 8, mean=IMAGENET_MEAN, std=IMAGENET_STD, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=patch_size,
                              embed_dim=48, depth=2, num_heads=2, num_classes=10, **kwargs).eval()
    model.pretrained_cfg = dict(model.pretrained_cfg, mean=mean, std=std, input_size=(3, 32, 32))
    return model


def normalized(images, mean, std):
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+np", "shuffle+np+scramble", "np+scramble"])
def test_adapted_vit_gives_the_plain_logits_on_keyed_images(scheme):
    plain = tiny_vit()
    key = SecretKey(bytes(range(32)), block_size=8, scheme=scheme)
    keyed = adapt_patch_embedding(plain, key).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        expected = plain(normalized(images, IMAGENET_MEAN, IMAGENET_STD))
        assert torch.allclose(keyed(images), expected, atol=1e-4, rtol=0)
        # ... and the plain model is unchanged.
        assert torch.equal(plain(normalized(images, IMAGENET_MEAN, IMAGENET_STD)), expected)


def test_adapted_vit_with_average_pooling_and_no_class_token_is_exact():
    plain = tiny_vit(class_token=False, global_pool="avg", mean=(0.5,) * 3, std=(0.5,) * 3)
    key = SecretKey(bytes(range(1, 33)), block_size=8, scheme="shuffle+np+scramble")
    keyed = adapt_patch_embedding(plain, key).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(keyed(images), plain(normalized(images, (0.5,) * 3, (0.5,) * 3)), atol=1e-4, rtol=0)


def test_adapted_transformers_vit_is_exact():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=5, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    plain = ViTForImageClassification(config).eval()
    key = SecretKey(bytes(range(2, 34)), block_size=8, scheme="shuffle+np+scramble")
    keyed = adapt_patch_embedding(plain, key).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = plain(pixel_values=normalized(images, (0.5,) * 3, (0.5,) * 3)).logits
        assert torch.allclose(keyed(pixel_values=images).logits, expected, atol=1e-4, rtol=0)


def test_adaptation_refuses_value_maps_it_cannot_absorb():
    key = SecretKey(bytes(32), block_size=8, scheme="shuffle+shift")
    with pytest.raises(AdaptationError, match="shift"):
        adapt_patch_embedding(tiny_vit(), key)


def test_adaptation_refuses_a_block_size_other_than_the_patch_size():
    key = SecretKey(bytes(32), block_size=4, scheme="shuffle+np")
    with pytest.raises(AdaptationError, match="patch"):
        adapt_patch_embedding(tiny_vit(patch_size=8), key)


def test_weight_matching_recovers_the_whole_key_of_an_adapted_vit():
    plain = tiny_vit()
    key = SecretKey(bytes(range(3, 35)), block_size=8, scheme="shuffle+np+scramble")
    keyed = adapt_patch_embedding(plain, key)
    result = weight_matching_attack(keyed, plain)
    assert (result.recovered_fraction, result.flip_agreement, result.block_recovered_fraction) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("patch_size, block_size", [(16, 4), (8, 16)])
def test_weight_matching_measures_a_vit_whose_patch_is_not_the_block(patch_size, block_size):
    # Before: a RuntimeError from the impulse (a 4x4 block under a 16x16
    # kernel), or from matching 16 patch positions against 4 scrambled blocks.
    from kp_plugin import wrap_model

    plain = tiny_vit(patch_size=patch_size)
    key = SecretKey(bytes(range(5, 37)), block_size=block_size, scheme="shuffle+np+scramble")
    stolen = tiny_vit(patch_size=patch_size)
    with torch.no_grad():
        stolen.patch_embed.proj.weight.add_(0.01 * torch.randn_like(stolen.patch_embed.proj.weight))
    images = torch.rand(8, 3, 32, 32)
    result = weight_matching_attack(wrap_model(stolen, key), plain, (images, torch.arange(8) % 10))
    assert result.layer_kind == f"conv {patch_size}x{patch_size} stride {patch_size}"
    assert result.block_recovered_fraction is None and 0 <= result.recovered_fraction <= 1
    assert result.accuracy is not None and result.key_accuracy is not None
