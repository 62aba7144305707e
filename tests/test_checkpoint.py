"""Protected checkpoints: round trip, the right key only, clear errors for
damaged files, and no key material in anything written."""

from __future__ import annotations

import base64
import copy
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

from kp_plugin import (
    CheckpointError,
    ConfigurationError,
    KeyFileError,
    KeyMismatchError,
    KeyLeakError,
    ProtectionConfig,
    SecretKey,
    load_protected,
    save_protected,
    wrap_model,
)
from kp_plugin.checkpoint import PROTECTION_FILE, find_key_material, weights_digest
from kp_plugin.errors import UnsignedCheckpointWarning

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _fresh_cnn() -> torch.nn.Module:
    torch.manual_seed(123)  # other weights than the saved model's
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


@pytest.fixture
def key() -> SecretKey:
    return SecretKey(bytes(range(50, 82)), block_size=4, scheme="shuffle+np+shift")


@pytest.fixture
def saved(tmp_path, tiny_cnn, key):
    """A protected tiny CNN (with non-trivial BatchNorm statistics) saved to disk."""
    model = wrap_model(tiny_cnn, key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    model.train()(torch.rand(8, 3, 8, 8))  # move the running statistics
    model.eval()
    directory = save_protected(model, tmp_path / "ckpt", metadata={"dataset": "digits"})
    return model, directory


def test_round_trip_gives_identical_logits(saved, key):
    model, directory = saved
    images = torch.rand(4, 3, 8, 8)
    loaded = load_protected(directory, _fresh_cnn(), key).eval()
    assert torch.equal(loaded(images), model(images))


def test_checkpoint_holds_the_expected_files(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["model.safetensors", "protection.json"]


def test_weights_keep_the_base_models_own_names(saved, tiny_cnn):
    from safetensors import safe_open

    _, directory = saved
    with safe_open(str(directory / "model.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == set(tiny_cnn.state_dict())
        meta = fh.metadata()
    assert meta["format"] == "pt"
    assert meta["kp_fingerprint"] == SecretKey(bytes(range(50, 82))).fingerprint


def test_protection_json_records_public_settings(saved, key):
    _, directory = saved
    config = ProtectionConfig.load(directory)
    assert (config.scheme, config.block_size, config.channels) == (list(key.scheme), 4, 3)
    assert config.fingerprint == key.fingerprint
    assert config.mean == pytest.approx(MEAN) and config.input_size == [3, 8, 8]
    assert config.extra == {"dataset": "digits"}
    text = (directory / "protection.json").read_text()
    assert json.loads(text) == json.loads(json.dumps(json.loads(text), sort_keys=True))
    assert list(json.loads(text)) == sorted(json.loads(text))


def test_another_key_is_rejected_on_load(saved, key):
    _, directory = saved
    with pytest.raises(KeyMismatchError, match="another key") as info:
        load_protected(directory, _fresh_cnn(), SecretKey.generate_like(key))
    assert key.fingerprint in str(info.value)


def test_same_material_with_another_scheme_is_rejected(saved, key):
    _, directory = saved
    with pytest.raises(KeyMismatchError, match="scheme"):
        load_protected(directory, _fresh_cnn(), key.replace(scheme="shuffle"))


def test_allow_wrong_key_loads_with_the_wrong_key(saved, key):
    model, directory = saved
    wrong = SecretKey.generate_like(key)
    loaded = load_protected(directory, _fresh_cnn(), wrong, allow_wrong_key=True).eval()
    assert loaded.key is wrong
    images = torch.rand(4, 3, 8, 8)
    assert torch.equal(loaded.unwrap()(torch.zeros(1, 3, 8, 8)), model.unwrap()(torch.zeros(1, 3, 8, 8)))
    assert not torch.allclose(loaded(images), model(images))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_cuda(saved, key):
    model, directory = saved
    loaded = load_protected(directory, _fresh_cnn(), key, device="cuda").eval()
    assert all(p.is_cuda for p in loaded.parameters())
    images = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(loaded(images.cuda()).cpu(), model(images), rtol=1e-4, atol=1e-4)


def test_load_into_a_protected_model_uses_its_base(saved, key):
    model, directory = saved
    target = wrap_model(_fresh_cnn(), key, mean=MEAN, std=STD)
    loaded = load_protected(directory, target, key).eval()
    images = torch.rand(2, 3, 8, 8)
    assert torch.equal(loaded(images), model(images))


def test_a_model_built_on_the_meta_device_loads(saved, key, recwarn):
    # Meta-device construction (no memory until the weights arrive) is how
    # large models are built; the weights used to be dropped with a warning.
    model, directory = saved
    with torch.device("meta"):
        base = _fresh_cnn()
    loaded = load_protected(directory, base, key).eval()
    images = torch.rand(4, 3, 8, 8)
    assert torch.equal(loaded(images), model(images))
    assert not [w for w in recwarn if "meta" in str(w.message)]


class _WithDerivedBuffer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _fresh_cnn()
        self.register_buffer("offsets", torch.arange(5.0), persistent=False)  # never in a checkpoint

    def forward(self, x):
        return self.body(x) + self.offsets


def test_a_meta_model_with_tensors_the_checkpoint_lacks_is_refused(tmp_path, key):
    model = wrap_model(_WithDerivedBuffer(), key, mean=MEAN, std=STD)
    directory = save_protected(model, tmp_path / "ckpt")
    with torch.device("meta"):
        base = _WithDerivedBuffer()
    with pytest.raises(CheckpointError, match="meta device.*offsets.*real device"):
        load_protected(directory, base, key)


def _edit_field(text: str, name: str, value) -> str:
    data = json.loads(text)
    data[name] = value
    return json.dumps(data)


def test_a_file_inside_the_checkpoint_is_named_as_such(saved, key):
    # load_protected("out/model.safetensors", ...) read the weights as JSON:
    # "'utf-8' codec can't decode byte ...".
    _, directory = saved
    with pytest.raises(CheckpointError, match="is a file; give the checkpoint folder"):
        load_protected(directory / "model.safetensors", _fresh_cnn(), key)
    # protection.json itself was read, then its weights were looked for as
    # out/protection.json/model.safetensors: "missing; the checkpoint is incomplete".
    with pytest.raises(CheckpointError, match="is a file; give the checkpoint folder"):
        load_protected(directory / "protection.json", _fresh_cnn(), key)


def test_bad_metadata_writes_nothing_over_an_existing_checkpoint(saved, key):
    # The weights and config.json were replaced before the metadata failed
    # to serialize, beside the old protection.json.
    model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    for metadata in ({"accuracy": torch.tensor(0.9)}, {"accuracy": float("nan")}):
        with pytest.raises(ConfigurationError, match="nothing was written"):
            save_protected(_retrained(model), directory, metadata=metadata)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


def test_key_material_in_metadata_is_refused_before_anything_is_written(tmp_path, saved, key):
    # protection.json was written (mode 0644, the key's hex in "extra") and
    # only then found by the scan.
    model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    for leak in (key._material.hex(), key.pixel_permutation()):
        with pytest.raises(KeyLeakError, match="nothing was written"):
            save_protected(model, directory, metadata={"note": leak})
        with pytest.raises(KeyLeakError, match="nothing was written"):
            save_protected(model, tmp_path / "fresh", metadata={"note": leak})
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert not (tmp_path / "fresh").exists()


def test_a_model_that_holds_the_key_is_refused_before_its_weights_reach_the_folder(tmp_path, saved, key):
    # The weights file was scanned after it was renamed in: save_protected
    # raised KeyLeakError, but a loadable checkpoint with the key's bytes in
    # a buffer stayed in the folder (and replaced the previous save).
    model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    leaky = copy.deepcopy(model)
    for leak in (torch.tensor(list(key._material), dtype=torch.uint8),
                 torch.tensor(key.pixel_permutation(), dtype=torch.int64)):
        leaky.unwrap().register_buffer("stored_key", leak)
        for target in (directory, tmp_path / "fresh"):
            with pytest.raises(KeyLeakError, match="nothing was written") as info:
                save_protected(leaky, target)
            assert "model.safetensors" in str(info.value) and key._material.hex() not in str(info.value)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    assert list((tmp_path / "fresh").iterdir()) == []


def test_saving_onto_a_file_names_it(tmp_path, saved):
    model, _ = saved
    (tmp_path / "taken").write_text("mine")
    with pytest.raises(CheckpointError, match="is a file"):
        save_protected(model, tmp_path / "taken")
    assert (tmp_path / "taken").read_text() == "mine"


def _retrained(model):
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    return model


def test_a_compiled_base_is_saved_under_its_own_names(tmp_path, tiny_cnn, key):
    # wrap_model(torch.compile(base)) wrote "_orig_mod."-prefixed names that
    # no fresh model loads.
    from safetensors import safe_open

    compiled = wrap_model(torch.compile(tiny_cnn), key, mean=MEAN, std=STD).eval()
    save_protected(compiled, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert names == set(tiny_cnn.state_dict())
    loaded = load_protected(tmp_path, _fresh_cnn(), key).eval()
    for name, tensor in tiny_cnn.state_dict().items():
        torch.testing.assert_close(loaded.unwrap().state_dict()[name], tensor)


def test_a_checkpoint_that_does_not_fit_names_the_tensors_and_shapes(tmp_path, key):
    # Only torch's headline ("Error(s) in loading state_dict for ResNet:")
    # was kept: not which tensor, nor which shapes.
    timm = pytest.importorskip("timm")
    save_protected(wrap_model(timm.create_model("test_resnet", num_classes=5), key), tmp_path)
    shapes = r"size mismatch for fc\.weight: \(\[5, 96\]\) from checkpoint.*\[10, 96\]"
    with pytest.raises(CheckpointError, match=shapes):
        load_protected(tmp_path, timm.create_model("test_resnet", num_classes=10), key)
    with pytest.raises(CheckpointError, match="and [0-9]+ more"):
        load_protected(tmp_path, timm.create_model("test_efficientnet", num_classes=5), key)


def test_load_with_another_architecture_is_a_checkpoint_error(saved, key):
    _, directory = saved
    with pytest.raises(CheckpointError, match="same architecture"):
        load_protected(directory, torch.nn.Sequential(torch.nn.Linear(3, 3)), key)


def test_missing_protection_json_names_the_file(saved, key):
    _, directory = saved
    (directory / "protection.json").unlink()
    with pytest.raises(CheckpointError, match="protection.json is missing"):
        load_protected(directory, _fresh_cnn(), key)


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],
    lambda text: "not json",
    lambda text: json.dumps({"format": "something-else"}),
    lambda text: text.replace('"format_version": 1', '"format_version": 7'),
    lambda text: text.replace('"format_version": 1', '"format_version": "1"'),
    lambda text: text.replace('"block_size": 4', '"block_size": "four"'),
    lambda text: text.replace('"channels": 3', '"channels": 0'),
    # hand edits that failed later (a TypeError from '%', NaN logits) or as a configuration error
    lambda text: _edit_field(text, "input_size", [3, "a", 8]),
    lambda text: _edit_field(text, "std", [0, 0, 0]),
    lambda text: _edit_field(text, "mean", [float("nan")] * 3),
])
def test_corrupt_protection_json_names_the_file(saved, key, damage):
    _, directory = saved
    path = directory / "protection.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(CheckpointError, match="protection.json"):
        load_protected(directory, _fresh_cnn(), key)


def test_a_checkpoint_folder_that_does_not_exist_is_named(tmp_path, key):
    with pytest.raises(CheckpointError, match="no-such-run does not exist"):
        load_protected(tmp_path / "no-such-run", _fresh_cnn(), key)


def test_missing_weights_name_the_file(saved, key):
    _, directory = saved
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_protected(directory, _fresh_cnn(), key)


@pytest.mark.parametrize("damage", [
    lambda data: data[: len(data) // 2],
    lambda data: b"garbage" * 10,
    lambda data: b"",
    lambda data: data[:8] + b"[" + data[9:],  # header JSON damaged
])
def test_corrupt_weights_name_the_file(saved, key, damage):
    _, directory = saved
    path = directory / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_protected(directory, _fresh_cnn(), key)


def test_weights_from_another_checkpoint_are_detected(saved, key, tmp_path, tiny_cnn):
    _, directory = saved
    other_key = SecretKey.generate_like(key)
    other = save_protected(wrap_model(_fresh_cnn(), other_key, mean=MEAN, std=STD), tmp_path / "other")
    (directory / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="different checkpoints"):
        load_protected(directory, _fresh_cnn(), key)


def test_save_refuses_an_unprotected_model(tiny_cnn, tmp_path):
    from kp_plugin import ConfigurationError

    with pytest.raises(ConfigurationError, match="wrap_model"):
        save_protected(tiny_cnn, tmp_path)


def test_timm_checkpoint_has_a_timm_config_and_round_trips(tiny_timm_model, key, tmp_path):
    timm = pytest.importorskip("timm")
    model = wrap_model(tiny_timm_model, key.replace(block_size=16)).eval()
    directory = save_protected(model, tmp_path / "timm")
    config = json.loads((directory / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3
    fresh = timm.create_model("test_resnet", num_classes=3)
    loaded = load_protected(directory, fresh, key.replace(block_size=16)).eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(images), model(images))


# ----------------------------------------------------------------------------
# The key never leaks
# ----------------------------------------------------------------------------


def _independent_needles(key: SecretKey) -> list:
    """The key's forms, built here rather than by the library under test."""
    material = key._material
    perm = key.pixel_permutation()
    return [
        material,
        material.hex().encode(),
        material.hex().upper().encode(),
        base64.b64encode(material),
        base64.b64encode(material).rstrip(b"="),
        base64.urlsafe_b64encode(material).rstrip(b"="),
        torch.tensor(perm, dtype=torch.int64).numpy().tobytes(),
        torch.tensor(perm, dtype=torch.int32).numpy().tobytes(),
        json.dumps(perm).encode(),
        ",".join(map(str, perm)).encode(),
    ]


@pytest.mark.parametrize("scheme", ["shuffle", "shuffle+np", "shuffle+np+shift+ffx+scramble"])
def test_no_written_file_contains_key_material(tmp_path, tiny_timm_model, scheme):
    key = SecretKey.generate(block_size=16, scheme=scheme)
    model = wrap_model(tiny_timm_model, key)
    model(torch.rand(1, 3, 32, 32))  # compile a plan for another size too
    directory = save_protected(model, tmp_path / "ckpt")
    written = [p for p in directory.rglob("*") if p.is_file()]
    assert {p.name for p in written} == {"model.safetensors", "protection.json", "config.json"}
    assert find_key_material(directory, key) == []
    needles = _independent_needles(key)
    for path in written:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, path.name


def test_the_scanner_finds_planted_key_material(tmp_path, key):
    (tmp_path / "clean.txt").write_text("nothing here")
    (tmp_path / "notes.txt").write_bytes(b"my key: " + key._material.hex().encode())
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "perm.bin").write_bytes(
        torch.tensor(key.pixel_permutation(), dtype=torch.int64).numpy().tobytes()
    )
    (tmp_path / "copy.key").write_text(SecretKey.generate().to_json())
    found = {p.relative_to(tmp_path).as_posix() for p in find_key_material(tmp_path, key)}
    assert found == {"notes.txt", "sub/perm.bin", "copy.key"}


def test_the_scanner_finds_another_keys_file_in_any_json_layout_or_escaped(tmp_path, key, monkeypatch):
    # Only two exact spellings of the format field were matched: a key file
    # dumped with other separators, or kept escaped inside another JSON file,
    # went up with `kp push --include` when no --key was given.
    import kp_plugin.checkpoint as checkpoint

    data = json.loads(SecretKey.generate().to_json())
    (tmp_path / "spaced.json").write_text(json.dumps(data, separators=(", ", " : ")))
    (tmp_path / "env.json").write_text(json.dumps({"env": {"KP_KEY": json.dumps(data)}}))
    (tmp_path / "twice.json").write_text(json.dumps({"a": json.dumps({"b": json.dumps(data)})}))
    (tmp_path / "repr.txt").write_text(repr(data))
    (tmp_path / "processor.json").write_text(json.dumps({"format": "kp-plugin-keyed-image-processor"}))
    monkeypatch.setattr(checkpoint, "_SCAN_CHUNK", 64)  # across read chunks too
    found = {p.name for p in find_key_material(tmp_path, key)}
    assert found == {"spaced.json", "env.json", "twice.json", "repr.txt"}


def test_the_scanner_finds_the_permutation_written_as_text_in_any_layout(tmp_path, key, monkeypatch):
    # Only two exact JSON spellings were matched: an indented dump, a CSV or
    # one number per line got through, to the Hub too.
    import kp_plugin.checkpoint as checkpoint

    perm = key.pixel_permutation()
    (tmp_path / "indented.json").write_text(json.dumps({"perm": perm}, indent=2))
    (tmp_path / "lines.txt").write_text("\n".join(map(str, perm)) + "\n")
    (tmp_path / "row.csv").write_text("step;" + ";".join(map(str, perm)))
    (tmp_path / "uint8.bin").write_bytes(bytes(perm))  # L = 48 fits a byte
    # one number per line inside a JSON string: the line breaks escaped as \\n
    (tmp_path / "escaped.json").write_text(json.dumps({"p": "\n".join(map(str, perm)), "q": "\t".join(map(str, perm))}))
    (tmp_path / "other.json").write_text(json.dumps(SecretKey.generate_like(key).pixel_permutation(), indent=2))
    (tmp_path / "digits_run_on.txt").write_text("1" + ", ".join(map(str, perm)))  # another number, not the permutation
    monkeypatch.setattr(checkpoint, "_SCAN_CHUNK", 100)  # matches across read chunks too
    found = {p.name for p in find_key_material(tmp_path, key)}
    assert found == {"indented.json", "lines.txt", "row.csv", "uint8.bin", "escaped.json"}


def test_the_scanner_finds_the_keys_base64_inside_longer_text_or_broken_over_lines(tmp_path, key, monkeypatch):
    # Only the key's own base64 was matched: encoded with a byte or two in
    # front (another alignment), or wrapped as PEM / MIME / base64 -w do, it
    # went up with `kp push --include`.
    import kp_plugin.checkpoint as checkpoint

    def lines(text: bytes, width: int, sep: bytes = b"\n") -> bytes:
        return sep.join(text[i:i + width] for i in range(0, len(text), width))

    m = key._material
    (tmp_path / "prefixed1.txt").write_bytes(base64.b64encode(b"a" + m + b"z"))
    (tmp_path / "prefixed2.txt").write_bytes(base64.urlsafe_b64encode(b"ab" + m))
    (tmp_path / "wrapped.pem").write_bytes(b"-----BEGIN-----\n" + lines(base64.b64encode(m), 20) + b"\n-----END-----")
    (tmp_path / "crlf.txt").write_bytes(lines(base64.b64encode(b"x" + m), 7, b"\r\n"))
    (tmp_path / "escaped.json").write_text(json.dumps({"k": lines(base64.b64encode(m), 16).decode()}))
    (tmp_path / "in_binary.bin").write_bytes(b"\0\1\2" + lines(base64.b64encode(b"ab" + m), 30) + b"\0")
    other = SecretKey.generate_like(key)._material
    (tmp_path / "other.pem").write_bytes(lines(base64.b64encode(b"a" + other), 20))
    (tmp_path / "noise.bin").write_bytes(os.urandom(300_000))
    monkeypatch.setattr(checkpoint, "_SCAN_CHUNK", 100)  # matches across read chunks too
    found = {p.name for p in find_key_material(tmp_path, key)}
    assert found == {"prefixed1.txt", "prefixed2.txt", "wrapped.pem", "crlf.txt", "escaped.json", "in_binary.bin"}


def test_degenerate_keys_do_not_raise_false_leak_alarms(tmp_path):
    # Block size 1 with one channel: the permutation is [0], which every
    # JSON file "contained", so save_protected always raised KeyLeakError.
    key = SecretKey.generate(block_size=1, channels=1)
    model = wrap_model(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1)), key, mean=0.5, std=0.5)
    save_protected(model, tmp_path)
    (tmp_path / "notes.json").write_text(json.dumps({"layers": [0], "sizes": [0, 1]}))
    assert find_key_material(tmp_path, key) == []
    (tmp_path / "leak.txt").write_text(key._material.hex())
    assert [p.name for p in find_key_material(tmp_path, key)] == ["leak.txt"]


def test_the_scanner_finds_material_across_its_read_chunks(tmp_path, key, monkeypatch):
    import kp_plugin.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "_SCAN_CHUNK", 1000)
    hexkey = key._material.hex().encode()
    (tmp_path / "big.bin").write_bytes(b"\0" * (1000 - 10) + hexkey + b"\0" * 3000)
    (tmp_path / "clean.bin").write_bytes(b"\0" * 5000)
    assert [p.name for p in find_key_material(tmp_path, key)] == ["big.bin"]


def test_save_protected_refuses_a_directory_holding_the_key(tmp_path, tiny_cnn, key):
    from kp_plugin import KeyLeakError

    key.save(tmp_path / "owner.key")
    model = wrap_model(tiny_cnn, key, mean=MEAN, std=STD)
    with pytest.raises(KeyLeakError, match="owner.key") as info:
        save_protected(model, tmp_path)
    assert key._material.hex() not in str(info.value)


def test_allow_wrong_key_with_another_block_size_still_loads(saved, key):
    _, directory = saved
    other = SecretKey.generate(block_size=3, scheme=key.scheme)
    loaded = load_protected(directory, _fresh_cnn(), other, allow_wrong_key=True)
    assert loaded(torch.rand(1, 3, 9, 9)).shape == (1, 5)


def test_a_compiled_or_data_parallel_model_saves_as_its_protected_model(tmp_path):
    timm = pytest.importorskip("timm")
    from kp_plugin.module import protected_model_of, unwrap

    key = SecretKey.generate(block_size=4)
    model = wrap_model(timm.create_model("test_resnet", num_classes=3), key, input_size=(3, 16, 16)).eval()
    compiled = torch.compile(model)  # what a training script often holds; never called here
    parallel = torch.nn.DataParallel(model)
    model.cpu()  # with one GPU, DataParallel moved the model onto it
    for wrapper in (compiled, parallel):
        assert protected_model_of(wrapper) is model and unwrap(wrapper) is model.unwrap()
    assert protected_model_of(torch.nn.Linear(2, 2)) is None

    save_protected(compiled, tmp_path / "a")
    save_protected(model, tmp_path / "b")
    from safetensors.torch import load_file

    assert (tmp_path / "a" / "protection.json").read_bytes() == (tmp_path / "b" / "protection.json").read_bytes()
    saved_a, saved_b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert saved_a.keys() == saved_b.keys() and all(torch.equal(saved_a[k], saved_b[k]) for k in saved_a)
    loaded = load_protected(tmp_path / "a", timm.create_model("test_resnet", num_classes=3), key).eval()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_a_device_that_is_not_here_is_named_not_blamed_on_the_checkpoint(saved, tiny_cnn, key):
    # A typo used to read as "corrupt or not a safetensors file", a missing
    # GPU as "the weights do not fit" the model.
    _, directory = saved
    with pytest.raises(ConfigurationError, match="'cdua' is not a torch device"):
        load_protected(directory, tiny_cnn, key, device="cdua")
    if torch.cuda.is_available():
        with pytest.raises(ConfigurationError, match="cuda:99: this machine has"):
            load_protected(directory, tiny_cnn, key, device="cuda:99")
    else:
        with pytest.raises(ConfigurationError, match="asks for a GPU but torch sees none"):
            load_protected(directory, tiny_cnn, key, device="cuda")
    assert load_protected(directory, tiny_cnn, key, device=torch.device("cpu")).key == key


def test_a_path_or_none_given_as_the_key_says_how_to_load_one(saved, tiny_cnn):
    # load_protected(d, base, None) raised AttributeError ("'NoneType' object
    # has no attribute 'fingerprint'"); a path string the same.
    from kp_plugin.errors import KeyTypeError

    _, directory = saved
    for not_a_key in (None, str(directory / "owner.key"), b"\x00" * 32):
        with pytest.raises(KeyTypeError, match=r"SecretKey\.load\(path\)") as info:
            load_protected(directory, tiny_cnn, not_a_key)
        assert isinstance(info.value, TypeError)
        with pytest.raises(KeyTypeError, match=r"SecretKey\.load\(path\)"):
            load_protected(directory, tiny_cnn, not_a_key, allow_wrong_key=True)
        with pytest.raises(KeyTypeError, match=r"SecretKey\.load\(path\)"):
            wrap_model(tiny_cnn, not_a_key, mean=MEAN, std=STD)
    with pytest.raises(KeyTypeError) as info:
        load_protected(directory, tiny_cnn, "00" * 32)  # the key's hex, perhaps: never echoed
    assert "00" * 32 not in str(info.value)


@pytest.mark.parametrize("scheme", ["shuffle+np+scramble", "shuffle+np"])
def test_a_loaded_model_warns_of_other_sizes_only_where_scrambling_makes_them_wrong(tmp_path, tiny_cnn, scheme):
    # kp evaluate --image-size 64 on a model saved for 32 reported 7.5% with the
    # key (exit 0), silently: the scrambled block order is another one at
    # another size. A warning, since the saved size may be a default.
    import warnings

    from kp_plugin.errors import InputSizeWarning

    key = SecretKey(bytes(range(32)), block_size=4, scheme=scheme)
    save_protected(wrap_model(tiny_cnn, key, mean=MEAN, std=STD, input_size=(3, 8, 8)), tmp_path)
    loaded = load_protected(tmp_path, _fresh_cnn(), key).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded(torch.rand(2, 3, 8, 8))
        if "scramble" in scheme:
            with pytest.warns(InputSizeWarning, match=r"saved for 8x8 images.*resize the images to 8x8"):
                assert loaded(torch.rand(2, 3, 16, 16)).shape == (2, 5)
            loaded(torch.rand(2, 3, 8, 8))
            loaded.keyed.trained_size = None  # on purpose
        assert loaded(torch.rand(2, 3, 16, 16)).shape == (2, 5)


def test_a_protection_json_without_a_usable_format_version_or_text_is_called_corrupt(saved, key):
    # It said "Upgrade kp-plugin", which cannot help; binary content gave only the codec's error.
    _, directory = saved
    path = directory / "protection.json"
    good = path.read_text()
    for content in (_edit_field(good, "format_version", None).encode(), b"\xff\xfe\x00binary"):
        path.write_bytes(content)
        with pytest.raises(CheckpointError, match="corrupt.*save the model again") as info:
            load_protected(directory, _fresh_cnn(), key)
        assert "Upgrade" not in str(info.value)


def test_a_mean_for_other_channels_than_the_key_says_which_key_to_make(tiny_cnn):
    with pytest.raises(ConfigurationError, match=r"SecretKey.generate\(channels=3\)"):
        wrap_model(tiny_cnn, SecretKey.generate(block_size=4, channels=1), mean=MEAN, std=STD)


def test_saving_over_another_keys_checkpoint_is_refused_unless_asked(saved, key, tmp_path):
    # save_protected (and save_pretrained) replaced it silently: that model
    # was lost, and its owner's key opened nothing any more.
    model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    other = wrap_model(_fresh_cnn(), SecretKey.generate_like(key), mean=MEAN, std=STD, input_size=(3, 8, 8))
    for save in (lambda: save_protected(other, directory), lambda: other.save_pretrained(directory)):
        with pytest.raises(CheckpointError, match="another key.*overwrite=True"):
            save()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before
    save_protected(model, directory)  # the same key again: more training, saved over
    save_protected(other, directory, overwrite=True)
    assert ProtectionConfig.load(directory).fingerprint == other.key.fingerprint


def test_weights_and_protection_json_from_two_saves_are_refused(saved, key, tmp_path):
    # A save killed between model.safetensors and protection.json (or files
    # copied from two checkpoints) loaded silently with the other save's
    # normalization and metadata.
    model, directory = saved
    first_config = (directory / "protection.json").read_bytes()
    save_protected(_retrained(model), directory, metadata={"dataset": "digits"})
    assert (directory / "protection.json").read_bytes() != first_config  # the weights' digest changed
    (directory / "protection.json").write_bytes(first_config)
    with pytest.raises(CheckpointError, match="different saves"):
        load_protected(directory, _fresh_cnn(), key)
    for again in ("again", "once more"):  # the same weights give the same file
        save_protected(model, tmp_path / again, metadata={"dataset": "digits"})
    texts = {(tmp_path / again / "protection.json").read_bytes() for again in ("again", "once more")}
    assert len(texts) == 1


def test_a_full_disk_while_saving_is_a_checkpoint_error_and_keeps_the_old_weights(tmp_path):
    # safetensors reports it as its own SafetensorError (neither a KPError nor
    # an OSError): a traceback from kp. A real limit: RLIMIT_FSIZE in a child.
    import subprocess
    import sys

    script = f"""
import resource, signal, torch
from kp_plugin import SecretKey, save_protected, wrap_model
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
model = wrap_model(torch.nn.Linear(2000, 1000), SecretKey(bytes(range(32)), block_size=4), mean=0.5, std=0.5)
save_protected(model, {str(tmp_path / "ckpt")!r})
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_protected(model, {str(tmp_path / "ckpt")!r})
except Exception as exc:
    print(type(exc).__name__, exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.startswith("CheckpointWriteError cannot write"), result.stdout + result.stderr
    weights = tmp_path / "ckpt" / "model.safetensors"
    assert weights.stat().st_size > 1 << 20 and not list((tmp_path / "ckpt").glob(".*.tmp"))


def test_threads_saving_into_one_folder_do_not_take_each_others_temporary_files(tmp_path, tiny_cnn, key):
    # Both wrote '.model.safetensors.tmp' / '.protection.json.tmp': one renamed
    # the other's file away and the other failed with FileNotFoundError.
    import threading

    model = wrap_model(tiny_cnn, key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    errors = []

    def save_repeatedly():
        try:
            for _ in range(30):
                save_protected(model, tmp_path / "shared")
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=save_repeatedly) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    load_protected(tmp_path / "shared", _fresh_cnn(), key)


def test_replacing_keeps_the_old_file_when_the_write_fails(tmp_path):
    # What the report, figure and processor writers use: a write that fails
    # half-way (a full disk) used to leave a file cut short.
    from kp_plugin.checkpoint import replacing

    target = tmp_path / "report.json"
    target.write_text("the previous report")
    with pytest.raises(OSError), replacing(target) as tmp:
        tmp.write_text("half a rep")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "the previous report" and list(tmp_path.iterdir()) == [target]
    with replacing(target) as tmp:
        tmp.write_text("the new report")
    assert target.read_text() == "the new report" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("failing", ["protection.json", "model.safetensors"])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint_whole(key, tmp_path, monkeypatch, failing):
    # The weights were renamed into place before protection.json was written:
    # a full disk at that small file left new weights beside the old
    # protection.json (refused as a mix: the previous checkpoint was lost),
    # with a bare OSError.
    import errno

    old = wrap_model(_fresh_cnn(), key, mean=MEAN, std=STD)
    save_protected(old, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    torch.manual_seed(7)
    new = wrap_model(_fresh_cnn(), key, mean=MEAN, std=STD)
    torch.nn.init.normal_(new.unwrap()[0].weight)
    real_write, real_save = Path.write_bytes, __import__("safetensors.torch").torch.save_model

    def write_bytes(self, data):
        if failing in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    def save_model(module, filename, metadata=None):
        if failing in filename:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(module, filename, metadata=metadata)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr("safetensors.torch.save_model", save_model)
    with pytest.raises(CheckpointError, match=f"cannot write .*{failing}.*unchanged") as raised:
        save_protected(new, tmp_path)
    assert isinstance(raised.value, OSError)  # as a failed save_pretrained: callers that catch OSError still do
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # and no temporary file left
    loaded = load_protected(tmp_path, _fresh_cnn(), key)
    assert torch.equal(loaded.unwrap()[0].weight, old.unwrap()[0].weight)


def test_weights_replaced_after_the_save_are_detected_whatever_their_header_says(saved, key):
    # The header's digest only names the save a file claims to come from:
    # other weights written without kp's header (a plain safetensors file
    # uploaded over the checkpoint), or with the header copied, loaded.
    from safetensors import safe_open
    from safetensors.torch import save_file

    model, directory = saved
    weights = directory / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        header = fh.metadata()
    original = {name: t.clone().contiguous() for name, t in model.unwrap().state_dict().items()}
    other = {name: tensor.contiguous() for name, tensor in _retrained(model).unwrap().state_dict().items()}
    for metadata in (None, header):
        save_file(other, str(weights), metadata=metadata)
        with pytest.raises(CheckpointError, match="not the ones protection.json beside it was saved with"):
            load_protected(directory, _fresh_cnn(), key)
    save_file(original, str(weights))
    load_protected(directory, _fresh_cnn(), key)  # the saved weights, written again by other code: the same digest


def test_a_half_precision_checkpoint_loads_into_a_float32_model(tmp_path, tiny_cnn, key):
    # The loaded values are converted to the model's dtypes: their digest
    # cannot match the saved one, which is no sign of other weights.
    model = wrap_model(tiny_cnn.half(), key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    directory = save_protected(model, tmp_path / "half")
    loaded = load_protected(directory, _fresh_cnn(), key)
    assert next(loaded.parameters()).dtype == torch.float32
    torch.testing.assert_close(loaded.unwrap()[0].weight, tiny_cnn[0].weight.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_other_weights_stored_in_another_dtype_are_refused(saved, key, dtype):
    # The digest of the loaded (converted) weights cannot match, so the check
    # used to stop there and the replacement loaded: the file's tensors as
    # stored are compared instead.
    from safetensors.torch import save_file

    model, directory = saved
    other = {name: (t.to(dtype) if t.is_floating_point() else t).contiguous()
             for name, t in _retrained(model).unwrap().state_dict().items()}
    save_file(other, str(directory / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not the ones protection.json beside it was saved with"):
        load_protected(directory, _fresh_cnn(), key)


class _TiedHead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Conv2d(3, 4, 1)
        self.head = torch.nn.Conv2d(3, 4, 1)
        self.head.weight = self.embed.weight  # tied: safetensors stores it once

    def forward(self, x):
        return (self.embed(x) + self.head(x)).mean((2, 3))


def test_a_half_precision_checkpoint_with_tied_weights_loads_into_a_float32_model(tmp_path, key):
    model = wrap_model(_TiedHead().half(), key, mean=MEAN, std=STD, input_size=(3, 8, 8))
    directory = save_protected(model, tmp_path / "tied")
    loaded = load_protected(directory, _TiedHead(), key)
    assert loaded.unwrap().head.weight is loaded.unwrap().embed.weight
    torch.testing.assert_close(loaded.unwrap().head.weight, model.unwrap().head.weight.float())


def test_a_loaded_model_is_in_eval_mode_so_its_first_call_changes_nothing(saved, key):
    # Before, it came back in training mode (a fresh base's): its first call
    # used batch statistics and moved the running statistics for good.
    model, directory = saved
    fresh = _fresh_cnn().train()
    loaded = load_protected(directory, fresh, key)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    running = loaded.unwrap()[1].running_mean.clone()
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    torch.testing.assert_close(loaded.unwrap()[1].running_mean, running)


def test_golden_protection_mac():
    # docs/key-format.md, "protection.json mac": recomputed here from the
    # spec's text with hmac alone, and pinned.
    import hashlib
    import hmac

    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np+scramble")
    config = ProtectionConfig(scheme=["shuffle", "np", "scramble"], block_size=4, channels=3,
                              fingerprint=key.fingerprint, mean=[0.5] * 3, std=[0.5] * 3, input_size=[3, 32, 32],
                              weights_digest="0123456789abcdef", extra={"dataset": "digits"})
    canonical = ('{"block_size":4,"channels":3,"fingerprint":"2cffb27bc8dd24fe499b7fff6eb80c75",'
                 '"format":"kp-plugin-protection","format_version":1,"input_size":[3,32,32],"mean":[0.5,0.5,0.5],'
                 '"scheme":["shuffle","np","scramble"],"std":[0.5,0.5,0.5],"weights_digest":"0123456789abcdef"}')
    expected = hmac.new(bytes(range(32)), b"kp-plugin/v1/protection\x00" + canonical.encode(),
                        hashlib.sha256).hexdigest()
    assert expected == "4964f44cd678799d0108f02d22ef7521f5c672eb262b0f9e206ffbc272f0e766"
    assert config.sign(key).mac == expected


@pytest.mark.parametrize("edit", [("mean", [0.0, 0.0, 0.0]), ("std", [1.0, 1.0, 1.0]), ("input_size", [3, 16, 16]),
                                  ("weights_digest", None), ("extra", {"dataset": "edited"})])
def test_a_protection_json_edited_without_the_key_is_refused(saved, key, edit):
    # Before: another mean / std loaded silently and gave other logits; with
    # the weights digest rewritten, so did other weights. Metadata may change.
    _, directory = saved
    path = directory / "protection.json"
    data = json.loads(path.read_text())
    assert data["mac"] and key._material.hex() not in path.read_text()
    name, value = edit
    data[name] = value
    path.write_text(json.dumps(data))
    if name == "extra":
        assert load_protected(directory, _fresh_cnn(), key) is not None
        return
    with pytest.raises(CheckpointError, match="changed after it was written.*restore it"):
        load_protected(directory, _fresh_cnn(), key)
    load_protected(directory, _fresh_cnn(), key, allow_wrong_key=True)  # evaluation and attacks: no key to check
    del data["mac"]  # a config without a mac (written before it existed, or by hand) cannot be checked
    path.write_text(json.dumps(data))
    with pytest.warns(UnsignedCheckpointWarning, match="has no mac"):
        ProtectionConfig.load(directory).check_key(key)


def test_removing_the_mac_does_not_pass_quietly(saved, key):
    # Deleting one field turned every check off silently: other weights with
    # their digest written in, another normalization, all loaded without a word.
    from safetensors.torch import save_file

    model, directory = saved
    other = _retrained(model).unwrap()
    save_file({n: t.contiguous() for n, t in other.state_dict().items()}, str(directory / "model.safetensors"))
    path = directory / "protection.json"
    data = json.loads(path.read_text())
    del data["mac"]
    data["weights_digest"] = weights_digest(other)
    data["mean"] = [0.9, 0.9, 0.9]
    path.write_text(json.dumps(data))
    with pytest.warns(UnsignedCheckpointWarning, match="cannot be checked against the key"):
        load_protected(directory, _fresh_cnn(), key)
    with pytest.raises(CheckpointError, match="has no mac.*sign it"):
        ProtectionConfig.load(directory).check_key(key, unsigned="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ProtectionConfig.load(directory).check_key(key, unsigned="ignore")
        load_protected(directory, _fresh_cnn(), key, allow_wrong_key=True)  # evaluation: nothing to check


@pytest.mark.parametrize("edit", [("block_size", 8), ("scheme", ["shuffle"])])
def test_an_edited_block_size_or_scheme_is_a_corrupt_file_not_another_key(saved, key, edit):
    # At 7395215 these raised KeyMismatchError (the CLI's "wrong key", exit
    # 3) though the key was the owner's: the settings were compared before
    # the mac, which says the file was edited.
    _, directory = saved
    path = directory / "protection.json"
    data = json.loads(path.read_text())
    data[edit[0]] = edit[1]
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="changed after it was written"):
        load_protected(directory, _fresh_cnn(), key)


def test_the_owners_key_with_edited_settings_is_still_a_key_mismatch(saved, key):
    # The same key material with another block size (an edited key file):
    # protection.json's mac verifies, so the key is what differs.
    _, directory = saved
    edited = SecretKey(key._material, block_size=key.block_size * 2, scheme=key.scheme, channels=key.channels)
    with pytest.raises(KeyMismatchError, match="expected fingerprint .* but other settings"):
        load_protected(directory, _fresh_cnn(), edited)


def test_a_number_too_long_to_read_is_a_corrupt_file_not_a_bare_value_error(saved, key, tmp_path):
    # Python refuses integers of more than 4300 digits inside json.loads with
    # a ValueError that is not a JSONDecodeError: it escaped as itself (the
    # CLI printed a traceback), for key files and protection.json alike.
    _, directory = saved
    path = directory / "protection.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(data).replace('"block_size": 4', '"block_size": ' + "9" * 5000))
    with pytest.raises(CheckpointError, match="number too long"):
        load_protected(directory, _fresh_cnn(), key)
    key_file = tmp_path / "huge.key"
    key_file.write_text(key.to_json().replace('"block_size": 4', '"block_size": ' + "9" * 5000))
    with pytest.raises(KeyFileError, match="restore it from your backup"):
        SecretKey.load(key_file)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_values_for_float_weights_are_refused_not_loaded_as_zeros(saved, key, dtype):
    # An int32 copy of the weights loaded silently, every weight truncated
    # (the digest check skipped any dtype change).
    from safetensors.torch import load_file, save_file

    _, directory = saved
    weights = directory / "model.safetensors"
    state = load_file(str(weights))
    save_file({name: value.to(dtype) for name, value in state.items()}, str(weights))
    with pytest.raises(CheckpointError, match="values for float weights"):
        load_protected(directory, _fresh_cnn(), key)


@pytest.mark.parametrize("field, value", [("mean", float("nan")), ("std", float("inf")), ("mean", "abc")])
def test_wrap_model_refuses_a_mean_or_std_that_is_not_finite_numbers(key, field, value):
    # NaN gave NaN logits and later a bare ValueError from save_protected's JSON.
    settings = {"mean": MEAN, "std": STD, field: value}
    with pytest.raises(ConfigurationError, match=field):
        wrap_model(_fresh_cnn(), key, **settings)


@pytest.mark.parametrize("input_size", [(32, 32), "abc", (3, -4, -4), (3, 400000, 400000), (3, 8.5, 8)])
def test_wrap_model_refuses_an_input_size_that_is_not_c_h_w(key, input_size):
    # (32, 32) was read as 32 channels, "abc" as "a-channel images", and
    # (3, 400000, 400000) reached the allocator.
    with pytest.raises(ConfigurationError, match=r"input_size must be \(C, H, W\)"):
        wrap_model(_fresh_cnn(), key, mean=MEAN, std=STD, input_size=input_size)


@pytest.mark.parametrize("model", ["resnet18", None])
def test_wrap_model_refuses_what_is_not_a_module(key, model):
    with pytest.raises(ConfigurationError, match="takes an nn.Module"):
        wrap_model(model, key, mean=MEAN, std=STD)


def test_an_impossible_folder_or_key_path_is_a_write_error(saved, key, tmp_path):
    # A name too long for the file system, or a folder under a file, raised
    # the bare OSError of the existence check or mkdir (not a KPError).
    from kp_plugin.errors import CheckpointWriteError, KeyFileWriteError

    model, _ = saved
    (tmp_path / "afile").write_text("keep me")
    for target in (tmp_path / ("x" * 300), tmp_path / "afile" / "ckpt"):
        with pytest.raises(CheckpointWriteError, match="nothing was written"):
            save_protected(model, target)
    with pytest.raises(KeyFileWriteError, match="nothing was written"):
        key.save(tmp_path / ("k" * 300))
    assert (tmp_path / "afile").read_text() == "keep me"


@pytest.mark.parametrize("failure", [KeyboardInterrupt, lambda: OSError(5, "Input/output error")])
def test_a_save_interrupted_between_its_renames_keeps_the_previous_checkpoint(saved, key, monkeypatch, failure):
    # The files were renamed one at a time: a Ctrl-C or an error after the
    # weights were in place left them beside the old protection.json, and
    # the previous save no longer loaded ("come from different saves").
    import kp_plugin.checkpoint as checkpoint

    model, directory = saved
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_replace, moved = os.replace, []

    def second_fails(src, dst):
        if os.path.dirname(os.fspath(dst)) == os.fspath(directory) and str(src).endswith(".tmp") \
                and not os.path.basename(os.fspath(dst)).startswith("."):
            moved.append(dst)
            if len(moved) == 2:
                raise failure()
        real_replace(src, dst)

    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    monkeypatch.setattr(checkpoint.os, "replace", second_fails)
    with pytest.raises((KeyboardInterrupt, CheckpointError)):
        save_protected(model, directory)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before  # no temporary files either
    load_protected(directory, _fresh_cnn(), key)


def test_a_save_removes_the_temporaries_a_stopped_save_left(saved):
    # A process killed between the renames of a save leaves the previous
    # files' links (.NAME.PID.XXXX.tmp) beside the checkpoint; the next save
    # into the folder removes those of a process no longer running.
    import subprocess
    import sys

    model, directory = saved
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = directory / f".{PROTECTION_FILE}.{int(ended.stdout)}.0a1b2c3d.tmp"
    live = directory / f".{PROTECTION_FILE}.{os.getppid()}.0a1b2c3d.tmp"
    for path in (stale, live):
        path.write_bytes(b"x")
    save_protected(model, directory)
    assert not stale.exists() and live.exists()


def test_every_replaced_file_removes_the_temporaries_killed_writes_of_it_left(tmp_path):
    # report.json, report.md and training.json (written through replacing())
    # kept the temporaries of a killed kp evaluate / kp protect for good.
    import subprocess
    import sys

    from kp_plugin.checkpoint import replacing

    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".report.json.{int(ended.stdout)}.0a1b2c3d.tmp"
    live = tmp_path / f".report.json.{os.getppid()}.0a1b2c3d.tmp"
    for path in (stale, live):
        path.write_bytes(b"x")
    with replacing(tmp_path / "report.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "report.json"])


def test_safetensors_own_temporary_of_a_killed_save_is_removed_by_the_next_save(saved, tmp_path):
    # safetensors writes a .tmpXXXXXX of its own beside the file it is given:
    # a save killed during the weights left it in the checkpoint folder for
    # good (1.5 MB, through 35 later saves in an audit). It is written in a
    # scratch folder named after the process now, which the next save removes.
    import subprocess
    import sys

    model, directory = saved
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    scratch = directory / f".model.safetensors.{int(ended.stdout)}.0a1b2c3d.tmp"
    scratch.mkdir()
    (scratch / ".tmpAbC123").write_bytes(b"half a weights file")
    before = sorted(p.name for p in directory.iterdir() if p != scratch)
    save_protected(model, directory)
    assert sorted(p.name for p in directory.iterdir()) == before
    load_protected(directory, _fresh_cnn(), model.key)


def test_the_weights_file_is_as_readable_as_the_files_beside_it(saved, tmp_path):
    # model.safetensors came out 0600 (safetensors' own temporary file's
    # mode) beside a 0644 protection.json and config.json: the file to
    # publish was the one other users could not read.
    import stat

    model, _ = saved
    old = os.umask(0o022)
    try:
        directory = save_protected(model, tmp_path / "modes")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
    assert modes["model.safetensors"] == modes["protection.json"] == 0o644, modes


def test_a_key_file_of_any_key_in_the_folder_is_refused_before_anything_is_written(tmp_path, tiny_cnn, key):
    # The folder was scanned after the save: KeyLeakError, with the new
    # checkpoint already written beside the key file.
    SecretKey.generate_like(key).save(tmp_path / "colleague.key")
    model = wrap_model(tiny_cnn, key, mean=MEAN, std=STD)
    with pytest.raises(KeyLeakError, match="colleague.key.*nothing was written"):
        save_protected(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["colleague.key"]
