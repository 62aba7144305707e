"""Zero-training adaptation of a ViT-style model to a key (Kiya et al.,
arXiv 2207.05366).

When the block size equals the patch size, the patch embedding is a linear
map of one block: ``e = W z + b`` with ``z`` the normalized pixels of the
block. The keyed transform moves pixels inside the block
(``y[p] = x[P[p]]``) and flips some (``y[p] = 1 - x[P[p]]``), so the keyed,
normalized block is an affine function of the plain, normalized one, per
position: ``z'[p] = a[p] z[P[p]] + d[p]``. Permuting and rescaling the
columns of ``W`` (``W'[:, p] = W[:, P[p]] / a[p]``) and moving the constant
into the bias (``b' = b - W' d``) gives *exactly* the same embedding for
keyed images as the plain model gives for plain images. Block scrambling
moves whole patches, which a ViT sees only through its position embeddings:
``pos'[k] = pos[S[k]]`` undoes it.

Where normalization sits: the model sees ``normalize(T_key(x))`` with a
per-channel mean/std (what :class:`~kp_plugin.module.KeyedInput` does). The
formulas above fold any per-channel mean/std in, so the result is exact to
float rounding. Two conditions: the patch embedding must be the first
operation after normalization (no per-pixel layer in between), and the value
steps must be affine in the pixel value. ``shuffle``, ``np`` and
``scramble`` are; ``shift`` (8-bit wrap-around) and ``ffx`` (an arbitrary
byte bijection) are not and have no linear counterpart, so schemes with
them are refused.

The security consequence is the point of this module: anyone holding a key
can turn any public plain ViT into a keyed one, and the reverse, weight
matching (``kp_plugin.attacks.weight_matching``), recovers a key from such a
model by comparing its patch embedding to the public one.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .errors import AdaptationError
from .keys import SecretKey
from .module import ProtectedModel, resolve_normalization, wrap_model

__all__ = [
    "AdaptationError",
    "adapt_patch_embedding",
    "first_conv",
    "position_embedding",
    "ADAPTABLE_STEPS",
]

#: Steps whose effect a patch embedding (plus position embeddings) can absorb.
ADAPTABLE_STEPS = ("shuffle", "np", "scramble")


def first_conv(model: nn.Module, channels: Optional[int] = None) -> tuple[str, nn.Conv2d]:
    """The first ``nn.Conv2d`` of ``model`` (in module order) taking
    ``channels`` input channels: a ViT's patch embedding or a CNN's stem.

    Example:
        >>> import timm
        >>> name, conv = first_conv(timm.create_model("vit_tiny_patch16_224"))
        >>> name
        'patch_embed.proj'
    """
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and (channels is None or module.in_channels == channels):
            return name, module
    raise AdaptationError(
        f"{type(model).__name__} has no Conv2d input layer; weight matching and adaptation need a conv stem "
        "or a conv patch embedding (timm VisionTransformer, transformers ViTModel, ...)"
    )


def position_embedding(model: nn.Module) -> Optional[tuple[nn.Parameter, int]]:
    """The position-embedding parameter ``(1, T, D)`` and its number of
    prefix (class/register) tokens, for timm ``VisionTransformer`` and
    transformers ``ViT*`` models; ``None`` when there is none."""
    timm_pos = getattr(model, "pos_embed", None)
    if isinstance(timm_pos, nn.Parameter):
        prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
        return timm_pos, prefix
    for name, param in model.named_parameters():
        if name.endswith("embeddings.position_embeddings"):
            return param, 1
    return None


def _patch_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight ``(D, C, M, M)`` -> ``(D, L)`` in (row, column, channel) order."""
    d, c, m, _ = weight.shape
    return weight.permute(0, 2, 3, 1).reshape(d, m * m * c)


def _conv_weight(matrix: torch.Tensor, channels: int, block_size: int) -> torch.Tensor:
    d = matrix.shape[0]
    return matrix.reshape(d, block_size, block_size, channels).permute(0, 3, 1, 2).contiguous()


def _per_channel(values, channels: int) -> torch.Tensor:
    values = [float(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    return torch.tensor(values * channels if len(values) == 1 else values, dtype=torch.float64)


@torch.no_grad()
def adapt_patch_embedding(
    model: nn.Module,
    key: SecretKey,
    *,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    image_size: Optional[Sequence[int]] = None,
    wrap: bool = True,
) -> nn.Module:
    """A copy of a plain-trained ViT-style ``model`` whose patch embedding
    (and position embeddings, for block scrambling) is rewritten so that it
    gives, on keyed images, exactly the logits ``model`` gives on plain ones.
    No training.

    Args:
        model: a model whose first layer is a conv patch embedding with
            kernel = stride = the key's block size (timm ``VisionTransformer``,
            transformers ``ViTForImageClassification``, ...). Left unchanged.
        key: the key; its scheme may use ``shuffle``, ``np``, ``scramble``.
        mean, std: the normalization, when the model does not say
            (timm ``pretrained_cfg`` / HF ``config.image_mean``).
        image_size: ``(H, W)``, needed for block scrambling when the model
            does not say.
        wrap: return a :class:`ProtectedModel` (keyed input in front);
            ``False`` returns the adapted base model alone.

    Raises:
        AdaptationError: patch size differs from the block size, the scheme
            has ``shift``/``ffx``, or scrambling without position embeddings.

    Example:
        >>> plain = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)   # doctest: +SKIP
        >>> keyed = adapt_patch_embedding(plain, SecretKey.generate(block_size=8))       # doctest: +SKIP
        >>> keyed(images01)   # == plain(normalize(images01))                            # doctest: +SKIP
    """
    if isinstance(model, ProtectedModel):
        raise AdaptationError("model is already protected; adapt the plain model (model.unwrap())")
    unsupported = [s for s in key.scheme if s not in ADAPTABLE_STEPS]
    if unsupported:
        raise AdaptationError(
            f"scheme {key.scheme_name!r} has {'+'.join(unsupported)}, a non-linear map of 8-bit values that no "
            f"patch embedding can absorb; adaptation is exact only for {'/'.join(ADAPTABLE_STEPS)} schemes"
        )
    mean, std, input_size = resolve_normalization(model, mean, std, None)
    c, m = key.channels, key.block_size
    mean_t, std_t = _per_channel(mean, c), _per_channel(std, c)

    adapted = copy.deepcopy(model)
    name, conv = first_conv(adapted, c)
    if tuple(conv.kernel_size) != (m, m) or tuple(conv.stride) != (m, m) or any(conv.padding):
        raise AdaptationError(
            f"{name} has kernel {tuple(conv.kernel_size)}, stride {tuple(conv.stride)}; exact adaptation needs a "
            f"patch embedding with kernel = stride = block size ({m}) and no padding. Use a key with "
            f"block_size equal to the model's patch size"
        )
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise AdaptationError(f"{name} is grouped or dilated; it is not a patch embedding")

    length = key.block_length
    perm = torch.tensor(key.pixel_permutation(length)) if "shuffle" in key.scheme else torch.arange(length)
    flip = (torch.tensor(key.np_mask(length), dtype=torch.float64) if "np" in key.scheme
            else torch.zeros(length, dtype=torch.float64))
    chan = torch.arange(length) % c          # channel of each block position
    c_out, c_src = chan, chan[perm]
    # z'[p] = a[p] * z[P[p]] + d[p]   (normalized keyed vs normalized plain)
    sign = 1 - 2 * flip
    a = sign * std_t[c_src] / std_t[c_out]
    d = (flip * (1 - 2 * mean_t[c_src]) + mean_t[c_src] - mean_t[c_out]) / std_t[c_out]

    w = _patch_matrix(conv.weight.detach().double())
    w_new = w[:, perm] / a
    conv.weight.copy_(_conv_weight(w_new, c, m).to(conv.weight.dtype))
    shift = w_new @ d
    if conv.bias is None:
        if shift.abs().max() > 0:
            conv.bias = nn.Parameter(-shift.to(conv.weight.dtype))
    else:
        conv.bias.copy_((conv.bias.double() - shift).to(conv.bias.dtype))

    if "scramble" in key.scheme:
        found = position_embedding(adapted)
        if found is None:
            raise AdaptationError(
                f"{type(model).__name__} has no position embeddings to permute; block scrambling cannot be "
                "absorbed (use a scheme without 'scramble')"
            )
        pos, prefix = found
        num_blocks = pos.shape[1] - prefix
        if image_size is not None and (image_size[0] // m) * (image_size[1] // m) != num_blocks:
            raise AdaptationError(f"image size {tuple(image_size)} does not give the model's {num_blocks} patches")
        order = torch.tensor(key.block_permutation(num_blocks)) + prefix
        index = torch.cat([torch.arange(prefix), order])
        pos.copy_(pos[:, index].clone())

    if not wrap:
        return adapted
    return wrap_model(adapted, key, mean=mean, std=std, input_size=input_size)
