"""A transformers model through the Hub: the repository holds transformers'
own config.json and preprocessor_config.json, and pull rebuilds the class."""

from __future__ import annotations

import json

import pytest
import torch

from hub_servers import isolate_hub_client, test_hub  # noqa: F401 - fixtures
from kp_plugin import SecretKey, wrap_model
from kp_plugin.checkpoint import find_key_material
from kp_plugin.hub import pull_protected, push_protected

transformers = pytest.importorskip("transformers")

KEY = SecretKey(bytes(range(90, 122)), block_size=8, scheme="shuffle+np", channels=3)


def _tiny_vit():
    """A randomly initialised ViT for 32x32 images, patch 8 (= block size)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=96, num_labels=3)
    return transformers.ViTForImageClassification(config)


def _published(test_hub, repo_id, folder, *names):
    """``names`` of the repository's head, copied into ``folder`` (each
    must be there); the Hub's files hold no key material."""
    files = test_hub.head_files(repo_id)
    assert set(names) <= set(files)
    assert find_key_material(test_hub.root, KEY) == []
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes((test_hub.root / "blobs" / files[name]).read_bytes())
    return folder


def test_vit_round_trip_keeps_logits_and_native_files(test_hub, isolate_hub_client):
    from kp_plugin.hf import KeyedImageProcessor

    model = wrap_model(_tiny_vit(), KEY, mean=0.5, std=0.5, input_size=(3, 32, 32)).eval()
    processor = KeyedImageProcessor(transformers.ViTImageProcessor(size={"height": 32, "width": 32}), KEY)
    push_protected(model, "org/vit", processor=processor,
                   token=test_hub.token, endpoint=test_hub.url)

    files = test_hub.head_files("org/vit")
    config = json.loads((test_hub.root / "blobs" / files["config.json"]).read_text())
    assert config["model_type"] == "vit" and len(config["id2label"]) == 3
    assert "preprocessor_config.json" in files
    assert find_key_material(test_hub.root, KEY) == []

    pulled = pull_protected("org/vit", KEY, token=test_hub.token, endpoint=test_hub.url,
                            cache_dir=isolate_hub_client).eval()
    assert type(pulled.unwrap()).__name__ == "ViTForImageClassification"
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images).logits, model(images).logits)


def test_a_processor_keyed_with_another_key_is_refused_before_sending(test_hub, isolate_hub_client):
    # It was published: the owner's key then could not load the repository's
    # processor (KeyMismatchError on from_pretrained).
    from kp_plugin import KeyMismatchError
    from kp_plugin.hf import KeyedImageProcessor

    model = wrap_model(_tiny_vit(), KEY, mean=0.5, std=0.5, input_size=(3, 32, 32))
    other = KeyedImageProcessor(transformers.ViTImageProcessor(size={"height": 32, "width": 32}),
                                SecretKey.generate_like(KEY))
    before = len(test_hub.received())
    with pytest.raises(KeyMismatchError, match="Nothing was sent"):
        push_protected(model, "org/vit-other", processor=other, token=test_hub.token, endpoint=test_hub.url)
    assert test_hub.received()[before:] == []


def test_wrap_hf_models_processor_is_published_keyed_without_processor_argument(test_hub, isolate_hub_client,
                                                                                   tmp_path):
    # Only processor= published preprocessor_config.json; the processor given
    # to wrap_hf_model was dropped.
    from kp_plugin.hf import KeyedImageProcessor, wrap_hf_model

    base = transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    model = wrap_hf_model(_tiny_vit(), KEY, image_processor=base)
    push_protected(model, "org/vit-processor", token=test_hub.token, endpoint=test_hub.url)
    folder = _published(test_hub, "org/vit-processor", tmp_path / "pulled", "preprocessor_config.json")
    processor = KeyedImageProcessor.from_pretrained(str(folder), key=KEY)
    assert processor.key.fingerprint == KEY.fingerprint
    # save_pretrained(push_to_hub=True) published the folder alone: no processor.
    model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="org/vit-saved-and-pushed",
                          token=test_hub.token, endpoint=test_hub.url)
    assert "preprocessor_config.json" in test_hub.head_files("org/vit-saved-and-pushed")
    assert find_key_material(test_hub.root, KEY) == []


def test_a_config_that_names_its_own_code_is_refused_without_a_prompt(tmp_path, monkeypatch):
    # Before, AutoConfig.from_pretrained ran without trust_remote_code=False:
    # transformers asked on stdin, and on "y" ran the repository's .py file
    # (pull_protected, kp evaluate and kp attack all load through here).
    from kp_plugin import CheckpointError, save_protected
    from kp_plugin.autoload import load_protected_auto

    folder = save_protected(wrap_model(_tiny_vit(), KEY, mean=0.5, std=0.5, input_size=(3, 32, 32)), tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                    "from transformers import ViTConfig\n"
                                    "class EvilConfig(ViTConfig):\n    model_type = 'evil'\n")
    asked = []
    monkeypatch.setattr("builtins.input", lambda *args: asked.append(args) or "y")
    with pytest.raises(CheckpointError, match="never runs"):
        load_protected_auto(folder, KEY)
    assert asked == [] and not marker.exists()


def test_a_transformers_model_pushed_without_a_processor_gets_its_architectures_keyed_one(test_hub, isolate_hub_client,
                                                                                          tmp_path):
    # Issue 5: the repository holds transformers' config.json and
    # preprocessor_config.json for HF models. At 7395215 there was none
    # unless a processor was given: the processor-style route (plain model
    # + keyed processor, pipeline) had nothing to load.
    from kp_plugin.hf import KeyedImageProcessor

    model = wrap_model(_tiny_vit(), KEY, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), input_size=(3, 32, 32)).eval()
    push_protected(model, "org/vit-no-processor", token=test_hub.token, endpoint=test_hub.url)
    folder = _published(test_hub, "org/vit-no-processor", tmp_path / "pulled", "preprocessor_config.json",
                        "config.json", "model.safetensors")
    processor = KeyedImageProcessor.from_pretrained(str(folder), key=KEY)
    assert type(processor.image_processor).__name__.startswith("ViTImageProcessor")
    plain = transformers.ViTForImageClassification.from_pretrained(str(folder)).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        processor_style = plain(**processor(images, do_rescale=False)).logits
        torch.testing.assert_close(processor_style, model(images).logits, rtol=1e-4, atol=1e-4)
    # A directory pushed with its key gets one too; without the key there is nothing to key it with.
    model.save_pretrained(tmp_path / "saved")
    push_protected(tmp_path / "saved", "org/vit-folder", key=KEY, token=test_hub.token, endpoint=test_hub.url)
    assert "preprocessor_config.json" in test_hub.head_files("org/vit-folder")
