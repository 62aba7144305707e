"""Temporary files beside the files kp-plugin writes, and their clean-up.

Every write goes to a temporary name in the target's folder first, named
``.NAME.PID.XXXX.tmp`` after the process writing it, and is renamed into
place when whole. A process killed before the rename leaves its temporary
behind; the next write of the same name removes the ones whose process is
gone (those of live processes stay: they are still writing).
"""

from __future__ import annotations

import glob
import os
import shutil
from pathlib import Path
from typing import Iterable


def process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (``False`` when it
    cannot be told, e.g. another user's process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive (another user's), or cannot tell
        return False
    return False


def remove_stale_temporaries(directory: Path, names: Iterable[str]) -> None:
    """Remove the temporaries of ``names`` in ``directory`` that a process
    no longer running left behind (stopped between writing and its rename or
    clean-up); those of a live process stay."""
    for name in names:
        for path in Path(directory).glob(f".{glob.escape(name)}.*.*.tmp"):
            pid = path.name[len(name) + 2:].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and process_gone(int(pid)):
                if path.is_dir() and not path.is_symlink():  # a scratch folder (safetensors' own temporary in it)
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
