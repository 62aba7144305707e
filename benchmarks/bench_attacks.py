"""Attack measurements for docs/security.md and the "attacks" section of
docs/benchmarks.md.

Two settings:

- ``demo``: the demo model (EfficientNet-Lite0, ImageNet weights, digits at
  the demo size, the library's default scheme, objective, block size and
  epochs), trained with ``kp protect`` unless ``--demo-dir`` points at one.
- ``vit``: a small timm ViT (patch size = block size = 8, 32x32 digits).
  Its "public base" is the same ViT pre-trained from scratch on the
  embedded colour photographs (another task), since no pre-trained ViT is
  available offline. The owner fine-tunes it on digits with the key (the
  default recipe). For the zero-training adaptation, the owner's plain
  fine-tune of the public base is adapted to the key.

Each stage saves its results as JSON under ``--workdir`` (so the slow parts
are not repeated) and ``--write`` turns whatever exists into the section.

Run (CPU, a few threads):
    python benchmarks/bench_attacks.py --stage vit --write
    python benchmarks/bench_attacks.py --stage demo --random-keys 1000 --write
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine_description, write_section  # noqa: E402

from kp_plugin import SecretKey, load_protected, save_protected, wrap_model  # noqa: E402
from kp_plugin.adapt import adapt_patch_embedding  # noqa: E402
from kp_plugin.attacks.report import write_attack_report  # noqa: E402
from kp_plugin.attacks.suite import BUDGETS, Budget, run_attacks  # noqa: E402
from kp_plugin.attacks.weight_matching import weight_matching_attack  # noqa: E402
from kp_plugin.attacks.wrong_keys import wrong_key_attack  # noqa: E402
from kp_plugin.data import load_dataset  # noqa: E402
from kp_plugin.keys import DEFAULT_SCHEME  # noqa: E402

VIT_SIZE, VIT_PATCH = 32, 8


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _budget(args) -> Budget:
    base = BUDGETS["standard"]
    return Budget(
        wrong_keys=args.wrong_keys, random_keys=args.random_keys, search_images=args.search_images,
        swap_proposals=args.swaps, partial_repeats=1, partial_fractions=base.partial_fractions,
        estimation_steps=args.estimation_steps, finetune_fractions=base.finetune_fractions,
        finetune_epochs=args.finetune_epochs, finetune_min_steps=args.finetune_min_steps,
        finetune_repeats=args.finetune_repeats,
        random_search_seconds=args.random_search_seconds,
    )


# ---------------------------------------------------------------- demo model
def stage_demo(args) -> None:
    from kp_plugin.cli import main as kp
    from kp_plugin.pretrained import load_efficientnet_lite0
    from kp_plugin.timm import load_protected_timm
    from kp_plugin.train import DEMO_BLOCK_SIZE, DEMO_EPOCHS

    work = Path(args.workdir) / "demo"
    suffix = "" if args.demo_scheme is None else f"-{args.tag}"
    directory = Path(args.demo_dir) if args.demo_dir else work / f"model{suffix}"
    key_file = Path(args.demo_key) if args.demo_key else work / f"owner{suffix}.key"
    if not (directory / "model.safetensors").exists():
        work.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            scheme = ["--scheme", args.demo_scheme] if args.demo_scheme else []
            assert kp(["keygen", "--block-size", str(DEMO_BLOCK_SIZE), *scheme, "-o", str(key_file)]) == 0
        _log(f"training the demo model ({DEMO_EPOCHS} epochs) into {directory}")
        start = time.perf_counter()
        code = kp(["protect", "--model", "tf_efficientnet_lite0", "--data", "digits", "--key", str(key_file),
                   "-o", str(directory), "--epochs", str(DEMO_EPOCHS), "--quiet"])
        assert code == 0, code
        _log(f"trained in {time.perf_counter() - start:.0f} s")
    key = SecretKey.load(key_file)
    # channels-last: the layout the CPU convolutions run fastest in (the attacks do not depend on it)
    model = load_protected_timm(directory, key).eval().to(memory_format=torch.channels_last)
    size = model.keyed.input_size[1] if model.keyed.input_size else 64
    test_set = load_dataset("digits", split="test", image_size=size)
    train_set = load_dataset("digits", split="train", image_size=size)
    _log(f"demo model: scheme {key.scheme_name}, block {key.block_size}, {size}px; attacks {args.attacks}")
    report = run_attacks(
        model, test_set, train_set=train_set, public_base=lambda: load_efficientnet_lite0(num_classes=10),
        attacks=args.attacks, budget=_budget(args), seed=0, progress=not args.quiet,
        meta={"model": "tf_efficientnet_lite0 (ImageNet weights), kp protect defaults", "dataset": f"digits {size}px",
              "machine": machine_description()},
    )
    write_attack_report(report, work / f"attack-{args.tag}")
    _save_json(work / f"summary-{args.tag}.json", report.summary())
    _log(f"demo attacks done: {report.seconds}")


# ---------------------------------------------------------------- ViT setting
def _vit(num_classes: int):
    import timm

    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=VIT_SIZE, patch_size=VIT_PATCH,
                            embed_dim=96, depth=4, num_heads=3, num_classes=num_classes)
    net.pretrained_cfg = dict(net.pretrained_cfg, input_size=(3, VIT_SIZE, VIT_SIZE), mean=(0.5,) * 3, std=(0.5,) * 3)
    return net


def stage_vit(args) -> None:
    from kp_plugin.train import TrainConfig, evaluate_accuracy, fit, plain_model

    work = Path(args.workdir) / "vit"
    work.mkdir(parents=True, exist_ok=True)
    photos = load_dataset("photos", split="train", image_size=VIT_SIZE)
    train = load_dataset("digits", split="train", image_size=VIT_SIZE)
    test = load_dataset("digits", split="test", image_size=VIT_SIZE)
    facts: dict = {"machine": machine_description()}

    public_file = work / "public_base.pt"
    public = _vit(len(photos.classes))
    if public_file.exists():
        public.load_state_dict(torch.load(public_file))
    else:
        _log("pre-training the public ViT base on photos")
        photos_test = load_dataset("photos", split="test", image_size=VIT_SIZE)
        fit(plain_model(public), photos, config=TrainConfig(epochs=args.vit_pretrain_epochs, lr=1e-3),
            progress=not args.quiet)
        facts["public_base_photos_accuracy"] = evaluate_accuracy(plain_model(public), photos_test)
        torch.save(public.state_dict(), public_file)

    def public_for_digits():
        net = copy.deepcopy(public)
        net.reset_classifier(len(train.classes))
        return net

    config = TrainConfig(epochs=args.vit_epochs, lr=1e-3)
    suffix = "" if args.vit_scheme is None else f"-{args.tag}"
    key_file = work / f"owner{suffix}.key"
    scheme = args.vit_scheme or DEFAULT_SCHEME
    key = SecretKey.load(key_file) if key_file.exists() else SecretKey.generate(block_size=VIT_PATCH, scheme=scheme)
    if not key_file.exists():
        key.save(key_file)
    protected_dir = work / f"protected{suffix}"
    if (protected_dir / "model.safetensors").exists():
        protected = load_protected(protected_dir, public_for_digits(), key)
    else:
        _log(f"owner fine-tunes the public ViT on digits with the key ({key.scheme_name})")
        protected = wrap_model(public_for_digits(), key)
        fit(protected, train, config=config, progress=not args.quiet)
        save_protected(protected, protected_dir)
    protected.eval()

    # The owner's plain fine-tune (no key), then zero-training adaptation.
    plain_file = work / "owner_plain.pt"
    owner_plain = public_for_digits()
    if plain_file.exists():
        owner_plain.load_state_dict(torch.load(plain_file))
    else:
        _log("owner's plain fine-tune (for the unprotected baseline and the adaptation)")
        fit(plain_model(owner_plain), train, config=config, progress=not args.quiet)
        torch.save(owner_plain.state_dict(), plain_file)
    owner_plain.eval()
    facts["unprotected_accuracy"] = evaluate_accuracy(plain_model(owner_plain), test)

    adapt_key = key if all(s in ("shuffle", "np", "scramble") for s in key.scheme) else key.replace(scheme="shuffle+np")
    adapted = adapt_patch_embedding(owner_plain, adapt_key).eval()
    images = torch.stack([test[i][0] for i in range(64)])
    with torch.no_grad():
        diff = (adapted(images) - plain_model(owner_plain)(images)).abs().max().item()
    facts["adapt"] = {
        "scheme": adapt_key.scheme_name,
        "max_logit_difference": diff,
        "accuracy": evaluate_accuracy(adapted, test),
        "wrong_keys": wrong_key_attack(adapted, test, num_keys=20, progress=False).summary(),
        "weight_matching_vs_owner_plain": weight_matching_attack(adapted, owner_plain, test).summary(),
        "weight_matching_vs_public_base": weight_matching_attack(adapted, public_for_digits(), test).summary(),
    }
    _log(f"adaptation: max |logit diff| {diff:.2e}")

    report = run_attacks(
        protected, test, train_set=train, public_base=public_for_digits, attacks=args.attacks, budget=_budget(args),
        finetune_config=TrainConfig(lr=1e-3), seed=0, progress=not args.quiet,
        meta={"model": f"ViT (timm vit_tiny, patch {VIT_PATCH}, dim 96, depth 4), public base pre-trained on photos",
              "dataset": f"digits {VIT_SIZE}px", "machine": machine_description()},
    )
    write_attack_report(report, work / f"attack-{args.tag}")
    summary = report.summary()
    summary["facts"] = facts
    _save_json(work / f"summary-{args.tag}.json", summary)
    _log(f"ViT attacks done: {report.seconds}")


# ---------------------------------------------------------------- section
def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _rows(summary: dict) -> list:
    a = summary["attacks"]
    rows = []
    if "wrong_keys" in a:
        w = a["wrong_keys"]
        rows += [
            ("accuracy with the key", _pct(w["key_accuracy"])),
            (f"mean / max over {w['num_wrong_keys']} wrong keys (chance {_pct(w['chance'])})",
             f"{_pct(w['wrong_key_accuracy_mean'])} / {_pct(w['wrong_key_accuracy_max'])}"),
            ("least-likely readout, mean / max", f"{_pct(w['least_likely_accuracy_mean'])} / "
                                                 f"{_pct(w['least_likely_accuracy_max'])}"),
            ("plain images (top-1 / least-likely)", f"{_pct(w['plain_accuracy'])} / "
                                                    f"{_pct(w['plain_least_likely_accuracy'])}"),
        ]
    if "random_search" in a:
        s = a["random_search"]
        rows.append((f"best of {s['num_keys']} random keys ({s['search_images']}-image batch): batch / held out",
                     f"{_pct(s['best_search_accuracy'])} / {_pct(s['best_holdout_accuracy'])}"))
    if "heuristic_search" in a:
        h = a["heuristic_search"]
        rows.append((f"swap search, {h['budget']} proposals: held-out acc / key recovered",
                     f"{_pct(h['final_holdout_accuracy'])} / {_pct(h['recovered_fraction'])}"))
    if "weight_matching" in a:
        m = a["weight_matching"]
        rows.append((f"weight matching ({m['layer_kind']}): key recovered / accuracy",
                     f"{_pct(m['recovered_fraction'])} / {_pct(m['accuracy'])}"))
    if "key_estimation" in a:
        e = a["key_estimation"]
        rows.append((f"key estimation ({e['train_images']} images, {e['steps']} steps): recovered / accuracy",
                     f"{_pct(e['recovered_fraction'])} / {_pct(e['accuracy'])}"))
    if "finetune" in a:
        for r in a["finetune"]["rows"]:
            draws = len(r.get("protected_runs") or []) or 1
            per_draw = ""
            if draws > 1:
                gains = [p - b for p, b in zip(r["protected_runs"], r["base_runs"])]
                per_draw = "; per draw " + ", ".join(f"{100 * g:+.1f}" for g in gains)
            rows.append((f"fine-tune with {r['fraction']:.0%} data: stolen vs public base"
                         + (f" (mean of {draws} draws)" if draws > 1 else ""),
                         f"{_pct(r['protected_accuracy'])} vs {_pct(r['base_accuracy'])} "
                         f"({100 * r['advantage']:+.1f} pts{per_draw})"))
    return rows


def write(args) -> None:
    work = Path(args.workdir)
    parts = ["## Attacks (benchmarks/bench_attacks.py)", ""]
    runs = [("demo", "main", "Demo model (EfficientNet-Lite0, digits)")]
    runs += [("demo", tag, "Demo model, run '{tag}'") for tag in args.extra_tags]
    runs += [("vit", "main", "ViT setting")]
    runs += [("vit", tag, "ViT setting, run '{tag}'") for tag in args.extra_tags]
    for name, tag, title in runs:
        path = work / name / f"summary-{tag}.json"
        if not path.exists():
            continue
        summary = json.loads(path.read_text())
        meta = summary["meta"]
        if tag != "main":
            title = f"{title.format(tag=tag)}: {meta['scheme']}, block size {meta['block_size']}, {meta['dataset']}"
        elif name == "demo":
            title = f"{title}, {meta['dataset']}"
        parts += [f"### {title}", "",
                  f"Scheme {meta['scheme']}, block size {meta['block_size']}, budget {meta['budget']}; "
                  f"{meta.get('machine', '')}.", "",
                  "| measurement | result |", "|---|---|"]
        parts += [f"| {k} | {v} |" for k, v in _rows(summary)]
        parts += ["", "| target | measured | limit | met |", "|---|---|---|---|"]
        for t in summary["targets"]:
            parts.append(f"| {t['name']} | {t['measured']:+.1f} {t['unit']} | <= {t['limit']:g} | "
                         f"{'yes' if t['met'] else 'NO (by %.1f)' % -t['margin']} |")
        parts += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["seconds"].items()), ""]
        facts = summary.get("facts", {})
        if "adapt" in facts and tag == "main":
            ad = facts["adapt"]
            parts += [f"Zero-training adaptation ({ad['scheme']}) of the owner's plain ViT "
                      f"(unprotected accuracy {_pct(facts.get('unprotected_accuracy'))}): max |logit difference| "
                      f"{ad['max_logit_difference']:.1e}, accuracy with the key {_pct(ad['accuracy'])}, mean over 20 "
                      f"wrong keys {_pct(ad['wrong_keys']['wrong_key_accuracy_mean'])}; weight matching recovers "
                      f"{_pct(ad['weight_matching_vs_owner_plain']['recovered_fraction'])} of the key against the "
                      f"owner's plain model and {_pct(ad['weight_matching_vs_public_base']['recovered_fraction'])} "
                      f"against the public base (accuracy with that key "
                      f"{_pct(ad['weight_matching_vs_public_base']['accuracy'])}).", ""]
    parts.append("Command: `python benchmarks/bench_attacks.py --stage <demo|vit> ... --write` (see its docstring).")
    write_section("attacks", "\n".join(parts))
    _log("wrote the attacks section of docs/benchmarks.md")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("demo", "vit", "none"), default="none")
    parser.add_argument("--workdir", default="runs/attacks")
    parser.add_argument("--tag", default="main", help="names the result files (several budgets side by side)")
    parser.add_argument("--demo-dir", default=None, help="an existing kp protect directory for the demo model")
    parser.add_argument("--demo-key", default=None, help="its key file")
    parser.add_argument("--attacks", default="all")
    parser.add_argument("--wrong-keys", type=int, default=100)
    parser.add_argument("--random-keys", type=int, default=20000)
    parser.add_argument("--search-images", type=int, default=64)
    parser.add_argument("--random-search-seconds", type=float, default=None,
                        help="stop the random search after this long (the report says how many keys ran)")
    parser.add_argument("--swaps", type=int, default=1000)
    parser.add_argument("--estimation-steps", type=int, default=200)
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--finetune-min-steps", type=int, default=20)
    parser.add_argument("--finetune-repeats", type=int, default=3,
                        help="draws of the attacker's subset and seed per fraction (the gain is their mean)")
    parser.add_argument("--vit-pretrain-epochs", type=int, default=30)
    parser.add_argument("--vit-epochs", type=int, default=15)
    parser.add_argument("--demo-scheme", default=None,
                        help="another scheme for the demo model (a mitigation run; use with --tag)")
    parser.add_argument("--vit-scheme", default=None,
                        help="another scheme for the owner's ViT (a mitigation run; use with --tag)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--extra-tags", nargs="*", default=[], help="mitigation runs to add to the section")
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "demo":
        stage_demo(args)
    elif args.stage == "vit":
        stage_vit(args)
    if args.write:
        write(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
