"""Fine-tuning: augmentation before the key, checkpoints without the key,
resume, rekeying, accuracy."""

import os

import pytest
import timm
import torch

from kp_plugin import SecretKey, load_protected, save_protected, wrap_model
from kp_plugin.checkpoint import PROTECTION_FILE, WEIGHTS_FILE, find_key_material
from kp_plugin.data import TensorImageDataset
from kp_plugin.errors import CheckpointError, ConfigurationError, KeyMismatchError
from kp_plugin.objectives import ProtectionObjective
from kp_plugin.train import (
    TRAINING_STATE_FILE,
    TrainConfig,
    augment_images,
    evaluate_accuracy,
    first_conv,
    fit,
    mix_images,
    mixed_targets,
    plain_model,
    rekey,
)


pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


def _separable_dataset(n=32, seed=0):
    """Two classes a model learns in a few steps: bright vs dark images."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.rand(n, 3, SIZE, SIZE, generator=g) * 0.3 + labels.view(-1, 1, 1, 1) * 0.6
    return TensorImageDataset(images, labels, classes=["dark", "bright"], name="toy")


def _model(key, seed=0):
    torch.manual_seed(seed)
    return wrap_model(timm.create_model("test_efficientnet", num_classes=2), key)


@pytest.fixture(scope="module")
def key():
    # fixed material: the tests must not depend on a lucky key
    return SecretKey(bytes(range(32)), block_size=4, scheme="shuffle+np", channels=3)


def test_fit_learns_and_records_history(key):
    model = _model(key)
    data = _separable_dataset()
    config = TrainConfig(epochs=6, batch_size=8, lr=1e-2, objective=ProtectionObjective())
    result = fit(model, data, config=config, eval_set=data, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "accuracy", "ce", "eval_accuracy", "lr"} <= set(result.final)
    assert evaluate_accuracy(model, data) >= 0.9


def test_checkpoints_hold_no_key_and_resume_continues(tmp_path, key):
    data = _separable_dataset()
    config = TrainConfig(epochs=2, batch_size=32, objective=ProtectionObjective(wrong_key_weight=0.5))
    interrupted = _model(key)
    fit(interrupted, data, config=TrainConfig(**{**config.__dict__, "epochs": 1}), checkpoint_dir=tmp_path, progress=False)
    for name in (WEIGHTS_FILE, PROTECTION_FILE, TRAINING_STATE_FILE):
        assert (tmp_path / name).is_file()
    assert find_key_material(tmp_path, key) == []

    resumed = _model(key, seed=1)
    result = fit(resumed, data, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=True)["epoch"] == 2
    assert find_key_material(tmp_path, key) == []


def test_a_model_holding_the_key_leaves_no_checkpoint_or_state(tmp_path, key):
    # Both the weights and the training state (which holds the weights too)
    # are refused before they reach the folder.
    from kp_plugin import KeyLeakError

    model = _model(key)
    model.unwrap().register_buffer("stored_key", torch.tensor(list(key._material), dtype=torch.uint8))
    with pytest.raises(KeyLeakError):
        fit(model, _separable_dataset(16), config=TrainConfig(epochs=1, batch_size=8), checkpoint_dir=tmp_path,
            progress=False)
    assert find_key_material(tmp_path, key) == []
    assert not (tmp_path / TRAINING_STATE_FILE).exists() and not (tmp_path / WEIGHTS_FILE).exists()


def test_resume_with_another_key_is_refused(tmp_path, key):
    data = _separable_dataset(16)
    fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(KeyMismatchError, match="resume with the key file it was trained with") as caught:
        fit(_model(SecretKey.generate_like(key)), data, config=TrainConfig(epochs=2, batch_size=16),
            checkpoint_dir=tmp_path, resume=True, progress=False)
    assert "allow_wrong_key" not in str(caught.value)  # a loader's advice; fit takes no such argument


_RAN = []


def _record_that_it_ran():
    _RAN.append(True)
    return {}


class _CodeInPickle:
    def __reduce__(self):
        return _record_that_it_ran, ()


def test_resume_runs_no_code_from_a_tampered_training_state(tmp_path, key):
    data = _separable_dataset(16)
    fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    torch.save({"epoch": 1, "optimizer": _CodeInPickle()}, tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match="training state"):
        fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path,
            resume=True, progress=False)
    assert _RAN == []


def test_a_checkpoint_that_cannot_be_resumed_leaves_the_model_where_and_as_it_was(tmp_path, key):
    # The weights were loaded into the model before the state was read; and
    # fit moved the model to its device and to channels-last before reading
    # the checkpoint, so a failed resume handed back a model in another layout
    # (and, on a GPU machine, on the GPU).
    data = _separable_dataset(16)
    fit(_model(key, seed=1), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path,
        progress=False)
    (tmp_path / TRAINING_STATE_FILE).write_bytes(b"not a torch file")
    resumed = TrainConfig(epochs=2, batch_size=16, channels_last=True)
    model = _model(key)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="corrupt"):
        fit(model, data, config=resumed, checkpoint_dir=tmp_path, resume=True, progress=False, device="cpu")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    mismatched = _model(SecretKey.generate_like(key))
    with pytest.raises(KeyMismatchError):
        fit(mismatched, data, config=resumed, checkpoint_dir=tmp_path, resume=True, progress=False, device="cpu")
    assert all(p.is_contiguous() for m in (model, mismatched) for p in m.parameters())

def test_an_empty_training_state_is_called_corrupt(tmp_path, key):
    # torch.load of an empty file raises EOFError with no message, and quoting
    # its first line raised IndexError instead of the CheckpointError.
    data = _separable_dataset(16)
    fit(_model(key, seed=1), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path,
        progress=False)
    (tmp_path / TRAINING_STATE_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="corrupt.*ends early.*start a new run"):
        fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, resume=True,
            progress=False)



@pytest.mark.parametrize(
    "state, problem",
    [([1, 2], "holds a list"), ({}, "no 'epoch'"), ({"epoch": 1}, "no 'optimizer'"), ("frozen", "parameter groups"),
     ("average", "weight average")],
    ids=["a list", "an empty dict", "no optimizer", "another set of trainable parameters", "a broken average"],
)
def test_a_training_state_that_does_not_fit_is_refused_before_the_weights_load(tmp_path, key, state, problem):
    # Such states raised TypeError / KeyError, and an optimizer state for other
    # trainable parameters raised the optimizer's ValueError after the
    # checkpoint's weights had replaced the model's.
    data = _separable_dataset(16)
    fit(_model(key, seed=1), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path,
        progress=False)
    model = _model(key)
    if state == "frozen":
        for param in model.unwrap().conv_stem.parameters():
            param.requires_grad_(False)
    elif state == "average":
        saved = torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=True)
        torch.save({**saved, "weight_average": {"updates": 3}}, tmp_path / TRAINING_STATE_FILE)
    else:
        torch.save(state, tmp_path / TRAINING_STATE_FILE)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=f"cannot resume.*{problem}.*start a new run"):
        fit(model, data, config=TrainConfig(epochs=2, batch_size=16, ema_decay=0.9), checkpoint_dir=tmp_path,
            resume=True, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_checkpoint_torn_between_weights_and_training_state_resumes_from_the_state(tmp_path, key):
    # A run stopped after writing an epoch's weights but before its training
    # state (a Ctrl-C at that moment, a kill) first resumed silently with
    # mismatched parts, then was refused ("later save"): every epoch was lost.
    # The state now holds its own weights and resumes whole from its epoch.
    data = _separable_dataset(16)
    first = _model(key, seed=1)
    fit(first, data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    after_epoch_1 = {k: v.clone() for k, v in first.unwrap().state_dict().items()}
    save_protected(_model(key, seed=2), tmp_path, metadata={"epoch": 2})  # the next epoch's weights, then the stop
    resumed = _model(key, seed=3)
    loaded = {}
    original = resumed.unwrap().load_state_dict

    def recording(state_dict, *args, **kwargs):
        loaded.update({k: v.clone() for k, v in state_dict.items()})
        return original(state_dict, *args, **kwargs)

    resumed.unwrap().load_state_dict = recording
    result = fit(resumed, data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, resume=True,
                 progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert loaded.keys() == after_epoch_1.keys() and all(torch.equal(loaded[k], v) for k, v in after_epoch_1.items())


def test_an_older_training_state_without_weights_is_checked_against_the_weights_beside_it(tmp_path, key):
    # States written before they held the weights: the weights beside them
    # must be their own (the digest), else the run is refused as before.
    data = _separable_dataset(16)
    fit(_model(key, seed=1), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path,
        progress=False)
    state = torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "weights"}, tmp_path / TRAINING_STATE_FILE)
    result = fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path,
                 resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]
    state = torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "weights"}, tmp_path / TRAINING_STATE_FILE)
    save_protected(_model(key, seed=2), tmp_path, metadata={"epoch": 3})
    with pytest.raises(CheckpointError, match="later save"):
        fit(_model(key), data, config=TrainConfig(epochs=3, batch_size=16), checkpoint_dir=tmp_path, resume=True,
            progress=False)


@pytest.mark.parametrize("content", [b"", b"garbage", b"truncated"])
def test_damaged_weights_beside_the_training_state(tmp_path, key, content):
    # A resume reads the state's own weights, and its next save rewrites the
    # damaged file. An older state (without weights) needs the file: a
    # damaged one is a CheckpointError naming it (safetensors' own
    # SafetensorError reached the caller, and kp printed a traceback).
    data = _separable_dataset(16)
    fit(_model(key, seed=1), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path,
        progress=False)
    weights = tmp_path / WEIGHTS_FILE
    state = torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=True)
    weights.write_bytes(weights.read_bytes()[:1000] if content == b"truncated" else content)
    fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, resume=True,
        progress=False)
    load_protected(tmp_path, _model(key).unwrap(), key)  # whole again
    torch.save({k: v for k, v in state.items() if k != "weights"}, tmp_path / TRAINING_STATE_FILE)
    weights.write_bytes(weights.read_bytes()[:1000] if content == b"truncated" else content)
    with pytest.raises(CheckpointError, match=WEIGHTS_FILE):
        fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, resume=True,
            progress=False)


def test_a_last_batch_of_one_image_is_skipped_not_a_batch_norm_crash(key):
    # 17 images in batches of 16: batch norm raised "Expected more than 1
    # value per channel when training" at the end of the epoch.
    result = fit(_model(key), _separable_dataset(17), config=TrainConfig(epochs=2, batch_size=16), progress=False)
    assert len(result.history) == 2


def test_uint8_training_images_are_augmented_as_unit_floats(key):
    # augmentation's grid_sample has no uint8 kernel: NotImplementedError.
    data = _separable_dataset(16)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    as_bytes = torch.utils.data.TensorDataset((images * 255).round().to(torch.uint8), labels)  # a plain torch dataset
    result = fit(_model(key), as_bytes, config=TrainConfig(epochs=1, batch_size=16), progress=False)
    assert len(result.history) == 1


@pytest.mark.parametrize("wrap", ["compile", "DataParallel"])
def test_a_wrapped_protected_model_is_refused_not_trained_without_protection(key, wrap, tmp_path):
    # Through a wrapper fit saw "not a ProtectedModel": it dropped the
    # wrong-key term and wrote a plain checkpoint, silently.
    model = _model(key)
    wrapped = torch.compile(model) if wrap == "compile" else torch.nn.DataParallel(model)
    with pytest.raises(ConfigurationError, match="the ProtectedModel itself"):
        fit(wrapped, _separable_dataset(16), config=TrainConfig(epochs=1), checkpoint_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("lr", float("inf")), ("epochs", 1.5),
                                          ("seed", None), ("batch_size", "64"), ("weight_decay", -0.1)])
def test_train_config_refuses_values_that_fail_later_or_train_to_nan(field, value):
    with pytest.raises(ConfigurationError, match=field):
        TrainConfig(**{field: value})


def test_resume_without_checkpoint_is_a_checkpoint_error(tmp_path, key):
    with pytest.raises(CheckpointError, match="missing"):
        fit(_model(key), _separable_dataset(16), config=TrainConfig(epochs=1), checkpoint_dir=tmp_path,
            resume=True, progress=False)


def test_rekey_shares_the_weights_and_changes_the_outputs(key):
    model = _model(key).eval()
    wrong = rekey(model, SecretKey.generate_like(key))
    assert wrong.unwrap() is model.unwrap() and wrong.key != model.key
    images = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert not torch.allclose(model(images), wrong(images))


def test_augmentation_moves_content_and_stays_in_unit_range():
    images = torch.zeros(4, 3, SIZE, SIZE)
    images[:, :, 6:10, 6:10] = 1
    out = augment_images(images, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert not torch.allclose(out, images)


def test_reinit_stem_moves_the_first_conv_away_from_the_public_weights(key):
    model = _model(key)
    public = first_conv(model).weight.detach().clone()
    fit(model, _separable_dataset(16), config=TrainConfig(epochs=1, batch_size=16, reinit_stem=True,
        objective=ProtectionObjective()), progress=False)
    tuned = first_conv(model).weight.detach().cpu()  # fit moved the model to CUDA where there is one
    corr = torch.corrcoef(torch.stack([public.flatten(), tuned.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.5


def test_baseline_trains_as_a_plain_model_on_unit_range_images():
    torch.manual_seed(0)
    baseline = plain_model(timm.create_model("test_efficientnet", num_classes=2))
    data = _separable_dataset()
    fit(baseline, data, config=TrainConfig(epochs=6, batch_size=8, lr=1e-2, objective=ProtectionObjective()), progress=False)
    assert evaluate_accuracy(baseline, data) >= 0.9


def test_distillation_pulls_the_protected_model_towards_the_teacher(key):
    """fit runs the teacher on the plain images of each step; the distilled
    student ends closer to the teacher's outputs than one trained without
    the term, everything else equal."""
    data = _separable_dataset(n=48)
    torch.manual_seed(1)
    teacher = plain_model(timm.create_model("test_efficientnet", num_classes=2), mean=(0.5,) * 3, std=(0.5,) * 3)
    fit(teacher, data, config=TrainConfig(epochs=4, batch_size=16, lr=5e-3, augment=False), device="cpu",
        progress=False)
    teacher.eval()
    with torch.no_grad():
        target = torch.softmax(teacher(data.images), dim=-1)

    def student(distill_weight):
        model = _model(key, seed=2)
        objective = ProtectionObjective(distill_weight=distill_weight, distill_temperature=1.0)
        config = TrainConfig(epochs=3, batch_size=16, lr=5e-3, augment=False, objective=objective)
        result = fit(model, data, config=config, device="cpu", progress=False,
                     teacher=teacher if distill_weight else None)
        with torch.no_grad():
            gap = (torch.softmax(model(data.images), dim=-1) - target).abs().sum(dim=-1).mean().item()
        return result, gap

    distilled, gap_distilled = student(20.0)
    _, gap_plain = student(0.0)
    assert "distill" in distilled.history[-1]
    assert gap_distilled < gap_plain
    assert not teacher.training  # left in eval mode


def test_distillation_without_a_teacher_is_a_configuration_error(key):
    config = TrainConfig(epochs=1, batch_size=16, objective=ProtectionObjective(distill_weight=1.0))
    with pytest.raises(ConfigurationError, match="teacher"):
        fit(_model(key), _separable_dataset(), config=config, device="cpu", progress=False)


def test_fit_trains_channels_last_by_default_and_hands_the_model_back_contiguous(tmp_path, key):
    from safetensors.torch import save_file

    from kp_plugin import load_protected, save_protected

    def layouts_seen(model, config):
        seen = []
        stem = first_conv(model)
        stem.register_forward_pre_hook(
            lambda module, args: seen.append(module.weight.is_contiguous(memory_format=torch.channels_last)))
        fit(model, _separable_dataset(), config=config, device="cpu", progress=False)
        return seen

    model = _model(key)
    seen = layouts_seen(model, TrainConfig(epochs=1, batch_size=16))
    assert seen and all(seen)  # every training forward ran channels-last
    assert all(p.is_contiguous() for p in model.parameters())  # and the model comes back contiguous
    save_file(model.unwrap().state_dict(), str(tmp_path / "plain.safetensors"))  # needs contiguous tensors
    save_protected(model, tmp_path / "ckpt")
    loaded = load_protected(tmp_path / "ckpt", timm.create_model("test_efficientnet", num_classes=2), key)
    data = _separable_dataset()
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.images), model(data.images), rtol=1e-5, atol=1e-5)

    plain_layout = _model(key)
    seen = layouts_seen(plain_layout, TrainConfig(epochs=1, batch_size=16, channels_last=False))
    assert seen and not any(seen)


def test_weight_average_is_the_warmed_up_exponential_average():
    from kp_plugin.train import _WeightAverage

    module = torch.nn.Sequential(torch.nn.Linear(1, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        module[0].weight.fill_(0.0)
    average = _WeightAverage(module, decay=0.9)
    expected = 0.0
    for step, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            module[0].weight.fill_(value)
            module[1].running_mean.fill_(value)
        module[1].num_batches_tracked += 1
        average.update()
        decay = min(0.9, (1 + step) / (10 + step))
        expected = decay * expected + (1 - decay) * value
    average.swap()
    assert module[0].weight.item() == pytest.approx(expected)
    assert module[1].running_mean.item() == pytest.approx(expected)  # batch-norm statistics are averaged too
    assert module[1].num_batches_tracked.item() == 4  # counters are not
    average.swap()
    assert module[0].weight.item() == 4.0


def test_ema_hands_back_the_average_and_resume_continues_it(tmp_path, key, monkeypatch):
    import kp_plugin.train as train

    data = _separable_dataset()
    config = TrainConfig(epochs=2, batch_size=8, ema_decay=0.9, objective=ProtectionObjective())
    whole = _model(key)
    fit(whole, data, config=config, checkpoint_dir=tmp_path / "whole", progress=False)
    saved = torch.load(tmp_path / "whole" / TRAINING_STATE_FILE, weights_only=False)["weight_average"]
    assert saved["updates"] == 2 * 4
    for name, value in whole.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(value, saved["values"][name], rtol=0, atol=0)

    save = train._save_checkpoint

    def crash_after_saving(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save_checkpoint", crash_after_saving)
    with pytest.raises(KeyboardInterrupt):
        fit(_model(key), data, config=config, checkpoint_dir=tmp_path / "parts", progress=False)
    monkeypatch.undo()
    resumed = _model(key, seed=1)
    fit(resumed, data, config=config, checkpoint_dir=tmp_path / "parts", resume=True, progress=False)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, msg=name)


def test_ema_decay_must_be_between_zero_and_one():
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ConfigurationError, match="ema_decay"):
            TrainConfig(ema_decay=decay)


def test_mixup_mixes_images_and_labels_with_one_weight():
    images = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, partners, lam = mix_images(images, labels, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert 0.0 < lam < 1.0 and mixed.shape == images.shape
    # each mixed image is lam * its own + (1 - lam) * one other image of the batch
    for i in range(6):
        partner = [j for j in range(6) if torch.allclose(mixed[i], lam * images[i] + (1 - lam) * images[j], atol=1e-6)]
        assert partner and int(labels[partner[0]]) == int(partners[i])
    targets = mixed_targets(labels, partners, lam, 3)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert torch.allclose(targets[torch.arange(6), labels] + targets[torch.arange(6), partners] * (labels != partners),
                          torch.ones(6))
    again = mix_images(images, labels, mixup_alpha=0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again[0], mixed)  # reproducible given the generator


def test_cutmix_pastes_a_box_whose_area_is_the_label_weight():
    images = torch.zeros(4, 1, SIZE, SIZE)
    images[1::2] = 1.0
    labels = torch.tensor([0, 1, 0, 1])
    for seed in range(5):
        mixed, partners, lam = mix_images(images, labels, cutmix_alpha=1.0, generator=torch.Generator().manual_seed(seed))
        for i in range(4):
            own = (mixed[i] == images[i]).float().mean()
            if int(partners[i]) != int(labels[i]):
                assert abs(float(own) - lam) < 1e-6  # the pasted box is exactly 1 - lam of the image
        assert float(mixed.min()) >= 0 and float(mixed.max()) <= 1


def test_fit_with_mixup_and_cutmix_trains_on_soft_labels(key):
    model = _model(key)
    data = _separable_dataset()
    config = TrainConfig(epochs=6, batch_size=8, lr=1e-2, mixup_alpha=0.4, cutmix_alpha=1.0,
                         objective=ProtectionObjective(wrong_key_weight=1.0, form="true_class"))
    result = fit(model, data, config=config, progress=False)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    assert "wrong" in result.final
    assert evaluate_accuracy(model, data) >= 0.9


def test_soft_one_hot_labels_give_the_hard_label_loss(key):
    model = _model(key)
    images, labels = torch.rand(4, 3, SIZE, SIZE), torch.tensor([0, 1, 1, 0])
    objective = ProtectionObjective(label_smoothing=0.1)
    logits = model(images)
    hard, _ = objective(model, images, labels, logits)
    soft, _ = objective(model, images, torch.nn.functional.one_hot(labels, 2).float(), logits)
    torch.testing.assert_close(soft, hard)


def test_mixing_alphas_must_not_be_negative():
    for field in ("mixup_alpha", "cutmix_alpha"):
        for bad in (-0.1, float("nan")):
            with pytest.raises(ConfigurationError, match="mixup_alpha and cutmix_alpha"):
                TrainConfig(**{field: bad})
    with pytest.raises(ConfigurationError, match="needs mixup_alpha or cutmix_alpha"):
        mix_images(torch.rand(2, 3, 4, 4), torch.tensor([0, 1]))


def test_a_device_that_is_not_here_is_a_configuration_error_before_training(key):
    from kp_plugin.evaluate import evaluate_protection

    model, data = _model(key), _separable_dataset(8)
    with pytest.raises(ConfigurationError, match="'cdua' is not a torch device"):
        fit(model, data, config=TrainConfig(epochs=1, batch_size=8), device="cdua", progress=False)
    with pytest.raises(ConfigurationError, match="'cdua' is not a torch device"):
        evaluate_accuracy(model, data, device="cdua")
    with pytest.raises(ConfigurationError, match="'cdua' is not a torch device"):
        evaluate_protection(model, data, num_wrong_keys=1, device="cdua", progress=False)


def test_data_with_more_classes_than_the_model_has_outputs_is_a_clear_error(key):
    # Before: an IndexError ("Target 3 is out of bounds") from the loss.
    images, labels = torch.rand(16, 3, 16, 16), torch.arange(16) % 4
    data = TensorImageDataset(images, labels, classes=["a", "b", "c", "d"], name="toy")
    with pytest.raises(ConfigurationError, match="4 classes but the model has 2 outputs"):
        fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=8), progress=False)


def test_after_step_is_called_after_every_optimizer_step(key):
    calls = []
    result = fit(_model(key), _separable_dataset(32), config=TrainConfig(epochs=2, batch_size=16), progress=False,
                 after_step=lambda: calls.append(len(calls)))
    assert len(result.history) == 2 and len(calls) == 4


def test_resuming_with_other_settings_or_data_is_refused_and_epochs_may_grow(tmp_path, key):
    # Resuming with another lr trained on with the saved lr (the optimizer
    # state restores it) while the record said the new one; another
    # objective or another dataset with as many classes went on silently.
    data = _separable_dataset()
    config = TrainConfig(epochs=1, batch_size=16, objective=ProtectionObjective(wrong_key_weight=0.5))
    fit(_model(key), data, config=config, checkpoint_dir=tmp_path, progress=False)
    changes = [(dict(lr=0.5), r"lr 0\.5 \(saved: 0\.002\)"),
               (dict(objective=ProtectionObjective()), r"objective\.wrong_key_weight 0\.0 \(saved: 0\.5\)"),
               (dict(seed=7), r"seed 7 \(saved: 0\)")]
    for change, message in changes:
        other = TrainConfig(**{**config.__dict__, "epochs": 2, **change})
        with pytest.raises(ConfigurationError, match=message):
            fit(_model(key), data, config=other, checkpoint_dir=tmp_path, resume=True, progress=False)
    relabelled = TensorImageDataset(data.images, data.labels, classes=["car", "truck"], name="toy")
    longer = TrainConfig(**{**config.__dict__, "epochs": 2, "channels_last": False})
    with pytest.raises(ConfigurationError, match=r"classes \['car', 'truck'\] \(saved: \['dark', 'bright'\]\)"):
        fit(_model(key), relabelled, config=longer, checkpoint_dir=tmp_path, resume=True, progress=False)
    result = fit(_model(key), data, config=longer, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]


class _FailingEval(torch.utils.data.Dataset):
    """An evaluation set with an unreadable image."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        from kp_plugin.data import DatasetError

        if index == 3:
            raise DatasetError("cannot read image test/b/3.png: image file is truncated")
        return self.data[index]


def test_an_evaluation_that_fails_keeps_the_epoch_just_trained(tmp_path, key):
    # The checkpoint was written after the per-epoch evaluation: an
    # unreadable test image lost the whole epoch (nothing to resume from).
    from kp_plugin.data import DatasetError

    data = _separable_dataset(16)
    config = TrainConfig(epochs=2, batch_size=8, ema_decay=0.9)
    model = _model(key)
    with pytest.raises(DatasetError, match="3.png"):
        fit(model, data, config=config, eval_set=_FailingEval(data), checkpoint_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / TRAINING_STATE_FILE, weights_only=True)
    assert state["epoch"] == 1 and "eval_accuracy" not in state["history"][0]
    result = fit(_model(key), data, config=config, eval_set=data, checkpoint_dir=tmp_path, resume=True,
                 progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2] and "eval_accuracy" in result.final


@pytest.mark.parametrize("bad", [2, -1, -100])
def test_a_label_out_of_range_in_a_later_batch_is_a_clear_error(key, bad):
    # Only the first batch was checked: a later one failed in the loss with
    # "Target 2 is out of bounds" (a device assert on CUDA), and -100 was
    # silently ignored by cross-entropy.
    labels = [i % 2 for i in range(16)]
    labels[12] = bad
    data = [(torch.rand(3, SIZE, SIZE), label) for label in labels]  # as torchvision's datasets: no num_classes
    with pytest.raises(ConfigurationError, match="label -|2 outputs"):
        fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=8, augment=False), progress=False)


def test_a_failed_training_state_write_leaves_the_previous_epoch_resumable(tmp_path, key, monkeypatch):
    # The weights were replaced before the training state was written: a full
    # disk at the state left new weights beside the old state, and --resume
    # then refused the folder ("later save"): the run was lost.
    import kp_plugin.train as train

    data = _separable_dataset(16)
    config = TrainConfig(epochs=2, batch_size=16)
    fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "optimizer" in obj:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos 555520 vs 555412")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(train.torch, "save", full_disk)
    with pytest.raises(CheckpointError, match="previous epoch's checkpoint there, if any, is unchanged"):
        fit(_model(key), data, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
    monkeypatch.setattr(train.torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, PROTECTION_FILE, TRAINING_STATE_FILE,
                                                                 "config.json"])
    result = fit(_model(key), data, config=config, checkpoint_dir=tmp_path, resume=True, progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_a_plain_models_checkpoint_torn_between_weights_and_state_resumes_from_the_state(tmp_path):
    # Only protected checkpoints recorded which weights a training state
    # continues: a plain model resumed epoch-2 weights with epoch-1 state.
    # Now its state holds its weights too (and an older one is refused).
    import shutil

    data = _separable_dataset(16)
    torch.manual_seed(0)
    baseline = plain_model(timm.create_model("test_efficientnet", num_classes=2))
    fit(baseline, data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    shutil.copy(tmp_path / TRAINING_STATE_FILE, tmp_path / "epoch1.pt")
    fit(baseline, data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, resume=True,
        progress=False)
    shutil.copy(tmp_path / "epoch1.pt", tmp_path / TRAINING_STATE_FILE)  # the epoch-2 state never landed
    result = fit(baseline, data, config=TrainConfig(epochs=3, batch_size=16), checkpoint_dir=tmp_path, resume=True,
                 progress=False)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    state = torch.load(tmp_path / "epoch1.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "weights"}, tmp_path / TRAINING_STATE_FILE)
    with pytest.raises(CheckpointError, match="later save"):
        fit(baseline, data, config=TrainConfig(epochs=4, batch_size=16), checkpoint_dir=tmp_path, resume=True,
            progress=False)


def test_the_next_save_removes_temporaries_a_stopped_run_left(tmp_path, key):
    # A Ctrl-C inside a save's clean-up left `.config.json.PID.XXXX.tmp` (and
    # others) in the checkpoint folder for good.
    import subprocess
    import sys

    data = _separable_dataset(16)
    fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(ended.stdout)
    stale = [tmp_path / f".{name}.{dead}.0a1b2c3d.tmp" for name in ("config.json", PROTECTION_FILE, WEIGHTS_FILE)]
    live = tmp_path / f".{PROTECTION_FILE}.{os.getppid()}.0a1b2c3d.tmp"  # a running process's: kept
    other = tmp_path / f".notes.{dead}.0a1b2c3d.tmp"  # not one of the checkpoint's files: kept
    for path in [*stale, live, other]:
        path.write_bytes(b"x")
    fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, resume=True,
        progress=False)
    assert not any(path.exists() for path in stale)
    assert live.exists() and other.exists()


def test_batch_size_one_trains_a_model_without_batch_norm_and_refuses_one_with_it(key):
    # Every batch was skipped as "a last batch of one image", then the epoch's
    # accuracy divided by zero: a ZeroDivisionError traceback.
    data = _separable_dataset(4)
    with pytest.raises(ConfigurationError, match="batch size of 2 or more"):
        fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=1), progress=False)
    torch.manual_seed(0)
    flat = wrap_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 2)), key,
                      mean=(0.5,) * 3, std=(0.5,) * 3)
    result = fit(flat, data, config=TrainConfig(epochs=1, batch_size=1), progress=False)
    assert len(result.history) == 1 and 0 <= result.history[0]["accuracy"] <= 1


def test_resume_with_fewer_epochs_than_trained_is_refused(tmp_path, key):
    # It resumed a 2-epoch run with epochs=1: no training, and the record
    # (published in protection.json) said 1 epoch over a 2-epoch history.
    data = _separable_dataset(16)
    fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigurationError, match="fewer than the 2 it has trained"):
        fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path, resume=True,
            progress=False)
    again = fit(_model(key), data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path,
                resume=True, progress=False)  # as many: nothing left to train, accepted
    assert [entry["epoch"] for entry in again.history] == [1, 2]


def test_a_training_state_from_another_keys_run_is_refused(tmp_path, key):
    # A state (which holds its own weights) copied beside this key's
    # protection.json resumed: another key's weights trained on under this key.
    data = _separable_dataset(16)
    other = SecretKey.generate_like(key)
    fit(_model(key), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path / "mine",
        progress=False)
    fit(_model(other), data, config=TrainConfig(epochs=1, batch_size=16), checkpoint_dir=tmp_path / "theirs",
        progress=False)
    (tmp_path / "mine" / TRAINING_STATE_FILE).write_bytes((tmp_path / "theirs" / TRAINING_STATE_FILE).read_bytes())
    model = _model(key)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(KeyMismatchError, match="mixes two runs' files"):
        fit(model, data, config=TrainConfig(epochs=2, batch_size=16), checkpoint_dir=tmp_path / "mine",
            resume=True, progress=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
