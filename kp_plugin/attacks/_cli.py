"""``kp attack``: run the attack suite on a ``kp protect`` checkpoint and
write report.json, report.md and plots."""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

__all__ = ["register", "attack"]

EXAMPLE = """\
kp attack out/ --key owner.key --data digits --attacks all --budget quick
kp attack out/ --key owner.key --attacks wrong_keys,random_search --budget paper -o out/attack-paper
"""


def register(subparsers) -> None:
    """Add ``kp attack`` to the ``kp`` command."""
    from ..cli import _dataset_image_size, _seed, _threads
    from .suite import ATTACKS, BUDGETS

    parser = subparsers.add_parser(
        "attack",
        help="attack a protected checkpoint (wrong keys, key search, fine-tuning, key estimation, "
             "weight matching); writes report.json, report.md and plots",
        description="Measure how much an attacker without the key gets from a protected checkpoint.",
        epilog="example:\n" + textwrap.indent(EXAMPLE, "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", help="directory written by kp protect or save_protected (timm or transformers)")
    parser.add_argument("--key", default=None,
                        help="the owner's key file (used to score the attacks, never by them; default: KP_KEY)")
    parser.add_argument("--data", default=None,
                        help="'digits', 'photos' or an ImageFolder directory (default: the checkpoint's dataset)")
    parser.add_argument("--image-size", type=_dataset_image_size, default=None,
                        help="image side (default: the checkpoint's)")
    parser.add_argument("--attacks", default="all", type=_attack_list, help=f"'all' or a comma list of: {', '.join(ATTACKS)}")
    parser.add_argument("--budget", default="quick", choices=tuple(BUDGETS),
                        help="how hard to try: smoke (seconds), quick (the default), standard, paper (20,000 random "
                             "keys)")
    parser.add_argument("--base", default="auto",
                        help="the public pre-trained base for fine-tuning and weight matching: 'auto' (the "
                             "checkpoint's architecture, pre-trained), a timm model name, a transformers model id or "
                             "directory (for a transformers checkpoint), or 'none' to skip")
    parser.add_argument("--base-weights", default="pretrained", choices=("pretrained", "random"),
                        help="'random' builds the base without pre-trained weights (a lower bound; offline tests)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="seeds torch and every attack: the same seed gives the same report (default 0)")
    parser.add_argument("-o", "--output", default=None, help="report directory (default CHECKPOINT/attack)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA if available)")
    parser.add_argument("--threads", type=_threads, default=None, help="CPU threads for torch")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=attack)


def _attack_list(text: str) -> str:
    from ._candidate import AttackError
    from .suite import parse_attacks

    try:
        parse_attacks(text)
    except AttackError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _public_base(args: argparse.Namespace, checkpoint: Path, protection, *, num_classes: int):
    """A function returning a fresh copy of the attacker's public base (for
    the fine-tuning attack and weight matching), as ``--base`` and
    ``--base-weights`` ask."""
    from ..autoload import build_transformers_model, native_library
    from ..errors import ConfigurationError

    pretrained = args.base_weights == "pretrained"
    if native_library(checkpoint) == "transformers":
        if args.base == "auto" and pretrained:
            raise ConfigurationError(
                f"{checkpoint} is a transformers model, whose checkpoint does not name the public model it was "
                "fine-tuned from; pass --base ID_OR_DIR (that pre-trained model), --base-weights random, "
                "or --base none"
            )
        if args.base == "auto":
            return lambda: build_transformers_model(checkpoint)

        def from_pretrained():
            import transformers

            return transformers.AutoModelForImageClassification.from_pretrained(
                args.base, num_labels=num_classes, ignore_mismatched_sizes=True)

        return from_pretrained

    from ..timm import create_base_model

    name = protection.architecture if args.base == "auto" else args.base
    if not name:
        raise ConfigurationError(f"{checkpoint} does not record its architecture; pass --base NAME or --base none")
    return lambda: create_base_model(name, pretrained=pretrained, num_classes=num_classes)


#: Attacks that compare with the public pre-trained base (``--base``).
NEEDS_BASE = ("weight_matching", "finetune")


def _check_output(out: Path) -> None:
    """A usage error, before any work, for an ``-o`` the report cannot go to."""
    from .._cli_handlers import _is_key_file, check_output_folder, refuse_other_report
    from ..cli import _UsageError
    from .report import FIGURES, REPORT_JSON, REPORT_MD

    check_output_folder(out)
    refuse_other_report(out, "attack")
    for name in (REPORT_JSON, REPORT_MD, *FIGURES.values()):
        if _is_key_file(out / name):
            raise _UsageError(f"{out / name} is a key file, which the attack report would replace (losing the key "
                              "loses the models trained with it); move it out of the folder or choose another -o")


def _check_dependencies(attacks: list) -> None:
    """:class:`ConfigurationError` naming the install command when a module
    the chosen attacks (or the report's plots) import is missing, before any
    attack runs rather than after some did."""
    import importlib

    from ..errors import ConfigurationError

    needed = {"matplotlib": "the report's plots"}
    if set(attacks) - {"weight_matching"}:
        needed["tqdm.auto"] = "progress bars"
    if {"weight_matching", "key_estimation"} & set(attacks):
        needed["scipy.optimize"] = "weight_matching and key_estimation"
    missing = []
    for module, why in needed.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(f"{module.split('.')[0]} ({why})")
    if missing:
        raise ConfigurationError(f"kp attack needs {', '.join(missing)}; install them with "
                                 'pip install "kp-plugin[demo]"')


def _build_public_base(args: argparse.Namespace, checkpoint: Path, protection, *, num_classes: int, needed: list):
    """The public base, built once before any attack runs (each attack gets a
    copy): an offline failure then costs no finished attack."""
    from ..errors import ConfigurationError, first_line
    from ..timm import PretrainedWeightsError

    make = _public_base(args, checkpoint, protection, num_classes=num_classes)
    try:
        return make()
    except (PretrainedWeightsError, OSError) as exc:
        if args.base_weights != "pretrained":
            raise
        detail = "" if isinstance(exc, PretrainedWeightsError) else f" ({first_line(exc)})"
        name = protection.architecture if args.base == "auto" else args.base
        raise ConfigurationError(
            f"cannot fetch the pre-trained weights of the public base {name!r} ({', '.join(needed)} compare with "
            f"it){detail}; without Hub access pass --base-weights random (a randomly initialized base: a lower "
            f"bound for the attacker) or --base none (skips {', '.join(needed)})"
        ) from None


def _warn_of_key_files(out: Path, key) -> None:
    """Key files already under ``out`` stay (they are the user's); say so, as
    ``kp evaluate`` does for its report folder."""
    from ..checkpoint import find_key_material

    if out.is_dir():
        for path in find_key_material(out, key):
            print(f"warning: the key file {path} lies inside {out} (kp attack leaves it there); move it out before "
                  "sharing the directory", file=sys.stderr)


def _refuse_key_material(out: Path, names: list, key) -> None:
    """Remove the files this run wrote that hold key material (none should)
    and raise :class:`KeyLeakError`; nothing else under ``out`` is touched."""
    from ..checkpoint import find_key_material
    from ..errors import KeyLeakError

    leaks = [out / name for name in names if (out / name).is_file() and find_key_material(out / name, key)]
    if leaks:  # cannot happen by construction; refuse loudly if it ever does
        for path in leaks:
            path.unlink()
        raise KeyLeakError(f"the attack report contained key material and was removed: {', '.join(map(str, leaks))}")


def attack(args: argparse.Namespace) -> int:
    """The ``kp attack`` handler."""
    import torch

    from ..data import load_dataset
    from .._cli_handlers import _runtime, _warn_if_unsplit, check_classes, open_checkpoint, writing_into
    from .report import report_files, write_attack_report
    from .suite import parse_attacks, run_attacks

    device = _runtime(args)
    attacks = parse_attacks(args.attacks)
    checkpoint = Path(args.checkpoint)
    out = Path(args.output) if args.output else checkpoint / "attack"
    _check_output(out)
    _check_dependencies(attacks)
    torch.manual_seed(args.seed)  # as kp protect: a random base (--base-weights random) is the seed's
    model, key, protection, data, size = open_checkpoint(args, device)
    _warn_of_key_files(out, key)
    test_set = load_dataset(data, split="test", image_size=size)
    check_classes(protection, test_set, f"{data} (test)")
    _warn_if_unsplit(test_set, data)
    train_set = load_dataset(data, split="train", image_size=size) if {"finetune", "key_estimation"} & set(attacks) else None
    if train_set is not None:
        check_classes(protection, train_set, f"{data} (train)")  # labelled as the test set is

    public_base = None
    needs_base = [name for name in attacks if name in NEEDS_BASE]
    if args.base != "none" and needs_base:
        public_base = _build_public_base(args, checkpoint, protection, num_classes=len(test_set.classes),
                                         needed=needs_base)

    report = run_attacks(
        model, test_set, train_set=train_set, public_base=public_base, attacks=attacks, budget=args.budget,
        seed=args.seed, device=device, progress=not args.quiet,
        meta={"model": protection.architecture, "dataset": str(data),
              "base": None if public_base is None else f"{args.base} ({args.base_weights})"},
    )
    with writing_into(out):
        write_attack_report(report, out)
    _refuse_key_material(out, report_files(report), key)
    for target in report.targets():
        status = ("met" if target.met else f"MISSED by {-target.margin:.1f}" if target.met is False
                  else f"not applicable: {target.no_verdict}")
        print(f"{target.name}: {target.measured:+.1f} {target.unit} (limit {target.limit:g}) {status}")
    for name, why in report.skipped.items():
        print(f"skipped {name}: {why}", file=sys.stderr)
    print(f"report written to {out}")
    return 0
