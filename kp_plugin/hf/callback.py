"""``KeyProtectionCallback``: the protection margin, measured at every
``Trainer`` evaluation, and ``protection.json`` beside every checkpoint.

At each evaluation the callback runs the evaluation batches once with the
key and once per wrong key (reproducible random keys with the same
settings, :func:`kp_plugin.evaluate.wrong_keys`) and reports

- ``eval_key_accuracy``: accuracy with the key;
- ``eval_wrong_key_accuracy_mean`` / ``eval_wrong_key_accuracy_max``;
- ``eval_protection_margin``: key accuracy minus the best wrong key's.

With several evaluation datasets (``eval_dataset={"a": ..., "b": ...}``) or
``trainer.evaluate(metric_key_prefix="test")`` the names take that
evaluation's prefix (``eval_a_key_accuracy``, ``test_key_accuracy``).

``Trainer.evaluate`` logs its metrics *before* it calls ``on_evaluate``, so
metrics added there would miss the loggers. The callback therefore adds
them to the returned metrics (``metric_for_best_model`` can use them) and
logs them itself through the trainer it is bound to
(:class:`kp_plugin.hf.KeyedTrainer` binds it, as does
:meth:`KeyProtectionCallback.bind`). Unbound, in a plain ``Trainer``, it
writes them into the evaluation's entry of ``trainer.state.log_history``
and sends them to the loggers through the trainer's callback handler.
"""

from __future__ import annotations

import logging
import numbers
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from ..checkpoint import PROTECTION_FILE, ProtectionConfig, held_fingerprint, refuse_key_material
from ..errors import CheckpointError, ConfigurationError, KeyMismatchError, ProtectionMarginWarning
from ..keys import SecretKey, require_key
from ..module import KeyedInput, ProtectedModel
from ..objectives import logits_of
from ._datapath import batchers_in, base_module
from .processor import KeyedImageProcessor

__all__ = ["KeyProtectionCallback", "ProtectionMarginWarning", "PROTECTION_METRICS"]

logger = logging.getLogger(__name__)

#: The metric names the callback logs (with the ``eval_`` prefix).
PROTECTION_METRICS = (
    "eval_key_accuracy",
    "eval_wrong_key_accuracy_mean",
    "eval_wrong_key_accuracy_max",
    "eval_protection_margin",
)


def _metric_prefix(metrics: Optional[dict]) -> str:
    """The prefix of this evaluation's metrics: ``eval``, ``eval_<name>``
    with several eval datasets, or ``evaluate(metric_key_prefix=...)``'s
    (Trainer always reports ``<prefix>_runtime``, ``_samples_per_second``
    and ``_steps_per_second``; ``compute_metrics`` may add names ending in
    ``_runtime`` too, which come first)."""
    names = set(metrics or ())
    prefixes = [name[: -len("_runtime")] for name in names if name.endswith("_runtime")]
    timed = [p for p in prefixes if f"{p}_samples_per_second" in names and f"{p}_steps_per_second" in names]
    if timed or prefixes:
        return min(timed or prefixes, key=len)
    return "eval"


def _over_ranks(counts: torch.Tensor, seen: int, last: torch.Tensor, device: torch.device) -> tuple:
    """Sum ``counts`` and ``seen`` over ranks, and put every rank's ``last``
    rows together in rank order (ranks may hold different numbers)."""
    dist = torch.distributed
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = torch.cat([counts, torch.tensor([float(seen), float(len(last))], dtype=torch.float64)]).to(where)
    sizes = [torch.zeros(1, dtype=torch.float64, device=where) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, summed[-1:].clone())
    dist.all_reduce(summed)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, last.shape[1], dtype=torch.float64, device=where)
    padded[: len(last)] = last.to(where)
    rows = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(rows, padded)
    last = torch.cat([r[: int(n.item())] for r, n in zip(rows, sizes)]).cpu()
    return summed[: len(counts)].cpu(), int(summed[-2].item()), last


def _calling_handler(callback: TrainerCallback) -> Any:
    """The ``CallbackHandler`` of the ``Trainer`` that is calling
    ``callback`` now (a few frames up), or ``None``: how an unbound callback
    reaches a plain ``Trainer``'s loggers, which get no other handle to it."""
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, CallbackHandler) and callback in candidate.callbacks:
            return candidate
        frame = frame.f_back
    return None


class KeyProtectionCallback(TrainerCallback):
    """Measure and guard protection during ``Trainer`` fine-tuning.

    Works with both styles: a :class:`kp_plugin.ProtectedModel` fed [0, 1]
    images (model style), or a plain model fed a
    :class:`KeyedImageProcessor`'s output (processor style; the callback
    undoes the transform with the key to try wrong keys).

    Args:
        key: the owner's key.
        wrong_keys: how many wrong keys to try at each evaluation.
        min_margin: warn (:class:`ProtectionMarginWarning`) when
            ``key_accuracy - max(wrong_key_accuracy)`` is below it
            (``None``: measure and log only, never warn).
        stop_on_small_margin: also stop training then.
        patience: with ``stop_on_small_margin``, stop only after this many
            evaluations in a row below ``min_margin`` (the margin starts
            near 0 before the model has learnt anything: 1 stops at the
            first evaluation of a young run).
        seed: selects the wrong keys (the same ones at every evaluation,
            on every rank).
        max_eval_batches: measure on at most this many evaluation batches
            (``None``: all).
        image_processor: the :class:`KeyedImageProcessor` that keyed the
            data, when the data path does not show it (e.g. a dataset
            preprocessed with ``.map``).

    Raises:
        KeyMismatchError: at train start, when the model or the data path
            is keyed with another key.
        ConfigurationError: at train start, when nothing in the model or
            data path applies the key, or both do.
        KeyLeakError: on save, when a file in the checkpoint holds key material.

    Example:
        >>> key = SecretKey.generate(block_size=16)
        >>> callback = KeyProtectionCallback(key, wrong_keys=8, min_margin=0.3)
        >>> trainer = KeyedTrainer(model=model, args=args, train_dataset=train, eval_dataset=val,
        ...                        data_collator=KeyedImageCollator(processor),
        ...                        callbacks=[callback])                       # doctest: +SKIP
        >>> trainer.train()                                                     # doctest: +SKIP
    """

    def __init__(
        self,
        key: SecretKey,
        *,
        wrong_keys: int = 8,
        min_margin: Optional[float] = 0.25,
        stop_on_small_margin: bool = False,
        patience: int = 1,
        seed: int = 0,
        max_eval_batches: Optional[int] = None,
        image_processor: Optional[KeyedImageProcessor] = None,
    ) -> None:
        from ..evaluate import wrong_keys as draw_wrong_keys

        require_key(key)
        if not isinstance(wrong_keys, numbers.Integral) or isinstance(wrong_keys, bool) or wrong_keys < 1:
            raise ConfigurationError(f"wrong_keys must be an integer of at least 1, got {wrong_keys!r}")
        if min_margin is not None and (not isinstance(min_margin, numbers.Real) or isinstance(min_margin, bool)
                                       or min_margin != min_margin):
            raise ConfigurationError(f"min_margin must be a number (an accuracy difference, e.g. 0.25) or None, "
                                     f"got {min_margin!r}")
        if not isinstance(patience, numbers.Integral) or isinstance(patience, bool) or patience < 1:
            raise ConfigurationError(f"patience must be an integer of at least 1 (evaluations), got {patience!r}")
        if stop_on_small_margin and min_margin is None:
            raise ConfigurationError("stop_on_small_margin needs a min_margin to compare the margin with")
        if image_processor is not None:
            image_processor.check_key(key)
        self.key = key
        self.wrong_keys = draw_wrong_keys(key, wrong_keys, seed=seed)
        self.min_margin = None if min_margin is None else float(min_margin)
        self.stop_on_small_margin = stop_on_small_margin
        self.patience = int(patience)
        self._below: dict = {}  # per evaluation set (metric prefix): evaluations in a row below min_margin
        self.max_eval_batches = max_eval_batches
        self.image_processor = image_processor
        self._trainer = None
        self._processor: Optional[KeyedImageProcessor] = image_processor
        self._wrong_inputs: dict = {}
        self.history: list = []
        self._scanner = _ScanCheckpointLast(self)

    def bind(self, trainer: Any) -> "KeyProtectionCallback":
        """Log through ``trainer.log`` so that every logger (TensorBoard,
        W&B, ...) sees the protection metrics. Adds the callback to the
        trainer if it is not there yet."""
        self._trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # ---------------------------------------------------------- set-up
    def on_train_begin(self, args, state, control, model=None, processing_class=None,
                       train_dataloader=None, eval_dataloader=None, **kwargs):
        self._run_first()
        refuse_other_keys_on_other_ranks(self.key)
        # A bound trainer shows its evaluation data before the first
        # evaluation (the handler's eval_dataloader is None until then).
        eval_sets = getattr(self._trainer, "eval_dataset", None)
        eval_sets = list(eval_sets.values()) if isinstance(eval_sets, dict) else [eval_sets]
        self.check_setup(model, processing_class=processing_class,
                         dataloaders=[train_dataloader, eval_dataloader], datasets=eval_sets)
        # Resumed (the state was loaded): the checkpoint this run continues
        # must be this key's. KeyedTrainer checks before loading; a plain
        # Trainer never does, so look where it saves checkpoints.
        resumed = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROTECTION_FILE
        if state.global_step > 0 and resumed.is_file():
            ProtectionConfig.load(resumed).check_key(self.key, remedy=(
                f"This run resumes {resumed.parent}, saved under that key: resume it with the key file it was "
                "trained with, or train into another output_dir"))
        elif state.global_step == 0 and args.should_save:
            refuse_other_key_output_dir(args.output_dir, self.key)

    def _handler(self) -> Any:
        """The calling trainer's ``CallbackHandler`` (``None`` outside one)."""
        return self._trainer.callback_handler if self._trainer is not None else _calling_handler(self)

    def _run_first(self) -> None:
        """Come first in the trainer's callback list, so that the protection
        metrics are in ``metrics`` before any other callback's
        ``on_evaluate`` reads them (``EarlyStoppingCallback`` with
        ``metric_for_best_model="protection_margin"`` found nothing when it
        came first). Moving a callback to an earlier place while the handler
        goes through the list neither skips nor repeats any other."""
        handler = self._handler()
        if handler is None or self not in handler.callbacks:
            return
        done = handler.callbacks.index(self)  # the handler has called the callbacks up to here
        handler.callbacks.remove(self)
        handler.callbacks.insert(0, self)
        # The checkpoint scan goes last instead: another callback's on_save
        # may write into the checkpoint too. Taking it from a place the
        # handler has not reached yet shifts only what it has still to call.
        if self._scanner in handler.callbacks[done + 1:]:
            handler.callbacks.remove(self._scanner)
        if self._scanner not in handler.callbacks:
            handler.callbacks.append(self._scanner)

    def check_setup(self, model: nn.Module, *, processing_class: Any = None, dataloaders=(), datasets=()) -> str:
        """Check that exactly one of the model and the data path applies the
        key, and that it is this key. Returns ``"model"`` or ``"processor"``."""
        model = base_module(model)
        batchers = batchers_in(dataloaders=dataloaders, datasets=[d for d in datasets if d is not None])
        processors = [b.image_processor for b in batchers]
        if isinstance(processing_class, KeyedImageProcessor):
            processors.append(processing_class)
        if self.image_processor is not None:
            processors.append(self.image_processor)
        for processor in processors:
            processor.check_key(self.key)
        data_keyed = any(b.keys_data for b in batchers) or self.image_processor is not None
        if isinstance(model, ProtectedModel):
            ProtectionConfig.from_model(model).check_key(  # the live model: no file
                self.key, unsigned="ignore",
                remedy="Wrap the model and build the callback from the same key (one SecretKey.load of the owner's "
                       "key file)")
            if data_keyed:
                raise ConfigurationError(
                    "the data path and the model both apply the key (a KeyedImageProcessor output and a "
                    "ProtectedModel): keep one. With a ProtectedModel, feed [0, 1] images, e.g. "
                    "KeyedImageCollator(processor, output='images01')"
                )
            return "model"
        if not data_keyed:
            raise ConfigurationError(
                f"nothing applies the key: {type(model).__name__} is not a ProtectedModel and the data path has "
                "no keyed collator or transform. Use KeyedImageCollator(processor) / KeyedExampleTransform(processor) "
                "with a KeyedImageProcessor, wrap the model with wrap_hf_model, or pass image_processor= to the "
                "callback if the dataset was keyed beforehand"
            )
        keyed = [b.image_processor for b in batchers if b.keys_data]
        self._processor = self.image_processor or keyed[0]
        return "processor"

    # ---------------------------------------------------------- evaluation
    def on_evaluate(self, args, state, control, model=None, eval_dataloader=None, metrics=None, **kwargs):
        if model is None or eval_dataloader is None:
            return
        # The evaluation's data path too (train start saw only the training
        # one, and trainer.evaluate() alone has no train start).
        self.check_setup(model, dataloaders=[eval_dataloader])
        result = self.measure(model, eval_dataloader)
        if result is None:
            return
        prefix = _metric_prefix(metrics)
        if prefix != "eval":  # several eval datasets (eval_<name>_...) or evaluate(metric_key_prefix="test")
            result = {f"{prefix}_{name[len('eval_'):]}": value for name, value in result.items()}
        if metrics is not None:
            metrics.update(result)
        self.history.append({"step": state.global_step, **result})
        if self._trainer is not None:
            self._trainer.log(dict(result))
        else:
            entry = state.log_history[-1] if state.log_history else None
            if entry is not None and entry.get("step") == state.global_step and any(
                    k.startswith(f"{prefix}_") for k in entry):
                entry.update(result)
            else:
                state.log_history.append({**result, "epoch": state.epoch, "step": state.global_step})
            handler = _calling_handler(self)
            if handler is not None:  # the loggers (TensorBoard, W&B, ...) saw the metrics before this
                handler.on_log(args, state, control, dict(result))
        margin = result[f"{prefix}_protection_margin"]
        below = self._below.get(prefix, 0) + 1 if self.min_margin is not None and margin < self.min_margin else 0
        self._below[prefix] = below
        if below:
            warnings.warn(
                f"protection margin {margin:.3f} (key accuracy {result[f'{prefix}_key_accuracy']:.3f}, best of "
                f"{len(self.wrong_keys)} wrong keys {result[f'{prefix}_wrong_key_accuracy_max']:.3f}) is below "
                f"min_margin={self.min_margin} at step {state.global_step}. {self._margin_advice()}",
                ProtectionMarginWarning,
                stacklevel=2,
            )
            if self.stop_on_small_margin and below >= self.patience:
                control.should_training_stop = True

    def _margin_advice(self) -> str:
        """What widens the margin, leaving out what the run already does."""
        advice = ["Train longer"]
        objective = getattr(self._trainer, "objective", None)
        if objective is None:
            advice.append("use the protection objective (KeyedTrainer(objective=DEFAULT_OBJECTIVE))")
        elif getattr(objective, "wrong_key_weight", 0) < 1:
            advice.append(f"raise the objective's wrong_key_weight (now {objective.wrong_key_weight})")
        if not set(self.key.scheme) & {"np", "shift", "ffx"}:
            advice.append(f"use a scheme with value steps (the key's is {self.key.scheme_name}; e.g. shuffle+np)")
        return ", or ".join(advice) + "."

    @torch.no_grad()
    def measure(self, model: nn.Module, dataloader: Any) -> Optional[dict]:
        """Accuracy with the key and with each wrong key on ``dataloader``'s
        batches. Distributed, the counts are summed over ranks, and the
        examples that pad the ranks' last batches to one size (accelerate's
        ``even_batches``) are left out as ``gather_for_metrics`` leaves them
        out: the numbers do not depend on the number of processes."""
        model = base_module(model)
        if isinstance(model, ProtectedModel):
            base, mean, std = model.unwrap(), model.keyed.mean, model.keyed.std
            processor = None
        else:
            processor = self._processor
            if processor is None:
                raise ConfigurationError(
                    "the callback cannot tell how the data was keyed; pass image_processor= to KeyProtectionCallback"
                )
            base, (mean, std) = model, processor.normalization
        was_training = base.training
        base.eval()
        device = next(base.parameters()).device
        # Per example: right with the key, with each wrong key. All batches
        # but the last are summed as they come; the last is kept whole.
        counts = torch.zeros(len(self.wrong_keys) + 1, dtype=torch.float64)
        seen = 0
        last: Optional[torch.Tensor] = None
        reached_end = True
        try:
            for index, batch in enumerate(dataloader):
                if self.max_eval_batches is not None and index >= self.max_eval_batches:
                    reached_end = False
                    break
                if "labels" not in batch or "pixel_values" not in batch:
                    missing = "/".join(name for name in ("pixel_values", "labels") if name not in batch)
                    logger.warning("evaluation batches lack %s; protection metrics skipped (labels in a column of "
                                   "another name: give it to the collator, label_column=...)", missing)
                    return None
                pixels = batch["pixel_values"].to(device)
                labels = batch["labels"].to(device)
                if processor is None:
                    images01 = pixels
                    keyed_logits = logits_of(model(pixels))
                else:
                    images01 = processor.recover_images01(pixels.float())
                    keyed_logits = logits_of(model(pixel_values=pixels))
                hits = [keyed_logits.argmax(-1) == labels]
                for wrong in self.wrong_keys:
                    logits = logits_of(base(self._wrong_input(wrong, mean, std)(images01)))
                    hits.append(logits.argmax(-1) == labels)
                if last is not None:
                    counts += last.sum(0)
                    seen += len(last)
                last = torch.stack(hits, 1).to("cpu", torch.float64)
        finally:
            base.train(was_training)
        if last is None:
            last = torch.zeros(0, len(counts), dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts, seen, last = _over_ranks(counts, seen, last, device)
            # Accelerate pads each rank's last batch with examples from the
            # start; the real ones come first when the batches are put in
            # rank order (what gather_for_metrics relies on too).
            remainder = getattr(dataloader, "remainder", -1)
            if reached_end and isinstance(remainder, int) and 0 < remainder < len(last):
                last = last[:remainder]
        counts += last.sum(0)
        total = seen + len(last)
        if total == 0:
            return None
        key_acc = counts[0].item() / total
        wrong = [c / total for c in counts[1:].tolist()]
        return {
            "eval_key_accuracy": key_acc,
            "eval_wrong_key_accuracy_mean": sum(wrong) / len(wrong),
            "eval_wrong_key_accuracy_max": max(wrong),
            "eval_protection_margin": key_acc - max(wrong),
        }

    def _wrong_input(self, key: SecretKey, mean, std) -> KeyedInput:
        cached = self._wrong_inputs.get(key.fingerprint)
        if cached is None:
            cached = KeyedInput(key, mean=mean, std=std, check_range=False)
            self._wrong_inputs[key.fingerprint] = cached
        return cached

    # ---------------------------------------------------------- saving
    def on_save(self, args, state, control, model=None, **kwargs):
        if not args.should_save:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            return
        config = self.protection_config(model)
        try:  # the one save_protected wrote (model style): keep its weights digest and metadata
            written = ProtectionConfig.load(checkpoint)
        except CheckpointError:
            written = None
        if written is not None and written.fingerprint == config.fingerprint:
            config.weights_digest = written.weights_digest
            config.extra = {**written.extra, **config.extra}
        config.sign(self.key).save(checkpoint)
        handler = self._handler()
        if handler is None or self._scanner not in handler.callbacks:  # else the scanner, after the others
            self._scanner.scan(checkpoint)

    def protection_config(self, model: nn.Module) -> ProtectionConfig:
        """The ``protection.json`` content for ``model`` trained with this key."""
        model = base_module(model)
        if isinstance(model, ProtectedModel):
            return ProtectionConfig.from_model(model, trained_with="transformers.Trainer", style="model")
        if self._processor is None:
            raise ConfigurationError("cannot describe the protection: no KeyedImageProcessor known to the callback")
        return processor_protection_config(model, self._processor)


class _ScanCheckpointLast(TrainerCallback):
    """The key-material scan of each saved checkpoint, placed last in the
    trainer's callbacks by :class:`KeyProtectionCallback` (which itself goes
    first, for its metrics), so that it sees what every other callback's
    ``on_save`` wrote into the checkpoint as well."""

    def __init__(self, owner: KeyProtectionCallback) -> None:
        self.owner = owner

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and checkpoint.is_dir():
            self.scan(checkpoint)

    def scan(self, checkpoint: Path) -> None:
        refuse_key_material(checkpoint, self.owner.key, remedy="delete the checkpoint before sharing")

    def __repr__(self) -> str:
        return "KeyProtectionCallback.checkpoint_scan"


def refuse_other_keys_on_other_ranks(key: SecretKey) -> None:
    """Distributed (``torch.distributed`` initialized): :class:`KeyMismatchError`
    on every rank unless every rank holds the same key. Each rank builds
    its transform from its own key file; two files would train one model on
    two keyings and record only rank 0's. Compares the public fingerprints
    (a collective: every rank must call it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    held = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(held, key.fingerprint)
    if len(set(held)) > 1:
        ranks = ", ".join(f"rank {rank}: {fingerprint}" for rank, fingerprint in enumerate(held))
        raise KeyMismatchError(
            f"the processes of this run hold different keys (fingerprints {ranks}); every rank must load the "
            "same key file (copy the owner's key file to every machine, or set KP_KEY alike everywhere)"
        )


def refuse_other_key_output_dir(output_dir: Any, key: SecretKey) -> None:
    """Before a fresh (not resumed) run: :class:`CheckpointError` when
    ``output_dir`` or one of its ``checkpoint-N`` folders holds a model
    protected with another key. Trainer would replace them one by one as it
    saves (a model-style save refused only after training), leaving one
    folder with two keys' checkpoints that ``resume_from_checkpoint=True``
    and ``load_best_model_at_end`` pick from."""
    root = Path(output_dir)
    if not root.is_dir():
        return
    folders = [root, *sorted(path.parent for path in root.glob(f"checkpoint-*/{PROTECTION_FILE}"))]
    others = [folder.name if folder != root else str(root) for folder in folders
              if held_fingerprint(folder) not in (None, key.fingerprint)]
    if others:
        raise CheckpointError(
            f"{root} holds checkpoints of a model protected with another key ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}): this run would replace them as it saves; pass another "
            "output_dir to TrainingArguments, or move those checkpoints away first (or resume the run they "
            "belong to with its key)"
        )


def processor_protection_config(model: nn.Module, processor: KeyedImageProcessor) -> ProtectionConfig:
    """``protection.json`` for a plain model trained on ``processor``'s keyed
    output (processor style): the processor's key, mean, std and size."""
    key, size = processor.key, processor.output_size
    mean, std = processor.normalization
    keyed = KeyedInput(key, mean=mean, std=std,
                       input_size=(key.channels, *size) if size else None)
    view = ProtectedModel(model, keyed)
    return ProtectionConfig.from_model(view, trained_with="transformers.Trainer", style="processor")
