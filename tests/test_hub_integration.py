"""Smoke tests of integrations/hub: publish, then load "elsewhere" with the
key from KP_KEY, then from the file with HF_HUB_OFFLINE=1, against the
loopback test Hub. The default test runs the scripts' ``main`` in this
process (fast); the slow one runs each in a fresh Python."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub_servers import CLOSED_ENDPOINT, isolate_hub_client, test_hub  # noqa: F401 - fixtures
from kp_plugin import SecretKey
from kp_plugin.checkpoint import find_key_material

pytest.importorskip("timm")

RECIPE = Path(__file__).resolve().parents[1] / "integrations" / "hub"
PUBLISH_ARGS = ["--model", "test_resnet", "--num-classes", "3", "--block-size", "8"]


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"hub_recipe_{name}", RECIPE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_publish_then_load_with_kp_key_and_offline(test_hub, tmp_path, monkeypatch, capsys, isolate_hub_client):
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    key_file = tmp_path / "owner.key"
    assert _script("publish").main(["--repo", "org/recipe", "--key", str(key_file), "--endpoint", test_hub.url,
                                    *PUBLISH_ARGS]) == 0
    assert "published org/recipe (private)" in capsys.readouterr().out
    key = SecretKey.load(key_file)
    assert find_key_material(test_hub.root, key) == []

    load = _script("load")
    monkeypatch.setenv("KP_KEY", key_file.read_text())
    assert load.main(["--repo", "org/recipe", "--endpoint", test_hub.url]) == 0
    assert f"with key {key.fingerprint}" in capsys.readouterr().out

    monkeypatch.delenv("KP_KEY")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(test_hub.received())
    assert load.main(["--repo", "org/recipe", "--key", str(key_file), "--endpoint", CLOSED_ENDPOINT]) == 0
    assert f"with key {key.fingerprint}" in capsys.readouterr().out
    assert test_hub.received()[before:] == []


def _run(script: str, args: list, env: dict) -> str:
    result = subprocess.run([sys.executable, str(RECIPE / script), *args], env=env, capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_publish_then_load_in_fresh_processes(test_hub, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KP_"))}
    env.update(HF_ENDPOINT=test_hub.url, HF_TOKEN=test_hub.token, HF_HUB_DISABLE_XET="1",
               HF_HOME=str(tmp_path / "owner-hf"), OMP_NUM_THREADS="1")
    key_file = tmp_path / "owner.key"
    out = _run("publish.py", ["--repo", "org/published", "--key", str(key_file), *PUBLISH_ARGS], env)
    assert "published org/published (private)" in out
    key = SecretKey.load(key_file)
    assert find_key_material(test_hub.root, key) == []

    elsewhere = dict(env, HF_HOME=str(tmp_path / "user-hf"), KP_KEY=key_file.read_text())
    assert f"with key {key.fingerprint}" in _run("load.py", ["--repo", "org/published"], elsewhere)

    before = len(test_hub.received())
    offline = dict(elsewhere, HF_HUB_OFFLINE="1", HF_ENDPOINT=CLOSED_ENDPOINT)
    del offline["KP_KEY"]
    assert f"with key {key.fingerprint}" in _run("load.py", ["--repo", "org/published", "--key", str(key_file)], offline)
    assert test_hub.received()[before:] == []


def test_an_unreachable_hub_is_one_line_and_kps_exit_code_in_the_recipes(tmp_path):
    # Offline, load.py and publish.py ended in a full traceback.
    SecretKey.generate(block_size=16).save(tmp_path / "owner.key")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "KP_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    for script, args in (("load.py", []), ("publish.py", ["--model", "test_resnet", "--num-classes", "3"])):
        result = subprocess.run([sys.executable, str(RECIPE / script), "--repo", "org/none", "--key",
                                 str(tmp_path / "owner.key"), "--endpoint", CLOSED_ENDPOINT, *args], env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 1, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith(f"{script}: HubUnreachableError: "), result.stderr[-2000:]
