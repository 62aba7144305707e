"""Smoke test of integrations/export/serve_onnx.py: a tiny `kp protect`
checkpoint exported to ONNX and served with onnxruntime behind the key."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kp_plugin import SecretKey
from kp_plugin.checkpoint import find_key_material
from kp_plugin.cli import main as kp

pytest.importorskip("timm")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = Path(__file__).resolve().parents[1] / "integrations" / "export" / "serve_onnx.py"


def test_serve_onnx_exports_without_the_key_and_serves_behind_it(tmp_path, capsys):
    key_path, out, deploy = tmp_path / "owner.key", tmp_path / "out", tmp_path / "deploy"
    assert kp(["keygen", "--block-size", "4", "-o", str(key_path)]) == 0
    assert kp(["protect", "--model", "test_efficientnet", "--no-pretrained", "--data", "digits", "--image-size",
               "16", "--epochs", "1", "--quiet", "--device", "cpu", "--key", str(key_path), "-o", str(out)]) == 0
    spec = importlib.util.spec_from_file_location("serve_onnx", RECIPE)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    capsys.readouterr()

    assert recipe.main(["--checkpoint", str(out), "--key", str(key_path), "--deploy", str(deploy),
                        "--limit", "64"]) == 0
    printed = capsys.readouterr().out
    assert "digits test split, 64 images" in printed
    rows = {line.rsplit(None, 1)[0].strip(): float(line.rsplit(None, 1)[1].rstrip("%"))
            for line in printed.splitlines() if line.startswith("  ")}
    assert set(rows) == {"ONNX, with the key", "ONNX, a random wrong key", "ONNX, plain images (no key)",
                         "PyTorch checkpoint, with the key"}
    # The same model: at most one of 64 argmaxes may differ on float rounding.
    assert abs(rows["ONNX, with the key"] - rows["PyTorch checkpoint, with the key"]) <= 100 / 64 + 1e-9
    assert sorted(p.name for p in deploy.iterdir()) == ["model.onnx", "protection.json"]
    assert find_key_material(deploy, SecretKey.load(key_path)) == []
