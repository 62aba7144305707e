"""Transformers models with the key inside (wrap_hf_model): the calling
convention, the same logits as the processor style, save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fixtures import BLOCK_SIZE, IMAGE_SIZE, digits_dataset, tiny_vit, vit_processor
from kp_plugin import ConfigurationError, SecretKey, load_protected
from kp_plugin.checkpoint import find_key_material
from kp_plugin.hf import KeyedImageProcessor, wrap_hf_model


@pytest.fixture(scope="module")
def key():
    return SecretKey.generate(block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def batch():
    ds = digits_dataset("test", size=8)
    return list(ds["image"]), torch.tensor(ds["label"])


def test_processor_style_and_model_style_give_the_same_logits(key, batch):
    images, _ = batch
    processor = KeyedImageProcessor(vit_processor(), key)
    model = tiny_vit().eval()
    protected = wrap_hf_model(model, key, image_processor=processor)
    with torch.no_grad():
        processor_style = model(**processor(images, return_tensors="pt")).logits
        model_style = protected(pixel_values=processor.images01(images)).logits
    torch.testing.assert_close(processor_style, model_style, atol=1e-5, rtol=0)


def test_wrapped_model_keeps_the_transformers_calling_convention(key, batch):
    images, labels = batch
    processor = KeyedImageProcessor(vit_processor(), key)
    protected = wrap_hf_model(tiny_vit(), key, image_processor=processor)
    out = protected(pixel_values=processor.images01(images), labels=labels)
    assert out.logits.shape == (8, 10)
    out.loss.backward()
    assert protected.unwrap().classifier.weight.grad is not None


def test_save_pretrained_writes_hf_config_weights_and_protection_without_key(key, batch, tmp_path):
    images, _ = batch
    processor = KeyedImageProcessor(vit_processor(), key)
    protected = wrap_hf_model(tiny_vit().eval(), key, image_processor=processor)
    protected.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "protection.json"}
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "vit"
    assert find_key_material(tmp_path, key) == []
    loaded = load_protected(tmp_path, tiny_vit(seed=1).eval(), key)
    x = processor.images01(images)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, protected(pixel_values=x).logits)


def test_saved_directory_loads_with_from_pretrained_as_a_plain_model(key, tmp_path):
    from transformers import AutoModelForImageClassification

    protected = wrap_hf_model(tiny_vit(), key, image_processor=vit_processor())
    protected.save_pretrained(tmp_path)
    plain = AutoModelForImageClassification.from_pretrained(tmp_path)
    torch.testing.assert_close(plain.classifier.weight, protected.unwrap().classifier.weight)


def test_wrapping_without_normalization_says_what_to_pass(key):
    # An architecture without an image processor of its own in transformers:
    # nothing to take the normalization from.
    model = tiny_vit()
    model.config.model_type = "kp-unknown"
    with pytest.raises(ConfigurationError, match="image_processor="):
        wrap_hf_model(model, key)


def test_wrapping_with_a_processor_keyed_with_another_key_is_rejected(key):
    from kp_plugin import KeyMismatchError

    other = KeyedImageProcessor(vit_processor(), SecretKey.generate_like(key))
    with pytest.raises(KeyMismatchError):
        wrap_hf_model(tiny_vit(), key, image_processor=other)


def test_stock_trainer_keeps_pixel_values_and_labels_of_a_wrapped_model(key, tmp_path):
    # Trainer drops dataset columns that forward's signature does not name and
    # finds label names there; the wrapped model must name both.
    import datasets
    import torch
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    images = torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE)
    data = datasets.Dataset.from_dict(
        {"pixel_values": images.numpy(), "label": [i % 10 for i in range(8)]}
    ).with_format("torch")
    model = wrap_hf_model(tiny_vit(), key, image_processor=vit_processor())
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and metrics["eval_loss"] > 0


def test_weights_a_plain_trainer_saved_from_the_wrapper_load_or_fail_never_come_back_random(key, tmp_path):
    # A plain Trainer saves a model it does not know with save_file(model.state_dict()): "model."-prefixed
    # names. load_protected went through from_pretrained, which initialized every tensor afresh and only
    # logged it; the strict load of that fresh model then passed: random weights, no error.
    from safetensors.torch import save_file

    from kp_plugin import CheckpointError, ProtectionConfig
    from kp_plugin.errors import UnsignedCheckpointWarning

    trained = wrap_hf_model(tiny_vit(seed=3), key, image_processor=vit_processor())
    (tmp_path / "ckpt").mkdir()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()},
              str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    trained.unwrap().config.save_pretrained(tmp_path / "ckpt")
    ProtectionConfig.from_model(trained).save(tmp_path / "ckpt")  # by hand: unsigned
    with pytest.warns(UnsignedCheckpointWarning):
        loaded = load_protected(tmp_path / "ckpt", tiny_vit(seed=7), key)
    for name, value in trained.unwrap().state_dict().items():
        assert torch.equal(loaded.unwrap().state_dict()[name], value), name
    # Names transformers cannot place at all are an error, not a fresh model.
    (tmp_path / "other").mkdir()
    save_file({"elsewhere." + k: v.contiguous() for k, v in trained.unwrap().state_dict().items()},
              str(tmp_path / "other" / "model.safetensors"), metadata={"format": "pt"})
    trained.unwrap().config.save_pretrained(tmp_path / "other")
    ProtectionConfig.from_model(trained).save(tmp_path / "other")
    with pytest.raises(CheckpointError, match="could not place"), pytest.warns(UnsignedCheckpointWarning):
        load_protected(tmp_path / "other", tiny_vit(seed=7), key)


def test_wrap_model_finds_a_transformers_models_normalization(key, batch, tmp_path):
    # A transformers config has no image_mean / image_std, so wrap_model(vit,
    # key) was a ConfigurationError. Now: the preprocessor_config.json saved
    # beside the weights, else the architecture's processor defaults, said.
    from kp_plugin import wrap_model
    from kp_plugin.errors import NormalizationWarning

    images, labels = batch
    model = tiny_vit()
    with pytest.warns(NormalizationWarning, match="ViTImageProcessor's defaults"):
        protected = wrap_model(model, key)
    assert (protected.keyed.mean, protected.keyed.std) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    out = protected(pixel_values=KeyedImageProcessor(vit_processor(), key).images01(images), labels=labels)
    assert out.loss is not None and out.logits.shape == (len(images), model.config.num_labels)
    model.save_pretrained(tmp_path)
    vit_processor().__class__(image_mean=[0.25] * 3, image_std=[0.75] * 3).save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", NormalizationWarning)  # found, not guessed: no warning
        saved = wrap_model(reloaded, key)
    assert (saved.keyed.mean, saved.keyed.std) == ((0.25, 0.25, 0.25), (0.75, 0.75, 0.75))


def test_wrap_model_takes_what_the_processor_really_normalizes_with(key, tmp_path):
    # Before: MobileViT (its processor does not normalize) got mean = std =
    # 0.5 and EfficientNet (include_top divides by std twice) std 0.5 instead
    # of 0.25, saved folder or class defaults alike: other inputs than
    # wrap_hf_model(image_processor=...) gave the same model.
    import warnings

    import transformers

    from kp_plugin import wrap_model
    from kp_plugin.errors import NormalizationWarning

    cases = {
        "mobilevit": (transformers.MobileViTForImageClassification(transformers.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_labels=5)),
            transformers.MobileViTImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "efficientnet": (transformers.EfficientNetForImageClassification(transformers.EfficientNetConfig(
            image_size=32, depth_coefficient=0.5, hidden_dim=1280, num_labels=5)),
            transformers.EfficientNetImageProcessor(size={"height": 32, "width": 32})),
    }
    for name, (model, processor) in cases.items():
        model.eval()
        expected = wrap_hf_model(model, key, image_processor=processor).keyed
        with pytest.warns(NormalizationWarning):
            guessed = wrap_model(model, key).keyed
        folder = tmp_path / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("error", NormalizationWarning)
            saved = wrap_model(type(model).from_pretrained(folder), key).keyed
        for keyed in (guessed, saved):
            assert (keyed.mean, keyed.std) == (expected.mean, expected.std), name


def test_a_model_taking_text_first_gets_the_keyed_images_by_keyword(key):
    # CLIPModel.forward(input_ids, pixel_values, ...): the keyed images went
    # in as input_ids ("got multiple values for argument 'input_ids'").
    import transformers

    from kp_plugin.transforms import apply_transform

    torch.manual_seed(0)
    clip = transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100, bos_token_id=0, eos_token_id=2),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64), projection_dim=16)).eval()
    wrapped = wrap_hf_model(clip, key, mean=0.5, std=0.5)
    x, ids = torch.rand(2, 3, 32, 32), torch.tensor([[0, 5, 2], [0, 7, 2]])
    with torch.no_grad():
        expected = clip(input_ids=ids, pixel_values=(apply_transform(x, key) - 0.5) / 0.5).logits_per_image
        calls = (wrapped(pixel_values=x, input_ids=ids), wrapped(input_ids=ids, pixel_values=x),
                 wrapped(x, input_ids=ids))
        for out in calls:
            torch.testing.assert_close(out.logits_per_image, expected)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_an_unreadable_saved_processor_config_falls_back_to_the_class_defaults(key, tmp_path, text):
    from kp_plugin import wrap_model
    from kp_plugin.errors import NormalizationWarning

    model = tiny_vit()
    model.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(text)
    loaded = type(model).from_pretrained(tmp_path)
    with pytest.warns(NormalizationWarning, match="ViTImageProcessor's defaults"):
        assert wrap_model(loaded, key).keyed.mean == (0.5, 0.5, 0.5)


def test_a_save_records_the_training_size_not_a_later_evaluations(key, tmp_path):
    # A ViT trained at 16x16 and then run once at 24x24 (interpolate_pos_encoding)
    # was recorded for 24x24: loaded back, it warned at its right size and told
    # the user to resize to the wrong one (with block scrambling, wrong answers).
    model = wrap_hf_model(tiny_vit(), key, mean=[0.5] * 3, std=[0.5] * 3)
    model.train()
    model(pixel_values=torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE))
    model.eval()
    with torch.no_grad():
        model(pixel_values=torch.rand(1, 3, IMAGE_SIZE + 8, IMAGE_SIZE + 8), interpolate_pos_encoding=True)
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "protection.json").read_text())["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]


def test_from_pretrained_through_the_wrapper_is_refused_and_a_plain_load_is_wrapped_with_the_saved_settings(
        key, tmp_path):
    # model.from_pretrained(dir) fell through to the base class and returned
    # a plain, unprotected model; wrap_model over the base class's
    # from_pretrained(dir) ignored protection.json (default normalization,
    # any key accepted).
    from transformers import ViTForImageClassification

    from kp_plugin import KeyMismatchError, wrap_model

    model = wrap_hf_model(tiny_vit(), key, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(ConfigurationError, match="load_protected_auto"):
        model.from_pretrained(tmp_path / "out")
    again = wrap_model(ViTForImageClassification.from_pretrained(tmp_path / "out"), key)
    assert again.keyed.mean == pytest.approx([0.485, 0.456, 0.406]) and again.keyed.std == model.keyed.std
    images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images).logits, model.eval()(images).logits)
    with pytest.raises(KeyMismatchError, match="another key"):
        wrap_model(ViTForImageClassification.from_pretrained(tmp_path / "out"), SecretKey.generate_like(key))


def test_save_pretrained_takes_max_shard_size_and_refuses_other_weights(key, tmp_path):
    # max_shard_size was "only with push_to_hub=True" (a plain TypeError).
    model = wrap_hf_model(tiny_vit(), key, mean=[0.5] * 3, std=[0.5] * 3)
    model.save_pretrained(tmp_path / "out", max_shard_size="1GB")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    with pytest.raises(ConfigurationError, match="state_dict"):
        model.save_pretrained(tmp_path / "other", state_dict={})
    assert not (tmp_path / "other").exists()
