"""Speed of one protected training step on CPU, side by side in one
process: the NCHW layout, channels-last (``TrainConfig.channels_last``),
and channels-last with the small-map depthwise weight gradient
(``TrainConfig.small_map_depthwise``; what ``kp_plugin.train.fit`` runs).

The step is exactly what ``fit`` runs for the demo recipe: the pre-trained
EfficientNet-Lite0 behind ``wrap_model`` (default scheme), the default
objective (cross-entropy with the key plus the wrong-key term on half the
batch), backward, AdamW. One copy of the same model per candidate; the
copies are stepped in turn (one step each per round) and each reports its
median, so a load spike hits all alike. Speed-ups are against NCHW. All
compute the same function (checked on the first batch), and the small-map
gradients match torch's (checked before timing).

Run: ``.venv/bin/python benchmarks/bench_train_step.py`` (a few minutes on
2 CPU cores); ``--threads 1`` for one thread; ``--quick`` for a smoke run
that writes nothing. Results go into docs/benchmarks.md (section
``train-step``, or ``train-step-1t``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine_description, write_section  # noqa: E402
from bench_transform import interleaved_medians  # noqa: E402

from kp_plugin import SecretKey, wrap_model  # noqa: E402
from kp_plugin._depthwise import small_map_depthwise  # noqa: E402
from kp_plugin.objectives import DEFAULT_OBJECTIVE, logits_of  # noqa: E402
from kp_plugin.pretrained import load_efficientnet_lite0  # noqa: E402
from kp_plugin.train import DEMO_BLOCK_SIZE  # noqa: E402

#: (image size, batch): the demo's digits and the photos setting.
CASES = [(32, 64), (64, 64)]


NCHW, LAST, LAST_TORCH_DW = "NCHW (contiguous)", "channels_last, fit's default", "channels_last, torch's depthwise grad"


def step_times(size: int, batch: int, *, rounds: int) -> dict:
    """Median seconds of one training step of each candidate."""
    torch.manual_seed(0)
    key = SecretKey(bytes(range(32)), block_size=DEMO_BLOCK_SIZE)
    nchw = wrap_model(load_efficientnet_lite0(num_classes=10), key)
    last = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    last_torch = copy.deepcopy(last)
    images, labels = torch.rand(batch, 3, size, size), torch.randint(0, 10, (batch,))
    for model in (nchw, last, last_torch):
        model.eval()
    with torch.no_grad():
        torch.testing.assert_close(nchw(images), last(images), rtol=1e-3, atol=1e-3)
    check_gradients(last, images, labels)
    runs = {}
    for name, model, small_maps in ((NCHW, nchw, True), (LAST, last, True), (LAST_TORCH_DW, last_torch, False)):
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, optimizer=optimizer, small_maps=small_maps) -> None:
            with small_map_depthwise() if small_maps else contextlib.nullcontext():
                loss, _ = DEFAULT_OBJECTIVE(model, images, labels, logits_of(model(images)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        runs[name] = step
    return interleaved_medians(runs, rounds=rounds)


def check_gradients(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> None:
    """The small-map depthwise path gives torch's gradients (to float
    rounding: within 1e-5 of each tensor's largest entry) for this model and
    batch."""
    grads = []
    for context in (contextlib.nullcontext, small_map_depthwise):
        fresh = copy.deepcopy(model).train()
        torch.manual_seed(1)  # the objective's wrong keys
        with context():
            loss, _ = DEFAULT_OBJECTIVE(fresh, images, labels, logits_of(fresh(images)))
        loss.backward()
        grads.append([p.grad for p in fresh.parameters()])
    for torch_grad, small_map_grad in zip(*grads):
        scale = float(torch_grad.abs().max())
        torch.testing.assert_close(small_map_grad, torch_grad, rtol=0, atol=1e-5 * scale + 1e-12)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="2 rounds, 32x32 only, write nothing")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = CASES[:1] if args.quick else CASES
    rows, gains = [], []
    for size, batch in cases:
        t = step_times(size, batch, rounds=2 if args.quick else args.rounds)
        base = t[NCHW]
        for name, seconds in t.items():
            rows.append(f"| {size}x{size}, batch {batch} | {name} | {seconds * 1e3:.0f} | {base / seconds:.2f}x |")
            print(f"{size}x{size} batch {batch}  {name:40s} {seconds * 1e3:8.1f} ms  speed-up {base / seconds:.2f}x")
        gains.append(f"{size}x{size}: {t[LAST_TORCH_DW] / t[LAST]:.2f}x")
    if args.quick:
        return 0
    text = "\n".join([
        "## One protected training step: memory layout and the small-map depthwise gradient "
        "(`benchmarks/bench_train_step.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_train_step.py --threads {args.threads}`. "
        f"Machine: {machine_description()}. EfficientNet-Lite0 (pre-trained) behind `wrap_model`, default scheme, "
        f"M={DEMO_BLOCK_SIZE}, the default objective (wrong-key pass on half the batch), backward, AdamW; the "
        f"candidates stepped in turn, median of {args.rounds} steps each. NCHW runs with the small-map depthwise "
        "gradient too.",
        "",
        "| images | candidate | ms per step | speed-up vs NCHW |",
        "|---|---|---|---|",
        *rows,
        "",
        "`kp_plugin.train.fit` trains channels-last (`TrainConfig.channels_last`) with the small-map depthwise "
        "weight gradient on the CPU (`TrainConfig.small_map_depthwise`); that gradient against torch's own: "
        + ", ".join(gains) + " faster steps.",
    ])
    section = "train-step" if args.threads == 2 else f"train-step-{args.threads}t"
    write_section(section, text)
    print(f"wrote section {section} of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
