"""``kp push`` and ``kp pull``: the Hub from the shell.

The token comes from ``HF_TOKEN`` or ``hf auth login`` (never a command-line
argument: those show up in ``ps``); the key from ``--key FILE`` or the
``KP_KEY`` environment variable. Imports stay lazy so ``kp --help`` is fast.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import textwrap
from pathlib import Path

from ._cli_handlers import KEY_ENV, cli_key

__all__ = ["register"]


def _subcommand(subparsers, name: str, *, help: str, example: str, handler) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help, description=help,
        epilog="example:\n" + textwrap.indent(textwrap.dedent(example).strip(), "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=handler)
    return parser


def _common(parser: argparse.ArgumentParser, *, pushing: bool) -> None:
    parser.add_argument("--revision", default=None,
                        help="branch to push to (created if missing)" if pushing else "branch, tag or commit")
    parser.add_argument("--endpoint", default=None,
                        help="Hub URL (default: HF_ENDPOINT or https://huggingface.co); self-hosted hubs "
                             "usually need HF_HUB_DISABLE_XET=1 for uploads")


def register(subparsers) -> None:
    """Add ``push`` and ``pull`` to the ``kp`` command."""
    push = _subcommand(
        subparsers, "push",
        help="publish a protected checkpoint on the Hugging Face Hub (private by default; the key is never sent)",
        example="""
            export HF_TOKEN=hf_...            # a token with write access
            kp push out/ my-org/digits-locked --key owner.key
        """,
        handler=_push,
    )
    push.add_argument("checkpoint", help="directory written by kp protect / save_protected")
    push.add_argument("repo_id", help="org/name on the Hub")
    push.add_argument("--key", default=None,
                      help=f"the owner's key file (or set {KEY_ENV}): lets the leak scan look for the key's own "
                           "bytes; without it only key files are caught")
    push.add_argument("--public", action="store_true",
                      help="create the repository public (default private; the weights are useless without the key)")
    push.add_argument("-m", "--message", default=None, help="commit message")
    push.add_argument("--report", default=None, help="evaluation report.json for the model card "
                                                      "(default: CHECKPOINT/report/report.json, as kp evaluate "
                                                      "writes it, or CHECKPOINT/report.json)")
    push.add_argument("--base-model", default=None, help="Hub id of the pre-trained base, for the model card")
    push.add_argument("--include", action="append", default=[], metavar="GLOB",
                      help="also upload files matching this relative-path glob (repeatable); by default only "
                           "the checkpoint, report and training.json go up")
    _common(push, pushing=True)

    pull = _subcommand(
        subparsers, "pull",
        help="download a protected model, check it is the key's, and load it (optionally copy it to a folder)",
        example="""
            kp pull my-org/digits-locked --key owner.key -o model/
            KP_KEY="$(cat owner.key)" HF_HUB_OFFLINE=1 kp pull my-org/digits-locked   # from the cache
        """,
        handler=_pull,
    )
    pull.add_argument("repo_id", help="org/name on the Hub")
    pull.add_argument("--key", default=None, help=f"the owner's key file (default: the {KEY_ENV} environment variable)")
    pull.add_argument("-o", "--output", default=None,
                      help="copy the checkpoint here (weights, config, protection.json; usable with kp evaluate): a "
                           "new or empty folder, or one holding this key's checkpoint, which is replaced as one change")
    pull.add_argument("--cache-dir", default=None, help="Hub cache folder (default: HF_HUB_CACHE)")
    pull.add_argument("--force-download", action="store_true",
                      help="download every file again, even if cached (after a damaged download)")
    _common(pull, pushing=False)


def _push(args: argparse.Namespace) -> int:
    from .hub import push_protected

    key = cli_key(args.key, required=False)
    info = push_protected(
        args.checkpoint, args.repo_id, private=not args.public, revision=args.revision,
        commit_message=args.message, key=key, report=args.report, base_model=args.base_model,
        include=args.include, endpoint=args.endpoint,
    )
    # --public creates a new repository public; one that exists keeps its
    # visibility (huggingface_hub ignores it there), so say only what is sure.
    visibility = "public if it was new; an existing repository keeps its visibility" if args.public else "private"
    print(f"pushed {args.checkpoint} to {args.repo_id} ({visibility}): {info.commit_url}")
    if key is None:
        print(f"note: without --key (or {KEY_ENV}) the leak scan only looked for key files")
    return 0


def _pull(args: argparse.Namespace) -> int:
    from .checkpoint import ProtectionConfig, refuse_other_key_checkpoint
    from .autoload import load_protected_auto
    from .hub import download_protected

    key = cli_key(args.key)
    if args.output:  # before downloading: what is there would be replaced
        refuse_other_key_checkpoint(args.output, key.fingerprint, remedy="remove it first")
        _refuse_other_files(Path(args.output))
    folder = download_protected(args.repo_id, key=key, revision=args.revision, cache_dir=args.cache_dir,
                                endpoint=args.endpoint, force_download=args.force_download)
    load_protected_auto(folder, key, source=args.repo_id)  # the weights fit the architecture
    protection = ProtectionConfig.load(folder)
    where = folder
    if args.output:
        where = Path(args.output)
        _copy_checkpoint(folder, where)
    print(f"loaded {args.repo_id}: {protection.architecture}, {protection.num_classes} classes, "
          f"scheme {'+'.join(protection.scheme)}, block size {protection.block_size}, key {key.fingerprint} "
          f"matches; files in {where}")
    return 0


def _refuse_other_files(out: Path) -> None:
    """``kp pull -o`` writes into a new or empty folder, or over a checkpoint
    (of the same key: :func:`refuse_other_key_checkpoint` is checked first);
    into a folder of other files it would replace any of the same name
    (a ``config.json`` of the user's) and mix the model with the rest."""
    from .checkpoint import PROTECTION_FILE
    from .errors import ConfigurationError

    if out.exists() and not out.is_dir():
        raise ConfigurationError(f"-o {out} is a file; pass a folder (new, empty, or a checkpoint of this key)")
    if out.is_dir() and not (out / PROTECTION_FILE).is_file() and any(out.iterdir()):
        raise ConfigurationError(
            f"-o {out} is not empty and holds no protected checkpoint; the model's files (config.json, "
            "model.safetensors, protection.json, ...) would replace files of the same name there: choose a new or "
            "empty folder"
        )


def _copy_checkpoint(folder: Path, out: Path) -> None:
    """Copy the pulled files into ``out`` as one change: each to a temporary
    file beside its place first, then all renamed in (``protection.json``
    last; a failure puts the previous files back), so a failed copy leaves
    what was there, not half a checkpoint."""
    from .checkpoint import PROTECTION_FILE, write_together
    from .errors import CheckpointWriteError, first_line

    out.mkdir(parents=True, exist_ok=True)
    sources = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.name == PROTECTION_FILE)
    try:  # the cache holds symlinks: copy their content
        write_together([(out / source.name, functools.partial(shutil.copyfile, source)) for source in sources])
    except OSError as exc:
        raise CheckpointWriteError(
            f"cannot copy the model into {out} ({first_line(exc)}); what was there is unchanged, and the model "
            f"stays in the Hub cache ({folder})"
        ) from None
