"""`kp evaluate` and `kp attack` on a transformers checkpoint (a tiny ViT
written by save_protected): the architecture is rebuilt from its own
config.json, and the report matches the model evaluated in process."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from hf_fixtures import BLOCK_SIZE, IMAGE_SIZE, tiny_vit  # noqa: E402
from kp_plugin import SecretKey, save_protected, wrap_model  # noqa: E402
from kp_plugin.autoload import load_protected_auto, native_library  # noqa: E402
from kp_plugin.checkpoint import find_key_material  # noqa: E402
from kp_plugin.cli import main  # noqa: E402
from kp_plugin.data import load_dataset  # noqa: E402
from kp_plugin.errors import CheckpointError, KeyMismatchError  # noqa: E402
from kp_plugin.train import TrainConfig, evaluate_accuracy, fit  # noqa: E402


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-cli")
    key = SecretKey.generate(block_size=BLOCK_SIZE)
    key.save(root / "owner.key")
    model = wrap_model(tiny_vit(), key, mean=(0.5,) * 3, std=(0.5,) * 3)
    train = load_dataset("digits", split="train", image_size=IMAGE_SIZE)
    fit(model, train, config=TrainConfig(epochs=2, lr=2e-3), device="cpu", progress=False)
    save_protected(model.eval(), root / "model")
    test = load_dataset("digits", split="test", image_size=IMAGE_SIZE)
    return root, key, evaluate_accuracy(model, test)


def test_load_protected_auto_rebuilds_the_transformers_class(hf_checkpoint):
    root, key, accuracy = hf_checkpoint
    assert native_library(root / "model") == "transformers"
    model = load_protected_auto(root / "model", key)
    assert type(model.unwrap()).__name__ == "ViTForImageClassification"
    test = load_dataset("digits", split="test", image_size=IMAGE_SIZE)
    assert evaluate_accuracy(model, test) == pytest.approx(accuracy)
    with pytest.raises(KeyMismatchError):
        load_protected_auto(root / "model", SecretKey.generate_like(key))


def test_only_a_model_class_named_by_config_json_is_built(hf_checkpoint, tmp_path, monkeypatch):
    # The architectures list comes from a file a Hub repository chose: a name
    # that is not a model class (here transformers.pipeline) is never called.
    import shutil

    import transformers

    root, key, accuracy = hf_checkpoint
    shutil.copytree(root / "model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["architectures"] = ["pipeline", "ViTForImageClassification"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(transformers, "pipeline", lambda *a, **k: pytest.fail("a non-model name was called"))
    model = load_protected_auto(tmp_path / "model", key)
    assert type(model.unwrap()).__name__ == "ViTForImageClassification"


def test_load_protected_auto_names_the_fix_without_a_native_config(hf_checkpoint, tmp_path):
    root, key, _ = hf_checkpoint
    for path in (root / "model").iterdir():
        if path.name != "config.json" and path.is_file():
            (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(CheckpointError, match="pass model="):
        load_protected_auto(tmp_path, key)


def test_kp_evaluate_reports_a_transformers_checkpoint(hf_checkpoint, capsys):
    root, key, accuracy = hf_checkpoint
    out = root / "report"
    code = main(["evaluate", str(root / "model"), "--key", str(root / "owner.key"), "--data", "digits",
                 "--wrong-keys", "5", "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["key_accuracy"] == pytest.approx(accuracy)
    assert len(report["wrong_key_accuracies"]) == 5
    assert find_key_material(out, key) == []


def test_kp_attack_runs_on_a_transformers_checkpoint(hf_checkpoint, capsys):
    root, key, _ = hf_checkpoint
    out = root / "attack"
    code = main(["attack", str(root / "model"), "--key", str(root / "owner.key"), "--data", "digits",
                 "--attacks", "wrong_keys,weight_matching", "--budget", "smoke", "--base-weights", "random",
                 "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert set(report["attacks"]) == {"wrong_keys", "weight_matching"}
    assert report["attacks"]["weight_matching"]["layer_kind"].startswith("patch")
    assert find_key_material(out, key) == []


def test_kp_attack_asks_for_the_public_base_of_a_transformers_checkpoint(hf_checkpoint, capsys):
    root, _, _ = hf_checkpoint
    code = main(["attack", str(root / "model"), "--key", str(root / "owner.key"), "--data", "digits",
                 "--attacks", "finetune", "--budget", "smoke", "--quiet"])
    assert code == 1
    assert "--base ID_OR_DIR" in capsys.readouterr().err


def test_kp_attack_takes_a_transformers_base_from_a_directory(hf_checkpoint, tmp_path, capsys):
    root, _, _ = hf_checkpoint
    torch.manual_seed(1)
    tiny_vit(num_labels=3).save_pretrained(tmp_path / "base")  # another head size: replaced for the task
    out = root / "attack-base"
    code = main(["attack", str(root / "model"), "--key", str(root / "owner.key"), "--data", "digits",
                 "--attacks", "weight_matching", "--budget", "smoke", "--base", str(tmp_path / "base"),
                 "-o", str(out), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "weight_matching" in json.loads((out / "report.json").read_text())["attacks"]
