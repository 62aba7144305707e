"""Data helpers for ``datasets`` and ``Trainer``: a batch collator and a
``with_transform`` transform, both driven by a :class:`KeyedImageProcessor`.

Both read raw examples (an image column and a label column), resize them as
the base processor does, optionally augment the [0, 1] images (augmentation
goes before the key), and produce either

- ``output="keyed"``: keyed, normalized ``pixel_values`` for a plain
  transformers model (processor style), or
- ``output="images01"``: [0, 1] images for a model wrapped with
  :func:`kp_plugin.hf.wrap_hf_model` (model style; what the protection
  objective needs).

The ``remove_unused_columns`` trap: ``Trainer`` drops every dataset column
that is not a parameter of ``model.forward``. The raw ``image`` column never
is, and a :class:`kp_plugin.ProtectedModel`'s ``forward(*args, **kwargs)``
hides even ``pixel_values``. :class:`kp_plugin.hf.KeyedTrainer` keeps the
columns these helpers declare (``input_columns``); with a plain ``Trainer``
pass ``TrainingArguments(remove_unused_columns=False)``. Either way, a
missing column is a clear error here, not a silent drop.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from ..errors import ConfigurationError
from ..keys import child_process_picklers
from .processor import KeyedImageProcessor, KeyRequiredError

__all__ = ["KeyedImageCollator", "KeyedExampleTransform", "OUTPUTS"]

#: What the helpers produce: keyed pixel_values, or [0, 1] images.
OUTPUTS = ("keyed", "images01")
#: The label columns read when ``label_column`` is left at ``"label"``, the
#: first present: the names transformers' own collators take.
LABEL_COLUMNS = ("label", "labels", "label_ids")

_TRAP_HINT = (
    "Trainer's remove_unused_columns drops columns that model.forward does not name; use "
    "kp_plugin.hf.KeyedTrainer (it keeps them) or TrainingArguments(remove_unused_columns=False)"
)


class _ImageBatcher:
    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A process started by multiprocessing (spawn / forkserver DataLoader
        # workers, datasets' map with num_proc) gets the helper whole, key
        # included, as SecretKey allows for those picklers only; every other
        # pickle gets __reduce__ below.
        for pickler in child_process_picklers():
            pickler.register(cls, _send_to_child_process)

    def __init__(
        self,
        image_processor: KeyedImageProcessor,
        *,
        image_column: str = "image",
        label_column: Optional[str] = "label",
        output: str = "keyed",
        augment: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> None:
        if not isinstance(image_processor, KeyedImageProcessor):
            raise TypeError(
                "image_processor must be a kp_plugin.hf.KeyedImageProcessor (it carries the key and the "
                f"base processor's settings), got {type(image_processor).__name__}"
            )
        if output not in OUTPUTS:
            raise ConfigurationError(f"output must be one of {OUTPUTS}, got {output!r}")
        self.image_processor = image_processor
        self.image_column = image_column
        self.label_column = label_column
        self.output = output
        self.augment = augment

    @property
    def input_columns(self) -> list:
        """The dataset columns this helper reads (Trainer must keep them)."""
        labels = LABEL_COLUMNS if self.label_column == "label" else (self.label_column,)
        return [c for c in (self.image_column, *labels) if c]

    def _label_column_in(self, columns: Sequence[str]) -> Optional[str]:
        """The label column of examples with ``columns``: ``label_column``,
        or with the default ``"label"`` the first of :data:`LABEL_COLUMNS`
        they have (``labels`` in many datasets)."""
        if self.label_column != "label":
            return self.label_column
        return next((name for name in LABEL_COLUMNS if name in columns), "label")

    @property
    def keys_data(self) -> bool:
        """True when the output is keyed (processor style)."""
        return self.output == "keyed"

    def without_augmentation(self) -> "_ImageBatcher":
        """This helper with ``augment=None`` (itself when it has none): for
        evaluation batches. ``KeyedTrainer`` builds its evaluation and test
        dataloaders with it, since ``Trainer`` has one collator for all."""
        if self.augment is None:
            return self
        helper = type(self).__new__(type(self))
        helper.__dict__.update(self.__dict__, augment=None)
        return helper

    def _pixel_values(self, images: Sequence[Any]) -> torch.Tensor:
        if self.output == "keyed" and self.augment is None:
            # The processor's own path (8-bit images keyed as bytes): the
            # batches are bit for bit what it gives a pipeline, where going
            # through [0, 1] floats first differed in the last bit.
            return self.image_processor(list(images), return_tensors="pt")["pixel_values"]
        x = self.image_processor.images01(list(images))
        if self.augment is not None:
            x = self.augment(x)
        if self.output == "keyed":
            return self.image_processor.apply_key(x)
        return x

    # ``datasets`` fingerprints a transform by pickling it. The pickle holds
    # public settings only (the processor's config with the key's
    # fingerprint), so the fingerprint is stable and the key never leaves
    # the process; unpickling refuses, since the key is not in it.
    def __reduce__(self):
        return (_refuse_unpickling, (type(self).__name__, self.image_processor.to_json_string(),
                                     self.image_column, self.label_column, self.output, self.augment))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo: dict):
        return self

    def _labelled(self, examples: Sequence[dict]) -> Optional[str]:
        """The label column when the examples carry labels: all of them or
        none (an unlabeled split: ``None``; Trainer's column removal keeps
        ``label`` and ``labels``, so a missing label column is the data's,
        not the trap's)."""
        column = self._label_column_in([name for example in examples for name in example])
        if not column:
            return None
        have = [column in example for example in examples]
        if any(have) and not all(have):
            raise ConfigurationError(
                f"{have.count(False)} of the {len(examples)} examples in this batch have no {column!r} "
                "value: label every example of a split, or none (for predict)"
            )
        return column if all(have) else None

    def _missing(self, have: Sequence[str]) -> ConfigurationError:
        return ConfigurationError(
            f"examples have no {self.image_column!r} column (they have {sorted(have)}). If the images are in a "
            f"column with another name, name it: {type(self).__name__}(processor, image_column=...) (and "
            "label_column=... for the labels). Otherwise: " + _TRAP_HINT
        )


def _refuse_unpickling(name: str, *public_settings: Any) -> None:
    raise KeyRequiredError(
        f"a {name} was unpickled without its key (a pickle keeps its public settings only; keys are never "
        "pickled). Processes started by multiprocessing, such as DataLoader workers, receive it whole; "
        "elsewhere build it in each process from the key file (SecretKey.load)"
    )


def _rebuild_in_child_process(cls: type, state: dict) -> "_ImageBatcher":
    helper = cls.__new__(cls)
    helper.__dict__.update(state)
    return helper


def _send_to_child_process(helper: "_ImageBatcher"):
    return _rebuild_in_child_process, (type(helper), dict(helper.__dict__))


class KeyedImageCollator(_ImageBatcher):
    """``Trainer`` data collator: raw examples -> ``{"pixel_values", "labels"}``.

    Processing whole batches at once uses the base processor's batched
    (torchvision) path.

    Args:
        image_processor: a :class:`KeyedImageProcessor`.
        image_column: the column with PIL images / arrays (CIFAR-10 on the
            Hub calls it ``img``).
        label_column: the column with int labels (``None``: no labels). Left
            at ``"label"``, examples with ``labels`` or ``label_ids``
            instead are read from that column. Examples without labels (an
            unlabeled split for ``predict``) give batches without
            ``labels``, as transformers' own collators do.
        output: ``"keyed"`` (plain model) or ``"images01"`` (wrapped model).
        augment: optional function on a float ``(B, C, H, W)`` batch in
            [0, 1], applied before the key (e.g. a torchvision v2 transform).
            ``KeyedTrainer`` leaves it out of evaluation batches; a plain
            ``Trainer`` uses one collator for every split, so there pass
            ``data_collator=collator.without_augmentation()`` to evaluate.

    Example:
        >>> collator = KeyedImageCollator(processor)                              # doctest: +SKIP
        >>> trainer = KeyedTrainer(model=model, args=args, train_dataset=ds["train"],
        ...                        data_collator=collator)                        # doctest: +SKIP
    """

    def __call__(self, examples: Sequence[dict]) -> dict:
        if not examples:
            raise ConfigurationError("empty batch")
        if self.image_column not in examples[0]:
            raise self._missing(list(examples[0].keys()))
        batch = {"pixel_values": self._pixel_values([ex[self.image_column] for ex in examples])}
        column = self._labelled(examples)
        if column:
            batch["labels"] = torch.tensor([int(ex[column]) for ex in examples], dtype=torch.long)
        return batch


class KeyedExampleTransform(_ImageBatcher):
    """A transform for ``datasets.Dataset.with_transform``: a batch of raw
    columns -> ``pixel_values`` (+ ``labels``), computed on access.

    Use it with ``transformers.default_data_collator``.

    Args:
        image_processor, image_column, label_column, output, augment: as in
            :class:`KeyedImageCollator`.

    Example:
        >>> train = ds["train"].with_transform(KeyedExampleTransform(processor))  # doctest: +SKIP
        >>> train[0]["pixel_values"].shape                                        # doctest: +SKIP
        torch.Size([3, 224, 224])
    """

    def __call__(self, batch: dict) -> dict:
        if self.image_column not in batch:
            raise self._missing(list(batch.keys()))
        out = {"pixel_values": list(self._pixel_values(batch[self.image_column]).unbind(0))}
        column = self._label_column_in(list(batch.keys()))
        if column and column in batch:  # else an unlabeled split (see the collator)
            out["labels"] = [int(v) for v in batch[column]]
        return out
