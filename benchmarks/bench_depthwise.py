"""The weight gradient of each depthwise convolution of EfficientNet-Lite0
at the demo's (32x32) and the photos' (64x64) image size: torch's own
(oneDNN on the CPU) against :func:`kp_plugin._depthwise.depthwise_weight_grad`,
side by side in one process, with the oneDNN implementation torch's call
used (read from ``ONEDNN_VERBOSE`` in a child process).

Only the layers the small-map path takes (a map no larger than the kernel)
are what ``fit`` changes; the others are listed for comparison.

Run: ``.venv/bin/python benchmarks/bench_depthwise.py`` (a minute on 2 CPU
cores); ``--no-write`` prints only. Results go into docs/benchmarks.md
(section ``depthwise-small-maps``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _report import machine_description, write_section  # noqa: E402
from bench_transform import interleaved_medians  # noqa: E402

from kp_plugin._depthwise import _CONV2D, _small_map_call, depthwise_call, depthwise_weight_grad  # noqa: E402
from kp_plugin.pretrained import load_efficientnet_lite0  # noqa: E402

BATCH = 64


class _Recorder(TorchFunctionMode):
    """Records (input shape, kernel, stride, padding, dilation) of every
    depthwise conv2d call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = depthwise_call(args, kwargs) if func in _CONV2D else None
        if call is not None:
            x, weight, _, stride, padding, dilation = call
            entry = (tuple(x.shape[1:]), tuple(weight.shape[-2:]), stride, padding, dilation)
            if entry not in self.calls:
                self.calls.append(entry)
        return func(*args, **kwargs)


def depthwise_layers(size: int) -> list:
    model = load_efficientnet_lite0(num_classes=10).eval()
    recorder = _Recorder()
    with torch.no_grad(), recorder:
        model(torch.zeros(1, 3, size, size))
    return recorder.calls


def _tensors(layer: tuple) -> tuple:
    (c, h, w), kernel, stride, padding, dilation = layer
    x = torch.randn(BATCH, c, h, w).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c, 1, *kernel).contiguous(memory_format=torch.channels_last)
    y = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, c)
    return x, weight, torch.randn_like(y)


def _torch_weight_grad(x, weight, g, layer):
    _, _, stride, padding, dilation = layer
    return torch.ops.aten.convolution_backward(g, x, weight, None, list(stride), list(padding), list(dilation),
                                               False, [0, 0], x.shape[1], [False, True, False])[1]


def onednn_implementations(layers: list) -> list:
    """The oneDNN implementation of torch's weight gradient for each layer
    (a child process with ONEDNN_VERBOSE=1)."""
    code = ("import json, sys, torch; sys.path.insert(0, {here!r}); import bench_depthwise as b; "
            "layers = [tuple(tuple(v) for v in layer) for layer in json.loads(sys.argv[1])]\n"
            "for layer in layers:\n"
            "    x, w, g = b._tensors(layer); print('LAYER', flush=True); b._torch_weight_grad(x, w, g, layer)\n")
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run([sys.executable, "-c", code.format(here=str(Path(__file__).resolve().parent)),
                          json.dumps(layers)], capture_output=True, text=True, env=env, check=True).stdout
    names = []
    for chunk in out.split("LAYER")[1:]:
        found = [line.split(",")[6] for line in chunk.splitlines()
                 if ",exec,cpu,convolution," in line and "backward_weights" in line]
        names.append(found[0] if found else "(not oneDNN)")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, totals = [], {}
    for size in (32, 64):
        layers = depthwise_layers(size)
        implementations = onednn_implementations(layers)
        for layer, implementation in zip(layers, implementations):
            x, weight, g = _tensors(layer)
            weight.requires_grad_(True)
            takes = _small_map_call((x, weight, None) + tuple(layer[2:]) + (x.shape[1],), {}) is not None
            ours = depthwise_weight_grad(x, g, layer[1], *layer[2:])
            # Against torch's gradient in float64: a float32 sum over up to 64 x 32 x 32 products differs
            # from another float32 order by more than a fixed tolerance (both are rounding, not error).
            exact = _torch_weight_grad(x.double(), weight.detach().double(), g.double(), layer)
            torch.testing.assert_close(ours.double(), exact, rtol=0, atol=1e-5 * float(exact.abs().max()))
            t = interleaved_medians({
                "torch": lambda: _torch_weight_grad(x, weight.detach(), g, layer),
                "small-map": lambda: depthwise_weight_grad(x, g, layer[1], *layer[2:]),
            }, rounds=args.rounds)
            (c, h, w), kernel, stride, padding, _ = layer
            used = t["small-map"] if takes else t["torch"]
            totals[size] = [a + b for a, b in zip(totals.get(size, [0.0, 0.0]), [t["torch"], used])]
            row = (f"| {size}x{size} | {c} ch, {h}x{w} map, {kernel[0]}x{kernel[1]} kernel, stride {stride[0]}, "
                   f"padding {padding[0]} | {implementation} | {t['torch'] * 1e3:.2f} | {t['small-map'] * 1e3:.2f} | "
                   f"{'yes' if takes else 'no'} |")
            rows.append(row)
            print(row, flush=True)
    lines = [f"{size}x{size}: {torch_s * 1e3:.1f} ms with torch's, {used_s * 1e3:.1f} ms as fit runs them"
             for size, (torch_s, used_s) in totals.items()]
    print("\n".join(lines))
    if args.no_write:
        return 0
    text = "\n".join([
        "## Depthwise convolutions on small maps (`benchmarks/bench_depthwise.py`)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_depthwise.py`. Machine: {machine_description()}. "
        "The weight gradient of each depthwise convolution of "
        f"EfficientNet-Lite0 (one row per distinct shape; timm's same-padding layers are padded first), batch "
        f"{BATCH}, channels-last, median of {args.rounds} interleaved calls, ms: torch's own call (the oneDNN "
        "implementation it used, from `ONEDNN_VERBOSE`) and `kp_plugin._depthwise.depthwise_weight_grad`. "
        "*small-map path*: whether `fit` takes it for that layer (a map no larger than the kernel); the two "
        "results agree to float rounding (checked).",
        "",
        "| images | layer | oneDNN implementation | torch ms | small-map ms | small-map path |",
        "|---|---|---|---:|---:|---|",
        *rows,
        "",
        "Sum over the layers, one call each: " + "; ".join(lines) + ".",
    ])
    write_section("depthwise-small-maps", text)
    print("wrote section depthwise-small-maps of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
