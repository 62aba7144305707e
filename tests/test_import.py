"""``import kp_plugin`` stays light and exposes the public names."""

from __future__ import annotations

import subprocess
import sys

import kp_plugin

HEAVY = ("timm", "transformers", "huggingface_hub", "torchvision", "datasets", "accelerate")


def test_importing_the_core_imports_no_adapter_library():
    code = (
        "import sys, kp_plugin, kp_plugin.keys, kp_plugin.transforms, kp_plugin.module, kp_plugin.checkpoint\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_names_are_importable_from_the_package():
    for name in (
        "SecretKey", "KeyedInput", "ProtectedModel", "wrap_model", "unwrap", "save_protected",
        "load_protected", "ProtectionConfig", "KPError", "KeyFileError", "KeyMismatchError",
        "CheckpointError", "InputRangeError", "InputDtypeError", "BlockSizeError",
        "ConfigurationError", "KeyLeakError", "DEFAULT_SCHEME", "PAPER_SCHEME",
    ):
        assert name in kp_plugin.__all__ and getattr(kp_plugin, name) is not None


def test_every_error_is_a_kp_error():
    errors = [getattr(kp_plugin, n) for n in kp_plugin.__all__ if n.endswith("Error")]
    assert len(errors) >= 8 and all(issubclass(e, kp_plugin.KPError) for e in errors)
    assert issubclass(kp_plugin.BlockSizeError, ValueError)
    assert issubclass(kp_plugin.InputRangeError, ValueError)


def test_docstring_examples_of_the_core_run(tmp_path, monkeypatch):
    import doctest

    import kp_plugin.checkpoint
    import kp_plugin.keys
    import kp_plugin.module
    import kp_plugin.transforms

    monkeypatch.chdir(tmp_path)  # examples that write files write here
    for module in (kp_plugin.keys, kp_plugin.transforms, kp_plugin.module, kp_plugin.checkpoint):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
