"""Typed errors of kp-plugin.

Every error the library raises on purpose derives from :class:`KPError`, so a
caller can catch them all at once. Where a built-in exception fits too (a bad
block size is also a ``ValueError``), the error derives from both, so code
written against the built-in keeps working.

No message ever contains key material: messages name files, sizes,
fingerprints (public) and what to do next.
"""

from __future__ import annotations

import pickle

__all__ = [
    "KPError",
    "KeyFileError",
    "KeyFileExistsError",
    "KeyFileWriteError",
    "KeyMismatchError",
    "CheckpointError",
    "CheckpointWriteError",
    "InputRangeError",
    "InputDtypeError",
    "BlockSizeError",
    "ConfigurationError",
    "KeyTypeError",
    "KeyLeakError",
    "KeyPicklingError",
    "KeyRequiredError",
    "NotAProcessorError",
    "DatasetError",
    "AdaptationError",
    "AttackError",
    "PretrainedWeightsError",
    "DemoStepError",
    "HubError", "HubUnreachableError", "RepoNotFoundError", "NotProtectedRepoError", "PublicRepoError",
    "HubUploadError", "CorruptDownloadError",
    "KeyFilePermissionWarning",
    "InputSizeWarning",
    "NormalizationWarning",
    "UnsignedCheckpointWarning",
    "InputGradientWarning",
    "DatasetNameWarning",
    "ProtectionMarginWarning",
]


class KPError(Exception):
    """Base class of every error raised by kp-plugin."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has
    none), for quoting another library's error inside ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exception_chain(exc: BaseException, limit: int = 16) -> list:
    """``exc`` and the errors behind it (``__cause__``, else
    ``__context__``), at most ``limit``, without repeats."""
    chain: list = []
    while exc is not None and len(chain) < limit and all(exc is not seen for seen in chain):
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def torch_load_failure(exc: BaseException) -> str:
    """Why ``torch.load(..., weights_only=True)`` failed, in a few words: its
    unpickler's refusal (whose text suggests ``weights_only=False``, which
    would run code from the file) is named, not quoted."""
    if isinstance(exc, pickle.UnpicklingError):
        return "not a file torch.load can read as tensors and containers"
    if isinstance(exc, EOFError):
        return "the file ends early (empty or truncated)"
    return first_line(exc)


class KeyFileError(KPError, ValueError):
    """A key file (or ``KP_KEY`` value) is missing, corrupt, tampered with, or
    of an unknown format version; or saving it would overwrite another key or
    cannot write there (:class:`KeyFileWriteError`)."""


class KeyFileExistsError(KeyFileError, FileExistsError):
    """Saving a key would replace an existing file (pass ``overwrite=True``
    to replace it on purpose)."""


class KeyFileWriteError(KeyFileError, OSError):
    """A key file cannot be written where asked (unwritable or impossible
    folder, full disk, read-only file system); the previous file at that
    path, if any, is intact."""


class KeyMismatchError(KPError):
    """The key given is not the key a checkpoint or model was protected with
    (its fingerprint, block size or scheme differs)."""


class CheckpointError(KPError):
    """A protected checkpoint is missing a file, or a file is corrupt."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint (or a saved image processor) cannot be written: a full
    disk, a file-size limit, an unwritable folder. The files there before
    are unchanged; an ``OSError`` too, as a failed ``save_pretrained`` is."""


class InputRangeError(KPError, ValueError):
    """Float images are outside [0, 1]: most often they were normalized
    before the keyed transform, which must come first."""


class InputDtypeError(KPError, TypeError):
    """Images have a dtype the keyed transform does not take (it takes
    floating point in [0, 1] or uint8 in 0..255)."""


class BlockSizeError(KPError, ValueError):
    """An image size is not a multiple of the key's block size, or a tensor
    does not have the shape the key expects."""


class ConfigurationError(KPError, ValueError):
    """Something needed to protect a model is missing (mean/std, input size)
    or inconsistent."""


class KeyTypeError(KPError, TypeError):
    """Something other than a :class:`kp_plugin.SecretKey` was given as the
    key (most often the key file's path: load it with ``SecretKey.load``)."""


class KeyLeakError(KPError):
    """A file about to be written or uploaded contains key material."""


class KeyPicklingError(KeyLeakError, TypeError):
    """Pickling a :class:`kp_plugin.SecretKey` (and so a model or processor
    holding one) outside multiprocessing: the pickle would hold the key."""


# The errors (and warnings) of the adapters (transformers, timm, the Hub,
# datasets, attacks) live here too, so that every one can be imported from
# kp_plugin.errors without importing an adapter; each adapter module
# re-exports its own.


class KeyRequiredError(KPError, TypeError):
    """A keyed image processor was loaded or built without its secret key."""


class NotAProcessorError(ConfigurationError, TypeError):
    """KeyedImageProcessor was given something other than a transformers
    image processor to wrap (a name or path: use ``from_pretrained``)."""


class DatasetError(KPError):
    """A dataset cannot be found or read, or a split/size is invalid."""


class AdaptationError(KPError, ValueError):
    """The model or the scheme does not allow exact zero-training adaptation."""


class AttackError(KPError, ValueError):
    """An attack cannot run on this model, scheme or data as asked (the
    message says which setting to change)."""


class PretrainedWeightsError(KPError):
    """Pre-trained weights could not be fetched (no Hub access, or timm has
    none for the model)."""


class DemoStepError(KPError):
    """A step of the demo failed."""


class HubError(KPError):
    """Talking to the Hub failed; the message says what to do."""


class HubUnreachableError(HubError):
    """The Hub endpoint cannot be reached (and, for a pull, the model is not
    in the local cache)."""


class RepoNotFoundError(HubError):
    """The repository or revision does not exist, or the token cannot see it."""


class NotProtectedRepoError(HubError, CheckpointError):
    """The repository exists but holds no ``protection.json``: it is not a
    kp-plugin protected model."""


class PublicRepoError(HubError):
    """``private=True`` was asked but the repository exists and is public;
    nothing was uploaded."""


class HubUploadError(HubError):
    """The upload itself failed (e.g. the Xet protocol against a self-hosted
    endpoint)."""


class CorruptDownloadError(HubError, CheckpointError):
    """A downloaded (or cached) file is not the file the Hub holds: cut
    short, or changed in transfer or on disk. Pull again with
    ``force_download=True``."""


class InputSizeWarning(UserWarning):
    """Images of another size than a loaded model was saved for, with a key
    that scrambles blocks: the block order differs at every size, so a model
    trained at the saved size predicts wrongly even with the right key."""


class NormalizationWarning(UserWarning):
    """:func:`kp_plugin.wrap_model` took a transformers model's mean / std
    from the default image processor of its architecture (its config holds
    none, and no saved processor was found beside its weights)."""


class KeyFilePermissionWarning(UserWarning):
    """A key file that other users of the machine can read (its group or
    others have permissions); ``chmod 600`` it. A warning, not an error:
    container secrets are often mounted readable by design."""


class UnsignedCheckpointWarning(UserWarning):
    """A ``protection.json`` without ``mac`` loaded with its key: kp-plugin
    always signs the ones it writes, so this one was written by hand, by an
    old release, or had its ``mac`` removed; its settings and weights digest
    could not be checked against the key. Save the model again (with
    :func:`kp_plugin.save_protected`) to sign it."""


class InputGradientWarning(UserWarning):
    """Images that require gradients, through a scheme whose value step is
    an 8-bit lookup (shift, ffx): no gradient reaches them. The model's own
    parameters are trained as usual."""


class DatasetNameWarning(UserWarning):
    """A folder in the working directory has the name of an embedded dataset
    ("digits", "photos"): the bare name loads the embedded dataset, not the
    folder; pass the folder as a path (``./photos``) to load it."""


class ProtectionMarginWarning(UserWarning):
    """The key's accuracy is not far enough above the best wrong key's."""
