"""Fine-tune any timm model on an ImageFolder, protected with a secret key,
using timm's own data pipeline, optimizer and scheduler.

The one change from a plain timm recipe: the image transform stops before
``Normalize`` (``kp_plugin.timm.create_transform``), and the protected model
applies the keyed transform and then the model's normalization inside its
forward. Everything else is timm: ``timm.data.ImageDataset``,
``create_transform`` (random resized crop, flip, colour jitter),
``create_optimizer_v2``, ``create_scheduler_v2``.

    data/
      train/<class>/*.jpg
      val/<class>/*.jpg        (optional, or test/; used for the protection report)

Example:
    kp keygen --block-size 16 -o owner.key
    python integrations/timm/train_imagefolder.py --data data/ --model resnet50 --pretrained \\
        --key owner.key --epochs 10 --output out/

Public API only: kp_plugin, kp_plugin.timm, kp_plugin.objectives, kp_plugin.evaluate.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import timm.data
import timm.optim
import timm.scheduler
import torch

from kp_plugin import SecretKey, save_protected
from kp_plugin.evaluate import evaluate_protection, format_summary, write_report
from kp_plugin.objectives import DEFAULT_OBJECTIVE, ProtectionObjective
from kp_plugin.timm import create_protected_model, create_transform


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True,
                        help="ImageFolder root (with train/ and optional val/ or test/)")
    parser.add_argument("--model", default="resnet18", help="any timm model name")
    parser.add_argument("--pretrained", action="store_true", help="start from timm's pre-trained weights")
    parser.add_argument("--key", required=True, help="key file from `kp keygen`")
    parser.add_argument("--output", required=True, help="directory for the protected checkpoint")
    parser.add_argument("--image-size", type=int, default=None, help="default: the model's pretrained_cfg size")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--wrong-key-weight", type=float, default=None,
                        help="wrong-key suppression weight (default: kp-plugin's measured default)")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    parser.add_argument("--wrong-keys", type=int, default=20, help="wrong keys in the final report")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    key = SecretKey.load(args.key)
    root = Path(args.data)
    if not root.is_dir():
        raise SystemExit(f"error: --data {root} is not a folder; pass an ImageFolder root (train/<class>/*.jpg)")
    train_root = root / "train" if (root / "train").is_dir() else root
    # The held-out split under any name kp protect reads (timm's val/ first).
    val_root = next((root / name for name in ("val", "validation", "valid", "test") if (root / name).is_dir()), None)

    # Hidden folders (.ipynb_checkpoints, .git) are not classes, as in kp protect.
    classes = sorted(p.name for p in train_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:  # a folder of images itself (data/train/cat) made a model of 0 classes, trained and saved
        raise SystemExit(f"error: {train_root} has {len(classes)} class folder(s); an ImageFolder holds one folder "
                         f"of images per class ({train_root}/<class>/*.jpg), at least two of them")
    model = create_protected_model(args.model, key, pretrained=args.pretrained, num_classes=len(classes),
                                   input_size=args.image_size).to(device)

    # timm's pipeline, minus Normalize: it yields uint8 tensors; the model keys, then normalizes.
    # One class map for both splits: per-folder numbering would shift the
    # validation labels wherever val/ lacks a class.
    class_map = {name: index for index, name in enumerate(classes)}
    try:
        train_set = timm.data.ImageDataset(str(train_root), class_map=class_map,
                                           transform=create_transform(model, is_training=True))
    except RuntimeError as exc:  # timm: "Found 0 images in subfolders of ..."
        raise SystemExit(f"error: {exc}; put the images in {train_root}/<class>/") from None
    # drop_last, as timm's own training does: a last batch of one image
    # stops batch norm ("Expected more than 1 value per channel").
    if len(train_set) < 2:
        raise SystemExit(f"error: {train_root} holds {len(train_set)} training image(s); batch norm needs batches of "
                         "at least 2 images: add images")
    batch_size = min(args.batch_size, len(train_set))
    if batch_size < args.batch_size:
        print(f"note: {len(train_set)} training images, fewer than --batch-size {args.batch_size}: "
              f"training in batches of {batch_size}", flush=True)
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)

    optimizer = timm.optim.create_optimizer_v2(model, opt="adamw", lr=args.lr, weight_decay=args.weight_decay)
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=args.epochs, warmup_epochs=args.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=len(loader),
    )
    objective = DEFAULT_OBJECTIVE if args.wrong_key_weight is None else ProtectionObjective(
        wrong_key_weight=args.wrong_key_weight)

    step = 0
    for epoch in range(args.epochs):
        model.train()
        start, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for images, labels in loader:
            images01 = images.to(device).float().div_(255)  # [0, 1], before the key
            labels = labels.to(device)
            logits = model(images01)
            loss, _ = objective(model, images01, labels, logits)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scheduler.step_update(num_updates=step)
            seen += labels.numel()
            correct += int((logits.argmax(-1) == labels).sum())
            loss_sum += float(loss.detach()) * labels.numel()
            if args.max_steps and step >= args.max_steps:
                break
        print(f"epoch {epoch + 1}: loss {loss_sum / max(seen, 1):.3f}, train accuracy "
              f"{100 * correct / max(seen, 1):.1f}% ({seen} images, {time.perf_counter() - start:.0f}s)", flush=True)
        if args.max_steps and step >= args.max_steps:
            break

    save_protected(model, args.output, metadata={"dataset": str(root), "epochs": epoch + 1})
    print(f"saved the protected model to {args.output} (no key inside)")
    if val_root is not None:
        val_set = timm.data.ImageDataset(str(val_root), class_map=class_map,
                                         transform=create_transform(model, is_training=False))
        report = evaluate_protection(model, val_set, num_wrong_keys=args.wrong_keys, dataset_name=str(val_root),
                                     batch_size=args.batch_size)
        write_report(report, Path(args.output) / "report")
        print(format_summary(report))
    return 0


if __name__ == "__main__":
    from kp_plugin.cli import run_script

    sys.exit(run_script(main, "train_imagefolder.py"))
