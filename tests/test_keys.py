"""SecretKey: derivation pinned by golden vectors, key files that fail loudly,
and no way for the material to slip out."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import os
import pickle
import stat
import traceback
from pathlib import Path

import pytest
import torch

from kp_plugin import (KeyFileError, KeyFileExistsError, KeyFilePermissionWarning, KeyFileWriteError, SecretKey,
                       parse_scheme)
from kp_plugin.keys import DEFAULT_SCHEME, PAPER_SCHEME

from conftest import ALL_STEPS, GOLDEN_MATERIAL

# ----------------------------------------------------------------------------
# Golden vectors (also in docs/key-format.md): key = bytes(range(32)),
# block size 4, 3 channels, so L = 48; 16 blocks for the block permutation.
# ----------------------------------------------------------------------------
GOLDEN = {
    "fingerprint": "2cffb27bc8dd24fe499b7fff6eb80c75",
    "pixel_permutation": [26, 6, 0, 30, 42, 12, 46, 1, 34, 14, 28, 23, 21, 29, 41, 2],
    "np_mask": [1, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0],
    "shift_values": [186, 197, 194, 198, 90, 173, 63, 149, 213, 55, 165, 246, 200, 36, 192, 185],
    "ffx_mask": [1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 1],
    "ffx_table_0": [130, 116, 228, 10, 38, 185, 80, 67, 136, 212, 49, 215, 7, 52, 69, 220],
    "ffx_table_1": [152, 52, 241, 132, 144, 54, 180, 70, 77, 57, 48, 162, 249, 242, 69, 171],
    "block_permutation_16": [11, 14, 3, 2, 12, 9, 7, 8, 13, 15, 4, 6, 1, 10, 0, 5],
    "pixel_permutation_768": [344, 568, 604, 518, 159, 434, 338, 378],
    "key_file_mac": "3e96b9422262da39cf9bca8eb6c2c3b4150488328708653721bb3b9162304b92",
}


def test_golden_vectors(golden_key):
    assert golden_key.fingerprint == GOLDEN["fingerprint"]
    assert golden_key.pixel_permutation(48)[:16] == GOLDEN["pixel_permutation"]
    assert golden_key.np_mask(48)[:16] == GOLDEN["np_mask"]
    assert golden_key.shift_values(48)[:16] == GOLDEN["shift_values"]
    assert golden_key.ffx_mask(48)[:16] == GOLDEN["ffx_mask"]
    assert golden_key.ffx_tables(48)[0][:16] == GOLDEN["ffx_table_0"]
    assert golden_key.ffx_tables(48)[1][:16] == GOLDEN["ffx_table_1"]
    assert golden_key.block_permutation(16) == GOLDEN["block_permutation_16"]
    assert golden_key.pixel_permutation(768)[:8] == GOLDEN["pixel_permutation_768"]


def test_golden_key_file_mac():
    key = SecretKey(GOLDEN_MATERIAL, block_size=4, scheme=ALL_STEPS, created="2026-01-01T00:00:00Z")
    assert json.loads(key.to_json())["mac"] == GOLDEN["key_file_mac"]


# ----------------------------------------------------------------------------
# An independent implementation written from docs/key-format.md: if the
# library and the spec drift apart, these tests say so.
# ----------------------------------------------------------------------------


def _spec_stream(key: bytes, label: str):
    counter = 0
    while True:
        message = b"kp-plugin/v1/" + label.encode("ascii") + b"\x00" + counter.to_bytes(4, "big")
        yield from hmac.new(key, message, hashlib.sha256).digest()
        counter += 1


def _spec_permutation(key: bytes, label: str, n: int) -> list:
    stream = _spec_stream(key, label)

    def uniform(bound: int) -> int:
        while True:
            word = int.from_bytes(bytes(next(stream) for _ in range(4)), "big")
            if word < (2**32 // bound) * bound:
                return word % bound

    a = list(range(n))
    for i in reversed(range(1, n)):
        j = uniform(i + 1)
        a[i], a[j] = a[j], a[i]
    return a


def _spec_bits(key: bytes, label: str, n: int) -> list:
    stream = _spec_stream(key, label)
    raw = [next(stream) for _ in range((n + 7) // 8)]
    return [(raw[k // 8] >> (7 - k % 8)) & 1 for k in range(n)]


def _spec_ffx_table(key: bytes, length: int, position: int) -> list:
    stream = _spec_stream(key, f"ffx-rounds/L={length}")
    raw = [next(stream) for _ in range(length * 64)]
    rounds = []
    for r in range(8):
        chunk = raw[(position * 8 + r) * 8:(position * 8 + r + 1) * 8]
        rounds.append([n for byte in chunk for n in (byte >> 4, byte & 15)])
    table = []
    for v in range(256):
        left, right = v >> 4, v & 15
        for f in rounds:
            left, right = right, left ^ f[right]
        table.append(left << 4 | right)
    return table


@pytest.mark.parametrize("length", [48, 130])
def test_derivation_follows_the_written_spec(length):
    material = bytes(range(32, 64))
    key = SecretKey(material, block_size=5, channels=3)
    assert key.pixel_permutation(length) == _spec_permutation(material, f"pixel-shuffle/L={length}", length)
    assert key.np_mask(length) == _spec_bits(material, f"negative-positive/L={length}", length)
    assert key.ffx_mask(length) == _spec_bits(material, f"ffx-mask/L={length}", length)
    assert key.shift_values(length) == [
        b for b, _ in zip(_spec_stream(material, f"value-shift/L={length}"), range(length))
    ]
    for position in {0, min(63, length - 1), min(64, length - 1), length - 1}:  # built 64 positions at a time
        assert key.ffx_tables(length)[position] == _spec_ffx_table(material, length, position)
    assert key.block_permutation(length) == _spec_permutation(material, f"block-scramble/N={length}", length)
    fingerprint = hmac.new(material, b"kp-plugin/v1/fingerprint\x00\x00\x00\x00\x00", hashlib.sha256)
    assert key.fingerprint == fingerprint.hexdigest()[:32]


def test_ffx_tables_are_bijections_of_bytes(golden_key):
    for table in golden_key.ffx_tables(48):
        assert sorted(table) == list(range(256))


def test_permutations_are_permutations(golden_key):
    assert sorted(golden_key.pixel_permutation(768)) == list(range(768))
    assert sorted(golden_key.block_permutation(49)) == list(range(49))


def test_derived_objects_depend_on_the_length(golden_key):
    assert golden_key.pixel_permutation(48)[:8] != golden_key.pixel_permutation(49)[:8]


# ----------------------------------------------------------------------------
# Generation and public identity
# ----------------------------------------------------------------------------


def test_generate_draws_fresh_material_each_time():
    a, b = SecretKey.generate(), SecretKey.generate()
    assert a.fingerprint != b.fingerprint and a != b
    assert a.scheme == DEFAULT_SCHEME and a.block_size == 16 and a.channels == 3


def test_generate_like_keeps_settings_and_changes_material(golden_key):
    other = SecretKey.generate_like(golden_key)
    assert (other.block_size, other.scheme, other.channels) == (4, golden_key.scheme, 3)
    assert other.fingerprint != golden_key.fingerprint


def test_replace_keeps_material_and_changes_settings(golden_key):
    paper = golden_key.replace(scheme="shuffle")
    assert paper.scheme == PAPER_SCHEME
    assert paper.fingerprint == golden_key.fingerprint
    assert paper.pixel_permutation(48) == golden_key.pixel_permutation(48)
    assert paper != golden_key


def test_fingerprint_is_at_least_64_bits_of_hex(golden_key):
    assert len(golden_key.fingerprint) >= 16
    int(golden_key.fingerprint, 16)


@pytest.mark.parametrize("text, expected", [
    ("shuffle+np", ("shuffle", "np")),
    ("np+shuffle", ("shuffle", "np")),
    ("pixel-shuffle, flip", ("shuffle", "np")),
    (["scramble", "ffx"], ("ffx", "scramble")),
])
def test_parse_scheme_orders_steps_as_design_does(text, expected):
    assert parse_scheme(text) == expected


@pytest.mark.parametrize("text", ["", "shuffle+rot13", "np+np"])
def test_parse_scheme_rejects_bad_schemes(text):
    with pytest.raises(ValueError):
        parse_scheme(text)


@pytest.mark.parametrize("material", [b"", bytes(31), bytes(33), "00" * 32])
def test_key_material_must_be_32_bytes(material):
    with pytest.raises(ValueError):
        SecretKey(material)


# ----------------------------------------------------------------------------
# The material never slips out
# ----------------------------------------------------------------------------


def test_repr_and_str_show_no_material(golden_key):
    for text in (repr(golden_key), str(golden_key), f"{golden_key}"):
        assert golden_key.fingerprint in text
        assert not any(form.decode("latin-1") in text for form in golden_key.secret_forms())
        assert GOLDEN_MATERIAL.hex() not in text


def test_pickling_is_refused(golden_key):
    # A TypeError, as picklers expect, and one of the library's own errors
    # (it was a plain TypeError).
    from kp_plugin import KeyLeakError, KeyPicklingError

    with pytest.raises(TypeError, match="cannot be pickled") as raised:
        pickle.dumps(golden_key)
    assert isinstance(raised.value, KeyPicklingError) and isinstance(raised.value, KeyLeakError)


def test_torch_save_of_a_key_is_refused(golden_key, tmp_path):
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save({"key": golden_key}, tmp_path / "x.pt")


@pytest.mark.parametrize("module", ["dill", "cloudpickle"])
def test_third_party_picklers_refuse_too(golden_key, module):
    pickler = pytest.importorskip(module)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickler.dumps({"key": golden_key})


def test_multiprocessing_carries_a_key_to_a_child_process(golden_key):
    # Only multiprocessing's own pickler (the pipe to a spawned or forkserver
    # process, its queues): what DataLoader workers and mp.spawn use.
    from multiprocessing.reduction import ForkingPickler

    received = pickle.loads(ForkingPickler.dumps(golden_key))
    assert received == golden_key
    assert (received.scheme, received.created) == (golden_key.scheme, golden_key.created)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(received)


def test_copies_are_the_same_object(golden_key):
    assert copy.copy(golden_key) is golden_key
    assert copy.deepcopy({"k": golden_key})["k"] is golden_key


def test_secret_forms_cover_raw_hex_base64_and_permutation(golden_key):
    forms = golden_key.secret_forms()
    for needed in (
        GOLDEN_MATERIAL,
        GOLDEN_MATERIAL.hex().encode(),
        base64.b64encode(GOLDEN_MATERIAL),
        json.dumps(golden_key.pixel_permutation()).encode(),
        torch.tensor(golden_key.pixel_permutation(), dtype=torch.int64).numpy().tobytes(),
    ):
        assert needed in forms


# ----------------------------------------------------------------------------
# Key files
# ----------------------------------------------------------------------------


def test_save_and_load_round_trip(golden_key, tmp_path):
    path = golden_key.save(tmp_path / "owner.key")
    loaded = SecretKey.load(path)
    assert loaded == golden_key and loaded.created == golden_key.created


def test_key_file_is_owner_only(golden_key, tmp_path):
    path = golden_key.save(tmp_path / "owner.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_file_is_owner_only_after_overwrite(golden_key, tmp_path):
    path = tmp_path / "owner.key"
    path.write_text("old")
    path.chmod(0o644)
    golden_key.save(path, overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_loading_a_key_file_others_can_read_warns_and_still_loads(golden_key, tmp_path, recwarn):
    path = golden_key.save(tmp_path / "owner.key")
    assert SecretKey.load(path) == golden_key
    assert not [w for w in recwarn if issubclass(w.category, KeyFilePermissionWarning)]  # 0600: silent
    for mode in (0o644, 0o640, 0o604, 0o400 | 0o020):
        path.chmod(mode)
        with pytest.warns(KeyFilePermissionWarning, match=f"mode {mode:04o}.*chmod 600") as caught:
            assert SecretKey.load(path) == golden_key
        assert GOLDEN_MATERIAL.hex() not in str(caught[0].message)
        assert caught[0].filename == __file__  # points at the caller's line
    path.chmod(0o400)  # read-only for the owner is fine
    SecretKey.load(path)
    assert not [w for w in recwarn if issubclass(w.category, KeyFilePermissionWarning)]


def test_save_refuses_to_overwrite(golden_key, tmp_path):
    path = golden_key.save(tmp_path / "owner.key")
    other = SecretKey.generate_like(golden_key)
    with pytest.raises(KeyFileError, match="overwrite=True") as refused:
        other.save(path)
    assert isinstance(refused.value, FileExistsError)  # also catchable as the built-in
    assert SecretKey.load(path) == golden_key


@pytest.mark.parametrize("overwrite", [False, True])
def test_saving_onto_a_directory_names_it(golden_key, tmp_path, overwrite):
    with pytest.raises(KeyFileError, match="is a directory.*owner.key"):
        golden_key.save(tmp_path, overwrite=overwrite)
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_location_is_a_key_file_error_without_material(golden_key, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(KeyFileWriteError, match="not-a-folder is a file, not a folder") as raised:
        golden_key.save(blocker / "owner.key")
    assert isinstance(raised.value, OSError)
    assert GOLDEN_MATERIAL.hex() not in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not-a-folder"]


def test_save_overwrites_when_asked(golden_key, tmp_path):
    path = golden_key.save(tmp_path / "owner.key")
    other = SecretKey.generate_like(golden_key)
    other.save(path, overwrite=True)
    assert SecretKey.load(path) == other


def test_save_creates_missing_directories(golden_key, tmp_path):
    path = golden_key.save(tmp_path / "a" / "b" / "owner.key")
    assert SecretKey.load(path) == golden_key


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_interrupted_save_keeps_the_previous_file_and_leaves_no_temp_file(golden_key, tmp_path, monkeypatch, failing):
    path = golden_key.save(tmp_path / "owner.key")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk went away")

    monkeypatch.setattr(os, failing, crash)
    with pytest.raises(OSError, match="disk went away"):
        SecretKey.generate_like(golden_key).save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["owner.key"]


def test_interrupted_first_save_leaves_nothing(golden_key, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk went away")))
    with pytest.raises(OSError):
        golden_key.save(tmp_path / "owner.key")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def _saved(golden_key, tmp_path) -> Path:
    return golden_key.save(tmp_path / "owner.key")


def _edit(path: Path, change) -> None:
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body))


def _assert_no_material(message: str, key: SecretKey) -> None:
    assert key._material.hex() not in message and key._material.hex().upper() not in message
    assert base64.b64encode(key._material).decode() not in message


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_text(""), "empty"),
    (lambda p: p.write_bytes(p.read_bytes()[:60]), "not valid JSON"),
    (lambda p: p.write_text("key = 1234"), "not valid JSON"),
    (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not UTF-8"),
    (lambda p: p.write_text("[1, 2, 3]"), "not a kp-plugin key file"),
    (lambda p: _edit(p, lambda b: b.update(version=99)), "newer than this kp-plugin"),
    (lambda p: _edit(p, lambda b: b.update(version="1")), "format version"),
    (lambda p: _edit(p, lambda b: b.pop("mac")), "missing field"),
    (lambda p: _edit(p, lambda b: b.pop("key")), "missing field"),
    (lambda p: _edit(p, lambda b: b.pop("created")), "missing field"),
    (lambda p: _edit(p, lambda b: b.update(key=b["key"][:-2])), "64 hex digits"),
    (lambda p: _edit(p, lambda b: b.update(key="zz" + b["key"][2:])), "not hexadecimal"),
    (lambda p: _edit(p, lambda b: b.update(key=("1" if b["key"][0] != "1" else "2") + b["key"][1:])), "fingerprint"),
    (lambda p: _edit(p, lambda b: b.update(block_size=8)), "integrity check failed"),
    (lambda p: _edit(p, lambda b: b.update(scheme=["shuffle"])), "integrity check failed"),
    (lambda p: _edit(p, lambda b: b.update(block_size=-1)), "invalid setting"),
    (lambda p: _edit(p, lambda b: b.update(scheme=["rot13"])), "invalid setting"),
])
def test_damaged_key_file_is_rejected_with_a_reason_and_no_material(golden_key, tmp_path, damage, says):
    path = _saved(golden_key, tmp_path)
    damage(path)
    with pytest.raises(KeyFileError) as info:
        SecretKey.load(path)
    assert says in str(info.value)
    assert str(path) in str(info.value)
    # Not even the printed traceback (with any chained error) shows material.
    _assert_no_material("".join(traceback.format_exception(info.value)), golden_key)


@pytest.mark.parametrize("created", [None, "", 123, "yesterday", "2026-1-1T00:00:00Z", "2026-01-01 00:00:00"])
def test_a_created_field_the_spec_does_not_allow_is_rejected_even_with_a_valid_mac(golden_key, tmp_path, created):
    # Re-signed with the key, so only the field's own check can catch it
    # (before, a null or empty one was replaced by the time of loading).
    path = _saved(golden_key, tmp_path)
    body = json.loads(path.read_text())
    body["created"] = created
    body["mac"] = golden_key._mac({k: v for k, v in body.items() if k != "mac"})
    path.write_text(json.dumps(body))
    with pytest.raises(KeyFileError, match="YYYY-MM-DDTHH:MM:SSZ"):
        SecretKey.load(path)
    with pytest.raises(ValueError, match="created"):
        SecretKey(golden_key._material, created=created if created is not None else "null")


def test_missing_key_file_says_to_restore_the_owners_key_before_making_one(tmp_path):
    # It said only "create one with kp keygen": a new key never opens the
    # model the missing one protected (kp evaluate then exits 3, wrong key).
    with pytest.raises(KeyFileError, match=r"restore it from your backup: a new key cannot open that model.*kp keygen"):
        SecretKey.load(tmp_path / "nope.key")


def test_a_byte_order_mark_or_windows_line_ends_do_not_damage_a_key(golden_key, tmp_path, monkeypatch):
    text = golden_key.to_json()
    (tmp_path / "bom.key").write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    (tmp_path / "bom.key").chmod(0o600)
    assert SecretKey.load(tmp_path / "bom.key") == golden_key
    monkeypatch.setenv("KP_KEY", "\ufeff" + text)
    assert SecretKey.from_env("KP_KEY") == golden_key


def test_from_env_reads_key_file_content(golden_key, monkeypatch):
    monkeypatch.setenv("KP_KEY", golden_key.to_json())
    assert SecretKey.from_env("KP_KEY") == golden_key


def test_from_env_unset_says_what_to_set(monkeypatch):
    monkeypatch.delenv("KP_TEST_KEY", raising=False)
    with pytest.raises(KeyFileError, match="KP_TEST_KEY is not set"):
        SecretKey.from_env("KP_TEST_KEY")


def test_from_env_holding_a_path_says_to_use_the_content(golden_key, tmp_path, monkeypatch):
    path = _saved(golden_key, tmp_path)
    monkeypatch.setenv("KP_KEY", str(path))
    with pytest.raises(KeyFileError, match="content"):
        SecretKey.from_env()


@pytest.mark.parametrize("form", ["hex", "HEX", "base64", "urlsafe"])
def test_from_env_holding_the_bare_key_bytes_says_to_use_the_key_files_content(golden_key, monkeypatch, form):
    # The message was "not valid JSON (corrupt or truncated key file); restore
    # it from your backup": the file was fine, the variable held the wrong thing.
    material = golden_key._material
    text = {"hex": material.hex(), "HEX": material.hex().upper(), "base64": base64.b64encode(material).decode(),
            "urlsafe": base64.urlsafe_b64encode(material).decode().rstrip("=")}[form]
    monkeypatch.setenv("KP_KEY", text + "\n")
    with pytest.raises(KeyFileError, match="not a kp-plugin key file: give the whole key file's JSON") as info:
        SecretKey.from_env()
    assert "backup" not in str(info.value)
    _assert_no_material(str(info.value), golden_key)


def test_from_env_with_tampered_content_names_the_variable(golden_key, monkeypatch):
    monkeypatch.setenv("KP_KEY", golden_key.to_json().replace('"block_size": 4', '"block_size": 8'))
    with pytest.raises(KeyFileError, match="environment variable KP_KEY") as info:
        SecretKey.from_env()
    _assert_no_material(str(info.value), golden_key)


def test_key_format_doc_carries_the_golden_vectors_and_runnable_reference_code():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "key-format.md").read_text()
    for name, value in GOLDEN.items():
        text = value if isinstance(value, str) else str(value)
        assert text in doc, name
    code = doc.split("```python", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "docs/key-format.md", "exec"), namespace)  # its own asserts must hold
    assert namespace["permutation"](GOLDEN_MATERIAL, "pixel-shuffle/L=48", 48)[:16] == GOLDEN["pixel_permutation"]


def test_numpy_and_torch_integers_are_block_sizes_but_floats_and_bools_are_not():
    import numpy as np

    key = SecretKey.generate(block_size=np.int64(4), channels=torch.tensor(3))
    assert type(key.block_size) is int and type(key.channels) is int  # noqa: E721 - JSON needs a plain int
    assert json.loads(key.to_json())["block_size"] == 4
    for bad in (4.0, "4", True):
        with pytest.raises(ValueError, match="block_size"):
            SecretKey.generate(block_size=bad)


@pytest.mark.parametrize("arguments", [dict(block_size=0), dict(block_size=3.5), dict(block_size=10**8),
                                       dict(scheme="bogus"), dict(scheme="shuffle+shuffle"), dict(channels=0),
                                       dict(channels=10**6)])
def test_bad_key_settings_are_library_errors(arguments):
    # A plain ValueError (not a KPError); block_size 10**8 was accepted and
    # ended in a MemoryError when its permutation was first derived.
    from kp_plugin.errors import ConfigurationError, KPError

    with pytest.raises(ConfigurationError) as info:
        SecretKey.generate(**arguments)
    assert isinstance(info.value, KPError) and isinstance(info.value, ValueError)


def test_a_key_file_of_deeply_nested_json_is_a_key_file_error(tmp_path):
    # RecursionError from the JSON decoder.
    path = tmp_path / "nested.key"
    path.write_text("[" * 60_000)  # under the size limit of a key file
    with pytest.raises(KeyFileError, match="not valid JSON"):
        SecretKey.load(path)


def test_saving_without_hard_links_never_replaces_a_key_another_saver_wrote(tmp_path, monkeypatch):
    # On a file system without hard links (FAT, some network mounts) save()
    # checked that the path was free, then renamed over it: a key written in
    # between by another process was replaced, and both saves succeeded.
    import errno

    mine, theirs = SecretKey.generate(), SecretKey.generate()
    target = tmp_path / "owner.key"
    link_failed, raced = [], []

    def no_link(src, dst, **kwargs):
        link_failed.append(True)
        raise PermissionError(errno.EPERM, "Operation not permitted")

    def other_saver_now() -> None:  # the other process writes its key at this moment
        if link_failed and not raced:
            raced.append(True)
            target.write_bytes(theirs.to_json().encode())

    real_exists, real_open = Path.exists, os.open

    def exists(self, *args, **kwargs):
        if self == target and link_failed and not raced:
            other_saver_now()
            return False  # what the check saw just before
        return real_exists(self, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        if Path(path) == target:
            other_saver_now()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_link)
    mine.save(tmp_path / "fresh.key")  # the fallback still saves
    assert SecretKey.load(tmp_path / "fresh.key").fingerprint == mine.fingerprint
    link_failed.clear()
    monkeypatch.setattr(Path, "exists", exists)
    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(KeyFileExistsError):
        mine.save(target)
    monkeypatch.undo()
    assert raced and SecretKey.load(target).fingerprint == theirs.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh.key", "owner.key"]  # no temporary file left


def test_a_save_removes_the_whole_keys_that_killed_saves_left_in_their_temporaries(golden_key, tmp_path):
    # A save killed before its rename left `.owner.key.XXXXXXXX.tmp`, a
    # complete key file, for good: 12 of 25 kills in an audit. Now named after
    # their process, they are removed by the next save of that name once that
    # process is gone; a live saver's stays.
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".owner.key.{dead.pid}.abcd1234.tmp"
    stale.write_text(SecretKey.generate().to_json())
    live = tmp_path / f".owner.key.{os.getppid()}.abcd1234.tmp"
    live.write_text("{}")
    other = tmp_path / f".other.key.{dead.pid}.abcd1234.tmp"
    other.write_text("{}")
    golden_key.save(tmp_path / "owner.key")
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "owner.key"])


def _shown_with_locals(exc: BaseException) -> str:
    """The traceback's library frames as tools that show local variables
    print them (pytest --showlocals, rich, Sentry, loguru); the test's own
    frame, which holds the key, left out."""
    shown, te = [], traceback.TracebackException.from_exception(exc, capture_locals=True)
    while te is not None:
        shown += [str(te)] + [f"{frame.name}: {frame.locals}" for frame in te.stack if "kp_plugin" in frame.filename]
        te = te.__cause__ or te.__context__
    return "\n".join(shown)


def test_no_traceback_of_a_refused_key_file_holds_the_key_in_its_locals(golden_key, tmp_path, monkeypatch):
    # The parser raised with the file's text, the key's hex and its bytes in
    # its locals (and load's frame held the file): printed by any traceback
    # that shows locals. A setting out of range left a half-built SecretKey
    # whose repr raised AttributeError inside the traceback printer.
    path = golden_key.save(tmp_path / "owner.key")
    _edit(path, lambda b: b.update(created="2030-01-01T00:00:00Z"))  # the mac no longer holds
    bad_setting = golden_key.save(tmp_path / "zero.key")
    _edit(bad_setting, lambda b: b.update(block_size=0))
    monkeypatch.setenv("KP_KEY", path.read_text())
    for load in (lambda: SecretKey.load(path), lambda: SecretKey.from_json(path.read_text()),
                 lambda: SecretKey.from_env("KP_KEY"), lambda: SecretKey.load(bad_setting)):
        with pytest.raises(KeyFileError) as info:
            load()
        shown = _shown_with_locals(info.value)
        _assert_no_material(shown, golden_key)
        assert repr(bytes(golden_key._material)) not in shown
    assert repr(SecretKey.__new__(SecretKey)) == "SecretKey(<incomplete>)"


def test_key_content_given_as_a_key_file_path_is_never_echoed(golden_key, tmp_path, monkeypatch, capsys):
    # kp ... --key "$KP_KEY" printed the whole key file ("cannot read key file
    # {...}: File name too long"); the key's hex as a path was echoed twice.
    from kp_plugin.cli import main

    (tmp_path / "x.png").write_bytes(b"")
    for content in (golden_key.to_json(), golden_key._material.hex(),
                    base64.b64encode(golden_key._material).decode()):
        with pytest.raises(KeyFileError, match="is key content") as info:
            SecretKey.load(content)
        _assert_no_material(_shown_with_locals(info.value), golden_key)
        assert main(["show", "--key", content, str(tmp_path / "x.png"), "-o", str(tmp_path / "y.png")]) == 4
        captured = capsys.readouterr()
        _assert_no_material(captured.out + captured.err, golden_key)
    # A path that merely names the format is a path.
    named = golden_key.save(tmp_path / "kp-plugin-key.json")
    assert SecretKey.load(str(named)) == golden_key


def test_a_key_setting_holding_long_text_is_not_quoted(golden_key, tmp_path):
    # A hand edit that pasted the key's hex into block_size / scheme /
    # channels / created was quoted back: "got '0e97b4...'".
    for field, value in (("block_size", golden_key._material.hex()), ("scheme", ["shuffle", golden_key._material.hex()]),
                         ("channels", golden_key._material.hex()), ("created", golden_key._material.hex())):
        path = golden_key.save(tmp_path / f"{field}.key")
        _edit(path, lambda b: b.update({field: value}))
        with pytest.raises(KeyFileError, match=f"field '{field}' holds a 64-character string") as info:
            SecretKey.load(path)
        _assert_no_material(str(info.value), golden_key)


def test_a_key_file_with_a_field_twice_is_refused(golden_key, tmp_path):
    # The last "key" won: a person (or another parser) reading the first saw another key.
    path = tmp_path / "twice.key"
    text = golden_key.to_json()
    path.write_text(text.replace('{', '{\n  "key": "' + "ab" * 32 + '",', 1))
    with pytest.raises(KeyFileError, match="field 'key' more than once"):
        SecretKey.load(path)


def test_loading_a_pipe_a_device_or_a_huge_file_is_refused_at_once(tmp_path):
    # A FIFO nobody writes to hung forever; /dev/zero was read until memory
    # ran out (kp: "out of memory; use a smaller --batch-size").
    import subprocess
    import sys

    fifo = tmp_path / "pipe.key"
    os.mkfifo(fifo)
    big = tmp_path / "big.key"
    big.write_bytes(b"{" + b" " * 1_000_000)
    script = ("import sys\nfrom kp_plugin import SecretKey, KeyFileError\n"
              "try:\n    SecretKey.load(sys.argv[1])\nexcept KeyFileError as e:\n    print(e)\n")
    for target, said in ((fifo, "is a FIFO"), ("/dev/zero", "is a device"), (big, "far larger than a key file"),
                         (tmp_path, "is a directory")):
        run = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True, timeout=60)
        assert said in run.stdout, run.stdout + run.stderr


def test_save_never_replaces_a_link_or_a_pipe_and_makes_its_folders_owner_only(golden_key, tmp_path):
    # overwrite=True replaced a device node or a link (to /proc/self/fd/1, to
    # another key) with a key file; "keys/" wrote a file named "keys"; the
    # folders save made followed the umask (0777 under umask 0), so anyone
    # could delete the key or swap in their own.
    other = SecretKey.generate_like(golden_key).save(tmp_path / "other.key")
    link = tmp_path / "link.key"
    link.symlink_to(other)
    fifo = tmp_path / "pipe.key"
    os.mkfifo(fifo)
    for target in (link, fifo):
        with pytest.raises(KeyFileError, match="not a key file"):
            golden_key.save(target, overwrite=True)
    assert link.is_symlink() and SecretKey.load(other) != golden_key
    with pytest.raises(KeyFileError, match="is a directory"):
        golden_key.save(f"{tmp_path}/keys/")
    assert not (tmp_path / "keys").exists()
    before = os.umask(0)
    try:
        written = golden_key.save(tmp_path / "made" / "for" / "owner.key")
    finally:
        os.umask(before)
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    for folder in (tmp_path / "made", tmp_path / "made" / "for"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("value, said", [
    ("base64", "base64"), ("~/owner.key", "file path"), ("/no/such/owner.key", "file path")])
def test_a_key_variable_holding_base64_or_a_path_says_so(golden_key, monkeypatch, value, said):
    # All of these said "not valid JSON (corrupt or truncated key file)".
    if value == "base64":
        value = base64.b64encode(golden_key.to_json().encode()).decode()
    monkeypatch.setenv("KP_KEY", value)
    with pytest.raises(KeyFileError, match=said) as info:
        SecretKey.from_env("KP_KEY")
    assert 'KP_KEY="$(cat owner.key)"' in str(info.value)
    assert value not in str(info.value)
