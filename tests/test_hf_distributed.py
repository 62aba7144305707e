"""The Trainer path under torchrun: two processes (gloo, CPU), one key file,
identical transforms on both ranks, and a run that completes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from kp_plugin import SecretKey

WORKER = Path(__file__).with_name("hf_ddp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(key_file, out_dir) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               str(WORKER), str(key_file), str(out_dir)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_two_process_trainer_run_builds_the_same_transform_on_both_ranks(tmp_path):
    key_file = tmp_path / "owner.key"
    SecretKey.generate(block_size=4).save(key_file)
    result = _torchrun(key_file, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in reports] == [2, 2]
    assert reports[0]["transform_sha256"] == reports[1]["transform_sha256"]
    assert [r["global_step"] for r in reports] == [3, 3]
    # DDP keeps the replicas identical, and the callback's counts are summed over ranks.
    assert reports[0]["classifier_sum"] == reports[1]["classifier_sum"]
    assert reports[0]["eval_key_accuracy"] == reports[1]["eval_key_accuracy"]
    # The callback counts each of the 33 examples once, as Trainer's own
    # metrics do, not the examples that pad the ranks' last batches.
    assert reports[0]["eval_key_accuracy"] == reports[0]["eval_accuracy"]


def test_ranks_with_different_keys_are_refused_before_training(tmp_path):
    # Each rank built its transform from its own key file: one DDP model was
    # trained on two keyings, and protection.json recorded rank 0's key only.
    first = SecretKey.generate(block_size=4)
    first.save(tmp_path / "owner0.key")
    SecretKey.generate_like(first).save(tmp_path / "owner1.key")
    result = _torchrun(tmp_path / "owner{rank}.key", tmp_path)
    assert result.returncode != 0
    assert result.stderr.count("KeyMismatchError: the processes of this run hold different keys") == 2
    assert not list(tmp_path.glob("rank*.json"))
