"""`kp attack` end to end on a tiny timm checkpoint, and the report files."""

from __future__ import annotations

import json

import pytest
import torch

from attack_models import digits, protected_patchnet
from kp_plugin import SecretKey, save_protected
from kp_plugin.attacks.report import FIGURES, write_attack_report
from kp_plugin.attacks.suite import BUDGETS, run_attacks
from kp_plugin.checkpoint import find_key_material
from kp_plugin.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from kp_plugin.timm import create_protected_model

    directory = tmp_path_factory.mktemp("protected")
    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
    key.save(directory.parent / "owner.key", overwrite=True)
    torch.manual_seed(0)
    model = create_protected_model("test_efficientnet", key, num_classes=10, input_size=16)
    save_protected(model, directory)
    return directory, directory.parent / "owner.key", key


def test_kp_attack_writes_report_and_plots_without_the_key(checkpoint, capsys):
    # Every attack runs in test_attacks.py; here the ones that feed each plot.
    directory, key_file, key = checkpoint
    out = directory.parent / "attack-report"
    code = main(["attack", str(directory), "--key", str(key_file), "--data", "digits", "--image-size", "16",
                 "--attacks", "random_search,partial_key,weight_matching,finetune", "--budget", "smoke",
                 "--base-weights", "random", "-o", str(out), "--quiet"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["attacks"]) == {"random_search", "partial_key", "weight_matching", "finetune"}
    assert report["meta"]["fingerprint"] == key.fingerprint
    assert len(report["targets"]) == 3
    for figure in FIGURES.values():
        assert (out / figure).stat().st_size > 0
    assert find_key_material(out, key) == []
    assert "weight matching: key positions recovered" in capsys.readouterr().out


def test_kp_attack_rejects_an_unknown_attack_as_a_usage_error(checkpoint):
    directory, key_file, _ = checkpoint
    assert main(["attack", str(directory), "--key", str(key_file), "--attacks", "bribery"]) == 2


def test_kp_attack_with_another_key_is_a_key_mismatch(checkpoint, tmp_path):
    directory, _, key = checkpoint
    other = SecretKey.generate_like(key)
    other.save(tmp_path / "other.key")
    assert main(["attack", str(directory), "--key", str(tmp_path / "other.key"), "--data", "digits",
                 "--attacks", "wrong_keys", "--quiet"]) == 3


def test_report_marks_a_missed_target_with_its_margin(tmp_path):
    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
    protected = protected_patchnet(key)
    # A random search on this small model finds good keys: the report must say so.
    report = run_attacks(protected, digits("test"), attacks="wrong_keys,random_search",
                         budget=BUDGETS["smoke"], progress=False)
    write_attack_report(report, tmp_path, figures=False)
    text = (tmp_path / "report.md").read_text()
    targets = {t.name: t for t in report.targets()}
    assert any(name.startswith("best of 32 random keys") for name in targets)
    for t in targets.values():
        assert ("yes" if t.met else f"**no** (by {-t.margin:.1f})") in text


def test_positions_recovered_is_no_target_for_a_scheme_without_shuffling():
    # Without pixel shuffling the permutation is the identity for the key and
    # any guess: weight matching "recovered 100%" and the report said the
    # target was missed by 90 points, while its accuracy stayed at chance.
    from types import SimpleNamespace

    from kp_plugin.attacks.suite import AttackReport

    matched = {"weight_matching": SimpleNamespace(recovered_fraction=1.0)}
    names = {scheme: [t.name for t in AttackReport(meta={"scheme": scheme}, results=matched).targets()]
             for scheme in ("np+shift", "shuffle+np")}
    assert names == {"np+shift": [], "shuffle+np": ["weight matching: key positions recovered"]}
