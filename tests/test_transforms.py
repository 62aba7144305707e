"""The compiled keyed transform equals the slow reference, inverts exactly,
and rejects bad input with typed errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kp_plugin import BlockSizeError, InputDtypeError, InputRangeError, SecretKey
from kp_plugin.keys import STEPS
from kp_plugin.transforms import apply_transform, compile_plan, invert_transform, nearest_valid_size

from reference import reference_transform

schemes = st.lists(st.sampled_from(STEPS), min_size=1, max_size=len(STEPS), unique=True)
dtypes = st.sampled_from([torch.uint8, torch.float32, torch.float64])


@st.composite
def keyed_images(draw):
    """A key (random material, block size, channels, scheme) and images that fit it."""
    block_size = draw(st.integers(1, 5))
    channels = draw(st.integers(1, 4))
    key = SecretKey(
        draw(st.binary(min_size=32, max_size=32)),
        block_size=block_size,
        scheme=draw(schemes),
        channels=channels,
    )
    height = block_size * draw(st.integers(1, 4))
    width = block_size * draw(st.integers(1, 4))
    batch = draw(st.sampled_from([None, 1, 3]))  # None: a single (C, H, W) image
    dtype = draw(dtypes)
    shape = (channels, height, width) if batch is None else (batch, channels, height, width)
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if dtype == torch.uint8:
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    else:
        images = torch.rand(shape, dtype=dtype, generator=generator)
    return key, images


property_settings = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@property_settings
@given(keyed_images())
def test_compiled_plan_equals_reference(case):
    key, images = case
    out = apply_transform(images, key)
    expected = reference_transform(images, key)
    assert out.shape == images.shape and out.dtype == images.dtype
    assert torch.equal(out, expected)


@property_settings
@given(keyed_images())
def test_inverse_undoes_apply(case):
    key, images = case
    restored = invert_transform(apply_transform(images, key), key)
    if images.dtype == torch.uint8:
        assert torch.equal(restored, images)
    elif "shift" in key.scheme or "ffx" in key.scheme:
        # 8-bit steps quantize float input; the inverse is exact on bytes.
        assert torch.equal(restored, images.mul(255).round().div(255))
    else:
        torch.testing.assert_close(restored, images, rtol=0, atol=torch.finfo(images.dtype).eps)


def test_transform_is_a_real_change(golden_key):
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = apply_transform(images, golden_key)
    assert (out != images).float().mean() > 0.5


def test_same_key_gives_the_same_plan_every_call(golden_key):
    again = SecretKey(golden_key._material, block_size=4, scheme=golden_key.scheme)
    first, second = compile_plan(golden_key, 3, 8, 12), compile_plan(again, 3, 8, 12)
    assert compile_plan(golden_key, 3, 8, 12) is first  # cached on the key
    assert torch.equal(first.source_index, second.source_index)
    assert torch.equal(first.value_table, second.value_table)


def test_other_key_gives_a_different_plan(golden_key):
    other = SecretKey.generate_like(golden_key)
    mine, theirs = compile_plan(golden_key, 3, 8, 8), compile_plan(other, 3, 8, 8)
    assert not torch.equal(mine.source_index, theirs.source_index)
    assert not torch.equal(mine.value_table, theirs.value_table)


def test_source_index_is_a_permutation(golden_key):
    plan = compile_plan(golden_key, 3, 12, 8)
    assert torch.equal(plan.source_index.sort().values, torch.arange(3 * 12 * 8))
    assert torch.equal(plan.source_index[plan.inverse_index], torch.arange(3 * 12 * 8))


def test_uint8_and_float_inputs_agree(golden_key):
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    from_bytes = apply_transform(images, golden_key)
    from_floats = apply_transform(images.float() / 255, golden_key)
    assert torch.equal(from_floats, from_bytes.float() / 255)


def test_size_not_a_multiple_names_both_sizes_and_the_nearest_valid_one():
    key = SecretKey(bytes(32), block_size=16)
    with pytest.raises(BlockSizeError) as info:
        apply_transform(torch.rand(1, 3, 225, 230), key)
    message = str(info.value)
    assert "225x230" in message and "16" in message and "224x224" in message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("size, block, nearest", [(225, 16, 224), (232, 16, 240), (5, 16, 16), (24, 16, 32)])
def test_nearest_valid_size(size, block, nearest):
    assert nearest_valid_size(size, block) == nearest


def test_normalized_float_input_is_rejected_with_a_hint(golden_key):
    normalized = (torch.rand(1, 3, 8, 8) - 0.45) / 0.22
    with pytest.raises(InputRangeError, match="before normalization"):
        apply_transform(normalized, golden_key)


def test_a_bright_image_normalized_with_imagenet_stats_is_told_about_normalization(golden_key):
    # No negatives and a maximum of about 2.6: before, only "divide by 255".
    bright = 0.5 + 0.5 * torch.rand(1, 3, 8, 8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    normalized = (bright - mean) / std
    assert normalized.min() >= 0 and 2 < normalized.max() < 3
    with pytest.raises(InputRangeError, match="before normalization"):
        apply_transform(normalized, golden_key)
    dark = torch.randint(0, 4, (1, 3, 8, 8)).float()  # dark 8-bit pixels stored as float: whole numbers
    dark[0, 0, 0, 0] = 3
    with pytest.raises(InputRangeError, match="divide by 255"):
        apply_transform(dark, golden_key)


def test_float_pixels_in_0_255_are_told_to_divide_by_255(golden_key):
    with pytest.raises(InputRangeError, match="divide by 255"):
        apply_transform(torch.rand(1, 3, 8, 8) * 255, golden_key)


def test_images_that_are_not_a_tensor_are_told_how_to_convert(golden_key):
    # A NumPy array was a BlockSizeError ("expected images shaped ..., got
    # ndarray"); KeyedInput already called it a dtype problem.
    import numpy as np

    with pytest.raises(InputDtypeError, match="torch.from_numpy"):
        apply_transform(np.zeros((3, 8, 8), dtype=np.uint8), golden_key)
    with pytest.raises(InputDtypeError, match="torch.Tensor"):
        invert_transform([[0.5]], golden_key)


def test_nan_input_is_out_of_range_and_named(golden_key):
    # The message said "values span [nan, nan]. Were they already normalized?"
    images = torch.rand(1, 3, 8, 8)
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputRangeError, match="contain NaN"):
        apply_transform(images, golden_key)


@pytest.mark.parametrize("call", ["apply_transform", "KeyedInput", "vmap"])
def test_nan_input_with_the_check_off_is_an_input_range_error_for_8_bit_steps(call):
    # NaN cast to an index fell outside the lookup table: a bare IndexError.
    from kp_plugin import KeyedInput

    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np+ffx")
    images = torch.rand(2, 3, 8, 8)
    images[1, 2, 3, 4] = float("nan")
    keyed = KeyedInput(key, mean=0.5, std=0.5, check_range=False)
    run = {
        "apply_transform": lambda: apply_transform(images, key, check_range=False),
        "KeyedInput": lambda: keyed(images),
        "vmap": lambda: torch.func.vmap(keyed)(images.unsqueeze(1)),
    }[call]
    with pytest.raises(InputRangeError, match="contain NaN.*8-bit steps"):
        run()


def test_check_range_false_accepts_out_of_range_input(shuffle_np_key):
    images = torch.rand(1, 3, 8, 8) * 4 - 2
    out = apply_transform(images, shuffle_np_key, check_range=False)
    assert torch.allclose(invert_transform(out, shuffle_np_key), images)


def test_slight_overshoot_from_resampling_is_accepted(shuffle_np_key):
    images = torch.rand(1, 3, 8, 8)
    images[0, 0, 0, 0] = 1.004
    apply_transform(images, shuffle_np_key)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_input_other_than_uint8_is_rejected(golden_key, dtype):
    with pytest.raises(InputDtypeError, match="uint8"):
        apply_transform(torch.zeros(1, 3, 8, 8, dtype=dtype), golden_key)


def test_wrong_channel_count_is_rejected(golden_key):
    with pytest.raises(BlockSizeError, match="1 channels but the key is for 3"):
        apply_transform(torch.rand(2, 1, 8, 8), golden_key)


def test_channels_last_layout_is_rejected_by_channel_count(golden_key):
    with pytest.raises(BlockSizeError, match="channels"):
        apply_transform(torch.rand(2, 8, 8, 3), golden_key)


def test_wrong_rank_is_rejected(golden_key):
    with pytest.raises(BlockSizeError, match=r"\(B, C, H, W\)"):
        apply_transform(torch.rand(8, 8), golden_key)


def test_plan_refuses_images_of_another_size(golden_key):
    plan = compile_plan(golden_key, 3, 8, 8)
    with pytest.raises(BlockSizeError, match="8x8"):
        plan.apply(torch.rand(1, 3, 12, 8))


def test_half_precision_quantizes_to_the_right_byte(golden_key):
    images = torch.arange(192, dtype=torch.uint8).reshape(1, 3, 8, 8)
    expected = apply_transform(images, golden_key).float() / 255
    for dtype in (torch.float16, torch.bfloat16):
        out = apply_transform(images.to(dtype) / 255, golden_key)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=torch.finfo(dtype).eps)


def test_apply_is_differentiable_for_the_affine_scheme(shuffle_np_key):
    images = torch.rand(1, 3, 8, 8, requires_grad=True)
    apply_transform(images, shuffle_np_key).sum().backward()
    flips = torch.tensor(shuffle_np_key.np_mask()).sum().item()
    # d/dv of (1 - v) is -1 where np flips, +1 elsewhere; 4 blocks of 48.
    assert images.grad.sum().item() == pytest.approx(4 * (48 - 2 * flips))


@pytest.mark.parametrize("scheme", ["shuffle+np", "shuffle+np+shift+ffx+scramble"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_apply_and_invert_under_vmap_match_eager(scheme, dtype):
    key = SecretKey(bytes(range(32)), block_size=4, scheme=scheme)
    images = torch.rand(5, 3, 8, 12)
    if dtype == torch.uint8:
        images = (images * 255).round().to(torch.uint8)
    applied = torch.func.vmap(lambda image: apply_transform(image, key))(images)
    torch.testing.assert_close(applied, apply_transform(images, key), rtol=0, atol=0)
    inverted = torch.func.vmap(lambda image: invert_transform(image, key))(applied)
    torch.testing.assert_close(inverted, invert_transform(applied, key), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scheme", ["shuffle+np", "shuffle+np+shift+ffx+scramble"])
def test_cuda_matches_cpu(golden_key, scheme):
    key = golden_key.replace(scheme=scheme)
    for images in (torch.rand(2, 3, 8, 8), torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)):
        on_gpu = apply_transform(images.cuda(), key)
        assert on_gpu.is_cuda
        assert torch.equal(on_gpu.cpu(), apply_transform(images, key))
        assert torch.equal(invert_transform(on_gpu, key).cpu(), invert_transform(apply_transform(images, key), key))


def test_lookup_with_a_table_too_large_for_float_indices_matches_the_small_path():
    from kp_plugin.transforms import lookup_table

    values = torch.rand(2, 6)
    offsets = torch.tensor([0, 256, 512, 0, 256, 512], dtype=torch.int32)
    small = torch.rand(3 * 256)
    large = torch.cat([small, torch.zeros((1 << 24) - small.numel())])
    assert torch.equal(lookup_table(values, offsets, large), lookup_table(values, offsets, small))
    assert torch.equal(lookup_table(values, offsets, small), small[values.mul(255).round().long() + offsets.long()])


def test_a_compiled_plan_is_never_printed_or_pickled():
    # Its repr was the dataclass's, the index tensors printed; pickle and
    # torch.save wrote the permutation (the key refuses both).
    import copy
    import io
    import pickle

    from kp_plugin import KeyPicklingError

    key = SecretKey.generate(block_size=4, scheme="shuffle+np+scramble")
    plan = compile_plan(key, 3, 8, 8)
    assert "tensor" not in repr(plan) and key.fingerprint in repr(plan)
    for dump in (pickle.dumps, lambda p: torch.save(p, io.BytesIO())):
        with pytest.raises(KeyPicklingError, match="compile it again"):
            dump(plan)
    assert copy.deepcopy(plan) is plan
