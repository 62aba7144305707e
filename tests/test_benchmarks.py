"""Smoke runs of the benchmark scripts in their print-only modes.

The benchmarks are how the speed figures in docs/benchmarks.md are made;
nothing else imports them, so an API change can break one unnoticed until
someone needs its numbers (profile_processor.py crashed for a while after
``KeyedImageProcessor._resized`` changed). Each script runs here with its
smallest settings; the check is that it finishes, that its own correctness
checks pass (bench_depthwise compares the small-map gradient with torch's),
and that it leaves docs/benchmarks.md alone. The timings themselves mean
nothing at these sizes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"

QUICK = [
    pytest.param(["bench_processor.py", "--no-write", "--images", "2", "--repeats", "1"], id="bench_processor"),
    pytest.param(["profile_processor.py", "--images", "2"], id="profile_processor"),
]
LONGER = [
    pytest.param(["bench_depthwise.py", "--no-write", "--rounds", "1"], id="bench_depthwise"),
    pytest.param(["transform_variants.py", "--rounds", "1"], id="transform_variants"),
    pytest.param(["bench_transform.py", "--quick"], id="bench_transform"),
    pytest.param(["bench_train_step.py", "--quick"], id="bench_train_step"),
]


def _run(args: list) -> subprocess.CompletedProcess:
    before = DOC.read_bytes() if DOC.exists() else None
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / args[0]), *args[1:]], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert (DOC.read_bytes() if DOC.exists() else None) == before, f"{args[0]} changed docs/benchmarks.md"
    return done


@pytest.mark.parametrize("args", QUICK)
def test_benchmark_runs_in_its_print_only_mode(args, capsys):
    # In this process (a subprocess would import torch and transformers again).
    import importlib.util

    import torch

    pytest.importorskip("transformers")
    before, threads = DOC.read_bytes(), torch.get_num_threads()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{args[0][:-3]}", ROOT / "benchmarks" / args[0])
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        assert script.main(args[1:]) == 0
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip()
    assert DOC.read_bytes() == before, f"{args[0]} changed docs/benchmarks.md"


@pytest.mark.slow
@pytest.mark.parametrize("args", LONGER)
def test_longer_benchmark_runs_in_its_quick_mode(args):
    assert _run(args).stdout.strip()
