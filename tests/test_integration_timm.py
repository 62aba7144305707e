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


def write_image_folder(root: Path, held_out: str = "val") -> None:
    rng = np.random.default_rng(0)
    for split in ("train", held_out):
        for label, colour in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                noise = rng.integers(-25, 25, size=(40, 48, 3))
                pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


# test/: the held-out folder kp protect reads too; before, the recipe looked
# for val/ only and silently wrote no report.
@pytest.mark.parametrize("held_out", ["val", "test"])
def test_recipe_fine_tunes_a_timm_model_on_an_image_folder_and_saves_it_protected(tmp_path, held_out):
    data, out, key_path = tmp_path / "data", tmp_path / "out", tmp_path / "owner.key"
    write_image_folder(data, held_out)
    key = SecretKey.generate(block_size=8)
    key.save(key_path)
    cmd = [sys.executable, str(SCRIPT), "--data", str(data), "--model", "test_efficientnet", "--key",
           str(key_path), "--output", str(out), "--image-size", "32", "--epochs", "1", "--max-steps", "1",
           "--batch-size", "4", "--workers", "0", "--wrong-keys", "2", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1" in done.stdout
    assert "requires_grad" not in done.stderr  # float(loss) of a tensor that requires grad warned every step
    model = load_protected_timm(out, key)
    assert model.keyed.input_size == (3, 32, 32) and model.unwrap().num_classes == 2
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["num_examples"] == 6 and report["num_wrong_keys"] == 2
    assert find_key_material(out, key) == []
