"""Where the keyed image processor's time goes, next to its base.

Times (median of 15, one thread) the base ViT processor with and without
its rescale + normalize, the keyed processor, and the keyed processor's two
parts: the base resize it reuses and the keyed step (gather + multiply-add)
on the resized uint8 batch; then the uint8 gather alone. Prints milliseconds
per call; docs/transformers.md ("Throughput") cites a run of it.

    .venv/bin/python benchmarks/profile_processor.py [--images 32]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import median_ms as _median_ms  # noqa: E402
from bench_processor import _images  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--scheme", default="shuffle+np")
    args = parser.parse_args(argv)

    from transformers import ViTImageProcessor

    from kp_plugin import SecretKey
    from kp_plugin.hf import KeyedImageProcessor

    torch.set_num_threads(1)
    images = _images(args.images, 256)
    base = ViTImageProcessor()
    keyed = KeyedImageProcessor(ViTImageProcessor(), SecretKey.generate(block_size=16, scheme=args.scheme))
    resized, _ = keyed._resized(keyed.image_processor, images)
    keyed._keyed(resized)  # compiles the plan for this size
    flat = resized.flatten(1)
    index = keyed._keyed.source_index.expand(flat.shape[0], -1)
    rows = [
        ("base: resize + rescale + normalize", lambda: base(images, return_tensors="pt")),
        ("base: resize only", lambda: base(images, do_rescale=False, do_normalize=False, return_tensors="pt")),
        ("keyed: everything", lambda: keyed(images, return_tensors="pt")),
        ("keyed: the base resize it reuses", lambda: keyed._resized(keyed.image_processor, images)),
        ("keyed: keyed step on the uint8 batch", lambda: keyed._keyed(resized)),
        ("keyed: uint8 gather alone", lambda: torch.gather(flat, 1, index)),
    ]
    print(f"{args.images} images 256x256 -> 224x224, {args.scheme}, block size 16, one thread; ms per call")
    for name, fn in rows:
        print(f"{name:40s} {_median_ms(fn):7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
