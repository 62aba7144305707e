"""pull_protected reading through olah (a real, read-only Hub mirror on
loopback) that serves plain git repositories the tests create."""

from __future__ import annotations

import pytest
import torch

from hub_servers import isolate_hub_client, olah_mirror  # noqa: F401 - fixtures
from kp_plugin import SecretKey, save_protected, wrap_model
from kp_plugin.hub import NotProtectedRepoError, RepoNotFoundError, pull_protected

timm = pytest.importorskip("timm")

KEY = SecretKey(bytes(range(50, 82)), block_size=8, scheme="shuffle+np", channels=3)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    return wrap_model(timm.create_model("test_resnet", num_classes=4), KEY).eval()


@pytest.fixture(scope="module")
def mirrored(olah_mirror, model, tmp_path_factory):
    """``org/mirrored``: a protected model committed to a git repo olah serves."""
    folder = save_protected(model, tmp_path_factory.mktemp("saved"))
    olah_mirror.add_repo("org/mirrored", {p.name: p for p in folder.iterdir() if p.is_file()})
    return "org/mirrored"


def test_pull_through_olah_gives_identical_logits(olah_mirror, mirrored, model, isolate_hub_client):
    pulled = pull_protected(mirrored, KEY, endpoint=olah_mirror.url, cache_dir=isolate_hub_client).eval()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))


def test_pull_through_olah_checks_the_fingerprint(olah_mirror, mirrored, isolate_hub_client):
    from kp_plugin import KeyMismatchError

    with pytest.raises(KeyMismatchError):
        pull_protected(mirrored, SecretKey.generate_like(KEY), endpoint=olah_mirror.url, cache_dir=isolate_hub_client)


def test_mirrored_repo_without_protection_json_is_not_a_protected_model(olah_mirror, isolate_hub_client):
    olah_mirror.add_repo("org/plain-vit", {"config.json": b'{"model_type": "vit"}\n'})
    with pytest.raises(NotProtectedRepoError, match="protection.json"):
        pull_protected("org/plain-vit", KEY, endpoint=olah_mirror.url, cache_dir=isolate_hub_client)


def test_repo_missing_from_the_mirror_says_so(olah_mirror, isolate_hub_client):
    with pytest.raises(RepoNotFoundError, match="does not exist"):
        pull_protected("org/not-mirrored", KEY, endpoint=olah_mirror.url, cache_dir=isolate_hub_client)
