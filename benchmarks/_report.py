"""Write one benchmark's table into its own section of docs/benchmarks.md.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and
``<!-- END name -->``; running it again replaces only that section, so
benchmarks can be re-run one at a time.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine_description() -> str:
    """One line naming the machine a result was measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    info = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                info.setdefault(name.strip(), value.strip())
    except OSError:
        pass
    if "model name" in info:
        # Two VMs named alike ran on different CPUs (with and without
        # AVX-512), which changes which CPU kernels torch picks.
        simd = "AVX-512" if "avx512f" in info.get("flags", "").split() else "no AVX-512"
        cpu = f"{info['model name']} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, {simd})"
    parts = [f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        parts.append(f"GPU {torch.cuda.get_device_name(0)}")
    return "; ".join(parts)


def write_section(name: str, markdown: str, doc: Path = DOC) -> None:
    """Replace (or append) section ``name`` of docs/benchmarks.md."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def median_ms(fn, repeats: int = 15) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls,
    after one warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)
