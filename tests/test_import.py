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


def test_every_error_and_warning_of_the_package_is_defined_in_kp_plugin_errors():
    # They were spread over the adapters (kp_plugin.timm.PretrainedWeightsError,
    # kp_plugin.data.DatasetError, the Hub's errors, ...): catching one meant
    # importing its adapter, and kp_plugin.errors did not list them. Now every
    # one is defined there (as huggingface_hub.errors does) and re-exported by
    # its adapter as the same class.
    import importlib
    import inspect
    import pkgutil

    import kp_plugin.errors as errors

    defined_elsewhere, seen = [], 0
    for info in pkgutil.walk_packages(kp_plugin.__path__, "kp_plugin."):
        if info.name.endswith("__main__"):
            continue
        try:
            module = importlib.import_module(info.name)
        except ImportError as exc:  # an adapter whose library is not installed
            if (exc.name or "").split(".")[0] in HEAVY:
                continue
            raise
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, (kp_plugin.KPError, Warning)) \
                    and value.__module__.startswith("kp_plugin"):
                seen += 1
                if value.__module__ != "kp_plugin.errors" or getattr(errors, name, None) is not value:
                    defined_elsewhere.append(f"{info.name}.{name}")
    assert seen > 20 and not defined_elsewhere
    assert {"DatasetError", "PretrainedWeightsError", "HubError", "AttackError", "KeyRequiredError"} <= set(errors.__all__)
    assert all(issubclass(getattr(errors, n), kp_plugin.KPError) for n in errors.__all__ if n.endswith("Error"))


def test_docstring_examples_of_every_module_run(tmp_path, monkeypatch):
    # Every module, not only the core's: three examples elsewhere had gone
    # stale (a name used without its skipped definition, an unshown result).
    import doctest
    import importlib
    import pkgutil

    monkeypatch.chdir(tmp_path)  # examples that write files write here
    names = [info.name for info in pkgutil.walk_packages(kp_plugin.__path__, "kp_plugin.")]
    names = [name for name in names if not name.endswith("__main__")]
    assert {"kp_plugin.keys", "kp_plugin.hf.callback", "kp_plugin.attacks.weight_matching"} <= set(names)
    tried = 0
    for name in ["kp_plugin", *names]:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an adapter whose library is not installed (core-only install)
            if (exc.name or "").split(".")[0] in HEAVY:
                continue
            raise
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, name
        tried += result.attempted
    assert tried > 0


def test_the_core_declares_numpy_which_safetensors_needs_to_write_tensors():
    # torch and safetensors were the only dependencies, but neither declares
    # NumPy and safetensors.torch.save_file imports it: in a fresh venv with
    # `pip install kp-plugin`, save_protected failed with ModuleNotFoundError.
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    core = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    names = {re.match(r"[A-Za-z0-9_.-]+", item).group(0).lower()
             for item in re.findall(r'^\s*"([^"]+)"', core, re.M)}
    assert names == {"torch", "safetensors", "numpy"}


def test_a_command_missing_an_optional_package_names_the_extra_to_install(tmp_path):
    # kp show / protect / pull without Pillow / timm / huggingface_hub ended in
    # a ModuleNotFoundError traceback.
    code = ("import sys; sys.modules['PIL'] = None; from kp_plugin.cli import main; "
            "sys.exit(main(['show', '--key', 'k.key', 'x.png', '-o', 'y.png']))")
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 1, done.stderr
    assert "kp show: error: this needs PIL, which is not installed; install it with pip install 'kp-plugin[demo]'" \
        in done.stderr and "Traceback" not in done.stderr
    # kp evaluate ran the whole evaluation, then failed on matplotlib for the figures and wrote nothing.
    code = ("import sys; sys.modules['matplotlib'] = None; from kp_plugin.cli import main; "
            "sys.exit(main(['evaluate', 'no-checkpoint-here', '--key', 'k.key']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert done.returncode == 1 and "kp evaluate: error: this needs matplotlib" in done.stderr, done.stderr


def test_python_dash_m_gives_the_same_usage_errors_as_kp(tmp_path):
    # `python -m kp_plugin.cli` ran main() from __main__, whose _UsageError is
    # another class than the handlers raise: a traceback and exit 1, not exit 2.
    import os
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for module in ("kp_plugin.cli", "kp_plugin"):
        done = subprocess.run([sys.executable, "-m", module, "export", "out", "-o", "deploy", "--format", "pt2",
                               "--opset", "17"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
        assert done.returncode == 2, (module, done.stderr)
        assert "kp export: error: --opset is an ONNX setting" in done.stderr and "Traceback" not in done.stderr
