"""Protection evaluation: accuracy with the key, with wrong keys, on plain
images, and the report files."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from kp_plugin import ConfigurationError, SecretKey, invert_transform, wrap_model
from kp_plugin.checkpoint import find_key_material
from kp_plugin.evaluate import (
    EXAMPLES_FILE,
    HISTOGRAM_FILE,
    ProtectionReport,
    evaluate_protection,
    report_markdown,
    write_report,
    wrong_key_accuracies,
    wrong_keys,
)
from kp_plugin.timm import create_protected_model

INTERFACE_KEYS = {
    "key_accuracy", "wrong_key_accuracy_mean", "wrong_key_accuracy_std", "wrong_key_accuracy_max",
    "num_wrong_keys", "plain_accuracy", "chance", "num_classes", "dataset", "scheme", "block_size",
    "fingerprint",
}

pytestmark = pytest.mark.usefixtures("one_thread")



class ListDataset(torch.utils.data.Dataset):
    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def fixed_key(name: str, **kw) -> SecretKey:
    return SecretKey(hashlib.sha256(name.encode()).digest(), **kw)


@pytest.fixture(scope="module")
def random_set():
    g = torch.Generator().manual_seed(0)
    return ListDataset(torch.rand(24, 3, 16, 16, generator=g), torch.randint(0, 5, (24,), generator=g),
                       [f"c{i}" for i in range(5)])


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return create_protected_model("test_efficientnet", fixed_key("owner", block_size=4), num_classes=5,
                                  input_size=16).eval()


def accuracy(model, dataset) -> float:
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
        return float((model(x).argmax(-1) == y).float().mean())


class KeyDecoder(nn.Module):
    """Classifies the brightness of channel 0 after undoing normalization
    and the owner's transform: perfect with the owner's key, lost without."""

    def __init__(self, key, mean, std, levels):
        super().__init__()
        self.key, self.levels = key, levels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, z):
        x = invert_transform((z * self.std + self.mean).clamp(0, 1), self.key)
        level = (x[:, 0].mean(dim=(1, 2)) * (self.levels - 1)).round().long().clamp(0, self.levels - 1)
        return nn.functional.one_hot(level, self.levels).float()


def test_wrong_keys_are_reproducible_from_the_seed_and_never_the_owner_key():
    owner = SecretKey.generate(block_size=4, scheme="shuffle+np")
    first, again, other = wrong_keys(owner, 5, seed=3), wrong_keys(owner, 5, seed=3), wrong_keys(owner, 5, seed=4)
    assert [k.fingerprint for k in first] == [k.fingerprint for k in again]
    assert {k.fingerprint for k in first}.isdisjoint(k.fingerprint for k in other)
    assert len({k.fingerprint for k in first} | {owner.fingerprint}) == 6
    assert all(k.block_size == 4 and k.scheme == owner.scheme and k.channels == 3 for k in first)


def test_wrong_key_accuracies_match_the_model_rekeyed_with_each_wrong_key(tiny_model, random_set):
    accs = wrong_key_accuracies(tiny_model, random_set, num_keys=4, seed=1, batch_size=10, progress=False)
    expected = [accuracy(wrap_model(tiny_model.unwrap(), k, input_size=(3, 16, 16)).eval(), random_set)
                for k in wrong_keys(tiny_model.key, 4, seed=1)]
    assert accs == pytest.approx(expected)


def test_plain_accuracy_is_the_base_model_on_normalized_plain_images(tiny_model, random_set):
    report = evaluate_protection(tiny_model, random_set, num_wrong_keys=0, progress=False, num_examples=0)
    mean = torch.tensor(tiny_model.keyed.mean).view(1, 3, 1, 1)
    std = torch.tensor(tiny_model.keyed.std).view(1, 3, 1, 1)
    plain = nn.Sequential(nn.Identity())
    plain.forward = lambda x: tiny_model.unwrap()((x - mean) / std)
    assert report.plain_accuracy == pytest.approx(accuracy(plain, random_set))
    assert report.key_accuracy == pytest.approx(accuracy(tiny_model, random_set))


def test_a_model_that_needs_the_key_scores_full_marks_only_with_it():
    owner = fixed_key("decoder-owner", block_size=4, scheme="shuffle+np")
    levels = 4
    labels = torch.arange(32) % levels
    images = torch.zeros(32, 3, 16, 16)
    images[:, 0] = (labels.float() / (levels - 1)).view(-1, 1, 1)
    dataset = ListDataset(images, labels, [str(i) for i in range(levels)])
    model = wrap_model(KeyDecoder(owner, (0.5,) * 3, (0.5,) * 3, levels), owner, mean=0.5, std=0.5)
    report = evaluate_protection(model, dataset, num_wrong_keys=8, progress=False)
    assert report.key_accuracy == 1.0
    assert report.wrong_key_accuracy_max < 1.0
    assert report.plain_accuracy < 1.0
    assert report.chance == 0.25 and report.num_examples == 32 and report.num_wrong_keys == 8


def test_evaluation_leaves_a_training_model_in_training_mode(tiny_model, random_set):
    tiny_model.train()
    try:
        wrong_key_accuracies(tiny_model, random_set, num_keys=1, progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()


@pytest.mark.parametrize("count", [-1, 1e6, 2.5, True, "3", 100_001])
def test_a_number_of_wrong_keys_that_is_not_a_count_is_a_configuration_error(tiny_model, random_set, count):
    # 1e6 (a float) started a pass that grew past 1.6 GB; 2.5 ran 3 keys; "3" was a bare TypeError.
    with pytest.raises(ConfigurationError, match="num_wrong_keys"):
        evaluate_protection(tiny_model, random_set, num_wrong_keys=count, progress=False)


def test_labels_the_model_has_no_output_for_and_pil_images_are_configuration_errors(tiny_model, random_set):
    # Labels 10..17 on a 5-output model scored 0% with no error; a
    # torchvision-style dataset of PIL images was torch's bare collate TypeError.
    from PIL import Image

    shifted = ListDataset(random_set.images, random_set.labels + 10, random_set.classes)
    with pytest.raises(ConfigurationError, match="labels run from 10 to 14 but the model has 5 outputs"):
        evaluate_protection(tiny_model, shifted, num_wrong_keys=1, progress=False)
    pil = ListDataset([Image.new("RGB", (16, 16))] * 4, torch.zeros(4, dtype=torch.int64), random_set.classes)
    with pytest.raises(ConfigurationError, match="transform to tensors"):
        evaluate_protection(tiny_model, pil, num_wrong_keys=1, progress=False)
    with pytest.raises(ConfigurationError, match="unprotected_accuracy"):
        evaluate_protection(tiny_model, random_set, num_wrong_keys=1, progress=False, unprotected_accuracy=5.0)


def test_report_json_has_the_agreed_keys_and_reads_back(tmp_path, tiny_model, random_set):
    report = evaluate_protection(tiny_model, random_set, num_wrong_keys=3, progress=False,
                                 dataset_name="random", unprotected_accuracy=0.5)
    write_report(report, tmp_path / "report")
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert INTERFACE_KEYS | {"unprotected_accuracy"} <= set(data)
    assert data["num_wrong_keys"] == 3 and data["dataset"] == "random" and data["chance"] == 0.2
    assert data["wrong_key_accuracy_max"] == max(data["wrong_key_accuracies"])
    assert data["fingerprint"] == tiny_model.key.fingerprint and data["scheme"] == tiny_model.key.scheme_name
    assert ProtectionReport.load(tmp_path / "report").to_dict() == data


def test_a_report_without_wrong_keys_is_strict_json(tmp_path, tiny_model, random_set):
    # kp evaluate --wrong-keys 0 wrote NaN, which strict JSON parsers reject.
    report = evaluate_protection(tiny_model, random_set, num_wrong_keys=0, progress=False, num_examples=0)
    write_report(report, tmp_path / "report")
    text = (tmp_path / "report" / "report.json").read_text()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in report.json"))
    assert data["wrong_key_accuracy_mean"] is None and data["wrong_key_accuracy_max"] is None
    assert data["num_wrong_keys"] == 0 and "n/a" in (tmp_path / "report" / "report.md").read_text()


def test_report_writes_png_figures_and_markdown_without_key_material(tmp_path, tiny_model, random_set):
    report = evaluate_protection(tiny_model, random_set, num_wrong_keys=3, progress=False)
    write_report(report, tmp_path / "report")
    for path in (tmp_path / "report" / HISTOGRAM_FILE, tmp_path / "private" / EXAMPLES_FILE):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"{100 * report.key_accuracy:.1f}%" in text and HISTOGRAM_FILE in text
    assert find_key_material(tmp_path, tiny_model.key) == []


def test_a_report_that_fails_halfway_leaves_the_previous_report_whole(tmp_path, tiny_model, random_set, monkeypatch,
                                                                     full_disk_at):
    # A failed write of report.md (a full disk) left the new report.json and
    # wrong_keys.png beside the old report.md: two runs' figures in one report.
    first = evaluate_protection(tiny_model, random_set, num_wrong_keys=3, progress=False)
    write_report(first, tmp_path / "report")
    before = {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()}
    second = evaluate_protection(tiny_model, random_set, num_wrong_keys=4, seed=1, progress=False)
    full_disk_at("report.md")
    with pytest.raises(OSError):
        write_report(second, tmp_path / "report")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "report").iterdir()} == before
    write_report(second, tmp_path / "report")
    assert '"num_wrong_keys": 4' in (tmp_path / "report" / "report.json").read_text()


def test_example_grid_stays_out_of_the_publishable_report(tmp_path, tiny_model, random_set):
    report = evaluate_protection(tiny_model, random_set, num_wrong_keys=1, progress=False)
    write_report(report, tmp_path / "report", private_directory=tmp_path / "owner-only")
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["report.json", "report.md", HISTOGRAM_FILE]
    assert (tmp_path / "owner-only" / EXAMPLES_FILE).is_file()
    assert "owner-only/examples.png" in (tmp_path / "report" / "report.md").read_text()


def test_evaluation_leaves_the_model_untouched(tiny_model, random_set):
    before = {name: p.is_contiguous() for name, p in tiny_model.named_parameters()}
    ids = {name: id(p) for name, p in tiny_model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in tiny_model.named_parameters()}
    evaluate_protection(tiny_model, random_set, num_wrong_keys=1, progress=False, num_examples=0)
    assert {name: p.is_contiguous() for name, p in tiny_model.named_parameters()} == before
    assert all(torch.equal(p, weights[name]) for name, p in tiny_model.named_parameters())
    assert {name: id(p) for name, p in tiny_model.named_parameters()} == ids


def test_a_data_parallel_model_is_evaluated_as_its_protected_model(tiny_model, random_set):
    # The guide says the evaluation takes a DataParallel / DDP around the
    # ProtectedModel; it raised AttributeError: no attribute 'key'.
    direct = evaluate_protection(tiny_model, random_set, num_wrong_keys=3, progress=False)
    wrapped = evaluate_protection(nn.DataParallel(tiny_model), random_set, num_wrong_keys=3, progress=False)
    tiny_model.cpu()  # with one GPU, DataParallel moved it there
    assert wrapped.to_dict()["wrong_key_accuracies"] == direct.to_dict()["wrong_key_accuracies"]
    assert wrong_key_accuracies(nn.DataParallel(tiny_model), random_set, num_keys=3, progress=False) == \
        direct.wrong_key_accuracies
    tiny_model.cpu()


def test_one_wrong_key_has_no_standard_deviation(tiny_model, random_set):
    # It was reported as 0.0, a spread of zero measured over one value.
    report = evaluate_protection(tiny_model, random_set, num_wrong_keys=1, progress=False)
    assert report.to_dict()["wrong_key_accuracy_std"] is None
    assert "(std n/a)" in report_markdown(report)
