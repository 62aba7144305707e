"""How fast could the keyed transform go on this CPU? A hand-written kernel
against PyTorch's, beside ``clone``, in one process.

    .venv/bin/python benchmarks/gather_ceiling.py [--rounds 41] [--write]

Issue 2 asks KeyedInput for at least 0.8x the speed of ``x.clone()``. At
(256, 3, 32, 32) the batch (3 MB) sits in cache and ``clone`` is a memcpy;
the transform is a gather of every element by a key-derived index, then a
multiply-add. This script compiles the gather and the multiply-add as one C
loop (``gcc -O3 -march=native -fopenmp``, int32 indices, one image per
OpenMP iteration, writing into a preallocated output), loads it with
``ctypes`` and times it with the key's real plan against ``clone``, a copy
into a preallocated tensor, PyTorch's ``gather`` + ``addcmul`` and
``KeyedInput`` (interleaved rounds, medians, 2 threads). A second group
does the same for the keyed image processor's step (issue 4): the gather of
uint8 bytes for one piece of 8 images of 3x224x224 at one thread, torch's
``gather`` (what the library runs) and ``index_select`` against a C loop.
The C kernels are a measurement only: the library ships no compiled code (its core is torch and
safetensors). Needs gcc; ``--write`` replaces section ``gather-ceiling`` of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_transform import interleaved_medians  # noqa: E402

from kp_plugin import KeyedInput, SecretKey  # noqa: E402

KERNEL = r"""
#include <stdint.h>
void gather_affine(const float* x, float* out, const int32_t* index, const float* scale,
                   const float* bias, int64_t images, int64_t n) {
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < images; b++) {
        const float* src = x + b * n;
        float* dst = out + b * n;
        for (int64_t j = 0; j < n; j++) dst[j] = src[index[j]] * scale[j] + bias[j];
    }
}

void gather_bytes(const uint8_t* x, uint8_t* out, const int32_t* index, int64_t images, int64_t n) {
    for (int64_t b = 0; b < images; b++) {
        const uint8_t* src = x + b * n;
        uint8_t* dst = out + b * n;
        for (int64_t j = 0; j < n; j++) dst[j] = src[index[j]];
    }
}
"""


def compile_kernels(directory: Path):
    """Build the C kernels with gcc; return them as ctypes functions."""
    source, library = directory / "gather.c", directory / "libgather.so"
    source.write_text(KERNEL)
    subprocess.run(["gcc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(library)],
                   check=True)
    loaded = ctypes.CDLL(str(library))
    loaded.gather_affine.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64, ctypes.c_int64]
    loaded.gather_bytes.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64, ctypes.c_int64]
    return loaded.gather_affine, loaded.gather_bytes


def float_batch(kernel, rounds: int) -> dict:
    """(256, 3, 32, 32) float32, M=4, 2 threads: the issue-2 comparison."""
    torch.set_num_threads(2)
    shape = (256, 3, 32, 32)
    keyed = KeyedInput(SecretKey.generate(block_size=4), mean=(0.5,) * 3, std=(0.5,) * 3, input_size=shape[1:])
    x = torch.rand(shape)
    plan = keyed._plan_for(x)
    index = plan.source_index.reshape(-1)
    scale, bias = plan.value_scale.reshape(-1).contiguous(), plan.value_bias.reshape(-1).contiguous()
    index32 = index.to(torch.int32).contiguous()
    flat = x.view(shape[0], -1)
    out = torch.empty_like(flat)
    spare = torch.empty_like(x)
    expanded = index.expand(shape[0], -1)

    def hand_written():
        kernel(flat.data_ptr(), out.data_ptr(), index32.data_ptr(), scale.data_ptr(), bias.data_ptr(),
               shape[0], flat.shape[1])

    def torch_ops():
        gathered = torch.gather(flat, 1, expanded)
        return torch.addcmul(bias, gathered, scale, out=gathered)

    hand_written()
    if not torch.allclose(out, keyed(x).view(shape[0], -1), atol=1e-6):
        raise AssertionError("the C kernel does not reproduce KeyedInput")
    with torch.inference_mode():
        return interleaved_medians({
            "x.clone()": lambda: x.clone(),
            "copy into a preallocated tensor": lambda: spare.copy_(x),
            "C gather + multiply-add into a preallocated tensor": hand_written,
            "torch.gather + addcmul": torch_ops,
            "KeyedInput": lambda: keyed(x),
        }, rounds=rounds)


def byte_piece(kernel, rounds: int) -> dict:
    """One piece of the keyed processor's uint8 step (8 images of 3x224x224,
    M=16, 1 thread, as bench_processor runs): the gather of bytes only."""
    torch.set_num_threads(1)
    keyed = KeyedInput(SecretKey.generate(block_size=16), mean=(0.5,) * 3, std=(0.5,) * 3,
                       input_size=(3, 224, 224))
    x = torch.randint(0, 256, (8, 3 * 224 * 224), dtype=torch.uint8)
    index = keyed._plan_for(torch.zeros(1, 3, 224, 224)).source_index.reshape(-1)
    index32 = index.to(torch.int32).contiguous()
    expanded = index.expand(x.shape[0], -1)
    out = torch.empty_like(x)

    def hand_written():
        kernel(x.data_ptr(), out.data_ptr(), index32.data_ptr(), x.shape[0], x.shape[1])

    hand_written()
    if not torch.equal(out, x[:, index]):
        raise AssertionError("the C byte kernel does not reproduce the gather")
    with torch.inference_mode():
        return interleaved_medians({
            "torch.gather, int64 index (the library)": lambda: torch.gather(x, 1, expanded, out=out),
            "torch.index_select along dim 1": lambda: torch.index_select(x, 1, index, out=out),
            "C gather, int32 index": hand_written,
            "uint8 -> float32 copy (for scale)": lambda: torch.empty(x.shape).copy_(x),
        }, rounds=rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--write", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if shutil.which("gcc") is None:
        print("gcc not found: this measurement needs a C compiler", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        affine_kernel, byte_kernel = compile_kernels(Path(tmp))
        medians = float_batch(affine_kernel, args.rounds)
        pieces = byte_piece(byte_kernel, args.rounds)
    base = medians["x.clone()"]
    lines = ["| (256, 3, 32, 32) float32, M=4, default scheme | median ms | speed vs clone |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds * 1e3:.3f} | {base / seconds:.2f}x |" for name, seconds in medians.items()]
    lines += ["", "| one piece of the keyed processor: (8, 3x224x224) uint8, M=16, 1 thread | median ms |", "|---|---:|"]
    lines += [f"| {name} | {seconds * 1e3:.3f} |" for name, seconds in pieces.items()]
    table = "\n".join(lines)
    print(table)
    if args.write:
        from _report import machine_description, write_section

        write_section(
            "gather-ceiling",
            "## The gather's ceiling (`benchmarks/gather_ceiling.py`)\n\n"
            "A hand-written C loop (gcc -O3 -march=native, OpenMP over images, int32 indices, the key's real "
            "plan, output preallocated) against `clone` and the library, interleaved in one process; below it "
            "the same for the byte gather of the keyed image processor (no OpenMP, one thread); "
            f"{args.rounds} rounds, medians. A measurement only; the library ships no compiled code. "
            f"Command: `.venv/bin/python benchmarks/gather_ceiling.py --rounds {args.rounds} --write`. Machine: "
            f"{re.sub(r' [(][0-9]+ threads[)]', '', machine_description())}."
            "\n\n" + table,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
