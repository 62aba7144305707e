"""The real Trainer and pipeline with the keyed processor, the callback and
the protection objective (tiny ViT, real digits)."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, pipeline

from hf_fixtures import BLOCK_SIZE, digits_dataset, tiny_vit, vit_processor
from kp_plugin import (CheckpointError, ConfigurationError, KeyMismatchError, ProtectedModel, ProtectionConfig,
                       SecretKey, load_protected)
from kp_plugin.autoload import load_protected_auto
from kp_plugin.checkpoint import find_key_material
from kp_plugin.evaluate import wrong_keys
from kp_plugin.objectives import ProtectionObjective
from kp_plugin.hf import (
    PROTECTION_METRICS,
    KeyedExampleTransform,
    KeyedImageCollator,
    KeyedImageProcessor,
    KeyedTrainer,
    KeyProtectionCallback,
    ProtectionMarginWarning,
    wrap_hf_model,
)


def _args(output_dir, **overrides):
    settings = dict(per_device_train_batch_size=32, per_device_eval_batch_size=128, learning_rate=3e-3,
                    warmup_steps=20, report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1000,
                    save_strategy="no", eval_strategy="no", seed=0)
    settings.update(overrides)
    return TrainingArguments(str(output_dir), **settings)


@pytest.fixture(scope="module")
def key():
    # A fixed key keeps the accuracy thresholds below reproducible.
    return SecretKey(hashlib.sha256(b"kp-plugin transformers tests").digest(), block_size=BLOCK_SIZE)


@pytest.fixture(scope="module")
def data():
    return digits_dataset("train"), digits_dataset("test")


@pytest.fixture(scope="module")
def trained(key, data, tmp_path_factory):
    """Processor style: a plain ViT fine-tuned on keyed digits with the callback."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("trained")
    train, test = data
    processor = KeyedImageProcessor(vit_processor(), key)
    callback = KeyProtectionCallback(key, wrong_keys=4, min_margin=0.0)
    trainer = KeyedTrainer(
        model=tiny_vit(), args=_args(out, num_train_epochs=8, eval_strategy="steps", eval_steps=176,
                                     save_strategy="steps", save_steps=176, save_total_limit=1),
        train_dataset=train, eval_dataset=test, data_collator=KeyedImageCollator(processor),
        processing_class=processor, callbacks=[callback],
    )
    trainer.train()
    return trainer, processor, out


def test_processor_style_save_model_writes_protection_json_and_loads_with_load_protected(trained, key, data, tmp_path):
    # Before, only checkpoint-N folders got protection.json (from the
    # callback): the final save_model folder did not say which key it needs.
    trainer, processor, _ = trained
    trainer.save_model(str(tmp_path))
    config = ProtectionConfig.load(tmp_path)
    assert config.fingerprint == key.fingerprint and config.extra["style"] == "processor"
    assert find_key_material(tmp_path, key) == []
    images = list(data[1]["image"][:8])
    with torch.no_grad():
        expected = trainer.model.eval()(pixel_values=processor(images, return_tensors="pt")["pixel_values"]).logits
        images01 = vit_processor()(images, do_normalize=False, return_tensors="pt")["pixel_values"]
        # transformers writes the plain model under its checkpoint names (ViT:
        # encoder.layer.N...), which load_protected used to refuse as "not fitting".
        loaded = load_protected(tmp_path, tiny_vit(seed=5), key).eval()
        torch.testing.assert_close(loaded(pixel_values=images01).logits, expected, rtol=1e-4, atol=1e-4)
        auto = load_protected_auto(tmp_path, key).eval()  # what kp evaluate / pull_protected use
        torch.testing.assert_close(auto(pixel_values=images01).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(KeyMismatchError):
        load_protected(tmp_path, tiny_vit(seed=5), SecretKey.generate_like(key))


def _pipeline_accuracy(model, processor, dataset) -> float:
    classify = pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    predictions = classify(list(dataset["image"]), top_k=1, batch_size=64)
    return sum(int(p[0]["label"]) == y for p, y in zip(predictions, dataset["label"])) / len(dataset)


def test_right_key_gives_the_trained_accuracy_and_a_wrong_key_near_chance(trained, key, data):
    trainer, processor, _ = trained
    test = data[1]
    model = trainer.model.eval()
    right = _pipeline_accuracy(model, processor, test)
    wrong_key = wrong_keys(key, 1, seed=0)[0]
    wrong = _pipeline_accuracy(model, KeyedImageProcessor(vit_processor(), wrong_key), test)
    print(f"pipeline accuracy: right key {right:.3f}, wrong key {wrong:.3f} (chance 0.100)")
    assert right >= 0.7
    assert wrong <= 0.25


def test_callback_metrics_reach_the_log_history(trained):
    trainer = trained[0]
    logged = [entry for entry in trainer.state.log_history if "eval_key_accuracy" in entry]
    assert [entry["step"] for entry in logged] == [176, 352]
    assert set(PROTECTION_METRICS) <= set(logged[-1])
    last = logged[-1]
    assert last["eval_protection_margin"] == pytest.approx(last["eval_key_accuracy"] - last["eval_wrong_key_accuracy_max"])
    assert last["eval_key_accuracy"] >= 0.7 and last["eval_wrong_key_accuracy_max"] <= 0.25


def test_checkpoints_have_protection_json_and_no_key(trained, key):
    out = trained[2]
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert checkpoints
    for checkpoint in checkpoints:
        assert ProtectionConfig.load(checkpoint).fingerprint == key.fingerprint
        assert find_key_material(checkpoint, key) == []


def test_callback_refuses_a_model_keyed_with_another_key(key, data, tmp_path):
    train = data[0].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    model = wrap_hf_model(tiny_vit(), SecretKey.generate_like(key), image_processor=vit_processor())
    trainer = KeyedTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=train,
                           data_collator=KeyedImageCollator(processor, output="images01"),
                           callbacks=[KeyProtectionCallback(key)])
    with pytest.raises(KeyMismatchError):
        trainer.train()


def test_callback_refuses_data_keyed_with_another_key(key, data, tmp_path):
    train = data[0].select(range(64))
    other = KeyedImageProcessor(vit_processor(), SecretKey.generate_like(key))
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1), train_dataset=train,
                           data_collator=KeyedImageCollator(other), callbacks=[KeyProtectionCallback(key)])
    with pytest.raises(KeyMismatchError):
        trainer.train()


def test_callback_refuses_an_unkeyed_data_path(key, data, tmp_path):
    train = data[0].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1), train_dataset=train,
                           data_collator=KeyedImageCollator(processor, output="images01"),
                           callbacks=[KeyProtectionCallback(key)])
    with pytest.raises(ConfigurationError, match="nothing applies the key"):
        trainer.train()


def test_callback_refuses_a_key_applied_twice(key, data, tmp_path):
    train = data[0].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    model = wrap_hf_model(tiny_vit(), key, image_processor=processor)
    trainer = KeyedTrainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=train,
                           data_collator=KeyedImageCollator(processor), callbacks=[KeyProtectionCallback(key)])
    with pytest.raises(ConfigurationError, match="both apply the key"):
        trainer.train()


def test_plain_trainer_column_removal_is_a_clear_error(key, data, tmp_path):
    train = data[0].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    trainer = Trainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1), train_dataset=train,
                      data_collator=KeyedImageCollator(processor))
    with pytest.raises(ConfigurationError, match="remove_unused_columns"):
        trainer.train()


def test_model_style_with_transform_and_objective_trains_and_saves_protected_checkpoints(key, data, tmp_path):
    train = data[0].select(range(64)).with_transform(
        KeyedExampleTransform(KeyedImageProcessor(vit_processor(), key), output="images01"))
    processor = KeyedImageProcessor(vit_processor(), key)
    model = wrap_hf_model(tiny_vit(), key, image_processor=processor)
    trainer = KeyedTrainer(model=model, args=_args(tmp_path, max_steps=2, logging_steps=1, save_strategy="steps",
                                                   save_steps=2),
                           train_dataset=train, objective=ProtectionObjective(wrong_key_weight=0.5),
                           callbacks=[KeyProtectionCallback(key)])
    trainer.train()
    assert any("objective_wrong" in entry for entry in trainer.state.log_history)
    checkpoint = tmp_path / "checkpoint-2"
    assert find_key_material(checkpoint, key) == []
    # The callback rewrites protection.json after save_protected: it kept
    # neither the weights digest nor, then, a mac over it.
    config = ProtectionConfig.load(checkpoint)
    assert config.weights_digest and config.mac and config.extra["style"] == "model"
    loaded = load_protected(checkpoint, tiny_vit(seed=3), key)
    torch.testing.assert_close(loaded.unwrap().classifier.weight, model.unwrap().classifier.weight)


def test_processor_style_objective_uses_the_recovered_images(key, data, tmp_path):
    train = data[0].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1, logging_steps=1),
                           train_dataset=train, data_collator=KeyedImageCollator(processor),
                           objective=ProtectionObjective(wrong_key_weight=0.5))
    trainer.train()
    assert any("objective_wrong" in entry for entry in trainer.state.log_history)


def test_small_margin_warns_and_can_stop_training(key, data, tmp_path):
    train, test = data[0].select(range(64)), data[1].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=1),
                           train_dataset=train, eval_dataset=test, data_collator=KeyedImageCollator(processor),
                           callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.9,
                                                            stop_on_small_margin=True)])
    with pytest.warns(ProtectionMarginWarning, match="below min_margin=0.9") as warned:
        trainer.train()
    assert trainer.state.global_step == 1
    assert "objective=DEFAULT_OBJECTIVE" in str(warned[0].message)
    # With the objective already in use it said to use it.
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1),
                           train_dataset=train, eval_dataset=test, data_collator=KeyedImageCollator(processor),
                           callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.9)],
                           objective=ProtectionObjective(wrong_key_weight=0.5))
    with pytest.warns(ProtectionMarginWarning) as warned:
        trainer.train()
    message = str(warned[0].message)
    assert "DEFAULT_OBJECTIVE" not in message and "wrong_key_weight (now 0.5)" in message


def test_patience_stops_after_that_many_small_margins_and_none_only_logs(key, data, tmp_path):
    # Before: stop_on_small_margin stopped at the first evaluation (the margin
    # of a young run is near 0), and min_margin=None was refused.
    import warnings

    train, test = data[0].select(range(64)), data[1].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)

    def trainer(**settings):
        return KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=5, eval_strategy="steps", eval_steps=1),
                            train_dataset=train, eval_dataset=test, data_collator=KeyedImageCollator(processor),
                            callbacks=[KeyProtectionCallback(key, wrong_keys=2, **settings)])

    patient = trainer(min_margin=0.9, stop_on_small_margin=True, patience=3)
    with pytest.warns(ProtectionMarginWarning):
        patient.train()
    assert patient.state.global_step == 3
    quiet = trainer(min_margin=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProtectionMarginWarning)
        quiet.train()
    assert quiet.state.global_step == 5
    assert sum("eval_protection_margin" in entry for entry in quiet.state.log_history) == 5
    for settings in ({"patience": 0}, {"min_margin": None, "stop_on_small_margin": True}):
        with pytest.raises(ConfigurationError):
            KeyProtectionCallback(key, **settings)


@pytest.mark.filterwarnings("ignore::kp_plugin.hf.ProtectionMarginWarning")  # one step: no margin yet
def test_callback_refuses_eval_data_keyed_with_another_key_before_the_first_step(key, data, tmp_path):
    # Before, KeyedTrainer trained until its first evaluation before the eval
    # set's transform (another key) was looked at.
    other = KeyedImageProcessor(vit_processor(), SecretKey.generate_like(key))
    processor = KeyedImageProcessor(vit_processor(), key)
    train = data[0].select(range(64)).with_transform(KeyedExampleTransform(processor))
    test = data[1].select(range(32)).with_transform(KeyedExampleTransform(other))
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=4),
                           train_dataset=train, eval_dataset={"test": test}, callbacks=[KeyProtectionCallback(key)])
    with pytest.raises(KeyMismatchError):
        trainer.train()
    assert trainer.state.global_step == 0


class _MetricsReader(TrainerCallback):
    """Reads the evaluation's metrics in on_evaluate, as EarlyStoppingCallback does."""

    def __init__(self):
        self.found = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.found.append("eval_protection_margin" in (metrics or {}))


@pytest.mark.parametrize("trainer_class", [KeyedTrainer, Trainer])
@pytest.mark.filterwarnings("ignore::kp_plugin.hf.ProtectionMarginWarning")
def test_protection_metrics_are_there_for_callbacks_listed_before_it(key, data, trainer_class, tmp_path):
    # Before, a callback listed before KeyProtectionCallback (e.g.
    # EarlyStoppingCallback with metric_for_best_model="protection_margin")
    # ran its on_evaluate before the metrics existed.
    processor = KeyedImageProcessor(vit_processor(), key)
    reader = _MetricsReader()
    trainer = trainer_class(model=tiny_vit(), args=_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1,
                                                         remove_unused_columns=False),
                            train_dataset=data[0].select(range(32)), eval_dataset=data[1].select(range(16)),
                            data_collator=KeyedImageCollator(processor),
                            callbacks=[reader, KeyProtectionCallback(key, wrong_keys=1)])
    trainer.train()
    assert reader.found == [True, True]


def test_unbound_callback_on_a_plain_trainer_writes_the_eval_entry(key, data, tmp_path):
    train, test = data[0].select(range(32)), data[1].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    logger = _Recorder()
    trainer = Trainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1, remove_unused_columns=False),
                      train_dataset=train, eval_dataset=test, data_collator=KeyedImageCollator(processor),
                      callbacks=[logger, KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)])
    trainer.train()
    metrics = trainer.evaluate()
    assert "eval_protection_margin" in metrics
    assert "eval_key_accuracy" in trainer.state.log_history[-1]
    assert "eval_loss" in trainer.state.log_history[-1]
    # What a logger (TensorBoard, W&B) receives: its on_log ran before
    # on_evaluate measured, so the callback sends the metrics after it.
    received = [logs for logs in logger.logs if "eval_key_accuracy" in logs]
    assert len(received) == 1 and set(PROTECTION_METRICS) <= set(received[0])
    assert received[0]["eval_key_accuracy"] == metrics["eval_key_accuracy"]


def test_evaluate_alone_measures_and_refuses_an_eval_path_keyed_with_another_key(key, data, tmp_path):
    # Before: trainer.evaluate() without train() failed with "cannot tell how
    # the data was keyed", and an evaluation path keyed with another key was
    # never checked.
    test = data[1].select(range(32))

    def evaluate(data_key):
        collator = KeyedImageCollator(KeyedImageProcessor(vit_processor(), data_key))
        trainer = Trainer(model=tiny_vit(), args=_args(tmp_path, remove_unused_columns=False), eval_dataset=test,
                          data_collator=collator, callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)])
        return trainer.evaluate()

    with pytest.warns(ProtectionMarginWarning):  # an untrained model: no margin
        assert "eval_protection_margin" in evaluate(key)
    with pytest.raises(KeyMismatchError, match="another key"):
        evaluate(SecretKey.generate_like(key))


class _Recorder(TrainerCallback):
    """A logger's view: every dict that reaches on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


@pytest.mark.filterwarnings("ignore::kp_plugin.hf.ProtectionMarginWarning")  # one step: no margin yet
@pytest.mark.parametrize("style", ["model, KeyedTrainer", "processor, KeyedTrainer", "processor, plain Trainer"])
def test_a_fresh_run_into_another_keys_output_dir_is_refused_before_training(key, data, tmp_path, style):
    # Before: model style trained, then failed at its first save ("pass
    # overwrite=True", which no Trainer takes); processor style replaced the
    # other key's checkpoints one by one, leaving two keys' runs in one folder.
    train = data[0].select(range(32))
    other = SecretKey.generate_like(key)

    def trainer(run_key):
        processor = KeyedImageProcessor(vit_processor(), run_key)
        callbacks = [KeyProtectionCallback(run_key, wrong_keys=2, min_margin=0.0)] if "plain" in style else []
        args = _args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1)
        if style.startswith("model"):
            return KeyedTrainer(model=wrap_hf_model(tiny_vit(), run_key, image_processor=processor), args=args,
                                train_dataset=train, data_collator=KeyedImageCollator(processor, output="images01"),
                                callbacks=callbacks)
        if "plain" in style:
            args.remove_unused_columns = False
        trainer_class = Trainer if "plain" in style else KeyedTrainer
        return trainer_class(model=tiny_vit(), args=args, train_dataset=train,
                             data_collator=KeyedImageCollator(processor), callbacks=callbacks)

    trainer(key).train()
    saved = (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes()
    second = trainer(other)
    with pytest.raises(CheckpointError, match=r"another key \(checkpoint-1\).*another output_dir") as caught:
        second.train()
    assert second.state.global_step == 0  # refused before the first step
    assert other._material.hex() not in str(caught.value) and key._material.hex() not in str(caught.value)
    assert (tmp_path / "checkpoint-1" / "model.safetensors").read_bytes() == saved
    assert ProtectionConfig.load(tmp_path / "checkpoint-1").fingerprint == key.fingerprint
    trainer(key).train()  # the same key: a fresh run replaces its own checkpoints, as Trainer does


def test_a_streaming_dataset_keyed_by_map_counts_as_keyed(key, data, tmp_path):
    # Before: "nothing applies the key ... the data path has no keyed
    # collator or transform" for .map(KeyedExampleTransform) on an
    # IterableDataset, the only way to key a streaming dataset's examples.
    from transformers import default_data_collator

    processor = KeyedImageProcessor(vit_processor(), key)
    train = data[0].select(range(16)).to_iterable_dataset().shuffle(seed=0)
    train = train.map(KeyedExampleTransform(processor), batched=True, remove_columns=["image", "label"])
    callback = KeyProtectionCallback(key, wrong_keys=1, min_margin=0.0)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8),
                           train_dataset=train, data_collator=default_data_collator, callbacks=[callback])
    trainer.train()
    assert trainer.state.global_step == 1
    other = SecretKey.generate_like(key)
    keyed_otherwise = data[0].select(range(16)).to_iterable_dataset().map(
        KeyedExampleTransform(KeyedImageProcessor(vit_processor(), other)), batched=True,
        remove_columns=["image", "label"])
    with pytest.raises(KeyMismatchError):
        KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8),
                     train_dataset=keyed_otherwise, data_collator=default_data_collator,
                     callbacks=[KeyProtectionCallback(key, wrong_keys=1, min_margin=0.0)]).train()


@pytest.mark.filterwarnings("ignore::kp_plugin.hf.ProtectionMarginWarning")  # one step: no margin yet
@pytest.mark.parametrize("style", ["model, KeyedTrainer", "processor, plain Trainer"])
def test_resuming_another_keys_checkpoint_is_refused(key, data, tmp_path, style):
    # Before, the run went on training the other key's weights under this key.
    train = data[0].select(range(32))
    other = SecretKey.generate_like(key)

    def trainer(run_key, max_steps):
        processor = KeyedImageProcessor(vit_processor(), run_key)
        callbacks = [KeyProtectionCallback(run_key, wrong_keys=2, min_margin=0.0)]
        args = _args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=1)
        if style.startswith("model"):
            return KeyedTrainer(model=wrap_hf_model(tiny_vit(), run_key, image_processor=processor), args=args,
                                train_dataset=train, data_collator=KeyedImageCollator(processor, output="images01"),
                                callbacks=callbacks)
        args.remove_unused_columns = False
        return Trainer(model=tiny_vit(), args=args, train_dataset=train,
                       data_collator=KeyedImageCollator(processor), callbacks=callbacks)

    first = trainer(key, 1)
    first.train()
    assert (tmp_path / "checkpoint-1" / "protection.json").is_file()
    loaded = load_protected(tmp_path / "checkpoint-1", tiny_vit(seed=5), key)  # either style's checkpoint loads
    base = first.model.unwrap() if isinstance(first.model, ProtectedModel) else first.model
    torch.testing.assert_close(loaded.unwrap().classifier.weight, base.classifier.weight)
    with pytest.raises(KeyMismatchError, match="another key") as caught:
        trainer(other, 2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    # The advice is a trainer's (it said to pass allow_wrong_key=True, which no trainer takes).
    assert "resume it with the key file it was trained with" in str(caught.value)
    assert "allow_wrong_key" not in str(caught.value)
    assert not (tmp_path / "checkpoint-2").exists()
    trainer(key, 2).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))  # the owner's key resumes
    assert (tmp_path / "checkpoint-2" / "protection.json").is_file()


@pytest.mark.filterwarnings("ignore::kp_plugin.hf.ProtectionMarginWarning")  # one step: no margin yet
def test_each_evaluation_set_and_prefix_gets_its_own_protection_metrics(key, data, tmp_path):
    train, test = data[0].select(range(32)), data[1]
    processor = KeyedImageProcessor(vit_processor(), key)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1),
                           train_dataset=train, data_collator=KeyedImageCollator(processor),
                           eval_dataset={"early": test.select(range(32)), "late": test.select(range(32, 96))},
                           # A metric of the user's that ends in _runtime must not be taken
                           # for the evaluation's prefix (it came before eval_early_runtime).
                           compute_metrics=lambda prediction: {"model_runtime": 0.5},
                           callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)])
    trainer.train()
    metrics = trainer.evaluate()
    for name in ("early", "late"):
        assert {f"eval_{name}_{m[len('eval_'):]}" for m in PROTECTION_METRICS} <= set(metrics)
    assert "eval_key_accuracy" not in metrics
    test_metrics = trainer.evaluate(test.select(range(32)), metric_key_prefix="test")
    assert "test_protection_margin" in test_metrics
    assert any("test_key_accuracy" in entry for entry in trainer.state.log_history)


@pytest.mark.slow
def test_model_style_resume_and_best_model_load_the_protected_checkpoints(key, data, tmp_path):
    train, test = data[0].select(range(64)), data[1].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    collator = KeyedImageCollator(processor, output="images01")

    def trainer(max_steps, model, best=True):
        selection = dict(load_best_model_at_end=True, metric_for_best_model="protection_margin",
                         greater_is_better=True) if best else {}
        return KeyedTrainer(
            model=model, train_dataset=train, eval_dataset=test, data_collator=collator,
            args=_args(tmp_path, max_steps=max_steps, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                       save_steps=1, **selection),
            callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)])

    first = trainer(2, wrap_hf_model(tiny_vit(), key, image_processor=processor))
    first.train()
    best = first.state.best_model_checkpoint
    assert best is not None
    best_weights = load_protected(best, tiny_vit(seed=5), key).unwrap().classifier.weight
    torch.testing.assert_close(first.model.unwrap().classifier.weight, best_weights)

    # Resuming at the last step trains no further: the weights are checkpoint-2's.
    resumed = trainer(2, wrap_hf_model(tiny_vit(seed=7), key, image_processor=processor), best=False)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    saved = load_protected(tmp_path / "checkpoint-2", tiny_vit(seed=5), key).unwrap().classifier.weight
    torch.testing.assert_close(resumed.model.unwrap().classifier.weight, saved)


def test_evaluation_reports_the_models_own_loss_with_an_objective(key, data, tmp_path):
    # Before, evaluation ran the objective too: eval_loss held the wrong-key
    # term under a fresh random key (different on every call) and the eval
    # batches were averaged into the next training log's objective_ce.
    processor = KeyedImageProcessor(vit_processor(), key)
    test = data[1].select(range(48))

    def evaluate(objective):
        trainer = KeyedTrainer(model=tiny_vit(seed=2), args=_args(tmp_path, per_device_eval_batch_size=16),
                               eval_dataset=test, data_collator=KeyedImageCollator(processor), objective=objective)
        losses = [trainer.evaluate()["eval_loss"] for _ in range(2)]
        assert trainer._objective_steps == 0
        return losses

    with_objective = evaluate(ProtectionObjective(wrong_key_weight=1.0))
    assert with_objective[0] == with_objective[1]
    assert with_objective[0] == pytest.approx(evaluate(None)[0], rel=1e-6)


def test_label_smoothing_factor_applies_to_the_objectives_cross_entropy(key, data, tmp_path):
    # Before, TrainingArguments(label_smoothing_factor=...) was silently
    # ignored whenever an objective was given.
    processor = KeyedImageProcessor(vit_processor(), key)
    collator = KeyedImageCollator(processor)
    batch = collator([data[0][i] for i in range(16)])
    model = tiny_vit(seed=2).train()
    trainer = KeyedTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.5),
                           data_collator=collator, objective=ProtectionObjective())
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = model(pixel_values=batch["pixel_values"]).logits
    expected = torch.nn.functional.cross_entropy(logits, batch["labels"], label_smoothing=0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, batch["labels"]).item(), rel=1e-3)
    with pytest.raises(ConfigurationError, match="two label smoothings"):
        KeyedTrainer(model=model, args=_args(tmp_path, label_smoothing_factor=0.5), data_collator=collator,
                     objective=ProtectionObjective(label_smoothing=0.1))


@pytest.mark.parametrize("release", ["current", "without loss_is_scaled_for_ga"])
def test_objective_loss_is_scaled_for_gradient_accumulation(key, data, tmp_path, release):
    train = data[0].select(range(32))
    processor = KeyedImageProcessor(vit_processor(), key)
    model = wrap_hf_model(tiny_vit(), key, image_processor=processor)
    trainer = KeyedTrainer(model=model, args=_args(tmp_path, max_steps=1, logging_steps=1, per_device_train_batch_size=16,
                                                   gradient_accumulation_steps=2),
                           train_dataset=train, data_collator=KeyedImageCollator(processor, output="images01"),
                           objective=ProtectionObjective(wrong_key_weight=0.5))
    if release != "current":
        # transformers 5.17 and before have no such attribute and decide from
        # model_accepts_loss_kwargs: the logged loss (and the gradients) came
        # out twice too large there.
        trainer.loss_is_scaled_for_ga = None
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "objective_ce" in entry)
    expected = logged["objective_ce"] + 0.5 * logged["objective_wrong"]
    assert logged["loss"] == pytest.approx(expected, rel=1e-3)


def test_distillation_runs_the_teacher_on_the_plain_images_of_the_keyed_batch(key, data, tmp_path):
    """Processor style: the teacher sees the batch's own images without the
    key, normalized as the processor normalizes; the part is logged."""
    from kp_plugin import KeyedInput

    train = data[0].select(range(64))
    processor = KeyedImageProcessor(vit_processor(), key)
    student, teacher = tiny_vit(), tiny_vit(seed=5)
    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            if name not in seen:  # the first call: the keyed batch (student), the plain one (teacher)
                seen[name] = (args[0] if args else kwargs["pixel_values"]).detach().clone()
        return hook

    student.register_forward_pre_hook(record("student"), with_kwargs=True)
    teacher.register_forward_pre_hook(record("teacher"), with_kwargs=True)
    objective = ProtectionObjective(wrong_key_weight=0.5, distill_weight=1.0)
    with pytest.raises(ConfigurationError, match="teacher"):
        KeyedTrainer(model=student, args=_args(tmp_path, max_steps=1), train_dataset=train,
                     data_collator=KeyedImageCollator(processor), objective=objective)
    trainer = KeyedTrainer(model=student, args=_args(tmp_path, max_steps=1, logging_steps=1), train_dataset=train,
                           data_collator=KeyedImageCollator(processor), objective=objective, teacher=teacher)
    trainer.train()
    assert any("objective_distill" in entry for entry in trainer.state.log_history)
    mean = torch.tensor(processor.image_mean).view(1, -1, 1, 1)
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    plain01 = seen["teacher"] * std + mean
    keyed = KeyedInput(key, mean=processor.image_mean, std=processor.image_std, check_range=False)
    torch.testing.assert_close(keyed(plain01), seen["student"], rtol=1e-4, atol=1e-4)
    assert not teacher.training


def test_processor_style_best_model_and_resume_load_every_weight(key, data, tmp_path):
    # transformers 5 saves a ViT checkpoint under its old names (encoder.layer.0.attention.attention.query) and
    # Trainer's stock loaders match them against the live model's (layers.0.attention.q_proj) without renaming:
    # the encoder layers kept the last step's weights after load_best_model_at_end, and a resumed run went on
    # from where the model was, not from the checkpoint; only a log line said so.
    train, test = data[0].select(range(32)), data[1].select(range(32))
    processor = KeyedImageProcessor(vit_processor(), key)

    def trainer(model, **settings):
        return KeyedTrainer(model=model, train_dataset=train, eval_dataset=test,
                            data_collator=KeyedImageCollator(processor), processing_class=processor,
                            args=_args(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=1,
                                       save_strategy="steps", save_steps=1, learning_rate=5e-2, **settings),
                            callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)])

    first = trainer(tiny_vit(), load_best_model_at_end=True, metric_for_best_model="key_accuracy")
    first.train()
    best = type(first.model).from_pretrained(first.state.best_model_checkpoint).state_dict()
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, best[name]), name
    second = trainer(tiny_vit(seed=7))
    checkpoint = os.path.join(tmp_path, "checkpoint-3")
    second.train(resume_from_checkpoint=checkpoint)  # at its last step: no training, the checkpoint's weights
    saved = type(second.model).from_pretrained(checkpoint).state_dict()
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, saved[name]), name


@pytest.mark.parametrize("settings", [dict(min_margin="high"), dict(min_margin=float("nan")), dict(wrong_keys=2.5),
                                      dict(wrong_keys=0)])
def test_callback_settings_of_the_wrong_kind_are_configuration_errors(key, settings):
    # min_margin="high" raised float()'s bare ValueError; wrong_keys=2.5 went through.
    from kp_plugin.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=next(iter(settings))):
        KeyProtectionCallback(key, **settings)


def test_the_objectives_wrong_key_pass_runs_in_the_trainers_mixed_precision(key, data, tmp_path):
    # Model style with bf16: the keyed pass ran under accelerate's autocast,
    # the objective's wrong-key pass (the base model called directly) in fp32.
    processor = KeyedImageProcessor(vit_processor(), key)
    model = wrap_hf_model(tiny_vit(), key, image_processor=processor)
    dtypes = []
    model.unwrap().classifier.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer = KeyedTrainer(model=model, args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8, bf16=True),
                           train_dataset=data[0].select(range(8)),
                           data_collator=KeyedImageCollator(processor, output="images01"),
                           objective=ProtectionObjective(wrong_key_weight=0.5))
    trainer.train()
    assert len(dtypes) == 2 and set(dtypes) == {torch.bfloat16}


def test_keyed_trainer_evaluates_without_the_collators_training_augmentation(key, data, tmp_path):
    # Trainer has one collator for every split: evaluation, prediction and
    # the callback's wrong-key measurements saw randomly augmented images.
    calls = []

    def augment(x):
        calls.append(x.shape[0])
        return x.flip(-1)

    processor = KeyedImageProcessor(vit_processor(), key)
    collator = KeyedImageCollator(processor, augment=augment)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path, max_steps=1, per_device_train_batch_size=8),
                           train_dataset=data[0].select(range(8)), eval_dataset=data[1].select(range(16)),
                           data_collator=collator, callbacks=[KeyProtectionCallback(key, wrong_keys=1)])
    trainer.evaluate()
    trainer.predict(data[1].select(range(8)))
    assert calls == []
    trainer.train()
    assert calls == [8] and trainer.data_collator is collator
    assert collator.without_augmentation().augment is None and collator.augment is augment


def _tiny_mobilenet(seed: int = 0):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(seed)
    return MobileNetV2ForImageClassification(MobileNetV2Config(
        image_size=16, depth_multiplier=0.35, num_labels=10, classifier_dropout_prob=0.0))


def test_a_cpu_training_step_takes_the_small_map_depthwise_gradient_with_the_same_result(key, data, tmp_path,
                                                                                         monkeypatch):
    # 16x16 images end on 1x1 and 2x2 maps under MobileNetV2's 3x3 depthwise
    # convolutions: the step takes kp_plugin._depthwise's weight gradient
    # (small_map_depthwise=False: torch's own), and trains to the same weights.
    from kp_plugin import _depthwise

    calls = []
    original = _depthwise._SmallMapDepthwise.apply
    monkeypatch.setattr(_depthwise._SmallMapDepthwise, "apply", lambda *a: calls.append(1) or original(*a))
    train = data[0].select(range(32)).with_transform(
        KeyedExampleTransform(KeyedImageProcessor(vit_processor(), key), output="images01"))
    weights = {}
    for small_maps in (False, True):
        calls.clear()
        model = wrap_hf_model(_tiny_mobilenet(), key, image_processor=KeyedImageProcessor(vit_processor(), key))
        trainer = KeyedTrainer(model=model, args=_args(tmp_path / str(small_maps), max_steps=1, warmup_steps=0),
                               train_dataset=train, objective=ProtectionObjective(wrong_key_weight=0.5),
                               small_map_depthwise=small_maps)
        trainer.train()
        assert bool(calls) == small_maps
        weights[small_maps] = {name: value.detach().clone() for name, value in model.state_dict().items()}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-3, atol=1e-5, msg=name)


def test_an_objective_and_a_compute_loss_func_together_are_refused(key, data, tmp_path):
    # compute_loss_func was silently ignored next to an objective.
    collator = KeyedImageCollator(KeyedImageProcessor(vit_processor(), key))
    with pytest.raises(ConfigurationError, match="two losses"):
        KeyedTrainer(model=tiny_vit(), args=_args(tmp_path), data_collator=collator,
                     objective=ProtectionObjective(), compute_loss_func=lambda outputs, labels, **kw: outputs.loss)
    trainer = KeyedTrainer(model=tiny_vit(), args=_args(tmp_path), data_collator=collator,
                           compute_loss_func=lambda outputs, labels, **kw: outputs.logits.sum() * 0)
    batch = collator([data[0][i] for i in range(4)])
    assert trainer.compute_loss(trainer.model.train(), dict(batch)).item() == 0  # without an objective it is used


class _CopiesTheKeyIntoCheckpoints(TrainerCallback):
    """A careless callback: backs the key file up into every checkpoint."""

    def __init__(self, key_file):
        self.key_file = key_file

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        with open(self.key_file, "rb") as src, open(os.path.join(folder, "owner.key"), "wb") as dst:
            dst.write(src.read())


@pytest.mark.parametrize("trainer_class", [KeyedTrainer, Trainer])
def test_the_checkpoint_scan_sees_what_other_callbacks_write_on_save(key, data, trainer_class, tmp_path):
    # The callback moves itself first (for its metrics), so its scan ran
    # before any other callback's on_save and missed the key written there.
    from kp_plugin import KeyLeakError

    key.save(tmp_path / "owner.key")
    processor = KeyedImageProcessor(vit_processor(), key)
    callback = KeyProtectionCallback(key, wrong_keys=1, min_margin=None)
    trainer = trainer_class(
        model=tiny_vit(), args=_args(tmp_path / "out", max_steps=1, save_strategy="steps", save_steps=1,
                                     remove_unused_columns=False),
        train_dataset=data[0].select(range(8)), data_collator=KeyedImageCollator(processor),
        callbacks=[_CopiesTheKeyIntoCheckpoints(tmp_path / "owner.key"), callback],
    )
    with pytest.raises(KeyLeakError, match="owner.key"):
        trainer.train()
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names[0] == "KeyProtectionCallback" and names[-1] == "_ScanCheckpointLast"
    assert names.count("_ScanCheckpointLast") == 1
