"""The `kp` command end to end on a tiny setting: a real timm model (random
init), the embedded digits at 16x16, one epoch."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kp_plugin import SecretKey
from kp_plugin.checkpoint import find_key_material
from kp_plugin.cli import build_parser, main


pytestmark = pytest.mark.usefixtures("one_thread")


TINY = ["--model", "test_efficientnet", "--no-pretrained", "--data", "digits", "--image-size", "16",
        "--epochs", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def protected(tmp_path_factory):
    """One `kp keygen` + `kp protect --baseline` run shared by the tests."""
    root = tmp_path_factory.mktemp("kp")
    key_path, out = root / "owner.key", root / "out"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--baseline"]) == 0
    return key_path, out


def test_every_subcommand_help_carries_an_example():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert {"keygen", "protect", "evaluate", "show"} <= set(subparsers.choices)
    for name, sub in subparsers.choices.items():
        assert "example:" in sub.format_help() and f"kp {name}" in sub.format_help(), name


def test_keygen_writes_an_owner_only_key_file(tmp_path, capsys):
    path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "4", "--scheme", "shuffle", "-o", str(path)]) == 0
    key = SecretKey.load(path)
    assert (key.block_size, key.scheme_name) == (4, "shuffle")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key.fingerprint in capsys.readouterr().out


def test_keygen_refuses_to_overwrite_a_key_unless_forced(tmp_path, capsys):
    path = tmp_path / "owner.key"
    assert main(["keygen", "-o", str(path)]) == 0
    first = SecretKey.load(path).fingerprint
    assert main(["keygen", "-o", str(path)]) == 4
    assert "--force" in capsys.readouterr().err
    assert SecretKey.load(path).fingerprint == first
    assert main(["keygen", "-o", str(path), "--force"]) == 0
    assert SecretKey.load(path).fingerprint != first


def test_a_usage_error_found_after_parsing_shows_the_subcommands_usage(tmp_path, capsys):
    assert main(["keygen", "--scheme", "rot13", "-o", str(tmp_path / "x.key")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: kp keygen") and "kp keygen: error: unknown scheme step 'rot13'" in err


def test_keygen_never_replaces_a_link_a_device_or_a_pipe_and_never_writes_to_stdout(tmp_path, capsys):
    # --force replaced /dev/null (as root) and a link to /proc/self/fd/1 with
    # a 0600 key file; "-o -" wrote a file named "-"; /dev/stdout was called
    # "a key file".
    link = tmp_path / "owner.key"
    link.symlink_to(tmp_path / "gone.key")
    fifo = tmp_path / "pipe.key"
    os.mkfifo(fifo)
    for target in (link, fifo):
        for force in ([], ["--force"]):
            assert main(["keygen", "-o", str(target), *force]) == 4
            err = capsys.readouterr().err
            assert "not a key file" in err and "overwrite=True" not in err
    assert "symbolic link" in main_err(["keygen", "-o", str(link)], capsys)
    assert link.is_symlink() and not (tmp_path / "gone.key").exists()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert main(["keygen", "-o", "-"]) == 2
    assert "standard output" in capsys.readouterr().err
    assert not Path("-").exists()


def main_err(argv, capsys) -> str:
    main(argv)
    return capsys.readouterr().err


@pytest.mark.parametrize("argv", [["keygen", "--scheme", "rot13", "-o", "x.key"], ["keygen", "--block-size", "0", "-o",
                                  "x.key"], ["protect", "--data", "digits"],
                                  ["no-such-command"]])
def test_bad_arguments_exit_with_the_usage_code(argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert not (tmp_path / "x.key").exists()


def test_protect_writes_a_checkpoint_history_and_baseline_without_the_key(protected):
    key_path, out = protected
    for name in ("model.safetensors", "config.json", "protection.json", "training.json"):
        assert (out / name).is_file(), name
    record = json.loads((out / "training.json").read_text())
    assert len(record["history"]) == 1 and 0 <= record["key_accuracy"] <= 1
    assert 0 <= record["unprotected_accuracy"] <= 1
    protection = json.loads((out / "protection.json").read_text())
    assert protection["extra"]["dataset"] == "digits" and protection["input_size"] == [3, 16, 16]
    assert find_key_material(out, SecretKey.load(key_path)) == []


def test_the_baseline_beside_the_protected_run_matches_the_one_after_it(tmp_path):
    # --threads 2 on the CPU: the baseline trains in a second process, one
    # thread each; --threads 1: one after the other on one thread. The same
    # computations on one thread each, so the same numbers.
    key_path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    records = {}
    for threads in ("1", "2"):
        out = tmp_path / f"threads{threads}"
        assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--baseline", "--threads", threads]) == 0
        records[threads] = json.loads((out / "training.json").read_text())
    one, two = records["1"], records["2"]
    assert two["unprotected_accuracy"] == one["unprotected_accuracy"]
    assert [e["loss"] for e in two["baseline_history"]] == [e["loss"] for e in one["baseline_history"]]
    assert two["key_accuracy"] == one["key_accuracy"]
    assert torch.get_num_threads() == 2  # restored after the run


def test_evaluate_writes_the_report_with_the_baseline(protected, capsys):
    key_path, out = protected
    assert main(["evaluate", str(out), "--key", str(key_path), "--wrong-keys", "5", "--quiet"]) == 0
    report = json.loads((out / "report" / "report.json").read_text())
    record = json.loads((out / "training.json").read_text())
    assert report["num_wrong_keys"] == 5 and report["num_classes"] == 10
    assert report["key_accuracy"] == pytest.approx(record["key_accuracy"])
    assert report["unprotected_accuracy"] == pytest.approx(record["unprotected_accuracy"])
    assert (out / "report" / "wrong_keys.png").is_file() and (out / "private" / "examples.png").is_file()
    assert "wrong keys, mean of 5" in capsys.readouterr().out
    # The folders not to publish are owner-only (they were 0755 under the usual umask).
    assert (out / "private").stat().st_mode & 0o777 == 0o700
    assert (out / "training").stat().st_mode & 0o777 == 0o700
    assert find_key_material(out, SecretKey.load(key_path)) == []


def test_commands_take_the_key_from_kp_key_when_no_file_is_given(protected, tmp_path, monkeypatch, capsys):
    # CI secrets arrive as environment variables: KP_KEY holds the key file's content.
    key_path, out = protected
    monkeypatch.delenv("KP_KEY", raising=False)
    argv = ["evaluate", str(out), "--wrong-keys", "2", "--quiet", "-o", str(tmp_path / "report")]
    assert main(argv) == 4
    assert "KP_KEY" in capsys.readouterr().err
    monkeypatch.setenv("KP_KEY", key_path.read_text())
    assert main(argv) == 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["num_wrong_keys"] == 2
    assert main(["show", str(_write_image(tmp_path)), "-o", str(tmp_path / "shown.png")]) == 0
    monkeypatch.setenv("KP_KEY", SecretKey.generate(block_size=8).to_json())
    assert main(argv) == 3
    assert "the key in KP_KEY is not the key" in capsys.readouterr().err


def _write_image(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("with_splits", [False, True])
def test_evaluating_on_a_folder_without_splits_warns_that_it_scores_training_images(protected, tmp_path, capsys,
                                                                                     with_splits):
    key_path, out = protected
    rng = np.random.default_rng(0)
    for digit in range(10):
        folder = tmp_path / "digits" / ("test" if with_splits else "") / str(digit)
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "0.png")
    assert main(["evaluate", str(out), "--key", str(key_path), "--data", str(tmp_path / "digits"), "--wrong-keys", "2",
                 "--quiet", "-o", str(tmp_path / "report")]) == 0
    warned = "trained and evaluated on the same images" in capsys.readouterr().err
    assert warned is not with_splits


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("argv_tail, code, says", [
    (["--device", "cuda"], 1, "torch sees none here"),
    (["--device", "gpu"], 2, "not a torch device"),
    (["--model", "resnet81"], 1, "did you mean resnet18"),
])
def test_a_bad_device_or_model_name_is_a_one_line_error(tmp_path, capsys, argv_tail, code, says):
    key_path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    argv = ["protect", *TINY, "--key", str(key_path), "-o", str(tmp_path / "out")]
    if argv_tail[0] == "--model":
        argv[argv.index("--model") + 1] = argv_tail[1]
    else:
        argv += argv_tail
    assert main(argv) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_evaluate_on_data_with_other_classes_is_refused(protected, tmp_path, capsys):
    key_path, out = protected
    assert json.loads((out / "protection.json").read_text())["extra"]["classes"] == [str(d) for d in range(10)]
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "pets" / name / "0.png")
    code = main(["evaluate", str(out), "--key", str(key_path), "--data", str(tmp_path / "pets"), "--wrong-keys", "2",
                 "--quiet", "-o", str(tmp_path / "report")])
    assert code == 1
    assert "[cat, dog]" in capsys.readouterr().err and not (tmp_path / "report").exists()


def test_evaluate_with_another_key_exits_with_the_key_mismatch_code(protected, tmp_path, capsys):
    _, out = protected
    other = tmp_path / "other.key"
    SecretKey.generate(block_size=8).save(other)
    assert main(["evaluate", str(out), "--key", str(other), "--wrong-keys", "1", "--quiet"]) == 3
    assert "not the key" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_export_writes_the_base_model_for_deployment_without_the_key(protected, tmp_path, capsys, fmt):
    import torch

    from kp_plugin.autoload import load_protected_auto
    from kp_plugin.export import load_exported, load_keyed_input

    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    key_path, out = protected
    key, deploy = SecretKey.load(key_path), tmp_path / "deploy"
    assert main(["export", str(out), "--key", str(key_path), "-o", str(deploy), "--format", fmt]) == 0
    assert "no key" in capsys.readouterr().out
    assert sorted(p.name for p in deploy.iterdir()) == sorted([f"model.{fmt}", "protection.json"])
    assert find_key_material(deploy, key) == []
    protection = json.loads((deploy / "protection.json").read_text())
    assert protection["extra"]["dataset"] == "digits" and protection["input_size"] == [3, 16, 16]

    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = load_protected_auto(out, key).eval()(x)
        if fmt == "pt2":
            got = load_exported(deploy, key)(x)
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(deploy / "model.onnx"))
            got = torch.from_numpy(session.run(None, {"pixel_values": load_keyed_input(deploy, key)(x).numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_export_with_another_key_exits_with_the_key_mismatch_code(protected, tmp_path, capsys):
    _, out = protected
    other = tmp_path / "other.key"
    SecretKey.generate(block_size=8).save(other)
    assert main(["export", str(out), "--key", str(other), "-o", str(tmp_path / "deploy")]) == 3
    assert "not the key" in capsys.readouterr().err and not (tmp_path / "deploy").exists()


def test_a_missing_key_file_exits_with_the_key_file_code(protected, tmp_path):
    _, out = protected
    assert main(["evaluate", str(out), "--key", str(tmp_path / "nope.key"), "--quiet"]) == 4


def test_a_directory_without_a_checkpoint_exits_with_the_checkpoint_code(protected, tmp_path):
    key_path, _ = protected
    assert main(["evaluate", str(tmp_path), "--key", str(key_path), "--quiet"]) == 5


def test_protect_refuses_to_replace_a_protected_model_without_resume(protected, capsys):
    key_path, out = protected
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["protect", "export"])
def test_a_key_file_inside_the_output_folder_is_refused_before_any_work(protected, tmp_path, capsys, command):
    # `kp protect -o out --key out/owner.key` fine-tuned to the end, then
    # save_protected refused the folder (key material in it): exit 1, the
    # model written beside the key.
    _, checkpoint = protected
    out = tmp_path / "out"
    assert main(["keygen", "--block-size", "4", "-o", str(out / "owner.key")]) == 0
    argv = ([*TINY, "-o", str(out)] if command == "protect" else [str(checkpoint), "-o", str(out)])
    assert main([command, *argv, "--key", str(out / "owner.key")]) == 2
    assert "lies inside" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["owner.key"]


def test_a_second_protect_into_a_folder_another_is_writing_is_refused(protected, tmp_path, capsys):
    # Two runs into one folder with one key both printed "saved the protected
    # model": the folder held one of them, the other was lost without a word.
    fcntl = pytest.importorskip("fcntl")
    key_path, _ = protected
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".kp-protect.lock", "w") as held:  # what a running kp protect holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out)]) == 1
        assert "another kp protect is writing into" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".kp-protect.lock"]
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out)]) == 0  # once it is free
    assert ".kp-protect.lock" not in {p.name for p in out.iterdir()}


def test_protect_refuses_a_dataset_with_one_class(protected, tmp_path, capsys):
    # It trained, then reported 100% with the key, with every wrong key, on
    # plain images and as chance: nothing protected, nothing measured.
    key_path, _ = protected
    (tmp_path / "data" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(tmp_path / "data" / "cat" / "0.png")
    argv = [{"digits": str(tmp_path / "data")}.get(a, a) for a in TINY]
    assert main(["protect", *argv, "--key", str(key_path), "-o", str(tmp_path / "out")]) == 1
    assert "at least two" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_resume_without_a_training_state_exits_with_the_checkpoint_code(protected, tmp_path):
    key_path, _ = protected
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(tmp_path / "fresh"), "--resume"]) == 5


def test_an_image_size_that_does_not_fit_the_block_size_names_a_fix(protected, tmp_path, capsys):
    key_path, _ = protected
    argv = [a if a != "16" else "20" for a in TINY]
    assert main(["protect", *argv, "--key", str(key_path), "-o", str(tmp_path / "o")]) == 1
    assert "--image-size 24" in capsys.readouterr().err


def test_show_writes_the_protected_view_and_invert_recovers_the_image(tmp_path):
    key_path = tmp_path / "k.key"
    key = SecretKey.generate(block_size=8)
    key.save(key_path)
    pixels = (np.random.default_rng(0).random((32, 40, 3)) * 255).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "plain.png")
    assert main(["show", "--key", str(key_path), str(tmp_path / "plain.png"), "-o", str(tmp_path / "p.png")]) == 0
    protected = np.asarray(Image.open(tmp_path / "p.png"))
    assert protected.shape == pixels.shape and not np.array_equal(protected, pixels)
    assert main(["show", "--key", str(key_path), str(tmp_path / "p.png"), "-o", str(tmp_path / "b.png"),
                 "--invert"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "b.png")), pixels)


def test_resume_continues_an_interrupted_run_to_more_epochs(protected, tmp_path, capsys):
    key_path, _ = protected
    out = tmp_path / "run"
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--distill", "1"]) == 0
    teacher = out / "training" / "teacher.safetensors"
    written = teacher.stat().st_mtime_ns
    argv = [a if a != "1" else "2" for a in TINY]
    assert main(["protect", *[a for a in argv if a != "--quiet"], "--key", str(key_path), "-o", str(out),
                 "--resume", "--distill", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    assert json.loads((out / "protection.json").read_text())["extra"]["epochs"] == 2
    assert teacher.stat().st_mtime_ns == written  # the teacher is reused, not trained again
    assert "reusing the unprotected teacher" in capsys.readouterr().err


def test_resume_at_another_image_size_is_refused_and_evaluate_warns(protected, tmp_path, capsys):
    # --resume --image-size 24 trained epoch 2 of a 16x16 run at 24 (another
    # keyed transform with block scrambling) and exited 0; kp evaluate at 24
    # reported the right key at chance without a word.
    key_path, checkpoint = protected
    argv = [{"16": "24", "1": "2"}.get(a, a) for a in TINY]
    assert main(["protect", *argv, "--key", str(key_path), "-o", str(checkpoint), "--resume"]) == 2
    assert "--image-size 16" in capsys.readouterr().err
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "--image-size", "24", "--wrong-keys", "1",
                 "--quiet", "-o", str(tmp_path / "report24")]) == 0
    assert "trained at 16x16" in capsys.readouterr().err


def test_protect_distils_from_an_unprotected_teacher_kept_private(protected, tmp_path):
    """--distill trains the unprotected model first and distils from it; its
    weights stay in training/, which push_protected never uploads."""
    from kp_plugin._hub_scan import _files_to_upload

    key_path, _ = protected
    out = tmp_path / "distilled"
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--distill", "1"]) == 0
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["objective"]["distill_weight"] == 1.0
    assert "distill" in record["history"][-1] and 0 <= record["unprotected_accuracy"] <= 1
    assert (out / "training" / "teacher.safetensors").is_file()
    assert not any(name.startswith("training/") for name in _files_to_upload(out))
    assert find_key_material(out, SecretKey.load(key_path)) == []


def test_protect_does_not_distil_by_default(protected):
    key_path, out = protected
    record = json.loads((out / "training.json").read_text())
    assert record["config"]["objective"]["distill_weight"] == 0.0
    assert "distill" not in record["history"][-1]
    assert not (out / "training" / "teacher.safetensors").exists()


def test_negative_distillation_weight_is_refused_before_training(protected, tmp_path, capsys):
    key_path, _ = protected
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(tmp_path / "neg"), "--distill", "-1"]) != 0
    assert "--distill" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()


def test_auto_threads_counts_only_the_cores_other_processes_keep_busy_now():
    import subprocess
    import sys

    from kp_plugin._cli_handlers import _busy_cores, auto_threads

    cores = len(os.sched_getaffinity(0))
    assert 1 <= auto_threads() <= cores
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = _busy_cores()
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and busy > 0.7  # a spinning process shows up as about one busy core


def test_protect_passes_dropout_to_both_fine_tunes_and_the_saved_config(tmp_path, monkeypatch):
    import kp_plugin.timm as kp_timm

    made = []
    create = kp_timm._create_base

    def recording(*args, **kwargs):
        made.append(dict(kwargs["timm_kwargs"]))
        return create(*args, **kwargs)

    monkeypatch.setattr(kp_timm, "_create_base", recording)
    key_path, out = tmp_path / "owner.key", tmp_path / "out"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    # One thread: both fine-tunes in this process, where the recording sees them (with two, the baseline
    # trains in a second process from the same arguments: test_the_baseline_beside_the_protected_run_...).
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--baseline", "--threads", "1",
                 "--drop", "0.2", "--drop-path", "0.1"]) == 0
    args = {"drop_rate": 0.2, "drop_path_rate": 0.1}
    assert made == [args, args]  # the protected model, then the baseline
    assert json.loads((out / "training.json").read_text())["model_args"] == args
    assert json.loads((out / "config.json").read_text())["model_args"] == args
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(tmp_path / "bad"), "--drop", "1.5"]) == 2


def test_protect_with_ema_saves_the_weight_average(tmp_path):
    import torch
    from safetensors.torch import load_file

    from kp_plugin._cli_handlers import RESUME_DIR
    from kp_plugin.train import TRAINING_STATE_FILE

    key_path, out = tmp_path / "owner.key", tmp_path / "out"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--ema-decay", "0.9"]) == 0
    assert json.loads((out / "training.json").read_text())["config"]["ema_decay"] == 0.9
    state = torch.load(out / RESUME_DIR / TRAINING_STATE_FILE, weights_only=False)
    average = {name.split(".", 1)[1]: value for name, value in state["weight_average"]["values"].items()}
    saved = load_file(out / "model.safetensors")
    compared = [name for name in saved if name in average]
    assert len(compared) == len(average) > 0
    for name in compared:
        torch.testing.assert_close(saved[name], average[name].contiguous(), rtol=0, atol=0)
    assert find_key_material(out, SecretKey.load(key_path)) == []


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_a_key_file_others_can_read_is_one_warning_line_and_the_command_runs(tmp_path, capsys):
    key_path = tmp_path / "shared.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    key_path.chmod(0o644)
    capsys.readouterr()
    assert main(["show", "--key", str(key_path), str(_write_image(tmp_path)), "-o", str(tmp_path / "s.png")]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"warning: key file {key_path} is accessible to other users") and "chmod 600" in err
    assert "KeyFilePermissionWarning" not in err and len(err.strip().splitlines()) == 1


def test_protect_mixes_batches_for_the_protected_model_and_the_baseline(tmp_path, monkeypatch, capsys):
    from kp_plugin import train
    from kp_plugin.data import load_dataset

    calls = []
    real = train.mix_images

    def recording(images, labels, **kwargs):
        calls.append((kwargs["mixup_alpha"], kwargs["cutmix_alpha"]))
        return real(images, labels, **kwargs)

    monkeypatch.setattr(train, "mix_images", recording)
    key_path, out = tmp_path / "owner.key", tmp_path / "out"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--baseline", "--threads", "1",
                 "--mixup", "0.4", "--cutmix", "1"]) == 0  # one thread: both fine-tunes in this process
    steps = -(-len(load_dataset("digits", split="train", image_size=16)) // 64)
    assert calls == [(0.4, 1.0)] * (2 * steps)  # every step of both fine-tunes
    config = json.loads((out / "training.json").read_text())["config"]
    assert (config["mixup_alpha"], config["cutmix_alpha"]) == (0.4, 1.0)
    capsys.readouterr()
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(tmp_path / "bad"), "--mixup", "-1"]) == 2
    assert "expected a number >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv, complaint", [
    (["protect", "--epochs", "0"], "--epochs: expected an integer >= 1, got 0"),
    (["protect", "--batch-size", "0"], "--batch-size: expected a batch size from 1 to 65536"),
    (["protect", "--batch-size", "100000000000000000000"], "--batch-size: expected a batch size from 1 to 65536"),
    (["protect", "--threads", "-2"], "--threads: expected a thread count from 1 to"),
    (["protect", "--threads", "100000"], "--threads: expected a thread count from 1 to"),
    (["protect", "--lr", "0"], "--lr: expected a number > 0"),
    (["protect", "--lr", "inf"], "--lr: expected a number > 0"),
    (["protect", "--mixup", "nan"], "--mixup: expected a number >= 0"),
    (["protect", "--ema-decay", "1"], "--ema-decay: expected a number in (0, 1)"),
    (["protect", "--wrong-key-weight", "-1"], "--wrong-key-weight: expected a number >= 0"),
    (["protect", "--image-size", "0"], "--image-size: expected an image side from 8 to 4096"),
    (["protect", "--image-size", "4"], "--image-size: expected an image side from 8 to 4096"),
    (["protect", "--image-size", "100000"], "--image-size: expected an image side from 8 to 4096"),
    (["evaluate", "out", "--wrong-keys", "-3"], "--wrong-keys: expected a count from 0 to 100000, got -3"),
    (["evaluate", "out", "--wrong-keys", "100000000000"], "--wrong-keys: expected a count from 0 to 100000"),
    (["evaluate", "out", "--threads", "0"], "--threads: expected a thread count from 1 to"),
    (["evaluate", "out", "--image-size", "100000"], "--image-size: expected an image side from 8 to 4096"),
    (["export", "out", "-o", "deploy", "--batch-size", "0"], "--batch-size: expected a batch size from 1 to 65536"),
    (["show", "image.png", "-o", "s.png", "--image-size", "-1"], "--image-size: expected an image side from 1"),
    (["show", "image.png", "-o", "s.png", "--image-size", "100000"], "--image-size: expected an image side from 1"),
    (["attack", "out", "--threads", "0"], "--threads: expected a thread count from 1 to"),
    (["protect", "--seed", "99999999999999999999999"], "--seed: expected a seed from 0 to 2**63 - 1"),
    (["evaluate", "out", "--seed", "-1"], "--seed: expected a seed from 0 to 2**63 - 1"),
    (["attack", "out", "--threads", "100000"], "--threads: expected a thread count from 1 to"),
])
def test_numbers_out_of_range_are_usage_errors_before_anything_loads(argv, complaint, tmp_path, capsys, monkeypatch):
    # A negative thread count used to end in a RuntimeError traceback from
    # torch, and a zero epoch count in exit code 1 after the data had loaded;
    # --image-size 100000 in a 120 GB allocation traceback, --threads 5000 in
    # a machine full of threads, --wrong-keys 1e11 in a silent hang.
    monkeypatch.chdir(tmp_path)  # nothing here: any loading would fail differently
    command = argv[0]
    required = {"protect": ["--key", "k.key", "-o", "out", "--model", "test_efficientnet"]}.get(command, [])
    assert main([*argv, *required]) == 2
    err = capsys.readouterr().err
    assert f"kp {command}: error: argument {complaint}" in err and "Traceback" not in err


def test_an_opset_for_a_pt2_export_is_a_usage_error(tmp_path, capsys, monkeypatch):
    # It was ignored (exit 0, a pt2 file written).
    monkeypatch.chdir(tmp_path)
    assert main(["export", "out", "-o", "deploy", "--format", "pt2", "--opset", "17"]) == 2
    assert "kp export: error: --opset is an ONNX setting" in capsys.readouterr().err
    assert not (tmp_path / "deploy").exists()


def test_show_refuses_to_write_over_its_input_image(tmp_path, capsys):
    key_path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    image = _write_image(tmp_path)
    before = image.read_bytes()
    assert main(["show", "--key", str(key_path), str(image), "-o", str(image)]) == 2
    assert "is the input image" in capsys.readouterr().err and image.read_bytes() == before


@pytest.mark.parametrize("how", ["the key file itself", "a .png symlink to it"])
def test_show_refuses_to_write_over_a_key_file(tmp_path, capsys, how):
    # `kp show --key secret img -o secret` replaced the key file (no suffix)
    # with a PNG and exited 0: the key, and every model trained with it, lost.
    key_path = tmp_path / "secret"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    before = key_path.read_bytes()
    image = _write_image(tmp_path)
    output = key_path
    if how != "the key file itself":
        output = tmp_path / "seen.png"
        output.symlink_to(key_path)
    assert main(["show", "--key", str(key_path), str(image), "-o", str(output)]) == 2
    assert "is a key file" in capsys.readouterr().err and key_path.read_bytes() == before


def test_show_replaces_an_existing_output_whole(tmp_path):
    key_path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    image, output = _write_image(tmp_path), tmp_path / "seen.png"
    output.write_bytes(b"an older picture")
    assert main(["show", "--key", str(key_path), str(image), "-o", str(output)]) == 0
    assert output.read_bytes().startswith(b"\x89PNG") and not list(tmp_path.glob(".*.tmp"))
    assert main(["show", "--key", str(key_path), str(image), "-o", str(tmp_path)]) == 2  # a folder: named, no temp


def test_an_output_path_that_cannot_be_written_is_a_one_line_error(tmp_path, capsys):
    # A traceback ending in NotADirectoryError / PermissionError.
    key_path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    image = _write_image(tmp_path)
    (tmp_path / "file").write_text("not a folder")
    assert main(["show", "--key", str(key_path), str(image), "-o", str(tmp_path / "file" / "seen.png")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "check the path" in err and "file" in err


def test_show_names_a_png_output_and_refuses_another_format(tmp_path, capsys):
    key_path = tmp_path / "owner.key"
    assert main(["keygen", "--block-size", "8", "-o", str(key_path)]) == 0
    image = _write_image(tmp_path)
    assert main(["show", "--key", str(key_path), str(image), "-o", str(tmp_path / "seen.jpg")]) == 2
    assert "writes PNG" in capsys.readouterr().err and not (tmp_path / "seen.jpg").exists()
    assert main(["show", "--key", str(key_path), str(image), "-o", str(tmp_path / "seen.PNG")]) == 0
    assert (tmp_path / "seen.PNG").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_says_where_a_relative_recorded_dataset_is_missing(protected, tmp_path, monkeypatch, capsys):
    # Before: "unknown dataset '../data'" from any folder other than the one
    # kp protect ran in, with no hint that --data would do.
    key_path, out = protected
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            folder = tmp_path / "run" / "pets" / split / name
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    monkeypatch.chdir(tmp_path / "run")
    args = [a if a != "digits" else "pets" for a in TINY]
    assert main(["protect", *args, "--key", str(key_path), "-o", str(tmp_path / "pets_out")]) == 0
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    code = main(["evaluate", str(tmp_path / "pets_out"), "--key", str(key_path), "--wrong-keys", "1", "--quiet"])
    assert code == 1
    err = capsys.readouterr().err
    assert "'pets'" in err and "relative to where kp protect ran" in err and "--data" in err


def test_evaluate_refuses_data_with_another_number_of_classes_than_the_model(tmp_path, capsys):
    # A checkpoint kp protect did not write records no class names: before,
    # a 3-output model was evaluated on 10-class digits (labels out of its
    # range, "chance 10%").
    import timm

    from kp_plugin import save_protected, wrap_model

    key = SecretKey.generate(block_size=8)
    key.save(tmp_path / "owner.key")
    save_protected(wrap_model(timm.create_model("test_resnet", num_classes=3), key), tmp_path / "out")
    code = main(["evaluate", str(tmp_path / "out"), "--key", str(tmp_path / "owner.key"), "--data", "digits",
                 "--image-size", "16", "--wrong-keys", "1", "--quiet", "-o", str(tmp_path / "report")])
    assert code == 1
    assert "10 classes but the model has 3 outputs" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


def test_protect_takes_the_baselines_threads_once_the_baseline_process_has_ended(tmp_path, monkeypatch):
    # The baseline beside the protected run ends first (no wrong-key passes);
    # its core sat idle for the rest of the protected fine-tune.
    from kp_plugin._cli_handlers import _BaselineBeside
    from kp_plugin.timm import create_protected_model

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the split needs two, whatever this machine has
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    key = SecretKey.generate(block_size=8)
    args = build_parser().parse_args(["protect", *TINY, "--key", "unused", "-o", str(tmp_path / "out")])
    keyed = create_protected_model("test_efficientnet", key, num_classes=10, input_size=16).keyed
    from kp_plugin.train import TrainConfig

    beside = _BaselineBeside(args, 10, keyed, TrainConfig(epochs=1))
    try:
        assert threads == [1]
        beside.result()  # the baseline has finished
        beside.process.join()
        beside.reclaim_threads()
        beside.reclaim_threads()
        assert threads == [1, 2]
    finally:
        beside.stop()


def test_a_new_run_over_an_interrupted_one_is_refused_before_training(protected, tmp_path, capsys):
    # Without --resume, the interrupted run's training state was trained over
    # (same key) or a whole epoch trained before a refusal (another key).
    key_path, _ = protected
    out = tmp_path / "run"
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out)]) == 0
    (out / "protection.json").unlink()  # as a run stopped before its last save leaves it
    state = out / "training" / "training_state.pt"
    written = state.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out)]) == 1
    assert "holds an interrupted run; pass --resume" in capsys.readouterr().err
    assert state.stat().st_mtime_ns == written
    # Resuming it with another learning rate is refused (the saved one would
    # apply while the record named the new one).
    argv = [a if a != "1" else "2" for a in TINY]
    assert main(["protect", *argv, "--key", str(key_path), "-o", str(out), "--resume", "--lr", "0.5"]) == 1
    assert "lr 0.5 (saved: 0.002)" in capsys.readouterr().err


def test_a_checkpoint_whose_block_size_was_edited_is_not_called_another_key(protected, tmp_path, capsys):
    # The message said the key was not the checkpoint's and quoted two equal
    # fingerprints. Since protection.json carries a mac, the edit is a
    # corrupt checkpoint (exit 5); the same key material saved with another
    # block size is still the "expected fingerprint, other settings" case.
    import shutil

    key_path, checkpoint = protected
    edited = tmp_path / "edited"
    shutil.copytree(checkpoint, edited)
    config = json.loads((edited / "protection.json").read_text())
    config["block_size"] = 4
    (edited / "protection.json").write_text(json.dumps(config))
    assert main(["evaluate", str(edited), "--key", str(key_path), "--wrong-keys", "1", "--quiet",
                 "-o", str(tmp_path / "report")]) == 5
    err = capsys.readouterr().err
    assert "changed after it was written" in err and "is not the key" not in err
    key = SecretKey.load(key_path)
    resized = SecretKey(key._material, block_size=4, scheme=key.scheme, channels=key.channels)
    resized.save(tmp_path / "resized.key")
    assert main(["evaluate", str(checkpoint), "--key", str(tmp_path / "resized.key"), "--wrong-keys", "1", "--quiet",
                 "-o", str(tmp_path / "report2")]) == 3
    err = capsys.readouterr().err
    assert "has the expected fingerprint" in err and "block_size 4 (expected 8)" in err
    assert "is not the key" not in err


@pytest.mark.parametrize("command", ["protect", "evaluate", "export"])
def test_an_output_that_is_a_file_is_a_usage_error_before_any_work(protected, tmp_path, capsys, command):
    # kp protect built the model and failed with "Not a directory
    # (afile/training)"; kp evaluate ran the whole evaluation first.
    key_path, checkpoint = protected
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    argv = {"protect": ["protect", *TINY, "--key", str(key_path)],
            "evaluate": ["evaluate", str(checkpoint), "--key", str(key_path), "--wrong-keys", "1", "--quiet"],
            "export": ["export", str(checkpoint), "--key", str(key_path)]}[command]
    assert main([*argv, "-o", str(afile)]) == 2
    assert f"-o {afile} is a file" in capsys.readouterr().err
    assert afile.read_text() == "keep me"


def test_a_report_that_cannot_be_written_is_one_line_naming_the_folder(protected, tmp_path, capsys, monkeypatch):
    # A full disk (or a file-size limit) gave "kp evaluate: error: [Errno 27]
    # File too large", naming no file and no remedy.
    import errno

    import kp_plugin.evaluate

    def full(*args, **kwargs):
        raise OSError(errno.EFBIG, "File too large")

    monkeypatch.setattr(kp_plugin.evaluate, "write_report", full)
    key_path, checkpoint = protected
    out = tmp_path / "report"
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "--wrong-keys", "1", "--quiet",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"cannot write the results into {out} (File too large); free some space, or choose another -o" in err

    def read_only(*args, **kwargs):  # the folder itself named, as a read-only file system does
        raise OSError(errno.EROFS, "Read-only file system", str(out))

    monkeypatch.setattr(kp_plugin.evaluate, "write_report", read_only)
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "--wrong-keys", "1", "--quiet",
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err  # it said "into OUT in OUT", and to free some space
    assert (f"cannot write the results into {out} (Read-only file system); check that the folder can be written, "
            "or choose another -o") in err

    def half_written(*args, **kwargs):  # the temporary the file is written to first: the file's own name is said
        raise OSError(errno.ENOSPC, "No space left on device", str(out / ".report.md.2227.765da8af.tmp"))

    monkeypatch.setattr(kp_plugin.evaluate, "write_report", half_written)
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "--wrong-keys", "1", "--quiet",
                 "-o", str(out)]) == 1
    assert f"cannot write the results into report.md in {out} (No space left" in capsys.readouterr().err


def test_an_output_folder_that_is_a_dangling_link_is_named_as_such(protected, tmp_path, capsys):
    # Creating the folder failed with "File exists", for a path that looks missing.
    key_path, checkpoint = protected
    link = tmp_path / "report"
    link.symlink_to(tmp_path / "gone")
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "-o", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"-o {link} is a symbolic link to {tmp_path / 'gone'}, which does not exist" in err


def test_a_key_file_in_the_report_folder_is_to_be_moved_not_deleted(protected, tmp_path, capsys):
    # The remedy was "delete these files": for a key file, losing its model.
    key_path, checkpoint = protected
    report = tmp_path / "report"
    report.mkdir()
    SecretKey.generate().save(report / "other.key")
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "--wrong-keys", "1", "--quiet",
                 "-o", str(report)]) != 0
    err = capsys.readouterr().err
    assert "other.key" in err and "move these files out" in err and "delete" not in err
    assert (report / "other.key").is_file()


def _report_sigint(queue):
    import signal

    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_the_baseline_process_leaves_ctrl_c_to_kp_protect():
    # The terminal's Ctrl-C reaches every process of the group: a baseline
    # child still importing torch printed a 50-line traceback under
    # "kp protect: interrupted". It starts with SIGINT ignored; kp protect
    # ends it. This process keeps its own handler.
    import multiprocessing
    import signal

    from kp_plugin._cli_handlers import start_ignoring_interrupts

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_report_sigint, args=(queue,))
    before = signal.getsignal(signal.SIGINT)
    start_ignoring_interrupts(process)
    assert queue.get(timeout=60) is True
    process.join(timeout=60)
    assert process.exitcode == 0 and signal.getsignal(signal.SIGINT) is before


def test_the_librarys_warnings_are_one_warning_line_each(protected, tmp_path, monkeypatch, capsys):
    # They came as Python prints them: "/path/module.py:533: InputSizeWarning:
    # ..." and the echoed source line, some after kp's own line saying the same.
    key_path, out = protected
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").mkdir()  # `--data digits` means the embedded set, not this folder: a DatasetNameWarning
    assert main(["evaluate", str(out), "--key", str(key_path), "--data", "digits", "--image-size", "32",
                 "--wrong-keys", "1", "--quiet", "-o", str(tmp_path / "report")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert sum("'digits' loads the embedded digits dataset" in line for line in lines) == 1
    assert sum("trained at 16x16" in line or "saved for 16x16" in line for line in lines) == 1
    assert all(line.startswith("warning: ") for line in lines), err


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 289507639296 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line_saying_what_to_lower(tmp_path, capsys, monkeypatch, error):
    # kp protect --image-size 4096 (within the documented bounds) ended in a
    # traceback of torch's allocator.
    def fail(args):
        raise error

    monkeypatch.setattr("kp_plugin.cli._protect", fail)
    assert main(["protect", *TINY, "--key", str(tmp_path / "k.key"), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("kp protect: error: out of memory") and "--batch-size" in err and "Traceback" not in err
    monkeypatch.setattr("kp_plugin.cli._protect", lambda args: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # any other RuntimeError is not hidden
        main(["protect", *TINY, "--key", str(tmp_path / "k.key"), "-o", str(tmp_path / "out")])


@pytest.mark.parametrize("name, value", [("unprotected_accuracy", 5.0), ("unprotected_accuracy", "abc"),
                                         ("dataset", 5), ("classes", "0123")])
def test_an_edited_record_in_protection_json_is_refused_not_reported(protected, tmp_path, capsys, name, value):
    # protection.json's "extra" is not signed: an unprotected accuracy of 5.0
    # was reported as 500.0% (exit 0); other values ended in tracebacks.
    import shutil

    key_path, out = protected
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = json.loads((copy / "protection.json").read_text())
    config["extra"][name] = value
    (copy / "protection.json").write_text(json.dumps(config))
    data = [] if name == "dataset" else ["--data", "digits"]  # --data overrides the recorded dataset
    assert main(["evaluate", str(copy), "--key", str(key_path), *data, "--wrong-keys", "1",
                 "--quiet", "-o", str(tmp_path / "report")]) == 5
    err = capsys.readouterr().err
    assert f"records {name} = " in err and "Traceback" not in err and not (tmp_path / "report").exists()


def test_a_test_set_with_some_of_the_classes_is_evaluated_with_the_models_labels(protected, tmp_path, capsys):
    # "has the classes [3, 7] but the model was trained on [0, 1, ...]":
    # a test set covering some classes could not be evaluated at all.
    from PIL import Image

    from kp_plugin.data import load_dataset

    key_path, out = protected
    digits = load_dataset("digits", split="test", image_size=16)
    wanted = {3: [], 7: []}
    for index in range(len(digits)):
        image, label = digits[index]
        if int(label) in wanted and len(wanted[int(label)]) < 4:
            wanted[int(label)].append(image)
    for label, images in wanted.items():
        (tmp_path / "data" / "test" / str(label)).mkdir(parents=True)
        for i, image in enumerate(images):
            pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "data" / "test" / str(label) / f"{i}.png")
    assert main(["evaluate", str(out), "--key", str(key_path), "--data", str(tmp_path / "data"), "--split", "test",
                 "--wrong-keys", "1", "--quiet", "-o", str(tmp_path / "report")]) == 0
    assert "has 2 of the 10 classes" in capsys.readouterr().err
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["num_classes"] == 10 and report["num_examples"] == 8 and report["chance"] == pytest.approx(0.1)


def test_an_image_size_the_key_cannot_take_is_the_one_error_said(protected, tmp_path, capsys):
    # --image-size 18 (block size 8) first warned that the model was trained at
    # 16x16 and scrambling would give chance, then failed on the block size.
    key_path, checkpoint = protected
    assert main(["evaluate", str(checkpoint), "--key", str(key_path), "--image-size", "18", "--wrong-keys", "1",
                 "--quiet", "-o", str(tmp_path / "report")]) == 1
    err = capsys.readouterr().err
    assert "pass --image-size 16" in err and "trained at" not in err and not (tmp_path / "report").exists()


def test_resume_with_other_model_options_is_a_usage_error(protected, tmp_path, capsys):
    # --drop / --drop-path / --no-pretrained changed on --resume were taken,
    # and the record described the whole run with them.
    key_path, _ = protected
    out = tmp_path / "run"
    assert main(["protect", *TINY, "--key", str(key_path), "-o", str(out), "--drop", "0.1"]) == 0
    more = [a if a != "1" else "2" for a in TINY]
    capsys.readouterr()
    assert main(["protect", *more, "--key", str(key_path), "-o", str(out), "--resume", "--drop", "0.5",
                 "--drop-path", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "--drop 0.5 (the run: 0.1)" in err and "--drop-path 0.2 (the run: not given)" in err
    pretrained = [a for a in more if a != "--no-pretrained"]
    assert main(["protect", *pretrained, "--key", str(key_path), "-o", str(out), "--resume", "--drop", "0.1"]) == 2
    assert "--no-pretrained left out" in capsys.readouterr().err
    assert json.loads((out / "training.json").read_text())["model_args"] == {"drop_rate": 0.1}
    assert main(["protect", *more, "--key", str(key_path), "-o", str(out), "--resume", "--drop", "0.1"]) == 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from /proc")
def test_sigterm_stops_protect_and_its_baseline_process_like_ctrl_c(protected, tmp_path):
    # A scheduler's SIGTERM killed kp protect outright: its baseline process
    # trained on alone (a whole core) and the folder's lock file stayed.
    import signal
    import subprocess
    import sys

    key_path, _ = protected
    out = tmp_path / "run"
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    argv = [a if a != "1" else "50" for a in TINY]
    run = subprocess.Popen([sys.executable, "-m", "kp_plugin", "protect", *argv, "--key", str(key_path), "-o",
                            str(out), "--baseline", "--threads", "2"], env=env, stderr=subprocess.PIPE, text=True)

    def children() -> list:
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == run.pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
        return found

    try:
        deadline = time.monotonic() + 240
        while not (out / "training" / "training_state.pt").exists() and run.poll() is None:
            assert time.monotonic() < deadline, "no epoch finished"
            time.sleep(0.2)
        kids = children()
        assert kids, "the baseline runs in a second process"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if run.poll() is None:
            run.kill()
    assert "stopped (SIGTERM)" in run.stderr.read()
    time.sleep(2)
    assert [pid for pid in kids if Path(f"/proc/{pid}").exists()] == []
    assert not (out / ".kp-protect.lock").exists()
