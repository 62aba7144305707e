"""Secret keys: generation, key files, fingerprints and the derivation of every
secret object the keyed transform uses.

A :class:`SecretKey` is 256 random bits plus the public choices that go with
them (block size, scheme, channel count). Everything secret the transform
needs (the pixel permutation, the negative/positive mask, the value shifts,
the FFX bijections, the block permutation) is derived from the 256 bits by a
versioned procedure written down in ``docs/key-format.md``: HMAC-SHA256 as a
PRF in counter mode, rejection sampling, Fisher-Yates. The same key file
gives the same transform on every machine, OS, device and library version;
golden vectors in the tests pin it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import hmac
import json
import operator
import os
import re
import secrets
import stat
import tempfile
import warnings
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Iterable, Iterator, Union

from ._files import remove_stale_temporaries
from .errors import (ConfigurationError, KeyFileError, KeyFileExistsError, KeyFilePermissionWarning, KeyFileWriteError,
                     KeyPicklingError, KeyTypeError)

__all__ = [
    "SecretKey",
    "Scheme",
    "STEPS",
    "PAPER_SCHEME",
    "DEFAULT_SCHEME",
    "DEFAULT_BLOCK_SIZE",
    "parse_scheme",
    "scheme_name",
    "KEY_FILE_FORMAT",
    "KEY_FILE_VERSION",
    "DERIVATION_VERSION",
    "FFX_ROUNDS",
    "require_key",
]

#: The largest block size and channel count a key takes: a block of
#: 1024 x 1024 x 64 values is already far beyond any image; larger ones only
#: ended in a MemoryError when the permutation was first derived.
MAX_BLOCK_SIZE = 1024
MAX_CHANNELS = 64

#: The steps a scheme can use, in the order DESIGN.md applies them.
#: ``shuffle``: pixel shuffling inside each block (the paper's);
#: ``np``: negative/positive flipping; ``shift``: a cyclic shift of 8-bit
#: values per position; ``ffx``: a keyed bijection of 8-bit values per
#: position; ``scramble``: a permutation of the blocks themselves.
STEPS: tuple[str, ...] = ("shuffle", "np", "shift", "ffx", "scramble")

_ALIASES = {
    "pixel-shuffle": "shuffle",
    "pixel_shuffle": "shuffle",
    "shuffling": "shuffle",
    "negative-positive": "np",
    "negative_positive": "np",
    "flip": "np",
    "cyclic-shift": "shift",
    "value-shift": "shift",
    "block-scramble": "scramble",
    "block_scramble": "scramble",
    "scrambling": "scramble",
}

Scheme = tuple  # a canonical, ordered tuple of step names

#: The paper's recipe (AprilPyone & Kiya 2021): block-wise pixel shuffling
#: alone. Kept for comparison: measured here, it leaks through block
#: statistics (see docs/benchmarks.md).
PAPER_SCHEME: Scheme = ("shuffle",)

#: The library's default scheme, chosen by measurement (docs/recipe.md):
#: pixel shuffling + negative/positive flips + block scrambling. Flips stop
#: the leak through block statistics; scrambling the blocks stops the rest
#: of it, the coarse picture that a block's key-independent statistics
#: still draw (on digits at the demo setting, without it the worst of 100
#: wrong keys reached 28-47%; with it, 12-24% in every run).
DEFAULT_SCHEME: Scheme = ("shuffle", "np", "scramble")

DEFAULT_BLOCK_SIZE = 16

KEY_FILE_FORMAT = "kp-plugin-key"
KEY_FILE_VERSION = 1
DERIVATION_VERSION = 1
#: Feistel rounds of the FFX bijection on bytes (two 4-bit halves).
FFX_ROUNDS = 8

_KEY_BYTES = 32
_CREATED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_CREATED_RULE = "created must be a UTC time written YYYY-MM-DDTHH:MM:SSZ"
_PRF_PREFIX = b"kp-plugin/v%d/" % DERIVATION_VERSION


def parse_scheme(scheme: Union[str, Iterable[str]]) -> Scheme:
    """Return the canonical tuple for a scheme given as ``"shuffle+np"`` or a
    sequence of step names.

    Steps are put in DESIGN.md's order whatever order they are given in;
    unknown or repeated steps are an error.

    Example:
        >>> parse_scheme("np+shuffle")
        ('shuffle', 'np')
    """
    if isinstance(scheme, str):
        parts = [p for p in scheme.replace(",", "+").split("+")]
    else:
        parts = list(scheme)
    steps = []
    for part in parts:
        if not isinstance(part, str):
            raise ConfigurationError(f"scheme steps are strings, got {type(part).__name__}")
        name = _ALIASES.get(part.strip().lower(), part.strip().lower())
        if name not in STEPS:
            raise ConfigurationError(
                f"unknown scheme step {part!r}; choose from {', '.join(STEPS)} "
                f"(e.g. 'shuffle+np')"
            )
        if name in steps:
            raise ConfigurationError(f"scheme step {name!r} is given twice")
        steps.append(name)
    if not steps:
        raise ConfigurationError("a scheme needs at least one step, e.g. 'shuffle+np'")
    return tuple(s for s in STEPS if s in steps)


def scheme_name(scheme: Union[str, Iterable[str]]) -> str:
    """The canonical string form of a scheme, e.g. ``"shuffle+np"``."""
    return "+".join(parse_scheme(scheme))


# --------------------------------------------------------------------------
# The derivation procedure (spec: docs/key-format.md)
# --------------------------------------------------------------------------


def _prf_stream(material: bytes, label: str) -> Iterator[int]:
    """Bytes of HMAC-SHA256(key, prefix || label || 0x00 || counter_be32),
    counter = 0, 1, 2, ..., concatenated."""
    head = _PRF_PREFIX + label.encode("ascii") + b"\x00"
    counter = 0
    while True:
        block = hmac.new(material, head + counter.to_bytes(4, "big"), hashlib.sha256).digest()
        yield from block
        counter += 1


def _prf_bytes(material: bytes, label: str, n: int) -> bytes:
    """The first ``n`` bytes of the label's stream (whole HMAC blocks joined)."""
    head = _PRF_PREFIX + label.encode("ascii") + b"\x00"
    blocks = (n + 31) // 32
    data = b"".join(
        hmac.new(material, head + i.to_bytes(4, "big"), hashlib.sha256).digest() for i in range(blocks)
    )
    return data[:n]


class _UniformSampler:
    """Uniform integers below ``n`` from a PRF stream: big-endian 32-bit words,
    rejection sampling so that no value is more likely than another."""

    def __init__(self, material: bytes, label: str) -> None:
        self._stream = _prf_stream(material, label)

    def word(self) -> int:
        s = self._stream
        return (next(s) << 24) | (next(s) << 16) | (next(s) << 8) | next(s)

    def below(self, n: int) -> int:
        limit = (1 << 32) // n * n
        while True:
            w = self.word()
            if w < limit:
                return w % n


def _derive_permutation(material: bytes, label: str, n: int) -> list[int]:
    """Fisher-Yates: for i = n-1 .. 1, swap a[i] with a[uniform(i + 1)]."""
    a = list(range(n))
    sampler = _UniformSampler(material, label)
    for i in range(n - 1, 0, -1):
        j = sampler.below(i + 1)
        a[i], a[j] = a[j], a[i]
    return a


def _derive_bits(material: bytes, label: str, n: int) -> list[int]:
    """Bit k is bit (7 - k % 8) of stream byte k // 8 (most significant first)."""
    raw = _prf_bytes(material, label, (n + 7) // 8)
    return [(raw[k >> 3] >> (7 - (k & 7))) & 1 for k in range(n)]


def _feistel_tables(material: bytes, length: int) -> list[list[int]]:
    """Per position p, the bijection of 0..255 given by an FFX_ROUNDS-round
    Feistel network on two 4-bit halves, with round functions read from the
    ``ffx-rounds`` stream as nibbles (high nibble first)."""
    import torch  # vectorized over positions and values: ~1000x faster than Python loops

    rounds = FFX_ROUNDS
    raw = _prf_bytes(material, f"ffx-rounds/L={length}", length * rounds * 8)
    packed = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(length, rounds, 8)
    values = torch.arange(256)
    tables = []
    # Chunks of 64 positions keep each op below torch's parallel grain size:
    # on a busy machine, waking threads for such small ops costs far more.
    for start in range(0, length, 64):
        chunk = packed[start:start + 64].long()
        # Round function r of position p: 16 nibbles, high nibble of each byte first.
        funcs = torch.stack([chunk >> 4, chunk & 15], dim=-1).view(chunk.shape[0], rounds, 16)
        a = (values >> 4).expand(chunk.shape[0], 256)
        b = (values & 15).expand(chunk.shape[0], 256)
        for r in range(rounds):
            a, b = b, a ^ torch.gather(funcs[:, r], 1, b)
        tables += ((a << 4) | b).tolist()
    return tables


PathLike = Union[str, "os.PathLike[str]"]


#: Permutations shorter than this are not scanned for: their serialized
#: forms ("[0]", "[1, 0, 2]") occur in ordinary files, and so few orders are
#: no secret anyway (block size 1 with one channel has L = 1).
MIN_SCANNED_PERMUTATION = 8

#: Separators allowed between the numbers of a :class:`NumberSequence`:
#: whitespace, commas, semicolons, and whitespace as JSON or a Python
#: string escapes it (``\\n``, ``\\r``, ``\\t``: numbers joined by newlines
#: inside a JSON string).
_SEPARATOR = rb"(?:[\s,;]|\\[nrt]){1,16}"


class NumberSequence:
    """Decimal numbers in order, separated by whitespace, commas or
    semicolons (at most 16 between two; whitespace escaped as in JSON, ``\\n``,
    counts as one), as text of any layout."""

    def __init__(self, numbers: list[int]) -> None:
        digits = [str(int(v)).encode() for v in numbers]
        # No look-behind: it would cost the regex engine its literal-prefix
        # search (10x slower over a weights file); found_in checks instead.
        self._regex = re.compile(_SEPARATOR.join(digits) + rb"(?![0-9])")
        #: The longest text a match can span (scanners overlap chunks by it).
        self.max_length = sum(len(d) for d in digits) + 32 * (len(digits) - 1) + 1  # 16 two-byte escapes

    def found_in(self, data: bytes) -> bool:
        return any(m.start() == 0 or not data[m.start() - 1:m.start()].isdigit() for m in self._regex.finditer(data))

    def __repr__(self) -> str:  # never the numbers
        return "NumberSequence(<secret>)"


class WrappedText:
    """The key's base64 broken over lines, as base64 often is (PEM, MIME,
    ``base64 -w``): found in the text with its line breaks removed (real
    ones; in text without NUL bytes also JSON-escaped ones, ``\\n``), which
    base64 itself never holds, and the URL-safe alphabet read as the
    standard one. Unbroken, the scanners find it as plain byte needles."""

    _FLATTEN = bytes.maketrans(b"-_", b"+/")

    def __init__(self, material: bytes) -> None:
        self._needles = _base64_cores(material, urlsafe=False)
        #: The longest text a match can span, a break (``\\r\\n``) after every character.
        self.max_length = 5 * max(len(n) for n in self._needles)

    def found_in(self, data: bytes) -> bool:
        # text (no NUL byte): JSON may escape the breaks
        escaped = b"\0" not in data and (b"\\n" in data or b"\\r" in data)
        if not escaped and b"\n" not in data and b"\r" not in data:
            return False
        if escaped:
            data = data.replace(b"\\r", b"").replace(b"\\n", b"")
        flat = data.translate(self._FLATTEN, b"\r\n")
        return any(n in flat for n in self._needles)

    def __repr__(self) -> str:  # never the needles
        return "WrappedText(<secret>)"


def _base64_cores(material: bytes, urlsafe: bool = True) -> list:
    """The part of the base64 of ``material`` that does not depend on what
    surrounds it, at each of the three byte alignments it can start at in a
    longer encoded text (and in the URL-safe alphabet): the characters whose
    6 bits all come from ``material``."""
    cores = []
    for offset in range(3):
        first = -(-8 * offset // 6)  # the first character with no bit of the bytes before
        last = 8 * (offset + len(material)) // 6  # past the last with no bit of the bytes after
        for encode in (base64.b64encode, base64.urlsafe_b64encode)[:2 if urlsafe else 1]:
            cores.append(encode(bytes(offset) + material)[first:last])
    return cores


def _as_int(value: object) -> object:
    """``value`` as a Python int if it is an integer of any kind (NumPy's
    ``int64``, a 0-d integer tensor), else unchanged for the checks to refuse."""
    if isinstance(value, bool) or isinstance(value, int):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def _valid_created(value: object) -> bool:
    """``created`` as the key file spec writes it: a UTC time ``YYYY-MM-DDTHH:MM:SSZ``."""
    if not isinstance(value, str) or len(value) != 20:
        return False
    try:
        _dt.datetime.strptime(value, _CREATED_FORMAT)
    except ValueError:
        return False
    return True


class SecretKey:
    """A 256-bit secret key with the block size, scheme and channel count it
    is used with.

    The key material never appears in ``repr``/``str``, in error messages, or
    in anything the library writes other than a key file. A key cannot be
    pickled (so ``torch.save`` of a whole model cannot leak it): save it with
    :meth:`save`. Only multiprocessing's own pickler carries it, through a
    pipe, to a process it starts (DataLoader workers, ``mp.spawn``).

    Example:
        >>> key = SecretKey.generate(block_size=4)
        >>> key.save("owner.key")                       # doctest: +SKIP
        >>> same = SecretKey.load("owner.key")          # doctest: +SKIP
    """

    __slots__ = ("_material", "block_size", "scheme", "channels", "created", "_cache", "__weakref__")

    def __init__(
        self,
        material: bytes,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scheme: Union[str, Iterable[str]] = DEFAULT_SCHEME,
        channels: int = 3,
        created: str | None = None,
    ) -> None:
        if not isinstance(material, (bytes, bytearray)) or len(material) != _KEY_BYTES:
            raise ConfigurationError(f"key material must be exactly {_KEY_BYTES} bytes")
        block_size, channels = _as_int(block_size), _as_int(channels)  # NumPy / torch integers too
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigurationError(f"block_size must be a positive integer, got {block_size!r}")
        if block_size > MAX_BLOCK_SIZE:  # its permutation would not fit in memory (MemoryError on first use)
            raise ConfigurationError(f"block_size must be at most {MAX_BLOCK_SIZE}, got {block_size}")
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ConfigurationError(f"channels must be a positive integer, got {channels!r}")
        if channels > MAX_CHANNELS:
            raise ConfigurationError(f"channels must be at most {MAX_CHANNELS}, got {channels}")
        self._material = bytes(material)
        self.block_size = block_size
        self.scheme: Scheme = parse_scheme(scheme)
        self.channels = channels
        if created is None:
            created = _dt.datetime.now(_dt.timezone.utc).strftime(_CREATED_FORMAT)
        elif not _valid_created(created):
            raise ConfigurationError(f"{_CREATED_RULE}, got {created!r}")
        self.created = created
        self._cache: dict = {}

    # ---------------------------------------------------------------- create
    @classmethod
    def generate(
        cls,
        block_size: int = DEFAULT_BLOCK_SIZE,
        scheme: Union[str, Iterable[str]] = DEFAULT_SCHEME,
        channels: int = 3,
    ) -> "SecretKey":
        """A new key: 256 bits from the operating system's CSPRNG (``secrets``).

        Args:
            block_size: side ``M`` of the square blocks; image sizes must be
                multiples of it.
            scheme: steps of the keyed transform (``"shuffle+np"``, a tuple,
                or :data:`DEFAULT_SCHEME`).
            channels: image channels (3 for RGB).

        Example:
            >>> key = SecretKey.generate(block_size=16, scheme="shuffle+np")
            >>> key.block_length
            768
        """
        return cls(secrets.token_bytes(_KEY_BYTES), block_size=block_size, scheme=scheme, channels=channels)

    @classmethod
    def generate_like(cls, other: "SecretKey") -> "SecretKey":
        """A new random key with the same block size, scheme and channels as
        ``other`` (what a wrong-key evaluation draws)."""
        return cls.generate(block_size=other.block_size, scheme=other.scheme, channels=other.channels)

    def replace(self, **changes) -> "SecretKey":
        """The same key material with other public settings, e.g.
        ``key.replace(scheme="shuffle")``."""
        args = dict(block_size=self.block_size, scheme=self.scheme, channels=self.channels, created=self.created)
        args.update(changes)
        return SecretKey(self._material, **args)

    # ---------------------------------------------------------------- public
    @property
    def fingerprint(self) -> str:
        """A public 128-bit hex identifier of the key material (its own PRF
        label), safe to store in checkpoints and model cards."""
        fp = self._cache.get("fingerprint")
        if fp is None:
            fp = self._cache["fingerprint"] = _prf_bytes(self._material, "fingerprint", 16).hex()
        return fp

    @property
    def scheme_name(self) -> str:
        """The scheme as a string, e.g. ``"shuffle+np"``."""
        return "+".join(self.scheme)

    @property
    def block_length(self) -> int:
        """``L = M * M * C``, the length of a flattened block."""
        return self.block_size * self.block_size * self.channels

    def __repr__(self) -> str:
        if not hasattr(self, "_cache"):  # one whose __init__ failed (a traceback's locals show it too)
            return "SecretKey(<incomplete>)"
        return (
            f"SecretKey(fingerprint='{self.fingerprint}', block_size={self.block_size}, "
            f"scheme='{self.scheme_name}', channels={self.channels})"
        )

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SecretKey):
            return NotImplemented
        return (
            hmac.compare_digest(self._material, other._material)
            and self.block_size == other.block_size
            and self.scheme == other.scheme
            and self.channels == other.channels
        )

    def __hash__(self) -> int:
        return hash((self.fingerprint, self.block_size, self.scheme, self.channels))

    def __reduce__(self):
        raise KeyPicklingError(
            "SecretKey cannot be pickled (nor what holds one: a protected model, a KeyedImageProcessor, a "
            "keyed dataset transform), so that torch.save or pickle cannot leak it; save the key with "
            "key.save(path), a model with kp_plugin.save_protected, a processor with save_pretrained, and load "
            "them with the key file"
        )

    def __copy__(self) -> "SecretKey":
        return self

    def __deepcopy__(self, memo) -> "SecretKey":
        return self

    def secret_forms(self) -> list[bytes]:
        """Byte strings whose presence in a file means the key leaked: the raw
        material, its hex (both cases) and base64 forms, and the pixel
        permutation serialized as int64/int32 arrays or JSON text. Used by
        the leak scanners; never print them."""
        m = self._material
        perm = self.pixel_permutation()
        perm_forms = []
        if len(perm) >= MIN_SCANNED_PERMUTATION:
            perm_forms = [
                b"".join(v.to_bytes(8, "little") for v in perm),
                b"".join(v.to_bytes(4, "little") for v in perm),
                b"".join(v.to_bytes(2, "little") for v in perm),
                json.dumps(perm).encode(),
                json.dumps(perm, separators=(",", ":")).encode(),
            ]
            if len(perm) <= 256:
                perm_forms.append(bytes(perm))  # uint8 arrays (L = 48 at block size 4, RGB)
        return perm_forms + [
            m,
            m.hex().encode(),
            m.hex().upper().encode(),
            base64.b64encode(m),
            base64.urlsafe_b64encode(m),
            base64.b64encode(m).rstrip(b"="),
            base64.urlsafe_b64encode(m).rstrip(b"="),
            *_base64_cores(m),  # inside a longer base64 text, at any alignment
        ]

    def secret_patterns(self) -> list:
        """The pixel permutation written as text in any layout (JSON with
        any indent, CSV, one number per line) and the key's base64 broken
        over lines, which fixed byte strings cannot all cover. Used by the leak scanners with :meth:`secret_forms`."""
        perm = self.pixel_permutation()
        wrapped = WrappedText(self._material)
        return [NumberSequence(perm), wrapped] if len(perm) >= MIN_SCANNED_PERMUTATION else [wrapped]

    # ------------------------------------------------------ derived objects
    def _derived(self, name: str, make):
        value = self._cache.get(name)
        if value is None:
            value = self._cache[name] = make()
        return value

    def pixel_permutation(self, length: int | None = None) -> list[int]:
        """The permutation ``P`` of block positions 0..L-1 (label
        ``pixel-shuffle/L=<L>``): shuffled block ``y[p] = x[P[p]]``."""
        n = self.block_length if length is None else length
        return list(self._derived(f"perm{n}", lambda: _derive_permutation(self._material, f"pixel-shuffle/L={n}", n)))

    def np_mask(self, length: int | None = None) -> list[int]:
        """Bits ``b[p]``; where 1, a value ``v`` becomes ``1 - v`` (label
        ``negative-positive/L=<L>``)."""
        n = self.block_length if length is None else length
        return list(self._derived(f"np{n}", lambda: _derive_bits(self._material, f"negative-positive/L={n}", n)))

    def shift_values(self, length: int | None = None) -> list[int]:
        """Per-position shifts ``s[p]`` in 0..255; an 8-bit value ``q``
        becomes ``(q + s[p]) mod 256`` (label ``value-shift/L=<L>``)."""
        n = self.block_length if length is None else length
        return list(self._derived(f"shift{n}", lambda: list(_prf_bytes(self._material, f"value-shift/L={n}", n))))

    def ffx_mask(self, length: int | None = None) -> list[int]:
        """Bits ``f[p]``; where 1, the FFX bijection of position ``p`` is
        applied (label ``ffx-mask/L=<L>``)."""
        n = self.block_length if length is None else length
        return list(self._derived(f"ffxmask{n}", lambda: _derive_bits(self._material, f"ffx-mask/L={n}", n)))

    def ffx_tables(self, length: int | None = None) -> list[list[int]]:
        """Per position ``p``, the keyed bijection of 0..255 (a list of 256
        values) used where ``f[p] == 1`` (label ``ffx-rounds/L=<L>``)."""
        n = self.block_length if length is None else length
        return [list(t) for t in self._derived(f"ffx{n}", lambda: _feistel_tables(self._material, n))]

    def block_permutation(self, num_blocks: int) -> list[int]:
        """The permutation ``S`` of block indices (row-major) for block
        scrambling: output block ``k`` is input block ``S[k]`` (label
        ``block-scramble/N=<N>``)."""
        n = num_blocks
        return list(self._derived(f"blocks{n}", lambda: _derive_permutation(self._material, f"block-scramble/N={n}", n)))

    # ------------------------------------------------------------ key files
    def _body(self) -> dict:
        return {
            "format": KEY_FILE_FORMAT,
            "version": KEY_FILE_VERSION,
            "key": self._material.hex(),
            "block_size": self.block_size,
            "scheme": list(self.scheme),
            "channels": self.channels,
            "created": self.created,
            "fingerprint": self.fingerprint,
        }

    def _mac(self, body: dict, label: bytes = b"key-file") -> str:
        """HMAC-SHA256 of ``body``'s canonical JSON under ``label`` (the key
        file's and protection.json's integrity codes; docs/key-format.md)."""
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
        return hmac.new(self._material, _PRF_PREFIX + label + b"\x00" + canonical, hashlib.sha256).hexdigest()

    def to_json(self) -> str:
        """The key file content (JSON). It holds the key material: treat the
        string as the key itself."""
        body = self._body()
        body["mac"] = self._mac(body)
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: Union[str, bytes], *, source: str = "key data") -> "SecretKey":
        """Parse key file content; :class:`KeyFileError` says what is wrong."""
        key, error = _parsed(cls, text, source)
        del text  # raised below, the error's traceback holds this frame: no key file content in its locals
        if error is not None:
            raise error
        return key

    @classmethod
    def _parse(cls, text: Union[str, bytes], source: str) -> "SecretKey":
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise KeyFileError(f"{source} is not a kp-plugin key file (not UTF-8 text)") from None
        text = text.removeprefix("\ufeff")  # a byte-order mark (Windows editors, PowerShell) is not content
        if not text.strip():
            raise KeyFileError(f"{source} is empty; was the key file truncated? Restore it from your backup")
        if re.fullmatch(r"\s*(?:[0-9a-fA-F]{64}|[A-Za-z0-9+/_-]{43}=?)\s*", text):
            # 32 bytes as hex or base64 (the key material alone, or any other secret of that size)
            raise KeyFileError(
                f"{source} holds 32 bytes written as text (hex or base64), not a kp-plugin key file: give the whole "
                "key file's JSON, as kp keygen / SecretKey.save write it (for a variable: "
                "KP_KEY=\"$(cat owner.key)\"); to build a key from raw bytes in Python, use SecretKey(material, ...)"
            )
        try:
            body = json.loads(text, object_pairs_hook=_no_repeated_fields)
        except _RepeatedField as exc:
            raise KeyFileError(
                f"{source} has the field {exc.args[0]!r} more than once (a hand edit or a merge?); readers would "
                "disagree on which one counts: restore the key file from your backup"
            ) from None
        except (RecursionError, ValueError):  # invalid JSON, a deeply nested array, a number too long to read
            raise KeyFileError(
                f"{source} is not valid JSON (corrupt or truncated key file); restore it from your backup"
            ) from None
        if not isinstance(body, dict) or body.get("format") != KEY_FILE_FORMAT:
            raise KeyFileError(f"{source} is not a kp-plugin key file (expected format '{KEY_FILE_FORMAT}')")
        version = body.get("version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise KeyFileError(f"{source} has no valid format version")
        if version > KEY_FILE_VERSION:
            raise KeyFileError(
                f"{source} is key file version {version}, newer than this kp-plugin reads "
                f"(version {KEY_FILE_VERSION}); upgrade kp-plugin"
            )
        if version < 1:
            raise KeyFileError(f"{source} has an invalid format version {version}")
        missing = [f for f in ("key", "block_size", "scheme", "channels", "created", "fingerprint", "mac")
                   if f not in body]
        if missing:
            raise KeyFileError(f"{source} is missing field(s) {', '.join(missing)}; the key file is incomplete")
        hexkey = body["key"]
        if not isinstance(hexkey, str) or len(hexkey) != 2 * _KEY_BYTES:
            raise KeyFileError(f"{source}: field 'key' must be {2 * _KEY_BYTES} hex digits (corrupt key file)")
        try:
            material = bytes.fromhex(hexkey)
        except ValueError:
            raise KeyFileError(f"{source}: field 'key' is not hexadecimal (corrupt key file)") from None
        for name in ("block_size", "scheme", "channels", "created"):
            long_text = _long_text(body[name])
            if long_text:  # the settings' errors quote the value: never a pasted key
                raise KeyFileError(f"{source} has an invalid setting: field {name!r} holds {long_text} (corrupt or "
                                   "hand-edited key file); restore it from your backup")
        if not _valid_created(body["created"]):  # null too: the constructor would take it as "now"
            raise KeyFileError(f"{source} has an invalid setting: {_CREATED_RULE}, got {body['created']!r}")
        try:
            key = cls(
                material,
                block_size=body["block_size"],
                scheme=body["scheme"],
                channels=body["channels"],
                created=body["created"],
            )
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{source} has an invalid setting: {exc}") from None
        if not isinstance(body["fingerprint"], str) or not hmac.compare_digest(body["fingerprint"], key.fingerprint):
            raise KeyFileError(
                f"{source}: the key material does not match the recorded fingerprint "
                "(the file was altered or damaged); restore it from your backup"
            )
        unsigned = {k: v for k, v in body.items() if k != "mac"}
        if not isinstance(body["mac"], str) or not hmac.compare_digest(body["mac"], key._mac(unsigned)):
            raise KeyFileError(
                f"{source}: integrity check failed (a field was edited or damaged); restore it from your backup"
            )
        return key

    def save(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write the key file atomically (temporary file, fsync, rename) with
        owner-only permissions (0600).

        An existing file is never replaced unless ``overwrite=True``: losing a
        key loses the model. If writing fails midway, the previous file (if
        any) is left intact.

        Args:
            path: where to write the key file.
            overwrite: replace an existing file at ``path``.

        Returns:
            The path written.

        Raises:
            KeyFileExistsError: ``path`` exists and ``overwrite`` is false.
            KeyFileError: ``path`` is a directory.
            KeyFileWriteError: the file cannot be written there (an
                ``OSError`` too; the previous file, if any, stays intact).
        """
        given = os.fspath(path)
        path = Path(path)
        try:  # the checks too: a name too long for the file system fails already there
            if path.is_dir() or (isinstance(given, str) and given.endswith(("/", os.sep))):
                raise KeyFileError(f"{given} is a directory; give the key file's own path, e.g. {path / 'owner.key'}")
            kind = _special_file_kind(path)
            if kind:
                raise KeyFileError(
                    f"{path} is {kind}, not a key file; a key file is written only as a regular file (replacing "
                    f"{kind} would break what uses it): choose another path"
                    + (f", or the link's target {os.path.realpath(path)}" if kind.endswith("link") else "")
                )
            if path.exists() and not overwrite:
                raise KeyFileExistsError(
                    f"{path} already exists; refusing to overwrite a key file (the model it protects "
                    "would be lost). Choose another path or pass overwrite=True"
                )
            return self._write(path, overwrite)
        except KeyFileError:
            raise
        except OSError as exc:  # unwritable or impossible folder, full disk, read-only file system
            reason = exc.strerror or str(exc)
            existing = next((parent for parent in path.parents if parent.exists()), None)
            if existing is not None and not existing.is_dir():
                reason = f"{existing} is a file, not a folder"
            raise KeyFileWriteError(
                f"cannot write key file {path}: {reason}; nothing was written there (a key file already at "
                "that path is intact). Choose a writable location"
            ) from None

    def _write(self, path: Path, overwrite: bool) -> Path:
        directory = path.parent if str(path.parent) else Path(".")
        _make_private_folders(directory)
        data = self.to_json().encode()
        # A killed save leaves a whole key in its temporary: the next save of
        # this name removes those (named after their process) whose process is gone.
        remove_stale_temporaries(directory, [path.name])
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=directory)
        try:
            if hasattr(os, "fchmod"):  # POSIX; mkstemp already creates the file 0600
                os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if overwrite:
                os.replace(tmp, path)
            else:
                # link() fails if the target appeared meanwhile: no race can
                # make us replace another key.
                exists = KeyFileExistsError(
                    f"{path} already exists; refusing to overwrite a key file. Choose another path or pass "
                    "overwrite=True"
                )
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    raise exists from None
                except OSError:
                    # No hard links on this file system (FAT, some network
                    # and FUSE mounts): claim the name with an exclusive
                    # create, then rename the whole file over the claim. Two
                    # savers cannot both claim it (checking, then renaming,
                    # let both succeed and one key be lost).
                    try:
                        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                    except FileExistsError:
                        raise exists from None
                    os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            _fsync_directory(directory)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return path

    @classmethod
    def load(cls, path: PathLike) -> "SecretKey":
        """Read a key file written by :meth:`save`.

        Raises:
            KeyFileError: the file is missing, corrupt, truncated, tampered
                with, or of a newer format version.

        Warns:
            KeyFilePermissionWarning: on POSIX, the file is readable or
                writable by its group or others (``chmod 600`` it).
        """
        if isinstance(path, str) and _is_key_content(path):
            del path  # key content: kept out of the message and of the traceback's locals
            raise KeyFileError(
                "the key file path given is key content (a key file's JSON, or 32 bytes as hex or base64), not a "
                "path: pass the key file's path (kp ... --key owner.key), or the content through an environment "
                "variable (kp ... with KP_KEY set; SecretKey.from_env('KP_KEY') in Python)"
            )
        path = Path(path)
        # The file's bytes are never a local here: the error raised below
        # keeps this frame in its traceback.
        key, error = _parsed(cls, _read_key_file(path), f"key file {path}")
        if error is not None:
            raise error
        _warn_if_shared(path)
        return key

    @classmethod
    def from_env(cls, name: str = "KP_KEY") -> "SecretKey":
        """Read a key from an environment variable holding a key file's
        content, e.g. ``export KP_KEY="$(cat owner.key)"``."""
        value = os.environ.get(name)
        if value is None:
            raise KeyFileError(
                f"environment variable {name} is not set; set it to the content of a key file, "
                f'e.g. export {name}="$(cat owner.key)"'
            )
        if not value.lstrip().startswith("{") and os.path.isfile(value):
            raise KeyFileError(
                f"environment variable {name} holds a file path; it must hold the key file's content, "
                f'e.g. export {name}="$(cat {value})"'
            )
        hint = _not_json_hint(value)
        if hint:
            del value
            raise KeyFileError(f"environment variable {name} holds {hint}, not a key file's content: set it with "
                               f'export {name}="$(cat owner.key)", or pass the key file\'s path (--key PATH, '
                               "SecretKey.load(PATH))")
        key, error = _parsed(cls, value, f"environment variable {name}")
        del value  # raised below, the error's traceback holds this frame: no key in its locals
        if error is not None:
            raise error
        return key


#: Far above a key file's size (about 400 bytes): a larger file is not one.
MAX_KEY_FILE_BYTES = 64 * 1024


def _parsed(cls, text, source: str) -> tuple:
    """``(key, None)``, or ``(None, error)``: a fresh :class:`KeyFileError`
    without traceback or context, so that raising it keeps the parser's
    locals (the key file's text, the key's hex and bytes) out of every
    traceback that shows locals (pytest --showlocals, rich, Sentry)."""
    try:
        return cls._parse(text, source), None
    except KeyFileError as exc:
        error = type(exc)(*exc.args)
    return None, error


class _RepeatedField(ValueError):
    pass


def _no_repeated_fields(pairs: list) -> dict:
    seen: dict = {}
    for name, value in pairs:
        if name in seen:
            raise _RepeatedField(name)
        seen[name] = value
    return seen


def _long_text(value: object) -> str:
    """A description of the first string over 24 characters in ``value`` (a
    setting of a key file, or a list of them), else ''."""
    for item in (value if isinstance(value, list) else [value]):
        if isinstance(item, str) and len(item) > 24:
            return f"a {len(item)}-character string"
    return ""


_KEY_TEXT = re.compile(r"\s*(?:[0-9a-fA-F]{64}|[A-Za-z0-9+/_-]{43}=?)\s*")


def _is_key_content(text: str) -> bool:
    """Whether ``text``, given where a path belongs, is key content: a key
    file's JSON, or 32 bytes written as hex or base64."""
    return text.lstrip().removeprefix("\ufeff").lstrip().startswith("{") or bool(_KEY_TEXT.fullmatch(text))


def _not_json_hint(value: str) -> str:
    """What a key variable holds when it is clearly not a key file's JSON (a
    path, base64 of the file), said without its content; '' otherwise."""
    stripped = value.strip()
    if not stripped or stripped.startswith("{") or _KEY_TEXT.fullmatch(value):
        return ""  # empty, JSON, or 32 bytes as text: the parser says what is wrong
    if re.fullmatch(r"[A-Za-z0-9+/=_\-\s]+", stripped) and len(stripped) > 64:
        try:
            decoded = base64.b64decode("".join(stripped.split()) + "==", altchars=b"-_" if "-" in stripped or "_"
                                       in stripped else None)
        except ValueError:
            decoded = b""
        if decoded.lstrip().startswith(b"{"):
            return "base64 (of a key file?); decode it first (base64 -d)"
    if "\n" not in stripped and len(stripped) < 4096 and (
            "/" in stripped or "\\" in stripped or stripped.startswith("~") or stripped.endswith(".key")):
        return "what looks like a file path (not an existing file)"
    return ""


def _special_file_kind(path: Path) -> str:
    """'' for a regular file, a folder or nothing at ``path``; else what is
    there (a symbolic link, a device, a FIFO, a socket)."""
    try:
        return _kind_of(os.lstat(path).st_mode)
    except OSError:
        return ""


def _kind_of(mode: int) -> str:
    """'' for a regular file or a folder; else what a file of ``mode`` is."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"


def _read_key_file(path: Path) -> bytes:
    """The bytes of the key file at ``path``: a regular file (a FIFO, a device
    or /dev/zero would block or never end) of at most MAX_KEY_FILE_BYTES."""
    try:
        # O_NONBLOCK: opening a FIFO nobody writes to returns instead of waiting;
        # fstat then tells what was opened (no race with a swap after a stat).
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise KeyFileError(
            f"key file {path} does not exist; give the path of the key the model was protected with (restore it "
            f"from your backup: a new key cannot open that model), or, to start a new model, create one with "
            f"`kp keygen -o {path}`"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode  # before fdopen, which refuses a directory with a bare IsADirectoryError
    if not stat.S_ISREG(mode):
        os.close(fd)
        if stat.S_ISDIR(mode):
            raise KeyFileError(f"cannot read key file {path}: it is a directory; give the key file's own path")
        raise KeyFileError(f"{path} is {_kind_of(mode)}, not a key file: give the path of the key file kp keygen "
                           "or SecretKey.save wrote")
    with os.fdopen(fd, "rb") as stream:
        try:
            data = stream.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    if len(data) > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is larger than {MAX_KEY_FILE_BYTES // 1024} KiB, far larger than a key file "
                           "(about 400 bytes): it is not one; give the path of the key file kp keygen wrote")
    return data


def _make_private_folders(directory: Path) -> None:
    """Create ``directory`` and any missing parents owner-only (0700), as
    ssh-keygen does for ~/.ssh: in a folder others can write to, anyone could
    delete the key file or swap in a key of their own."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=0o700)
        except FileExistsError:  # made meanwhile by another writer
            pass


def _warn_if_shared(path: Path) -> None:
    """Warn when users other than the owner may read or replace a key file
    (as ssh does for private keys, but without refusing)."""
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if mode & 0o077:
        warnings.warn(
            f"key file {path} is accessible to other users of this machine (mode {mode:04o}); anyone who can read "
            f"it can use the protected model: restrict it with `chmod 600 {path}`",
            KeyFilePermissionWarning,
            stacklevel=3,
        )


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _key_in_child_process(material: bytes, block_size: int, scheme: tuple, channels: int, created: str) -> SecretKey:
    return SecretKey(material, block_size=block_size, scheme=scheme, channels=channels, created=created)


def _send_to_child_process(key: SecretKey):
    return _key_in_child_process, (key._material, key.block_size, key.scheme, key.channels, key.created)


def child_process_picklers() -> list:
    """The picklers that carry objects to child processes only, over a pipe:
    multiprocessing's (the pipe to a process started by spawn or forkserver,
    multiprocessing / torch.multiprocessing queues), and ``multiprocess``'s,
    the dill-based fork that ``datasets``' ``map(num_proc=N)`` sends its
    function through, when it is installed."""
    picklers = [ForkingPickler]
    try:
        from multiprocess.reduction import ForkingPickler as DillForkingPickler
    except ImportError:
        return picklers
    return picklers + [DillForkingPickler]


# These picklers may carry a key, so DataLoader workers and mp.spawn work
# where fork is not the default (macOS, Windows), and so does datasets' map
# with num_proc over a function holding a KeyedInput or a protected model
# (registered here, not by kp_plugin.hf: that one failed unless kp_plugin.hf
# was imported). pickle.dumps, torch.save, copyreg-based picklers (dill,
# cloudpickle) still refuse: they write files.
for _pickler in child_process_picklers():
    _pickler.register(SecretKey, _send_to_child_process)


def require_key(key: object, what: str = "key") -> SecretKey:
    """``key`` itself when it is a :class:`SecretKey`, else
    :class:`KeyTypeError` saying how to get one (never showing the value:
    it may be the key's hex)."""
    if isinstance(key, SecretKey):
        return key
    hint = ("a path? load the key file with SecretKey.load(path)" if isinstance(key, (str, os.PathLike)) else
            "load the key file with SecretKey.load(path) or SecretKey.from_env('KP_KEY')")
    raise KeyTypeError(f"{what} must be a kp_plugin.SecretKey, got {type(key).__name__} ({hint})")
