"""Protected checkpoints: the weights (safetensors) and ``protection.json``,
never the key.

``save_protected(model, directory)`` writes

- ``model.safetensors``: the base model's ``state_dict`` under its own names
  (so the architecture's own library can load it), with string metadata
  ``format: pt``, the kp format version and the key's fingerprint;
- ``protection.json``: a :class:`ProtectionConfig` as sorted JSON;
- ``config.json``: the architecture's native config when the model has one
  (a transformers ``config``, or timm's ``pretrained_cfg``).

``load_protected(directory, model, key)`` loads the weights into ``model``
and wraps it with ``key``, after checking that ``key`` is the one the
checkpoint was protected with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from . import __version__
from ._files import remove_stale_temporaries
from .errors import (CheckpointError, CheckpointWriteError, ConfigurationError, KeyLeakError, KeyMismatchError,
                     UnsignedCheckpointWarning, first_line)
from .keys import KEY_FILE_FORMAT, SecretKey, parse_scheme, require_key
from .module import ProtectedModel, fixed_image_size, require_protected, wrap_model

__all__ = [
    "ProtectionConfig",
    "save_protected",
    "load_protected",
    "check_key_matches",
    "find_key_material",
    "PROTECTION_FILE",
    "WEIGHTS_FILE",
    "PROTECTION_FORMAT",
    "PROTECTION_FORMAT_VERSION",
]

PROTECTION_FILE = "protection.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
PROTECTION_FORMAT = "kp-plugin-protection"
PROTECTION_FORMAT_VERSION = 1


#: The fields of protection.json its ``mac`` covers: what the model computes
#: with (the others, ``extra`` metadata among them, may be edited).
MAC_FIELDS = ("format", "format_version", "scheme", "block_size", "channels", "fingerprint", "mean", "std",
              "input_size", "weights_digest")


@dataclass
class ProtectionConfig:
    """What a protected checkpoint records about its protection: public
    settings and the key's fingerprint, never the key.

    Serialized as sorted JSON with a type tag (``format``) and a version.
    """

    scheme: list
    block_size: int
    channels: int
    fingerprint: str
    mean: list
    std: list
    input_size: Optional[list] = None
    architecture: Optional[str] = None
    num_classes: Optional[int] = None
    library_version: str = __version__
    format: str = PROTECTION_FORMAT
    format_version: int = PROTECTION_FORMAT_VERSION
    extra: dict = field(default_factory=dict)
    #: A digest of the weights this config was saved with (SHA-256 of the
    #: state dict's names, shapes, dtypes and bytes), also in the weights'
    #: header (``kp_weights_digest``): when the two disagree the folder mixes
    #: two saves (one interrupted between its files, or files copied together).
    weights_digest: Optional[str] = None
    #: HMAC of the fields the model computes with (:data:`MAC_FIELDS`),
    #: keyed with the key (docs/key-format.md): checked by :meth:`check_key`,
    #: so an edit by anyone without the key (another mean, std, input size
    #: or weights digest, hence other weights) is refused, not loaded.
    mac: Optional[str] = None

    @classmethod
    def from_model(cls, model: ProtectedModel, **extra: Any) -> "ProtectionConfig":
        """The config describing a :class:`ProtectedModel`."""
        protected = require_protected(model, "ProtectionConfig.from_model")
        key, keyed, base = protected.key, protected.keyed, protected.unwrap()
        # The size it was trained at, else the size a loaded model was saved
        # for, else the size it was last used at: wrap_model takes timm's
        # default (224) when no size is given, and a model fine-tuned at
        # 32x32 must not be recorded (and exported) for 224, nor for the
        # size of a later evaluation (a ViT run at 48x48 with
        # interpolate_pos_encoding), which with block scrambling is not the
        # order it learned.
        saved_for = (key.channels, *keyed.trained_size) if keyed.trained_size else None
        input_size = keyed._train_size or saved_for or keyed._size or keyed.input_size
        return cls(
            scheme=list(key.scheme),
            block_size=key.block_size,
            channels=key.channels,
            fingerprint=key.fingerprint,
            mean=list(keyed.mean),
            std=list(keyed.std),
            input_size=list(input_size) if input_size else None,
            architecture=_architecture_name(base),
            num_classes=_num_classes(base),
            extra={k: v for k, v in extra.items()},
        )

    def to_dict(self) -> dict:
        """The config as a plain dict (what ``protection.json`` holds)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Sorted, indented JSON text of :meth:`to_dict`.

        Raises:
            ConfigurationError: ``extra`` (the caller's metadata) holds a
                value JSON cannot (an object, NaN); every writer makes the
                text before writing, so nothing was written.
        """
        try:
            return json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(
                f"metadata must hold JSON values (strings, finite numbers, lists, dicts): {exc}; nothing was written"
            ) from None

    @classmethod
    def from_dict(cls, data: dict, *, source: str = PROTECTION_FILE) -> "ProtectionConfig":
        """Parse a ``protection.json`` dict; :class:`CheckpointError` (naming
        ``source``) if it is not one, is of a newer format, or is invalid.
        Unknown fields are ignored, so newer minor additions still load."""
        if not isinstance(data, dict) or data.get("format") != PROTECTION_FORMAT:
            raise CheckpointError(f"{source} is not a kp-plugin protection config")
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CheckpointError(
                f"{source} has format version {version!r}, not a positive integer: the file is corrupt; save the "
                "model again with save_protected, or download it again"
            )
        if version > PROTECTION_FORMAT_VERSION:
            raise CheckpointError(
                f"{source} has format version {version!r}; this kp-plugin reads up to "
                f"{PROTECTION_FORMAT_VERSION}. Upgrade kp-plugin"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        try:
            config = cls(**known)
            config.scheme = list(parse_scheme(config.scheme))
            config._validate()
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{source} is invalid: {exc}") from None
        return config

    def _validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"field {name!r} must be a positive integer, got {value!r}")

        positive_int("block_size")
        positive_int("channels")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError("field 'fingerprint' must be a hex string")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if (
                not isinstance(values, list)
                or len(values) != self.channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in values)
            ):
                raise ValueError(f"field {name!r} must list {self.channels} finite numbers, got {values!r}")
        if any(v == 0 for v in self.std):
            raise ValueError(f"field 'std' must not hold 0 (it divides), got {self.std!r}")
        for name in ("weights_digest", "mac"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"field {name!r} must be text or null, got {getattr(self, name)!r}")
        if self.input_size is not None and (
            not isinstance(self.input_size, list) or len(self.input_size) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in self.input_size)
        ):
            raise ValueError(
                f"field 'input_size' must be [C, H, W] (positive integers) or null, got {self.input_size!r}"
            )

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write ``protection.json`` into ``directory`` atomically; returns its path."""
        path = Path(directory) / PROTECTION_FILE
        _atomic_write(path, self.to_json().encode())
        return path

    @classmethod
    def load(cls, directory: Union[str, os.PathLike]) -> "ProtectionConfig":
        """Read ``protection.json`` from a checkpoint directory (or the file)."""
        path = Path(directory)
        if path.is_dir():
            path = path / PROTECTION_FILE
        elif not path.exists() and path.name != PROTECTION_FILE:
            raise CheckpointError(f"{path} does not exist; give the folder written by save_protected / kp protect")
        elif path.is_file() and path.name != PROTECTION_FILE:  # e.g. out/model.safetensors
            raise CheckpointError(f"{path} is a file; give the checkpoint folder that holds it ({path.parent})")
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            raise CheckpointError(
                f"{path} is missing: {path.parent} is not a kp-plugin protected checkpoint "
                "(save one with kp_plugin.save_protected)"
            ) from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{path} is corrupt (not UTF-8 text); save the model again with save_protected, "
                                  "or download it again") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is corrupt (invalid JSON at line {exc.lineno}); save the model again "
                                  "with save_protected, or download it again") from None
        except (RecursionError, ValueError):  # nested too deeply; an integer of more digits than Python reads
            raise CheckpointError(f"{path} is corrupt (nested too deeply, or a number too long to read); save the "
                                  "model again with save_protected, or download it again") from None
        return cls.from_dict(data, source=str(path))

    def check_key(self, key: SecretKey, *, unsigned: str = "warn", remedy: Optional[str] = None) -> None:
        """Raise :class:`KeyMismatchError` unless ``key`` is the checkpoint's
        key, and :class:`CheckpointError` when the config was changed after
        it was signed (its ``mac`` does not verify with ``key``). A config
        without ``mac`` (``unsigned``): ``"warn"``, an
        :class:`~kp_plugin.errors.UnsignedCheckpointWarning`; ``"error"`` (a
        model from the Hub), a :class:`CheckpointError`; ``"ignore"`` (a
        check before a load that warns itself). ``remedy``: what to do about
        another key, where the loader's own advice does not apply."""
        require_key(key)
        if unsigned not in ("warn", "error", "ignore"):
            raise ValueError(f"unsigned must be 'warn', 'error' or 'ignore', got {unsigned!r}")
        if key.fingerprint == self.fingerprint:
            # The owner's key: a block size or scheme that differs from the
            # key's was edited in this file (the mac says so) or in the key
            # file (it verifies); check the mac first to tell which.
            self._check_mac(key, unsigned)
        check_key_matches(key, fingerprint=self.fingerprint, block_size=self.block_size,
                          scheme=self.scheme, channels=self.channels, remedy=remedy)

    def _check_mac(self, key: SecretKey, unsigned: str) -> None:
        if self.mac is None:
            if unsigned == "ignore":
                return
            # Removing the mac must not pass for a signed file quietly: with it
            # go the checks of the normalization, input size and weights digest.
            why = (f"{PROTECTION_FILE} has no mac, so its settings ({', '.join(MAC_FIELDS)}) and the weights cannot "
                   "be checked against the key (kp-plugin signs every one it writes: this one was written by hand or "
                   "by an old release, or its mac was removed)")
            if unsigned == "error":
                raise CheckpointError(f"{why}; the owner can sign it by loading the model with load_protected, "
                                      "saving it again with save_protected, and pushing that")
            warnings.warn(f"{why}; if you did not write it, restore it from the save; to sign it, save the model "
                          "again with save_protected", UnsignedCheckpointWarning, stacklevel=4)
        elif not hmac.compare_digest(self.mac, self._mac_with(key)):
            raise CheckpointError(
                f"{PROTECTION_FILE} was changed after it was written: its mac does not verify with this key, so one "
                f"of {', '.join(MAC_FIELDS)} (or an export's file digests) was edited; restore it from the save, or "
                "save the model again"
            )

    def sign(self, key: SecretKey) -> "ProtectionConfig":
        """Set :attr:`mac` for the current fields (call it last, before
        writing); returns the config."""
        self.mac = self._mac_with(key)
        return self

    def _mac_with(self, key: SecretKey) -> str:
        body = {name: getattr(self, name) for name in MAC_FIELDS}
        if isinstance(self.extra, dict) and "exported_sha256" in self.extra:
            body["exported_sha256"] = self.extra["exported_sha256"]
        return key._mac(body, label=b"protection")

    def input_size_for(self, key: SecretKey) -> Optional[tuple]:
        """The recorded ``(C, H, W)`` to compile ``key``'s plan for, or
        ``None`` when there is none or it does not fit ``key``'s block size
        (only with ``allow_wrong_key``: a key of another block size)."""
        input_size = tuple(self.input_size) if self.input_size else None
        if input_size is not None and (input_size[1] % key.block_size or input_size[2] % key.block_size):
            return None
        return input_size


#: What to do about a model protected with another key, when loading it.
LOAD_REMEDY = ("Load the owner's key file (SecretKey.load), or pass allow_wrong_key=True to evaluate with a wrong "
               "key on purpose")


def check_key_matches(key: SecretKey, *, fingerprint: str, block_size: int, scheme, channels: int,
                      situation: str = "this model was protected with another key",
                      remedy: Optional[str] = None) -> None:
    """Raise :class:`KeyMismatchError` when ``key`` differs from the expected
    fingerprint / settings; the message shows only public values: what is
    refused (``situation``), how the key differs, and what to do
    (``remedy``; by default :data:`LOAD_REMEDY`)."""
    require_key(key)
    problems = []
    if key.fingerprint != fingerprint:
        problems.append(f"fingerprint {key.fingerprint} (expected {fingerprint})")
    if key.block_size != block_size:
        problems.append(f"block_size {key.block_size} (expected {block_size})")
    if tuple(key.scheme) != tuple(parse_scheme(scheme)):
        problems.append(f"scheme {key.scheme_name} (expected {'+'.join(parse_scheme(scheme))})")
    if key.channels != channels:
        problems.append(f"channels {key.channels} (expected {channels})")
    if problems and key.fingerprint == fingerprint:
        # The same key material with other settings: one of the two files was
        # edited (or the key was made again from its bytes), not another key.
        raise KeyMismatchError(
            f"the key given has the expected fingerprint {fingerprint} but other settings: " + "; ".join(problems)
            + ". The key file or the saved protection settings were changed after saving; use the owner's key "
            "file as it was written and the files as they were saved"
        )
    if problems:
        raise KeyMismatchError(
            f"{situation}: the key given has " + "; ".join(problems) + f". {remedy or LOAD_REMEDY}"
        )


def _architecture_name(model: nn.Module) -> Optional[str]:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        return str(cfg["architecture"])
    hf = getattr(model, "config", None)
    archs = getattr(hf, "architectures", None)
    if archs:
        return str(archs[0])
    if hf is not None and getattr(hf, "model_type", None):
        return type(model).__name__
    return type(model).__name__


def _num_classes(model: nn.Module) -> Optional[int]:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    hf = getattr(model, "config", None)
    n = getattr(hf, "num_labels", None)
    return n if isinstance(n, int) else None


def weights_digest(module: nn.Module) -> str:
    """A short public digest of ``module``'s state dict (names, shapes,
    dtypes and bytes; SHA-256, which CPUs accelerate, cut to 16 hex digits):
    the same weights always give the same one."""
    return _digest_of(sorted(module.state_dict().items()))


def _digest_of(named_tensors: Iterable[tuple]) -> str:
    digest = hashlib.sha256()
    for name, tensor in named_tensors:
        tensor = tensor.detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:16]


def _temporary_beside(path: Path) -> Path:
    """A temporary name in ``path``'s folder, its own per call: two
    processes saving into one folder do not rename each other's files."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def replacing(path: Union[str, os.PathLike], *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path``
    when the block succeeds, removed when it fails, so a failed write (a full
    disk) leaves the file that was there whole. ``durable``: the file is
    fsynced before the rename (a power loss keeps the old file or the new)."""
    path = Path(path)
    remove_stale_temporaries(path.parent, [path.name])  # those a killed write of it left
    tmp = _temporary_beside(path)
    try:
        yield tmp
        if durable:
            _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    with replacing(path, durable=True) as tmp:
        tmp.write_bytes(data)


def save_weights_atomic(module: nn.Module, path: Path, metadata: dict) -> None:
    """``safetensors.torch.save_model`` to a temporary file beside ``path``,
    then renamed over it: a reader never sees half a file, and a failed write
    leaves the previous one in place. Owner-only (0600): it holds the
    unprotected teacher of ``kp protect --distill``."""
    from safetensors import SafetensorError

    try:
        with replacing(path, durable=True) as tmp:
            _save_model_file(module, tmp, Path(path), metadata, owner_only=True)
    except SafetensorError as exc:  # the disk full among them: safetensors' own error, not an OSError
        raise CheckpointWriteError(
            f"cannot write {path} ({first_line(exc)}); the file there before, if any, is unchanged: free some "
            "space or choose another folder"
        ) from None


def _save_model_file(module: nn.Module, tmp: Path, final: Path, metadata: dict, *, owner_only: bool = False) -> None:
    """``safetensors.torch.save_model`` of ``module`` into ``tmp`` (the
    temporary of ``final``), through a scratch folder of this process named
    like the other temporaries of ``final``: safetensors writes a temporary of
    its own (``.tmpXXXXXX``) beside the file it is given, which a killed
    process left in the checkpoint folder for good; in the scratch folder,
    the next save of ``final`` removes it."""
    from safetensors.torch import save_model

    scratch = _temporary_beside(final)
    scratch.mkdir()
    try:
        save_model(module, str(scratch / final.name), metadata=metadata)
        if not owner_only:
            # safetensors' temporary is owner-only (0600), and became the
            # weights file so; weights for publishing are as readable as the
            # files beside them: the mode a new file gets here (the umask's).
            probe = scratch / "mode"
            os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o666))
            os.chmod(scratch / final.name, stat.S_IMODE(os.stat(probe).st_mode))
        os.replace(scratch / final.name, tmp)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


#: timm.create_model arguments that are not architecture (where weights come
#: from: refused when read back), or that config.json records at its top level.
_NOT_MODEL_ARGS = frozenset({"pretrained", "checkpoint_path", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir",
                             "num_classes"})


def _current_global_pool(base: nn.Module) -> Optional[str]:
    """The pooling ``base`` does now, read from the module that pools: timm
    CNNs keep it in a ``SelectAdaptivePool2d`` (``pool_type``), some in their
    head, and ``reset_classifier`` replaces that module; a model-level
    string (ViT) can be all there is. ``""`` (no pooling) counts."""
    head = getattr(base, "head", None)
    for pool in (getattr(head, "global_pool", None), getattr(head, "pool_type", None),
                 getattr(base, "global_pool", None)):
        pool = getattr(pool, "pool_type", pool)
        if isinstance(pool, str):
            return pool
    return None


def _rebuild_args(base: nn.Module, image_size: Optional[tuple], source_size: Any, global_pool: Optional[str]) -> dict:
    """The arguments that rebuild ``base`` with ``timm.create_model``: those
    kp_plugin.timm recorded, updated from timm's own record where timm keeps
    one (``_model_args``, kept current through ``reset_classifier`` and
    resizes: ViT's ``img_size``, ``patch_size``, ``fc_norm``), else a patch
    embedding's image size (``image_size``) when it differs from
    ``pretrained_cfg``'s (``source_size``): a ViT made with ``img_size=32``
    and wrapped would be rebuilt at timm's default 224, and its weights would
    not fit. A creation's ``global_pool`` becomes the pooling the model does
    now (``reset_classifier`` changes it)."""
    args = dict(getattr(base, "kp_model_args", None) or {})  # set by kp_plugin.timm for its creation kwargs
    recorded = getattr(base, "_model_args", None)
    for name, value in (recorded.items() if isinstance(recorded, dict) else ()):
        try:
            json.dumps(value)
        except (TypeError, ValueError):  # a layer class, say: a kp record, if any, stays
            continue
        if name not in _NOT_MODEL_ARGS:
            args[name] = list(value) if isinstance(value, tuple) else value
    if image_size is not None and "img_size" not in args and (
            not isinstance(source_size, (tuple, list)) or tuple(source_size[-2:]) != image_size):
        args["img_size"] = image_size[0] if image_size[0] == image_size[1] else list(image_size)
    if global_pool is not None and "global_pool" in args:
        args["global_pool"] = global_pool
    return args


def _native_config(base: nn.Module) -> Optional[dict]:
    """timm's hub ``config.json`` for timm models (duck-typed, no timm import)."""
    cfg = getattr(base, "pretrained_cfg", None)
    if not isinstance(cfg, dict):
        return None
    pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("url", "file", "hf_hub_id", "hf_hub_filename", "source", "state_dict")}
    out = {
        "architecture": cfg.get("architecture"),
        "num_classes": getattr(base, "num_classes", None),
        "num_features": getattr(base, "num_features", None),
        "pretrained_cfg": pretrained_cfg,
    }
    global_pool = _current_global_pool(base)
    if global_pool is not None:
        out["global_pool"] = global_pool
    out["pretrained_cfg"]["num_classes"] = out["num_classes"]
    size = fixed_image_size(base)
    input_size = cfg.get("input_size")
    if size is not None and isinstance(input_size, (tuple, list)) and len(input_size) == 3:
        # timm leaves pretrained_cfg at the weights' source size (224) when
        # a ViT is made for another; the data pipeline must see the real one.
        pretrained_cfg["input_size"] = (input_size[0], *size)
    model_args = _rebuild_args(base, size, input_size, global_pool)
    if model_args:
        out["model_args"] = model_args
    return out


_KEY_FILE_FORMAT_BYTES = KEY_FILE_FORMAT.encode()


class _KeyFileMarker:
    """The ``format`` field of a kp-plugin key file, however the JSON was
    laid out (any spacing around the colon, single quotes as Python prints
    a dict) and however often it was escaped inside other JSON or text: a
    scanner needle like :class:`~kp_plugin.keys.NumberSequence`."""

    _regex = re.compile(rb"""\\*["']format\\*["']\s{0,16}:\s{0,16}\\*["']""" + re.escape(KEY_FILE_FORMAT.encode())
                        + rb"""\\*["']""")
    #: The longest text a match can span (scanners overlap chunks by it).
    max_length = 256

    def found_in(self, data: bytes) -> bool:
        # The literal first (memmem, fast): the pattern has no literal prefix,
        # so the regex alone tries every position of a weights file.
        return _KEY_FILE_FORMAT_BYTES in data and self._regex.search(data) is not None

    def __repr__(self) -> str:
        return "KeyFileMarker()"


#: Needles that mark a kp-plugin key file, however it was serialized.
KEY_FILE_MARKERS = (_KeyFileMarker(),)
_SCAN_CHUNK = 16 << 20


def file_contains_any(path: Path, needles: list, chunk_size: int = _SCAN_CHUNK) -> bool:
    """Whether any needle (bytes, or a :class:`~kp_plugin.keys.NumberSequence`)
    occurs in the file, read in chunks that overlap by the longest possible
    match, so a large weights file never sits in memory whole."""
    overlap = max(len(n) if isinstance(n, (bytes, bytearray)) else n.max_length for n in needles) - 1
    tail = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(chunk_size)
            if not chunk:
                return False
            window = tail + chunk
            if bytes_contain_any(window, needles):
                return True
            tail = window[-overlap:] if overlap else b""


def bytes_contain_any(data: bytes, needles: list) -> bool:
    """Whether any needle (bytes, or a :class:`~kp_plugin.keys.NumberSequence`)
    occurs in ``data``: the scan of a file's content before it is written."""
    return any(n in data if isinstance(n, (bytes, bytearray)) else n.found_in(data) for n in needles)


def find_key_material(directory: Union[str, os.PathLike], key: SecretKey) -> list:
    """Files under ``directory`` (or the file itself) that contain ``key``'s
    material (raw bytes, hex, base64, the serialized pixel permutation; see
    :meth:`SecretKey.secret_forms`) or that are a kp-plugin key file.

    Returns their paths, never the match.

    Example:
        >>> assert find_key_material("out/", key) == []      # doctest: +SKIP
    """
    needles = leak_needles(key)
    root = Path(directory)
    # os.walk, not rglob: a folder another writer removes during the scan
    # (its scratch folder) is skipped, where rglob raised FileNotFoundError.
    files = [root] if root.is_file() else sorted(
        path for folder, _, names in os.walk(root) for path in (Path(folder) / name for name in names)
        if path.is_file())
    return [path for path in files if still_there_and_contains(path, needles)]


def still_there_and_contains(path: Path, needles: list) -> bool:
    """:func:`file_contains_any`, False for a file removed since it was listed."""
    try:
        return file_contains_any(path, needles)
    except FileNotFoundError:  # gone since the listing (another writer's temporary file): nothing left to leak
        return False


def leak_needles(key: Optional[SecretKey]) -> list:
    """What the leak scanners look for: ``key``'s byte forms and text
    patterns (:meth:`SecretKey.secret_forms`, :meth:`SecretKey.secret_patterns`),
    and key files of any key (their format marker); only the latter without ``key``."""
    forms = list(key.secret_forms()) + list(key.secret_patterns()) if key is not None else []
    return forms + list(KEY_FILE_MARKERS)


def refuse_key_material(directory: Union[str, os.PathLike], key: SecretKey, *,
                        remedy: str = "remove these files before sharing") -> None:
    """:class:`KeyLeakError` naming the files under ``directory`` that
    :func:`find_key_material` finds (never the match), with ``remedy``."""
    leaks = find_key_material(directory, key)
    if leaks:
        root = Path(directory)
        names = ", ".join(p.relative_to(root).as_posix() if root.is_dir() else p.name for p in leaks)
        raise KeyLeakError(f"key material found in {names} under {directory}; {remedy}")


def held_fingerprint(directory: Union[str, os.PathLike]) -> Optional[str]:
    """The key fingerprint of the model saved in ``directory``; ``None``
    when there is none, or its ``protection.json`` is corrupt (no model to
    lose)."""
    if not (Path(directory) / PROTECTION_FILE).is_file():
        return None
    try:
        return ProtectionConfig.load(directory).fingerprint
    except CheckpointError:
        return None


def hash_file(path: Union[str, os.PathLike], digest: Any) -> Any:
    """``digest`` (a hashlib object) updated with the bytes of the file at
    ``path``, read in 1 MiB pieces; returns it."""
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def refuse_other_key_checkpoint(directory: Union[str, os.PathLike], fingerprint: str, *,
                                remedy: str = "pass overwrite=True") -> None:
    """:class:`CheckpointError` when ``directory`` holds a checkpoint of a
    key other than ``fingerprint``: writing there would lose that model
    (its key would open nothing). A corrupt or absent ``protection.json`` is
    no model to lose."""
    held = held_fingerprint(directory)
    if held is not None and held != fingerprint:
        raise CheckpointError(
            f"{directory} holds a model protected with another key (fingerprint {held}); writing this one "
            f"(fingerprint {fingerprint}) there would replace it: choose another folder, or {remedy}"
        )


def save_protected(
    model: ProtectedModel,
    directory: Union[str, os.PathLike],
    *,
    metadata: Optional[dict] = None,
    overwrite: bool = False,
) -> Path:
    """Save a protected model: weights + ``protection.json`` (+ native
    ``config.json``), never the key.

    Args:
        model: a :class:`ProtectedModel` (from :func:`wrap_model`).
        directory: created if needed; existing files of the same names are
            replaced (a checkpoint of the same key: saving again after
            more training).
        metadata: extra public string values for ``protection.json``'s
            ``extra`` field (e.g. dataset name, accuracy).
        overwrite: replace a checkpoint of *another* key there too (by
            default :class:`CheckpointError`: that model would be lost).

    Returns:
        The directory.

    Raises:
        KeyLeakError: the metadata, the model config or the weights hold
            key material, or a file already in ``directory`` does (a key
            file kept there: move it out); nothing is written.
        CheckpointError: ``directory`` holds another key's checkpoint, or
            the weights cannot be written (the previous ones stay).

    Example:
        >>> save_protected(model, "out/")                    # doctest: +SKIP
    """
    model = require_protected(model, "save_protected")  # also through torch.compile / DDP
    return _save_protected(model, Path(directory), metadata, overwrite,
                           weights_digest(_uncompiled(model.unwrap())))


@contextlib.contextmanager
def folder_lock(directory: Path, *, shared: bool = False) -> Iterator[None]:
    """An advisory lock (``flock``) on the folder itself, no file made:
    :func:`save_protected` holds it exclusively from its checks to its last
    rename, so two saves into one folder run one after the other (both said
    they saved, and the folder held one of them, or a mix); a reader that
    must take one save whole (a push taking the files it sends) holds it
    shared. Where folders cannot be locked (not POSIX, some network file
    systems) it does nothing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _save_protected(model: ProtectedModel, directory: Path, metadata: Optional[dict], overwrite: bool,
                    digest: str) -> Path:
    """:func:`save_protected` with the weights' digest already computed (a
    training checkpoint records it in its state too, hashing the weights once)."""
    base = _uncompiled(model.unwrap())
    config = ProtectionConfig.from_model(model, **(metadata or {}))
    config.weights_digest = digest
    config.sign(model.key)
    text = config.to_json()  # before anything is written: bad metadata must not leave new weights beside an old one
    needles = leak_needles(model.key)
    if bytes_contain_any(text.encode(), needles):
        # Found after writing, the key would already be on disk.
        raise KeyLeakError("the metadata for protection.json contains key material; remove it (nothing was written)")
    hf_config = getattr(base, "config", None)
    hf_style = hf_config is not None and hasattr(hf_config, "to_json_string") and hasattr(hf_config, "save_pretrained")
    if hf_style:
        # As transformers' own save_pretrained does: name the class, so
        # AutoModel-style loading rebuilds this architecture.
        hf_config.architectures = [type(base).__name__]
    native = None if hf_style else _native_config(base)
    config_text = (hf_config.to_json_string() if hf_style else
                   None if native is None else json.dumps(native, indent=2, sort_keys=True, default=str) + "\n")
    if config_text is not None and bytes_contain_any(config_text.encode(), needles):
        raise KeyLeakError(f"the model's configuration ({CONFIG_FILE}) contains key material; remove it from the "
                           "model's config (nothing was written)")
    try:  # a name too long, a folder under a file, a read-only place: OSError from the checks already
        if directory.exists() and not directory.is_dir():
            raise CheckpointError(f"{directory} is a file; save_protected writes a folder: pass a folder path")
        directory.mkdir(parents=True, exist_ok=True)
    except CheckpointError:
        raise
    except OSError as exc:
        raise CheckpointWriteError(f"cannot create the folder {directory} ({first_line(exc)}); nothing was "
                                   "written: choose another folder") from None
    metadata = {
        "format": "pt",
        "kp_format": PROTECTION_FORMAT,
        "kp_format_version": str(PROTECTION_FORMAT_VERSION),
        "kp_fingerprint": model.key.fingerprint,
        "kp_weights_digest": config.weights_digest,
    }
    files = [(PROTECTION_FILE, text.encode())] + ([(CONFIG_FILE, config_text.encode())] if config_text else [])
    with folder_lock(directory):
        # Under the lock, so a save that finished while this one waited is seen.
        if not overwrite:
            refuse_other_key_checkpoint(directory, model.key.fingerprint)
        # A key file (any key's) or key material already in the folder: refused
        # before writing, as the files written are scanned before they are
        # renamed in (_write_all); the folder is what gets published.
        refuse_key_material(directory, model.key, remedy="move them out of the folder first (nothing was written)")
        _write_all(directory, files, weights=(base, metadata), needles=needles)
    return directory


def _write_all(directory: Path, files: list, *, weights: Optional[tuple] = None,
               needles: Optional[list] = None) -> None:
    """Write ``files`` (name, bytes) and the weights ``(module, metadata)``
    into ``directory``, each to a temporary file first (fsynced); only when
    every one is written are they renamed into place (the weights first,
    ``protection.json`` last). A failed write (a full disk) leaves the
    checkpoint that was there whole: :class:`CheckpointError` naming the
    file; so does a failure or an interrupt (Ctrl-C) between the renames,
    which puts the previous files back (:func:`_swap_in`). With ``needles``
    (:func:`leak_needles`), a written file that holds one is a
    :class:`KeyLeakError` before any rename: the key never reaches the
    folder (a base model with the key in a buffer, say)."""
    from safetensors import SafetensorError

    names = [name for name, _ in files] + ([WEIGHTS_FILE] if weights is not None else [])
    remove_stale_temporaries(directory, names)  # those a stopped save into this folder left
    name = None
    staged: list = []  # (temporary file, final path), in writing order

    def stage(write: Callable[[Path], Any]) -> None:
        tmp = _temporary_beside(directory / name)
        staged.append((tmp, directory / name))
        write(tmp)
        _fsync_file(tmp)

    try:
        try:
            for name, data in files:
                stage(lambda tmp: tmp.write_bytes(data))
            if weights is not None:
                name = WEIGHTS_FILE
                stage(lambda tmp: _save_model_file(weights[0], tmp, directory / WEIGHTS_FILE, weights[1]))
            name = None
            leaks = [final.name for tmp, final in staged if needles and file_contains_any(tmp, needles)]
            if leaks:
                raise KeyLeakError(f"key material found in {', '.join(leaks)} for {directory}: the model holds the "
                                   "key (a buffer or parameter that stores it?); remove it from the model "
                                   "(nothing was written)")
            _swap_in(list(reversed(staged)))  # the renames
        finally:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
    except (SafetensorError, OSError) as exc:
        where = directory / name if name else directory
        raise CheckpointWriteError(
            f"cannot write {where} ({first_line(exc)}); the checkpoint there before, if any, is unchanged: "
            "free some space or choose another folder"
        ) from None


def write_together(writes: Sequence[tuple]) -> None:
    """Write ``(path, write)`` pairs as one change: ``write(tmp)`` fills a
    temporary file beside ``path``; when every one is written they are
    renamed in, in the order given (:func:`_swap_in`: a failed rename puts
    the previous files back), and no temporary stays behind. The
    temporaries that killed writes of these names left are removed first."""
    for folder in {Path(path).parent for path, _ in writes}:
        remove_stale_temporaries(folder, [Path(path).name for path, _ in writes if Path(path).parent == folder])
    staged: list = []
    try:
        for path, write in writes:
            staged.append((_temporary_beside(Path(path)), Path(path)))
            write(staged[-1][0])
        _swap_in(staged)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _swap_in(moves: list) -> None:
    """Rename each ``(temporary, final)`` pair in order. The files they
    replace are kept (hard links) until all are in place; if one rename
    fails or is interrupted, the ones done are undone, so the folder holds
    the previous save, not a mix of two. (A process killed outright leaves
    those links, named ``.NAME.PID.XXXX.tmp``, beside the files; the next
    save into the folder removes them, :func:`remove_stale_temporaries`.)"""
    done: list = []  # (final path, its previous file's link or None)
    try:
        for tmp, final in moves:
            previous = None
            if final.exists():
                previous = _temporary_beside(final)
                try:
                    os.link(final, previous)
                except OSError:  # a file system without hard links: a copy
                    shutil.copy2(final, previous)
            done.append((final, previous))
            os.replace(tmp, final)
    except BaseException:
        for final, previous in reversed(done):
            if previous is not None:
                os.replace(previous, final)
            else:
                final.unlink(missing_ok=True)  # the previous save had no such file
        raise
    finally:
        for _, previous in done:
            if previous is not None:
                previous.unlink(missing_ok=True)


def usable_device(device: Union[None, str, torch.device], *, what: str = "device") -> torch.device:
    """``torch.device(device)``, checked to exist on this machine, so that a
    typo or a missing GPU is named as such (:class:`ConfigurationError`)
    instead of surfacing from deep inside a load as a corrupt file or a
    weight mismatch. ``None``: CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigurationError(f"{what} {device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(f"{what} {device} asks for a GPU but torch sees none here; use 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ConfigurationError(f"{what} {device}: this machine has {torch.cuda.device_count()} GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigurationError(f"{what} {device}: the MPS backend is not available here; use 'cpu'")
    return resolved


def _materialize_meta(base: nn.Module, saved: set, weights: Path, device: Union[str, torch.device]) -> None:
    """Give a model built on the meta device (no memory until loaded)
    storage on ``device`` for the weights to be copied into, after checking
    that the file fills every tensor (the rest would hold garbage)."""
    tensors = dict(base.named_parameters(remove_duplicate=False))
    tensors.update(base.named_buffers(remove_duplicate=False))
    meta = [name for name, tensor in tensors.items() if tensor.is_meta]
    if not meta:
        return
    filled = {id(tensors[name]) for name in saved if name in tensors}  # a tied tensor is filled under any name
    unfilled = [name for name in meta if id(tensors[name]) not in filled]
    if unfilled:
        raise CheckpointError(
            f"the model was built on the meta device and {len(unfilled)} of its tensors are not in {weights} "
            f"({', '.join(unfilled[:3])}{', ...' if len(unfilled) > 3 else ''}), so they would hold no values; "
            "build the model on a real device (e.g. without `with torch.device('meta')`)"
        )
    base.to_empty(device=device)


def _uncompiled(base: nn.Module) -> nn.Module:
    """The module ``torch.compile`` wrapped (``_orig_mod``), so weights keep
    the model's own names, not ``_orig_mod.``-prefixed ones."""
    inner = getattr(base, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else base


def load_error_summary(exc: BaseException, limit: int = 3) -> str:
    """What torch's ``load_state_dict`` error says, shortened: the first
    ``limit`` problems (size mismatches, missing and unexpected keys) and how
    many more, instead of only its headline "Error(s) in loading ..."."""
    lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if not lines:
        return str(exc).strip() or type(exc).__name__
    shown = [line.replace("copying a param with shape ", "").replace("torch.Size", "") for line in lines[:limit]]
    shown = [line if len(line) < 300 else line[:300] + "..." for line in shown]
    more = f"; and {len(lines) - limit} more" if len(lines) > limit else ""
    return "; ".join(line.rstrip(".") for line in shown) + more


def _saved_by_transformers(base: nn.Module, metadata: dict) -> bool:
    """Weights that transformers' ``save_pretrained`` wrote (no kp metadata)
    for a transformers model: processor style, where the Trainer saves the
    plain model and protection.json goes beside it. transformers 5 writes
    them under its checkpoint names (ViT: ``encoder.layer.0.attention...``)
    and renames them when loading; ``save_protected`` writes the model's own."""
    transformers = sys.modules.get("transformers")  # a transformers model means it is imported
    return (transformers is not None and isinstance(base, transformers.PreTrainedModel)
            and "kp_fingerprint" not in metadata)


def _load_through_transformers(base: nn.Module, directory: Path, strict: bool) -> None:
    """Load such weights with transformers' own renaming, then into ``base``.
    ``from_pretrained`` initializes what the file does not hold and only logs
    it: with ``strict`` that is an error here, not a model of random weights."""
    loaded, info = type(base).from_pretrained(str(directory), config=base.config, local_files_only=True,
                                              use_safetensors=True, trust_remote_code=False, output_loading_info=True)
    problems = [(kind, sorted(info.get(kind) or [])) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")]
    problems = [(kind, names) for kind, names in problems if names]
    if strict and problems:
        detail = "; ".join(f"{len(names)} {kind.replace('_', ' ')} (e.g. {names[0]})" for kind, names in problems)
        raise RuntimeError(f"transformers could not place the saved weights: {detail}")
    _load_state(base, loaded.state_dict(), strict)


def _load_state(base: nn.Module, state: dict, strict: bool) -> None:
    """``base.load_state_dict``, assigning the tensors where ``base`` is still
    on the meta device (nothing to copy into)."""
    base.load_state_dict(state, strict=strict, assign=any(t.is_meta for t in base.parameters()))


def _saved_with_wrapper_names(base: nn.Module, saved: set) -> bool:
    """Weights saved from the ProtectedModel itself (``model.`` before every
    name), as a plain ``Trainer`` saves a model it does not know."""
    return bool(saved) and all(name.startswith("model.") for name in saved) and not any(
        name.startswith("model.") for name in base.state_dict())


def _load_wrapper_names(base: nn.Module, weights: Path, strict: bool, device) -> None:
    from safetensors.torch import load_file

    state = {name[len("model."):]: value for name, value in load_file(str(weights), device=str(device)).items()}
    _load_state(base, state, strict)


def read_weights_header(weights: Path, config: "ProtectionConfig") -> tuple:
    """``(metadata, tensor names)`` of a safetensors file, checked to be
    whole (its header and the size it declares) and saved for the key
    ``config`` names; :class:`CheckpointError` naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), framework="pt") as fh:
            meta = fh.metadata() or {}
            saved = set(fh.keys())
    except SafetensorError as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file ({exc}); save the model again") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from None
    if meta.get("kp_fingerprint") not in (None, config.fingerprint):
        raise CheckpointError(
            f"{weights} was saved for key {meta.get('kp_fingerprint')} but {PROTECTION_FILE} "
            f"names {config.fingerprint}; the files come from different checkpoints"
        )
    if meta.get("kp_weights_digest") and config.weights_digest and meta["kp_weights_digest"] != config.weights_digest:
        raise CheckpointError(
            f"{weights} and {PROTECTION_FILE} beside it come from different saves (weights digests "
            f"{meta['kp_weights_digest']} and {config.weights_digest}): a save into this folder was interrupted "
            "between its files, or the files were copied from two checkpoints; save the model again, or restore "
            "both files from one save"
        )
    return meta, saved


def _check_loaded_digest(base: nn.Module, weights: Path, config: "ProtectionConfig") -> None:
    """The weights loaded are the ones ``protection.json`` was saved with.
    The header's digest only shows which save a file claims to come from:
    a file written by other code (no header) or one whose header was copied
    passes that check with other weights. A model of other dtypes than the
    file's (the values were converted as they loaded) is checked by the
    digest of the file's tensors as stored."""
    from safetensors import safe_open

    if weights_digest(base) == config.weights_digest:
        return
    state = base.state_dict()
    with safe_open(str(weights), framework="pt") as fh:
        stored = {name: str(fh.get_slice(name).get_dtype()) for name in fh.keys() if name in state}
        # Integer or bool values loaded into float weights were truncated (all
        # zero for most): not a conversion of the saved model.
        truncated = sorted(name for name, dtype in stored.items()
                           if state[name].is_floating_point() and dtype not in _FLOAT_DTYPES)
        if truncated:
            raise CheckpointError(
                f"{weights} holds {stored[truncated[0]]} values for float weights ({', '.join(truncated[:3])}"
                f"{', ...' if len(truncated) > 3 else ''}): not the saved model's; save the model again, or restore "
                "the file from that save"
            )
        converted = any(dtype != _SAFETENSORS_DTYPES.get(state[name].dtype) for name, dtype in stored.items())
        if converted and _stored_digest(state, fh) == config.weights_digest:
            return
    raise CheckpointError(
        f"the weights in {weights} are not the ones {PROTECTION_FILE} beside it was saved with (their digest differs "
        f"from its weights_digest {config.weights_digest}): the file was replaced or changed after the save (e.g. "
        "other weights uploaded over it); save the model again, or restore the file from that save"
    )


def _stored_digest(state: dict, fh: Any) -> Optional[str]:
    """:func:`weights_digest` of the module that wrote the open safetensors
    file ``fh``, from the file's tensors as stored (names, shapes, dtypes,
    bytes). A tensor the file left out as shared with another (tied
    weights) is read under that name; ``None`` where one cannot be found."""
    names = set(fh.keys())
    by_storage = {}
    for name, tensor in state.items():
        if name in names and tensor.device.type != "meta":
            by_storage.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), name)
    sources = {}
    for name, tensor in state.items():
        sources[name] = name if name in names else by_storage.get((tensor.untyped_storage().data_ptr(),
                                                                    tensor.storage_offset()))
        if sources[name] is None:
            return None
    return _digest_of((name, fh.get_tensor(sources[name])) for name in sorted(state))


#: safetensors' names of float dtypes.
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

#: torch dtypes as safetensors names them.
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def load_protected(
    directory: Union[str, os.PathLike],
    model: nn.Module,
    key: SecretKey,
    *,
    allow_wrong_key: bool = False,
    strict: bool = True,
    device: Union[str, torch.device] = "cpu",
) -> ProtectedModel:
    """Load a protected checkpoint into ``model`` and wrap it with ``key``.

    Args:
        directory: written by :func:`save_protected`.
        model: the base architecture (fresh, e.g. ``timm.create_model(name,
            num_classes=10)``), or a :class:`ProtectedModel` whose base is used.
            It may be built on the meta device (``with torch.device("meta")``):
            it then gets storage on ``device`` and the checkpoint's values,
            provided the checkpoint holds every tensor of it.
        key: the owner's key.
        allow_wrong_key: load even if ``key`` is not the checkpoint's key
            (for wrong-key evaluation and attacks).
        strict: require the weights to match the architecture exactly.
        device: where to load the weights.

    Returns:
        The :class:`ProtectedModel`, in eval mode (dropout off, batch-norm
        running statistics), as transformers' ``from_pretrained`` returns
        models; call ``.train()`` before fine-tuning it further.

    Raises:
        ConfigurationError: ``device`` is not a device of this machine.
        KeyMismatchError: ``key`` is not the checkpoint's key.
        CheckpointError: a file is missing or corrupt, or the weights do not
            fit ``model``.

    Example:
        >>> base = timm.create_model("resnet18", num_classes=10)            # doctest: +SKIP
        >>> model = load_protected("out/", base, SecretKey.load("owner.key"))  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    require_key(key)
    device = usable_device(device)
    directory = Path(directory)
    if directory.is_file():  # out/protection.json: its weights were looked for as out/protection.json/model.safetensors
        raise CheckpointError(f"{directory} is a file; give the checkpoint folder that holds it ({directory.parent})")
    config = ProtectionConfig.load(directory)
    if not allow_wrong_key:
        config.check_key(key)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; the checkpoint is incomplete")
    given = model.unwrap() if isinstance(model, ProtectedModel) else model
    base = _uncompiled(given)  # loaded under its own names; what was given (compiled or not) is wrapped
    meta, saved = read_weights_header(weights, config)
    try:
        if _saved_with_wrapper_names(base, saved):
            _load_wrapper_names(base, weights, strict, device)
        elif _saved_by_transformers(base, meta):
            _load_through_transformers(base, directory, strict)
        else:
            _materialize_meta(base, saved, weights, device)
            load_model(base, str(weights), strict=strict, device=str(device))
            if strict and config.weights_digest:
                _check_loaded_digest(base, weights, config)
    except SafetensorError as exc:
        raise CheckpointError(f"{weights} is corrupt or not a safetensors file ({exc})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from None
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {weights} do not fit {type(base).__name__} ({load_error_summary(exc)}); "
            "create the model with the same architecture and num_classes as when it was saved"
        ) from None
    given.to(device)
    input_size = config.input_size_for(key)
    protected = wrap_model(given, key, mean=config.mean, std=config.std, input_size=input_size)
    if input_size is not None:
        protected.keyed.trained_size = tuple(input_size[1:])
    # As transformers' from_pretrained: a model called in training mode right
    # after loading gave batch-statistics outputs and moved its running
    # statistics for good.
    return protected.eval()
