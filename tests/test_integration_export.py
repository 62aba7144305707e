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


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, one_thread):
    """A tiny `kp protect` checkpoint and its key file."""
    folder = tmp_path_factory.mktemp("protected")
    key_path, out = folder / "owner.key", folder / "out"
    assert kp(["keygen", "--block-size", "4", "-o", str(key_path)]) == 0
    assert kp(["protect", "--model", "test_efficientnet", "--no-pretrained", "--data", "digits", "--image-size",
               "16", "--epochs", "1", "--quiet", "--device", "cpu", "--key", str(key_path), "-o", str(out)]) == 0
    return key_path, out


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("serve_onnx", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serve_onnx_exports_without_the_key_and_serves_behind_it(checkpoint, recipe, tmp_path, capsys):
    (key_path, out), deploy = checkpoint, tmp_path / "deploy"
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


def test_serve_onnx_with_no_images_prints_zeros_instead_of_dividing_by_zero(checkpoint, recipe, tmp_path, capsys):
    # --limit 0: the ONNX rows raised ZeroDivisionError (the PyTorch row was guarded).
    key_path, out = checkpoint
    capsys.readouterr()
    assert recipe.main(["--checkpoint", str(out), "--key", str(key_path), "--deploy", str(tmp_path / "deploy"),
                        "--limit", "0"]) == 0
    printed = capsys.readouterr().out
    assert "digits test split, 0 images" in printed
    assert [line.split()[-1] for line in printed.splitlines() if line.startswith("  ")] == ["0.0%"] * 4


def test_serve_onnx_serves_an_imagefolder_test_split(checkpoint, recipe, tmp_path, capsys):
    # Before: AttributeError ('ImageFolderDataset' object has no attribute
    # 'images') for every folder dataset, after model.onnx was written.
    import numpy as np
    from PIL import Image

    from kp_plugin.data import load_dataset

    key_path, out = checkpoint
    digits = load_dataset("digits", split="test", image_size=16)
    for i in range(30):
        image, label = digits[i]
        folder = tmp_path / "folder" / "test" / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i}.png")
    for label in range(10):  # every class folder, as kp protect trained on ten
        (tmp_path / "folder" / "test" / str(label)).mkdir(parents=True, exist_ok=True)
    capsys.readouterr()
    assert recipe.main(["--checkpoint", str(out), "--key", str(key_path), "--deploy", str(tmp_path / "deploy"),
                        "--data", str(tmp_path / "folder"), "--limit", "20"]) == 0
    printed = capsys.readouterr().out
    assert "test split, 20 images" in printed
    assert len([line for line in printed.splitlines() if line.startswith("  ")]) == 4


def test_serve_onnx_with_another_key_is_one_line_and_the_kp_exit_code(checkpoint, recipe, tmp_path, capsys,
                                                                         monkeypatch):
    # Before: a KeyMismatchError traceback and exit 1 (kp says one line, exit 3).
    from kp_plugin import SecretKey
    from kp_plugin.cli import run_script

    key_path, out = checkpoint
    other = tmp_path / "other.key"
    SecretKey.generate_like(SecretKey.load(key_path)).save(other)
    monkeypatch.setattr("sys.argv", ["serve_onnx.py", "--checkpoint", str(out), "--key", str(other),
                                     "--deploy", str(tmp_path / "deploy")])
    capsys.readouterr()
    assert run_script(recipe.main, "serve_onnx") == 3
    printed = capsys.readouterr()
    assert printed.err.startswith("serve_onnx: KeyMismatchError: ") and "Traceback" not in printed.err
    assert not (tmp_path / "deploy").exists()
