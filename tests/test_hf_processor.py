"""KeyedImageProcessor: the base processor's resize, the core's keyed
transform, the base's normalization; saved without the key."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, ConvNextImageProcessor, ViTImageProcessor

from hf_fixtures import BLOCK_SIZE, IMAGE_SIZE, digits_dataset, vit_processor
from kp_plugin import (BlockSizeError, CheckpointError, ConfigurationError, InputRangeError, KeyedInput, KeyLeakError,
                       KeyMismatchError, SecretKey)
from kp_plugin.checkpoint import find_key_material
from kp_plugin.hf import KeyedImageProcessor, KeyRequiredError
from kp_plugin.transforms import invert_transform


@pytest.fixture(scope="module")
def key():
    return SecretKey.generate(block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def images():
    return list(digits_dataset("test", size=6)["image"])


def test_output_is_the_core_transform_of_the_base_processors_images(key, images):
    base = vit_processor()
    keyed = KeyedImageProcessor(base, key)(images, return_tensors="pt")["pixel_values"]
    unnormalized = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_normalize=False)
    images01 = unnormalized(images, return_tensors="pt")["pixel_values"]
    expected = KeyedInput(key, mean=base.image_mean, std=base.image_std)(images01)
    assert keyed.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.testing.assert_close(keyed, expected, atol=1e-6, rtol=0)


def test_output_differs_from_the_base_processors_output(key, images):
    plain = vit_processor()(images, return_tensors="pt")["pixel_values"]
    keyed = KeyedImageProcessor(vit_processor(), key)(images, return_tensors="pt")["pixel_values"]
    assert (plain - keyed).abs().mean() > 0.1


def test_recover_images01_undoes_the_key_and_normalization(key, images):
    processor = KeyedImageProcessor(vit_processor(), key)
    recovered = processor.recover_images01(processor(images, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(recovered, processor.images01(images), atol=1e-5, rtol=0)


def test_assigning_another_key_changes_the_transform_and_the_saved_fingerprint(key, images, tmp_path):
    processor = KeyedImageProcessor(vit_processor(), key)
    processor(images, return_tensors="pt")
    other = SecretKey.generate_like(key)
    processor.key = other
    expected = KeyedImageProcessor(vit_processor(), other)(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(processor(images, return_tensors="pt")["pixel_values"], expected, atol=0, rtol=0)
    processor.save_pretrained(tmp_path)
    assert other.fingerprint in (tmp_path / "preprocessor_config.json").read_text()
    with pytest.raises(BlockSizeError):
        processor.key = SecretKey.generate(block_size=IMAGE_SIZE + 1)


def test_saved_config_has_base_settings_and_protection_but_no_key(key, tmp_path):
    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "KeyedImageProcessor"
    assert config["base_image_processor_type"] == "ViTImageProcessor"
    assert config["size"] == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    assert config["kp_protection"]["fingerprint"] == key.fingerprint
    assert config["kp_protection"]["block_size"] == BLOCK_SIZE
    assert config["kp_protection"]["scheme"] == list(key.scheme)
    assert find_key_material(tmp_path, key) == []


def test_auto_image_processor_restores_it_with_the_key(key, images, tmp_path):
    processor = KeyedImageProcessor(vit_processor(), key)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path, key=key)
    assert isinstance(loaded, KeyedImageProcessor)
    torch.testing.assert_close(loaded(images, return_tensors="pt")["pixel_values"],
                               processor(images, return_tensors="pt")["pixel_values"])


def test_loading_without_a_key_says_how_to_pass_one(key, tmp_path):
    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    with pytest.raises(KeyRequiredError, match=r"key=SecretKey\.load"):
        AutoImageProcessor.from_pretrained(tmp_path)
    with pytest.raises(KeyRequiredError):
        KeyedImageProcessor.from_pretrained(tmp_path)


def test_loading_with_another_key_is_rejected(key, tmp_path):
    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    wrong = SecretKey.generate_like(key)
    with pytest.raises(KeyMismatchError, match="allow_wrong_key"):
        KeyedImageProcessor.from_pretrained(tmp_path, key=wrong)
    assert KeyedImageProcessor.from_pretrained(tmp_path, key=wrong, allow_wrong_key=True).fingerprint == wrong.fingerprint


def test_a_plain_processor_directory_can_be_keyed_on_load(key, tmp_path):
    vit_processor().save_pretrained(tmp_path)
    loaded = KeyedImageProcessor.from_pretrained(tmp_path, key=key)
    assert isinstance(loaded.image_processor, ViTImageProcessor)
    assert loaded.fingerprint == key.fingerprint


def test_saving_next_to_a_key_file_is_refused(key, tmp_path):
    key.save(tmp_path / "owner.key")
    with pytest.raises(KeyLeakError, match="owner.key"):
        KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)


def test_output_size_not_a_multiple_of_the_block_size_is_rejected(key):
    with pytest.raises(BlockSizeError, match=r"size=\{'height': 20, 'width': 20\}"):
        KeyedImageProcessor(ViTImageProcessor(size={"height": 18, "width": 18}), key)


def test_convnext_processor_is_wrapped_with_its_own_resize(key, images):
    base = ConvNextImageProcessor(size={"shortest_edge": IMAGE_SIZE})
    pixels = KeyedImageProcessor(base, key)(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_numpy_and_pil_inputs_give_the_same_output(key):
    array = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    processor = KeyedImageProcessor(vit_processor(), key)
    from_pil = processor(Image.fromarray(array), return_tensors="pt")["pixel_values"]
    from_numpy = processor(array, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_pil, from_numpy)


def test_settings_of_the_base_are_readable(key):
    processor = KeyedImageProcessor(vit_processor(), key)
    assert processor.size["height"] == IMAGE_SIZE
    assert processor.image_mean == processor.image_processor.image_mean
    assert list(processor.image_mean) == [0.5, 0.5, 0.5]
    assert key.fingerprint in repr(processor)


def test_a_legacy_feature_extractor_config_is_keyed_through_auto_resolution(key, images, tmp_path):
    legacy = {"feature_extractor_type": "ViTFeatureExtractor", "do_resize": True, "size": IMAGE_SIZE,
              "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(legacy))
    processor = KeyedImageProcessor.from_pretrained(tmp_path, key=key)
    assert processor(images, return_tensors="pt")["pixel_values"].shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_pil_backend_processor_is_wrapped_too(key, images):
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    base = ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    keyed = KeyedImageProcessor(base, key)
    pixels = keyed(images, return_tensors="pt")["pixel_values"]
    plain = base(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(keyed.recover_images01(pixels) * 2 - 1, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_efficientnet_processor_with_include_top_gives_the_base_normalization(key, images, backend):
    # include_top (EfficientNet's default) divides by image_std once more
    # after normalizing; with the base's normalization turned off it ran on
    # uint8 pixels: torchvision's "Input tensor should be a float tensor".
    import transformers

    name = "EfficientNetImageProcessor" + ("Pil" if backend == "pil" else "")
    base = getattr(transformers, name)(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    assert base.include_top
    keyed = KeyedImageProcessor(base, key)
    pixels = keyed(images, return_tensors="pt")["pixel_values"]
    plain = base(images, return_tensors="pt")["pixel_values"]
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in keyed.normalization)
    torch.testing.assert_close((keyed.recover_images01(pixels) - mean) / std, plain, atol=1e-4, rtol=0)


def test_a_base_that_rescales_to_minus_one_one_is_refused_with_the_equivalent_settings(key):
    from transformers import EfficientNetImageProcessor

    base = EfficientNetImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, rescale_offset=True,
                                      rescale_factor=1 / 127.5)
    with pytest.raises(ConfigurationError, match="rescale_offset=False"):
        KeyedImageProcessor(base, key)


@pytest.mark.parametrize("shape", [(20, 20, 2), (20, 20, 5), (5, 20, 20)])
def test_arrays_whose_channels_the_base_cannot_find_are_told_to_convert(key, shape):
    # transformers raised a bare ValueError ("Unable to infer channel dimension
    # format"); its 5.17 release did so for PIL RGBA images too.
    with pytest.raises(BlockSizeError, match=r"key is for 3 channels.*convert\('RGB'\)"):
        KeyedImageProcessor(vit_processor(), key)(np.zeros(shape, np.uint8), return_tensors="pt")


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_grayscale_or_rgba_images_are_told_to_convert(key, mode):
    # The base processor alone fails here with a broadcasting RuntimeError.
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 20, 3), dtype=np.uint8)).convert(mode)
    processor = KeyedImageProcessor(vit_processor(), key)
    with pytest.raises(BlockSizeError, match=r"convert\('RGB'\)|do_convert_rgb"):
        processor(image, return_tensors="pt")
    converted = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
    assert converted.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_a_grayscale_image_among_rgb_ones_is_told_to_convert_not_to_resize(key):
    # Before: "different sizes; configure it to resize" for images of one
    # size, from the base's torch.stack of 1- and 3-channel images.
    from kp_plugin.hf import KeyedImageCollator

    processor = KeyedImageProcessor(vit_processor(), key)
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 256, (20, 20, 3), dtype=np.uint8))
    gray = rgb.convert("L")
    with pytest.raises(BlockSizeError, match=r"different channel counts \(1, 3; image 1 of this batch\).*convert"):
        processor([rgb, gray, rgb], return_tensors="pt")
    with pytest.raises(BlockSizeError, match=r"image 0 of this batch.*do_convert_rgb"):
        KeyedImageCollator(processor)([{"image": gray, "label": 0}, {"image": rgb, "label": 1}])
    out = processor([rgb, gray.convert("RGB")], return_tensors="pt")["pixel_values"]
    assert out.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_float_images_already_in_unit_range_or_normalized_are_refused(key):
    # The base rescales by 1/255: they came out near black, with no error
    # (the base processor alone only logs a warning).
    from kp_plugin.errors import InputRangeError

    processor = KeyedImageProcessor(vit_processor(), key)
    rng = np.random.RandomState(0)
    unit = rng.rand(32, 32, 3).astype(np.float32)
    for images in (unit, (unit - 0.5) / 0.25, torch.from_numpy(unit).permute(2, 0, 1)):
        with pytest.raises(InputRangeError, match="do_rescale=False"):
            processor(images, return_tensors="pt")
    for images in (unit * 255, np.zeros((32, 32, 3), np.float32), (unit * 255).astype(np.uint8)):
        assert processor(images, return_tensors="pt")["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    as_unit = KeyedImageProcessor(vit_processor(), key)
    as_unit.image_processor.do_rescale = False  # the documented way for [0, 1] floats
    torch.testing.assert_close(as_unit(unit, return_tensors="pt")["pixel_values"],
                               processor(unit * 255, return_tensors="pt")["pixel_values"], rtol=1e-4, atol=1e-4)


def test_a_corrupt_saved_processor_is_a_checkpoint_error_not_a_wrong_key(key, tmp_path):
    # transformers' OSError for bad JSON, AttributeError for a kp_protection
    # that is not an object, and KeyMismatchError (blaming the key) for a
    # block size that is not a number.
    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path / "ok")
    saved = json.loads((tmp_path / "ok" / "preprocessor_config.json").read_text())
    broken = {"not-json": "{not json", "block": {**saved, "kp_protection": "oops"},
              "size": {**saved, "kp_protection": {**saved["kp_protection"], "block_size": "x"}},
              "version": {**saved, "kp_protection": {**saved["kp_protection"], "format_version": "x"}}}
    for name, content in broken.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "preprocessor_config.json").write_text(
            content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(CheckpointError, match="preprocessor_config.json|not a valid JSON"):
            KeyedImageProcessor.from_pretrained(str(tmp_path / name), key=key)


def test_a_processor_saved_by_a_newer_release_asks_for_an_upgrade(key, tmp_path):
    # A new format version with a scheme step this release does not know was
    # called corrupt ("save the processor again"), which cannot be done.
    from transformers import AutoImageProcessor

    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    saved["kp_protection"].update(format_version=2, scheme=[*saved["kp_protection"]["scheme"], "rotate"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(saved))
    for load in (KeyedImageProcessor.from_pretrained, AutoImageProcessor.from_pretrained):
        with pytest.raises(CheckpointError, match="reads up to v1. Upgrade kp-plugin"):
            load(str(tmp_path), key=key)


@pytest.mark.parametrize("images", [[], torch.zeros(0, 3, 20, 20, dtype=torch.uint8), np.zeros((20, 20), np.uint8)])
def test_no_images_or_unreadable_arrays_are_typed_errors(key, images):
    # IndexError ("list index out of range") / transformers' bare ValueError.
    with pytest.raises(BlockSizeError, match="no images|could not read"):
        KeyedImageProcessor(vit_processor(), key)(images, return_tensors="pt")


def test_images_the_base_leaves_at_different_sizes_are_named_so(key):
    # The base's torch.stack error was reported as images it could not read.
    from transformers import CLIPImageProcessor

    processor = KeyedImageProcessor(CLIPImageProcessor(do_center_crop=False, size={"shortest_edge": 32}), key)
    wide, tall = (Image.fromarray(np.zeros(shape, dtype=np.uint8)) for shape in ((32, 48, 3), (48, 32, 3)))
    with pytest.raises(BlockSizeError, match="different sizes"):
        processor([wide, tall])


@pytest.mark.parametrize("route", ["KeyedImageProcessor", "AutoImageProcessor", "plain folder"])
def test_return_unused_kwargs_gives_the_processor_and_the_unused_ones(key, tmp_path, route):
    # transformers' from_pretrained returns (processor, unused kwargs) then;
    # the keyed one returned the processor alone.
    if route == "plain folder":
        vit_processor().save_pretrained(tmp_path)
    else:
        KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    loader = AutoImageProcessor if route == "AutoImageProcessor" else KeyedImageProcessor
    processor, unused = loader.from_pretrained(tmp_path, key=key, return_unused_kwargs=True, not_a_setting=1)
    assert isinstance(processor, KeyedImageProcessor) and unused == {"not_a_setting": 1}


def test_settings_assigned_on_the_keyed_processor_reach_the_base(key, images):
    # `processor.size = ...` made an attribute of the wrapper: it read back,
    # but the images and save_pretrained kept the base's old size.
    processor = KeyedImageProcessor(vit_processor(), key)
    bigger = IMAGE_SIZE + BLOCK_SIZE
    processor.size = {"height": bigger, "width": bigger}
    assert processor(images, return_tensors="pt")["pixel_values"].shape[-2:] == (bigger, bigger)
    assert processor.to_dict()["size"]["height"] == bigger
    with pytest.raises(BlockSizeError, match="block_size"):
        processor.size = {"height": bigger + 1, "width": bigger + 1}
    assert processor.image_processor.size["height"] == bigger  # the refused value was not kept
    processor.image_mean = [0.25, 0.25, 0.25]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    unnormalized = ViTImageProcessor(size={"height": bigger, "width": bigger}, do_normalize=False)
    images01 = unnormalized(images, return_tensors="pt")["pixel_values"]
    expected = KeyedInput(key, mean=[0.25] * 3, std=processor.image_std)(images01)
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


def test_the_output_size_is_the_one_the_base_produces(key):
    # Read from the settings, Perceiver's size (it crops to crop_size first,
    # then resizes to size) was taken for its crop_size and a good key refused;
    # ConvNeXt's shortest-edge crop (always 250x250 here) passed construction.
    from transformers import PerceiverImageProcessor

    perceiver = PerceiverImageProcessor(crop_size={"height": 40, "width": 40},
                                        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = KeyedImageProcessor(perceiver, key)
    assert processor.output_size == (IMAGE_SIZE, IMAGE_SIZE)
    image = Image.fromarray(np.zeros((50, 60, 3), dtype=np.uint8))
    assert processor(image, return_tensors="pt")["pixel_values"].shape[-2:] == (IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(BlockSizeError, match=r"250x250.*size=\{'shortest_edge': 256\}"):
        KeyedImageProcessor(ConvNextImageProcessor(size={"shortest_edge": 250}), SecretKey.generate(block_size=16))


@pytest.mark.parametrize("route", ["KeyedImageProcessor", "AutoImageProcessor"])
def test_backend_pil_on_load_gives_the_pil_base(key, images, tmp_path, route):
    # KeyedImageProcessor.from_pretrained(..., backend="pil") raised
    # AttributeError (no setter for 'backend'); AutoImageProcessor ignored it.
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path / "saved")
    loader = AutoImageProcessor if route == "AutoImageProcessor" else KeyedImageProcessor
    loaded = loader.from_pretrained(tmp_path / "saved", key=key, backend="pil")
    assert isinstance(loaded, KeyedImageProcessor) and isinstance(loaded.image_processor, ViTImageProcessorPil)
    expected = KeyedImageProcessor(ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), key)
    torch.testing.assert_close(loaded(images, return_tensors="pt")["pixel_values"],
                               expected(images, return_tensors="pt")["pixel_values"])
    assert loaded.to_dict()["image_processor_type"] == "KeyedImageProcessor"
    default = loader.from_pretrained(tmp_path / "saved", key=key)
    assert not isinstance(default.image_processor, ViTImageProcessorPil)


def test_a_save_that_fails_leaves_the_saved_configuration_whole(key, tmp_path):
    # transformers writes preprocessor_config.json in place: a full disk cut
    # the saved file short (and from_pretrained then called it invalid JSON).
    # A real limit: RLIMIT_FSIZE in a child process.
    import subprocess
    import sys

    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    before = (tmp_path / "preprocessor_config.json").read_bytes()
    script = f"""
import resource, signal
from transformers import ViTImageProcessor
from kp_plugin import SecretKey
from kp_plugin.hf import KeyedImageProcessor
processor = KeyedImageProcessor(ViTImageProcessor(size={{"height": 64, "width": 64}}), SecretKey.generate(block_size=8))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
try:
    processor.save_pretrained({str(tmp_path)!r})
except OSError as exc:
    print("failed", exc.errno)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("failed"), result.stdout + result.stderr
    assert (tmp_path / "preprocessor_config.json").read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))
    KeyedImageProcessor.from_pretrained(tmp_path, key=key)


def test_rescale_and_normalize_settings_given_to_a_call_hold_for_that_call(key, images):
    # They were dropped silently: do_normalize=False, image_mean / image_std
    # and rescale_factor gave the default output, and do_rescale=False (the
    # usual way to pass [0, 1] floats) was refused as a range error.
    processor = KeyedImageProcessor(vit_processor(), key)
    images01 = processor.images01(images)
    keyed01 = KeyedInput(key, mean=[0.0] * 3, std=[1.0] * 3)(images01)
    unnormalized = processor(images, do_normalize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(unnormalized, keyed01, atol=1e-6, rtol=0)
    identity = processor(images, image_mean=[0, 0, 0], image_std=[1, 1, 1], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(identity, keyed01, atol=1e-6, rtol=0)
    halved = processor(images, rescale_factor=1 / 510, do_normalize=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(invert_transform(halved, key), images01 / 2, atol=1e-6, rtol=0)
    floats = processor(list(images01), do_rescale=False, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(floats, processor(images, return_tensors="pt")["pixel_values"], atol=1e-5, rtol=0)
    # The processor itself is unchanged.
    assert processor.image_processor.do_normalize and processor.normalization == ([0.5] * 3, [0.5] * 3)
    torch.testing.assert_close(processor.apply_key(images01), processor(images, return_tensors="pt")["pixel_values"])


def test_a_segmentation_processors_labels_pass_through(key):
    from transformers import SegformerImageProcessor

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 40, 3), dtype=np.uint8))
    seg = Image.fromarray(rng.integers(0, 5, (50, 40), dtype=np.uint8))
    settings = dict(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_reduce_labels=True)
    plain = SegformerImageProcessor(**settings)(image, segmentation_maps=seg, return_tensors="pt")
    keyed = KeyedImageProcessor(SegformerImageProcessor(**settings), key)(image, segmentation_maps=seg,
                                                                           return_tensors="pt")
    assert set(keyed) == {"pixel_values", "labels"}
    assert torch.equal(keyed["labels"], plain["labels"])


@pytest.mark.parametrize("field", ["scheme", "channels"])
def test_a_saved_processor_missing_scheme_or_channels_is_a_checkpoint_error(key, tmp_path, field):
    # A bare KeyError('scheme') before.
    KeyedImageProcessor(vit_processor(), key).save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    config = json.loads(path.read_text())
    del config["kp_protection"][field]
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"kp_protection.{field}.*corrupt"):
        KeyedImageProcessor.from_pretrained(tmp_path, key=key)


def test_settings_read_through_are_the_bases_and_normalization_is_what_the_output_uses(key, images):
    # EfficientNet's include_top divides by image_std a second time: image_std
    # read the folded std (0.25) while assigning it wrote the base's, so
    # `p.image_std = p.image_std` changed the output. default_to_square and
    # valid_kwargs (class attributes of BaseImageProcessor) hid the base's.
    from transformers import CLIPImageProcessor, EfficientNetImageProcessor

    base = EfficientNetImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = KeyedImageProcessor(base, key)
    assert processor.image_std == base.image_std and processor.image_mean == base.image_mean
    mean, std = processor.normalization
    assert std == [float(s) ** 2 for s in base.image_std] and mean == list(base.image_mean)
    before = processor(images, return_tensors="pt")["pixel_values"]
    processor.image_std = processor.image_std
    assert torch.equal(processor(images, return_tensors="pt")["pixel_values"], before)
    for plain in (ConvNextImageProcessor(), CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})):
        keyed = KeyedImageProcessor(plain, SecretKey.generate(block_size=16))
        for name in dir(plain):
            value = getattr(plain, name)
            if name.startswith("_") or callable(value) and not isinstance(value, type):
                continue
            assert getattr(keyed, name) == value, name


def test_a_processor_whose_output_follows_the_input_size_has_no_output_size(key):
    # GLPN rounds sides down to a multiple of 32; the old probe images (40x56
    # and 56x40) both came out 32x32, so the size was taken as fixed.
    from transformers import GLPNImageProcessor

    processor = KeyedImageProcessor(GLPNImageProcessor(), SecretKey.generate(block_size=16))
    assert processor.output_size is None
    image = Image.fromarray(np.zeros((300, 250, 3), dtype=np.uint8))
    assert processor(image, return_tensors="pt")["pixel_values"].shape[-2:] == (288, 224)


def test_the_size_error_names_the_setting_the_output_size_comes_from(key):
    padding = ViTImageProcessor(size={"height": 192, "width": 192}, do_pad=True,
                                pad_size={"height": 200, "width": 200})
    with pytest.raises(BlockSizeError, match=r"pad_size=\{'height': 208, 'width': 208\}"):
        KeyedImageProcessor(padding, SecretKey.generate(block_size=16))


def test_the_float_range_error_gives_the_images_range_and_check_range_false_turns_it_off(key, images):
    processor = KeyedImageProcessor(vit_processor(), key)
    dark = [image * 0.5 for image in processor.images01(images)]  # [0, 0.5]: already rescaled, half the range
    with pytest.raises(InputRangeError, match=r"values in \[0, 0\.5\].*do_rescale=False"):
        processor(dark, return_tensors="pt")
    unchecked = KeyedImageProcessor(vit_processor(), key, check_range=False)
    assert unchecked(dark, return_tensors="pt")["pixel_values"].shape[0] == len(images)


def test_a_failed_save_is_a_checkpoint_error_and_keeps_the_saved_processor(key, tmp_path, monkeypatch):
    import errno

    processor = KeyedImageProcessor(vit_processor(), key)
    processor.save_pretrained(tmp_path)
    before = (tmp_path / "preprocessor_config.json").read_bytes()

    def full(self, text, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    processor.size = {"height": IMAGE_SIZE + BLOCK_SIZE, "width": IMAGE_SIZE + BLOCK_SIZE}
    with pytest.raises(CheckpointError, match="cannot write the image processor.*No space left") as raised:
        processor.save_pretrained(tmp_path)
    assert isinstance(raised.value, OSError)  # what transformers' save_pretrained raises
    monkeypatch.undo()
    assert (tmp_path / "preprocessor_config.json").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]


def test_a_name_or_a_corrupt_saved_config_gives_a_typed_error_that_says_what_to_do(tmp_path):
    # KeyedImageProcessor("google/vit", key) was a plain TypeError; a saved
    # preprocessor_config.json holding a JSON list raised AttributeError, and
    # one with image_mean "abc" a bare ValueError.
    from kp_plugin import KPError

    key = SecretKey.generate(block_size=8)
    with pytest.raises(KPError, match=r"from_pretrained\('google/vit', key=key\)") as caught:
        KeyedImageProcessor("google/vit", key)
    assert isinstance(caught.value, TypeError)
    saved = tmp_path / "saved"
    KeyedImageProcessor(ViTImageProcessor(size={"height": 32, "width": 32}), key).save_pretrained(saved)
    config = json.loads((saved / "preprocessor_config.json").read_text())
    for corrupt in ([1, 2], {**config, "image_mean": "abc"}):
        (saved / "preprocessor_config.json").write_text(json.dumps(corrupt))
        with pytest.raises(CheckpointError, match="cannot load the image processor"):
            KeyedImageProcessor.from_pretrained(saved, key=key)


def test_a_shallow_copy_has_its_own_settings_and_key(key, images):
    # copy.copy shared the base processor and the keyed transform: a size,
    # key or check_range set on the copy changed the original's output.
    import copy

    processor = KeyedImageProcessor(vit_processor(), key)
    before = processor(images, return_tensors="pt")["pixel_values"]
    clone = copy.copy(processor)
    torch.testing.assert_close(clone(images, return_tensors="pt")["pixel_values"], before, rtol=0, atol=0)
    clone.size = {"height": IMAGE_SIZE // 2, "width": IMAGE_SIZE // 2}
    clone.key = SecretKey.generate_like(key)
    clone.check_range = False
    assert clone(images, return_tensors="pt")["pixel_values"].shape[-1] == IMAGE_SIZE // 2
    torch.testing.assert_close(processor(images, return_tensors="pt")["pixel_values"], before, rtol=0, atol=0)
    assert processor.key is key and processor._keyed.check_range is True
