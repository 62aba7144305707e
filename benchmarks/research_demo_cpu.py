"""The demo's recipe on this machine's CPU: the unprotected and the protected
fine-tune with the same schedule, then 100 wrong keys and plain images.

    .venv/bin/python benchmarks/research_demo_cpu.py --size 32 --block-size 4 --epochs 8 --out demo_cpu.json

Prints one JSON object (accuracies and seconds per phase, seconds per epoch).
``--report A.json B.json`` writes those runs as a table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def write_report(paths: list) -> None:
    """Write the runs in ``paths`` (JSON from --out) as one table."""
    from benchmarks._report import machine_description, write_section

    lines = ["| recipe | epochs | with key | unprotected | wrong keys mean | worst of 100 | plain "
             "| s/epoch protected | s/epoch unprotected | s for 100 wrong keys |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        recipe = f"{r['dataset']} {r['size']}x{r['size']}, {r['scheme']} M={r['block_size']}, {r['objective']}"
        per_epoch = r["protected_seconds"] / r["epochs"]
        base = r.get("baseline_seconds")
        base_epoch = "–" if base is None else f"{base / r['epochs']:.0f}"
        lines.append(
            f"| {recipe} | {r['epochs']} | {_pct(r['key_accuracy'])} | {_pct(r.get('unprotected_accuracy'))} "
            f"| {_pct(r['wrong_key_accuracy_mean'])} | {_pct(r['wrong_key_accuracy_max'])} "
            f"| {_pct(r['plain_accuracy'])} | {per_epoch:.0f} (min {min(r['protected_epoch_seconds']):.0f}) "
            f"| {base_epoch} | {r['evaluate_seconds']:.0f} |"
        )
    write_section(
        "recipes-demo-cpu",
        "## The demo's setting on CPU\n\nMeasured with `benchmarks/research_demo_cpu.py` (one thread, on a "
        f"machine shared with five other jobs, load 3-9 on its 2 cores, so the seconds are upper bounds): "
        f"{re.sub(r' [(][0-9]+ threads[)]', '', machine_description())}. One run per row, each with its own random "
        "key; the unprotected fine-tune (same schedule) was run once, with the first row.\n\n" + "\n".join(lines),
    )


def write_tail_report(paths: list) -> None:
    """Write runs made with ``--wrong-keys 500`` as the table of the tail
    (section ``recipes-tail``): the worst wrong key of each group of 100."""
    from benchmarks._report import machine_description, write_section

    lines = ["| data | scheme | M | objective | epochs | seed | with key | unprotected | wrong keys mean "
             "| worst of each 100 | plain | s/epoch |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        r = json.loads(Path(path).read_text())
        worst = ", ".join(_pct(v) for v in r.get("worst_of_each_100") or [r["wrong_key_accuracy_max"]])
        lr_note = "" if r.get("lr") in (None, 2e-3) else f", lr {r['lr']:g}"
        lr_note += ", no augmentation" if r.get("augment") is False else ""
        # Settings off their defaults (a run of the dropout study is not a
        # default-recipe row).
        for name, label in (("drop_rate", "dropout"), ("drop_path_rate", "drop path"), ("ema_decay", "EMA"),
                            ("mixup_alpha", "mixup"), ("cutmix_alpha", "cutmix"),
                            ("label_smoothing", "label smoothing")):
            if r.get(name):
                lr_note += f", {label} {r[name]:g}"
        if r.get("stem_lr_scale") not in (None, 1.0):
            lr_note += f", stem lr x{r['stem_lr_scale']:g}"
        lines.append(
            f"| {r['dataset']} {r['size']}x{r['size']} | {r['scheme']} | {r['block_size']} | {r['objective']}{lr_note} "
            f"| {r['epochs']} | {r.get('seed', '–')} | {_pct(r['key_accuracy'])} "
            f"| {_pct(r.get('unprotected_accuracy'))} | {_pct(r['wrong_key_accuracy_mean'])} | {worst} "
            f"| {_pct(r['plain_accuracy'])} | {r['protected_seconds'] / r['epochs']:.0f} |"
        )
    write_section(
        "recipes-tail",
        "## The tail of wrong keys at the demo setting (500 wrong keys per model)\n\n"
        "EfficientNet-Lite0 from ImageNet, each run its own random key; digits evaluated under "
        "500 reproducible wrong keys (seed 0; the first 100 are the ones `kp evaluate` uses); the table gives the "
        "worst wrong key of each group of 100, so one model shows how far the demo's 'worst of 100' swings. "
        "The photos rows (the default recipe on the second dataset, chance 12.5%) used 200 wrong keys (seed 0, "
        "2 threads, beside a CI run) or 100 (seeds 1-2, one thread each, side by side). "
        "The block-size-2 rows (M = 2, 100 wrong keys each, one thread, two or three side by side) repeat seeds of "
        "the M = 4 rows (photos seed 3 ran at both sizes); a photos row that ran with `--skip-baseline` has its "
        "unprotected fine-tune in the other row of the same seed and epochs (it does not depend on the key). "
        "Command: `benchmarks/research_demo_cpu.py --size 32 --block-size M --threads 1 --wrong-keys 500 "
        "--scheme S --epochs E --wrong-weight W --plain-weight P [--suppression-fraction F] --seed N` "
        "(two runs side by side at one thread each, so s/epoch is an upper bound). Rows with `+distill` "
        "(`--distill-weight 1`: the unprotected fine-tune is trained first and is the teacher) and the 32-epoch "
        "digits rows ran after `fit` switched to channels-last (about 2.2x faster steps at one thread), so their "
        "s/epoch are not comparable with the older rows. Machine: "
        f"{re.sub(r' [(][0-9]+ threads[)]', '', machine_description())}.\n\n" + "\n".join(lines),
    )


def _curves(run) -> dict:
    """Per-epoch training accuracy (augmented batches) and test accuracy."""
    return {"train_accuracy": [round(h["accuracy"], 4) for h in run.history],
            "test_accuracy": [round(h["eval_accuracy"], 4) for h in run.history]}


def _regularization(args) -> dict:
    """timm's dropout before the classifier and stochastic depth, both fine-tunes."""
    return {"drop_rate": args.drop_rate, "drop_path_rate": args.drop_path_rate}


def _train_baseline(args, train, test, config, result):
    """The unprotected fine-tune with the same recipe (cross-entropy only)."""
    import torch

    from kp_plugin.pretrained import load_efficientnet_lite0
    from kp_plugin.train import evaluate_accuracy, fit, plain_model

    torch.manual_seed(args.seed)
    baseline = plain_model(load_efficientnet_lite0(len(train.classes), **_regularization(args)))
    run = fit(baseline, train, config=config, device="cpu", progress=False, eval_set=test if args.curves else None)
    result["baseline_seconds"] = run.seconds
    if args.curves:
        result["baseline_curves"] = _curves(run)
    result["unprotected_accuracy"] = evaluate_accuracy(baseline, test)
    print(json.dumps(result), flush=True)
    return baseline


def main(argv=None) -> int:
    import torch

    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--report":
        write_report(argv[1:])
        return 0
    if argv and argv[0] == "--tail-report":
        write_tail_report(argv[1:])
        return 0

    from kp_plugin import SecretKey, wrap_model
    from kp_plugin.data import load_dataset
    from kp_plugin.evaluate import evaluate_protection
    from kp_plugin.keys import DEFAULT_SCHEME
    from kp_plugin.objectives import ProtectionObjective
    from kp_plugin.pretrained import load_efficientnet_lite0
    from kp_plugin.train import DEMO_BLOCK_SIZE, TrainConfig, fit

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=DEMO_BLOCK_SIZE)
    parser.add_argument("--scheme", default="+".join(DEFAULT_SCHEME))
    parser.add_argument("--wrong-weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--wrong-keys-per-step", type=int, default=1)
    parser.add_argument("--plain-weight", type=float, default=0.0)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: TrainConfig's)")
    parser.add_argument("--wrong-key-groups", type=int, default=1)
    parser.add_argument("--suppression-fraction", type=float, default=1.0)
    parser.add_argument("--near-weight", type=float, default=0.0)
    parser.add_argument("--hard-weight", type=float, default=0.0)
    parser.add_argument("--hard-every", type=int, default=10)
    parser.add_argument("--hard-candidates", type=int, default=16)
    parser.add_argument("--wrong-keys", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--no-augment", action="store_true", help="train without the translation/scale augmentation")
    parser.add_argument("--distill-weight", type=float, default=0.0,
                        help="distil from the unprotected fine-tune (trained first, same recipe)")
    parser.add_argument("--distill-temperature", type=float, default=2.0)
    parser.add_argument("--stem-lr-scale", type=float, default=1.0,
                        help="learning-rate multiplier of the first convolution (TrainConfig.stem_lr_scale)")
    parser.add_argument("--label-smoothing", type=float, default=0.0,
                        help="label smoothing of the cross-entropy (both fine-tunes)")
    parser.add_argument("--ema-decay", type=float, default=None,
                        help="average the weights over training (TrainConfig.ema_decay), both fine-tunes")
    parser.add_argument("--drop-rate", type=float, default=0.0,
                        help="dropout before the classifier (timm's drop_rate), both fine-tunes")
    parser.add_argument("--drop-path-rate", type=float, default=0.0,
                        help="stochastic depth (timm's drop_path_rate), both fine-tunes")
    parser.add_argument("--curves", action="store_true",
                        help="record training and test accuracy after every epoch (both fine-tunes)")
    parser.add_argument("--mixup", type=float, default=0.0, help="TrainConfig.mixup_alpha, both fine-tunes")
    parser.add_argument("--cutmix", type=float, default=0.0, help="TrainConfig.cutmix_alpha, both fine-tunes")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    train = load_dataset(args.dataset, split="train", image_size=args.size)
    test = load_dataset(args.dataset, split="test", image_size=args.size)
    key = SecretKey.generate(block_size=args.block_size, scheme=args.scheme)
    config = TrainConfig(epochs=args.epochs, seed=args.seed, augment=not args.no_augment,
                         stem_lr_scale=args.stem_lr_scale, ema_decay=args.ema_decay,
                         mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                         **({} if args.lr is None else {"lr": args.lr}),
                         objective=ProtectionObjective(wrong_key_weight=args.wrong_weight, plain_weight=args.plain_weight,
                                                   wrong_keys_per_step=args.wrong_keys_per_step,
                                                   wrong_key_groups=args.wrong_key_groups,
                                                   suppression_fraction=args.suppression_fraction,
                                                   near_key_weight=args.near_weight, hard_key_weight=args.hard_weight,
                                                   hard_key_every=args.hard_every,
                                                   hard_key_candidates=args.hard_candidates,
                                                   distill_weight=args.distill_weight,
                                                   distill_temperature=args.distill_temperature,
                                                   label_smoothing=args.label_smoothing))
    result = {"dataset": args.dataset, "size": args.size, "block_size": args.block_size, "scheme": key.scheme_name,
              "objective": config.resolved_objective.describe(), "epochs": args.epochs,
              "wrong_keys_per_step": args.wrong_keys_per_step,
              "threads": args.threads, "device": "cpu", "seed": args.seed, "lr": config.lr,
              "augment": config.augment, "stem_lr_scale": config.stem_lr_scale,
              "ema_decay": config.ema_decay, "mixup_alpha": config.mixup_alpha,
              "cutmix_alpha": config.cutmix_alpha, **_regularization(args)}

    baseline = None
    if args.distill_weight:
        if args.skip_baseline:
            parser.error("--distill-weight needs the baseline (the teacher); drop --skip-baseline")
        baseline = _train_baseline(args, train, test, config, result)
    torch.manual_seed(args.seed)
    protected = wrap_model(load_efficientnet_lite0(len(train.classes), **_regularization(args)), key)
    run = fit(protected, train, config=config, device="cpu", progress=False, teacher=baseline,
              eval_set=test if args.curves else None)
    result["protected_seconds"] = run.seconds
    if args.curves:
        result["protected_curves"] = _curves(run)
    result["protected_epoch_seconds"] = [round(h["seconds"], 1) for h in run.history]
    print(json.dumps(result), flush=True)
    started = time.perf_counter()
    report = evaluate_protection(protected, test, num_wrong_keys=args.wrong_keys, progress=False)
    result["evaluate_seconds"] = time.perf_counter() - started
    result.update(key_accuracy=report.key_accuracy, wrong_key_accuracy_mean=report.wrong_key_accuracy_mean,
                  wrong_key_accuracy_max=report.wrong_key_accuracy_max, plain_accuracy=report.plain_accuracy,
                  num_wrong_keys=report.num_wrong_keys, wrong_key_accuracies=list(report.wrong_key_accuracies))
    groups = [report.wrong_key_accuracies[i:i + 100] for i in range(0, len(report.wrong_key_accuracies), 100)]
    result["worst_of_each_100"] = [max(g) for g in groups if len(g) == 100]
    print(json.dumps(result), flush=True)
    if not args.skip_baseline and baseline is None:
        _train_baseline(args, train, test, config, result)
    print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
