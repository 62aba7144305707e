"""A slow, obviously correct reference of the keyed transform.

It follows DESIGN.md literally: cut the image into M x M blocks in row-major
order, flatten each block in (row, column, channel) order, run the scheme's
steps one after the other on that vector using the key's derived objects,
then put the blocks back (scrambled if the scheme says so). Python loops over
images, blocks and positions; only for tests, on tiny images.

When the scheme has an 8-bit step (shift, ffx), float input is quantized
first (``round(v * 255)``) and the result scaled back to [0, 1], as
``kp_plugin.transforms`` documents.
"""

from __future__ import annotations

import torch

from kp_plugin import SecretKey


def _transform_block(vector: list, key: SecretKey, *, eight_bit: bool) -> list:
    """The value steps and the pixel shuffle for one flattened block."""
    length = len(vector)
    scheme = key.scheme
    full = 255 if eight_bit else 1.0
    if "shuffle" in scheme:
        perm = key.pixel_permutation(length)
        vector = [vector[perm[p]] for p in range(length)]
    if "np" in scheme:
        flip = key.np_mask(length)
        vector = [full - v if flip[p] else v for p, v in enumerate(vector)]
    if "shift" in scheme:
        shift = key.shift_values(length)
        vector = [(v + shift[p]) % 256 for p, v in enumerate(vector)]
    if "ffx" in scheme:
        mask, tables = key.ffx_mask(length), key.ffx_tables(length)
        vector = [tables[p][v] if mask[p] else v for p, v in enumerate(vector)]
    return vector


def reference_transform(image: torch.Tensor, key: SecretKey) -> torch.Tensor:
    """Apply ``key``'s scheme to one image ``(C, H, W)`` or a batch, the slow way."""
    if image.dim() == 4:
        return torch.stack([reference_transform(im, key) for im in image])
    c, h, w = image.shape
    m = key.block_size
    eight_bit_steps = "shift" in key.scheme or "ffx" in key.scheme
    is_float = image.is_floating_point()
    if is_float and eight_bit_steps:
        values = image.mul(255).round().clamp(0, 255).long()
    else:
        values = image
    grid = values.tolist()
    eight_bit = not is_float or eight_bit_steps

    blocks = []  # row-major order of blocks
    for by in range(h // m):
        for bx in range(w // m):
            vector = [
                grid[ch][by * m + r][bx * m + col]
                for r in range(m)
                for col in range(m)
                for ch in range(c)
            ]
            blocks.append(_transform_block(vector, key, eight_bit=eight_bit))
    if "scramble" in key.scheme:
        order = key.block_permutation(len(blocks))
        blocks = [blocks[order[k]] for k in range(len(blocks))]

    out = [[[None] * w for _ in range(h)] for _ in range(c)]
    blocks_x = w // m
    for k, vector in enumerate(blocks):
        by, bx = divmod(k, blocks_x)
        for p, v in enumerate(vector):
            r, rest = divmod(p, m * c)
            col, ch = divmod(rest, c)
            out[ch][by * m + r][bx * m + col] = v
    result = torch.tensor(out, dtype=torch.float64 if is_float else image.dtype)
    if is_float and eight_bit_steps:
        result = result / 255
    return result.to(image.dtype)
