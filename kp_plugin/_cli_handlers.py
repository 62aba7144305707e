"""What ``kp protect``, ``kp evaluate`` and ``kp show`` do (the parsers are
in :mod:`kp_plugin.cli`). Kept apart so ``kp --help`` and ``kp keygen`` do
not import timm, the datasets or the training loop.

A ``kp protect`` output directory holds:

- ``model.safetensors``, ``config.json``, ``protection.json``: the protected
  checkpoint (publishable; never the key);
- ``training.json``: recipe, per-epoch history, and the unprotected
  baseline's accuracy when ``--baseline`` was given;
- ``training/``: the per-epoch checkpoint and optimizer state for
  ``--resume`` (not needed to use the model);
- ``report/`` (``kp evaluate``): public numbers and figures;
- ``private/`` (``kp evaluate``): example images, plain beside protected,
  which reveal the transform: never publish.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from .checkpoint import (KEY_FILE_MARKERS, PROTECTION_FILE, ProtectionConfig, file_contains_any, find_key_material,
                         replacing, save_protected, usable_device)
from .cli import KEY_ENV, _UsageError
from .errors import (
    CheckpointError,
    ConfigurationError,
    InputSizeWarning,
    KeyFileError,
    KeyFilePermissionWarning,
    KeyLeakError,
    KeyMismatchError,
    first_line,
)
from .keys import SecretKey
from .protection_report import PRIVATE_DIR  # kp evaluate's owner-only folder
from .transforms import check_image_size, nearest_valid_size

TRAINING_FILE = "training.json"
RESUME_DIR = "training"
REPORT_DIR = "report"


def _busy_cores(window: float = 0.5) -> Optional[float]:
    """Cores kept busy by other processes right now: the non-idle share of
    CPU time over a short window (Linux ``/proc/stat``; this process sleeps
    meanwhile). ``None`` where that cannot be read."""
    def sample() -> tuple:
        with open("/proc/stat") as stat:
            fields = [float(v) for v in stat.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
        return sum(fields[:8]), idle

    try:
        total0, idle0 = sample()
        time.sleep(window)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads() -> int:
    """CPU threads for torch: the cores not already busy (at least 1).

    On a shared machine, OpenMP threads that compete with other processes
    for the same cores spin against each other; measured here, a Lite0
    training step at 64x64 took 0.7-1.0 s on one thread and 6-10 s on two
    while other jobs kept both cores busy. Busy cores are measured over half
    a second, not read from the load average: the 1-minute load average
    still counts work that just ended (the demo's own install pushed it
    above 1 and cost the demo a core).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    busy = _busy_cores()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:
            return cores
    return max(1, min(cores, round(cores - busy)))


def _runtime(args: argparse.Namespace) -> torch.device:
    if args.device:
        try:
            torch.device(args.device)
        except RuntimeError:
            raise _UsageError(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    device = usable_device(args.device, what="--device")  # None: CUDA when available, else the CPU
    threads = getattr(args, "threads", None)
    if threads is None and device.type == "cpu":
        threads = auto_threads()
    if threads:
        torch.set_num_threads(threads)
    return device


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def _check_size_for_key(size: int, key: SecretKey) -> None:
    if size % key.block_size:
        fix = nearest_valid_size(size, key.block_size)
        raise ConfigurationError(
            f"images are {size}x{size} but the key's block size is {key.block_size}; "
            f"pass --image-size {fix} (a multiple of {key.block_size})"
        )


def _objective(weight: Optional[float], distill: float):
    from dataclasses import replace

    from .objectives import DEFAULT_OBJECTIVE, ProtectionObjective

    objective = DEFAULT_OBJECTIVE if weight is None else ProtectionObjective(wrong_key_weight=weight)
    return replace(objective, distill_weight=distill) if distill else objective


TEACHER_FILE = "teacher.safetensors"


def _model_args(args) -> dict:
    """timm creation arguments from ``--drop`` / ``--drop-path`` (given ones only)."""
    pairs = (("drop_rate", args.drop), ("drop_path_rate", args.drop_path))
    return {name: value for name, value in pairs if value is not None}


def _check_resumed_model_options(args, out: Path, resume_dir: Path) -> None:
    """``--resume`` with other ``--drop`` / ``--drop-path`` / ``--no-pretrained``
    than the run was started with: a usage error naming them. Those were
    taken and recorded as if the whole run had used them (the learning rate
    and the rest of the recipe are checked by :func:`kp_plugin.train.fit`).
    Files missing or damaged are left to fit's own checks."""
    from .autoload import _read_native_config

    problems = []
    native = _read_native_config(resume_dir)
    model_args = native.get("model_args") if isinstance(native, dict) else None
    if isinstance(model_args, dict):
        for option, name in (("--drop", "drop_rate"), ("--drop-path", "drop_path_rate")):
            now, before = _model_args(args).get(name), model_args.get(name)
            if now != before:
                problems.append(f"{option} {'not given' if now is None else now} (the run: "
                                f"{'not given' if before is None else before})")
    try:
        record = json.loads((out / TRAINING_FILE).read_text())
    except (OSError, ValueError):
        record = None
    pretrained = record.get("pretrained") if isinstance(record, dict) else None
    if isinstance(pretrained, bool) and pretrained == args.no_pretrained:
        problems.append(f"--no-pretrained {'given' if args.no_pretrained else 'left out'} (the run started from "
                        f"{'pre-trained' if pretrained else 'random'} weights)")
    if problems:
        raise _UsageError(f"the run in {out} was started with other model options: {'; '.join(problems)}. Resume "
                          "it with the options it was started with")


def _unprotected_fine_tune(args, num_classes: int, keyed, train_set, test_set, config, device, record: dict,
                           teacher_path: Optional[Path] = None):
    """The unprotected model with the same recipe (cross-entropy only): the
    baseline, and the teacher when distilling. With ``teacher_path`` its
    weights are kept there (a private directory) so ``--resume`` reuses them."""
    from safetensors.torch import load_model

    from .checkpoint import save_weights_atomic
    from .timm import create_base_model
    from .train import evaluate_accuracy, fit, plain_model

    torch.manual_seed(args.seed)
    base = create_base_model(args.model, pretrained=not args.no_pretrained, num_classes=num_classes,
                             input_size=keyed.input_size, **_model_args(args))
    model = plain_model(base, keyed.mean, keyed.std)
    if teacher_path is not None and teacher_path.is_file() and "unprotected_accuracy" in record:
        _say(args, f"reusing the unprotected teacher in {teacher_path}")
        load_model(base, str(teacher_path), strict=True)
        return model.to(device)
    _say(args, "fine-tuning the unprotected model with the same recipe"
               + (" (the teacher)" if teacher_path is not None else " (the baseline)"))
    result = fit(model, train_set, config=config, device=device, progress=not args.quiet)
    record["unprotected_accuracy"] = evaluate_accuracy(model, test_set, device=device)
    record["baseline_history"] = result.history
    record["baseline_seconds"] = result.seconds
    if teacher_path is not None:
        teacher_path.parent.mkdir(parents=True, exist_ok=True)
        save_weights_atomic(base, teacher_path, metadata={"format": "pt"})
    return model


def _end_with_parent(parent: int, every: float = 1.0) -> None:
    """In a child process: end it (a daemon thread watches) once ``parent``
    is gone, whatever ended it (a kill -9 gives the parent no chance to end
    its child; the baseline went on training alone, a whole core for nothing)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, name="kp-end-with-parent", daemon=True).start()


def _baseline_worker(options: dict, num_classes: int, normalization: tuple, config, threads: int, queue,
                     parent: int) -> None:
    """Child process of :class:`_BaselineBeside`: the unprotected fine-tune
    with ``threads`` CPU threads; puts ``("ok", record)`` or ``("error", text)``.
    Ends when ``parent`` (the kp protect process) does."""
    _end_with_parent(parent)
    try:
        from types import SimpleNamespace

        from .data import DatasetNameWarning, load_dataset

        torch.set_num_threads(threads)
        warnings.simplefilter("ignore", DatasetNameWarning)  # the parent process has said it
        args = argparse.Namespace(**options)
        train_set = load_dataset(args.data, split="train", image_size=args.image_size)
        test_set = load_dataset(args.data, split="test", image_size=train_set.image_size)
        mean, std, input_size = normalization
        record: dict = {}
        _unprotected_fine_tune(args, num_classes, SimpleNamespace(mean=mean, std=std, input_size=input_size),
                               train_set, test_set, config, torch.device("cpu"), record)
        queue.put(("ok", {k: record[k] for k in ("unprotected_accuracy", "baseline_history", "baseline_seconds")}))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
        queue.put(("error", f"{type(exc).__name__}: {exc}"))


def start_ignoring_interrupts(process: Any) -> None:
    """Start a ``multiprocessing`` process with Ctrl-C (SIGINT) ignored in
    it: the terminal sends it to the whole process group, and a spawned child
    caught importing torch printed a traceback under ``kp protect:
    interrupted``. This process handles the interrupt and ends the child."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        process.start()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a spawned child keeps an ignored signal ignored
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)


class _BaselineBeside:
    """The unprotected baseline fine-tuned in a second process while this
    one trains the protected model, each with half the CPU threads: on a
    2-core CPU without AVX-512 one thread per run gave 1.45x the throughput
    of the two runs one after the other at two threads (a demo-recipe step:
    434 ms at 2 threads, 595-607 ms with two 1-thread runs side by side;
    docs/benchmarks.md), which is what keeps the demo within 10 minutes there."""

    def __init__(self, args: argparse.Namespace, num_classes: int, keyed, config) -> None:
        import multiprocessing

        total = torch.get_num_threads()
        self.parent_threads, child_threads = total - total // 2, total // 2
        options = {k: v for k, v in vars(args).items() if k != "func"}
        options["quiet"] = True
        context = multiprocessing.get_context("spawn")  # no fork of a process with OpenMP threads running
        self.queue = context.Queue()
        self.process = context.Process(
            target=_baseline_worker, daemon=True, name="kp-baseline",
            args=(options, num_classes, (list(keyed.mean), list(keyed.std), keyed.input_size), config,
                  child_threads, self.queue, os.getpid()),
        )
        start_ignoring_interrupts(self.process)
        self.total = total
        self.reclaimed = False
        torch.set_num_threads(self.parent_threads)

    def reclaim_threads(self) -> None:
        """Called after each training step: once the baseline process has
        ended, this one takes all the threads (set here, in the training
        thread, where torch's OpenMP setting applies). The baseline ends
        first (no wrong-key passes), and its core sat idle until then."""
        if not self.reclaimed and not self.process.is_alive():
            torch.set_num_threads(self.total)
            self.reclaimed = True

    def result(self) -> dict:
        """Wait for the baseline; its record entries."""
        import queue

        while True:
            try:
                status, payload = self.queue.get(timeout=2)
                break
            except queue.Empty:
                if not self.process.is_alive():
                    raise RuntimeError(f"the baseline process ended without a result (exit code "
                                       f"{self.process.exitcode})") from None
        self.process.join()
        if status != "ok":
            raise RuntimeError(f"the unprotected baseline failed: {payload}")
        return payload

    def stop(self) -> None:
        """Give this process its threads back; end the child if it still runs."""
        torch.set_num_threads(self.total)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


#: Held (flock) by the kp protect writing into a folder, inside it.
WRITER_LOCK = ".kp-protect.lock"


@contextlib.contextmanager
def _only_writer(out: Path, command: str):
    """Hold ``out`` for one ``command`` at a time. Two kp protect runs into
    one folder with one key both said they saved; the folder held one model,
    the other was lost without a word. Released however the process ends (a
    kill too: the kernel drops the lock); a folder this made stays only if
    something was written into it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / WRITER_LOCK
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(
                f"another {command} is writing into {out}; wait for it to finish, or choose another -o"
            ) from None
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()


def protect(args: argparse.Namespace) -> int:
    """``kp protect``: fine-tune a keyed model (distilling from, or beside,
    the unprotected fine-tune), save the protected checkpoint and the history."""
    out = Path(args.output)
    check_output_folder(out)
    with _only_writer(out, "kp protect"):
        return _protect(args)


def _protect(args: argparse.Namespace) -> int:
    from .data import DatasetNameWarning, load_dataset
    from .timm import create_protected_model
    from .train import TRAINING_STATE_FILE, TrainConfig, evaluate_accuracy, fit

    device = _runtime(args)
    key = cli_key(args.key)
    out = Path(args.output)
    check_output_folder(out)
    _refuse_key_file_inside(out, args.key)
    resume_dir = out / RESUME_DIR
    if args.resume and not (resume_dir / TRAINING_STATE_FILE).is_file():
        raise CheckpointError(f"cannot resume: {resume_dir / TRAINING_STATE_FILE} is missing (start without --resume)")
    if args.resume and args.image_size is not None:
        recorded = ProtectionConfig.load(resume_dir).input_size
        trained = recorded[1] if recorded else None
        if trained is not None and trained != args.image_size:
            raise _UsageError(f"the run in {out} trains at {trained}x{trained}; resume it with --image-size {trained} "
                              "(or leave the option out): the keyed transform depends on the size")
    if args.resume:
        _check_resumed_model_options(args, out, resume_dir)
    if not args.resume and (out / PROTECTION_FILE).exists():
        raise ConfigurationError(
            f"{out} already holds a protected model; pass --resume to continue it, or choose another -o"
        )
    if not args.resume and (resume_dir / TRAINING_STATE_FILE).exists():
        # An interrupted run: a new one would train over its state (or, with
        # another key, train a whole epoch before being refused).
        raise ConfigurationError(
            f"{resume_dir} holds an interrupted run; pass --resume to continue it, or choose another -o "
            f"(or delete {resume_dir} to start again)"
        )
    if args.image_size is not None:
        _check_size_for_key(args.image_size, key)
    train_set = load_dataset(args.data, split="train", image_size=args.image_size)
    with warnings.catch_warnings():  # said once, for the training split
        warnings.simplefilter("ignore", DatasetNameWarning)
        test_set = load_dataset(args.data, split="test", image_size=train_set.image_size)
    _warn_if_unsplit(test_set, args.data)
    size = int(train_set.image_size)
    _check_size_for_key(size, key)
    num_classes = len(train_set.classes)
    if num_classes < 2:
        # Every model, key or no key, would score 100%: nothing to protect or measure.
        raise ConfigurationError(
            f"{args.data} has one class ({train_set.classes[0] if train_set.classes else '?'}); a classifier needs "
            "at least two (one folder per class, e.g. root/cat/1.jpg, root/dog/2.jpg)"
        )

    overrides = {k: v for k, v in (("batch_size", args.batch_size), ("lr", args.lr), ("ema_decay", args.ema_decay))
                 if v is not None}
    config = TrainConfig(epochs=args.epochs, seed=args.seed, objective=_objective(args.wrong_key_weight, args.distill),
                         mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, **overrides)
    record = {}
    if args.resume and (out / TRAINING_FILE).is_file():
        record = json.loads((out / TRAINING_FILE).read_text())
    record.update({
        "model": args.model,
        "dataset": args.data,
        "image_size": size,
        "num_classes": num_classes,
        "classes": list(train_set.classes),
        "pretrained": not args.no_pretrained,
        "scheme": key.scheme_name,
        "block_size": key.block_size,
        "fingerprint": key.fingerprint,
        "config": config.to_dict(),
        "model_args": _model_args(args),
    })

    torch.manual_seed(args.seed)
    model = create_protected_model(args.model, key, pretrained=not args.no_pretrained,
                                   num_classes=num_classes, input_size=size, **_model_args(args))
    # Owner-only: the optimizer state, and with --distill the unprotected
    # teacher (a model that needs no key), are never to be shared.
    resume_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(resume_dir, 0o700)
    teacher = None
    if args.distill:
        teacher = _unprotected_fine_tune(args, num_classes, model.keyed, train_set, test_set, config, device, record,
                                         teacher_path=resume_dir / TEACHER_FILE)
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / TRAINING_FILE, record)
    beside = None
    if (args.baseline and not args.distill and "unprotected_accuracy" not in record and device.type == "cpu"
            and torch.get_num_threads() >= 2):
        beside = _BaselineBeside(args, num_classes, model.keyed, config)
        _say(args, f"fine-tuning the unprotected model with the same recipe (the baseline) in a second process, "
                   f"{beside.parent_threads} + {beside.total - beside.parent_threads} CPU threads")
    _say(args, f"fine-tuning {args.model} on {args.data} ({len(train_set)} images, {size}x{size}) "
               f"with key {key.fingerprint} ({key.scheme_name}, M={key.block_size}), {config.epochs} epochs"
               + (f", distilling from the unprotected model (weight {args.distill:g})" if args.distill else ""))
    try:
        result = fit(model, train_set, config=config, eval_set=test_set, checkpoint_dir=resume_dir,
                     resume=args.resume, device=device, progress=not args.quiet, teacher=teacher,
                     after_step=beside.reclaim_threads if beside is not None else None)
        key_accuracy = evaluate_accuracy(model, test_set, device=device)
        if beside is not None:
            record.update(beside.result())
    finally:
        if beside is not None:
            beside.stop()
    record["history"] = result.history
    record["key_accuracy"] = key_accuracy
    record["seconds"] = record.get("seconds", 0.0) + result.seconds
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / TRAINING_FILE, record)

    if args.baseline and "unprotected_accuracy" not in record:
        _unprotected_fine_tune(args, num_classes, model.keyed, train_set, test_set, config, device, record)
        _write_json(out / TRAINING_FILE, record)

    metadata = {
        "dataset": args.data,
        "classes": list(train_set.classes),
        "image_size": size,
        "epochs": config.epochs,
        "objective": config.resolved_objective.describe(),
        "key_accuracy": key_accuracy,
    }
    if "unprotected_accuracy" in record:
        metadata["unprotected_accuracy"] = record["unprotected_accuracy"]
    save_protected(model.cpu(), out, metadata=metadata)
    _check_no_key_material(out, key, args.key)
    line = f"saved the protected model to {out} (test accuracy with the key {100 * key_accuracy:.1f}%"
    if "unprotected_accuracy" in record:
        line += f", unprotected baseline {100 * record['unprotected_accuracy']:.1f}%"
    print(line + ")")
    return 0


def open_protected(args: argparse.Namespace, device: torch.device) -> tuple:
    """Load ``args.checkpoint`` (any ``save_protected`` directory of a timm or
    transformers model) with the key file ``args.key`` (or :data:`KEY_ENV`).

    Returns ``(model, key, protection_config)``. Raises
    :class:`KeyMismatchError`, naming both fingerprints, when the key is not
    the checkpoint's.
    """
    from .autoload import load_protected_auto

    key = cli_key(args.key)
    checkpoint = Path(args.checkpoint)
    protection = ProtectionConfig.load(checkpoint)
    try:
        protection.check_key(key, unsigned="ignore")  # load_protected_auto warns
    except KeyMismatchError as exc:
        if key.fingerprint == protection.fingerprint:  # the same key, other settings: say which
            raise KeyMismatchError(f"{checkpoint}: {exc}") from None
        raise KeyMismatchError(
            f"{_key_source(args.key)} is not the key {checkpoint} was protected with (key fingerprint "
            f"{key.fingerprint}, checkpoint expects {protection.fingerprint}, {'+'.join(protection.scheme)}, "
            f"block size {protection.block_size}); pass the owner's key file"
        ) from None
    return load_protected_auto(checkpoint, key).to(device), key, protection


def open_checkpoint(args: argparse.Namespace, device: torch.device) -> tuple:
    """Load ``args.checkpoint`` (a ``kp protect`` directory, or any
    ``save_protected`` directory of a timm or transformers model) with the key
    file ``args.key`` and resolve the dataset and image size it was trained on
    (``--data`` / ``--image-size`` override them).

    Returns ``(model, key, protection_config, data, image_size)``.
    Raises :class:`KeyMismatchError` when the key is not the checkpoint's.
    """
    model, key, protection = open_protected(args, device)
    checkpoint = Path(args.checkpoint)
    data = args.data or recorded(protection, "dataset")
    if not data:
        raise ConfigurationError(f"{checkpoint} does not record its dataset; pass --data")
    from .data import EMBEDDED_DATASETS

    if not args.data and data not in EMBEDDED_DATASETS and not Path(data).exists():
        # Recorded as kp protect was given it: a relative path means the
        # folder kp protect ran in.
        raise ConfigurationError(
            f"{checkpoint} was trained on {data!r}, which is not there from {Path.cwd()} (a relative path is "
            "relative to where kp protect ran); pass --data with the dataset's path"
        )
    saved = protection.input_size[1] if protection.input_size else None
    size = args.image_size or saved
    if size is not None:
        _check_size_for_key(size, key)  # before the warning below: a size the key cannot take is the error
    if saved is not None and size != saved:
        scrambled = "scramble" in key.scheme
        warnings.filterwarnings("ignore", category=InputSizeWarning)  # said here, for this command (kp.main's scope)
        print(f"warning: the model was trained at {saved}x{saved}; at {size}x{size} "
              + ("the key's block scrambling orders the blocks differently, so even the right key scores near chance"
                 if scrambled else "its accuracy is not the one it was trained for"), file=sys.stderr)
    return model, key, protection, data, size


def _class_list(classes) -> str:
    names = [str(name) for name in classes]
    return "[" + ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "") + "]"


def _warn_if_unsplit(dataset, data: str) -> None:
    """An ImageFolder without train/ and test/ folders serves every image to
    both splits: say that the test figures are then training figures."""
    if getattr(dataset, "split", None) == "all":
        print(f"warning: {data} has no train/ and test/ folders, so the model is trained and evaluated on the same "
              "images and every accuracy reported is on training images; put held-out images in "
              f"{Path(data) / 'test'} (and the rest in {Path(data) / 'train'}) for honest figures", file=sys.stderr)


def recorded(protection, name: str) -> Any:
    """A value ``kp protect`` recorded in ``protection.json``'s ``extra``
    (``dataset``, ``classes``, ``unprotected_accuracy``), checked: that part
    is not signed, and a hand-edited value went into reports (an unprotected
    accuracy of 500%) or failed deep inside. ``None`` when absent."""
    value = protection.extra.get(name)
    if value is None:
        return None
    if name == "unprotected_accuracy":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    elif name == "dataset":
        ok = isinstance(value, str) and bool(value)
    elif name == "classes":
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
    else:
        ok = True
    if not ok:
        raise CheckpointError(
            f"the checkpoint's protection.json records {name} = {str(value)[:80]!r}, which no save "
            "writes (edited or damaged); restore the file from the save, or remove that entry of its 'extra'"
        )
    return value


def check_classes(protection, dataset, where: str) -> None:
    """Refuse data whose classes are not the ones the model was trained on
    (recorded by ``kp protect``): the labels would not line up."""
    trained_on = recorded(protection, "classes")
    if trained_on is not None and list(dataset.classes) != list(trained_on):
        unknown = [name for name in dataset.classes if name not in trained_on]
        if not unknown and hasattr(dataset, "use_classes"):
            # A test set with some of the classes: label by the model's list.
            dataset.use_classes(trained_on)
            print(f"note: {where} has {len(set(dataset.labels.tolist()))} of the {len(trained_on)} classes the model "
                  "was trained on; they are labelled as in training", file=sys.stderr)
            return
        raise ConfigurationError(
            f"{where} has the classes {_class_list(dataset.classes)} but the model was trained on "
            f"{_class_list(trained_on)}" + (f"; not among them: {_class_list(unknown)}" if unknown else "")
            + "; its labels would not line up. Use data with the class folders the model was trained on"
        )
    # Checkpoints not written by kp protect (Trainer, save_protected) record
    # no class names, but their number of outputs.
    outputs = protection.num_classes
    if trained_on is None and isinstance(outputs, int) and outputs != len(dataset.classes):
        raise ConfigurationError(
            f"{where} has {len(dataset.classes)} classes but the model has {outputs} outputs; its labels would "
            "not line up (and chance would be misstated). Use data with the classes the model was trained on"
        )


def evaluate(args: argparse.Namespace) -> int:
    """``kp evaluate``: the protection report of a ``kp protect`` directory."""
    from .data import load_dataset
    from .evaluate import evaluate_protection, format_summary, write_report

    importlib.import_module("matplotlib")  # the report's figures: missing, say so before the long evaluation

    device = _runtime(args)
    checkpoint = Path(args.checkpoint)
    out = Path(args.output) if args.output else checkpoint / REPORT_DIR
    check_output_folder(out)
    refuse_other_report(out, "evaluate")
    model, key, protection, data, size = open_checkpoint(args, device)  # the size checked against the key there
    # The layout oneDNN's convolutions run fastest in (as in training).
    model = model.to(memory_format=torch.channels_last)
    dataset = load_dataset(data, split=args.split, image_size=size)
    check_classes(protection, dataset, f"{data} ({args.split})")
    _warn_if_unsplit(dataset, data)
    # Smaller CPU batches keep activations in the allocator's cache (measured:
    # a third of the system time of batch 256 for Lite0 at 64x64).
    batch_size = args.batch_size or (64 if device.type == "cpu" else 256)
    report = evaluate_protection(
        model, dataset, num_wrong_keys=args.wrong_keys, seed=args.seed, batch_size=batch_size,
        device=device, progress=not args.quiet, dataset_name=f"{data} ({args.split})",
        unprotected_accuracy=recorded(protection, "unprotected_accuracy"),
    )
    with writing_into(out):
        write_report(report, out, private_directory=checkpoint / PRIVATE_DIR)
    _check_no_key_material(out, key, args.key)
    print(format_summary(report))
    print(f"report written to {out}; example images (owner only, do not publish) in {checkpoint / PRIVATE_DIR}")
    return 0


def export(args: argparse.Namespace) -> int:
    """``kp export``: the base model of a protected checkpoint as ONNX or a
    torch.export program, with protection.json, for deployment (no key)."""
    from .export import INPUT_NAME, OUTPUT_NAME, export_protected

    if args.opset is not None and args.format != "onnx":
        raise _UsageError(f"--opset is an ONNX setting; --format {args.format} has none")
    output = Path(args.output)
    check_output_folder(output)
    _refuse_key_file_inside(output, args.key)
    model, key, protection = open_protected(args, torch.device("cpu"))
    path = export_protected(model, output, format=args.format, batch_size=args.batch_size,
                            opset_version=args.opset, metadata=protection.extra, overwrite=args.force)
    _check_no_key_material(output, key, args.key)
    size = "x".join(str(s) for s in model.keyed.input_size or ())
    names = ProtectionConfig.load(output).extra.get("output_names") or [OUTPUT_NAME]  # several: features_only
    outputs = f"output '{names[0]}'" if len(names) == 1 else "outputs " + ", ".join(f"'{n}'" for n in names)
    print(f"wrote {path} and {output / PROTECTION_FILE} (no key): input '{INPUT_NAME}' = images {size} after the "
          f"keyed transform and normalization, {outputs}")
    print(f"to run it: keyed = kp_plugin.export.load_keyed_input({str(output)!r}, SecretKey.load(...)); "
          f"feed keyed(images01)")
    return 0


def show(args: argparse.Namespace) -> int:
    """``kp show``: an image as the protected model sees it (or decrypted)."""
    from PIL import Image, UnidentifiedImageError

    from .data import DatasetError, image_01
    from .transforms import apply_transform, invert_transform

    suffix = Path(args.output).suffix.lower()
    if suffix not in ("", ".png"):
        raise _UsageError(
            f"kp show writes PNG (lossless: JPEG and other lossy formats would change the pixel values, and "
            f"--invert could not undo them), not {suffix}; name the output {Path(args.output).with_suffix('.png')}"
        )
    if Path(args.output).exists() and Path(args.image).exists() and Path(args.output).samefile(args.image):
        raise _UsageError(f"-o {args.output} is the input image, which it would replace; name another output file")
    if Path(args.output).is_dir():
        raise _UsageError(f"-o {args.output} is a folder; name the PNG file to write (e.g. "
                          f"{Path(args.output) / 'protected.png'})")
    if _is_key_file(Path(args.output)):
        raise _UsageError(f"-o {args.output} is a key file, which it would replace (losing the key loses the "
                          "models trained with it); name another output file")
    key = cli_key(args.key)
    if key.channels not in (1, 3):
        raise ConfigurationError(f"kp show handles 1- or 3-channel keys; this key is for {key.channels} channels")
    try:
        with Image.open(args.image) as img:
            x = image_01(img, key.channels)
    except FileNotFoundError:
        raise ConfigurationError(f"{args.image} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ConfigurationError(f"cannot read {args.image} as an image: {exc}") from None
    except DatasetError as exc:
        raise ConfigurationError(f"{args.image}: {exc}") from None
    h, w = x.shape[1:]
    if args.image_size is not None:
        check_image_size(args.image_size, args.image_size, key.block_size)
        target = (args.image_size, args.image_size)
    else:
        target = (nearest_valid_size(h, key.block_size), nearest_valid_size(w, key.block_size))
    if target != (h, w):
        print(f"resized {args.image} from {h}x{w} to {target[0]}x{target[1]} (a multiple of the block size "
              f"{key.block_size})", file=sys.stderr)
        x = torch.nn.functional.interpolate(x[None], size=target, mode="bicubic", antialias=True,
                                            align_corners=False)[0].clamp_(0, 1)
    y = invert_transform(x, key) if args.invert else apply_transform(x, key)
    out = (y.clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = out[0].numpy() if key.channels == 1 else out.permute(1, 2, 0).numpy()
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    # Written beside it and renamed: a failed write leaves the old file whole,
    # and a symlink at -o is replaced, not written through.
    with replacing(output) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")
    print(f"wrote {args.output} ({'decrypted' if args.invert else 'protected'}, {target[0]}x{target[1]})")
    return 0


def _is_key_file(path: Path) -> bool:
    """Whether ``path`` (or what a symlink there points to) is a kp key file."""
    try:
        return path.is_file() and file_contains_any(path, list(KEY_FILE_MARKERS))
    except OSError:
        return False


def cli_key(path: Optional[str], *, required: bool = True) -> Optional[SecretKey]:
    """The key of a ``kp`` command: the file ``--key`` names, else the
    :data:`KEY_ENV` environment variable (a key file's content)."""
    if path:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", KeyFilePermissionWarning)
            key = SecretKey.load(path)
        for warning in caught:  # kp.main's showwarning prints kp-plugin's as one plain "warning:" line
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
        return key
    if os.environ.get(KEY_ENV):
        return SecretKey.from_env(KEY_ENV)
    if required:
        raise KeyFileError(f"no key given: pass --key owner.key or set {KEY_ENV} to the key file's content")
    return None


def _key_source(path: Optional[str]) -> str:
    return path or f"the key in {KEY_ENV}"


@contextlib.contextmanager
def writing_into(folder: Path):
    """A failed write of a command's results (a full disk, a file-size
    limit: errors that name no file) as a one-line error naming the folder
    and what to do; each file there before is unchanged or replaced whole."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or first_line(exc)
        named = exc.filename and Path(exc.filename) != Path(folder)
        name = Path(exc.filename).name if named else ""
        temporary = re.fullmatch(r"\.(.+)\.\d+\.[0-9a-f]+\.tmp", name)  # the temporary a file is written to first
        if temporary:
            name = temporary.group(1)
        where = f"{name} in " if named else ""
        remedy = "free some space" if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
            "check that the folder can be written"
        raise ConfigurationError(
            f"cannot write the results into {where}{folder} ({reason}); {remedy}, or choose another -o"
        ) from None


def refuse_other_report(directory: Path, mine: str) -> None:
    """A usage error when ``directory`` holds the other command's report:
    ``kp evaluate`` and ``kp attack`` both write ``report.json`` /
    ``report.md``, and one replaced the other's (the Hub card then read
    'n/a' with the key), leaving the other's figures beside it."""
    try:
        data = json.loads((directory / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    theirs = "attack" if "attacks" in data else "evaluate" if "key_accuracy" in data else None
    if theirs is not None and theirs != mine:
        raise _UsageError(f"-o {directory} holds kp {theirs}'s report, which kp {mine}'s would replace; "
                          f"choose another -o (by default kp {mine} writes its own folder)")


def check_output_folder(directory: Path) -> None:
    """A usage error, before any work, when the output folder ``-o`` names
    an existing file (found, before, only when the results were written)."""
    if directory.exists() and not directory.is_dir():
        raise _UsageError(f"-o {directory} is a file; the command writes a folder there: name a folder")
    if directory.is_symlink() and not directory.exists():  # creating the folder said "File exists"
        raise _UsageError(f"-o {directory} is a symbolic link to {os.readlink(directory)}, which does not exist; "
                          "create that folder, or name another -o")


def _refuse_key_file_inside(directory: Path, key_file: Optional[str]) -> None:
    """A usage error, before any work, when the key file lies inside the
    folder a command writes for publishing: save_protected / export refuse
    a folder holding key material, which they find only at the end."""
    if key_file and Path(key_file).resolve().is_relative_to(directory.resolve()):
        raise _UsageError(
            f"the key file {key_file} lies inside {directory}, the folder to publish (the model is refused "
            "with a key file beside it); keep the key outside it, e.g. move it to ~/keys/"
        )


def _check_no_key_material(directory: Path, key: SecretKey, key_file: Optional[str]) -> None:
    """Nothing written under ``directory`` may hold the key; the owner's own
    key file lying there is only worth a warning."""
    own = Path(key_file).resolve() if key_file else None
    leaks = [p for p in find_key_material(directory, key) if own is None or p.resolve() != own]
    if own is not None and own.is_relative_to(directory.resolve()):
        print(f"warning: the key file {key_file} lies inside {directory}; move it out before sharing the "
              "directory", file=sys.stderr)
    if leaks:
        names = ", ".join(str(p.relative_to(directory)) for p in leaks)
        raise KeyLeakError(
            f"key material found in {names} under {directory}, a folder meant for sharing; move these files out "
            "of it before sharing the folder (a key file: keep it safe, it is the only way to use its model), "
            "or write the results to another folder with -o"
        )


def _write_json(path: Path, data: dict) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
