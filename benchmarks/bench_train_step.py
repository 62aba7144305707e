"""Speed of one protected training step on CPU: the default NCHW layout
against channels-last (``TrainConfig.channels_last``), side by side in one
process.

The step is exactly what ``kp_plugin.train.fit`` runs for the demo recipe:
the pre-trained EfficientNet-Lite0 behind ``wrap_model`` (default scheme),
the default objective (cross-entropy with the key plus the wrong-key term on
half the batch), backward, AdamW. Two copies of the same model, one per
layout, are stepped alternately (one step each per round) and each reports
its median, so a load spike hits both alike. The ratio is the speed-up of
channels-last; both copies compute the same function (checked on the first
batch).

Run: ``.venv/bin/python benchmarks/bench_train_step.py`` (about a minute on
2 CPU cores); ``--threads 1`` for one thread; ``--quick`` for a smoke run
that writes nothing. Results go into docs/benchmarks.md (section
``train-step``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine_description, write_section  # noqa: E402
from bench_transform import interleaved_medians  # noqa: E402

from kp_plugin import SecretKey, wrap_model  # noqa: E402
from kp_plugin.objectives import DEFAULT_OBJECTIVE, logits_of  # noqa: E402
from kp_plugin.pretrained import load_efficientnet_lite0  # noqa: E402
from kp_plugin.train import DEMO_BLOCK_SIZE  # noqa: E402

#: (image size, batch): the demo's digits and the photos setting.
CASES = [(32, 64), (64, 64)]


def step_times(size: int, batch: int, *, rounds: int) -> dict:
    """Median seconds of one training step in each layout."""
    torch.manual_seed(0)
    key = SecretKey(bytes(range(32)), block_size=DEMO_BLOCK_SIZE)
    nchw = wrap_model(load_efficientnet_lite0(num_classes=10), key)
    last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    nchw.eval(), last.eval()
    with torch.no_grad():
        torch.testing.assert_close(nchw(images), last(images), rtol=1e-3, atol=1e-3)
    runs = {}
    for name, model in (("NCHW (contiguous)", nchw), ("channels_last", last)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer) -> None:
            loss, _ = DEFAULT_OBJECTIVE(model, images, labels, logits_of(model(images)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        runs[name] = step
    return interleaved_medians(runs, rounds=rounds)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 32x32 only, write nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = CASES[:1] if args.quick else CASES
    rows = []
    for size, batch in cases:
        t = step_times(size, batch, rounds=2 if args.quick else args.rounds)
        base = t["NCHW (contiguous)"]
        for name, seconds in t.items():
            rows.append(f"| {size}x{size}, batch {batch} | {name} | {seconds * 1e3:.0f} | {base / seconds:.2f}x |")
            print(f"{size}x{size} batch {batch}  {name:20s} {seconds * 1e3:8.1f} ms  speed-up {base / seconds:.2f}x")
    if args.quick:
        return 0
    text = "\n".join([
        "## One protected training step: NCHW vs channels-last (`benchmarks/bench_train_step.py`)",
        "",
        f"Machine: {machine_description()}. EfficientNet-Lite0 (pre-trained) behind `wrap_model`, default scheme, "
        f"M={DEMO_BLOCK_SIZE}, the default objective (wrong-key pass on half the batch), backward, AdamW; the two "
        f"layouts stepped alternately, median of {args.rounds} steps each.",
        "",
        "| images | layout | ms per step | speed-up |",
        "|---|---|---|---|",
        *rows,
        "",
        "`kp_plugin.train.fit` trains channels-last by default (`TrainConfig.channels_last`).",
    ])
    section = "train-step" if args.threads == 2 else f"train-step-{args.threads}t"
    write_section(section, text)
    print(f"wrote section {section} of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
