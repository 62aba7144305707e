"""Protected models on the Hugging Face Hub, the key kept off it.

``push_protected`` publishes a protected model (weights as safetensors, the
architecture's own ``config.json``, ``protection.json`` and a model card);
``pull_protected`` downloads one and returns a ready
:class:`~kp_plugin.module.ProtectedModel` for the key holder.

The key never leaves the owner's machine: before anything is sent, every
file to upload (the card included) is scanned for the key's bytes, their
hex and base64 forms, the serialized permutation and key files; a hit
raises :class:`~kp_plugin.errors.KeyLeakError` and nothing is uploaded.
Repositories are private by default, and since ``huggingface_hub`` ignores
``private`` for a repository that already exists, pushing with
``private=True`` into an existing public one is refused.

Self-hosted endpoints: pass ``endpoint=`` (or set ``HF_ENDPOINT``). Hubs
other than huggingface.co usually speak only the classic LFS upload
protocol: set ``HF_HUB_DISABLE_XET=1`` before starting Python.

Example:
    >>> from kp_plugin import SecretKey
    >>> from kp_plugin.hub import push_protected, pull_protected
    >>> push_protected(model, "org/name")                              # doctest: +SKIP
    >>> model = pull_protected("org/name", SecretKey.load("owner.key"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import torch

from ._hub_card import REPORT_FILE, build_model_card, read_report
from .checkpoint import CONFIG_FILE, PROTECTION_FILE, WEIGHTS_FILE, ProtectionConfig, load_protected, save_protected
from .errors import CheckpointError, ConfigurationError, KeyLeakError, KeyMismatchError, KPError
from .keys import KEY_FILE_FORMAT, SecretKey
from .module import ProtectedModel

__all__ = [
    "push_protected",
    "pull_protected",
    "download_protected",
    "HubError",
    "HubUnreachableError",
    "RepoNotFoundError",
    "NotProtectedRepoError",
    "PublicRepoError",
    "HubUploadError",
]

PREPROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
_KEY_FILE_MARKERS = (f'"format": "{KEY_FILE_FORMAT}"'.encode(), f'"format":"{KEY_FILE_FORMAT}"'.encode())
_DEFAULT_ENDPOINT = "https://huggingface.co"


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


# ---------------------------------------------------------------- helpers
def _endpoint(endpoint: Optional[str]) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _xet_enabled() -> bool:
    import importlib.util

    from huggingface_hub import constants

    # The same rule huggingface_hub applies: hf_xet installed and not disabled.
    return not constants.HF_HUB_DISABLE_XET and importlib.util.find_spec("hf_xet") is not None


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str, revision: Optional[str], *, pushing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub / network errors into kp-plugin errors that say
    what to do."""
    import httpx2
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r} at {endpoint}"
    try:
        yield
    except KPError:
        raise
    except OfflineModeIsEnabled:
        raise HubUnreachableError(
            f"HF_HUB_OFFLINE is set, so {where} cannot be reached"
            + (": unset HF_HUB_OFFLINE to upload" if pushing else " and the model is not in the local cache")
        ) from None
    except GatedRepoError:
        raise RepoNotFoundError(f"{where} is gated: accept its terms on the Hub and pass token= (or set HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise RepoNotFoundError(
            f"revision {revision!r} of {where} does not exist: check the branch, tag or commit name"
        ) from None
    except RepositoryNotFoundError:
        raise RepoNotFoundError(
            f"repository {where} does not exist, or it is private and the token cannot see it: check the "
            "name, and pass token= (or set HF_TOKEN) for private repositories"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubError(
                f"the Hub refused access to {where} (HTTP {status}): pass a token with "
                f"{'write' if pushing else 'read'} access as token= (or set HF_TOKEN)"
            ) from None
        if pushing and _xet_enabled() and endpoint != _DEFAULT_ENDPOINT:
            raise HubUploadError(_xet_hint(where, exc)) from None
        raise HubError(f"the Hub at {endpoint} answered HTTP {status} for {repo_id!r}: {_first_line(exc)}") from None
    except (httpx2.TransportError, ConnectionError) as exc:
        if pushing and _xet_enabled() and ("xet" in str(exc).lower()) and endpoint != _DEFAULT_ENDPOINT:
            raise HubUploadError(_xet_hint(where, exc)) from None
        raise HubUnreachableError(
            f"cannot reach the Hub at {endpoint} ({_first_line(exc)}): check the address (endpoint= or "
            "HF_ENDPOINT) and the network"
            + ("" if pushing else "; to load a model pulled before, set HF_HUB_OFFLINE=1")
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _xet_hint(where: str, exc: BaseException) -> str:
    return (
        f"uploading to {where} failed in the Xet protocol ({_first_line(exc)}). Self-hosted hubs usually "
        "speak only the classic LFS upload protocol: set HF_HUB_DISABLE_XET=1 in the environment (before "
        "Python starts) and push again"
    )


def _files_to_upload(directory: Path) -> dict:
    """``path_in_repo -> local path`` for a checkpoint directory: every file
    except hidden ones (``.git``, temporary files) and an old model card."""
    files = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts) or rel.as_posix() == CARD_FILE:
            continue
        files[rel.as_posix()] = path
    return files


def _refuse_key_material(files: Mapping[str, Path], key: Optional[SecretKey]) -> None:
    """Raise :class:`KeyLeakError` if a file holds key material or is a key
    file. Without ``key`` only key files can be recognized."""
    needles = list(key.secret_forms()) if key is not None else []
    needles += list(_KEY_FILE_MARKERS)
    leaks = []
    for name, path in files.items():
        data = Path(path).read_bytes()
        if name.endswith(".key") or any(n in data for n in needles):
            leaks.append(name)
    if leaks:
        raise KeyLeakError(
            f"refusing to upload: {', '.join(leaks)} hold(s) key material or a key file. Nothing was sent. "
            "Remove these files from the folder (the key stays on the owner's disk) and push again"
        )


def _native_library(directory: Path) -> Optional[str]:
    try:
        native = json.loads((directory / CONFIG_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(native, dict) and native.get("model_type"):
        return "transformers"
    if isinstance(native, dict) and isinstance(native.get("pretrained_cfg"), dict):
        return "timm"
    return None


def _base_model_of(model: ProtectedModel) -> Optional[str]:
    """The Hub id the base model was created from, when it says."""
    # timm's pretrained_cfg names its Hub weights even for a randomly
    # initialized model, so only transformers' from_pretrained origin counts.
    base = model.unwrap()
    name = getattr(getattr(base, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name.count("/") == 1 and not os.path.exists(name):
        return name
    return None


def _prepare_repo(api, repo_id: str, *, private: bool, revision: Optional[str], token) -> None:
    """Create the repository if needed; refuse a public one when private was
    asked; create the branch ``revision`` if it does not exist."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.repo_info(repo_id, token=token)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = api.repo_info(repo_id, token=token)
    if private and info.private is not True:
        raise PublicRepoError(
            f"{repo_id!r} already exists and is public, but private=True was asked; nothing was uploaded. "
            f"Make it private first (HfApi().update_repo_settings({repo_id!r}, private=True)), or pass "
            "private=False to publish the weights openly (they are useless without the key)"
        )
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)


# ------------------------------------------------------------------- push
def push_protected(
    model_or_directory: Union[ProtectedModel, str, os.PathLike],
    repo_id: str,
    *,
    private: bool = True,
    token: Union[str, bool, None] = None,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    key: Optional[SecretKey] = None,
    report: Union[str, os.PathLike, Mapping, None] = None,
    base_model: Optional[str] = None,
    processor: Any = None,
    endpoint: Optional[str] = None,
):
    """Publish a protected model on the Hub; the key stays here.

    Uploads the weights (``model.safetensors``), the architecture's own
    ``config.json`` (and ``preprocessor_config.json`` for transformers
    models), ``protection.json``, any other files of the folder (e.g. an
    evaluation ``report.json``) and a generated model card (``README.md``).
    Hidden files are skipped.

    Args:
        model_or_directory: a :class:`ProtectedModel`, or a directory written
            by :func:`kp_plugin.save_protected`.
        repo_id: ``"org/name"``.
        private: create the repository private (default). If it exists and
            is public, nothing is uploaded (:class:`PublicRepoError`).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        revision: branch to commit to (created from ``main`` if missing).
        commit_message: defaults to ``"Upload key-protected model"``.
        key: for a directory, the owner's key, so the scan can look for its
            material (without it only key files are recognized) and check
            the folder's fingerprint. A model brings its own key.
        report: an evaluation report (dict or ``report.json`` path) for the
            card's accuracy section; default: ``report.json`` in the folder.
        base_model: Hub id of the pre-trained base, for the card (default:
            the ``from_pretrained`` origin of a transformers model; timm
            models cannot tell, so pass it, e.g. ``"timm/resnet18.a1_in1k"``).
        processor: a transformers image processor to publish as
            ``preprocessor_config.json`` (e.g. ``kp_plugin.hf.KeyedImageProcessor``,
            which saves without the key); replaces the folder's own.
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).

    Returns:
        huggingface_hub's ``CommitInfo`` (``.commit_url``, ``.oid``).

    Raises:
        KeyLeakError: a file to upload holds key material; nothing was sent.
        KeyMismatchError: ``key`` is not the folder's key.
        PublicRepoError: ``private=True`` but the repository is public.
        HubUnreachableError, RepoNotFoundError, HubUploadError, HubError:
            the Hub could not be used; the message says what to do.

    Example:
        >>> push_protected(model, "org/resnet18-locked")                          # doctest: +SKIP
        >>> push_protected("out/", "org/resnet18-locked", key=SecretKey.load("owner.key"))  # doctest: +SKIP
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    endpoint = _endpoint(endpoint)
    with tempfile.TemporaryDirectory(prefix="kp-push-") as staging_dir:
        staging = Path(staging_dir)
        if isinstance(model_or_directory, ProtectedModel):
            if key is not None and key.fingerprint != model_or_directory.key.fingerprint:
                raise KeyMismatchError(
                    f"key= has fingerprint {key.fingerprint} but the model is protected with "
                    f"{model_or_directory.key.fingerprint}; leave key= out when pushing a model"
                )
            key = model_or_directory.key
            base_model = base_model or _base_model_of(model_or_directory)
            directory = save_protected(model_or_directory, staging / "model")
        elif isinstance(model_or_directory, (str, os.PathLike)):
            directory = Path(model_or_directory)
            if not directory.is_dir():
                raise CheckpointError(f"{directory} is not a directory; save the model with save_protected first")
        else:
            raise ConfigurationError(
                f"push_protected takes a ProtectedModel or a directory, got {type(model_or_directory).__name__}"
            )
        protection = ProtectionConfig.load(directory)
        if key is not None:
            protection.check_key(key)
        files = _files_to_upload(directory)
        if processor is not None:
            processor.save_pretrained(str(staging / "processor"))
            files[PREPROCESSOR_FILE] = staging / "processor" / PREPROCESSOR_FILE
        if WEIGHTS_FILE not in files and not any(n.endswith(".safetensors") for n in files):
            raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}; save the model with save_protected first")
        card = build_model_card(
            protection, repo_id=repo_id, native_library=_native_library(directory), base_model=base_model,
            report=read_report(report if report is not None else directory / REPORT_FILE),
        )
        card.save(staging / CARD_FILE)
        files[CARD_FILE] = staging / CARD_FILE
        _refuse_key_material(files, key)

        api = HfApi(endpoint=endpoint, token=token)
        with _hub_errors(endpoint, repo_id, revision, pushing=True):
            _prepare_repo(api, repo_id, private=private, revision=revision, token=token)
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                          for name, path in files.items()]
            return api.create_commit(
                repo_id, operations=operations, commit_message=commit_message or "Upload key-protected model",
                revision=revision, token=token,
            )


# ------------------------------------------------------------------- pull
def download_protected(
    repo_id: str,
    *,
    key: Optional[SecretKey] = None,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    endpoint: Optional[str] = None,
) -> Path:
    """Download a protected model into the Hub cache and return its folder.

    ``protection.json`` comes first: with ``key`` given, the fingerprint is
    checked before the weights are fetched. Token and revision go with every
    download. With ``HF_HUB_OFFLINE=1``, or when the endpoint cannot be
    reached, the cached copy is used.

    Args:
        repo_id: ``"org/name"``.
        key: check that this is the model's key (:class:`KeyMismatchError`).
        revision: branch, tag or commit (default ``main``).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        cache_dir: Hub cache folder (default: ``HF_HUB_CACHE``).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).

    Example:
        >>> folder = download_protected("org/name", key=SecretKey.load("owner.key"))  # doctest: +SKIP
    """
    import httpx2
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    endpoint = _endpoint(endpoint)
    offline = _offline()
    listed: Optional[set] = None
    if not offline:
        api = HfApi(endpoint=endpoint, token=token)
        try:
            with _hub_errors(endpoint, repo_id, revision):
                # revision= always: read-only mirrors (olah) answer only that route.
                info = api.model_info(repo_id, revision=revision or "main", token=token)
            listed = {s.rfilename for s in (info.siblings or [])}
        except HubUnreachableError:
            if not _cached(repo_id, revision, cache_dir):
                raise
            offline = True  # the endpoint is down but the model is cached: use the cache
    if listed is not None and PROTECTION_FILE not in listed:
        raise NotProtectedRepoError(
            f"{repo_id!r} at {endpoint} has no {PROTECTION_FILE}: it is not a kp-plugin protected model "
            "(publish one with kp_plugin.hub.push_protected)"
        )

    def fetch(filename: str) -> Path:
        try:
            with _hub_errors(endpoint, repo_id, revision):
                try:
                    return Path(hf_hub_download(repo_id, filename, revision=revision, token=token,
                                                cache_dir=cache_dir, endpoint=endpoint, local_files_only=offline))
                except RemoteEntryNotFoundError:
                    raise NotProtectedRepoError(
                        f"{repo_id!r} has no {filename}"
                        + (f": it is not a kp-plugin protected model (publish one with push_protected)"
                           if filename == PROTECTION_FILE else "; the protected model is incomplete")
                    ) from None
        except (LocalEntryNotFoundError, httpx2.TransportError) as exc:
            raise HubUnreachableError(
                f"{filename} of {repo_id!r} is not in the local cache and {endpoint} "
                f"{'is not used (HF_HUB_OFFLINE)' if offline else 'cannot be reached'}: pull it once online "
                "(same cache_dir and revision), then offline works"
            ) from exc
        except RepoNotFoundError:
            if listed is None and filename == PROTECTION_FILE:
                raise
            raise NotProtectedRepoError(f"{repo_id!r} has no {filename}; it is not a complete protected model") from None

    protection_path = fetch(PROTECTION_FILE)
    if key is not None:
        ProtectionConfig.load(protection_path).check_key(key)
    for filename in (CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE):
        if listed is not None and filename not in listed:
            if filename == WEIGHTS_FILE:
                raise NotProtectedRepoError(f"{repo_id!r} has {PROTECTION_FILE} but no {WEIGHTS_FILE}")
            continue
        try:
            fetch(filename)
        except (HubUnreachableError, NotProtectedRepoError):
            if filename == WEIGHTS_FILE or (listed is not None and filename in listed):
                raise
    return protection_path.parent


def _cached(repo_id: str, revision: Optional[str], cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, PROTECTION_FILE, cache_dir=cache_dir, revision=revision)
    return isinstance(path, str)


def _build_transformers_model(directory: Path):
    """A fresh transformers model of the checkpoint's class: ``config.json``'s
    ``architectures``, else ``protection.json``'s ``architecture``, else the
    image-classification auto class."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(directory))
    names = list(getattr(config, "architectures", None) or []) + [ProtectionConfig.load(directory).architecture]
    cls = next((getattr(transformers, n) for n in names if isinstance(n, str) and hasattr(transformers, n)), None)
    if cls is None:
        return transformers.AutoModelForImageClassification.from_config(config)
    return cls(config)


def pull_protected(
    repo_id: str,
    key: SecretKey,
    *,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    endpoint: Optional[str] = None,
    model: Optional[torch.nn.Module] = None,
    allow_wrong_key: bool = False,
    device: Union[str, torch.device] = "cpu",
) -> ProtectedModel:
    """Download a protected model and return it ready to use with ``key``.

    The architecture is rebuilt from the repository's own ``config.json``:
    timm models through timm, transformers models through their
    ``architectures`` class. For anything else pass ``model=`` (a fresh
    instance of the architecture).

    Args:
        repo_id: ``"org/name"``.
        key: the owner's key.
        revision: branch, tag or commit (default ``main``).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        cache_dir: Hub cache folder (default: ``HF_HUB_CACHE``).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).
        model: the base architecture to load the weights into.
        allow_wrong_key: load even with another key (wrong-key evaluation).
        device: where to load the weights.

    Raises:
        KeyMismatchError: ``key`` is not the model's key (checked before the
            weights are downloaded).
        NotProtectedRepoError: the repository has no ``protection.json``.
        RepoNotFoundError, HubUnreachableError, HubError: see the message.

    Example:
        >>> model = pull_protected("org/name", SecretKey.load("owner.key"))  # doctest: +SKIP
        >>> logits = model(images01)                                          # doctest: +SKIP
    """
    if not isinstance(key, SecretKey):
        raise TypeError(f"key must be a kp_plugin.SecretKey, got {type(key).__name__}")
    directory = download_protected(
        repo_id, key=None if allow_wrong_key else key, revision=revision, token=token, cache_dir=cache_dir,
        endpoint=endpoint,
    )
    return _load_rebuilt(directory, key, model=model, allow_wrong_key=allow_wrong_key, device=device,
                         source=repo_id)


def _load_rebuilt(directory: Path, key: SecretKey, *, model=None, allow_wrong_key: bool = False,
                  device: Union[str, torch.device] = "cpu", source: str = "") -> ProtectedModel:
    """Load a downloaded checkpoint, rebuilding the architecture from its
    native ``config.json`` unless ``model`` is given."""
    repo_id = source or str(directory)
    if model is None:
        library = _native_library(directory)
        if library == "timm":
            from .timm import load_protected_timm

            return load_protected_timm(directory, key, allow_wrong_key=allow_wrong_key, device=device)
        if library == "transformers":
            model = _build_transformers_model(directory)
        else:
            raise CheckpointError(
                f"{repo_id!r} has no timm or transformers config.json to rebuild the architecture from; "
                "pass model= (a fresh instance of the architecture)"
            )
    return load_protected(directory, model, key, allow_wrong_key=allow_wrong_key, device=device)
