"""Recipe: protect a transformers image classifier with a secret key.

1. Fine-tune with ``Trainer`` (``KeyedTrainer``), the keyed image processor
   and ``KeyProtectionCallback`` (the protection margin at every evaluation).
2. Save the model (plain transformers weights: useless without the key) and
   the keyed processor (no key in it).
3. Classify through ``pipeline("image-classification")`` with the right key
   and with a wrong key.

Offline (default): a small ViT config with random init on sklearn's digits.
With internet: ``--model google/vit-base-patch16-224-in21k`` (any checkpoint
id; its own image processor is wrapped).

Single process:
    python integrations/transformers/finetune_keyed.py --output-dir out/
Several processes / GPUs / nodes (every rank reads the same key file):
    torchrun --nproc_per_node 2 integrations/transformers/finetune_keyed.py --output-dir out/ --key-file owner.key
    accelerate launch --multi_gpu --num_processes 2 integrations/transformers/finetune_keyed.py --output-dir out/ --key-file owner.key
Create the key once beforehand (``python -c "from kp_plugin import SecretKey;
SecretKey.generate(block_size=4).save('owner.key')"``) so all ranks share it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

from kp_plugin import SecretKey
from kp_plugin.hf import KeyedImageCollator, KeyedImageProcessor, KeyedTrainer, KeyProtectionCallback


def digits(split: str, limit: Optional[int] = None):
    """sklearn's handwritten digits as a ``datasets.Dataset`` (image, label)."""
    import datasets
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = (raw.images * (255.0 / 16.0)).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(raw.target))
    index = order[:1400] if split == "train" else order[1400:]
    index = index[:limit] if limit else index
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(d) for d in range(10)])})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(np.repeat(images[i][:, :, None], 3, axis=2)) for i in index],
         "label": [int(raw.target[i]) for i in index]},
        features=features,
    )


def build(model_id: Optional[str], num_labels: int, image_size: int, block_size: int):
    """The base model and its base image processor."""
    labels = {i: str(i) for i in range(num_labels)}
    if model_id:
        processor = AutoImageProcessor.from_pretrained(model_id)
        model = AutoModelForImageClassification.from_pretrained(
            model_id, num_labels=num_labels, id2label=labels, label2id={v: k for k, v in labels.items()},
            ignore_mismatched_sizes=True)
        return model, processor
    config = ViTConfig(image_size=image_size, patch_size=block_size, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=2, intermediate_size=128, num_labels=num_labels, id2label=labels,
                       label2id={v: k for k, v in labels.items()})
    return ViTForImageClassification(config), ViTImageProcessor(size={"height": image_size, "width": image_size})


def accuracy(classify, dataset) -> float:
    predictions = classify(list(dataset["image"]), top_k=1, batch_size=64)
    return sum(int(p[0]["label"]) == y for p, y in zip(predictions, dataset["label"])) / len(dataset)


def run(output_dir: str, *, model_id: Optional[str] = None, key_file: Optional[str] = None, epochs: float = 8,
        image_size: int = 16, block_size: int = 4, train_limit: Optional[int] = None,
        test_limit: Optional[int] = None, wrong_keys: int = 4) -> dict:
    """Fine-tune, save, and compare right-key and wrong-key pipelines.
    Returns the accuracies (also written to ``output_dir/results.json``)."""
    out = Path(output_dir)
    if key_file and Path(key_file).exists():
        key = SecretKey.load(key_file)
        if key.block_size != block_size:  # the key decides: the offline ViT's patch is one block
            print(f"note: {key_file} has block size {key.block_size}; using it instead of --block-size {block_size}")
            block_size = key.block_size
    else:
        key = SecretKey.generate(block_size=block_size)
        if key_file:
            key.save(key_file)  # keep the key away from output_dir: it is never published
    torch.manual_seed(0)
    model, base_processor = build(model_id, 10, image_size, block_size)
    processor = KeyedImageProcessor(base_processor, key)
    train, test = digits("train", train_limit), digits("test", test_limit)

    args = TrainingArguments(
        str(out / "checkpoints"), num_train_epochs=epochs, per_device_train_batch_size=32,
        per_device_eval_batch_size=128, learning_rate=3e-3 if not model_id else 5e-5, warmup_steps=20,
        eval_strategy="epoch", save_strategy="no", logging_steps=50, report_to=[], seed=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = KeyedTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=test,
        data_collator=KeyedImageCollator(processor), processing_class=processor,
        callbacks=[KeyProtectionCallback(key, wrong_keys=wrong_keys, min_margin=0.0)],
    )
    trainer.train()
    results = {"protection": trainer.evaluate()}
    if not trainer.is_world_process_zero():
        return results

    # Publishable: plain transformers weights + the keyed processor's settings; no key anywhere.
    trainer.save_model(str(out / "model"))
    model = AutoModelForImageClassification.from_pretrained(out / "model")
    right = KeyedImageProcessor.from_pretrained(out / "model", key=key)
    wrong = KeyedImageProcessor.from_pretrained(out / "model", key=SecretKey.generate_like(key), allow_wrong_key=True)
    results["right_key_accuracy"] = accuracy(pipeline("image-classification", model=model, image_processor=right), test)
    results["wrong_key_accuracy"] = accuracy(pipeline("image-classification", model=model, image_processor=wrong), test)
    results["chance"] = 0.1
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="example: python integrations/transformers/finetune_keyed.py "
                                            "--output-dir out/ --epochs 8")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", default=None, help="checkpoint id (needs internet); default: tiny ViT config")
    parser.add_argument("--key-file", default=None, help="key file shared by all ranks (created if missing)")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=4)
    args = parser.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (args.key_file and Path(args.key_file).exists()):
        parser.error("with several processes, create the key file first and pass --key-file (all ranks read it)")
    results = run(args.output_dir, model_id=args.model, key_file=args.key_file, epochs=args.epochs,
                  image_size=args.image_size, block_size=args.block_size)
    if "right_key_accuracy" in results:
        print(f"pipeline accuracy: right key {results['right_key_accuracy']:.3f}, "
              f"wrong key {results['wrong_key_accuracy']:.3f}, chance {results['chance']:.3f}")
    return 0


if __name__ == "__main__":
    from kp_plugin.cli import run_script

    raise SystemExit(run_script(main, "finetune_keyed.py"))
