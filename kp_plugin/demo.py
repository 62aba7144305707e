"""The demo: keygen -> protect (with the unprotected baseline) -> evaluate,
on the embedded digits, then one table.

Run it with ``python -m kp_plugin.demo`` (or ``bash scripts/demo.sh``). It
runs the same ``kp`` commands a user would type, shows them, and prints:
accuracy of the unprotected fine-tune, of the protected model with its key,
mean and best accuracy over 100 random wrong keys, and accuracy on plain
images. Everything is written under ``runs/demo/`` (the key, the protected
checkpoint, the report and its figures).

Example:
    $ python -m kp_plugin.demo                 # the full demo (a few minutes on 2 CPU cores)
    $ python -m kp_plugin.demo --epochs 1 --wrong-keys 10 --output runs/quick
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from ._cli_handlers import auto_threads
from .cli import _image_size, _positive_int, _wrong_keys
from .cli import main as kp_main
from .errors import ConfigurationError, DemoStepError, KPError

__all__ = ["run_demo", "main", "DEFAULT_OUTPUT"]

DEFAULT_OUTPUT = Path("runs") / "demo"
_MARKER = ".kp-demo"


def _recipe_defaults() -> dict:
    """The measured recipe: default scheme, demo block size and epochs."""
    from .keys import DEFAULT_SCHEME
    from .train import DEMO_BLOCK_SIZE, DEMO_EPOCHS

    return {"scheme": "+".join(DEFAULT_SCHEME), "block_size": DEMO_BLOCK_SIZE, "epochs": DEMO_EPOCHS}


def _prepare(output: Path) -> None:
    """Start from a clean demo directory; never delete a directory the demo
    did not create."""
    if output.exists():
        if not (output / _MARKER).is_file():
            if any(output.iterdir()):
                raise ConfigurationError(
                    f"{output} exists and was not made by the demo; choose another --output"
                )
        else:
            for name in ("owner.key", "model"):
                path = output / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    output.mkdir(parents=True, exist_ok=True)
    (output / _MARKER).write_text("made by python -m kp_plugin.demo; safe to delete\n")


def _run(argv: list, timings: dict, label: str) -> None:
    print(f"\n$ kp {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    start = time.perf_counter()
    code = kp_main(argv)
    timings[label] = time.perf_counter() - start
    if code != 0:
        raise DemoStepError(f"`kp {argv[0]}` failed (exit code {code}); see the message above")


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:5.1f}%"


def demo_table(report: dict) -> str:
    """The demo's one table, from a ``report.json`` dict."""
    n = report["num_wrong_keys"]
    rows = [
        ("Unprotected fine-tune (same recipe)", _pct(report.get("unprotected_accuracy"))),
        ("Protected, with the key", _pct(report["key_accuracy"])),
        (f"Wrong keys, mean of {n}", _pct(report["wrong_key_accuracy_mean"])),
        (f"Wrong keys, best of {n}", _pct(report["wrong_key_accuracy_max"])),
        ("Plain images (no key)", _pct(report["plain_accuracy"])),
    ]
    width = max(len(r[0]) for r in rows)
    head = f"{'':{width}}  Accuracy"
    lines = [head, "-" * len(head)] + [f"{name:{width}}  {value:>8}" for name, value in rows]
    lines.append(f"(chance {_pct(report['chance']).strip()}; {report['dataset']}, {report['num_examples']} images; "
                 f"scheme {report['scheme']}, block size {report['block_size']})")
    return "\n".join(lines)


def run_demo(
    *,
    output: Path = DEFAULT_OUTPUT,
    model: str = "tf_efficientnet_lite0",
    data: str = "digits",
    epochs: Optional[int] = None,
    block_size: Optional[int] = None,
    scheme: Optional[str] = None,
    wrong_keys: int = 100,
    image_size: Optional[int] = None,
    pretrained: bool = True,
    device: Optional[str] = None,
    threads: Optional[int] = None,
    quiet: bool = False,
) -> dict:
    """Run keygen -> protect (with baseline) -> evaluate and return the
    report (``report.json`` as a dict, plus ``"timings"`` in seconds).

    Args:
        output: demo directory (created; a previous demo run there is replaced).
        model: timm model name.
        data: ``"digits"``, ``"photos"`` or an ImageFolder directory.
        epochs, block_size, scheme: default: the measured recipe.
        wrong_keys: random wrong keys in the evaluation.
        image_size: default: the dataset's default size.
        pretrained: start from pre-trained weights.
        device, threads, quiet: as for the ``kp`` command.

    Example:
        >>> report = run_demo(epochs=1, wrong_keys=10, output=Path("runs/quick"))   # doctest: +SKIP
    """
    recipe = _recipe_defaults()
    epochs = recipe["epochs"] if epochs is None else epochs
    block_size = recipe["block_size"] if block_size is None else block_size
    scheme = recipe["scheme"] if scheme is None else scheme
    output = Path(output)
    _prepare(output)
    key, checkpoint = output / "owner.key", output / "model"
    runtime = []
    if device:
        runtime += ["--device", device]
    if threads:
        runtime += ["--threads", str(threads)]
    if quiet:
        runtime += ["--quiet"]
    size = ["--image-size", str(image_size)] if image_size else []
    timings: dict = {}
    total = time.perf_counter()
    _run(["keygen", "--block-size", str(block_size), "--scheme", scheme, "-o", str(key)], timings, "keygen")
    _run(["protect", "--model", model, "--data", data, "--key", str(key), "-o", str(checkpoint),
          "--baseline", "--epochs", str(epochs), *size, *([] if pretrained else ["--no-pretrained"]), *runtime],
         timings, "protect")
    _run(["evaluate", str(checkpoint), "--key", str(key), "--wrong-keys", str(wrong_keys), *runtime],
         timings, "evaluate")
    timings["total"] = time.perf_counter() - total
    training = json.loads((checkpoint / "training.json").read_text())
    timings["protected_fine_tune"] = training.get("seconds")
    timings["baseline_fine_tune"] = training.get("baseline_seconds")
    report = json.loads((checkpoint / "report" / "report.json").read_text())
    report["timings"] = timings
    (output / "demo.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report


def _timing_line(timings: dict) -> str:
    def s(name):
        value = timings.get(name)
        return "n/a" if value is None else f"{value:.0f}s"

    return (f"time: total {s('total')} = keygen {s('keygen')} + protect {s('protect')} (protected fine-tune "
            f"{s('protected_fine_tune')}, baseline {s('baseline_fine_tune')}) + evaluate {s('evaluate')}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m kp_plugin.demo``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m kp_plugin.demo",
        description="keygen -> protected fine-tune (+ unprotected baseline) -> evaluation with 100 wrong keys, "
                    "on the embedded digits; prints one table",
        epilog="example:\n  python -m kp_plugin.demo\n  python -m kp_plugin.demo --epochs 1 --wrong-keys 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"default {DEFAULT_OUTPUT}")
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--data", default="digits", help="digits, photos or an ImageFolder directory")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="default: the measured recipe")
    parser.add_argument("--block-size", type=_positive_int, default=None, help="default: the measured recipe")
    parser.add_argument("--scheme", default=None, help="default: the library's default scheme")
    parser.add_argument("--image-size", type=_image_size, default=None)
    parser.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    parser.add_argument("--wrong-keys", type=_wrong_keys, default=100)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: the cores not busy with other work)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    import torch

    if args.threads is None and args.device in (None, "cpu") and not torch.cuda.is_available():
        args.threads = auto_threads()
        print(f"using {args.threads} CPU thread(s) (pass --threads to choose)", flush=True)
    try:
        report = run_demo(output=args.output, model=args.model, data=args.data, epochs=args.epochs,
                          block_size=args.block_size, scheme=args.scheme, wrong_keys=args.wrong_keys,
                          image_size=args.image_size, pretrained=not args.no_pretrained, device=args.device, threads=args.threads, quiet=args.quiet)
    except KPError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 1
    print("\n" + demo_table(report))
    print(_timing_line(report["timings"]))
    print(f"key, protected model and report (report.md, figures) are in {args.output}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
