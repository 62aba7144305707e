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

from ..checkpoint import PROTECTION_FILE, ProtectionConfig, refuse_key_material
from ..errors import ConfigurationError
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
    (Trainer always reports ``<prefix>_runtime``)."""
    for name in metrics or ():
        if name.endswith("_runtime"):
            return name[: -len("_runtime")]
    return "eval"


class ProtectionMarginWarning(UserWarning):
    """The key's accuracy is not far enough above the best wrong key's."""


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
            ``key_accuracy - max(wrong_key_accuracy)`` is below it.
        stop_on_small_margin: also stop training then.
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
        min_margin: float = 0.25,
        stop_on_small_margin: bool = False,
        seed: int = 0,
        max_eval_batches: Optional[int] = None,
        image_processor: Optional[KeyedImageProcessor] = None,
    ) -> None:
        from ..evaluate import wrong_keys as draw_wrong_keys

        require_key(key)
        if not isinstance(wrong_keys, numbers.Integral) or isinstance(wrong_keys, bool) or wrong_keys < 1:
            raise ConfigurationError(f"wrong_keys must be an integer of at least 1, got {wrong_keys!r}")
        if not isinstance(min_margin, numbers.Real) or isinstance(min_margin, bool) or min_margin != min_margin:
            raise ConfigurationError(f"min_margin must be a number (an accuracy difference, e.g. 0.25), "
                                     f"got {min_margin!r}")
        if image_processor is not None:
            image_processor.check_key(key)
        self.key = key
        self.wrong_keys = draw_wrong_keys(key, wrong_keys, seed=seed)
        self.min_margin = float(min_margin)
        self.stop_on_small_margin = stop_on_small_margin
        self.max_eval_batches = max_eval_batches
        self.image_processor = image_processor
        self._trainer = None
        self._processor: Optional[KeyedImageProcessor] = image_processor
        self._wrong_inputs: dict = {}
        self.history: list = []

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
        self.check_setup(model, processing_class=processing_class,
                         dataloaders=[train_dataloader, eval_dataloader])
        # Resumed (the state was loaded): the checkpoint this run continues
        # must be this key's. KeyedTrainer checks before loading; a plain
        # Trainer never does, so look where it saves checkpoints.
        resumed = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROTECTION_FILE
        if state.global_step > 0 and resumed.is_file():
            ProtectionConfig.load(resumed).check_key(self.key)

    def check_setup(self, model: nn.Module, *, processing_class: Any = None, dataloaders=()) -> str:
        """Check that exactly one of the model and the data path applies the
        key, and that it is this key. Returns ``"model"`` or ``"processor"``."""
        model = base_module(model)
        batchers = batchers_in(dataloaders=dataloaders)
        processors = [b.image_processor for b in batchers]
        if isinstance(processing_class, KeyedImageProcessor):
            processors.append(processing_class)
        if self.image_processor is not None:
            processors.append(self.image_processor)
        for processor in processors:
            processor.check_key(self.key)
        data_keyed = any(b.keys_data for b in batchers) or self.image_processor is not None
        if isinstance(model, ProtectedModel):
            ProtectionConfig.from_model(model).check_key(self.key)
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
        if margin < self.min_margin:
            warnings.warn(
                f"protection margin {margin:.3f} (key accuracy {result[f'{prefix}_key_accuracy']:.3f}, best of "
                f"{len(self.wrong_keys)} wrong keys {result[f'{prefix}_wrong_key_accuracy_max']:.3f}) is below "
                f"min_margin={self.min_margin} at step {state.global_step}. Train longer, or use the protection "
                "objective (KeyedTrainer(objective=DEFAULT_OBJECTIVE)) and a scheme with value steps",
                ProtectionMarginWarning,
                stacklevel=2,
            )
            if self.stop_on_small_margin:
                control.should_training_stop = True

    @torch.no_grad()
    def measure(self, model: nn.Module, dataloader: Any) -> Optional[dict]:
        """Accuracy with the key and with each wrong key on ``dataloader``'s
        batches (summed over ranks when distributed)."""
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
            base, mean, std = model, processor.image_mean, processor.image_std
        was_training = base.training
        base.eval()
        device = next(base.parameters()).device
        counts = torch.zeros(len(self.wrong_keys) + 2, dtype=torch.float64)
        try:
            for index, batch in enumerate(dataloader):
                if self.max_eval_batches is not None and index >= self.max_eval_batches:
                    break
                if "labels" not in batch or "pixel_values" not in batch:
                    logger.warning("evaluation batches lack pixel_values/labels; protection metrics skipped")
                    return None
                pixels = batch["pixel_values"].to(device)
                labels = batch["labels"].to(device)
                if processor is None:
                    images01 = pixels
                    keyed_logits = logits_of(model(pixels))
                else:
                    images01 = processor.recover_images01(pixels.float())
                    keyed_logits = logits_of(model(pixel_values=pixels))
                counts[0] += (keyed_logits.argmax(-1) == labels).sum().item()
                for i, wrong in enumerate(self.wrong_keys):
                    keyed = self._wrong_input(wrong, mean, std)
                    logits = logits_of(base(keyed(images01)))
                    counts[i + 1] += (logits.argmax(-1) == labels).sum().item()
                counts[-1] += labels.numel()
        finally:
            base.train(was_training)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            reduced = counts.to(device if torch.distributed.get_backend() == "nccl" else "cpu")
            torch.distributed.all_reduce(reduced)
            counts = reduced.cpu()
        total = counts[-1].item()
        if total == 0:
            return None
        key_acc = counts[0].item() / total
        wrong = [c / total for c in counts[1:-1].tolist()]
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
        self.protection_config(model).save(checkpoint)
        refuse_key_material(checkpoint, self.key, remedy="delete the checkpoint before sharing")

    def protection_config(self, model: nn.Module) -> ProtectionConfig:
        """The ``protection.json`` content for ``model`` trained with this key."""
        model = base_module(model)
        if isinstance(model, ProtectedModel):
            return ProtectionConfig.from_model(model, trained_with="transformers.Trainer", style="model")
        if self._processor is None:
            raise ConfigurationError("cannot describe the protection: no KeyedImageProcessor known to the callback")
        return processor_protection_config(model, self._processor)


def processor_protection_config(model: nn.Module, processor: KeyedImageProcessor) -> ProtectionConfig:
    """``protection.json`` for a plain model trained on ``processor``'s keyed
    output (processor style): the processor's key, mean, std and size."""
    key, size = processor.key, processor.output_size
    keyed = KeyedInput(key, mean=processor.image_mean, std=processor.image_std,
                       input_size=(key.channels, *size) if size else None)
    view = ProtectedModel(model, keyed)
    return ProtectionConfig.from_model(view, trained_with="transformers.Trainer", style="processor")
