"""Fine-tuning a protected model: small and solid.

:func:`fit` trains a :class:`~kp_plugin.module.ProtectedModel` (or a plain
model behind :func:`plain_model`, for the unprotected baseline) on images in
[0, 1]: AdamW, a one-cycle or cosine schedule, augmentation on the [0, 1]
images *before* the keyed transform (the ProtectedModel applies the key in
its forward), bf16 autocast on CUDA, a tqdm bar with loss and accuracy, a
checkpoint per epoch in the protected format (never the key) plus a
training-state file, and resume.

Example:
    >>> key = SecretKey.generate(block_size=8)                                   # doctest: +SKIP
    >>> model = wrap_model(load_efficientnet_lite0(num_classes=10), key)          # doctest: +SKIP
    >>> result = fit(model, load_dataset("digits"), config=TrainConfig(epochs=4)) # doctest: +SKIP
    >>> evaluate_accuracy(model, load_dataset("digits", split="test"))            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._depthwise import small_map_depthwise
from .checkpoint import (
    PROTECTION_FILE,
    WEIGHTS_FILE,
    ProtectionConfig,
    _save_protected,
    _uncompiled,
    _write_all,
    load_error_summary,
    read_weights_header,
    replacing,
    usable_device,
    weights_digest,
)
from .data import iterate_batches
from .errors import (CheckpointError, CheckpointWriteError, ConfigurationError, KeyMismatchError, KPError,
                     first_line, torch_load_failure)
from .keys import SecretKey
from .module import KeyedInput, ProtectedModel, protected_model_of
from .objectives import DEFAULT_OBJECTIVE, ProtectionObjective, logits_of

__all__ = [
    "TrainConfig",
    "TrainResult",
    "fit",
    "evaluate_accuracy",
    "rekey",
    "Normalize",
    "plain_model",
    "PlainModel",
    "augment_images",
    "mix_images",
    "mixed_targets",
    "first_conv",
    "SCHEDULES",
    "TRAINING_STATE_FILE",
    "DEMO_BLOCK_SIZE",
    "DEMO_EPOCHS",
]

SCHEDULES = ("onecycle", "cosine")
TRAINING_STATE_FILE = "training_state.pt"

#: The demo's recommended settings (measured; docs/recipe.md): digits at
#: 32x32 (data.DEFAULT_IMAGE_SIZE), block size 4 (8 blocks per side), 32
#: epochs with the default scheme and objective. 32 epochs instead of 16
#: gave 1.4 points more with the key on two seeds; channels-last training
#: made them cost less time than 16 did before. Distillation from the
#: unprotected fine-tune (``kp protect --distill``) gained another 0.6-0.9
#: points but made the stolen weights more useful to a fine-tuning attacker,
#: so it is off by default. Block size 2 was measured
#: against it (docs/recipe.md, "Block size 2") and not adopted: more accuracy
#: with the key on photos in three seeds of five, but the worst wrong key
#: over 30% in three of six photos runs and stronger swap-search and
#: fine-tuning attacks on the digits demo model.
DEMO_BLOCK_SIZE = 4
DEMO_EPOCHS = 32


@dataclass
class TrainConfig:
    """How :func:`fit` trains.

    Args:
        epochs: passes over the training set.
        batch_size: images per step.
        lr: peak learning rate (AdamW).
        weight_decay: AdamW weight decay.
        schedule: ``"onecycle"`` (warm-up then cosine annealing) or ``"cosine"``.
        augment: random translation/scale of the [0, 1] images before the key.
        amp: bf16 autocast on CUDA (ignored on CPU).
        seed: fixes shuffling, augmentation and the suppression's wrong keys.
        objective: the loss (see :mod:`kp_plugin.objectives`); ``None``
            means the library default :data:`DEFAULT_OBJECTIVE`. Use
            ``ProtectionObjective()`` for plain cross-entropy.
        stem_lr_scale: learning-rate multiplier of the first convolution.
        reinit_stem: re-initialize the first convolution of a ProtectedModel
            before training (so its fine-tuned weights say nothing about the
            public ones); the unprotected baseline keeps its stem.
        channels_last: train in the channels-last memory format (as timm's
            ``--channels-last``). The same computation, laid out so that
            oneDNN's CPU convolutions run fast: 2.3x (one thread) and 3.5x
            (two) faster protected steps for EfficientNet-Lite0 at 32x32 on
            the dev CPU, 1.7x and 2.0x at 64x64 (docs/benchmarks.md).
            Only during training: the model comes back contiguous.
        small_map_depthwise: on the CPU, compute the weight gradient of
            depthwise convolutions whose feature map is no larger than
            their kernel (EfficientNet's last stages at 32x32) with a
            batched matrix product (:mod:`kp_plugin._depthwise`) instead
            of oneDNN's, which on an AVX2 CPU took 15-39 ms a layer there
            against 0.4-2.6: protected steps of the demo recipe 2.16x
            (one thread) and 2.46x (two) faster at 32x32, 1.57x and 1.50x
            at 64x64 on the dev CPU (docs/benchmarks.md). The same
            gradients up to float rounding; ``False`` runs torch's own.
        ema_decay: keep an exponential moving average of the weights and
            batch-norm statistics (as timm's ``--model-ema``), with the
            usual warm-up ``min(decay, (1 + t) / (10 + t))`` at step ``t``;
            per-epoch evaluation uses the average, and the model comes back
            holding it. ``None``: the last step's weights.
        mixup_alpha: mix each batch with a shuffled copy of itself, weight
            ``lam ~ Beta(alpha, alpha)``, and the labels with it (as timm's
            ``--mixup``); 0 turns it off. Applied to the [0, 1] images
            before the key.
        cutmix_alpha: paste a box of a shuffled copy into each batch, the
            box's area fraction ``1 - lam`` with ``lam ~ Beta(alpha, alpha)``
            (as timm's ``--cutmix``); 0 turns it off. With both on, each
            batch uses one of the two at random. Off by default: on photos
            (0.8 / 1.0) they lifted the protected and the unprotected
            fine-tunes alike, leaving the gap (docs/recipe.md).

    Example:
        >>> TrainConfig(epochs=2, batch_size=32).schedule
        'onecycle'
    """

    epochs: int = DEMO_EPOCHS
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.01
    schedule: str = "onecycle"
    augment: bool = True
    amp: bool = True
    seed: int = 0
    objective: Optional[ProtectionObjective] = None
    stem_lr_scale: float = 1.0
    reinit_stem: bool = False
    channels_last: bool = True
    small_map_depthwise: bool = True
    ema_decay: Optional[float] = None
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigurationError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigurationError(f"{name} must be an integer, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ConfigurationError("epochs and batch_size must be at least 1")
        if not (isinstance(self.lr, (int, float)) and 0 < self.lr < math.inf):  # NaN fails too
            raise ConfigurationError(f"lr must be a positive finite number, got {self.lr}")
        if not (isinstance(self.weight_decay, (int, float)) and 0 <= self.weight_decay < math.inf):
            raise ConfigurationError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigurationError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if not (self.mixup_alpha >= 0 and self.cutmix_alpha >= 0):  # NaN too
            raise ConfigurationError("mixup_alpha and cutmix_alpha must be >= 0 (0 turns them off)")

    @property
    def resolved_objective(self) -> ProtectionObjective:
        return DEFAULT_OBJECTIVE if self.objective is None else self.objective

    def to_dict(self) -> dict:
        data = asdict(self)
        data["objective"] = self.resolved_objective.to_dict()
        return data


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Attributes:
        history: one dict per epoch (``epoch``, ``loss``, ``accuracy`` on the
            training batches, ``lr``, the objective's parts, ``seconds``, and
            ``eval_accuracy`` when an eval set was given).
        seconds: wall time of the epochs run in this call.
    """

    history: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, for models fed [0, 1] images.

    Example:
        >>> Normalize(0.5, 0.5)(torch.ones(1, 3, 2, 2)).max().item()
        1.0
    """

    def __init__(self, mean: Union[float, Sequence[float]], std: Union[float, Sequence[float]]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if (std_t <= 0).any():
            raise ConfigurationError(f"std must be positive, got {std}")
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float() / 255
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class PlainModel(nn.Module):
    """An unprotected model that takes [0, 1] images (normalizes inside), so
    the baseline is trained and evaluated exactly like the protected one."""

    def __init__(self, model: nn.Module, normalize: Normalize) -> None:
        super().__init__()
        self.normalize = normalize
        self.model = model

    def forward(self, images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.model(self.normalize(images), *args, **kwargs)

    def unwrap(self) -> nn.Module:
        return self.model


def plain_model(
    model: nn.Module,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> PlainModel:
    """Wrap an unprotected model so it takes [0, 1] images like a
    ProtectedModel; mean/std default to timm's ``pretrained_cfg``.

    Example:
        >>> baseline = plain_model(load_efficientnet_lite0(num_classes=10))   # doctest: +SKIP
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = mean if mean is not None else cfg.get("mean")
    std = std if std is not None else cfg.get("std")
    if mean is None or std is None:
        raise ConfigurationError(
            f"cannot tell the normalization of {type(model).__name__}; pass mean= and std="
        )
    return PlainModel(model, Normalize(mean, std))


def rekey(model: ProtectedModel, key: SecretKey) -> ProtectedModel:
    """The same base weights (shared, not copied) behind another key: for
    wrong-key evaluation and attacks.

    Example:
        >>> wrong = rekey(model, SecretKey.generate_like(model.key))   # doctest: +SKIP
    """
    if not isinstance(model, ProtectedModel):
        raise ConfigurationError(f"rekey expects a ProtectedModel, got {type(model).__name__}")
    keyed = model.keyed
    new = KeyedInput(key, mean=keyed.mean, std=keyed.std, input_size=keyed.input_size, check_range=keyed.check_range)
    return ProtectedModel(model.unwrap(), new)


def first_conv(model: nn.Module) -> Optional[nn.Conv2d]:
    """The model's first convolution (timm's ``pretrained_cfg['first_conv']``
    when it names one, else the first ``nn.Conv2d``)."""
    base = model.unwrap() if hasattr(model, "unwrap") else model
    name = (getattr(base, "pretrained_cfg", None) or {}).get("first_conv")
    if isinstance(name, str):
        try:
            module = base.get_submodule(name)
            if isinstance(module, nn.Conv2d):
                return module
        except AttributeError:
            pass
    return next((m for m in base.modules() if isinstance(m, nn.Conv2d)), None)


def augment_images(images: torch.Tensor, *, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random translation (up to 1/8 of the side) and scale (0.9-1.1) of a
    batch of [0, 1] images, one affine warp per image; values stay in [0, 1].
    No flips: they would change a digit's meaning."""
    n = images.shape[0]
    rand = torch.rand(n, 3, generator=generator).to(images.device)
    scale = 0.9 + 0.2 * rand[:, 0]
    shift = (rand[:, 1:] - 0.5) * 0.5  # +-0.25 in [-1, 1] coordinates = +-1/8 of the side
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = 1 / scale
    theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def mix_images(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> tuple:
    """Mixup / CutMix of a batch of [0, 1] images with a shuffled copy of
    itself. With both alphas on, one of the two is chosen at random
    (probability 1/2).

    Returns:
        ``(mixed, partner_labels, lam)``: the mixed images, the labels of
        the images mixed in, and the weight of the original ones (for
        CutMix, the fraction of each image that is still its own). The
        training target is ``lam * one_hot(labels) + (1 - lam) *
        one_hot(partner_labels)`` (:func:`mixed_targets`).

    Example:
        >>> images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        >>> mixed, partners, lam = mix_images(images, labels, mixup_alpha=0.4)
        >>> mixed.shape == images.shape, 0.0 <= lam <= 1.0
        (True, True)
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ConfigurationError("mix_images needs mixup_alpha or cutmix_alpha above 0")
    draws = torch.rand(4, generator=generator)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(draws[0] < 0.5))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    order = torch.randperm(images.shape[0], generator=generator).to(images.device)
    if use_cutmix:
        height, width = images.shape[-2:]
        cut_h, cut_w = int(round(height * math.sqrt(1 - lam))), int(round(width * math.sqrt(1 - lam)))
        cy, cx = int(draws[1] * height), int(draws[2] * width)
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
        mixed = images.clone()
        mixed[..., top:bottom, left:right] = images[order][..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)  # the box as clipped
    else:
        mixed = images * lam + images[order] * (1.0 - lam)
    return mixed, labels[order], lam


def mixed_targets(labels: torch.Tensor, partner_labels: torch.Tensor, lam: float, num_classes: int) -> torch.Tensor:
    """The soft labels of a batch from :func:`mix_images`, ``(B, num_classes)``."""
    return F.one_hot(labels, num_classes).float() * lam + F.one_hot(partner_labels, num_classes).float() * (1.0 - lam)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _depthwise_context(device: torch.device, config: TrainConfig):
    """The forward of a CPU training step records depthwise convolutions on
    small maps for the fast weight gradient (``TrainConfig.small_map_depthwise``)."""
    if config.small_map_depthwise and device.type == "cpu":
        return small_map_depthwise()
    return contextlib.nullcontext()


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    stem = first_conv(model)
    stem_ids = {id(p) for p in stem.parameters()} if stem is not None else set()
    decay, no_decay, stem_params = [], [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if id(param) in stem_ids:
            stem_params.append(param)
        elif param.ndim <= 1:
            no_decay.append(param)  # biases and norm scales
        else:
            decay.append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay, "lr": config.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": config.lr},
    ]
    if stem_params:
        groups.append({"params": stem_params, "weight_decay": config.weight_decay, "lr": config.lr * config.stem_lr_scale})
    return torch.optim.AdamW([g for g in groups if g["params"]])


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[g["lr"] for g in optimizer.param_groups],
            total_steps=total,
            pct_start=0.15,
            anneal_strategy="cos",
        )
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)


def _reinit_stem(model: nn.Module, generator: torch.Generator) -> None:
    stem = first_conv(model)
    if stem is None:
        raise ConfigurationError("reinit_stem: the model has no nn.Conv2d")
    with torch.no_grad():
        fan_in = stem.weight[0].numel()
        stem.weight.copy_(torch.randn(stem.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
        if stem.bias is not None:
            stem.bias.zero_()


class _WeightAverage:
    """Exponential moving average of a model's floating-point state (weights
    and batch-norm running statistics), updated in place after each step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0
        live = model.state_dict(keep_vars=True)
        self.names = [name for name, t in live.items() if t.is_floating_point()]
        self.live = [live[name] for name in self.names]
        self.shadow = [t.detach().clone() for t in self.live]

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        weight = 1.0 - min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for average, current in zip(self.shadow, self.live):
            average.lerp_(current.detach(), weight)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "values": dict(zip(self.names, self.shadow))}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        values = state["values"]
        if sorted(values) != sorted(self.names):
            raise CheckpointError("the checkpoint's weight average is for another model; resume without ema_decay "
                                  "or start a new run")
        for name, average in zip(self.names, self.shadow):
            average.copy_(values[name])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the live values and the average (twice restores them)."""
        for average, current in zip(self.shadow, self.live):
            held = current.detach().clone()
            current.detach().copy_(average)
            average.copy_(held)


def _save_checkpoint(model: nn.Module, directory: Path, state: dict) -> None:
    """The weights and the training state of one epoch. The state is written
    first and renamed into place last, after the weights: a failed write (a
    full disk) leaves the previous epoch's files resumable. The state holds
    its own copy of the weights, so a run stopped between the renames (a
    Ctrl-C there, a kill) leaves a state that resumes whole, from its epoch,
    beside the next epoch's published weights (:func:`_load_checkpoint`)."""
    directory.mkdir(parents=True, exist_ok=True)
    base = _uncompiled(model.unwrap() if hasattr(model, "unwrap") else model)
    # which weights this state continues, and those weights themselves
    state = {**state, "weights_digest": weights_digest(base), "weights": base.state_dict()}
    if isinstance(model, ProtectedModel):  # whose run this is (public), for a state copied into another run's folder
        state["fingerprint"] = model.key.fingerprint
    try:
        with replacing(directory / TRAINING_STATE_FILE, durable=True) as tmp:
            torch.save(state, tmp)
            if isinstance(model, ProtectedModel):
                _save_protected(model, directory, {"epoch": state["epoch"]}, False, state["weights_digest"])
            else:
                header = {"format": "pt", "kp_weights_digest": state["weights_digest"]}
                _write_all(directory, [], weights=(base, header))
    except KPError:
        raise
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError("... unexpected pos ...")
        raise CheckpointWriteError(
            f"cannot write the training state into {directory} ({first_line(exc)[:200]}); the previous epoch's "
            "checkpoint there, if any, is unchanged: free some space and resume"
        ) from None
    # No scan of the folder after this: _save_protected scanned it (this
    # state's temporary included) before writing, and its own files before
    # renaming them in.


def _check_training_state(state: Any, state_path: Path, groups: Optional[list] = None) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has what :func:`fit`
    resumes from, with optimizer groups of the sizes in ``groups`` (those of
    the optimizer this run builds): checked before any weights are loaded."""
    problem = None
    if not isinstance(state, dict):
        problem = f"it holds a {type(state).__name__}, not a training state"
    else:
        missing = [name for name in ("epoch", "optimizer", "generator", "torch_rng") if name not in state]
        optimizer = state.get("optimizer")
        if missing:
            problem = f"it has no {', '.join(repr(name) for name in missing)}"
        elif isinstance(state["epoch"], bool) or not isinstance(state["epoch"], int) or state["epoch"] < 0:
            problem = f"its epoch is {state['epoch']!r}"
        elif not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)
                  and isinstance(optimizer.get("state"), dict)):
            problem = "its optimizer state is not one"
        elif not all(isinstance(state[name], torch.Tensor) and state[name].dtype == torch.uint8
                     for name in ("generator", "torch_rng")):
            problem = "its random generator states are not byte tensors"
        elif "weights" in state and not (isinstance(state["weights"], dict) and all(
                isinstance(name, str) and isinstance(value, torch.Tensor) for name, value in state["weights"].items())):
            problem = "its weights are not a state dict"
        elif state.get("weight_average") is not None and not (
                isinstance(state["weight_average"], dict) and isinstance(state["weight_average"].get("values"), dict)
                and isinstance(state["weight_average"].get("updates"), int)):
            problem = "its weight average is not one"
        elif groups is not None:
            saved = [len(group.get("params", ())) if isinstance(group, dict) else None
                     for group in optimizer["param_groups"]]
            if saved != groups:
                problem = (f"its optimizer has parameter groups of {saved} parameters and this run's has {groups} "
                           "(another model, or other trainable parameters)")
    if problem is not None:
        raise CheckpointError(
            f"cannot resume: {state_path} is not a training state this run can continue ({problem}); "
            "resume with the model it was saved for, or start a new run"
        )


def _load_checkpoint(model: nn.Module, directory: Path, groups: Optional[list] = None,
                     check: Optional[Callable[[dict, Path], None]] = None) -> dict:
    """Read the training state (checked against ``groups``, the sizes of the
    optimizer's parameter groups, and by ``check``), then load the weights
    into ``model``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    state_path = directory / TRAINING_STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"cannot resume: {state_path} is missing")
    config = ProtectionConfig.load(directory) if isinstance(model, ProtectedModel) else None
    if config is not None:
        config.check_key(model.key, remedy=(
            f"{directory} was saved under that key: resume with the key file it was trained with, or start a "
            "new run elsewhere"))
    base = model.unwrap() if hasattr(model, "unwrap") else model
    # The state first: a corrupt one must not leave the model half-loaded.
    try:  # tensors, numbers, strings and containers only: loading runs no code from the file
        # On the CPU: the generators' states must be CPU byte tensors, and the
        # optimizer and the average move their tensors to the parameters' device.
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"cannot resume: {state_path} is corrupt or not a kp-plugin training state "
            f"({torch_load_failure(exc)}); start a new run"
        ) from None
    _check_training_state(state, state_path, groups)
    if isinstance(model, ProtectedModel) and state.get("fingerprint") not in (None, model.key.fingerprint):
        # protection.json was this key's, the state (with its weights) another's.
        raise KeyMismatchError(
            f"cannot resume: {state_path} is from a run with another key (fingerprint {state['fingerprint']}, "
            f"the key given has {model.key.fingerprint}), beside {directory / PROTECTION_FILE} of this key: the "
            "folder mixes two runs' files. Resume each run from its own folder with its own key"
        )
    if check is not None:
        check(state, state_path)
    if "weights" in state:  # the state's own weights: whole even when the run stopped between the renames
        try:
            base.load_state_dict(state["weights"], strict=True)
        except (RuntimeError, TypeError) as exc:
            raise CheckpointError(f"cannot resume from {state_path}: {load_error_summary(exc)}") from None
        return state
    # A state written before it held the weights: those beside it must be its own.
    if config is not None:
        read_weights_header(directory / WEIGHTS_FILE, config)  # whole, and from the same save as protection.json
        written = config.weights_digest
    else:
        written = _plain_weights_digest(directory / WEIGHTS_FILE)
    if state.get("weights_digest") and written and state["weights_digest"] != written:
        raise CheckpointError(
            f"cannot resume: the weights in {directory} are from a later save than {state_path} (epoch "
            f"{state['epoch']}): the run stopped while writing that checkpoint, so the optimizer, schedule and "
            "random state for those weights are lost; start a new run (the weights load with load_protected)"
        )
    try:
        load_model(base, str(directory / WEIGHTS_FILE), strict=True)  # copied onto the model's device
    except SafetensorError as exc:
        raise CheckpointError(
            f"cannot resume: {directory / WEIGHTS_FILE} is corrupt or not a safetensors file ({first_line(exc)}); "
            "start a new run"
        ) from None
    except (OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot resume from {directory}: {load_error_summary(exc)}") from None
    return state


def _plain_weights_digest(path: Path) -> Optional[str]:
    """The weights digest a plain (unprotected) model's checkpoint records in
    its header, ``None`` when it records none or cannot be read (the load
    that follows names the problem)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return (handle.metadata() or {}).get("kp_weights_digest")
    except (SafetensorError, OSError):
        return None


def _steps_per_epoch(examples: int, batch_size: int) -> int:
    """Optimizer steps per epoch: the batches, less a last one of a single
    image, which :func:`fit` skips."""
    full, rest = divmod(examples, batch_size)
    return max(1, full + (1 if rest > 1 else 0))


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 256,
    device: Union[None, str, torch.device] = None,
    amp: bool = True,
) -> float:
    """Top-1 accuracy (0..1) of ``model`` on ``dataset`` (images in [0, 1]).

    Args:
        device: where to run; the model is moved there (default: where its
            parameters are).
        amp: bf16 autocast on CUDA (ignored on the CPU), as in training.

    Example:
        >>> evaluate_accuracy(model, load_dataset("digits", split="test"))   # doctest: +SKIP
        0.98
    """
    if device is not None:
        device = usable_device(device)
        model.to(device)  # as fit does; images alone on the device met CPU weights
    else:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for images, labels in iterate_batches(dataset, batch_size=batch_size):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with _autocast(device, amp):
                logits = logits_of(model(images))
            correct += int((logits.argmax(dim=-1) == labels).sum())
            total += labels.numel()
    finally:
        model.train(was_training)
    return correct / max(1, total)


def _check_label_range(train_set: Any, labels: torch.Tensor, outputs: int) -> None:
    """:class:`ConfigurationError` when the data has more classes (or a
    label beyond) the model's ``outputs``, or a negative label: cross-entropy
    would fail with an index error (a device assert on CUDA), or ignore it
    (-100), or, for a model with more outputs, nothing would say so. Checked
    on every batch (the CPU labels, before they move)."""
    classes = getattr(train_set, "num_classes", None)
    if not isinstance(classes, int):
        classes = 0
    if labels.numel():
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0:
            raise ConfigurationError(f"the training data has label {low}; labels are class indices 0..N-1")
        classes = max(classes, high + 1)
    if classes > outputs:
        raise ConfigurationError(
            f"the training data has {classes} classes but the model has {outputs} outputs (labels must be "
            f"0..{outputs - 1}); create the model with num_classes={classes}"
        )


#: Settings that may change when a run is resumed: the length of the run and
#: how it runs on this machine (the same computation).
RESUMABLE_CHANGES = ("epochs", "amp", "channels_last", "small_map_depthwise")


def _data_identity(train_set: Any) -> dict:
    """What a resumed run checks the training set against: its size and,
    when it has them, its class names."""
    identity = {"examples": len(train_set)}
    classes = getattr(train_set, "classes", None)
    if isinstance(classes, (list, tuple)):
        identity["classes"] = [str(c) for c in classes]
    return identity


def _check_resumed_settings(state: dict, config: "TrainConfig", train_set: Any, state_path: Path) -> None:
    """:class:`ConfigurationError` when a run is resumed with other settings
    than it was saved with (only :data:`RESUMABLE_CHANGES` may differ), or on
    other data: the optimizer state restores the saved learning rate, and the
    record would describe the whole run with the new settings."""
    saved, now = state.get("config"), config.to_dict()
    problems = []
    if isinstance(saved, dict):
        pairs = [(name, value, saved[name]) for name, value in now.items() if name in saved and name != "objective"]
        if isinstance(saved.get("objective"), dict):  # field by field: a newer release may add fields
            pairs += [(f"objective.{name}", value, saved["objective"][name])
                      for name, value in now["objective"].items() if name in saved["objective"]]
        problems += [f"{name} {value!r} (saved: {before!r})" for name, value, before in pairs
                     if name not in RESUMABLE_CHANGES and _differs(value, before)]
    trained = state.get("epoch")
    if isinstance(trained, int) and trained > config.epochs:
        problems.append(f"epochs {config.epochs}, fewer than the {trained} it has trained (resume with epochs of "
                        f"{trained} or more)")
    data = state.get("data")
    if isinstance(data, dict):
        identity = _data_identity(train_set)
        for name in ("examples", "classes"):
            if name in data and name in identity and data[name] != identity[name]:
                problems.append(f"training data with {name} {_short(identity[name])} (saved: {_short(data[name])})")
    if problems:
        raise ConfigurationError(
            f"cannot resume the run in {state_path.parent} with other settings: {'; '.join(problems)}. Resume "
            f"with the settings and data it was started with (only {', '.join(RESUMABLE_CHANGES)} may change), "
            "or start a new run in another folder"
        )


def _differs(value: Any, saved: Any) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(saved, (list, tuple)):
        return list(value) != list(saved)
    return value != saved


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def fit(
    model: nn.Module,
    train_set: torch.utils.data.Dataset,
    *,
    config: Optional[TrainConfig] = None,
    eval_set: Optional[torch.utils.data.Dataset] = None,
    checkpoint_dir: Union[None, str, os.PathLike] = None,
    resume: bool = False,
    device: Union[None, str, torch.device] = None,
    progress: bool = True,
    teacher: Optional[nn.Module] = None,
    after_step: Optional[Callable[[], None]] = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``train_set`` (images in [0, 1]).

    Args:
        model: a :class:`ProtectedModel` (the key is applied in its forward,
            after augmentation), or :func:`plain_model` for the baseline.
        train_set: ``(image, label)`` items, images float CHW in [0, 1].
        config: the recipe (default :class:`TrainConfig`).
        eval_set: if given, accuracy on it is recorded after every epoch.
        checkpoint_dir: write a checkpoint after every epoch: the protected
            weights (``save_protected``, never the key) and
            ``training_state.pt`` (optimizer, scheduler, epoch, history).
        resume: continue from the checkpoint in ``checkpoint_dir``.
        device: default CUDA when available, else CPU.
        progress: show a tqdm bar (stderr) with loss and accuracy.
        teacher: for an objective with ``distill_weight``: a model that takes
            the same [0, 1] images plain (e.g. the unprotected baseline from
            :func:`plain_model`); it runs in eval mode without gradients.
        after_step: called after every optimizer step, in the training
            thread (``kp protect`` gives itself the baseline's CPU threads
            there once the baseline beside it has finished).

    Returns:
        :class:`TrainResult` with the per-epoch history.

    Raises:
        CheckpointError: ``resume`` without a usable checkpoint.
        KeyMismatchError: resuming a checkpoint made with another key.

    Example:
        >>> result = fit(model, load_dataset("digits"), config=TrainConfig(epochs=4))   # doctest: +SKIP
        >>> result.final["accuracy"]                                                    # doctest: +SKIP
    """
    config = config or TrainConfig()
    if not isinstance(model, ProtectedModel) and protected_model_of(model) is not None:
        # The wrong-key term, protected checkpoints and the key check on
        # resume all need the ProtectedModel itself; through a wrapper they
        # were silently dropped (plain cross-entropy, a plain checkpoint).
        raise ConfigurationError(
            f"fit takes the ProtectedModel itself, not one wrapped in {type(model).__name__} "
            "(torch.compile / DataParallel / DDP): pass the ProtectedModel; for several GPUs or processes "
            "train with kp_plugin.hf.KeyedTrainer under torchrun (docs/transformers.md)"
        )
    objective = config.resolved_objective
    if (objective.suppresses or objective.distill_weight) and not isinstance(model, ProtectedModel):
        # The unprotected baseline trains with cross-entropy only (it is the
        # teacher, not a student, and has no key to suppress).
        objective = ProtectionObjective(label_smoothing=objective.label_smoothing)
    device = usable_device(device)
    if len(train_set) == 0:
        raise ConfigurationError("the training set is empty")
    if config.batch_size == 1 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        # Every batch would be the one image batch norm cannot train on.
        raise ConfigurationError(
            "batch_size 1 cannot train this model: its batch norm layers need at least 2 images per batch; use a "
            "batch size of 2 or more"
        )
    if resume and checkpoint_dir is None:
        raise ConfigurationError("resume=True needs checkpoint_dir")
    objective.check_teacher(teacher)
    if teacher is not None and not objective.distill_weight:
        teacher = None  # nothing reads it

    generator = torch.Generator().manual_seed(config.seed)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir is not None else None
    state = None
    if resume and checkpoint is not None:
        # Before the model moves: a checkpoint that cannot be resumed leaves
        # the model where and as it was (device and memory layout).
        groups = [len(group["params"]) for group in _optimizer(model, config).param_groups]
        state = _load_checkpoint(model, checkpoint, groups, lambda loaded, path: _check_resumed_settings(
            loaded, config, train_set, path))
    if config.reinit_stem and not resume and isinstance(model, ProtectedModel):
        _reinit_stem(model, generator)  # a protection measure; the baseline keeps its stem
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, config)
    steps_per_epoch = _steps_per_epoch(len(train_set), config.batch_size)
    scheduler = _scheduler(optimizer, config, steps_per_epoch)
    result = TrainResult()
    start_epoch = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"])
        # Rebuild the schedule for this config and move it to where training
        # stopped (the saved one may be for another number of epochs).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(min(start_epoch, config.epochs) * steps_per_epoch):
                scheduler.step()
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)  # dropout and drop-path on the GPU
        result.history = list(state.get("history", []))
    else:
        torch.manual_seed(config.seed)
    average = None
    if config.ema_decay is not None:
        average = _WeightAverage(model, config.ema_decay)  # after resume: it starts from the loaded weights
        if state is not None and state.get("weight_average") is not None:
            average.load_state_dict(state["weight_average"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(config.epochs - start_epoch) * steps_per_epoch, desc="fine-tune", unit="step", leave=False)
    started = time.perf_counter()
    outputs = None  # the model's number of outputs, from the first batch

    def save_checkpoint(epoch: int) -> None:
        _save_checkpoint(
            model,
            checkpoint,
            {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": result.history,
                "config": config.to_dict(),
                "data": _data_identity(train_set),
                "weight_average": None if average is None else average.state_dict(),
            },
        )

    try:
        for epoch in range(start_epoch, config.epochs):
            model.train()
            epoch_start = time.perf_counter()
            sums: dict = {}
            correct = seen = 0
            for images, labels in iterate_batches(train_set, batch_size=config.batch_size, shuffle=True, generator=generator):
                if labels.numel() == 1 and config.batch_size > 1 and len(train_set) > 1:
                    continue  # a last batch of one image: batch norm cannot train on it (timm drops it too)
                if outputs is not None:
                    _check_label_range(train_set, labels, outputs)
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                if images.dtype == torch.uint8:  # augmentation and mixing work on [0, 1] floats
                    images = images.float().div_(255)
                if config.augment:
                    images = augment_images(images, generator=generator)
                mixing = None
                if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
                    images, partners, lam = mix_images(
                        images, labels, mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
                        generator=generator,
                    )
                    mixing = (partners, lam)
                with _autocast(device, config.amp), _depthwise_context(device, config):
                    teacher_logits = None
                    if teacher is not None:
                        with torch.no_grad():
                            teacher_logits = logits_of(teacher(images))
                    logits = logits_of(model(images))
                    if outputs is None:  # the first batch: a label past the outputs fails deep in the loss
                        outputs = logits.shape[-1]
                        _check_label_range(train_set, labels.cpu(), outputs)
                    targets = labels
                    if mixing is not None:
                        targets = mixed_targets(labels, mixing[0], mixing[1], logits.shape[-1])
                    loss, parts = objective(model, images, targets, logits, teacher_logits)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if average is not None:
                    average.update()
                if after_step is not None:
                    after_step()
                n = labels.numel()
                seen += n
                correct += int((logits.detach().argmax(dim=-1) == labels).sum())
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * n
                for name, value in parts.items():
                    sums[name] = sums.get(name, 0.0) + value * n
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{sums['loss'] / seen:.3f}", acc=f"{correct / seen:.3f}")
            record = {"epoch": epoch + 1, "accuracy": correct / seen, "lr": optimizer.param_groups[0]["lr"]}
            record.update({name: total / seen for name, total in sums.items()})
            if eval_set is not None:
                if average is not None:
                    average.swap()
                try:
                    record["eval_accuracy"] = evaluate_accuracy(model, eval_set, device=device, amp=config.amp)
                except BaseException:
                    # An unreadable evaluation image (or a stop) must not lose
                    # the epoch just trained: checkpoint it without the figure.
                    if average is not None:
                        average.swap()  # the training weights are what is checkpointed
                    if checkpoint is not None:
                        record["seconds"] = time.perf_counter() - epoch_start
                        result.history.append(record)
                        save_checkpoint(epoch + 1)
                    raise
                if average is not None:
                    average.swap()
            record["seconds"] = time.perf_counter() - epoch_start
            result.history.append(record)
            if checkpoint is not None:
                save_checkpoint(epoch + 1)
    finally:
        if bar is not None:
            bar.close()
        if average is not None:
            average.swap()  # hand back the average
        if config.channels_last:
            # Hand the models back in the usual layout: a state_dict of
            # contiguous tensors, as safetensors' save_file and .view() expect.
            model.to(memory_format=torch.contiguous_format)
            if teacher is not None:
                teacher.to(memory_format=torch.contiguous_format)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
