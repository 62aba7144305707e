"""Smoke test of integrations/transformers/finetune_keyed.py: it trains,
saves without the key, and classifies through pipeline with both keys."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kp_plugin import SecretKey
from kp_plugin.checkpoint import find_key_material

RECIPE = Path(__file__).resolve().parents[1] / "integrations" / "transformers" / "finetune_keyed.py"


def _recipe():
    spec = importlib.util.spec_from_file_location("finetune_keyed", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::kp_plugin.hf.ProtectionMarginWarning")  # a few steps: no margin yet
def test_recipe_runs_and_publishes_nothing_secret(tmp_path):
    torch.set_num_threads(1)
    key_file = tmp_path / "owner.key"
    # An existing key decides the block size (and so the offline ViT's
    # patch): before, --block-size 4 (the default) was kept beside a key of 8.
    SecretKey.generate(block_size=8).save(key_file)
    out = tmp_path / "out"
    results = _recipe().run(str(out), key_file=str(key_file), epochs=1, train_limit=96, test_limit=32, wrong_keys=2)
    assert json.loads((out / "model" / "config.json").read_text())["patch_size"] == 8
    assert {"right_key_accuracy", "wrong_key_accuracy", "protection"} <= set(results)
    assert 0.0 <= results["wrong_key_accuracy"] <= 1.0
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in (out / "model").iterdir()}
    assert find_key_material(out, SecretKey.load(key_file)) == []
