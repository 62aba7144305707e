"""``kp push`` / ``kp pull`` against the loopback test Hub, through kp's main."""

from __future__ import annotations

import pytest
import torch

from hub_servers import CLOSED_ENDPOINT, isolate_hub_client, test_hub  # noqa: F401 - fixtures
from kp_plugin import SecretKey, save_protected, wrap_model
from kp_plugin.cli import main

timm = pytest.importorskip("timm")

KEY = SecretKey(bytes(range(130, 162)), block_size=8, scheme="shuffle+np", channels=3)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(2)
    model = wrap_model(timm.create_model("test_resnet", num_classes=3), KEY)
    return save_protected(model, tmp_path / "out")


@pytest.fixture
def key_file(tmp_path):
    return KEY.save(tmp_path / "owner.key")


def test_push_then_pull_from_the_shell(test_hub, checkpoint, key_file, tmp_path, monkeypatch, capsys,
                                       isolate_hub_client):
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    assert main(["push", str(checkpoint), "org/cli", "--key", str(key_file), "--endpoint", test_hub.url]) == 0
    assert "(private)" in capsys.readouterr().out
    assert test_hub.repo_state("org/cli")["private"] is True

    monkeypatch.setenv("KP_KEY", key_file.read_text())
    out = tmp_path / "pulled"
    assert main(["pull", "org/cli", "-o", str(out), "--endpoint", test_hub.url]) == 0
    assert f"key {KEY.fingerprint} matches" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_pull_exit_codes_name_the_problem(test_hub, checkpoint, key_file, tmp_path, monkeypatch, capsys,
                                          isolate_hub_client):
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    assert main(["push", str(checkpoint), "org/cli-codes", "--key", str(key_file), "--endpoint", test_hub.url]) == 0
    wrong = SecretKey.generate_like(KEY).save(tmp_path / "wrong.key")
    assert main(["pull", "org/cli-codes", "--key", str(wrong), "--endpoint", test_hub.url]) == 3
    err = capsys.readouterr().err  # the library's remedy named the Python-only allow_wrong_key=True
    assert "allow_wrong_key" not in err and "kp evaluate --wrong-keys" in err
    assert main(["pull", "org/cli-none", "--key", str(key_file), "--endpoint", test_hub.url]) == 1
    assert "does not exist" in capsys.readouterr().err
    monkeypatch.delenv("KP_KEY", raising=False)
    assert main(["pull", "org/cli-codes", "--endpoint", test_hub.url]) == 4


def test_pull_into_a_folder_of_another_keys_model_is_refused(test_hub, checkpoint, key_file, tmp_path, monkeypatch,
                                                              capsys, isolate_hub_client):
    # kp pull -o copied over it (exit 0): that model was lost.
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    assert main(["push", str(checkpoint), "org/cli-over", "--key", str(key_file), "--endpoint", test_hub.url]) == 0
    other = SecretKey.generate_like(KEY)
    save_protected(wrap_model(timm.create_model("test_resnet", num_classes=3), other), tmp_path / "mine")
    before = {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()}
    assert main(["pull", "org/cli-over", "--key", str(key_file), "--endpoint", test_hub.url,
                 "-o", str(tmp_path / "mine")]) == 5
    assert "another key" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "mine").iterdir()} == before


def test_pull_into_a_folder_of_other_files_is_refused_and_a_failed_copy_changes_nothing(
        test_hub, checkpoint, key_file, tmp_path, monkeypatch, capsys, isolate_hub_client):
    # kp pull -o replaced the user's config.json there without a word (exit
    # 0), and a copy failing halfway left half a checkpoint (exit 1).
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    assert main(["push", str(checkpoint), "org/cli-files", "--key", str(key_file), "--endpoint", test_hub.url]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "notes.txt").write_text("notes")
    pull = ["pull", "org/cli-files", "--key", str(key_file), "--endpoint", test_hub.url, "-o"]
    assert main(pull + [str(mine)]) == 1
    assert "not empty and holds no protected checkpoint" in capsys.readouterr().err
    assert (mine / "config.json").read_text() == '{"mine": true}' and len(list(mine.iterdir())) == 2

    same = tmp_path / "same"  # this key's checkpoint: replaced, as one change
    save_protected(wrap_model(timm.create_model("test_resnet", num_classes=3), KEY), same)
    before = {p.name: p.read_bytes() for p in same.iterdir()}
    monkeypatch.setattr("kp_plugin.checkpoint.os.replace", _failing_for("protection.json"))  # after the weights
    assert main(pull + [str(same)]) == 5
    assert "what was there is unchanged" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in same.iterdir()} == before
    monkeypatch.undo()
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    assert main(pull + [str(same)]) == 0
    assert (same / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_pull_into_a_checkpoint_removes_the_temporaries_a_killed_pull_left(
        test_hub, checkpoint, key_file, tmp_path, monkeypatch, isolate_hub_client):
    # A kp pull -o killed while copying left its .NAME.PID.XXXX.tmp files in
    # the folder for good: later pulls into it did not sweep them, as saves do.
    import os
    import subprocess
    import sys

    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    assert main(["push", str(checkpoint), "org/cli-stale", "--key", str(key_file), "--endpoint", test_hub.url]) == 0
    same = tmp_path / "same"
    save_protected(wrap_model(timm.create_model("test_resnet", num_classes=3), KEY), same)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = same / f".model.safetensors.{int(ended.stdout)}.0a1b2c3d.tmp"
    live = same / f".model.safetensors.{os.getppid()}.0a1b2c3d.tmp"
    for path in (stale, live):
        path.write_bytes(b"half a weights file")
    assert main(["pull", "org/cli-stale", "--key", str(key_file), "--endpoint", test_hub.url, "-o", str(same)]) == 0
    assert not stale.exists() and live.exists()
    assert (same / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def _failing_for(name):
    """os.replace failing once, for the first rename onto ``name`` (a full disk)."""
    import os

    real, failed = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(name) and not failed:
            failed.append(dst)
            raise OSError(28, "No space left on device")
        return real(src, dst, *args, **kwargs)
    return replace


def test_push_refuses_a_folder_holding_the_key_file(test_hub, checkpoint, capsys, monkeypatch, isolate_hub_client):
    monkeypatch.setenv("HF_TOKEN", test_hub.token)
    KEY.save(checkpoint / "owner.key")
    before = len(test_hub.received())
    assert main(["push", str(checkpoint), "org/cli-leak", "--endpoint", test_hub.url]) == 1
    assert "owner.key" in capsys.readouterr().err
    assert test_hub.received()[before:] == []


def test_a_repository_id_the_hub_refuses_is_a_one_line_error(checkpoint, key_file, capsys, isolate_hub_client):
    # A traceback ending in huggingface_hub's HFValidationError.
    for argv in (["push", str(checkpoint), "bad repo id!!"], ["pull", "bad repo id!!"]):
        assert main([*argv, "--key", str(key_file), "--endpoint", CLOSED_ENDPOINT]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and "org/name" in err


def test_push_and_pull_help_carry_an_example(capsys):
    for command in ("push", "pull"):
        assert main([command, "--help"]) == 0
        assert "example:" in capsys.readouterr().out
