"""KeyedInput / ProtectedModel / wrap_model: the keyed transform in front of a
real model, with nothing derived from the key in its state."""

from __future__ import annotations

import io
import pickle
import socket
import warnings

import pytest
import torch

from kp_plugin import (
    BlockSizeError,
    ConfigurationError,
    InputDtypeError,
    InputRangeError,
    KeyedInput,
    SecretKey,
    unwrap,
    wrap_model,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kp_plugin.keys import STEPS
from kp_plugin.transforms import apply_transform
from reference import reference_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.fixture(params=["shuffle+np", "shuffle+np+shift+ffx+scramble"])
def any_key(request) -> SecretKey:
    return SecretKey(bytes(range(7, 39)), block_size=4, scheme=request.param)


# ----------------------------------------------------------------------------
# KeyedInput computes normalize(T_key(x))
# ----------------------------------------------------------------------------


def test_keyed_input_is_transform_then_normalize(any_key):
    images = torch.rand(4, 3, 16, 8)
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    torch.testing.assert_close(keyed(images), _normalize(apply_transform(images, any_key)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    material=st.binary(min_size=32, max_size=32),
    steps=st.lists(st.sampled_from(STEPS), min_size=1, max_size=len(STEPS), unique=True),
    block_size=st.integers(1, 4),
    channels=st.integers(1, 3),
    blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    as_uint8=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_keyed_input_equals_normalized_reference(material, steps, block_size, channels, blocks, as_uint8, seed):
    key = SecretKey(material, block_size=block_size, scheme=steps, channels=channels)
    generator = torch.Generator().manual_seed(seed)
    shape = (2, channels, block_size * blocks[0], block_size * blocks[1])
    mean = torch.rand(channels, generator=generator).tolist()
    std = (torch.rand(channels, generator=generator) + 0.1).tolist()
    images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)
    if not as_uint8:
        images = images.float() / 255
    expected = reference_transform(images, key)
    expected = expected.float() / 255 if as_uint8 else expected
    expected = (expected - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    torch.testing.assert_close(KeyedInput(key, mean=mean, std=std)(images), expected, rtol=1e-5, atol=1e-5)


def test_keyed_input_takes_uint8_images(any_key):
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    out = keyed(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, keyed(images.float() / 255))


def test_keyed_input_takes_a_single_image(any_key):
    images = torch.rand(2, 3, 8, 8)
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    torch.testing.assert_close(keyed(images[1]), keyed(images)[1])


def test_a_protected_model_given_one_image_says_to_add_the_batch_dimension(any_key):
    # The (C, H, W) result of KeyedInput went on to the base model, which
    # failed with its own untyped error ("expected 4D input").
    model = wrap_model(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()), any_key, mean=MEAN, std=STD)
    image = torch.rand(3, 8, 8)
    with pytest.raises(BlockSizeError, match=r"batch of images \(B, C, H, W\).*unsqueeze\(0\)"):
        model(image)
    assert model(image.unsqueeze(0)).shape[0] == 1


def test_assigning_another_key_compiles_its_plan(any_key):
    # The plan cached for this size belongs to the old key; a ProtectedModel
    # whose key is swapped must never transform with it (save_protected would
    # record the new key's fingerprint).
    keyed = KeyedInput(any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    images = torch.rand(2, 3, 8, 8)
    keyed(images)
    other = SecretKey.generate_like(any_key)
    keyed.key = other
    torch.testing.assert_close(keyed(images), _normalize(apply_transform(images, other)))
    with pytest.raises(ConfigurationError, match="channels"):
        keyed.key = SecretKey.generate(block_size=4, channels=1)
    with pytest.raises(BlockSizeError):
        keyed.key = SecretKey.generate(block_size=3)
    with pytest.raises(TypeError):
        keyed.key = b"\x00" * 32
    assert keyed.key is other


def test_assigning_mean_or_std_compiles_the_plan_again(any_key):
    keyed = KeyedInput(any_key, mean=0.5, std=0.5, input_size=(3, 8, 8))
    images = torch.rand(2, 3, 8, 8)
    keyed(images)
    keyed.mean, keyed.std = MEAN, STD
    torch.testing.assert_close(keyed(images), _normalize(apply_transform(images, any_key)))
    with pytest.raises(ConfigurationError, match="std must be positive"):
        keyed.std = 0.0
    assert keyed.std == STD


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_output_keeps_the_float_dtype_whatever_came_first(any_key, dtype):
    # The plan's constants stay float32: a first call in half precision no
    # longer leaves them rounded for every later float32 call.
    images = torch.rand(2, 3, 8, 8)
    low_first = KeyedInput(any_key, mean=MEAN, std=STD)
    full_first = KeyedInput(any_key, mean=MEAN, std=STD)
    a_low, a_full = low_first(images.to(dtype)), low_first(images)
    b_full, b_low = full_first(images), full_first(images.to(dtype))
    assert a_low.dtype == b_low.dtype == dtype and a_full.dtype == b_full.dtype == torch.float32
    assert torch.equal(a_full, b_full) and torch.equal(a_low, b_low)
    torch.testing.assert_close(a_full, _normalize(apply_transform(images, any_key)))
    later = KeyedInput(any_key, mean=MEAN, std=STD)
    with torch.inference_mode():  # a cast made there still serves a call that needs gradients
        later(images.to(dtype))
    if "ffx" not in any_key.scheme:  # the 8-bit lookup has no gradient to pass
        wanting = images.to(dtype).requires_grad_()
        later(wanting).float().sum().backward()
        assert wanting.grad is not None


def test_keyed_input_recompiles_for_a_new_size(any_key):
    keyed = KeyedInput(any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    images = torch.rand(1, 3, 12, 4)
    torch.testing.assert_close(keyed(images), _normalize(apply_transform(images, any_key)))


def test_keyed_input_passes_gradients_to_images():
    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
    images = torch.rand(1, 3, 8, 8, requires_grad=True)
    KeyedInput(key, mean=0.5, std=0.5)(images).sum().backward()
    flips = sum(key.np_mask())
    assert images.grad.sum().item() == pytest.approx(4 * (48 - 2 * flips) / 0.5)


@pytest.mark.parametrize("uint8", [False, True])
def test_keyed_input_runs_under_vmap(any_key, uint8):
    # torch.func.vmap: no host read of the values (the range check) and no
    # writes into a preallocated output inside the transform.
    images = torch.rand(6, 3, 8, 12)
    if uint8:
        images = (images * 255).round().to(torch.uint8)
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    torch.testing.assert_close(torch.func.vmap(keyed)(images), keyed(images))


@pytest.mark.parametrize("scheme", ["shuffle+np+ffx", "shuffle+shift"])
def test_a_lookup_scheme_says_no_gradient_reaches_images_that_want_one(scheme):
    # keyed(x).requires_grad was False and x.grad None, silently: saliency
    # or attack code reading x.grad failed on None with no hint why.
    from kp_plugin.errors import InputGradientWarning

    keyed = KeyedInput(SecretKey.generate(block_size=2, scheme=scheme), mean=MEAN, std=STD)
    images = torch.rand(1, 3, 4, 4, requires_grad=True)
    with pytest.warns(InputGradientWarning, match="no gradient"):
        keyed(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        keyed(images.detach())
        with torch.no_grad():
            keyed(images)
        KeyedInput(SecretKey.generate(block_size=2, scheme="shuffle+np"), mean=MEAN, std=STD)(images)


def test_per_sample_gradients_with_torch_func(tiny_cnn, any_key):
    # The torch.func recipe for per-sample gradients (DP-SGD, influence):
    # vmap(grad(loss)) over functional_call of the protected model.
    from torch.func import functional_call, grad, vmap

    model = wrap_model(tiny_cnn.eval(), any_key, mean=MEAN, std=STD)
    images, labels = torch.rand(5, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}

    def loss(params, buffers, image, label):
        logits = functional_call(model, (params, buffers), (image.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(logits, label.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, None, 0, 0))(params, buffers, images, labels)
    for i in range(len(images)):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(images[i:i + 1]), labels[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-5, atol=1e-6)


def test_keyed_input_rejects_normalized_images(any_key):
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    with pytest.raises(InputRangeError):
        keyed(_normalize(torch.rand(1, 3, 8, 8)))
    KeyedInput(any_key, mean=MEAN, std=STD, check_range=False)(_normalize(torch.rand(1, 3, 8, 8)))


def test_bicubic_overshoot_of_a_real_photo_is_accepted_but_normalizing_it_is_not(any_key):
    # Resizing a float photo with bicubic interpolation overshoots [0, 1]
    # (here by about 0.1); the range check was 0.01 wide and failed such a
    # correct pipeline. The same photo normalized is still refused.
    from skimage import data

    photo = torch.from_numpy(data.coffee()).permute(2, 0, 1)[None].float() / 255
    resized = torch.nn.functional.interpolate(photo, size=(224, 224), mode="bicubic", antialias=False)
    assert resized.min() < -0.05 or resized.max() > 1.05
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    torch.testing.assert_close(keyed(resized), _normalize(apply_transform(resized, any_key, check_range=False)))
    for mean, std in ((MEAN, STD), (0.5, 0.5)):
        with pytest.raises(InputRangeError, match="before normalization"):
            keyed((resized - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1))


def test_keyed_input_rejects_bad_input(any_key):
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    with pytest.raises(InputDtypeError):
        keyed(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
    with pytest.raises(BlockSizeError, match="9x8"):
        keyed(torch.rand(1, 3, 9, 8))
    with pytest.raises(BlockSizeError, match="channels"):
        keyed(torch.rand(1, 1, 8, 8))


def test_keyed_input_takes_an_empty_batch(any_key):
    assert KeyedInput(any_key, mean=MEAN, std=STD)(torch.rand(0, 3, 8, 8)).shape == (0, 3, 8, 8)


def test_keyed_input_rejects_mean_of_the_wrong_length(any_key):
    with pytest.raises(ConfigurationError, match="2 values"):
        KeyedInput(any_key, mean=(0.5, 0.5), std=STD)
    with pytest.raises(ConfigurationError, match="positive"):
        KeyedInput(any_key, mean=MEAN, std=(0.2, 0.0, 0.2))


# ----------------------------------------------------------------------------
# Output buffers: reused only when nobody can see it
# ----------------------------------------------------------------------------

LARGE = (4, 3, 320, 320)  # 4.7 MiB of float32: over REUSE_MIN_BYTES, and two pieces of CHUNK_BYTES


def _large_keyed(scheme: str = "shuffle+np+scramble") -> KeyedInput:
    key = SecretKey(bytes(range(7, 39)), block_size=16, scheme=scheme)
    return KeyedInput(key, mean=MEAN, std=STD)


@pytest.mark.parametrize("scheme", ["shuffle+np+scramble", "shuffle+np+shift+ffx"])
@pytest.mark.parametrize("uint8", [False, True])
def test_outputs_the_caller_holds_are_never_overwritten(uint8, scheme):
    keyed = _large_keyed(scheme)
    inputs = [torch.rand(LARGE, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    if uint8:
        inputs = [(x * 255).round().to(torch.uint8) for x in inputs]
    expected = [_normalize(apply_transform(x, keyed.key).float() / (255 if uint8 else 1)) for x in inputs]
    held = [keyed(x) for x in inputs]  # every earlier output alive during each call
    for out, want in zip(held, expected):
        torch.testing.assert_close(out, want)
    assert len({out.data_ptr() for out in held}) == len(held)


@pytest.mark.parametrize("scheme", ["shuffle+np+scramble", "shuffle+np+shift+ffx"])
def test_a_dropped_output_buffer_is_reused(scheme):
    keyed = _large_keyed(scheme)
    x = torch.rand(LARGE)
    first = keyed(x).data_ptr()  # dropped at once, as inside model(x)
    assert keyed(x).data_ptr() == first
    y = None
    pointers = []
    for _ in range(4):  # y = keyed(x): the old y is alive during the call
        y = keyed(x)
        pointers.append(y.data_ptr())
    assert len(set(pointers)) == 2
    torch.testing.assert_close(y, _normalize(apply_transform(x, keyed.key)))


@pytest.mark.parametrize("hold", ["untyped_storage", "storage"])
def test_output_held_through_its_storage_object_is_not_reused(hold):
    # A Python storage object adds no C++ reference to the storage (torch
    # keeps one object for it), so the use count said "dropped".
    keyed = _large_keyed()
    x, other = torch.rand(LARGE), torch.rand(LARGE)
    expected = _normalize(apply_transform(x, keyed.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        storage = getattr(keyed(x), hold)()
    for _ in range(3):
        keyed(other)
    held = torch.empty(0).set_(storage if hold == "untyped_storage" else storage._untyped_storage)
    torch.testing.assert_close(held.view(LARGE), expected)


def test_an_output_freed_with_resize_is_not_handed_out_again():
    # FSDP / activation offloading free a tensor's memory with
    # untyped_storage().resize_(0); the pool kept handing out the 0-byte buffer.
    keyed = _large_keyed()
    x = torch.rand(LARGE)
    keyed(x).untyped_storage().resize_(0)
    for _ in range(3):
        torch.testing.assert_close(keyed(x), _normalize(apply_transform(x, keyed.key)))


def test_output_held_by_numpy_or_autograd_is_not_reused():
    keyed = _large_keyed()
    x = torch.rand(LARGE)
    array = keyed(x).numpy()  # the tensor object is gone; the array still shares its memory
    copy = array.copy()
    conv = torch.nn.Conv2d(3, 2, 3)
    loss = conv(keyed(x)).sum()  # conv saved its input for backward
    for _ in range(3):
        keyed(torch.rand(LARGE))
    assert (array == copy).all()
    loss.backward()  # the saved input is intact: backward matches a fresh computation
    reference = torch.nn.Conv2d(3, 2, 3)
    reference.load_state_dict(conv.state_dict())
    reference(_normalize(apply_transform(x, keyed.key))).sum().backward()
    torch.testing.assert_close(conv.weight.grad, reference.weight.grad)


class _KeyedCollate:
    """A collate_fn holding a KeyedInput (a spawned worker unpickles it)."""

    def __init__(self, keyed: KeyedInput) -> None:
        self.keyed = keyed

    def __call__(self, batch):
        return self.keyed(torch.stack([images for (images,) in batch]))


def test_dataloader_workers_started_by_spawn_get_the_keyed_input():
    # Spawn (the macOS / Windows default) pickles the collate_fn, key and all,
    # through multiprocessing's pipe; the same batches come back.
    keyed = KeyedInput(SecretKey(bytes(range(7, 39)), block_size=4), mean=MEAN, std=STD)
    dataset = torch.utils.data.TensorDataset(torch.rand(8, 3, 8, 8))
    expected = [keyed(images) for (images,) in torch.utils.data.DataLoader(dataset, batch_size=4)]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=_KeyedCollate(keyed), num_workers=1,
                                         multiprocessing_context="spawn")
    got = list(loader)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_inference_mode_and_normal_calls_alternate():
    keyed = _large_keyed()
    x = torch.rand(LARGE)
    for _ in range(2):
        with torch.inference_mode():
            assert keyed(x).is_inference()
        out = keyed(x)  # an inference-mode buffer would be read-only here
        assert not out.is_inference()
        torch.testing.assert_close(out, _normalize(apply_transform(x, keyed.key)))


def test_threads_sharing_one_keyed_input_get_their_own_outputs():
    from concurrent.futures import ThreadPoolExecutor

    keyed = _large_keyed()  # not compiled yet: the threads' first calls race to compile it
    shapes = [LARGE, (4, 3, 160, 160)] * 2  # two sizes: each call may find the other size compiled
    inputs = [torch.rand(shape, generator=torch.Generator().manual_seed(i)) for i, shape in enumerate(shapes)]
    expected = [_normalize(apply_transform(x, keyed.key)) for x in inputs]

    def work(i: int) -> bool:
        for _ in range(10):
            out = keyed(inputs[i])
            if not torch.allclose(out, expected[i], atol=1e-5, rtol=1e-5):
                return False
        return True

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_copies_and_moves_do_not_carry_the_output_buffers():
    import copy

    keyed = _large_keyed()
    keyed(torch.rand(LARGE))
    assert keyed._spare and copy.deepcopy(keyed)._spare == []
    assert keyed.double()._spare == []  # a buffer of the old dtype would only hold memory
    assert keyed(torch.rand(LARGE, dtype=torch.float64)).dtype == torch.float64


# ----------------------------------------------------------------------------
# Nothing derived from the key is in the state
# ----------------------------------------------------------------------------


def _serialized(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    return buffer.getvalue()


def test_state_dict_holds_only_the_base_weights(tiny_cnn, any_key):
    expected = {f"model.{name}" for name in tiny_cnn.state_dict()}
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    assert set(model.state_dict()) == expected
    assert model.keyed.state_dict() == {}
    assert {name for name, _ in model.keyed.named_buffers()} >= {"source_index"}


def test_the_base_models_own_state_dict_loads_into_the_protected_model(any_key):
    # Only the wrapper's names (model.conv1.weight) loaded: a plain checkpoint
    # of the base, or base.state_dict(), failed with every key missing.
    import timm

    key = SecretKey.generate(block_size=8, scheme=any_key.scheme)
    torch.manual_seed(0)
    trained = timm.create_model("resnet18", num_classes=3).eval()
    trained.bn1.running_mean.uniform_()  # a buffer too
    protected = wrap_model(timm.create_model("resnet18", num_classes=3), key)
    protected.load_state_dict(trained.state_dict())
    loaded = protected.unwrap().state_dict().values()
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), loaded))
    again = wrap_model(timm.create_model("resnet18", num_classes=3), key)
    again.load_state_dict(protected.state_dict())  # the wrapper's own names, as before
    assert torch.equal(again.unwrap().bn1.running_mean, trained.bn1.running_mean)
    nested = torch.nn.Sequential(wrap_model(timm.create_model("resnet18", num_classes=3), key))  # as DDP's module.
    nested.load_state_dict({f"0.{name}": value for name, value in trained.state_dict().items()})
    assert torch.equal(nested[0].unwrap().conv1.weight, trained.conv1.weight)
    with pytest.raises(RuntimeError, match="Missing key"):
        again.load_state_dict({"conv9.weight": torch.zeros(1)})


def test_state_dict_bytes_contain_no_key_derived_tensor(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    data = _serialized(model)
    for name, buffer in model.keyed.named_buffers():
        assert buffer.numpy().tobytes()[:256] not in data, name
    for form in any_key.secret_forms():
        assert form not in data


def test_torch_save_of_the_whole_model_is_refused(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(model, io.BytesIO())


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_refused_pickle_writes_none_of_the_plan_to_the_file(tmp_path, any_key, protocol):
    # pickle.dump streams into the file as it goes: it wrote the plan's
    # buffers (the key's gather index) before reaching the key, which refuses.
    model = wrap_model(torch.nn.Conv2d(3, 2, 3), any_key, mean=MEAN, std=STD, input_size=(3, 64, 64))
    big_first = {"weights": torch.rand(300_000), "model": model}  # enough before it to flush pickle's frames
    with open(tmp_path / "model.pkl", "wb") as fh, pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dump(big_first, fh, protocol=protocol)
    data = (tmp_path / "model.pkl").read_bytes()
    for name, buffer in model.keyed.named_buffers():
        assert buffer.numpy().tobytes()[:64] not in data, name
    assert not any(form in data for form in any_key.secret_forms())


@pytest.mark.parametrize("convert, dtype", [("half", torch.float16), ("bfloat16", torch.bfloat16),
                                            ("double", torch.float64)])
def test_a_dtype_given_before_the_first_call_holds_for_uint8_images(any_key, convert, dtype):
    # With no plan compiled yet there were no buffers to convert, and the
    # first call compiled in float32: uint8 images came out float32.
    keyed = getattr(KeyedInput(any_key, mean=MEAN, std=STD), convert)()
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = keyed(images)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), KeyedInput(any_key, mean=MEAN, std=STD)(images), rtol=0.02, atol=0.02)
    assert keyed.float()(images).dtype == torch.float32


def test_a_call_without_images_is_an_input_dtype_error(tiny_cnn, any_key):
    # It was a plain TypeError; it is one still, and the library's own.
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD)
    with pytest.raises(InputDtypeError, match="pixel_values="):
        model()
    with pytest.raises(TypeError, match="pixel_values="):
        model(pixel_values=None)


def test_buffers_follow_to(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8)).double()
    floating = [b for b in model.keyed.buffers() if b.is_floating_point()]
    assert floating and all(b.dtype == torch.float64 for b in floating)
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    assert model(images).dtype == torch.float64


def test_a_plan_first_made_in_inference_mode_still_passes_gradients(shuffle_np_key):
    keyed = KeyedInput(shuffle_np_key, mean=MEAN, std=STD)  # an affine scheme: differentiable
    images = torch.rand(2, 3, 8, 8)
    with torch.inference_mode():  # e.g. an evaluation before training in the same process
        keyed(images)
    assert not keyed.source_index.is_inference()
    images.requires_grad_()
    keyed(images).sum().backward()
    assert images.grad is not None


def test_to_empty_rebuilds_the_plan(any_key):
    # to_empty() (meta-device initialization, FSDP) leaves every buffer
    # uninitialized; the plan is key data, so it is rebuilt, not left garbage.
    keyed = KeyedInput(any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    images = torch.rand(2, 3, 8, 8)
    expected = _normalize(apply_transform(images, any_key))
    keyed.to_empty(device="cpu")
    torch.testing.assert_close(keyed(images), expected)


def test_a_protected_model_built_on_the_meta_device_works_after_to_empty(tiny_cnn, any_key):
    import copy

    with torch.device("meta"):  # as accelerate's init_empty_weights / FSDP meta init
        model = wrap_model(copy.deepcopy(tiny_cnn).to("meta"), any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.unwrap().load_state_dict(tiny_cnn.state_dict())
    model.eval()
    tiny_cnn.eval()
    images = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(images), tiny_cnn(_normalize(apply_transform(images, any_key))))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_buffers_follow_to_cuda(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8)).cuda()
    assert all(b.is_cuda for b in model.keyed.buffers())
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(images.cuda()).cpu(), model.cpu()(images), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_autocast_on_cuda(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD).eval()
    images = torch.rand(2, 3, 8, 8)
    reference = model(images)
    model.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(images.cuda())
    torch.testing.assert_close(out.float().cpu(), reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_gets_half_input(tiny_cnn, any_key, dtype):
    images = torch.rand(2, 3, 8, 8)
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD).eval()
    reference = model(images)
    model.to(dtype)
    for batch in (images, images.to(dtype)):
        out = model(batch)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------
# ProtectedModel and wrap_model
# ----------------------------------------------------------------------------


def test_protected_model_is_model_after_keyed_input(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD).eval()
    images = torch.rand(3, 3, 8, 8)
    torch.testing.assert_close(model(images), tiny_cnn(_normalize(apply_transform(images, any_key))))


def test_another_key_gives_other_outputs(tiny_cnn, any_key):
    images = torch.rand(3, 3, 8, 8)
    mine = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD).eval()(images)
    theirs = wrap_model(tiny_cnn, SecretKey.generate_like(any_key), mean=MEAN, std=STD).eval()(images)
    assert not torch.allclose(mine, theirs)


def test_pixel_values_keyword_is_transformed(tiny_cnn, any_key):
    class KeywordModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values, scale=1.0):
            return self.inner(pixel_values) * scale

    model = wrap_model(KeywordModel(tiny_cnn), any_key, mean=MEAN, std=STD).eval()
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(pixel_values=images, scale=2.0), 2 * model(images))


def test_attribute_access_falls_through_to_the_base(tiny_timm_model, any_key):
    model = wrap_model(tiny_timm_model, any_key)
    assert model.num_classes == 3
    assert model.get_classifier() is tiny_timm_model.get_classifier()
    assert model.pretrained_cfg is tiny_timm_model.pretrained_cfg
    with pytest.raises(AttributeError):
        model.no_such_attribute


def test_unwrap_returns_the_base(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD)
    assert model.unwrap() is tiny_cnn and unwrap(model) is tiny_cnn and unwrap(tiny_cnn) is tiny_cnn
    assert model.key is any_key


def test_wrapping_twice_is_refused(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD)
    with pytest.raises(ConfigurationError, match="already protected"):
        wrap_model(model, any_key, mean=MEAN, std=STD)
    # Also where the protected model hides inside a wrapper or a container:
    # the images would be keyed twice.
    nn = torch.nn
    for outer in (torch.compile(model), nn.DataParallel(model), nn.Sequential(model, nn.Identity()),
                  nn.Sequential(KeyedInput(any_key, mean=MEAN, std=STD), tiny_cnn)):
        with pytest.raises(ConfigurationError, match="already contains a keyed transform.*unwrap"):
            wrap_model(outer, any_key, mean=MEAN, std=STD)


def test_mean_std_and_size_come_from_timm_pretrained_cfg(any_key):
    timm = pytest.importorskip("timm")
    base = timm.create_model("resnet18", num_classes=3)
    model = wrap_model(base, any_key)
    assert model.keyed.mean == pytest.approx(base.pretrained_cfg["mean"])
    assert model.keyed.std == pytest.approx(base.pretrained_cfg["std"])
    assert model.keyed.input_size == (3, 224, 224)


def test_explicit_mean_std_override_pretrained_cfg(tiny_timm_model, any_key):
    model = wrap_model(tiny_timm_model, any_key, mean=MEAN, std=STD)
    assert model.keyed.mean == pytest.approx(MEAN)


def test_mean_std_are_required_without_a_config(tiny_cnn, any_key):
    with pytest.raises(ConfigurationError, match="mean=") as info:
        wrap_model(tiny_cnn, any_key)
    assert "Sequential" in str(info.value)


def test_native_size_that_does_not_fit_the_block_size_is_not_compiled(tiny_timm_model):
    key = SecretKey(bytes(range(32)), block_size=7)  # test_resnet's native size is 160
    model = wrap_model(tiny_timm_model, key)
    assert model.keyed.input_size is None
    with pytest.raises(BlockSizeError, match="160x160"):
        model(torch.rand(1, 3, 160, 160))
    assert model(torch.rand(1, 3, 161, 161)).shape == (1, 3)


def test_explicit_size_that_does_not_fit_is_an_error(tiny_cnn, any_key):
    with pytest.raises(BlockSizeError):
        wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 10, 8))


def test_channel_count_must_match_the_key(tiny_cnn):
    key = SecretKey(bytes(range(32)), block_size=4, channels=1)
    with pytest.raises(ConfigurationError, match="channels"):
        wrap_model(tiny_cnn, key, mean=MEAN, std=STD, input_size=(3, 8, 8))


def test_an_input_size_with_the_keys_channels_does_not_hide_the_models_in_chans():
    # input_size=(3, 32, 32) matched the 3-channel key, so a model made for
    # 1-channel images was wrapped and failed in its first convolution.
    timm = pytest.importorskip("timm")
    key = SecretKey(bytes(range(32)), block_size=8)
    with pytest.raises(ConfigurationError, match="takes 1-channel images but the key is for 3"):
        wrap_model(timm.create_model("test_resnet", in_chans=1, num_classes=3), key, input_size=(3, 32, 32))


@pytest.mark.parametrize("how", ["wrap_model", "adapt_patch_embedding"])
def test_a_vit_made_for_another_size_is_wrapped_for_that_size_not_timms_default(how):
    # Its pretrained_cfg still says 224, which ViT refuses: that size was
    # recorded, saved and exported until the model had been called.
    timm = pytest.importorskip("timm")
    from kp_plugin.adapt import adapt_patch_embedding

    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=3,
                             num_classes=3)
    key = SecretKey(bytes(range(32)), block_size=8, scheme="shuffle+np")
    model = wrap_model(base, key) if how == "wrap_model" else adapt_patch_embedding(base, key)
    assert model.keyed.input_size == (3, 32, 32)
    dynamic = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1,
                                num_heads=3, dynamic_img_size=True)
    assert wrap_model(dynamic, key).keyed.input_size == (3, 224, 224)  # any size fits: timm's default stands


# ----------------------------------------------------------------------------
# torch.compile and DDP
# ----------------------------------------------------------------------------


def test_torch_compile_traces_the_keyed_input(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8)).eval()
    images = torch.rand(2, 3, 8, 8)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(images), model(images))


def test_fullgraph_compile_of_an_uncompiled_size_says_how_to_fix_it(any_key):
    keyed = KeyedInput(any_key, mean=MEAN, std=STD)
    images = torch.rand(2, 3, 8, 8)
    with pytest.raises(Exception, match="input_size"):
        torch.compile(keyed, backend="aot_eager", fullgraph=True)(images)
    torch._dynamo.reset()
    graph_breaking = torch.compile(keyed, backend="aot_eager")  # without fullgraph it compiles the plan eagerly
    torch.testing.assert_close(graph_breaking(images), keyed(images))
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(keyed, backend="aot_eager", fullgraph=True)(images), keyed(images))


@pytest.mark.slow
def test_torch_compile_with_inductor(tiny_cnn, any_key):
    model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8)).eval()
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(torch.compile(model)(images), model(images), rtol=1e-4, atol=1e-4)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_trains_the_protected_model(tiny_cnn, any_key):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = wrap_model(tiny_cnn, any_key, mean=MEAN, std=STD, input_size=(3, 8, 8))
        ddp = DistributedDataParallel(model)
        images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
        torch.testing.assert_close(ddp(images), model(images))
        before = [p.detach().clone() for p in tiny_cnn.parameters()]
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        torch.nn.functional.cross_entropy(ddp(images), labels).backward()
        optimizer.step()
        assert any(not torch.equal(a, b) for a, b in zip(before, tiny_cnn.parameters()))
        assert set(ddp.module.state_dict()) == {f"model.{n}" for n in tiny_cnn.state_dict()}
    finally:
        dist.destroy_process_group()


def _ddp_worker(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must sync them
        base = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
        base(torch.zeros(1, 3, 8, 8))
        key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
        ddp = DistributedDataParallel(wrap_model(base, key, mean=0.5, std=0.5, input_size=(3, 8, 8)))
        torch.manual_seed(100 + rank)
        loss = ddp(torch.rand(2, 3, 8, 8)).square().mean()
        loss.backward()
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        results[rank] = torch.cat([p.detach().flatten() for p in base.parameters()])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_stay_in_sync():
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_ddp_worker, args=(_free_port(), results), nprocs=2)
    assert torch.equal(results[0], results[1])


def test_eager_only_falls_back_where_torch_compiler_disable_takes_no_reason(monkeypatch):
    from kp_plugin.module import _eager_only

    def old_disable(fn=None, recursive=True):  # torch 2.2's signature
        return fn

    monkeypatch.setattr(torch.compiler, "disable", old_disable)
    assert _eager_only("why") is old_disable
