"""Shared fixtures: fixed keys (reproducible) and tiny real models."""

from __future__ import annotations

import pytest
import torch

from kp_plugin import SecretKey

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests (opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``): faster for tiny
    tensors, and on a shared machine OpenMP threads that compete for the cores
    spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def full_disk_at(monkeypatch):
    """``full_disk_at(suffix)``: the next rename onto a path ending in
    ``suffix`` (in kp_plugin.checkpoint, which renames staged files in)
    fails with "No space left on device"; later ones (putting the previous
    files back) work. ``monkeypatch.undo()`` ends it."""
    import errno

    import kp_plugin.checkpoint

    real_replace = kp_plugin.checkpoint.os.replace

    def arm(suffix: str) -> None:
        failed = []

        def replace(src, dst, *args, **kwargs):
            if str(dst).endswith(suffix) and not failed:
                failed.append(dst)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(kp_plugin.checkpoint.os, "replace", replace)

    return arm


#: The golden-vector key of docs/key-format.md.
GOLDEN_MATERIAL = bytes(range(32))

ALL_STEPS = "shuffle+np+shift+ffx+scramble"


@pytest.fixture
def golden_key() -> SecretKey:
    """The documented test key, block size 4, RGB, the full scheme."""
    return SecretKey(GOLDEN_MATERIAL, block_size=4, scheme=ALL_STEPS, channels=3)


@pytest.fixture
def shuffle_np_key() -> SecretKey:
    """A fixed key with the affine (shuffle + negative/positive) scheme, block size 4."""
    return SecretKey(bytes(range(100, 132)), block_size=4, scheme="shuffle+np", channels=3)


@pytest.fixture
def tiny_cnn() -> torch.nn.Module:
    """A small real CNN (no timm/HF config: mean/std must be given)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 5),
    )


@pytest.fixture
def tiny_timm_model() -> torch.nn.Module:
    """A real timm model with a pretrained_cfg (random init, tiny, 3 classes)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3, pretrained=False).eval()
