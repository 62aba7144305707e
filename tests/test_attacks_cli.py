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
    # The base the attacks started from is said: the verdicts read differently against a random one.
    assert "(random)" in (out / "report.md").read_text()


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


def _attack(checkpoint, *extra):
    directory, key_file, _ = checkpoint
    return main(["attack", str(directory), "--key", str(key_file), "--data", "digits", "--image-size", "16",
                 "--budget", "smoke", "--quiet", *map(str, extra)])


@pytest.fixture
def no_attack_runs(monkeypatch):
    """Fails the test if an attack starts: the checks under test come first."""
    import kp_plugin.attacks.suite as suite

    def refuse(*args, **kwargs):
        raise AssertionError("an attack ran before the check")

    monkeypatch.setattr(suite, "run_attacks", refuse)


def test_kp_attack_keeps_key_files_already_in_the_output_folder(checkpoint, tmp_path, capsys):
    # Every key file under -o (searched recursively, the owner's and others')
    # was deleted after the run, which then failed with a KeyLeakError.
    _, key_file, key = checkpoint
    out = tmp_path / "report"
    (out / "keys").mkdir(parents=True)
    own = out / "keys" / "owner.key"
    own.write_bytes(key_file.read_bytes())
    other = out / "other-model.key"
    SecretKey.generate_like(key).save(other)
    before = {own: own.read_bytes(), other: other.read_bytes()}
    code = _attack(checkpoint, "--attacks", "wrong_keys", "-o", out)
    err = capsys.readouterr().err
    assert code == 0, err
    assert {path: path.read_bytes() for path in before} == before
    assert f"the key file {own} lies inside {out}" in err
    assert (out / "report.json").is_file()


def test_kp_attack_removes_only_the_report_file_that_holds_key_material(checkpoint, tmp_path, monkeypatch, capsys):
    import kp_plugin.attacks.report as report_module

    _, key_file, key = checkpoint
    out = tmp_path / "report"
    out.mkdir()
    other = out / "other-model.key"
    SecretKey.generate_like(key).save(other)
    markdown = report_module.report_markdown
    monkeypatch.setattr(report_module, "report_markdown",
                        lambda *args, **kwargs: markdown(*args, **kwargs) + key_file.read_text())
    code = _attack(checkpoint, "--attacks", "wrong_keys", "-o", out)
    assert code == 1
    assert "report.md" in capsys.readouterr().err
    assert not (out / "report.md").exists()
    assert (out / "report.json").is_file() and other.is_file()


def test_report_rewritten_into_a_folder_drops_the_plots_the_earlier_report_had(tmp_path):
    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
    protected = protected_patchnet(key)
    first = run_attacks(protected, digits("test"), attacks="random_search,partial_key", budget="smoke",
                        progress=False)
    write_attack_report(first, tmp_path)
    assert (tmp_path / FIGURES["random_search"]).is_file() and (tmp_path / FIGURES["partial_key"]).is_file()
    (tmp_path / "mine.png").write_bytes((tmp_path / FIGURES["partial_key"]).read_bytes())
    (tmp_path / FIGURES["recovery"]).write_text("notes that merely share a plot's name\n")
    second = run_attacks(protected, digits("test"), attacks="wrong_keys", budget="smoke", progress=False)
    write_attack_report(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["report.json", "report.md", "mine.png", FIGURES["recovery"]])


def test_kp_attack_builds_the_public_base_before_any_attack(checkpoint, monkeypatch, no_attack_runs, capsys):
    # Offline, the pre-trained base was fetched when weight_matching started,
    # after the other attacks had run (their results lost), and the message
    # told the user to pass kp protect --no-pretrained.
    import kp_plugin.timm as kp_timm

    def offline(name, **kwargs):
        raise kp_timm.PretrainedWeightsError(f"cannot fetch pre-trained weights for {name!r} (kp protect "
                                             "--no-pretrained)")

    monkeypatch.setattr(kp_timm, "create_base_model", offline)
    code = _attack(checkpoint, "--attacks", "wrong_keys,weight_matching", "-o", checkpoint[0].parent / "offline")
    err = capsys.readouterr().err
    assert code == 1
    assert "--base-weights random" in err and "--base none" in err
    assert "kp protect" not in err


def test_kp_attack_refuses_an_output_file_before_any_attack(checkpoint, tmp_path, no_attack_runs, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("precious\n")
    code = _attack(checkpoint, "--attacks", "wrong_keys", "-o", existing)
    assert code == 2
    assert f"-o {existing} is a file; the command writes a folder there" in capsys.readouterr().err
    assert existing.read_text() == "precious\n"


def test_kp_attack_names_a_missing_dependency_before_any_attack(checkpoint, monkeypatch, no_attack_runs, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "scipy", None)  # what an environment without scipy imports
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    code = _attack(checkpoint, "--attacks", "wrong_keys,weight_matching", "--base-weights", "random",
                   "-o", checkpoint[0].parent / "noscipy")
    err = capsys.readouterr().err
    assert code == 1
    assert "scipy" in err and 'pip install "kp-plugin[demo]"' in err
    assert "Traceback" not in err


def test_kp_attack_with_the_same_seed_gives_the_same_random_base(checkpoint, tmp_path, capsys):
    # kp attack never seeded torch: --base-weights random drew another base
    # from the global generator each run, so weight matching's figures moved.
    runs = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)  # whatever the caller's generator holds
        out = tmp_path / f"run{global_seed}"
        assert _attack(checkpoint, "--attacks", "weight_matching", "--base-weights", "random", "--seed", "3",
                       "-o", out) == 0, capsys.readouterr().err
        runs.append(json.loads((out / "report.json").read_text())["attacks"]["weight_matching"])
    assert runs[0] == runs[1]


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**63), "-5"])
def test_kp_attack_refuses_a_seed_outside_0_to_2_63_as_a_usage_error(checkpoint, seed, capsys):
    assert _attack(checkpoint, "--attacks", "wrong_keys", "--seed", seed) == 2
    assert "--seed: expected a seed from 0 to 2**63 - 1" in capsys.readouterr().err


def _near_chance_report(*, wrong_mean: float):
    from kp_plugin.attacks import AttackReport, RandomSearchResult, WrongKeyResult

    wrong = WrongKeyResult(key_accuracy=0.12, plain_accuracy=0.10, plain_least_likely_accuracy=0.10,
                           accuracies=[wrong_mean] * 4, least_likely=[0.11] * 4, chance=0.10, num_classes=10,
                           num_images=300)
    search = RandomSearchResult(num_keys=32, search_images=32, holdout_images=268, best_search_accuracy=0.19,
                                best_holdout_accuracy=0.13, best_index=0, key_accuracy=0.11, chance=0.10, seed=0,
                                seconds=1.0, search_accuracies=[0.10] * 32)
    return AttackReport(meta={"scheme": "shuffle+np"}, results={"wrong_keys": wrong, "random_search": search})


def test_no_target_is_met_when_the_key_itself_scores_near_chance():
    # At an image size the model was not trained at, the key scored near
    # chance and every target was reported met.
    from kp_plugin.attacks.report import report_markdown

    report = _near_chance_report(wrong_mean=0.10)
    targets = report.targets()
    assert [t.met for t in targets] == [None, None, None]
    assert all("the key itself scores 12.0%, near chance (10.0%)" in t.no_verdict for t in targets)
    assert [t["met"] for t in report.summary()["targets"]] == [None, None, None]
    text = report_markdown(report)
    assert "| yes |" not in text and "| n/a |" in text
    assert "Not applicable (n/a): the key itself scores 12.0%, near chance (10.0%)" in text


def test_a_missed_target_stays_missed_when_the_key_scores_near_chance():
    report = _near_chance_report(wrong_mean=0.25)
    assert [t.met for t in report.targets()] == [False, None, None]


def test_kp_attack_and_kp_evaluate_do_not_replace_each_others_report(checkpoint, tmp_path, capsys):
    # Both write report.json / report.md: kp attack -o CK/report replaced kp
    # evaluate's (exit 0; the Hub card then read "n/a" with the key).
    directory, key_file, _ = checkpoint
    out = tmp_path / "shared"
    assert main(["evaluate", str(directory), "--key", str(key_file), "--data", "digits", "--image-size", "16",
                 "--wrong-keys", "1", "--quiet", "-o", str(out)]) == 0
    before = (out / "report.json").read_bytes()
    assert main(["attack", str(directory), "--key", str(key_file), "--data", "digits", "--image-size", "16",
                 "--attacks", "wrong_keys", "--budget", "smoke", "--quiet", "-o", str(out)]) == 2
    assert "holds kp evaluate's report" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    other = tmp_path / "attack"
    assert main(["attack", str(directory), "--key", str(key_file), "--data", "digits", "--image-size", "16",
                 "--attacks", "wrong_keys", "--budget", "smoke", "--quiet", "-o", str(other)]) == 0
    assert main(["evaluate", str(directory), "--key", str(key_file), "--data", "digits", "--image-size", "16",
                 "--wrong-keys", "1", "--quiet", "-o", str(other)]) == 2
    assert "holds kp attack's report" in capsys.readouterr().err


def test_an_attack_report_that_fails_halfway_leaves_the_previous_report_whole(tmp_path, monkeypatch, full_disk_at):
    # The plots and report.json were renamed in one by one: a failed write of
    # report.md (a full disk) left the new report.json and plots beside the
    # old report.md, two runs in one report.
    key = SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np")
    protected = protected_patchnet(key)
    first = run_attacks(protected, digits("test"), attacks="partial_key", budget="smoke", progress=False)
    write_attack_report(first, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    second = run_attacks(protected, digits("test"), attacks="wrong_keys,random_search", budget="smoke",
                         progress=False)
    full_disk_at("report.md")
    with pytest.raises(OSError):
        write_attack_report(second, tmp_path)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    write_attack_report(second, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["random_search.png", "report.json", "report.md"]
