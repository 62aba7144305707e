"""The attacker's guess of a key, and the frozen protected model run with it.

An attack does not hold a :class:`~kp_plugin.keys.SecretKey` (256 bits it
cannot invert); it holds what the key *derives*: a pixel permutation, a
negative/positive mask, per-position 8-bit value maps and a block
permutation. :class:`CandidateKey` is that tuple of tensors, so an attack can
edit it (swap two entries, flip one bit, take a fraction of the true key) and
run the protected model's base weights with it through
:class:`CandidateModel`.

The transform works in block-vector space: images ``(B, C, H, W)`` become
``(B, N, L)`` (N blocks, ``L = M*M*C`` in (row, column, channel) order, as
DESIGN.md flattens a block). ``CandidateKey.from_secret_key(key)`` reproduces
:func:`kp_plugin.transforms.apply_transform` exactly (a test pins it).

A candidate built from the true key holds the secret permutation: it lives
in memory only; attack results report fractions recovered, never the
permutation.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import AttackError, KeyPicklingError
from ..keys import SecretKey
from ..module import ProtectedModel
from ..objectives import logits_of
from ..transforms import blocks_to_image, check_image_size, compile_plan, image_to_blocks

__all__ = [
    "AttackError",
    "leaves_model_as_found",
    "CandidateKey",
    "CandidateModel",
    "image_to_blocks",
    "blocks_to_image",
    "seeded_key",
    "check_count",
]


def check_count(name: str, value, why: str) -> None:
    """:class:`AttackError` unless ``value`` is an integer >= 1 (``why``: what
    the count is for, said in the message)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AttackError(f"{name} must be a positive integer ({why}), got {value!r}")


def seeded_key(like: SecretKey, seed: int, index: int) -> SecretKey:
    """A random-looking key with ``like``'s settings, reproducible from
    ``(seed, index)``: what random-key attacks draw (its material is
    SHA-256 of the pair, so it is as good as a fresh random key for
    measuring, and a run can be repeated)."""
    material = hashlib.sha256(b"kp-plugin/attack-key/%d/%d" % (seed, index)).digest()
    return SecretKey(material, block_size=like.block_size, scheme=like.scheme, channels=like.channels)


def leaves_model_as_found(attack):
    """Decorator for an attack whose first argument is the caller's model:
    its modules' train / eval modes and its device are given back when the
    attack returns or raises (the attacks run the shared base weights in
    eval mode on their device; the caller's model is not theirs to change)."""

    @functools.wraps(attack)
    def run(model, *args, **kwargs):
        modes = [(module, module.training) for module in model.modules()] if isinstance(model, nn.Module) else []
        first = next(model.parameters(), None) if isinstance(model, nn.Module) else None
        device = first.device if first is not None else None
        try:
            return attack(model, *args, **kwargs)
        finally:
            for module, training in modes:
                module.training = training
            if device is not None and next(model.parameters()).device != device:
                model.to(device)

    return run


@dataclass
class CandidateKey:
    """A guess of everything a key derives, as editable tensors.

    Attributes:
        block_size: ``M``.
        channels: ``C``.
        permutation: ``(L,)`` int64; shuffled block ``y[p] = x[permutation[p]]``.
        flip: ``(L,)`` bool negative/positive mask, or ``None`` (scheme
            without ``np``, or ``np`` folded into ``value_table``).
        value_table: ``(L, 256)`` int64 8-bit value maps (``np``, ``shift``,
            ``ffx`` folded), or ``None`` when the scheme has no 8-bit step.
        block_permutation: ``(N,)`` int64 (block scrambling: output block
            ``k`` is input block ``block_permutation[k]``), or ``None``.
    """

    block_size: int
    channels: int
    permutation: torch.Tensor
    flip: Optional[torch.Tensor] = None
    value_table: Optional[torch.Tensor] = None
    block_permutation: Optional[torch.Tensor] = None

    @property
    def length(self) -> int:
        return self.block_size * self.block_size * self.channels

    # A candidate may be the key's own (from_secret_key) or as good: its
    # tensors are never printed or pickled.
    def __repr__(self) -> str:
        parts = [f"block_size={self.block_size}", f"channels={self.channels}", f"length={self.length}"]
        parts += [f"{name}=<{tuple(getattr(self, name).shape)}>"
                  for name in ("flip", "value_table", "block_permutation") if getattr(self, name) is not None]
        return f"CandidateKey({', '.join(parts)})"

    def __reduce__(self):
        raise KeyPicklingError(
            "a CandidateKey holds a key's permutation (the key's own for from_secret_key) and cannot be pickled; "
            "keep the attack's report, or rebuild the candidate from the key"
        )

    def __deepcopy__(self, memo) -> "CandidateKey":
        return replace(self, **{f.name: getattr(self, f.name).clone() for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    # ------------------------------------------------------------ build
    @classmethod
    def from_secret_key(cls, key: SecretKey, *, image_size: Optional[Sequence[int]] = None) -> "CandidateKey":
        """The candidate equal to ``key`` (for partial-key curves and for
        scoring what an attack recovered). ``image_size`` ``(H, W)`` is
        needed only when the scheme scrambles blocks."""
        m, c = key.block_size, key.channels
        length = key.block_length
        identity = torch.arange(length)
        perm = torch.tensor(key.pixel_permutation(length)) if "shuffle" in key.scheme else identity
        flip = table = blocks = None
        if "shift" in key.scheme or "ffx" in key.scheme:
            # One block's plan carries the (L, 256) maps with np folded in.
            table = compile_plan(key, c, m, m).value_table.long()
        elif "np" in key.scheme:
            flip = torch.tensor(key.np_mask(length), dtype=torch.bool)
        if "scramble" in key.scheme:
            if image_size is None:
                raise AttackError("this scheme scrambles blocks: pass image_size=(H, W) to build its candidate")
            h, w = image_size
            check_image_size(h, w, m)
            blocks = torch.tensor(key.block_permutation((h // m) * (w // m)))
        return cls(m, c, perm, flip, table, blocks)

    def with_permutation(self, permutation: torch.Tensor, flip: Optional[torch.Tensor] = None) -> "CandidateKey":
        """The same candidate with another permutation (and flip mask)."""
        return replace(self, permutation=permutation, flip=self.flip if flip is None else flip)

    # ------------------------------------------------------------ apply
    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """The keyed images (float in [0, 1]) this candidate gives for
        ``images`` ``(B, C, H, W)`` in [0, 1]."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        b, c, h, w = images.shape
        v = image_to_blocks(images, self.block_size)
        v = v[:, :, self.permutation.to(v.device)]
        if self.value_table is not None:
            q = v.mul(255).round_().clamp_(0, 255).long()
            offsets = torch.arange(self.length, device=v.device) * 256
            v = self.value_table.to(v.device).reshape(-1)[q + offsets].to(images.dtype) / 255
        elif self.flip is not None:
            v = torch.where(self.flip.to(v.device), 1 - v, v)
        if self.block_permutation is not None:
            v = v[:, self.block_permutation.to(v.device)]
        return blocks_to_image(v, self.block_size, c, h, w)

    # ------------------------------------------------------------ score
    def recovered_fraction(self, truth: "CandidateKey") -> float:
        """Fraction of block positions whose permutation entry is right."""
        return float((self.permutation.cpu() == truth.permutation.cpu()).float().mean())

    def flip_agreement(self, truth: "CandidateKey") -> Optional[float]:
        """Fraction of negative/positive bits that are right (``None`` when
        either side has no flip mask)."""
        if self.flip is None or truth.flip is None:
            return None
        return float((self.flip.cpu() == truth.flip.cpu()).float().mean())


class CandidateModel(nn.Module):
    """The protected model's base weights behind a *candidate* key: images
    in [0, 1] -> candidate transform -> normalize -> base model.

    Args:
        model: the base model (``ProtectedModel.model``); frozen by attacks
            that search keys.
        mean, std: the normalization the protected model uses.

    Example:
        >>> attacked = CandidateModel.from_protected(protected)          # doctest: +SKIP
        >>> logits = attacked(images01, CandidateKey.from_secret_key(guess))  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, *, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def from_protected(cls, protected: ProtectedModel) -> "CandidateModel":
        """The base weights and normalization of ``protected``."""
        if not isinstance(protected, ProtectedModel):
            raise AttackError(
                f"expected a kp_plugin.ProtectedModel, got {type(protected).__name__}; "
                "wrap it with wrap_model(model, key) or load it with load_protected"
            )
        return cls(protected.model, mean=protected.keyed.mean, std=protected.keyed.std)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean.to(images.device)) / self.std.to(images.device)

    def forward(self, images: torch.Tensor, candidate: Optional[CandidateKey] = None) -> torch.Tensor:
        """Logits for ``images`` in [0, 1] under ``candidate`` (``None``:
        plain images, no transform)."""
        keyed = images if candidate is None else candidate.apply(images)
        return logits_of(self.model(self.normalize(keyed)))
