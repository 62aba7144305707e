"""Weight matching: recover the key by comparing the protected model's first
layer with the public base it was fine-tuned from.

The first layer (a conv stem, or a ViT's conv patch embedding) is linear in
its input. For every block position ``p`` the attack records the layer's
response to a unit impulse at ``p`` (for a patch embedding with
patch = block size that is just column ``p`` of the weight matrix), for the
protected model and for the public base. If the owner's training left the
layer a permuted copy of the public one, protected column ``p`` equals base
column ``P[p]`` up to sign (negative/positive flip) and scale
(normalization), so Hungarian matching on absolute cosine similarity
recovers ``P``, and the sign of the match recovers the flip bits.

When does it work? A patch embedding can hold a permuted copy of the
public weights (see :mod:`kp_plugin.adapt`: it is the exact solution), so
a protected ViT whose patch size equals the block size is exposed when it
stays near the public weights. A small-kernel conv stem (3x3, stride 2)
cannot represent a permutation inside a 16x16 block at all: it is applied
identically at every position. There the matching has nothing to find
and the result should sit at chance (about ``1/L`` of positions), which
this attack measures rather than assumes. For block scrambling the
position embeddings are matched the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..adapt import first_conv, position_embedding
from ..module import ProtectedModel
from ._candidate import AttackError, CandidateKey, CandidateModel, leaves_model_as_found, seeded_key
from ._data import as_tensors, candidate_accuracy, resolve_device

__all__ = ["WeightMatchingResult", "weight_matching_attack", "impulse_responses", "match_columns"]


@dataclass
class WeightMatchingResult:
    """What weight matching recovered (fractions and accuracies 0..1).

    Attributes:
        layer: name of the matched first layer.
        layer_kind: ``"patch embedding"`` (kernel = stride = block size) or
            ``"conv kxk stride s"``.
        recovered_fraction: permutation entries recovered.
        chance_fraction: what a random guess recovers on average (``1/L``).
        flip_agreement: negative/positive bits right (``None`` without np).
        mean_similarity: mean |cosine| of the matched column pairs (1.0:
            the layer is an exact permuted copy of the base).
        block_recovered_fraction: block-scramble entries recovered from the
            position embeddings (``None`` without scrambling, or where a
            position is not one block: a patch size other than the block size).
        accuracy: accuracy with the recovered key (``None`` without data).
        key_accuracy: accuracy with the true key (``None`` without data).
    """

    layer: str
    layer_kind: str
    recovered_fraction: float
    chance_fraction: float
    flip_agreement: Optional[float]
    mean_similarity: float
    block_recovered_fraction: Optional[float]
    accuracy: Optional[float]
    key_accuracy: Optional[float]

    def summary(self) -> dict:
        return asdict(self)


@torch.no_grad()
def impulse_responses(conv: nn.Conv2d, block_size: int) -> torch.Tensor:
    """``(L, F)``: row ``p`` is the layer's response (bias removed, flattened)
    to a unit impulse at block position ``p`` of an otherwise zero block
    (normalized input space). A kernel larger than the block (a ViT patch of
    16 under a key of block size 4) sees the block as the top-left one of
    a zero canvas it fits on."""
    c, m = conv.in_channels, block_size
    height, width = (m * math.ceil(max(k, m) / m) for k in conv.kernel_size)
    length = m * m * c
    p = torch.arange(length)
    impulses = torch.zeros(length, c, height, width, dtype=conv.weight.dtype, device=conv.weight.device)
    impulses[p, p % c, p // (m * c), (p // c) % m] = 1  # (row, column, channel) order
    zero = torch.zeros(1, c, height, width, dtype=conv.weight.dtype, device=conv.weight.device)
    return (conv(impulses) - conv(zero)).reshape(length, -1).double().cpu()


def match_columns(protected: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hungarian matching of rows of ``protected`` to rows of ``base`` on
    absolute cosine similarity.

    Returns:
        ``(assignment, negative, similarity)``: protected row ``p`` matches
        base row ``assignment[p]``; ``negative[p]`` when the match is
        anti-correlated; ``similarity[p]`` its |cosine|.
    """
    from scipy.optimize import linear_sum_assignment

    a = protected / protected.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b = base / base.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = a @ b.T
    rows, cols = linear_sum_assignment(cosine.abs().numpy(), maximize=True)
    assignment = torch.empty(protected.shape[0], dtype=torch.long)
    assignment[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    picked = cosine[torch.arange(protected.shape[0]), assignment]
    return assignment, picked < 0, picked.abs()


@leaves_model_as_found
def weight_matching_attack(
    model: ProtectedModel,
    public_base: nn.Module,
    dataset=None,
    *,
    seed: int = 0,
    batch_size: int = 256,
    device=None,
) -> WeightMatchingResult:
    """Recover the key of ``model`` from its first layer and the public
    ``public_base`` it was fine-tuned from.

    Args:
        model: the protected model (its key only scores the result).
        public_base: the public pre-trained model of the same architecture.
        dataset: labelled images in [0, 1] to measure the accuracy the
            recovered key gives (optional).
        seed: value maps the attack cannot match (shift/ffx) are taken from
            a random key drawn with this seed.

    Example:
        >>> res = weight_matching_attack(protected, timm.create_model(name, pretrained=True), test_set)  # doctest: +SKIP
        >>> res.recovered_fraction                                                                       # doctest: +SKIP
    """
    if not isinstance(model, ProtectedModel):
        raise AttackError(f"expected a ProtectedModel, got {type(model).__name__}")
    if not isinstance(public_base, nn.Module):
        raise AttackError(f"public_base must be the public pre-trained model (an nn.Module of the protected model's "
                          f"architecture) the attack compares the first layer with, got {type(public_base).__name__}")
    key = model.key
    c, m = key.channels, key.block_size
    name, conv = first_conv(model.model, c)
    _, base_conv = first_conv(public_base, c)
    if conv.weight.shape != base_conv.weight.shape:
        raise AttackError(
            f"the protected first layer {name} has weights {tuple(conv.weight.shape)} but the public base's "
            f"has {tuple(base_conv.weight.shape)}; pass the base the model was fine-tuned from"
        )
    patchify = tuple(conv.kernel_size) == (m, m) and tuple(conv.stride) == (m, m)
    kind = "patch embedding" if patchify else f"conv {conv.kernel_size[0]}x{conv.kernel_size[1]} stride {conv.stride[0]}"

    assignment, negative, similarity = match_columns(impulse_responses(conv, m), impulse_responses(base_conv, m))

    images = None
    if dataset is not None:
        images, labels = as_tensors(dataset)
    size = tuple(images.shape[-2:]) if images is not None else None
    if "scramble" in key.scheme and size is None and patchify:  # one position per block only then
        found = position_embedding(model.model)
        if found is not None:
            side = int(math.isqrt(found[0].shape[1] - found[1]))
            size = (side * m, side * m)
    truth = CandidateKey.from_secret_key(key, image_size=size)
    decoy = CandidateKey.from_secret_key(seeded_key(key, seed, 7_777_777), image_size=size)
    recovered = CandidateKey(
        m,
        c,
        assignment if "shuffle" in key.scheme else truth.permutation,
        negative if truth.flip is not None else None,
        decoy.value_table,
        decoy.block_permutation,
    )

    block_fraction = None
    if truth.block_permutation is not None:
        ours, theirs = position_embedding(model.model), position_embedding(public_base)
        blocks_count = truth.block_permutation.numel()
        # Matched only where each position is one block (patch = block size);
        # a ViT of another patch size has as many positions as patches.
        if ours is not None and theirs is not None and patchify \
                and ours[0].shape[1] - ours[1] == blocks_count == theirs[0].shape[1] - theirs[1]:
            prefix = ours[1]
            blocks, _, _ = match_columns(ours[0][0, prefix:].detach().double().cpu(),
                                         theirs[0][0, prefix:].detach().double().cpu())
            recovered.block_permutation = blocks
            block_fraction = float((blocks == truth.block_permutation).float().mean())

    accuracy = key_accuracy = None
    if images is not None:
        device = resolve_device(device)
        attacked = CandidateModel.from_protected(model).to(device).eval()
        accuracy = candidate_accuracy(attacked, images, labels, recovered, batch_size=batch_size, device=device)
        key_accuracy = candidate_accuracy(attacked, images, labels, truth, batch_size=batch_size, device=device)
    return WeightMatchingResult(
        layer=name,
        layer_kind=kind,
        recovered_fraction=recovered.recovered_fraction(truth),
        chance_fraction=1.0 / key.block_length,
        flip_agreement=recovered.flip_agreement(truth),
        mean_similarity=float(similarity.mean()),
        block_recovered_fraction=block_fraction,
        accuracy=accuracy,
        key_accuracy=key_accuracy,
    )
