"""What ``push_protected`` uploads from a folder, and the scan that keeps
the key off the Hub: key bytes, their hex / base64 forms, the serialized
permutation, key files."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Mapping, Optional

from ._cli_handlers import RESUME_DIR
from .errors import KeyLeakError
from .checkpoint import bytes_contain_any, leak_needles, still_there_and_contains
from .keys import SecretKey
from .protection_report import PRIVATE_DIR

CARD_FILE = "README.md"

#: What a protected checkpoint folder publishes by default: the weights, the
#: native configs, protection.json, and the evaluation report and training
#: summary when present. Not the per-epoch training state (``training/``).
UPLOAD_PATTERNS = (
    "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "config.json", "preprocessor_config.json", "protection.json",
    "report.json", "report/*", "training.json",
)


#: Folders of a ``kp protect`` / ``kp evaluate`` output that stay with the
#: owner whatever ``include`` says: ``training/`` (optimizer state; with
#: ``--distill`` the unprotected teacher) and ``private/`` (plain images
#: beside keyed ones).
OWNER_ONLY_DIRS = (RESUME_DIR, PRIVATE_DIR)


def _files_to_upload(directory: Path, include: Iterable[str] = ()) -> dict:
    """``path_in_repo -> local path``: the folder's files matching
    :data:`UPLOAD_PATTERNS` or ``include`` (globs on the relative path; a
    ``*`` also crosses ``/``), never hidden ones, an old model card, or
    anything under :data:`OWNER_ONLY_DIRS`."""
    patterns = tuple(UPLOAD_PATTERNS) + tuple(include)
    return {
        rel: path for rel, path in _folder_files(directory).items()
        if rel != CARD_FILE and not any(p.startswith(".") for p in rel.split("/"))
        and not any(part in OWNER_ONLY_DIRS for part in rel.split("/")[:-1])
        and any(fnmatch.fnmatchcase(rel, pattern) for pattern in patterns)
    }


def _folder_files(directory: Path) -> dict:
    """Every regular file under ``directory`` (relative posix path -> path),
    skipping ``.git``."""
    return {
        path.relative_to(directory).as_posix(): path for path in sorted(directory.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(directory).parts
    }


def _refuse_key_material(files: Mapping[str, Path], key: Optional[SecretKey], *, commit_message: str = "") -> None:
    """Raise :class:`KeyLeakError` if a file holds key material or is a key
    file, or if a file's name or the commit message holds key material (they
    reach the Hub too). Without ``key`` only key files can be recognized."""
    needles = leak_needles(key)
    if commit_message and bytes_contain_any(commit_message.encode("utf-8"), needles):
        raise KeyLeakError("refusing to upload: the commit message holds key material. Nothing was sent")
    if any(bytes_contain_any(name.encode("utf-8"), needles) for name in files):
        raise KeyLeakError("refusing to upload: a file name holds key material. Nothing was sent; rename the file")
    # A file gone since the listing (another writer's temporary) has nothing left to leak.
    leaks = [name for name, path in files.items()
             if name.endswith(".key") or still_there_and_contains(Path(path), needles)]
    if leaks:
        raise KeyLeakError(
            f"refusing to upload: {', '.join(leaks)} hold(s) key material or a key file. Nothing was sent. "
            "Remove these files from the folder (the key stays on the owner's disk) and push again"
        )

