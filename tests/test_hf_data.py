"""Data helpers: with_transform / collator outputs, and pickling that
carries no key (datasets fingerprints transforms by pickling them)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from datasets.fingerprint import Hasher

from hf_fixtures import BLOCK_SIZE, IMAGE_SIZE, digits_dataset, vit_processor
from kp_plugin import SecretKey
from kp_plugin.hf import KeyedExampleTransform, KeyedImageCollator, KeyedImageProcessor, KeyRequiredError


@pytest.fixture(scope="module")
def key():
    return SecretKey.generate(block_size=BLOCK_SIZE)


def test_with_transform_and_collator_give_the_processors_output(key):
    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=4)
    expected = processor(list(raw["image"]), return_tensors="pt")["pixel_values"]
    transformed = raw.with_transform(KeyedExampleTransform(processor))
    from_transform = torch.stack([transformed[i]["pixel_values"] for i in range(4)])
    batch = KeyedImageCollator(processor)([raw[i] for i in range(4)])
    torch.testing.assert_close(from_transform, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(batch["pixel_values"], expected, atol=1e-6, rtol=0)
    assert batch["labels"].tolist() == raw["label"]


def test_images01_output_is_unkeyed_and_in_range(key):
    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=4)
    batch = KeyedImageCollator(processor, output="images01")([raw[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
    torch.testing.assert_close(processor.apply_key(batch["pixel_values"]),
                               processor(list(raw["image"]), return_tensors="pt")["pixel_values"], atol=1e-6, rtol=0)


def test_augmentation_runs_on_images01_before_the_key(key):
    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=2)
    flipped = KeyedImageCollator(processor, augment=lambda x: x.flip(-1))([raw[0], raw[1]])["pixel_values"]
    expected = processor.apply_key(processor.images01(list(raw["image"])).flip(-1))
    torch.testing.assert_close(flipped, expected)


def test_transform_fingerprint_is_stable_and_pickles_hold_no_key(key):
    a = KeyedExampleTransform(KeyedImageProcessor(vit_processor(), key))
    b = KeyedExampleTransform(KeyedImageProcessor(vit_processor(), key))
    other = KeyedExampleTransform(KeyedImageProcessor(vit_processor(), SecretKey.generate_like(key)))
    assert Hasher.hash(a) == Hasher.hash(b) != Hasher.hash(other)
    data = pickle.dumps(a)
    assert not any(form in data for form in key.secret_forms())
    with pytest.raises(KeyRequiredError, match="SecretKey.load"):
        pickle.loads(data)


def test_dataloader_workers_started_by_spawn_get_the_collator(key):
    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=4)
    examples = [raw[i] for i in range(4)]
    collator = KeyedImageCollator(processor)
    expected = collator(examples)
    loader = torch.utils.data.DataLoader(examples, batch_size=4, collate_fn=collator, num_workers=1,
                                         multiprocessing_context="spawn")
    (got,) = list(loader)
    torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], rtol=0, atol=0)
    assert torch.equal(got["labels"], expected["labels"])


def test_datasets_map_with_worker_processes_gets_the_transform(key):
    # datasets sends the function to its workers with the dill-based
    # `multiprocess` pickler, which had no way to carry the key: every worker
    # died and the caller saw "One of the subprocesses has abruptly died".
    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=6)
    transform = KeyedExampleTransform(processor)
    one = raw.map(transform, batched=True, remove_columns=["image"])
    two = raw.map(transform, batched=True, remove_columns=["image"], num_proc=2)
    assert torch.equal(torch.tensor(two["pixel_values"]), torch.tensor(one["pixel_values"]))
    assert two["label"] == raw["label"]
    assert Hasher.hash(transform) == Hasher.hash(KeyedExampleTransform(KeyedImageProcessor(vit_processor(), key)))


def test_datasets_map_with_worker_processes_carries_a_keyed_input_without_kp_plugin_hf(tmp_path):
    # A function holding a KeyedInput (defined in main(), so the workers get
    # it through dill) failed with KeyPicklingError unless kp_plugin.hf had
    # been imported: only that module registered the key with multiprocess.
    import subprocess
    import sys

    code = """
import sys, torch, datasets
from kp_plugin import KeyedInput, SecretKey
def main():
    keyed = KeyedInput(SecretKey(bytes(range(32)), block_size=4), mean=0.5, std=0.5)
    x = torch.rand(6, 3, 8, 8)
    ds = datasets.Dataset.from_dict({"x": x.tolist()}).with_format("torch")
    out = ds.map(lambda b: {"y": keyed(b["x"])}, batched=True, num_proc=2, batch_size=3)
    assert "kp_plugin.hf" not in sys.modules
    torch.testing.assert_close(out.with_format("torch")[:]["y"], keyed(x), rtol=0, atol=0)
    print("ok")
if __name__ == "__main__":
    main()
"""
    (tmp_path / "run.py").write_text(code)
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's kp_plugin
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-1500:]


def test_missing_image_column_names_the_trap_and_the_column_setting(key):
    # CIFAR-10 keeps its images in 'img': the error blamed only Trainer's
    # column removal, which a KeyedTrainer user had already dealt with.
    collator = KeyedImageCollator(KeyedImageProcessor(vit_processor(), key))
    with pytest.raises(Exception, match="remove_unused_columns") as caught:
        collator([{"img": 1, "label": 1}])
    assert "KeyedImageCollator(processor, image_column=...)" in str(caught.value)


def test_a_labels_column_is_read_as_transformers_collators_read_it(key, tmp_path):
    # Datasets that name the column 'labels' (beans, ...) lost their labels
    # without a word: training failed with transformers' "did not return a
    # loss", and an evaluation split skipped the protection metrics.
    from transformers import TrainingArguments

    from hf_fixtures import tiny_vit
    from kp_plugin.hf import KeyedTrainer, KeyProtectionCallback

    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=4)
    for name in ("labels", "label_ids"):
        renamed = raw.rename_column("label", name)
        assert KeyedImageCollator(processor)([renamed[i] for i in range(4)])["labels"].tolist() == raw["label"]
        assert renamed.with_transform(KeyedExampleTransform(processor))[0]["labels"] == raw["label"][0]
    given = KeyedImageCollator(processor, label_column="digit")  # a column named is the one read
    assert given([{"image": raw[0]["image"], "label": 3, "digit": 1}])["labels"].tolist() == [1]
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=1, per_device_train_batch_size=4,
                             per_device_eval_batch_size=4, eval_strategy="steps", eval_steps=1, save_strategy="no")
    trainer = KeyedTrainer(model=tiny_vit(), args=args, train_dataset=raw.rename_column("label", "labels"),
                           eval_dataset=raw.rename_column("label", "labels"),
                           data_collator=KeyedImageCollator(processor),
                           callbacks=[KeyProtectionCallback(key, wrong_keys=1)])
    trainer.train()
    assert any("eval_protection_margin" in entry for entry in trainer.state.log_history)


def test_an_unlabeled_split_gives_batches_without_labels(key, tmp_path):
    # predict() on a test split without labels: the collator blamed Trainer's
    # remove_unused_columns (and told a KeyedTrainer user to use KeyedTrainer).
    from transformers import TrainingArguments

    from hf_fixtures import tiny_vit
    from kp_plugin.hf import KeyedTrainer

    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=4).remove_columns("label")
    batch = KeyedImageCollator(processor)([raw[i] for i in range(4)])
    assert set(batch) == {"pixel_values"}
    transformed = raw.with_transform(KeyedExampleTransform(processor))
    assert set(transformed[0]) == {"pixel_values"}
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=2)
    trainer = KeyedTrainer(model=tiny_vit(), args=args, data_collator=KeyedImageCollator(processor))
    result = trainer.predict(raw)
    assert result.predictions.shape == (4, 10) and result.label_ids is None
    with pytest.raises(Exception, match="of the 2 examples in this batch have no 'label'"):
        KeyedImageCollator(processor)([{"image": raw[0]["image"], "label": 1}, {"image": raw[1]["image"]}])


def test_keyed_batches_are_bit_for_bit_the_processors_output(key):
    # The helpers went through [0, 1] floats, the processor keys 8-bit images
    # as bytes: training batches differed from what a pipeline is served in
    # the last bit of most values.
    processor = KeyedImageProcessor(vit_processor(), key)
    raw = digits_dataset("test", size=4)
    expected = processor(list(raw["image"]), return_tensors="pt")["pixel_values"]
    got = KeyedImageCollator(processor)([raw[i] for i in range(4)])["pixel_values"]
    assert torch.equal(got, expected)
    assert torch.equal(torch.stack(list(KeyedExampleTransform(processor)(raw[:4])["pixel_values"])), expected)
