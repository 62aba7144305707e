"""The comparisons behind KeyedInput's buffer constants, interleaved in one process.

    .venv/bin/python benchmarks/transform_variants.py [--rounds 41]

Each group times its candidates one call each per round (bench_transform's
``interleaved_medians``) and prints medians in milliseconds (2 threads unless
said):

1. Pieces (``kp_plugin.module.CHUNK_BYTES``), (64, 3, 224, 224), M=16: the
   library as it is (4 MiB pieces) against the whole batch in one gather
   and one multiply-add, for float and for uint8 input.
2. Output reuse (``REUSE_MIN_BYTES``), default scheme M=4: the pool against
   fresh allocations, at (256, 3, 32, 32), (64, 3, 64, 64) and
   (32, 3, 224, 224), with ``clone`` beside them.
3. The uint8 step of the keyed processor (one thread, (32, 3, 224, 224)
   bytes, pieces of 8 images): the gather alone, the mixed-dtype
   multiply-add the library uses, and ``copy_`` then an in-place
   multiply-add.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_transform import interleaved_medians  # noqa: E402

import kp_plugin.module as module  # noqa: E402
from kp_plugin import KeyedInput, SecretKey  # noqa: E402


def _print(title: str, medians: dict) -> None:
    print(title, {name: round(seconds * 1e3, 3) for name, seconds in medians.items()}, flush=True)


def _with(name: str, value: int, keyed: KeyedInput, x: torch.Tensor) -> None:
    """``keyed(x)`` with module constant ``name`` set to ``value`` for the call."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        keyed(x)
    finally:
        setattr(module, name, saved)


def pieces(rounds: int) -> None:
    key = SecretKey(bytes(range(32)), block_size=16)
    x = torch.rand(64, 3, 224, 224)
    u8 = (x * 255).to(torch.uint8)
    pieced, whole = (KeyedInput(key, mean=(0.5,) * 3, std=(0.5,) * 3) for _ in range(2))
    _print("(64, 3, 224, 224) pieces:", interleaved_medians({
        "clone": lambda: x.clone(),
        "float, 4 MiB pieces": lambda: pieced(x),
        "float, whole batch": lambda: _with("CHUNK_BYTES", 1 << 40, whole, x),
        "uint8, 4 MiB pieces": lambda: pieced(u8),
        "uint8, whole batch": lambda: _with("CHUNK_BYTES", 1 << 40, whole, u8),
    }, rounds=rounds))


def reuse(rounds: int) -> None:
    key = SecretKey(bytes(range(32)), block_size=4)
    for shape in ((256, 3, 32, 32), (64, 3, 64, 64), (32, 3, 224, 224)):
        x = torch.rand(shape)
        pooled, fresh = (KeyedInput(key, mean=(0.5,) * 3, std=(0.5,) * 3) for _ in range(2))
        _print(f"{shape} reuse:", interleaved_medians({
            "clone": lambda: x.clone(),
            "pool from 1 MiB": lambda: _with("REUSE_MIN_BYTES", 1 << 20, pooled, x),
            "no pool": lambda: _with("REUSE_MIN_BYTES", 1 << 40, fresh, x),
        }, rounds=rounds))


def uint8_step(rounds: int) -> None:
    torch.set_num_threads(1)
    batch, width, rows = 32, 3 * 224 * 224, 8
    x = torch.randint(0, 256, (batch, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    index = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    scale, bias, out = torch.rand(width), torch.rand(width), torch.empty(batch, width)

    def run(step) -> None:
        for start in range(0, batch, rows):
            part = x[start:start + rows]
            step(torch.gather(part, 1, index.expand(part.shape[0], -1)), out[start:start + rows])

    _print("(32, 3, 224, 224) uint8, one thread:", interleaved_medians({
        "gather alone": lambda: run(lambda gathered, dest: None),
        "mixed-dtype multiply-add": lambda: run(lambda gathered, dest: torch.addcmul(bias, gathered, scale, out=dest)),
        "copy_ then multiply-add": lambda: run(
            lambda gathered, dest: torch.addcmul(bias, dest.copy_(gathered), scale, out=dest)),
    }, rounds=rounds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pieces(args.rounds)
    reuse(args.rounds)
    uint8_step(args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
