"""The block-wise keyed transform, compiled once into index and lookup tensors.

DESIGN.md fixes the transform. For an image ``(C, H, W)`` cut into ``M x M``
blocks, each block is flattened to a vector of length ``L = M*M*C`` in
(row, column, channel) order, then:

1. ``shuffle``: ``y[p] = x[P[p]]`` with the key's permutation ``P``;
2. ``np``: where ``b[p] = 1``, ``v -> 1 - v`` (uint8: ``255 - v``);
3. ``shift``: ``q -> (q + s[p]) mod 256`` on 8-bit values;
4. ``ffx``: where ``f[p] = 1``, ``q -> F_p(q)``, a keyed bijection of 0..255;
5. ``scramble``: output block ``k`` is input block ``S[k]``;
6. blocks are put back (and, in :class:`~kp_plugin.module.KeyedInput`,
   normalized with the model's mean/std).

Steps 3 and 4 work on 8-bit values, so when a scheme has either, float input
is quantized first (``round(v * 255)``) and scaled back to [0, 1] at the end.

Because every step moves or maps values by position only, the whole
composition is one gather over the flattened image (``source_index``) and
one per-position value map: a multiply-add for ``np`` alone, a 256-entry
lookup table per position otherwise. :func:`compile_plan` builds those
tensors once per (key, C, H, W); applying them has no Python loop over
images, blocks or pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from .errors import BlockSizeError, InputDtypeError, InputRangeError, KeyPicklingError, first_line
from .keys import SecretKey

__all__ = [
    "TransformPlan",
    "compile_plan",
    "apply_transform",
    "invert_transform",
    "check_image_size",
    "check_float_range",
    "image_to_blocks",
    "blocks_to_image",
    "nearest_valid_size",
    "quantize",
    "lookup_table",
    "RANGE_TOLERANCE",
]

#: How far outside [0, 1] float input may stray before it counts as "clearly
#: not in [0, 1]". Resampling overshoots: bicubic (torch's a = -0.75) can
#: reach [-0.22, 1.41] in theory, and resizing scikit-image's photos measured
#: up to 0.18 beyond [0, 1]; a correct pipeline must not fail on that.
#: Normalized batches are far outside (a black pixel is -2.1 under ImageNet's
#: mean/std, -1 under mean = std = 0.5; 8-bit values reach 255).
RANGE_TOLERANCE = 0.5


def nearest_valid_size(size: int, block_size: int) -> int:
    """The multiple of ``block_size`` closest to ``size`` (ties go up, never 0)."""
    lower = (size // block_size) * block_size
    upper = lower + block_size
    if lower == 0 or size - lower > upper - size or size - lower == upper - size:
        return upper
    return lower


def check_image_size(height: int, width: int, block_size: int) -> None:
    """Raise :class:`BlockSizeError` unless both sides are multiples of the
    block size; the message names both sizes and the nearest valid size."""
    if height % block_size or width % block_size or height <= 0 or width <= 0:
        h, w = nearest_valid_size(height, block_size), nearest_valid_size(width, block_size)
        raise BlockSizeError(
            f"image is {height}x{width} (HxW) but block_size is {block_size}; "
            f"resize to a multiple of {block_size} (e.g. {h}x{w})"
        )


def image_to_blocks(images: torch.Tensor, block_size: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, N, L)``: blocks in row-major order, each
    flattened in DESIGN.md's (row, column, channel) order."""
    b, c, h, w = images.shape
    check_image_size(h, w, block_size)
    m = block_size
    x = images.reshape(b, c, h // m, m, w // m, m).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // m) * (w // m), m * m * c)


def blocks_to_image(blocks: torch.Tensor, block_size: int, channels: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`image_to_blocks`."""
    b, m = blocks.shape[0], block_size
    x = blocks.reshape(b, height // m, width // m, m, m, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, channels, height, width)


def _value_tables(key: SecretKey, length: int) -> Optional[torch.Tensor]:
    """Per-position 8-bit value map of the value steps (np, shift, ffx), as a
    ``(L, 256)`` uint8 tensor, or ``None`` when the scheme has no 8-bit step
    (then ``np``, if present, is applied as ``1 - v`` in floating point)."""
    scheme = key.scheme
    if "shift" not in scheme and "ffx" not in scheme:
        return None
    table = torch.arange(256, dtype=torch.int64).repeat(length, 1)
    if "np" in scheme:
        flip = torch.tensor(key.np_mask(length), dtype=torch.bool)
        table[flip] = 255 - table[flip]
    if "shift" in scheme:
        shift = torch.tensor(key.shift_values(length), dtype=torch.int64)
        table = (table + shift[:, None]) % 256
    if "ffx" in scheme:
        mask = torch.tensor(key.ffx_mask(length), dtype=torch.bool)
        ffx = torch.tensor(key.ffx_tables(length), dtype=torch.int64)
        table = torch.where(mask[:, None], torch.gather(ffx, 1, table), table)
    return table.to(torch.uint8)


@dataclass
class TransformPlan:
    """The keyed transform for one (key, C, H, W), compiled to tensors.

    Attributes:
        source_index: ``(C*H*W,)`` int64; output element ``i`` (flattened
            CHW) comes from input element ``source_index[i]``.
        inverse_index: the inverse gather.
        position: ``(C*H*W,)`` int64; the block-vector position ``p`` that
            output element ``i`` holds (it selects the value map).
        flip: ``(C*H*W,)`` bool; where ``np`` flips (only when the scheme
            has ``np`` and no 8-bit step), else ``None``.
        value_table: ``(L, 256)`` uint8 value maps per position when the
            scheme has ``shift`` or ``ffx`` (``np`` folded in), else ``None``.
    """

    block_size: int
    channels: int
    height: int
    width: int
    scheme: tuple
    fingerprint: str
    source_index: torch.Tensor
    inverse_index: torch.Tensor
    position: torch.Tensor
    flip: Optional[torch.Tensor]
    value_table: Optional[torch.Tensor]
    _device_cache: dict = field(default_factory=dict, repr=False, compare=False)

    # The index tensors are the key's permutation: never printed or pickled
    # (a plan is compiled again from the key; copies share the one plan).
    def __repr__(self) -> str:
        return (f"TransformPlan(fingerprint={self.fingerprint}, scheme={'+'.join(self.scheme)}, "
                f"block_size={self.block_size}, size=({self.channels}, {self.height}, {self.width}))")

    def __reduce__(self):
        raise KeyPicklingError(
            "a TransformPlan holds the key's permutation and cannot be pickled; compile it again from the key "
            "(kp_plugin.compile_plan(key, C, H, W))"
        )

    def __copy__(self) -> "TransformPlan":
        return self

    def __deepcopy__(self, memo) -> "TransformPlan":
        return self

    # ---------------------------------------------------------- derived
    @property
    def numel(self) -> int:
        """Elements of one image, ``C * H * W``."""
        return self.channels * self.height * self.width

    @property
    def quantizes(self) -> bool:
        """True when float input is quantized to 8 bits (shift or ffx)."""
        return self.value_table is not None

    def channel_of_element(self) -> torch.Tensor:
        """Channel of each output element (flattened CHW)."""
        return torch.arange(self.channels).repeat_interleave(self.height * self.width)

    def lookup_offsets(self) -> Optional[torch.Tensor]:
        """``position * 256`` per output element: where its 256-entry map
        starts in the flattened value table."""
        return None if self.value_table is None else self.position * 256

    def inverse_value_table(self) -> Optional[torch.Tensor]:
        """The ``(L, 256)`` uint8 inverse of :attr:`value_table` (row ``p``
        undoes the value map of position ``p``), or ``None``."""
        if self.value_table is None:
            return None
        inv = torch.empty_like(self.value_table, dtype=torch.int64)
        inv.scatter_(1, self.value_table.long(), torch.arange(256).expand_as(inv).contiguous())
        return inv.to(torch.uint8)

    def _on(self, device: torch.device) -> dict:
        """The tensors the hot path needs, on ``device`` (cached)."""
        cached = self._device_cache.get(device)
        if cached is None:
            cached = {
                "src": self.source_index.to(device),
                "inv": self.inverse_index.to(device),
                "flip": None if self.flip is None else self.flip.to(device),
            }
            if self.value_table is not None:
                offsets = self.lookup_offsets()
                cached["offsets"] = offsets.to(device=device, dtype=torch.int32)
                cached["table"] = self.value_table.reshape(-1).to(device)
                # inverse: the element at output i went through map position[i]
                cached["inv_table"] = self.inverse_value_table().reshape(-1).to(device)
            self._device_cache[device] = cached
        return cached

    def _table_for(self, tensors: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The byte table ``name`` for uint8 images; for float images the same
        table as values ``q / 255`` in ``dtype``, computed once on the CPU in
        float64 so every device returns the same, correctly rounded values."""
        if dtype == torch.uint8:
            return tensors[name]
        cached = tensors.get((name, dtype))
        if cached is None:
            source = self.value_table if name == "table" else self.inverse_value_table()
            values = (source.reshape(-1).double() / 255).to(dtype)
            cached = tensors[(name, dtype)] = values.to(tensors[name].device)
        return cached

    # ---------------------------------------------------------- apply
    def _check(self, x: torch.Tensor, check_range: bool) -> tuple[torch.Tensor, bool]:
        if not isinstance(x, torch.Tensor):
            raise InputDtypeError(f"expected a torch.Tensor of images, got {type(x).__name__}")
        if x.dtype != torch.uint8 and not x.is_floating_point():
            raise InputDtypeError(
                f"images have dtype {x.dtype}; the keyed transform takes float images in [0, 1] "
                "or uint8 images in 0..255 (convert with x.float() / 255)"
            )
        single = x.dim() == 3
        if x.dim() not in (3, 4):
            raise BlockSizeError(
                f"expected images shaped (B, C, H, W) or (C, H, W), got shape {tuple(x.shape)}"
            )
        c, h, w = x.shape[-3:]
        if c != self.channels:
            raise BlockSizeError(
                f"images have {c} channels but the key is for {self.channels} "
                "(channels-first layout (B, C, H, W) is expected)"
            )
        if (h, w) != (self.height, self.width):
            check_image_size(h, w, self.block_size)
            raise BlockSizeError(f"this plan is for {self.height}x{self.width} images, got {h}x{w}")
        if check_range and x.is_floating_point() and x.numel() and not _functorch_active():
            check_float_range(x)
        return (x.unsqueeze(0) if single else x), single

    def apply(self, x: torch.Tensor, *, check_range: bool = True) -> torch.Tensor:
        """Apply the keyed transform to ``(B, C, H, W)`` or ``(C, H, W)``
        images; float in [0, 1] stays float, uint8 stays uint8."""
        batch, single = self._check(x, check_range)
        t = self._on(batch.device)
        flat = batch.flatten(1)
        out = torch.gather(flat, 1, t["src"].expand(flat.shape[0], -1))
        if self.value_table is not None:
            out = lookup_table(out, t["offsets"], self._table_for(t, "table", out.dtype), owned=True)
        elif self.flip is not None:
            full = 255 if out.dtype == torch.uint8 else 1.0
            out = torch.where(t["flip"], full - out, out)
        out = out.reshape(batch.shape)
        return out[0] if single else out

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` (exact for uint8; for float up to float
        precision, or to the 8-bit quantization when the scheme quantizes)."""
        batch, single = self._check(y, check_range=False)
        t = self._on(batch.device)
        flat = batch.flatten(1)
        if self.value_table is not None:
            flat = lookup_table(flat, t["offsets"], self._table_for(t, "inv_table", flat.dtype), owned=False)
        elif self.flip is not None:
            full = 255 if flat.dtype == torch.uint8 else 1.0
            flat = torch.where(t["flip"], full - flat, flat)
        out = torch.gather(flat, 1, t["inv"].expand(flat.shape[0], -1)).reshape(batch.shape)
        return out[0] if single else out


#: Elements per chunk of :func:`lookup_table`'s int32 index (16 MB): large
#: batches are looked up in pieces so the temporaries stay small enough for
#: the allocator to reuse instead of mapping fresh pages on every call
#: (measured: a 77 MB index made the keyed ffx processor 0.69x its base at
#: 128 images of 224x224, against 1.1x at 32).
LOOKUP_CHUNK = 1 << 22

#: True inside torch.func transforms (vmap, grad, jacrev, ...): values there
#: cannot be read on the host (no range check) and results cannot be written
#: into preallocated tensors (the transform takes its functional path).
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


def lookup_table(values: torch.Tensor, offsets: torch.Tensor, table: torch.Tensor, *, owned: bool = False,
                 out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``table[offsets[i] + q[i]]`` for every element of ``values`` ``(B, N)``,
    where ``q`` is ``values`` itself (uint8) or ``round(v * 255)`` clamped to
    0..255 (float).

    ``offsets`` is ``(N,)`` (``position * 256``, int32), ``table`` is 1-D.
    The index is kept in int32 and built a chunk of rows at a time (in place
    when ``owned``: ``values`` is a temporary the caller gives up), so the
    lookup costs a few streaming passes and one ``index_select`` per chunk
    rather than int64 fancy indexing over the whole batch. ``out``: a
    contiguous ``(B, N)`` tensor of ``table``'s dtype to write into.
    """
    if table.numel() >= 1 << 24 or _functorch_active():
        # float32 can no longer hold the index exactly; or inside torch.func,
        # where out= and in-place writes into fresh tensors do not batch.
        q = values.long() if values.dtype == torch.uint8 else quantize(values)
        try:
            result = table[q + offsets.long()]
        except (IndexError, RuntimeError) as exc:
            raise _lookup_error(exc) from None
        return result if out is None else out.copy_(result)
    rows, width = values.shape
    if out is None:
        out = torch.empty((rows, width), dtype=table.dtype, device=values.device)
    step = max(1, LOOKUP_CHUNK // max(width, 1))
    for start in range(0, rows, step):
        part = values[start:start + step]
        if part.dtype == torch.uint8:
            index = torch.add(offsets, part)  # uint8 + int32 -> int32 in one pass
        else:
            work = part.detach()
            if work.dtype in (torch.float16, torch.bfloat16):
                work = work.float()  # as in quantize(): no room for the fraction in half types
            elif not owned:
                work = work.clone()
            index = work.mul_(255).round_().clamp_(0, 255).add_(offsets).to(torch.int32)
        try:
            torch.index_select(table, 0, index.view(-1), out=out[start:start + step].view(-1))
        except (IndexError, RuntimeError) as exc:
            raise _lookup_error(exc) from None
    return out


def quantize(values: torch.Tensor) -> torch.Tensor:
    """``round(v * 255)`` clamped to 0..255, as int64.

    Half-precision input is widened first: in bfloat16, ``v * 255`` has no
    room for the fraction and would round to the wrong byte.
    """
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    # Out-of-place clamp: vmap has no batching rule for clamp_ (it would fall
    # back to a slow loop, with a warning); only the rare paths call this.
    return values.mul(255).round_().clamp(0, 255).long()


#: The start of the error for images holding NaN.
NAN_IMAGES = (
    "float images contain NaN (not a number), which is no pixel value: check what produced them "
    "(a division by zero, an empty crop or an image that failed to decode)"
)


def _lookup_error(exc: Exception) -> InputRangeError:
    """NaN cast to an integer gives an index far outside the table: the
    8-bit steps' lookup fails with IndexError / RuntimeError."""
    return InputRangeError(
        f"{NAN_IMAGES}; the scheme's 8-bit steps (shift, ffx) cannot quantize them ({first_line(exc)[:120]})"
    )


def check_float_range(x: torch.Tensor, tolerance: float = RANGE_TOLERANCE) -> None:
    """Raise :class:`InputRangeError` if float images are clearly not in [0, 1]
    (NaN counts as outside)."""
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo, hi = float(lo), float(hi)
    if lo != lo or hi != hi:
        raise InputRangeError(NAN_IMAGES + "; check_range=False turns this check off.")
    if not (lo >= -tolerance and hi <= 1 + tolerance):
        normalized = (
            "Were they already normalized with mean/std? The keyed transform goes before "
            "normalization (KeyedInput normalizes for you)."
        )
        eight_bit = "They look like 8-bit pixel values stored as float: divide by 255, or pass the uint8 tensor itself."
        if lo >= 0 and 2 < hi <= 255:
            # Whole numbers, or a maximum no mean/std normalization of [0, 1]
            # images reaches (ImageNet's tops out at 2.64), say 8-bit; a bright
            # image normalized with mean/std also has no negatives, so below
            # that both causes are named.
            whole = bool(torch.equal(x.detach(), x.detach().round()))
            cause = eight_bit if whole or hi > 5 else f"{normalized} Or, if they are 8-bit values: divide by 255."
        else:
            cause = normalized
        raise InputRangeError(
            f"float images must be in [0, 1] before the keyed transform, but values span "
            f"[{lo:.3g}, {hi:.3g}]. {cause} Pass uint8 images or rescale to [0, 1]; "
            "check_range=False turns this check off."
        )


def compile_plan(key: SecretKey, channels: int, height: int, width: int) -> TransformPlan:
    """Compile the key's scheme for images ``(channels, height, width)``.

    Plans are cached on the key, so compiling again is free.

    Example:
        >>> key = SecretKey.generate(block_size=4)
        >>> plan = compile_plan(key, 3, 32, 32)
        >>> y = plan.apply(torch.rand(8, 3, 32, 32))
    """
    if channels != key.channels:
        raise BlockSizeError(f"images have {channels} channels but the key is for {key.channels}")
    check_image_size(height, width, key.block_size)
    cache_key = ("plan", channels, height, width)
    plan = key._cache.get(cache_key)
    if plan is not None:
        return plan

    m, c = key.block_size, channels
    length = m * m * c
    blocks_y, blocks_x = height // m, width // m
    num_blocks = blocks_y * blocks_x

    # An output element (c, y, x) = (c, by*m + ry, bx*m + rx) splits into a
    # block part (by, bx) and a within-block part (ry, rx, c). Index tensors
    # are computed on those two small grids and combined by one broadcast
    # over the 5-D view (C, blocks_y, m, blocks_x, m) of the CHW image: a few
    # full-size ops instead of a dozen (compiling a plan per wrong key is on
    # the attacks' hot path).
    ch = torch.arange(c).view(c, 1, 1, 1, 1)
    ry = torch.arange(m).view(1, 1, m, 1, 1)
    rx = torch.arange(m).view(1, 1, 1, 1, m)
    position = (ry * m + rx) * c + ch  # (row, column, channel) order; shape (C, 1, m, 1, m)
    block = torch.arange(num_blocks).view(1, blocks_y, 1, blocks_x, 1)  # row-major

    # Which element of the input block feeds each position (step 2), and
    # which input block feeds each output block (step 5).
    if "shuffle" in key.scheme:
        source_pos = torch.tensor(key.pixel_permutation(length), dtype=torch.int64)[position]
    else:
        source_pos = position
    if "scramble" in key.scheme:
        source_block = torch.tensor(key.block_permutation(num_blocks), dtype=torch.int64)[block]
    else:
        source_block = block
    within = ((source_pos % c) * height + source_pos // (m * c)) * width + (source_pos // c) % m
    offset = (source_block // blocks_x) * m * width + (source_block % blocks_x) * m
    source_index = (within + offset).reshape(-1)
    inverse_index = torch.empty_like(source_index)
    inverse_index[source_index] = torch.arange(source_index.numel())
    position = position.expand(c, blocks_y, m, blocks_x, m).reshape(-1)

    table = _value_tables(key, length)
    flip = None
    if table is None and "np" in key.scheme:
        flip = torch.tensor(key.np_mask(length), dtype=torch.bool)[position]

    plan = TransformPlan(
        block_size=m,
        channels=c,
        height=height,
        width=width,
        scheme=key.scheme,
        fingerprint=key.fingerprint,
        source_index=source_index,
        inverse_index=inverse_index,
        position=position,
        flip=flip,
        value_table=table,
    )
    key._cache[cache_key] = plan
    return plan


def _plan_for(key: SecretKey, x: torch.Tensor) -> TransformPlan:
    if not isinstance(x, torch.Tensor):
        raise InputDtypeError(
            f"expected a torch.Tensor of images, got {type(x).__name__} (NumPy: torch.from_numpy(array); "
            "PIL: torchvision.transforms.functional.pil_to_tensor(image))"
        )
    if x.dim() not in (3, 4):
        raise BlockSizeError(f"expected images shaped (B, C, H, W) or (C, H, W), got {tuple(x.shape)}")
    c, h, w = x.shape[-3:]
    return compile_plan(key, c, h, w)


def apply_transform(x: torch.Tensor, key: SecretKey, *, check_range: bool = True) -> torch.Tensor:
    """Apply ``key``'s block-wise transform to images in [0, 1] (float) or
    0..255 (uint8), shaped ``(B, C, H, W)`` or ``(C, H, W)``.

    Example:
        >>> key = SecretKey.generate(block_size=8)
        >>> protected = apply_transform(torch.rand(3, 64, 64), key)
    """
    return _plan_for(key, x).apply(x, check_range=check_range)


def invert_transform(y: torch.Tensor, key: SecretKey) -> torch.Tensor:
    """Undo :func:`apply_transform` (for pictures, debugging and tests)."""
    return _plan_for(key, y).invert(y)
