"""Smoke test of integrations/timm/train_imagefolder.py: timm's own data
pipeline on a tiny ImageFolder written here, a tiny timm model, one step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kp_plugin import SecretKey
from kp_plugin.checkpoint import find_key_material
from kp_plugin.timm import load_protected_timm

SCRIPT = Path(__file__).resolve().parent.parent / "integrations" / "timm" / "train_imagefolder.py"


def write_image_folder(root: Path, held_out: str | None = "val") -> None:
    rng = np.random.default_rng(0)
    for split in ("train", held_out) if held_out else ("train",):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                noise = rng.integers(-25, 25, size=(40, 48, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def run_recipe(tmp_path: Path, *args: str) -> tuple:
    """Run the recipe on tmp_path/data into tmp_path/out with a new key:
    (the finished process, the key)."""
    key = SecretKey.generate(block_size=8)
    key.save(tmp_path / "owner.key")
    cmd = [sys.executable, str(SCRIPT), "--data", str(tmp_path / "data"), "--model", "test_efficientnet", "--key",
           str(tmp_path / "owner.key"), "--output", str(tmp_path / "out"), "--image-size", "32", "--epochs", "1",
           "--workers", "0", "--wrong-keys", "2", "--device", "cpu", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    return done, key


# test/: the held-out folder kp protect reads too; before, the recipe looked
# for val/ only and silently wrote no report.
@pytest.mark.parametrize("held_out", ["val", "test"])
def test_recipe_fine_tunes_a_timm_model_on_an_image_folder_and_saves_it_protected(tmp_path, held_out):
    data, out = tmp_path / "data", tmp_path / "out"
    write_image_folder(data, held_out)
    done, key = run_recipe(tmp_path, "--max-steps", "1", "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1" in done.stdout
    assert "requires_grad" not in done.stderr  # float(loss) of a tensor that requires grad warned every step
    model = load_protected_timm(out, key)
    assert model.keyed.input_size == (3, 32, 32) and model.unwrap().num_classes == 2
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["num_examples"] == 6 and report["num_wrong_keys"] == 2
    assert find_key_material(out, key) == []


def test_recipe_does_not_count_hidden_folders_as_classes(tmp_path):
    write_image_folder(tmp_path / "data", held_out=None)
    (tmp_path / "data" / "train" / ".ipynb_checkpoints").mkdir()
    done, key = run_recipe(tmp_path, "--max-steps", "1", "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_protected_timm(tmp_path / "out", key).unwrap().num_classes == 2


def test_recipe_drops_a_last_training_batch_of_one_image(tmp_path):
    # 6 images in batches of 5 leave one: batch norm cannot train on it.
    write_image_folder(tmp_path / "data", held_out=None)
    done, _ = run_recipe(tmp_path, "--batch-size", "5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(5 images," in done.stdout


def test_recipe_trains_a_training_set_smaller_than_one_batch(tmp_path):
    write_image_folder(tmp_path / "data", held_out=None)
    done, _ = run_recipe(tmp_path, "--batch-size", "8")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "training in batches of 6" in done.stdout and "(6 images," in done.stdout


def test_recipe_refuses_a_folder_without_class_folders_or_a_missing_one(tmp_path):
    # --data data/train/red (images, no class folders) trained and saved a
    # model of 0 classes (exit 0); a missing folder was a raw traceback.
    write_image_folder(tmp_path / "images", held_out=None)
    (tmp_path / "data").symlink_to(tmp_path / "images" / "train" / "red")
    done, _ = run_recipe(tmp_path, "--max-steps", "1")
    assert done.returncode != 0 and "0 class folder(s)" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
    (tmp_path / "data").unlink()
    (tmp_path / "owner.key").unlink()  # run_recipe writes a new key
    done, _ = run_recipe(tmp_path, "--max-steps", "1")
    assert done.returncode != 0 and "is not a folder" in done.stderr and "Traceback" not in done.stderr
