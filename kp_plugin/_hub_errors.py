"""Errors of the Hub adapter, and the translation of huggingface_hub and
network errors into them, with messages that say what to do."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

from .errors import (CorruptDownloadError, HubError, HubUnreachableError, HubUploadError, KPError,
                     NotProtectedRepoError, PublicRepoError, RepoNotFoundError, first_line)

__all__ = [cls.__name__ for cls in (HubError, HubUnreachableError, RepoNotFoundError, NotProtectedRepoError,
                                    PublicRepoError, HubUploadError, CorruptDownloadError)]

_DEFAULT_ENDPOINT = "https://huggingface.co"


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
    return not getattr(constants, "HF_HUB_DISABLE_XET", False) and importlib.util.find_spec("hf_xet") is not None


def transport_errors() -> tuple:
    """Connection-level error classes of whichever HTTP stack this
    huggingface_hub uses (httpx2 in 2.x, httpx in 1.x, requests before)."""
    import importlib

    found = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _mentions_xet(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    url = str(getattr(response, "url", "") or "")
    return "xet" in str(exc).lower() or "xet" in url.lower()


@contextlib.contextmanager
def _hub_errors(endpoint: str, repo_id: str, revision: Optional[str], *, pushing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub / network errors into kp-plugin errors that say
    what to do."""
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
        if pushing and _xet_enabled() and _mentions_xet(exc) and endpoint != _DEFAULT_ENDPOINT:
            raise HubUploadError(_xet_hint(where, exc)) from None
        if status == 429:
            advice = "too many requests: wait a minute and try again"
        elif status is not None and status >= 500:
            advice = "a server error: try again later" + (
                "" if pushing else " (a model pulled before loads from the local cache with HF_HUB_OFFLINE=1)")
        else:
            advice = "check the repository name, the revision and the token"
        raise HubError(
            f"the Hub at {endpoint} answered HTTP {status} for {repo_id!r} ({first_line(exc)[:200]}); {advice}"
        ) from None
    except transport_errors() as exc:
        if pushing and _xet_enabled() and _mentions_xet(exc) and endpoint != _DEFAULT_ENDPOINT:
            raise HubUploadError(_xet_hint(where, exc)) from None
        raise HubUnreachableError(
            f"cannot reach the Hub at {endpoint} ({first_line(exc)}): check the address (endpoint= or "
            "HF_ENDPOINT) and the network"
            + ("" if pushing else "; to load a model pulled before, set HF_HUB_OFFLINE=1")
        ) from None


def _xet_hint(where: str, exc: BaseException) -> str:
    return (
        f"uploading to {where} failed in the Xet protocol ({first_line(exc)}). Self-hosted hubs usually "
        "speak only the classic LFS upload protocol: set HF_HUB_DISABLE_XET=1 in the environment (before "
        "Python starts) and push again"
    )
