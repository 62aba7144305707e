"""push_protected / pull_protected against the loopback test Hub, with the
real huggingface_hub client both ways (classic protocol, HF_HUB_DISABLE_XET)."""

from __future__ import annotations

import json

import pytest
import torch

from hub_servers import CLOSED_ENDPOINT, isolate_hub_client, test_hub  # noqa: F401 - fixtures
from kp_plugin import (CheckpointError, ConfigurationError, KeyLeakError, KeyMismatchError, ProtectionConfig, SecretKey,
                       save_protected, wrap_model)
from kp_plugin.checkpoint import find_key_material
from kp_plugin.hub import (
    HubUnreachableError,
    HubUploadError,
    NotProtectedRepoError,
    PublicRepoError,
    RepoNotFoundError,
    pull_protected,
    push_protected,
)

timm = pytest.importorskip("timm")

MATERIAL = bytes(range(7, 39))
KEY = SecretKey(MATERIAL, block_size=8, scheme="shuffle+np", channels=3)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return wrap_model(timm.create_model("test_resnet", num_classes=3), KEY).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def pushed(test_hub, model):
    """``org/locked``: the model pushed once for the module."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        push_protected(model, "org/locked", token=test_hub.token, endpoint=test_hub.url)
    return "org/locked"


def _pull(hub, repo_id, key, cache, **kw):
    return pull_protected(repo_id, key, token=hub.token, endpoint=hub.url, cache_dir=cache, **kw).eval()


def test_pull_gives_identical_logits_with_the_key(test_hub, pushed, model, isolate_hub_client):
    pulled = _pull(test_hub, pushed, KEY, isolate_hub_client)
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))


def test_pull_with_another_key_fails_before_the_weights_are_downloaded(test_hub, pushed, isolate_hub_client):
    before = len(test_hub.received())
    with pytest.raises(KeyMismatchError, match="another key"):
        _pull(test_hub, pushed, SecretKey.generate_like(KEY), isolate_hub_client)
    paths = [r["path"] for r in test_hub.received()[before:]]
    assert any(p.endswith("/protection.json") for p in paths)
    assert not any(p.endswith("/model.safetensors") for p in paths)


def test_repository_holds_weights_native_config_protection_and_card(test_hub, pushed):
    files = set(test_hub.head_files(pushed))
    assert {"model.safetensors", "config.json", "protection.json", "README.md"} <= files
    config = json.loads((test_hub.root / "blobs" / test_hub.head_files(pushed)["config.json"]).read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 3


def test_nothing_the_server_received_or_holds_contains_key_material(test_hub, pushed, model):
    weights = (test_hub.root / "blobs" / test_hub.head_files(pushed)["model.safetensors"]).read_bytes()
    assert len(weights) > 100_000  # the scan below covers the real upload
    assert find_key_material(test_hub.root, KEY) == []


def test_new_repository_is_private_and_invisible_without_token(test_hub, pushed, isolate_hub_client):
    assert test_hub.repo_state(pushed)["private"] is True
    with pytest.raises(RepoNotFoundError, match="token"):
        pull_protected(pushed, KEY, token=False, endpoint=test_hub.url, cache_dir=isolate_hub_client)


def test_private_push_into_existing_public_repo_uploads_nothing(test_hub, model, isolate_hub_client):
    from huggingface_hub import HfApi

    HfApi(endpoint=test_hub.url, token=test_hub.token).create_repo("org/open", private=False)
    head = dict(test_hub.head_files("org/open"))
    before = len(test_hub.received())
    with pytest.raises(PublicRepoError, match="nothing was uploaded"):
        push_protected(model, "org/open", token=test_hub.token, endpoint=test_hub.url)
    methods = {(r["method"], r["path"].split("?")[0]) for r in test_hub.received()[before:]}
    assert all(m == "GET" for m, _ in methods), methods
    assert test_hub.head_files("org/open") == head


def _refused_and_nothing_sent(test_hub, folder, error, match, **push) -> None:
    """push_protected(folder) raises ``error`` matching ``match`` and the test Hub received nothing."""
    before = len(test_hub.received())
    with pytest.raises(error, match=match):
        push_protected(folder, "org/refused", token=test_hub.token, endpoint=test_hub.url, **push)
    assert test_hub.received()[before:] == []


def test_folder_with_a_key_file_is_refused_and_nothing_is_sent(test_hub, model, tmp_path, isolate_hub_client):
    folder = save_protected(model, tmp_path / "out")
    KEY.save(folder / "owner.json")
    _refused_and_nothing_sent(test_hub, folder, KeyLeakError, "owner.json")


def test_folder_with_the_hex_key_is_refused_when_the_key_is_given(test_hub, model, tmp_path, isolate_hub_client):
    folder = save_protected(model, tmp_path / "out")
    (folder / "notes.txt").write_text(f"my key: {MATERIAL.hex()}\n")
    _refused_and_nothing_sent(test_hub, folder, KeyLeakError, "notes.txt", key=KEY)


def test_key_material_in_a_file_name_or_the_commit_message_is_refused(test_hub, model, tmp_path,
                                                                     isolate_hub_client):
    # Before, only file contents were scanned: the hex key as a file name
    # (with include) or in the commit message reached the server.
    folder = save_protected(model, tmp_path / "out")
    _refused_and_nothing_sent(test_hub, folder, KeyLeakError, "commit message", key=KEY,
                              commit_message=f"trained with {MATERIAL.hex()}")
    (folder / "samples").mkdir()
    (folder / "samples" / f"{MATERIAL.hex()}.txt").write_text("a sample")
    _refused_and_nothing_sent(test_hub, folder, KeyLeakError, "file name", key=KEY, include=["samples/*"])


def test_a_report_of_another_model_is_refused_for_the_card(test_hub, model, tmp_path, isolate_hub_client):
    # Before, a report.json of another key's model put its accuracies on
    # this model's card (and in its model-index).
    folder = save_protected(model, tmp_path / "out")
    other = SecretKey.generate_like(KEY)
    (folder / "report.json").write_text(json.dumps({"key_accuracy": 0.99, "fingerprint": other.fingerprint}))
    _refused_and_nothing_sent(test_hub, folder, ConfigurationError, "evaluation report", key=KEY)


def test_a_report_of_other_weights_under_the_same_key_is_refused_for_the_card(test_hub, model, tmp_path,
                                                                             isolate_hub_client):
    # Only the fingerprint was compared: another model protected with the same
    # key put its accuracies on this model's card (44.8% for a 56.0% model).
    from kp_plugin.evaluate import evaluate_protection

    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 3
    dataset = torch.utils.data.TensorDataset(images, labels)
    folder = save_protected(model, tmp_path / "out")
    torch.manual_seed(5)
    same_key = wrap_model(timm.create_model("test_resnet", num_classes=3), KEY).eval()
    stale = evaluate_protection(same_key, dataset, num_wrong_keys=2, progress=False, batch_size=8)
    assert stale.weights_digest and stale.to_dict()["weights_digest"] == stale.weights_digest
    _refused_and_nothing_sent(test_hub, folder, ConfigurationError, "report is of other weights", key=KEY,
                              report=stale)
    own = evaluate_protection(model, dataset, num_wrong_keys=2, progress=False, batch_size=8)
    (folder / "report.json").write_text(json.dumps(own.to_dict()))
    push_protected(folder, "org/own-report", key=KEY, token=test_hub.token, endpoint=test_hub.url)


def test_folder_with_the_permutation_as_indented_json_is_refused(test_hub, model, tmp_path, isolate_hub_client):
    # training.json is uploaded by default; an indented dump of the
    # permutation in it went up before.
    folder = save_protected(model, tmp_path / "out")
    (folder / "training.json").write_text(json.dumps({"perm": KEY.pixel_permutation()}, indent=2))
    _refused_and_nothing_sent(test_hub, folder, KeyLeakError, "training.json", key=KEY)


def test_a_truncated_weights_file_is_refused_before_anything_is_sent(test_hub, model, tmp_path, isolate_hub_client):
    # It went up whole (exit 0) and failed only on pull.
    folder = save_protected(model, tmp_path / "out")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused_and_nothing_sent(test_hub, folder, CheckpointError, "model.safetensors is corrupt", key=KEY)


def test_folder_push_uploads_checkpoint_and_report_but_not_training_state(test_hub, model, tmp_path,
                                                                         isolate_hub_client):
    folder = save_protected(model, tmp_path / "out")
    (folder / "report").mkdir()
    (folder / "report" / "report.json").write_text(json.dumps({"key_accuracy": 0.9, "dataset": "digits"}))
    (folder / "training").mkdir()
    (folder / "training" / "training_state.pt").write_bytes(b"optimizer state")
    (folder / "samples").mkdir()
    (folder / "samples" / "a.png").write_bytes(b"png")
    push_protected(folder, "org/selected", key=KEY, include=["samples/*.png"], token=test_hub.token,
                   endpoint=test_hub.url)
    files = set(test_hub.head_files("org/selected"))
    assert {"model.safetensors", "config.json", "protection.json", "README.md", "report/report.json",
            "samples/a.png"} <= files
    assert not any(name.startswith("training/") for name in files)
    # Owner-only folders stay home whatever include says (before, "*.png"
    # matched private/examples.png: plain images beside keyed ones).
    (folder / "private").mkdir()
    (folder / "private" / "examples.png").write_bytes(b"plain beside keyed")
    push_protected(folder, "org/everything", key=KEY, include=["*", "*.png"], token=test_hub.token,
                   endpoint=test_hub.url)
    everything = set(test_hub.head_files("org/everything"))
    assert "samples/a.png" in everything
    assert not any(name.startswith(("training/", "private/")) for name in everything)
    card = (test_hub.root / "blobs" / test_hub.head_files("org/selected")["README.md"]).read_text()
    assert "90.0%" in card


def test_an_onnx_export_inside_the_checkpoint_is_published_with_include(test_hub, model, tmp_path,
                                                                        isolate_hub_client):
    pytest.importorskip("onnxscript")
    from kp_plugin.export import export_protected

    sized = wrap_model(model.unwrap(), KEY, input_size=(3, 32, 32))
    folder = save_protected(sized, tmp_path / "out")
    export_protected(sized, folder / "onnx", format="onnx")
    push_protected(folder, "org/with-onnx", key=KEY, include=["onnx/*"], token=test_hub.token,
                   endpoint=test_hub.url)
    files = set(test_hub.head_files("org/with-onnx"))
    assert {"model.safetensors", "protection.json", "onnx/model.onnx", "onnx/protection.json"} <= files
    assert find_key_material(test_hub.root, KEY) == []


def test_a_compiled_model_is_pushed_as_its_protected_model(test_hub, model, isolate_hub_client):
    push_protected(torch.compile(model), "org/compiled", token=test_hub.token, endpoint=test_hub.url)
    assert {"model.safetensors", "protection.json", "README.md"} <= set(test_hub.head_files("org/compiled"))
    assert find_key_material(test_hub.root, KEY) == []


def test_folder_push_with_another_key_is_refused(test_hub, model, tmp_path, isolate_hub_client):
    folder = save_protected(model, tmp_path / "out")
    with pytest.raises(KeyMismatchError):
        push_protected(folder, "org/other", key=SecretKey.generate_like(KEY), token=test_hub.token,
                       endpoint=test_hub.url)


def test_model_card_has_tags_scheme_and_accuracy_from_the_report(test_hub, model, tmp_path, isolate_hub_client):
    from huggingface_hub import ModelCard

    folder = save_protected(model, tmp_path / "out")
    report = {"key_accuracy": 0.931, "wrong_key_accuracy_mean": 0.112, "wrong_key_accuracy_std": 0.02,
              "wrong_key_accuracy_max": 0.15, "num_wrong_keys": 100, "chance": 0.1, "dataset": "digits (test)"}
    (folder / "report.json").write_text(json.dumps(report))
    push_protected(folder, "org/carded", key=KEY, token=test_hub.token, endpoint=test_hub.url,
                   base_model="timm/test_resnet.r160_in1k")
    card = ModelCard((test_hub.root / "blobs" / test_hub.head_files("org/carded")["README.md"]).read_text())
    assert {"kp-plugin", "key-protected"} <= set(card.data.tags)
    assert card.data.library_name == "kp-plugin"
    assert card.data.base_model == "timm/test_resnet.r160_in1k"
    assert card.data.kp_plugin["scheme"] == "shuffle+np" and card.data.kp_plugin["block_size"] == 8
    assert "93.1%" in card.text and "11.2%" in card.text
    assert 'pull_protected("org/carded", key)' in card.text
    assert card.data.eval_results[0].metric_value == pytest.approx(0.931)
    # the dataset's type is an identifier, its name as kp evaluate wrote it
    assert (card.data.eval_results[0].dataset_type, card.data.eval_results[0].dataset_name) == \
        ("digits-test", "digits (test)")
    assert "measurements are below" in card.text


def test_a_card_without_a_report_claims_no_accuracy(model, tmp_path):
    # Before, every card said "It was fine-tuned ... With the owner's key it
    # is accurate", with no report behind it (or next to 29% with the key).
    from kp_plugin._hub_card import build_model_card

    card = build_model_card(ProtectionConfig.load(save_protected(model, tmp_path / "out")), repo_id="org/plain",
                            native_library="transformers")
    assert "fine-tuned" not in card.text and "it is\naccurate" not in card.text
    assert "states no accuracy" in card.text and "model(images).logits" in card.text


def test_a_report_without_wrong_keys_gives_a_card_without_nan(model, tmp_path):
    # Reports of kp evaluate --wrong-keys 0 held NaN (now null): the card
    # showed "nan%" and published a NaN metric.
    from kp_plugin._hub_card import build_model_card, read_report

    folder = save_protected(model, tmp_path / "out")
    report = {"key_accuracy": 0.9, "wrong_key_accuracy_mean": float("nan"), "wrong_key_accuracy_std": float("nan"),
              "wrong_key_accuracy_max": float("nan"), "num_wrong_keys": 0, "dataset": "digits"}
    (folder / "report.json").write_text(json.dumps(report))
    card = build_model_card(ProtectionConfig.load(folder), repo_id="org/name", report=read_report(folder))
    assert "nan" not in card.content.lower()
    assert [r.metric_name for r in card.data.eval_results] == ["accuracy with the key"]


def test_push_to_a_branch_and_pull_that_revision(test_hub, model, isolate_hub_client):
    push_protected(model, "org/branched", revision="v1", token=test_hub.token, endpoint=test_hub.url)
    assert "model.safetensors" in test_hub.head_files("org/branched", "v1")
    assert "model.safetensors" not in test_hub.head_files("org/branched", "main")
    pulled = _pull(test_hub, "org/branched", KEY, isolate_hub_client, revision="v1")
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))
    with pytest.raises(NotProtectedRepoError):
        _pull(test_hub, "org/branched", KEY, isolate_hub_client)


def test_save_pretrained_takes_the_transformers_keywords(test_hub, model, isolate_hub_client, tmp_path):
    model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="org/saved-and-pushed",
                          token=test_hub.token, endpoint=test_hub.url)
    assert (tmp_path / "saved" / "protection.json").is_file()
    pulled = _pull(test_hub, "org/saved-and-pushed", KEY, isolate_hub_client)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))
    model.save_pretrained(tmp_path / "other-rank", is_main_process=False)
    assert not (tmp_path / "other-rank").exists()
    with pytest.raises(ConfigurationError, match="safetensors"):
        model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    with pytest.raises(TypeError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "tokened", token="hf_x")
    assert not (tmp_path / "pickled").exists() and not (tmp_path / "tokened").exists()


def test_push_to_hub_publishes_the_protected_model_not_the_bare_base(test_hub, isolate_hub_client):
    # A transformers base has its own push_to_hub; reached through attribute
    # delegation it uploaded config + weights without protection.json.
    transformers = pytest.importorskip("transformers")
    from kp_plugin.hf import wrap_hf_model
    from kp_plugin.objectives import logits_of

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    protected = wrap_hf_model(transformers.ViTForImageClassification(config), KEY,
                              image_processor=transformers.ViTImageProcessor(size={"height": 32, "width": 32})).eval()
    protected.push_to_hub("org/pushed-by-method", token=test_hub.token, endpoint=test_hub.url, use_temp_dir=True,
                          commit_message="first version")
    files = set(test_hub.head_files("org/pushed-by-method"))
    assert {"protection.json", "model.safetensors", "config.json", "README.md"} <= files
    pulled = _pull(test_hub, "org/pushed-by-method", KEY, isolate_hub_client)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(pulled(images)), logits_of(protected(images)))
    assert find_key_material(test_hub.root, KEY) == []
    with pytest.raises(ConfigurationError, match="safetensors"):
        protected.push_to_hub("org/never", token=test_hub.token, endpoint=test_hub.url, safe_serialization=False)


def test_missing_repository_says_so(test_hub, isolate_hub_client):
    with pytest.raises(RepoNotFoundError, match="does not exist"):
        _pull(test_hub, "org/never-pushed", KEY, isolate_hub_client)


def test_missing_revision_says_so(test_hub, pushed, isolate_hub_client):
    with pytest.raises(RepoNotFoundError, match="revision 'nope'"):
        _pull(test_hub, pushed, KEY, isolate_hub_client, revision="nope")


def test_repository_without_protection_json_is_not_a_protected_model(test_hub, isolate_hub_client):
    from huggingface_hub import HfApi

    api = HfApi(endpoint=test_hub.url, token=test_hub.token)
    api.create_repo("org/plain")
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="org/plain")
    with pytest.raises(NotProtectedRepoError, match="protection.json"):
        _pull(test_hub, "org/plain", KEY, isolate_hub_client)


def test_unreachable_endpoint_says_what_to_do(isolate_hub_client, model):
    with pytest.raises(HubUnreachableError, match="HF_ENDPOINT"):
        pull_protected("org/locked", KEY, endpoint=CLOSED_ENDPOINT, cache_dir=isolate_hub_client)
    with pytest.raises(HubUnreachableError, match="cannot reach"):
        push_protected(model, "org/locked", token="t", endpoint=CLOSED_ENDPOINT)


def test_offline_pull_uses_the_cache_and_sends_nothing(test_hub, pushed, model, isolate_hub_client, monkeypatch):
    from huggingface_hub import constants

    _pull(test_hub, pushed, KEY, isolate_hub_client)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(test_hub.received())
    pulled = _pull(test_hub, pushed, KEY, isolate_hub_client)
    assert test_hub.received()[before:] == []
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))
    with pytest.raises(HubUnreachableError, match="not in the local cache"):
        _pull(test_hub, "org/carded", KEY, isolate_hub_client)


def test_cached_model_loads_when_the_endpoint_is_down(test_hub, pushed, isolate_hub_client):
    _pull(test_hub, pushed, KEY, isolate_hub_client)
    pulled = pull_protected(pushed, KEY, endpoint=CLOSED_ENDPOINT, cache_dir=isolate_hub_client)
    assert pulled.key.fingerprint == KEY.fingerprint


def test_xet_upload_failure_against_self_hosted_hub_suggests_disabling_xet(test_hub, model, monkeypatch,
                                                                           isolate_hub_client):
    from huggingface_hub import constants
    import importlib.util

    if importlib.util.find_spec("hf_xet") is None:
        pytest.skip("hf_xet is not installed, so the client never tries Xet")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    with pytest.raises(HubUploadError, match="HF_HUB_DISABLE_XET=1"):
        push_protected(model, "org/xet", token=test_hub.token, endpoint=test_hub.url)


def test_push_without_a_write_token_says_to_pass_one(test_hub, model, isolate_hub_client):
    from kp_plugin.hub import HubError

    with pytest.raises(HubError, match="token"):
        push_protected(model, "org/anonymous", token=False, endpoint=test_hub.url)


def test_key_material_split_across_read_chunks_is_found(tmp_path):
    from kp_plugin.checkpoint import file_contains_any

    secret = MATERIAL.hex().encode()
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 1000 + secret + b"y" * 1000)
    assert file_contains_any(path, [secret], chunk_size=1010)
    assert not file_contains_any(path, [SecretKey.generate_like(KEY).secret_forms()[5]], chunk_size=1010)


def test_an_endpoint_that_takes_the_connection_and_never_answers_times_out(test_hub, pushed, model, monkeypatch,
                                                                          isolate_hub_client):
    # Before, model_info / repo_info waited without a timeout: pull and push
    # hung for good (a wrong proxy, a firewall that swallows requests), even
    # with the model in the cache.
    import socket
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(HubUnreachableError, match="cannot reach"):
            pull_protected(pushed, KEY, endpoint=url, cache_dir=isolate_hub_client)
        with pytest.raises(HubUnreachableError, match="cannot reach"):
            push_protected(model, "org/never", token="t", endpoint=url)
        _pull(test_hub, pushed, KEY, isolate_hub_client)
        cached = pull_protected(pushed, KEY, endpoint=url, cache_dir=isolate_hub_client)
        assert cached.key.fingerprint == KEY.fingerprint
        assert time.monotonic() - started < 60


def _fault(hub, **fault) -> None:
    (hub.root / "fault.json").write_text(json.dumps(fault))


def test_damaged_or_cut_weights_are_refused_and_force_download_repairs_the_cache(test_hub, pushed, model,
                                                                               isolate_hub_client):
    # Before, weights damaged in transfer (same length) loaded silently with
    # wrong outputs and stayed in the cache; weights cut short raised a bare
    # OSError suggesting an option pull_protected did not have.
    from kp_plugin.hub import CorruptDownloadError

    try:
        _fault(test_hub, repo=pushed, path="model.safetensors", mode="damage")
        with pytest.raises(CorruptDownloadError, match="force_download=True"):
            _pull(test_hub, pushed, KEY, isolate_hub_client)
        (test_hub.root / "fault.json").unlink()
        with pytest.raises(CorruptDownloadError):  # the damaged file in the cache is found too
            _pull(test_hub, pushed, KEY, isolate_hub_client)
        pulled = _pull(test_hub, pushed, KEY, isolate_hub_client, force_download=True)
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(pulled(images), model(images))
        _fault(test_hub, repo=pushed, path="model.safetensors", mode="cut")
        with pytest.raises(CorruptDownloadError, match="cut short"):
            _pull(test_hub, pushed, KEY, isolate_hub_client.parent / "fresh-cache")
    finally:
        (test_hub.root / "fault.json").unlink(missing_ok=True)


def test_a_branch_that_moves_during_the_pull_does_not_mix_two_commits(test_hub, model, isolate_hub_client):
    # Before, every file was downloaded by branch name: a commit landing
    # between protection.json and the weights split the pull over two
    # snapshot folders (and a misleading "no config.json" error).
    torch.manual_seed(1)
    later = wrap_model(timm.create_model("test_resnet", num_classes=3), KEY).eval()
    push_protected(model, "org/moving", token=test_hub.token, endpoint=test_hub.url)
    push_protected(later, "org/moving", revision="next", token=test_hub.token, endpoint=test_hub.url)
    _fault(test_hub, repo="org/moving", path="protection.json", mode="move_main", to="next")
    pulled = _pull(test_hub, "org/moving", KEY, isolate_hub_client)
    assert not (test_hub.root / "fault.json").exists()  # main moved after protection.json was served
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))


def test_a_server_error_is_not_reported_as_an_unreachable_hub(test_hub, pushed, isolate_hub_client, monkeypatch):
    import huggingface_hub.utils._http as hub_http

    from kp_plugin.hub import HubError

    # huggingface_hub retries a 500 five times, waiting 1+2+4+8+8 s: the
    # same retries here, without the 23 s of waiting.
    waits = []
    monkeypatch.setattr(hub_http.time, "sleep", waits.append)
    try:
        _fault(test_hub, repo=pushed, path="protection.json", mode="error500")
        with pytest.raises(HubError, match="HTTP 500") as raised:
            _pull(test_hub, pushed, KEY, isolate_hub_client)
        assert not isinstance(raised.value, HubUnreachableError)
        assert "try again later" in str(raised.value)
        assert waits  # the client's retries ran (the error is what they end with)
        # The same from the first request of a pull (the repository's info),
        # which said only "answered HTTP 500".
        _fault(test_hub, repo=pushed, path="api", mode="error500")
        with pytest.raises(HubError, match="HTTP 500.*try again later") as raised:
            _pull(test_hub, pushed, KEY, isolate_hub_client.parent / "fresh-cache")
        assert not isinstance(raised.value, HubUnreachableError)
    finally:
        (test_hub.root / "fault.json").unlink(missing_ok=True)


def test_a_down_endpoint_with_a_partial_cache_does_not_blame_hf_hub_offline(test_hub, pushed, isolate_hub_client):
    # A wrong-key pull caches protection.json only; with the endpoint down
    # the message said the endpoint "is not used (HF_HUB_OFFLINE)".
    with pytest.raises(KeyMismatchError):
        _pull(test_hub, pushed, SecretKey.generate_like(KEY), isolate_hub_client)
    with pytest.raises(HubUnreachableError, match="cannot (be )?reach") as raised:
        pull_protected(pushed, KEY, endpoint=CLOSED_ENDPOINT, cache_dir=isolate_hub_client)
    assert "HF_HUB_OFFLINE)" not in str(raised.value)


def test_weights_or_protection_json_changed_in_the_repository_without_the_key_are_refused(test_hub, model, tmp_path,
                                                                                         isolate_hub_client):
    # Both loaded before: other weights stored as float16 (the digest check
    # gave up when the file's dtypes were not the model's), and other weights
    # with protection.json's mac deleted and their digest written in.
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from kp_plugin.checkpoint import weights_digest

    api = HfApi(endpoint=test_hub.url, token=test_hub.token)
    push_protected(model, "org/swapped", token=test_hub.token, endpoint=test_hub.url)
    torch.manual_seed(1)
    other = timm.create_model("test_resnet", num_classes=3)
    half = tmp_path / "half.safetensors"
    save_file({n: (t.half() if t.is_floating_point() else t).contiguous() for n, t in other.state_dict().items()},
              str(half), metadata={"format": "pt"})
    api.upload_file(path_or_fileobj=str(half), path_in_repo="model.safetensors", repo_id="org/swapped")
    with pytest.raises(CheckpointError, match="not the ones protection.json beside it was saved with"):
        _pull(test_hub, "org/swapped", KEY, isolate_hub_client)

    save_file({n: t.contiguous() for n, t in other.state_dict().items()}, str(tmp_path / "other.safetensors"),
              metadata={"format": "pt"})
    protection = json.loads(ProtectionConfig.from_model(wrap_model(other, KEY)).to_json())
    protection["weights_digest"] = weights_digest(other)
    assert "mac" not in protection or protection.pop("mac") is None
    api.upload_file(path_or_fileobj=str(tmp_path / "other.safetensors"), path_in_repo="model.safetensors",
                    repo_id="org/swapped")
    api.upload_file(path_or_fileobj=json.dumps(protection).encode(), path_in_repo="protection.json",
                    repo_id="org/swapped")
    with pytest.raises(CheckpointError, match="has no mac"):
        _pull(test_hub, "org/swapped", KEY, isolate_hub_client.parent / "fresh-cache")


def test_an_unsigned_checkpoint_folder_is_not_pushed(test_hub, model, tmp_path, isolate_hub_client):
    folder = save_protected(model, tmp_path / "out")
    data = json.loads((folder / "protection.json").read_text())
    del data["mac"]
    (folder / "protection.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="has no mac.*save_protected"):
        push_protected(folder, "org/unsigned", key=KEY, token=test_hub.token, endpoint=test_hub.url)
    from huggingface_hub import HfApi

    assert not HfApi(endpoint=test_hub.url, token=test_hub.token).repo_exists("org/unsigned")


def test_a_folder_push_sends_the_checkpoint_it_checked_while_a_save_replaces_it(test_hub, model, tmp_path,
                                                                                isolate_hub_client, monkeypatch):
    # The files were checked (key, weights header, leak scan) at the start and
    # read again by path while uploading: a save in between (a training run
    # saving its epochs) published what was not checked, or weights and
    # protection.json of two saves, which then failed to load.
    import kp_plugin.hub as hub

    folder = tmp_path / "ck"
    save_protected(model, folder)
    torch.manual_seed(1)
    later = wrap_model(timm.create_model("test_resnet", num_classes=3), KEY).eval()
    prepare = hub._prepare_repo

    def save_in_between(*args, **kwargs):
        save_protected(later, folder)  # after the checks, before the upload
        return prepare(*args, **kwargs)

    monkeypatch.setattr(hub, "_prepare_repo", save_in_between)
    push_protected(folder, "org/snapshot", key=KEY, token=test_hub.token, endpoint=test_hub.url)
    pulled = _pull(test_hub, "org/snapshot", KEY, isolate_hub_client)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(pulled(images), model(images))


def test_a_save_into_a_folder_another_save_holds_waits_and_then_checks_the_key(model, tmp_path):
    # Two saves at once both said they saved: the folder held one of them
    # (another key's model replaced without overwrite=True), or a mix.
    import shutil
    import threading

    from kp_plugin.checkpoint import folder_lock

    theirs, folder = tmp_path / "theirs", tmp_path / "ck"
    save_protected(model, theirs)
    folder.mkdir()
    other = wrap_model(timm.create_model("test_resnet", num_classes=3), SecretKey.generate_like(KEY))
    outcome = []

    def save_other():
        try:
            save_protected(other, folder)
            outcome.append("saved")
        except CheckpointError as exc:
            outcome.append(str(exc))

    with folder_lock(folder):  # as a save of KEY's model holds it
        saver = threading.Thread(target=save_other)
        saver.start()
        saver.join(timeout=2)
        assert saver.is_alive() and outcome == []  # waiting for the lock
        for path in theirs.iterdir():  # the first save's files land
            shutil.copy2(path, folder / path.name)
    saver.join(timeout=60)
    assert len(outcome) == 1 and "another key" in outcome[0]
    assert ProtectionConfig.load(folder).fingerprint == KEY.fingerprint


def test_the_push_scan_passes_over_a_file_removed_since_the_listing(tmp_path):
    # Another writer's temporary file, gone between the listing and its scan,
    # ended a push with a bare FileNotFoundError.
    from kp_plugin._hub_scan import _refuse_key_material

    (tmp_path / "kept.json").write_text("{}")
    _refuse_key_material({"kept.json": tmp_path / "kept.json", ".x.tmp": tmp_path / ".x.tmp"}, KEY)
    (tmp_path / "leak.txt").write_bytes(MATERIAL)
    with pytest.raises(KeyLeakError):
        _refuse_key_material({"leak.txt": tmp_path / "leak.txt", ".x.tmp": tmp_path / ".x.tmp"}, KEY)


def test_downloads_that_time_out_after_the_repository_answered_say_so(test_hub, pushed, isolate_hub_client,
                                                                       monkeypatch):
    # A proxy that let the repository's information through and stalled the
    # files: after huggingface_hub's retries the error gave offline advice
    # ("pull it once online ... then offline works").
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def stalled(*args, **kwargs):  # what hf_hub_download raises once its retries time out, the file not cached
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", stalled)
    with pytest.raises(HubUnreachableError, match="information came through: check the network or proxy") as caught:
        _pull(test_hub, pushed, KEY, isolate_hub_client)
    assert "offline" not in str(caught.value)
