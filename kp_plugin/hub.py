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
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from ._hub_card import build_model_card, read_report
from ._hub_errors import (
    CorruptDownloadError,
    HubError,
    HubUnreachableError,
    HubUploadError,
    NotProtectedRepoError,
    PublicRepoError,
    RepoNotFoundError,
    _endpoint,
    _hub_errors,
    _offline,
    transport_errors,
)
from .autoload import _read_native_config, load_protected_auto, native_library
from ._hub_scan import CARD_FILE, _files_to_upload, _folder_files, _refuse_key_material
from .checkpoint import (CONFIG_FILE, PROTECTION_FILE, WEIGHTS_FILE, ProtectionConfig, folder_lock, hash_file,
                         read_weights_header, replacing, save_protected)
from .errors import CheckpointError, ConfigurationError, KeyMismatchError, first_line
from .keys import SecretKey, require_key
from .module import ProtectedModel, protected_model_of

__all__ = ["push_protected", "pull_protected", "download_protected",
           *(cls.__name__ for cls in (HubError, HubUnreachableError, RepoNotFoundError, NotProtectedRepoError,
                                      PublicRepoError, HubUploadError, CorruptDownloadError))]

PREPROCESSOR_FILE = "preprocessor_config.json"
#: Where a keyed image processor's saved config records its key's public
#: settings (kp_plugin.hf.processor.PROTECTION_FIELD; not imported: hub.py
#: must not pull in transformers).
_PROCESSOR_PROTECTION_FIELD = "kp_protection"


def _default_processor(directory: Path, protection: ProtectionConfig, key: SecretKey) -> Any:
    """For a transformers model pushed without an image processor: its
    architecture's default processor set to the protection's input size and
    normalization, keyed (so the repository holds a preprocessor_config.json
    as transformers repositories do); ``None`` for other models, or when
    there is no such processor."""
    if native_library(directory) != "transformers" or not protection.input_size:
        return None
    from .hf.processor import default_keyed_processor  # a transformers model: transformers is installed

    model_type = _read_native_config(directory).get("model_type")
    return default_keyed_processor(model_type, key, mean=protection.mean, std=protection.std,
                                   image_size=tuple(protection.input_size)[1:])


def _check_processor_key(path: Path, protection: ProtectionConfig) -> None:
    """A keyed processor published beside the model must be keyed with the
    model's key: with another, the owner's key could not load it from the
    repository (KeyMismatchError there), so refuse before sending."""
    try:
        saved = json.loads(path.read_text("utf-8")).get(_PROCESSOR_PROTECTION_FIELD)
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge: a base processor's config is uploaded as it is
    if isinstance(saved, dict) and saved.get("fingerprint") != protection.fingerprint:
        raise KeyMismatchError(
            f"the image processor is keyed with {saved.get('fingerprint')} but the model with "
            f"{protection.fingerprint}; build the KeyedImageProcessor from the model's key. Nothing was sent"
        )


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
    from huggingface_hub import constants
    from huggingface_hub.errors import RepositoryNotFoundError

    timeout = constants.HF_HUB_ETAG_TIMEOUT  # an endpoint that never answers must not hang the push
    try:
        info = api.repo_info(repo_id, token=token, timeout=timeout)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True, token=token)
        info = api.repo_info(repo_id, token=token, timeout=timeout)
    if private and info.private is not True:
        raise PublicRepoError(
            f"{repo_id!r} already exists and is public, but private=True was asked; nothing was uploaded. "
            f"Make it private first (HfApi().update_repo_settings({repo_id!r}, private=True)), or pass "
            "private=False (kp push --public) to publish the weights openly (they are of little use without the key)"
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
    include: Sequence[str] = (),
    endpoint: Optional[str] = None,
):
    """Publish a protected model on the Hub; the key stays here.

    Uploads the weights (``model.safetensors``), the architecture's own
    ``config.json`` (and ``preprocessor_config.json`` for transformers
    models), ``protection.json``, the evaluation report (``report.json`` or
    ``report/``) and ``training.json`` when present, and a generated model
    card (``README.md``); other files only when ``include`` names them
    (the per-epoch ``training/`` state and ``private/`` stay home). Every file of the
    folder is scanned for key material first.

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
            which saves without the key); replaces the folder's own. A
            model from ``wrap_hf_model(..., image_processor=...)`` publishes
            that processor, keyed, by default.
        include: extra glob patterns (relative paths) of files to upload,
            e.g. ``["samples/*.png"]``. ``training/`` and ``private/``
            are never uploaded, whatever the patterns match.
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

    if key is not None:
        require_key(key)
    _check_repo_id(repo_id)
    endpoint = _endpoint(endpoint)
    with tempfile.TemporaryDirectory(prefix="kp-push-") as staging_dir, contextlib.ExitStack() as stack:
        staging = Path(staging_dir)
        protected = protected_model_of(model_or_directory)  # also through torch.compile / DDP
        if protected is not None:
            model_or_directory = protected
            if key is not None and key.fingerprint != model_or_directory.key.fingerprint:
                raise KeyMismatchError(
                    f"key= has fingerprint {key.fingerprint} but the model is protected with "
                    f"{model_or_directory.key.fingerprint}; leave key= out when pushing a model"
                )
            key = model_or_directory.key
            if processor is None:  # the processor wrap_hf_model was given
                processor = getattr(model_or_directory, "keyed_image_processor", None)
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
        # One save whole: save_protected holds this folder's lock while it
        # renames its files in, so under the shared lock the files checked
        # here are one checkpoint; they are linked (or copied) into a folder
        # of their own there and sent from it, so a save after the lock is
        # released changes nothing sent (sent from the folder, a push beside
        # a training run's saves published weights and protection.json of
        # different saves, which then failed to load for everyone).
        with folder_lock(directory, shared=True):
            protection = ProtectionConfig.load(directory)
            if key is not None:
                protection.check_key(key, unsigned="error")
            files = _files_to_upload(directory, include)
            if processor is None and key is not None and PREPROCESSOR_FILE not in files:
                processor = _default_processor(directory, protection, key)
            if processor is not None:
                processor.save_pretrained(str(staging / "processor"))
                files[PREPROCESSOR_FILE] = staging / "processor" / PREPROCESSOR_FILE
            if WEIGHTS_FILE not in files and not any(n.endswith(".safetensors") for n in files):
                raise CheckpointError(f"{directory} has no {WEIGHTS_FILE}; save the model with save_protected "
                                      "first")
            for name, path in files.items():
                if name.endswith(".safetensors"):  # a truncated or foreign file went up and failed only on pull
                    read_weights_header(Path(path), protection)
            if PREPROCESSOR_FILE in files:
                _check_processor_key(Path(files[PREPROCESSOR_FILE]), protection)
            evaluation = read_report(report if report is not None else directory)
            if evaluation is not None and evaluation.get("fingerprint") not in (None, protection.fingerprint):
                raise ConfigurationError(
                    f"the evaluation report is of a model protected with key {evaluation.get('fingerprint')}, not "
                    f"this one ({protection.fingerprint}); its accuracies would go on this model's card. Nothing was "
                    "sent: evaluate this model (kp evaluate) or pass the right report="
                )
            if evaluation is not None and evaluation.get("weights_digest") not in (None, protection.weights_digest):
                raise ConfigurationError(
                    f"the evaluation report is of other weights (digest {evaluation.get('weights_digest')}) than "
                    f"this checkpoint's ({protection.weights_digest}), another model protected with the same key or "
                    "this one before more training; its accuracies would go on this model's card. Nothing was sent: "
                    "evaluate this model (kp evaluate) or pass the right report="
                )
            card = build_model_card(
                protection, repo_id=repo_id, native_library=native_library(directory), base_model=base_model,
                report=evaluation,
            )
            card.save(staging / CARD_FILE)
            files[CARD_FILE] = staging / CARD_FILE
            # Everything in the folder is scanned, not only what is uploaded: a
            # key file next to the weights is a mistake worth stopping for.
            _refuse_key_material({**_folder_files(directory), **files}, key,
                                 commit_message=commit_message or "")
            sent = _snapshot(files, directory, staging, stack)

        api = HfApi(endpoint=endpoint, token=token)
        with _hub_errors(endpoint, repo_id, revision, pushing=True):
            _prepare_repo(api, repo_id, private=private, revision=revision, token=token)
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                          for name, path in sent.items()]
            return api.create_commit(
                repo_id, operations=operations, commit_message=commit_message or "Upload key-protected model",
                revision=revision, token=token,
            )


def _snapshot(files: Mapping[str, Path], directory: Path, staging: Path, stack: contextlib.ExitStack) -> dict:
    """The files of ``directory`` among ``files`` as they are now: hard links
    in a hidden folder inside ``directory`` (the same file system; removed when
    ``stack`` closes), or copies in ``staging`` where links cannot be made (a
    read-only folder). A save that renames new files in afterwards leaves
    these on the files that were checked. Paths, not open files, go to
    huggingface_hub: it uploads open files without Xet."""
    try:
        held = Path(tempfile.mkdtemp(prefix=".kp-push-", dir=directory))
        stack.callback(shutil.rmtree, held, ignore_errors=True)
    except OSError:
        held = staging / "snapshot"
    taken = {}
    for name, path in files.items():
        path = Path(path)
        if directory not in path.parents:  # made for this push (card, processor): stays as it is
            taken[name] = path
            continue
        copy = held / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, copy)
        except OSError:  # another file system, links not allowed
            shutil.copy2(path, copy)
        taken[name] = copy
    return taken


def _check_repo_id(repo_id: object) -> None:
    """:class:`ConfigurationError` for a repository id the Hub would refuse
    (huggingface_hub's own check raised its HFValidationError)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise ConfigurationError(f"{exc} (a repository id looks like 'org/name')") from None


# ------------------------------------------------------------------- pull
def download_protected(
    repo_id: str,
    *,
    key: Optional[SecretKey] = None,
    revision: Optional[str] = None,
    token: Union[str, bool, None] = None,
    cache_dir: Union[str, os.PathLike, None] = None,
    endpoint: Optional[str] = None,
    force_download: bool = False,
) -> Path:
    """Download a protected model into the Hub cache and return its folder.

    ``protection.json`` comes first: with ``key`` given, the fingerprint is
    checked before the weights are fetched. Every file comes from the one
    commit the revision named when the pull began (a branch that moves
    during the pull does not mix two commits), and each is checked against
    the Hub's own hash of it (the name the cache stores it under: SHA-256
    for LFS files, the git blob hash for others). With ``HF_HUB_OFFLINE=1``,
    or when the endpoint cannot be reached (or does not answer within
    ``HF_HUB_ETAG_TIMEOUT`` seconds), the cached copy is used.

    Args:
        repo_id: ``"org/name"``.
        key: check that this is the model's key (:class:`KeyMismatchError`).
        revision: branch, tag or commit (default ``main``).
        token: Hub token (default: ``HF_TOKEN`` or the saved login).
        cache_dir: Hub cache folder (default: ``HF_HUB_CACHE``).
        endpoint: the Hub URL (default: ``HF_ENDPOINT`` or huggingface.co).
        force_download: download every file again, even if cached (after a
            :class:`CorruptDownloadError`).

    Raises:
        CorruptDownloadError: a downloaded or cached file is not what the
            Hub holds (cut short, or changed); pull again with
            ``force_download=True``.

    Example:
        >>> folder = download_protected("org/name", key=SecretKey.load("owner.key"))  # doctest: +SKIP
    """
    from huggingface_hub import HfApi, constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    if key is not None:
        require_key(key)
    _check_repo_id(repo_id)
    endpoint = _endpoint(endpoint)
    offline = _offline()
    why_offline = "is not used (HF_HUB_OFFLINE)"
    listed: Optional[set] = None
    commit: Optional[str] = None
    if not offline:
        api = HfApi(endpoint=endpoint, token=token)
        try:
            with _hub_errors(endpoint, repo_id, revision):
                # revision= always: read-only mirrors (olah) answer only that route.
                # A timeout: an endpoint that takes the connection and never
                # answers (a wrong proxy) would otherwise hang the pull.
                info = api.model_info(repo_id, revision=revision or "main", token=token,
                                      timeout=constants.HF_HUB_ETAG_TIMEOUT)
            listed = {s.rfilename for s in (info.siblings or [])}
            commit = info.sha
        except HubUnreachableError:
            if not _cached(repo_id, revision, cache_dir):
                raise
            offline = True  # the endpoint is down but the model is cached: use the cache
            why_offline = "cannot be reached"
    if listed is not None and PROTECTION_FILE not in listed:
        raise NotProtectedRepoError(
            f"{repo_id!r} at {endpoint} has no {PROTECTION_FILE}: it is not a kp-plugin protected model "
            "(publish one with kp_plugin.hub.push_protected)"
        )

    def fetch(filename: str) -> Path:
        try:
            with _hub_errors(endpoint, repo_id, revision):
                try:
                    path = Path(hf_hub_download(repo_id, filename, revision=commit or revision, token=token,
                                                cache_dir=cache_dir, endpoint=endpoint, local_files_only=offline,
                                                force_download=force_download and not offline))
                    _check_download(path, repo_id, filename)
                    return path
                except OSError as exc:
                    if "Consistency check failed" not in str(exc):
                        raise
                    raise CorruptDownloadError(
                        f"the download of {filename} from {repo_id!r} was cut short ({first_line(exc)}); pull again "
                        "with force_download=True (kp pull --force-download)"
                    ) from None
                except RemoteEntryNotFoundError:
                    raise NotProtectedRepoError(
                        f"{repo_id!r} has no {filename}"
                        + (": it is not a kp-plugin protected model (publish one with push_protected)"
                           if filename == PROTECTION_FILE else "; the protected model is incomplete")
                    ) from None
        except (LocalEntryNotFoundError, *transport_errors()) as exc:
            status = _http_status(exc)
            if status is not None and status >= 500:
                raise HubError(
                    f"the Hub at {endpoint} answered HTTP {status} (a server error) for {filename} of {repo_id!r} "
                    "and it is not in the local cache: try again later"
                ) from None
            if not offline and listed is not None:
                # The repository's information came through; the file did not
                # (a proxy or link that stalls downloads): not an offline matter.
                raise HubUnreachableError(
                    f"{filename} of {repo_id!r} could not be downloaded from {endpoint} ({type(exc).__name__}), "
                    "though the repository's information came through: check the network or proxy (HF_ENDPOINT) "
                    "and pull again; on a slow link raise HF_HUB_DOWNLOAD_TIMEOUT and HF_HUB_ETAG_TIMEOUT"
                ) from exc
            raise HubUnreachableError(
                f"{filename} of {repo_id!r} is not in the local cache and {endpoint} "
                f"{why_offline if offline else 'cannot be reached'}: pull it once online "
                "(same cache_dir and revision), then offline works"
            ) from exc
        except RepoNotFoundError:
            if listed is None and filename == PROTECTION_FILE:
                raise
            raise NotProtectedRepoError(f"{repo_id!r} has no {filename}; it is not a complete protected model") from None

    protection_path = fetch(PROTECTION_FILE)
    if key is not None:
        ProtectionConfig.load(protection_path).check_key(key, unsigned="error")
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
    if commit is not None and revision != commit:
        _remember_revision(protection_path, revision or "main", commit)
    return protection_path.parent


def _http_status(exc: BaseException) -> Optional[int]:
    """The HTTP status of the error behind ``exc`` (huggingface_hub raises
    LocalEntryNotFoundError from the failed call), if any."""
    seen = 0
    while exc is not None and seen < 5:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _check_download(path: Path, repo_id: str, filename: str) -> None:
    """:class:`CorruptDownloadError` when the cached file is not what the Hub
    holds. The cache stores each file under the Hub's hash of it (its ETag):
    SHA-256 of the content for LFS files, the git blob hash for others."""
    import hashlib
    import re

    blob = Path(os.path.realpath(path))
    expected = blob.name
    if re.fullmatch(r"[0-9a-f]{64}", expected):
        digest = hashlib.sha256()
    elif re.fullmatch(r"[0-9a-f]{40}", expected):
        digest = hashlib.sha1(f"blob {blob.stat().st_size}\0".encode())
    else:
        return  # a mirror's own ETag: nothing to compare with
    if hash_file(blob, digest).hexdigest() != expected:
        raise CorruptDownloadError(
            f"{filename} of {repo_id!r} in the local cache ({blob}) is not the file the Hub holds (hash "
            f"{digest.hexdigest()[:12]}..., expected {expected[:12]}...): it was damaged in transfer or on disk. "
            "Pull again with force_download=True (kp pull --force-download)"
        )


def _remember_revision(protection_path: Path, revision: str, commit: str) -> None:
    """Point the cache's ``refs/<revision>`` at ``commit``, as a download by
    the revision's name does: the files were fetched by commit, and an
    offline pull later looks the revision up there."""
    storage = protection_path.parent.parent.parent  # <storage>/snapshots/<commit>/protection.json
    if protection_path.parent.name != commit or protection_path.parent.parent.name != "snapshots":
        return
    ref = storage / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            with replacing(ref) as tmp:  # readers see the old commit or the new, never half a name
                tmp.write_text(commit)
    except OSError:
        pass  # a read-only cache: the pull itself succeeded


def _cached(repo_id: str, revision: Optional[str], cache_dir) -> bool:
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, PROTECTION_FILE, cache_dir=cache_dir, revision=revision)
    return isinstance(path, str)


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
    force_download: bool = False,
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
        force_download: download every file again, even if cached.

    Raises:
        KeyMismatchError: ``key`` is not the model's key (checked before the
            weights are downloaded).
        NotProtectedRepoError: the repository has no ``protection.json``.
        CorruptDownloadError: a file is not what the Hub holds; pull again
            with ``force_download=True``.
        RepoNotFoundError, HubUnreachableError, HubError: see the message.

    Example:
        >>> model = pull_protected("org/name", SecretKey.load("owner.key"))  # doctest: +SKIP
        >>> logits = model(images01)                                          # doctest: +SKIP
    """
    require_key(key)
    directory = download_protected(
        repo_id, key=None if allow_wrong_key else key, revision=revision, token=token, cache_dir=cache_dir,
        endpoint=endpoint, force_download=force_download,
    )
    return load_protected_auto(directory, key, model=model, allow_wrong_key=allow_wrong_key, device=device,
                               source=repo_id)
