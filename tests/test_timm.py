"""The timm adapter: protected timm models, their data pipeline, and
protected timm checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch

from kp_plugin import (BlockSizeError, CheckpointError, ConfigurationError, KeyMismatchError, SecretKey, save_protected,
                       wrap_model)
from kp_plugin.checkpoint import find_key_material
from kp_plugin.timm import (create_base_model, create_protected_model, create_transform, load_protected_timm,
                            resolve_data_config)

TINY = "test_efficientnet"  # a real timm architecture, ~0.1M parameters
#: A ViT for 32x32 images that timm builds in no time.
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3)

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def key():
    return SecretKey.generate(block_size=8)


def test_mean_std_and_input_size_come_from_pretrained_cfg(key):
    model = create_protected_model(TINY, key, num_classes=4)
    cfg = model.unwrap().pretrained_cfg
    assert model.keyed.mean == pytest.approx(cfg["mean"])
    assert model.keyed.std == pytest.approx(cfg["std"])
    assert model.keyed.input_size == (3, 160, 160)
    assert model.unwrap().num_classes == 4


@pytest.mark.parametrize("channels, mean_of", [(1, lambda rgb: [sum(rgb) / 3]), (4, lambda rgb: [*rgb, rgb[0]])])
def test_in_chans_other_than_three_adapts_size_and_normalization(tmp_path, channels, mean_of):
    # timm keeps the RGB pretrained_cfg for in_chans=1 / 4; the keyed input
    # follows the model (timm averages / repeats the first conv's weights).
    key = SecretKey.generate(block_size=8, channels=channels)
    model = create_protected_model(TINY, key, num_classes=3, in_chans=channels).eval()
    rgb = model.unwrap().pretrained_cfg["mean"]
    assert model.keyed.input_size == (channels, 160, 160)
    assert model.keyed.mean == pytest.approx(mean_of(rgb))
    images = torch.rand(2, channels, 32, 32)
    save_protected(model, tmp_path)
    torch.testing.assert_close(load_protected_timm(tmp_path, key).eval()(images), model(images))
    wrapped = wrap_model(timm.create_model(TINY, in_chans=channels, num_classes=3), key).eval()
    assert wrapped.keyed.input_size == (channels, 160, 160) and wrapped.keyed.mean == pytest.approx(mean_of(rgb))
    # Made with plain timm, no model_args are recorded: the channel count
    # comes from the checkpoint (it did "not fit" before).
    save_protected(wrapped, tmp_path / "plain")
    torch.testing.assert_close(load_protected_timm(tmp_path / "plain", key).eval()(images), wrapped(images))


def test_explicit_input_size_is_recorded_for_the_data_pipeline(key):
    model = create_protected_model(TINY, key, num_classes=4, input_size=32)
    assert model.keyed.input_size == (3, 32, 32)
    assert resolve_data_config(model)["input_size"] == (3, 32, 32)


def test_the_size_a_model_was_used_at_is_recorded_not_timms_default(tmp_path, key):
    # wrap_model takes pretrained_cfg's 160 when no size is given; a model
    # fine-tuned at 32x32 was saved (and exported: a fixed 160x160 ONNX
    # input) for 160.
    model = wrap_model(timm.create_model(TINY, num_classes=3), key)
    assert model.keyed.input_size == (3, 160, 160)
    model(torch.rand(2, 3, 32, 32))
    assert resolve_data_config(model)["input_size"] == (3, 32, 32)
    save_protected(model, tmp_path)
    assert json.loads((tmp_path / "protection.json").read_text())["input_size"] == [3, 32, 32]
    assert load_protected_timm(tmp_path, key).keyed.input_size == (3, 32, 32)


def test_timm_feature_methods_see_keyed_images_as_forward_does(key):
    # Reached through attribute fall-through, forward_features got raw
    # pixels: plausible features, silently without the key.
    model = create_protected_model(TINY, key, num_classes=3, input_size=32).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(model.forward_features(images)), model(images))
        features = model.unwrap().forward_features(model.keyed(images))
        torch.testing.assert_close(model.forward_features(images), features)
        final, intermediates = model.forward_intermediates(images)
        torch.testing.assert_close(final, features)
    with pytest.raises(TypeError, match="forward_features expects images"):
        model.forward_features()


def test_a_vits_get_intermediate_layers_sees_keyed_images(key):
    # timm's DINO-style feature API ran the base on raw pixels.
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48,
                            depth=2, num_heads=2, num_classes=3).eval()
    model = wrap_model(vit, key)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit.get_intermediate_layers(model.keyed(images), n=2)
        for got, want in zip(model.get_intermediate_layers(images, n=2), expected):
            torch.testing.assert_close(got, want)


def test_input_size_not_a_multiple_of_the_block_size_is_a_block_size_error(key):
    with pytest.raises(BlockSizeError, match="multiple of 8"):
        create_protected_model(TINY, key, num_classes=4, input_size=30)


def test_pretrained_cfg_size_not_a_multiple_of_the_block_size_names_a_fix():
    key = SecretKey.generate(block_size=7)
    with pytest.raises(BlockSizeError, match=r"input_size=\(161, 161\)"):
        create_protected_model(TINY, key, num_classes=4)


def test_transform_stops_before_normalization_and_feeds_the_model(key):
    from PIL import Image

    model = create_protected_model(TINY, key, num_classes=4, input_size=32).eval()
    transform = create_transform(model, is_training=True)
    assert "Normalize" not in repr(transform)
    image = Image.fromarray((torch.rand(40, 50, 3) * 255).to(torch.uint8).numpy())
    x = transform(image)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8
    assert model(x.unsqueeze(0)).shape == (1, 4)


def test_protected_timm_checkpoint_loads_back_with_same_outputs_and_no_key(tmp_path, key):
    model = create_protected_model(TINY, key, num_classes=3, input_size=32).eval()
    save_protected(model, tmp_path)
    loaded = load_protected_timm(tmp_path, key).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.keyed.input_size == (3, 32, 32)
    assert find_key_material(tmp_path, key) == []


def test_timm_creation_arguments_are_recorded_and_rebuild_the_architecture(tmp_path, key):
    # A ViT made with non-default arguments: without them the weights would
    # not fit vit_tiny_patch16_224's defaults.
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, drop_rate=0.1)
    model = create_protected_model("vit_tiny_patch16_224", key, num_classes=3, **args).eval()
    save_protected(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"] == args
    loaded = load_protected_timm(tmp_path, key).eval()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.unwrap().patch_embed.proj.kernel_size == (8, 8)


def test_a_model_built_for_one_size_is_created_at_the_size_asked_for(tmp_path, key):
    # Before, vit_tiny at input_size=32 was created at 224 and failed on its
    # first batch (timm's "Input height (32) doesn't match model (224)"), and
    # img_size=64 alone recorded 224 for the data pipeline and protection.json.
    small = dict(patch_size=8, embed_dim=48, depth=1, num_heads=3)
    model = create_protected_model("vit_tiny_patch16_224", key, num_classes=3, input_size=32, **small).eval()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    assert model.keyed.input_size == (3, 32, 32) and resolve_data_config(model)["input_size"] == (3, 32, 32)
    save_protected(model, tmp_path)
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(load_protected_timm(tmp_path, key).eval()(x), model(x))
    by_timm = create_protected_model("vit_tiny_patch16_224", key, num_classes=3, img_size=64, **small)
    assert by_timm.keyed.input_size == (3, 64, 64) and by_timm.unwrap().pretrained_cfg["input_size"] == (3, 64, 64)
    with pytest.raises(ConfigurationError, match="disagree"):
        create_protected_model("vit_tiny_patch16_224", key, input_size=32, img_size=64, **small)
    base = create_base_model("vit_tiny_patch16_224", num_classes=3, input_size=32, **small)  # kp protect --baseline
    assert base(torch.rand(1, 3, 32, 32)).shape == (1, 3)
    assert "img_size" not in create_protected_model(TINY, key, input_size=32).unwrap().kp_model_args  # any size fits


def test_loading_a_timm_checkpoint_with_another_key_is_refused(tmp_path, key):
    save_protected(create_protected_model(TINY, key, num_classes=3, input_size=32), tmp_path)
    with pytest.raises(KeyMismatchError):
        load_protected_timm(tmp_path, SecretKey.generate_like(key))


def test_a_checkpoint_without_timm_config_is_a_checkpoint_error(tmp_path, key):
    save_protected(create_protected_model(TINY, key, num_classes=3, input_size=32), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(CheckpointError, match="not a timm config"):
        load_protected_timm(tmp_path, key)


@pytest.mark.parametrize("content", ["[1]", "\"text\"", "[" * 100_000])
def test_a_config_json_that_is_not_an_object_is_a_checkpoint_error(tmp_path, key, content):
    # AttributeError ("'list' object has no attribute 'get'") or RecursionError.
    save_protected(create_protected_model(TINY, key, num_classes=3, input_size=32), tmp_path)
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match="config.json"):
        load_protected_timm(tmp_path, key)


@pytest.mark.parametrize("argument", ["checkpoint_path", "pretrained", "pretrained_cfg_overlay"])
def test_a_config_asking_timm_to_load_weights_from_elsewhere_is_refused(tmp_path, key, argument):
    # config.json comes from the Hub on a pull: checkpoint_path would have
    # timm torch.load (unpickle) a file the repository chose.
    payload = tmp_path / "payload.pt"
    torch.save({}, payload)
    save_protected(create_protected_model(TINY, key, num_classes=3, input_size=32), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["model_args"] = {argument: {"checkpoint_path": str(payload), "pretrained": True,
                                       "pretrained_cfg_overlay": {"file": str(payload)}}[argument]}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"elsewhere.*{argument}"):
        load_protected_timm(tmp_path / "ckpt", key)


def test_weight_source_arguments_are_not_recorded(tmp_path, key):
    model = create_protected_model(TINY, key, num_classes=3, input_size=32, drop_rate=0.1,
                                   pretrained_cfg_overlay={"crop_pct": 1.0})
    save_protected(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"] == {"drop_rate": 0.1}
    load_protected_timm(tmp_path, key)


def test_pretrained_lite0_comes_from_the_offline_package(key):
    from kp_plugin.pretrained import load_efficientnet_lite0

    model = create_protected_model("tf_efficientnet_lite0", key, pretrained=True, num_classes=10)
    reference = load_efficientnet_lite0()
    ours = model.unwrap().state_dict()
    assert torch.equal(ours["conv_stem.weight"], reference.state_dict()["conv_stem.weight"])
    assert torch.equal(ours["blocks.6.0.conv_pwl.weight"], reference.state_dict()["blocks.6.0.conv_pwl.weight"])
    assert model.unwrap().num_classes == 10
    assert model.keyed.mean == (0.5, 0.5, 0.5) and model.keyed.input_size == (3, 224, 224)


def test_pretrained_lite0_takes_timm_arguments_and_records_them(key, tmp_path):
    model = create_protected_model("tf_efficientnet_lite0", key, pretrained=True, num_classes=4, drop_rate=0.25)
    assert model.unwrap().drop_rate == 0.25
    save_protected(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_args"] == {"drop_rate": 0.25}
    assert load_protected_timm(tmp_path, key).unwrap().drop_rate == 0.25


def test_a_checkpoint_path_that_is_missing_or_not_a_checkpoint_is_named(tmp_path, key):
    # timm's FileNotFoundError / RuntimeError ("weights_only=True blocked ...").
    with pytest.raises(CheckpointError, match="nope.pth does not exist"):
        create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(tmp_path / "nope.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(tmp_path / "garbage.pth"))
    (tmp_path / "cut.safetensors").write_bytes(b"garbage" * 10)  # safetensors' own error, uncaught before
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        create_base_model(TINY, num_classes=3, checkpoint_path=str(tmp_path / "cut.safetensors"))
    good = tmp_path / "good.pth"
    torch.save(timm.create_model(TINY, num_classes=3).state_dict(), good)
    create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(good))


def test_checkpoint_path_takes_a_protected_models_own_state_dict_and_checks_its_key(tmp_path, key):
    # torch.save(model.state_dict()) of a protected model (names under
    # "model.", as timm's CheckpointSaver writes them too) was refused with a
    # one-line error; another key's model.safetensors loaded without a word
    # and gave wrong predictions; a checkpoint folder was "does not exist".
    torch.manual_seed(0)
    model = create_protected_model(TINY, key, num_classes=3).eval()
    images = torch.rand(2, 3, 64, 64)
    torch.save(model.state_dict(), tmp_path / "own.pth")
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, tmp_path / "saver.pth.tar")  # timm's CheckpointSaver
    with torch.no_grad():
        for name in ("own.pth", "saver.pth.tar"):
            again = create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(tmp_path / name)).eval()
            torch.testing.assert_close(again(images), model(images))
    folder = save_protected(model, tmp_path / "out")
    with torch.no_grad():
        again = create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(folder / "model.safetensors"))
        torch.testing.assert_close(again.eval()(images), model(images))
    with pytest.raises(KeyMismatchError, match="another key"):
        create_protected_model(TINY, SecretKey.generate_like(key), num_classes=3,
                               checkpoint_path=str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="load_protected_timm"):
        create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(folder))
    with pytest.raises(CheckpointError, match=r"does not fit this model: .*classifier"):
        create_protected_model(TINY, key, num_classes=5, checkpoint_path=str(tmp_path / "own.pth"))
    torch.save({k: v for k, v in model.state_dict().items() if "classifier" not in k}, tmp_path / "part.pth")
    with pytest.raises(CheckpointError, match=r"2 weights missing from it \(e\.g\. classifier"):
        create_protected_model(TINY, key, num_classes=3, checkpoint_path=str(tmp_path / "part.pth"))


def test_timms_optimizer_factory_groups_a_protected_models_parameters_as_the_base_models(key):
    # The base's no_weight_decay() / group_matcher() name its parameters
    # without the wrapper's "model.": a ViT's position embedding and class
    # token got weight decay, and layer-wise decay put every parameter in
    # one group ("Layer-wise lr decay has no effect").
    import timm.optim

    def groups(optimizer):
        return sorted((len(g["params"]), g["weight_decay"], round(g.get("lr_scale", 1.0), 6))
                      for g in optimizer.param_groups)

    for name, kwargs in (("vit_tiny_patch16_224", TINY_VIT), (TINY, {})):
        base = timm.create_model(name, **kwargs)
        protected = wrap_model(timm.create_model(name, **kwargs), key)
        for layer_decay in (None, 0.65):
            expected = timm.optim.create_optimizer_v2(base, "adamw", weight_decay=0.05, layer_decay=layer_decay)
            got = timm.optim.create_optimizer_v2(protected, "adamw", weight_decay=0.05, layer_decay=layer_decay)
            assert groups(got) == groups(expected) and len(expected.param_groups) > 1, (name, layer_decay)
    vit = wrap_model(timm.create_model("vit_tiny_patch16_224", **TINY_VIT), key)
    assert "model.pos_embed" in vit.no_weight_decay() and "model.cls_token" in vit.no_weight_decay()


def test_timms_default_cfg_stays_the_same_dict_as_pretrained_cfg(key):
    # create_protected_model replaced pretrained_cfg (the size the model is
    # fed) and left timm's alias default_cfg at 224.
    model = create_protected_model(TINY, key, num_classes=3, input_size=64)
    assert model.default_cfg is model.pretrained_cfg and model.default_cfg["input_size"] == (3, 64, 64)


def test_a_model_built_for_one_size_refuses_other_sizes_with_a_typed_error(key):
    # timm's bare "AssertionError: Input height (64) doesn't match model (32)."
    model = create_protected_model("vit_tiny_patch16_224", key, **TINY_VIT)
    with pytest.raises(BlockSizeError, match=r"images are 64x64 but .* takes 32x32 images only .*; resize them to 32x32"):
        model(torch.rand(1, 3, 64, 64))
    with pytest.raises(BlockSizeError, match="takes 32x32 images only"):
        model.forward_features(torch.rand(1, 3, 64, 64))
    dynamic = create_protected_model("vit_tiny_patch16_224", key, dynamic_img_size=True, **TINY_VIT)
    assert dynamic(torch.rand(1, 3, 64, 64)).shape == (1, 1000)  # timm interpolates: any size


def _same_outputs_after_reload(model, directory, key, images) -> None:
    model.eval()
    save_protected(model, directory)
    with torch.no_grad():
        torch.testing.assert_close(load_protected_timm(directory, key).eval()(images), model(images))


@pytest.mark.parametrize("how", ["created with max", "reset to max", "reset to none"])
def test_a_cnns_global_pool_is_recorded_and_rebuilt(tmp_path, key, how):
    # timm keeps a CNN's pooling in a module (SelectAdaptivePool2d), not a
    # string: it was not recorded, and the model came back with average
    # pooling (other logits; with no pooling, (B, C) instead of (B, C, h, w)).
    base = timm.create_model(TINY, num_classes=3, **({"global_pool": "max"} if how == "created with max" else {}))
    if how == "reset to max":
        base.reset_classifier(4, global_pool="max")
    elif how == "reset to none":
        base.reset_classifier(0, global_pool="")
    _same_outputs_after_reload(wrap_model(base, key, input_size=(3, 64, 64)), tmp_path, key, torch.rand(2, 3, 64, 64))
    recorded = json.loads((tmp_path / "config.json").read_text())["global_pool"]
    assert recorded == ("" if how == "reset to none" else "max")


def test_a_vits_pool_changed_by_reset_classifier_is_rebuilt(tmp_path, key):
    # Average pooling moves ViT's final norm after the pool (fc_norm): the
    # weights did not fit a ViT rebuilt with global_pool="avg" alone.
    base = timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_VIT)
    base.reset_classifier(5, global_pool="avg")
    _same_outputs_after_reload(wrap_model(base, key), tmp_path, key, torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("timm_record", [True, False], ids=["timm's record", "no timm record"])
def test_a_wrapped_vit_made_for_another_size_is_recorded_at_it_and_reloads(tmp_path, key, timm_record):
    # timm's pretrained_cfg still says 224: the model was recorded (and
    # exported) for 224, and its img_size was not in config.json, so the
    # rebuilt ViT's position embeddings did not fit the weights.
    # Without timm's record (older timm) only the image size is read off the
    # patch embedding: the rest must be the architecture's own.
    base = timm.create_model("vit_tiny_patch16_224", num_classes=3, **(TINY_VIT if timm_record else {"img_size": 32}))
    if not timm_record:
        del base._model_args
    model = wrap_model(base, key)
    assert model.keyed.input_size == (3, 32, 32)
    _same_outputs_after_reload(model, tmp_path, key, torch.rand(2, 3, 32, 32))
    assert json.loads((tmp_path / "protection.json").read_text())["input_size"] == [3, 32, 32]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["img_size"] == 32 and config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_a_key_for_other_channels_than_in_chans_is_refused_with_an_input_size_too(key):
    # With input_size=32 the size was built from the key's 3 channels and
    # accepted; the first batch then failed in the model's first convolution.
    with pytest.raises(ConfigurationError, match="1-channel images but the key is for 3"):
        create_protected_model(TINY, key, in_chans=1, num_classes=3, input_size=32)


def test_pretrained_lite0_without_a_classifier_gives_the_pooled_features(key, tmp_path):
    # timm's num_classes=0 was refused ("must be at least 1").
    from kp_plugin.pretrained import load_efficientnet_lite0

    model = create_protected_model("tf_efficientnet_lite0", key, pretrained=True, num_classes=0, input_size=32).eval()
    imagenet = load_efficientnet_lite0()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = imagenet.forward_head(imagenet.forward_features(model.keyed(images)), pre_logits=True)
        torch.testing.assert_close(model(images), features)
    _same_outputs_after_reload(model, tmp_path, key, images)


def test_pretrained_lite0_as_a_feature_extractor_has_the_imagenet_backbone(key, tmp_path):
    # features_only=True was a CheckpointError: the weights' head did not fit.
    from kp_plugin.pretrained import load_efficientnet_lite0

    model = create_protected_model("tf_efficientnet_lite0", key, pretrained=True, features_only=True,
                                   out_indices=(1, 3), input_size=32).eval()
    imagenet = load_efficientnet_lite0()
    assert torch.equal(model.unwrap().blocks[3][0].conv_pw.weight, imagenet.blocks[3][0].conv_pw.weight)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert [tuple(t.shape) for t in model(images)] == [(2, 24, 8, 8), (2, 112, 2, 2)]
        save_protected(model, tmp_path)
        for saved, loaded in zip(model(images), load_protected_timm(tmp_path, key).eval()(images)):
            torch.testing.assert_close(loaded, saved)


def test_the_protected_model_says_its_mean_std_and_input_size():
    # Issue 3: create_protected_model returns a ProtectedModel with mean, std
    # and input size from pretrained_cfg; at 7395215 model.mean raised
    # AttributeError (the fall-through reached the timm model, which has none).
    model = create_protected_model("resnet18", SecretKey.generate(block_size=16), num_classes=3)
    cfg = model.unwrap().pretrained_cfg
    assert tuple(model.mean) == pytest.approx(cfg["mean"]) and tuple(model.std) == pytest.approx(cfg["std"])
    assert tuple(model.input_size) == tuple(cfg["input_size"])
    with pytest.raises(AttributeError):
        model.no_such_setting


@pytest.mark.parametrize("field, value", [("num_classes", "ten"), ("architecture", 5),
                                          ("model_args", {"in_chans": "x"})])
def test_a_corrupt_timm_config_json_is_a_checkpoint_error(key, tmp_path, field, value):
    # Each raised a bare TypeError / AttributeError / ValueError (a CLI
    # traceback) from timm.create_model or the class count check.
    save_protected(create_protected_model(TINY, key, num_classes=4), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json"):
        load_protected_timm(tmp_path, key)


_FETCH_PRETRAINED = """
import sys, torch
from kp_plugin import SecretKey
from kp_plugin.errors import PretrainedWeightsError
from kp_plugin.timm import create_protected_model
try:
    model = create_protected_model("test_efficientnet", SecretKey.generate(block_size=8), pretrained=True)
except PretrainedWeightsError as exc:
    print("refused:", exc)
else:
    print("loaded:", float(model.unwrap().conv_stem.weight.sum()))
"""


def _fetch_pretrained(tmp_path, home):
    import subprocess
    import sys

    from hub_servers import free_port

    root = str(Path(__file__).resolve().parent.parent)  # this checkout's kp_plugin
    env = {**os.environ, "HF_HOME": str(home), "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",  # a closed port
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", _FETCH_PRETRAINED], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip(), done.stderr


def test_an_unreachable_hub_fails_at_once_or_uses_the_cached_weights(tmp_path):
    # huggingface_hub retried a Hub it could not reach for 48 s (74 s when
    # DNS failed) before the error; a probe first says so at once, in words.
    said, log = _fetch_pretrained(tmp_path, tmp_path / "empty-home")
    assert said.startswith("refused:") and "cannot be reached" in said and "not in the local cache" in said
    assert "Retrying" not in log
    # Weights fetched before are used from the cache, without requests.
    from safetensors.torch import save_file

    repo = tmp_path / "home" / "hub" / "models--timm--test_efficientnet.r160_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    weights = {name: torch.full_like(value, 0.5) if name == "conv_stem.weight" else value.contiguous()
               for name, value in timm.create_model("test_efficientnet").state_dict().items()}
    save_file(weights, snapshot / "model.safetensors")
    said, log = _fetch_pretrained(tmp_path, tmp_path / "home")
    assert said == f"loaded: {float(weights['conv_stem.weight'].sum())}"
    assert "Retrying" not in log
