"""``KeyedTrainer``: ``transformers.Trainer`` for protected fine-tuning.

What it changes, and why:

- columns: ``Trainer`` keeps only dataset columns named by
  ``model.forward``. A :class:`kp_plugin.ProtectedModel`'s forward is
  ``(*args, **kwargs)`` and the raw ``image`` column is never named, so the
  stock Trainer drops what the keyed data path needs. ``KeyedTrainer`` reads
  the base model's signature and keeps the columns our collators and
  transforms declare.
- loss: with ``objective=`` (a :class:`kp_plugin.objectives.ProtectionObjective`)
  the training loss is that objective's: cross-entropy with the key plus
  suppression under random wrong keys (``label_smoothing_factor`` applies to
  its cross-entropy); evaluation reports the model's own loss, as a plain
  run does. It needs the unkeyed [0, 1] images: in model style
  they are the batch itself; in processor style they are recovered from the
  keyed batch with the key. The parts are logged as ``objective_<part>``.
- saving: a ProtectedModel's checkpoints are written by
  :func:`kp_plugin.save_protected` (the base model's own weight names,
  ``config.json``, ``protection.json``, never the key); resuming and
  ``load_best_model_at_end`` load them back into the base model, after
  checking the key's fingerprint.
- it binds every :class:`KeyProtectionCallback` so that its metrics go
  through ``Trainer.log`` to every logger.
- speed: a training step on the CPU computes the weight gradient of
  depthwise convolutions on feature maps no larger than their kernel as
  :func:`kp_plugin.train.fit` does (:mod:`kp_plugin._depthwise`; oneDNN's
  own took 14-79x longer for those layers on the AVX2 dev CPU);
  ``small_map_depthwise=False`` turns it off.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import Trainer

from .._depthwise import small_map_depthwise
from ..checkpoint import (PROTECTION_FILE, WEIGHTS_FILE, ProtectionConfig, load_protected, refuse_key_material,
                          refuse_other_key_checkpoint, save_protected)
from ..errors import CheckpointError, ConfigurationError
from ..keys import SecretKey
from ..module import KeyedInput, ProtectedModel
from ..objectives import ProtectionObjective, logits_of
from ..train import Normalize
from ._datapath import base_module, batchers_in
from .callback import (KeyProtectionCallback, processor_protection_config, refuse_other_key_output_dir,
                       refuse_other_keys_on_other_ranks)
from .data import _ImageBatcher
from .processor import KeyedImageProcessor

__all__ = ["KeyedTrainer"]


def _renamed_on_load(model: Any, checkpoint: Optional[str]) -> bool:
    """A plain transformers model whose checkpoint transformers wrote
    (model.safetensors without kp-plugin's metadata, or a sharded index):
    what :func:`kp_plugin.checkpoint.load_protected` loads through
    ``from_pretrained`` too."""
    from ..checkpoint import _saved_by_transformers

    if checkpoint is None or type(model).__module__.startswith("peft"):
        return False
    weights = os.path.join(checkpoint, WEIGHTS_FILE)
    if os.path.isfile(weights):
        from safetensors import safe_open

        with safe_open(weights, framework="pt") as fh:
            return _saved_by_transformers(model, fh.metadata() or {})
    return _saved_by_transformers(model, {}) and os.path.isfile(os.path.join(checkpoint, f"{WEIGHTS_FILE}.index.json"))


def _load_pretrained_weights(model: Any, checkpoint: str) -> None:
    from ..checkpoint import _load_through_transformers, load_error_summary

    try:
        _load_through_transformers(model, Path(checkpoint), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot load the weights in {checkpoint}: {load_error_summary(exc)}") from None


class KeyedTrainer(Trainer):
    """``Trainer`` that keeps the keyed data path's columns, optionally
    trains with the protection objective, and saves protected checkpoints.

    Takes every ``Trainer`` argument, plus:

    Args:
        objective: a :class:`kp_plugin.objectives.ProtectionObjective`
            (e.g. ``kp_plugin.objectives.DEFAULT_OBJECTIVE``); ``None``:
            the model's own loss (cross-entropy).
        teacher: for an objective with ``distill_weight`` (the ``kp
            protect`` recipe): the unprotected model of the same task (e.g.
            fine-tuned first with a plain ``Trainer``). It is called in eval
            mode without gradients on the same images, plain and normalized
            with the processor's mean and std, as ``teacher(pixel_values=...)``.

    Example:
        >>> trainer = KeyedTrainer(model=wrap_hf_model(model, key, image_processor=processor),
        ...                        args=TrainingArguments("out"), train_dataset=ds["train"],
        ...                        data_collator=KeyedImageCollator(processor, output="images01"),
        ...                        objective=DEFAULT_OBJECTIVE,
        ...                        callbacks=[KeyProtectionCallback(key)])         # doctest: +SKIP
        >>> trainer.train()                                                     # doctest: +SKIP
    """

    def __init__(
        self,
        *args: Any,
        objective: Optional[ProtectionObjective] = None,
        teacher: Optional[torch.nn.Module] = None,
        small_map_depthwise: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.small_map_depthwise = small_map_depthwise
        if objective is not None and not isinstance(objective, ProtectionObjective):
            raise TypeError(f"objective must be a ProtectionObjective, got {type(objective).__name__}")
        if objective is not None:
            objective.check_teacher(teacher)
            objective = self._with_label_smoothing(objective)
        if objective is not None and getattr(self, "compute_loss_func", None) is not None:
            raise ConfigurationError(
                "two losses: objective= (the protection objective computes the training loss) and "
                "compute_loss_func= (which it would replace); pass one of them"
            )
        self.objective = objective
        self.teacher = teacher
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        self._teacher_input: Optional[Normalize] = None
        if objective is not None:
            # The objective returns a per-batch mean (not a sum over
            # num_items_in_batch): let Trainer divide by the accumulation steps.
            # Releases without loss_is_scaled_for_ga (5.17 and before) decide
            # from model_accepts_loss_kwargs, True for a wrapped model's
            # **kwargs: the loss and the gradients were N times too large.
            self.loss_is_scaled_for_ga = False
            self.model_accepts_loss_kwargs = False
        self._objective_parts: dict = {}
        self._objective_steps = 0
        self._keyed_view: Optional[ProtectedModel] = None
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, KeyProtectionCallback):
                callback.bind(self)

    def _with_label_smoothing(self, objective: ProtectionObjective) -> ProtectionObjective:
        """``TrainingArguments(label_smoothing_factor=...)`` applies to the
        objective's cross-entropy (Trainer's own label smoother never sees
        the objective's loss)."""
        smoothing = float(getattr(self.args, "label_smoothing_factor", 0.0) or 0.0)
        if not smoothing or objective.label_smoothing == smoothing:
            return objective
        if objective.label_smoothing:
            raise ConfigurationError(
                f"two label smoothings: TrainingArguments(label_smoothing_factor={smoothing:g}) and "
                f"ProtectionObjective(label_smoothing={objective.label_smoothing:g}); set one of them"
            )
        return dataclasses.replace(objective, label_smoothing=smoothing)

    # ------------------------------------------------------------ columns
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is not None:
            return
        model = base_module(self.model)
        if isinstance(model, ProtectedModel):
            model = model.unwrap()
        columns = list(inspect.signature(model.forward).parameters.keys())
        columns += list(set(["label", "label_ids"] + self.label_names))
        datasets = [self.train_dataset]
        if isinstance(self.eval_dataset, dict):
            datasets += list(self.eval_dataset.values())
        else:
            datasets.append(self.eval_dataset)
        for batcher in batchers_in(datasets=datasets, collators=[self.data_collator]):
            columns += [c for c in batcher.input_columns if c not in columns]
        self._signature_columns = columns

    # ---------------------------------------------------- evaluation data
    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        with self._collator_without_augmentation():
            return super().get_eval_dataloader(eval_dataset)

    def get_test_dataloader(self, test_dataset: Any) -> Any:
        with self._collator_without_augmentation():
            return super().get_test_dataloader(test_dataset)

    @contextlib.contextmanager
    def _collator_without_augmentation(self):
        """Evaluation and prediction batches without the keyed collator's
        training augmentation (``Trainer`` has one collator for every split:
        evaluation saw randomly augmented images)."""
        collator = self.data_collator
        if isinstance(collator, _ImageBatcher):
            self.data_collator = collator.without_augmentation()
        try:
            yield
        finally:
            self.data_collator = collator

    # ------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pixels = inputs.get("pixel_values") if hasattr(inputs, "get") else None
        on_cpu = isinstance(pixels, torch.Tensor) and pixels.device.type == "cpu"
        with small_map_depthwise() if self.small_map_depthwise and on_cpu and model.training \
                else contextlib.nullcontext():
            return self._compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def _compute_loss(self, model, inputs, return_outputs, num_items_in_batch):
        # Evaluation (the model in eval mode) reports the model's own loss,
        # as a plain run does: the objective's suppression terms draw random
        # wrong keys, which would make eval_loss vary from call to call.
        if self.objective is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs.get("labels")
        if labels is None:
            raise ConfigurationError("the protection objective needs labels in the batch ('labels')")
        pixels = inputs["pixel_values"]
        view, images01 = self._objective_view(model, pixels)
        outputs = model(pixel_values=pixels)
        teacher_logits = self._teacher_logits(view, images01) if self.objective.distill_weight else None
        # The objective's own passes (wrong keys, plain images) call the base
        # model directly, not the forward accelerate wrapped in autocast: run
        # them in the same mixed precision as the keyed pass.
        with self.accelerator.autocast():
            loss, parts = self.objective(view, images01, labels, logits_of(outputs), teacher_logits)
        for name, value in parts.items():
            self._objective_parts[name] = self._objective_parts.get(name, 0.0) + float(value)
        self._objective_steps += 1
        return (loss, outputs) if return_outputs else loss

    def _teacher_logits(self, view: ProtectedModel, images01: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on the plain images, normalized as the keyed
        path normalizes (the processor's mean and std)."""
        if self._teacher_input is None:  # the first step: normalization fixed, teacher moved once
            self._teacher_input = Normalize(view.keyed.mean, view.keyed.std).to(images01.device)
            self.teacher.to(images01.device)
        with torch.no_grad():
            return logits_of(self.teacher(pixel_values=self._teacher_input(images01)))

    def _objective_view(self, model, pixels: torch.Tensor) -> tuple:
        """The ProtectedModel the objective works on, and the [0, 1] images."""
        base = base_module(model)
        if isinstance(base, ProtectedModel):
            return base, pixels
        processor = self._keying_processor()
        if self._keyed_view is None or self._keyed_view.unwrap() is not base:
            mean, std = processor.normalization
            keyed = KeyedInput(processor.key, mean=mean, std=std, check_range=False)
            self._keyed_view = ProtectedModel(base, keyed.to(pixels.device))
        return self._keyed_view, processor.recover_images01(pixels.float())

    def _keying_processor(self) -> KeyedImageProcessor:
        keyed = [b for b in batchers_in(datasets=[self.train_dataset], collators=[self.data_collator]) if b.keys_data]
        if keyed:
            return keyed[0].image_processor
        if isinstance(self.processing_class, KeyedImageProcessor):
            return self.processing_class
        raise ConfigurationError(
            "the protection objective needs the key: train a ProtectedModel (wrap_hf_model) on [0, 1] images, "
            "or key the data with KeyedImageCollator / KeyedExampleTransform"
        )

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if self._objective_steps and "loss" in logs:
            for name, total in self._objective_parts.items():
                logs[f"objective_{name}"] = total / self._objective_steps
            self._objective_parts, self._objective_steps = {}, 0
        super().log(logs, *args, **kwargs)

    # ------------------------------------------------------------ saving
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        model = base_module(self.model)
        if not isinstance(model, ProtectedModel):
            super()._save(output_dir, state_dict=state_dict)
            return self._save_processor_style(model, output_dir)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        refuse_other_key_checkpoint(output_dir, model.key.fingerprint,
                                    remedy="save into another folder, or move that folder's model away first")
        save_protected(model, output_dir, overwrite=True)  # the check above, with a remedy for Trainer users
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_processor_style(self, model: torch.nn.Module, output_dir: Optional[str]) -> None:
        """Processor style: ``protection.json`` beside the plain model's
        files (``save_model`` as well as checkpoints), so the folder says
        which key it needs and loads with :func:`kp_plugin.load_protected`."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        try:
            processor = self._keying_processor()
        except ConfigurationError:
            return  # nothing keyed here: a plain Trainer run
        if not self.args.should_save or not os.path.isdir(output_dir):
            return
        processor_protection_config(model, processor).sign(processor.key).save(output_dir)
        refuse_key_material(output_dir, processor.key)

    def _load_best_model(self) -> None:
        wrapped = base_module(self.model)
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        if _renamed_on_load(wrapped, self.state.best_model_checkpoint):
            # Processor style: transformers 5 saves the checkpoint under its
            # old names and the stock loader matches them against the live
            # model's without renaming, loading part of it (ViT: the encoder
            # layers stayed as they were last); from_pretrained renames.
            return _load_pretrained_weights(wrapped, self.state.best_model_checkpoint)
        if not isinstance(wrapped, ProtectedModel):
            return super()._load_best_model()
        # The checkpoint holds the base model's own names (save_protected);
        # the stock loader would match them against the wrapper's, silently.
        device = next(wrapped.parameters()).device
        training = wrapped.training
        load_protected(self.state.best_model_checkpoint, wrapped.unwrap(), wrapped.key, device=device)
        wrapped.train(training)  # load_protected returns the model in eval mode

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        wrapped = base_module(self.model)
        key = wrapped.key if isinstance(wrapped, ProtectedModel) else self._run_key()
        if key is not None:
            refuse_other_keys_on_other_ranks(key)
            if not resume_from_checkpoint and self.args.should_save:
                # before training: a refused save would lose the run
                refuse_other_key_output_dir(self.args.output_dir, key)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        wrapped = base_module(self.model)
        key = wrapped.key if isinstance(wrapped, ProtectedModel) else self._run_key()
        if key is not None and os.path.isfile(os.path.join(resume_from_checkpoint, PROTECTION_FILE)):
            # Resuming another key's run would go on training its weights
            # under this key; the stock loader never looks.
            ProtectionConfig.load(resume_from_checkpoint).check_key(key, remedy=(
                f"{resume_from_checkpoint} was saved under that key: resume it with the key file it was trained "
                "with, or train without resume_from_checkpoint into another output_dir"))
        if model is None and isinstance(wrapped, ProtectedModel):
            model = wrapped.unwrap()
        target = wrapped if model is None else model
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled) and _renamed_on_load(target, resume_from_checkpoint):
            return _load_pretrained_weights(target, resume_from_checkpoint)  # as in _load_best_model
        return super()._load_from_checkpoint(resume_from_checkpoint, model=model)

    def _run_key(self) -> Optional[SecretKey]:
        """The key of a processor-style run (its keyed data path), if any."""
        try:
            return self._keying_processor().key
        except ConfigurationError:
            callbacks = [c for c in self.callback_handler.callbacks if isinstance(c, KeyProtectionCallback)]
            return callbacks[0].key if callbacks else None
