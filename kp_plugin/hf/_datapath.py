"""Where the key sits in a Trainer's data path (shared by the callback and
the Trainer subclass): which of our collators / ``with_transform``
transforms a dataloader or dataset uses."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import nn

from ..module import ProtectedModel
from .data import _ImageBatcher

__all__ = ["batchers_in", "dataset_transform", "base_module"]


def dataset_transform(dataset: Any) -> Optional[Any]:
    """The ``with_transform`` / ``set_transform`` function of a
    ``datasets.Dataset`` (``None`` for anything else)."""
    fmt = getattr(dataset, "format", None)
    if isinstance(fmt, dict) and fmt.get("type") == "custom":
        return (fmt.get("format_kwargs") or {}).get("transform")
    return None


def _mapped_functions(dataset: Any) -> list:
    """The functions a streaming ``datasets.IterableDataset`` applies as it
    is read (``.map(fn)``; also through shuffle, filter, interleave and
    concatenation): the only way to key its examples."""
    found, pending, seen = [], [getattr(dataset, "_ex_iterable", None)], set()
    while pending and len(seen) < 1000:
        node = pending.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        function = getattr(node, "function", None)
        if function is not None:
            found.append(function)
        pending.append(getattr(node, "ex_iterable", None))
        pending.extend(getattr(node, "ex_iterables", None) or ())
    return found


def _collator(obj: Any) -> Any:
    # Trainer wraps collators in RemoveColumnsCollator (.data_collator).
    while obj is not None and not isinstance(obj, _ImageBatcher) and hasattr(obj, "data_collator"):
        obj = obj.data_collator
    return obj


def batchers_in(*, dataloaders: Iterable[Any] = (), datasets: Iterable[Any] = (),
                collators: Iterable[Any] = ()) -> list:
    """Our collators / transforms found in the given dataloaders (their
    ``collate_fn`` and ``dataset``), datasets and collators."""
    found = []
    for loader in dataloaders:
        if loader is None:
            continue
        collators = list(collators) + [getattr(loader, "collate_fn", None)]
        datasets = list(datasets) + [getattr(loader, "dataset", None)]
    for collator in collators:
        c = _collator(collator)
        if isinstance(c, _ImageBatcher) and c not in found:
            found.append(c)
    for dataset in datasets:
        # A Trainer's dataloader may hold the dataset inside a shard
        # wrapper (accelerate's IterableDatasetShard: .dataset).
        for _ in range(8):
            if hasattr(dataset, "_ex_iterable") or dataset_transform(dataset) is not None \
                    or getattr(dataset, "dataset", None) is None:
                break
            dataset = dataset.dataset
        for t in [dataset_transform(dataset), *_mapped_functions(dataset)]:
            if isinstance(t, _ImageBatcher) and t not in found:
                found.append(t)
    return found


def base_module(model: nn.Module) -> nn.Module:
    """``model`` without DDP / accelerate wrappers (``.module``)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module) \
            and not isinstance(model, ProtectedModel):
        model = model.module
    return model
