"""Where KeyedInput's time goes on CPU, against the memory-copy floor.

    .venv/bin/python benchmarks/transform_allocation.py

For the two batches of issue 2, median of 15 calls each (2 threads):
``clone``; ``torch.gather`` of the transform's index into a fresh tensor and
into a preallocated one (the difference is the cost of a fresh allocation:
page faults on first touch); other ways to write the same gather
(``index_select``, advanced indexing, ``take_along_dim``); ``KeyedInput``
with and without its range check. Then, for scale, one no-grad forward of
EfficientNet-Lite0 on the 224x224 batch beside KeyedInput on it. Prints
milliseconds; results in docs/benchmarks.md ("Where the transform's time goes").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._report import median_ms as _median  # noqa: E402
from kp_plugin import SecretKey  # noqa: E402
from kp_plugin.module import KeyedInput  # noqa: E402


def _ms(fn, n: int = 15) -> float:
    fn()  # _median warms up once more
    return round(_median(fn, repeats=n), 2)


def main() -> int:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for shape, block in (((64, 3, 224, 224), 16), ((256, 3, 32, 32), 4)):
        x = torch.rand(shape)
        keyed = KeyedInput(SecretKey.generate(block_size=block), mean=(0.5,) * 3, std=(0.5,) * 3)
        unchecked = KeyedInput(keyed.key, mean=(0.5,) * 3, std=(0.5,) * 3, check_range=False)
        keyed(x), unchecked(x)
        flat = x.flatten(1)
        index = keyed.source_index.expand(flat.shape[0], -1)
        out = torch.empty_like(flat)
        row = {
            "clone": _ms(lambda: x.clone()),
            "gather (fresh output)": _ms(lambda: torch.gather(flat, 1, index)),
            "gather (preallocated output)": _ms(lambda: torch.gather(flat, 1, index, out=out)),
            "index_select": _ms(lambda: flat.index_select(1, keyed.source_index)),
            "advanced indexing": _ms(lambda: flat[:, keyed.source_index]),
            "take_along_dim": _ms(lambda: torch.take_along_dim(flat, index, 1)),
            "KeyedInput": _ms(lambda: keyed(x)),
            "KeyedInput, check_range=False": _ms(lambda: unchecked(x)),
        }
        print(shape, f"M={block}", row, flush=True)
    from kp_plugin.pretrained import load_efficientnet_lite0

    model = load_efficientnet_lite0(1000).eval()
    x = torch.rand(64, 3, 224, 224)
    keyed = KeyedInput(SecretKey.generate(block_size=16), mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        print("EfficientNet-Lite0 forward, (64, 3, 224, 224):", _ms(lambda: model(x), n=5),
              "ms; KeyedInput on it:", _ms(lambda: keyed(x)), "ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
