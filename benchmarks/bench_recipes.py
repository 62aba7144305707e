"""Which recipe makes the protection hold? A sweep of scheme x block size x
suppression objective (and the other levers), on digits and photos, with
the unprotected fine-tune and the paper's shuffle-only recipe as rows.

Every configuration is a full protected fine-tune of the ImageNet-pretrained
EfficientNet-Lite0, then: accuracy with the key, over 100 reproducible random
wrong keys (mean, max, and how often the *least* likely class is the true
one: a readout that leaks when a recipe pushes wrong keys below chance), on
plain images, and how close the fine-tuned first convolution stays to the
public weights (cosine), what a weight-matching attack starts from.

Steps (the GPU machine has torch/timm/safetensors, not sklearn/skimage or the
weights package, so data and weights travel as files):

    # 1. here: export the datasets (.npz) and the weights into an ignored folder
    .venv/bin/python benchmarks/bench_recipes.py export --dir .bench
    # 2. here, a tiny CPU run of the whole pipeline (minutes)
    .venv/bin/python benchmarks/bench_recipes.py sweep --data-dir .bench --tiny --out /tmp/tiny.jsonl
    # 3. on the GPU machine (one call, results stream out as JSON lines)
    PYTHONPATH=. python3 benchmarks/bench_recipes.py sweep --data-dir .bench --out $OUT/results.jsonl
    # 4. here: tables into docs/benchmarks.md
    .venv/bin/python benchmarks/bench_recipes.py report results.jsonl
    # the demo's setting and cost on this machine's CPU: benchmarks/research_demo_cpu.py
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import queue
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATASETS = ("digits", "photos")
CHANCE = {"digits": 0.10, "photos": 0.125}
WEIGHTS_FILE = "efficientnet-lite0.pth"
SIZES = (32, 64)

# The targets (digits; the same asked of photos, relative to chance).
TARGET_KEY_DROP = 0.02
TARGET_WRONG_MEAN = 0.20
TARGET_WRONG_MAX = 0.30
TARGET_PLAIN = 0.20


@dataclass(frozen=True)
class Job:
    """One fine-tune + evaluation. ``scheme=None`` is the unprotected baseline."""

    table: str
    dataset: str
    size: int = 64
    scheme: Optional[str] = None
    block_size: int = 8
    wrong: float = 0.0
    plain: float = 0.0
    form: str = "uniform"
    epochs: int = 10
    reinit_stem: bool = False
    stem_lr_scale: float = 1.0
    lr: float = 2e-3
    seed: int = 0

    @property
    def baseline(self) -> bool:
        return self.scheme is None

    def recipe(self) -> str:
        if self.baseline:
            return "unprotected" + ("" if self.lr == 2e-3 else f" lr={self.lr:g}")
        name = f"{self.scheme} M={self.block_size} " + _objective_name(self.wrong, self.plain, self.form)
        if self.reinit_stem:
            name += " reinit-stem"
        if self.stem_lr_scale != 1.0:
            name += f" stem-lr×{self.stem_lr_scale:g}"
        if self.lr != 2e-3:
            name += f" lr={self.lr:g}"
        return name


def _objective_name(wrong: float, plain: float, form: str) -> str:
    if not wrong and not plain:
        return "ce"
    parts = ["ce"]
    if wrong:
        parts.append(f"wrong×{wrong:g}")
    if plain:
        parts.append(f"plain×{plain:g}")
    return "+".join(parts) + ("" if form == "uniform" else f" ({form})")


# --------------------------------------------------------------------- jobs
def sweep_jobs() -> list:
    """All configurations, most important first (a timeout keeps the head)."""
    jobs: list = []
    add = jobs.append
    for ds in DATASETS:  # baselines: same schedule, no key
        add(Job("baseline", ds, 64))
    for ds in DATASETS:  # a hedge on the learning rate
        add(Job("levers", ds, 64, lr=1e-3))
        add(Job("levers", ds, 64, "shuffle+np+shift", 8, wrong=1.0, lr=1e-3))
    main_schemes = ("shuffle", "shuffle+np", "shuffle+np+shift", "shuffle+np+ffx", "shuffle+np+shift+scramble")
    for weight in (0.0, 0.3, 1.0):  # scheme x suppression weight at M=8
        for scheme in main_schemes:
            for ds in DATASETS:
                add(Job("grid", ds, 64, scheme, 8, wrong=weight))
    for m in (4, 16):  # scheme x block size x weight
        for scheme, weight in (("shuffle", 0.0), ("shuffle+np", 0.0), ("shuffle+np+shift", 0.0),
                               ("shuffle+np+shift", 0.3), ("shuffle+np+shift", 1.0), ("shuffle+np", 1.0)):
            for ds in DATASETS:
                add(Job("grid", ds, 64, scheme, m, wrong=weight))
    for ds in DATASETS:  # the cheaper demo settings: smaller images, fewer epochs
        add(Job("baseline", ds, 32))
        add(Job("baseline", ds, 64, epochs=5))
        add(Job("baseline", ds, 32, epochs=5))
        for m, weight in ((8, 1.0), (8, 0.3), (4, 1.0), (16, 1.0)):
            add(Job("demo", ds, 32, "shuffle+np+shift", m, wrong=weight))
        for size, m, weight in ((64, 8, 1.0), (64, 16, 1.0), (32, 8, 1.0)):
            add(Job("demo", ds, size, "shuffle+np+shift", m, wrong=weight, epochs=5))
        add(Job("demo", ds, 32, "shuffle+np", 8, wrong=1.0))
    for ds in DATASETS:  # levers on the expected front-runner
        for kw in (dict(wrong=3.0), dict(wrong=0.1), dict(wrong=0.3, plain=0.3), dict(wrong=1.0, plain=0.3),
                   dict(wrong=1.0, form="true_class"), dict(wrong=1.0, reinit_stem=True),
                   dict(wrong=0.3, reinit_stem=True), dict(wrong=1.0, stem_lr_scale=5.0),
                   dict(wrong=1.0, lr=4e-3)):
            add(Job("levers", ds, 64, "shuffle+np+shift", 8, **kw))
    for m in (2, 32):  # block-size table ends
        for scheme, weight in (("shuffle", 0.0), ("shuffle+np+shift", 1.0)):
            for ds in DATASETS:
                add(Job("grid", ds, 64, scheme, m, wrong=weight))
    for seed in (1, 2):  # repeats of the likely finalists (other key, other init)
        for ds in DATASETS:
            add(Job("seeds", ds, 64, "shuffle+np+shift", 8, wrong=1.0, seed=seed))
            add(Job("seeds", ds, 64, "shuffle+np+shift", 16, wrong=1.0, seed=seed))
            add(Job("seeds", ds, 64, "shuffle+np+shift", 8, wrong=0.3, seed=seed))
            add(Job("baseline", ds, 64, seed=seed))
    for seed in (1, 2):  # more repeats: the paper's recipe, the plain schemes, the demo candidate
        for ds in DATASETS:
            add(Job("seeds", ds, 64, "shuffle", 8, seed=seed))
            add(Job("seeds", ds, 64, "shuffle+np", 8, seed=seed))
            add(Job("seeds", ds, 64, "shuffle+np+shift", 8, seed=seed))
            add(Job("seeds", ds, 32, "shuffle+np+shift", 8, wrong=1.0, seed=seed))
            add(Job("baseline", ds, 32, seed=seed))
    for ds in DATASETS:  # longer training
        add(Job("levers", ds, 64, epochs=20))
        add(Job("levers", ds, 64, "shuffle+np+shift", 8, wrong=1.0, epochs=20))
    return jobs


def tiny_jobs() -> list:
    return [
        Job("baseline", "digits", 32, epochs=1),
        Job("grid", "digits", 32, "shuffle+np+shift", 8, wrong=0.5, epochs=1),
        Job("grid", "photos", 32, "shuffle+np+ffx", 8, wrong=0.5, plain=0.5, epochs=1, reinit_stem=True),
    ]


# ------------------------------------------------------------------- worker
def _bench_key(job: Job):
    """A public, reproducible key for a benchmark row (not a secret)."""
    from kp_plugin.keys import SecretKey

    material = hashlib.sha256(f"kp-plugin/bench-key/{job.seed}/{job.scheme}/{job.block_size}".encode()).digest()
    return SecretKey(material, block_size=job.block_size, scheme=job.scheme, channels=3)


def _load_data(data_dir: Path, device, tiny: bool) -> dict:
    from kp_plugin.data import load_dataset

    data = {}
    for ds in DATASETS:
        for size in SIZES:
            for split in ("train", "test"):
                path = data_dir / f"{ds}-{split}-{size}.npz"
                if not path.is_file():
                    continue
                dataset = load_dataset(str(path))
                if tiny:
                    keep = slice(0, 64 if split == "train" else 48)
                    dataset.images, dataset.labels = dataset.images[keep], dataset.labels[keep]
                dataset.images = dataset.images.to(device)
                dataset.labels = dataset.labels.to(device)
                data[(ds, size, split)] = dataset
    return data


def _score(base, inputs, labels) -> tuple:
    """(argmax accuracy, argmin accuracy) of ``base`` on prepared inputs."""
    import torch

    right = wrong_min = 0
    with torch.inference_mode():
        for start in range(0, inputs_len(inputs), 512):
            x = inputs(start, start + 512)
            out = base(x).float()
            y = labels[start : start + 512]
            right += int((out.argmax(-1) == y).sum())
            wrong_min += int((out.argmin(-1) == y).sum())
    n = labels.numel()
    return right / n, wrong_min / n


def inputs_len(inputs) -> int:
    return inputs.length


class _Inputs:
    """Lazily prepared model inputs for slices of a test set."""

    def __init__(self, images, prepare) -> None:
        self.images, self.prepare, self.length = images, prepare, images.shape[0]

    def __call__(self, start: int, stop: int):
        return self.prepare(self.images[start:stop])


def run_job(job: Job, data: dict, weights: Path, device, num_wrong_keys: int) -> dict:
    import torch
    import torch.nn.functional as F

    from kp_plugin import wrap_model
    from kp_plugin.evaluate import wrong_keys
    from kp_plugin.module import KeyedInput
    from kp_plugin.objectives import ProtectionObjective
    from kp_plugin.pretrained import load_efficientnet_lite0
    from kp_plugin.train import Normalize, TrainConfig, evaluate_accuracy, first_conv, fit, plain_model

    train, test = data[(job.dataset, job.size, "train")], data[(job.dataset, job.size, "test")]
    torch.manual_seed(job.seed)
    base = load_efficientnet_lite0(len(train.classes), weights_path=str(weights))
    public_stem = first_conv(base).weight.detach().clone().flatten().to(device)
    objective = ProtectionObjective(wrong_key_weight=job.wrong, plain_weight=job.plain, form=job.form)
    config = TrainConfig(epochs=job.epochs, lr=job.lr, seed=job.seed, objective=objective, amp=False,
                         reinit_stem=job.reinit_stem, stem_lr_scale=job.stem_lr_scale)
    result = dataclasses.asdict(job)
    result["recipe"] = job.recipe()
    started = time.perf_counter()
    if job.baseline:
        model = plain_model(base)
        fit(model, train, config=config, device=device, progress=False)
        result["key_accuracy"] = evaluate_accuracy(model, test, device=device)
        result["train_seconds"] = time.perf_counter() - started
        return result
    key = _bench_key(job)
    model = wrap_model(base, key, input_size=(3, job.size, job.size))
    fit(model, train, config=config, device=device, progress=False)
    result["train_seconds"] = time.perf_counter() - started
    model.eval()
    result["key_accuracy"] = evaluate_accuracy(model, test, device=device)
    normalize = Normalize(model.keyed.mean, model.keyed.std).to(device)
    labels = test.labels
    plain_acc, plain_min = _score(base, _Inputs(test.images, normalize), labels)
    result["plain_accuracy"], result["plain_least_likely"] = plain_acc, plain_min
    accs, mins = [], []
    for wrong in wrong_keys(key, num_wrong_keys, seed=0):
        keyed = KeyedInput(wrong, mean=model.keyed.mean, std=model.keyed.std, check_range=False).to(device)
        acc, least = _score(base, _Inputs(test.images, keyed), labels)
        accs.append(acc)
        mins.append(least)
    result.update(
        num_wrong_keys=len(accs),
        wrong_mean=statistics.fmean(accs),
        wrong_std=statistics.pstdev(accs),
        wrong_max=max(accs),
        wrong_min=min(accs),
        wrong_least_likely_mean=statistics.fmean(mins),
        wrong_least_likely_max=max(mins),
        stem_cosine=float(F.cosine_similarity(first_conv(base).weight.detach().flatten(), public_stem, dim=0)),
        eval_seconds=time.perf_counter() - started - result["train_seconds"],
    )
    return result


def _worker(rank: int, jobs, results, data_dir: str, device_name: str, num_wrong_keys: int,
            stop_at: float, tiny: bool) -> None:
    import torch

    torch.set_num_threads(1)
    if device_name == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device(device_name)
    data = _load_data(Path(data_dir), device, tiny)
    weights = Path(data_dir) / WEIGHTS_FILE
    while True:
        try:
            job = jobs.get(timeout=1)
        except queue.Empty:
            return
        if job is None or time.time() > stop_at:
            results.put(("skipped", rank, None if job is None else dataclasses.asdict(job)))
            if job is None:
                return
            continue
        try:
            results.put(("done", rank, run_job(job, data, weights, device, num_wrong_keys)))
        except Exception as exc:  # report and go on with the next job
            results.put(("failed", rank, {**dataclasses.asdict(job), "error": f"{type(exc).__name__}: {exc}"}))


def sweep(args: argparse.Namespace) -> int:
    import torch
    import torch.multiprocessing as mp

    started = time.time()
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpu = torch.cuda.get_device_name(0) if device_name == "cuda" else None
    jobs_list = tiny_jobs() if args.tiny else sweep_jobs()
    if args.limit:
        jobs_list = jobs_list[: args.limit]
    num_wrong = args.wrong_keys if args.wrong_keys else (3 if args.tiny else 100)
    print(json.dumps({"event": "start", "jobs": len(jobs_list), "workers": args.workers, "device": device_name,
                      "gpu": gpu, "torch": torch.__version__, "wrong_keys": num_wrong}), flush=True)
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    for job in jobs_list:
        jobs.put(job)
    for _ in range(args.workers):
        jobs.put(None)
    stop_at = started + args.budget_s
    workers = [ctx.Process(target=_worker, args=(r, jobs, results, str(args.data_dir), device_name, num_wrong,
                                                  stop_at, args.tiny)) for r in range(args.workers)]
    for w in workers:
        w.start()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = failed = finished_workers = 0
    hard_stop = started + args.budget_s + args.grace_s
    with out.open("a") as fh:
        while finished_workers < args.workers and time.time() < hard_stop:
            try:
                status, rank, payload = results.get(timeout=2)
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    break
                continue
            if status == "skipped":
                if payload is None:
                    finished_workers += 1
                continue
            payload.update(status=status, gpu=gpu, device=device_name, elapsed=round(time.time() - started, 1))
            line = json.dumps(payload, sort_keys=True)
            fh.write(line + "\n")
            fh.flush()
            print(line, flush=True)
            done += status == "done"
            failed += status == "failed"
    for w in workers:
        if w.is_alive():
            w.terminate()
    print(json.dumps({"event": "end", "done": done, "failed": failed, "of": len(jobs_list),
                      "seconds": round(time.time() - started, 1)}), flush=True)
    return 0 if failed == 0 else 1


# ------------------------------------------------------------------- export
def export(args: argparse.Namespace) -> int:
    from kp_plugin.data import load_dataset, save_npz
    from kp_plugin.pretrained import efficientnet_lite0_weights_path

    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    for ds in DATASETS:
        for size in SIZES:
            for split in ("train", "test"):
                path = save_npz(load_dataset(ds, split=split, image_size=size), directory / f"{ds}-{split}-{size}.npz")
                print(path, path.stat().st_size)
    shutil.copyfile(efficientnet_lite0_weights_path(), directory / WEIGHTS_FILE)
    return 0


# ------------------------------------------------------------------- report
def _pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def _load_results(paths) -> list:
    rows = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                row = json.loads(line)
                if row.get("status") == "done":
                    rows.append(row)
    return rows


def _baseline(rows: list, row: dict) -> Optional[float]:
    accs = [r["key_accuracy"] for r in rows if r["scheme"] is None and r["dataset"] == row["dataset"]
            and r["size"] == row["size"] and r["epochs"] == row["epochs"] and r["lr"] == row["lr"]
            and r["seed"] == row["seed"]]
    if not accs:
        accs = [r["key_accuracy"] for r in rows if r["scheme"] is None and r["dataset"] == row["dataset"]
                and r["size"] == row["size"] and r["epochs"] == row["epochs"]]
    return statistics.fmean(accs) if accs else None


def meets_targets(row: dict, baseline: Optional[float]) -> bool:
    """The issue's targets: key within 2 points of the baseline, wrong keys
    mean <= chance + 10 (20% on digits), worst <= chance + 20, plain <= chance + 10."""
    chance = CHANCE[row["dataset"]]
    return (baseline is not None and row["key_accuracy"] >= baseline - TARGET_KEY_DROP
            and row["wrong_mean"] <= chance + (TARGET_WRONG_MEAN - 0.10)
            and row["wrong_max"] <= chance + (TARGET_WRONG_MAX - 0.10)
            and row["plain_accuracy"] <= chance + (TARGET_PLAIN - 0.10))


def _row_cells(rows: list, row: dict) -> list:
    base = _baseline(rows, row)
    if row["scheme"] is None:
        return [_pct(row["key_accuracy"]), "–", "–", "–", "–", "–", "–", ""]
    drop = "–" if base is None else f"{100 * (row['key_accuracy'] - base):+.1f}"
    return [_pct(row["key_accuracy"]), drop, _pct(row["wrong_mean"]), _pct(row["wrong_max"]),
            _pct(row["wrong_least_likely_mean"]), _pct(row["plain_accuracy"]), f"{row['stem_cosine']:.3f}",
            "✓" if meets_targets(row, base) else ""]


HEADER = ("| dataset | size | epochs | recipe | key acc | Δ vs unprotected | wrong mean | wrong max "
          "| wrong least-likely | plain | stem cos | targets |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _table(rows: list, selected: list) -> str:
    lines = [HEADER]
    for r in selected:
        cells = [r["dataset"], str(r["size"]), str(r["epochs"]), r["recipe"] + (f" seed {r['seed']}" if r["seed"] else "")]
        lines.append("| " + " | ".join(cells + _row_cells(rows, r)) + " |")
    return "\n".join(lines)


def _block_table(rows: list) -> str:
    sizes = [m for m in (2, 4, 8, 16, 32) if any(r["scheme"] and r["block_size"] == m and r["size"] == 64 for r in rows)]
    lines = ["| dataset | recipe | " + " | ".join(f"M={m}" for m in sizes) + " |",
             "|---|---|" + "---|" * len(sizes)]
    for ds in DATASETS:
        base = [r for r in rows if r["scheme"] is None and r["dataset"] == ds and r["size"] == 64
                and r["epochs"] == 10 and r["seed"] == 0 and r["lr"] == 2e-3]
        if base:
            lines.append(f"| {ds} | unprotected | " + " | ".join([_pct(base[0]["key_accuracy"])] * len(sizes)) + " |")
        for scheme, wrong in (("shuffle", 0.0), ("shuffle+np", 0.0), ("shuffle+np", 1.0), ("shuffle+np+shift", 0.0),
                              ("shuffle+np+shift", 0.3), ("shuffle+np+shift", 1.0)):
            cells = []
            for m in sizes:
                hit = [r for r in rows if r["dataset"] == ds and r["scheme"] == scheme and r["block_size"] == m
                       and r["wrong"] == wrong and r["plain"] == 0 and r["size"] == 64 and r["epochs"] == 10
                       and r["seed"] == 0 and not r["reinit_stem"] and r["stem_lr_scale"] == 1.0
                       and r["lr"] == 2e-3 and r["form"] == "uniform"]
                cells.append(f"{_pct(hit[0]['key_accuracy'])} / {_pct(hit[0]['wrong_mean'])}" if hit else "–")
            lines.append(f"| {ds} | {scheme} {_objective_name(wrong, 0, 'uniform')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(args: argparse.Namespace) -> int:
    from benchmarks._report import write_section

    rows = _load_results(args.results)
    if not rows:
        print("no finished rows in", args.results, file=sys.stderr)
        return 1
    gpu = next((r["gpu"] for r in rows if r.get("gpu")), None) or "CPU"
    order = lambda r: (r["dataset"], r["size"], r["epochs"], r["scheme"] or "", r["block_size"], r["wrong"],
                       r["plain"], r["form"], r["reinit_stem"], r["stem_lr_scale"], r["lr"], r["seed"])
    rows.sort(key=order)
    grid = [r for r in rows if r["table"] in ("baseline", "grid") and r["size"] == 64 and r["epochs"] == 10
            and r["seed"] == 0]
    levers = [r for r in rows if r["table"] == "levers" or (r["table"] == "grid" and r["size"] == 64
              and r["epochs"] == 10 and r["seed"] == 0 and r["scheme"] == "shuffle+np+shift" and r["block_size"] == 8)]
    demo = [r for r in rows if r["size"] != 64 or r["epochs"] != 10]
    seeds = [r for r in rows if r["table"] == "seeds" or (r["seed"] == 0 and r["table"] == "grid" and r["size"] == 64
             and r["epochs"] == 10 and r["scheme"] == "shuffle+np+shift" and r["block_size"] in (8, 16)
             and r["wrong"] in (0.3, 1.0) and r["plain"] == 0)]
    seeds += [r for r in rows if r["scheme"] is None and r["size"] == 64 and r["epochs"] == 10]
    seeds.sort(key=order)
    n_keys = max((r.get("num_wrong_keys", 0) for r in rows), default=0)
    intro = (
        f"Measured with `benchmarks/bench_recipes.py sweep` on {gpu} ({len(rows)} fine-tunes of the "
        f"ImageNet-pretrained EfficientNet-Lite0; AdamW lr 2e-3, one-cycle, batch 64, augmentation before the key; "
        f"{n_keys} reproducible wrong keys per row; one run per row). Accuracies in %, on the test splits. "
        "*wrong least-likely*: how often the least likely class under a wrong key is the true one "
        "(chance level means the readout does not leak). *stem cos*: cosine between the fine-tuned and the public "
        "first convolution. *targets*: key within 2 points of the unprotected fine-tune, wrong keys mean <= chance+10, "
        "max <= chance+20, plain <= chance+10 (chance: digits 10%, photos 12.5%)."
    )
    write_section("recipes-grid", "## Recipes: scheme x block size x suppression weight\n\n" + intro + "\n\n"
                  + _table(rows, grid))
    write_section("recipes-block-size", "## Block size (key accuracy / mean wrong-key accuracy, 64x64, 10 epochs)\n\n"
                  "From the same sweep. The authors' table (CIFAR-10, ResNet-18 trained from scratch, shuffle only): "
                  "plain 95.43, M=2 94.77, M=4 92.56, M=8 86.40, M=16 77.25.\n\n" + _block_table(rows))
    write_section("recipes-levers", "## Recipes: other levers on shuffle+np+shift, M=8\n\n" + _table(rows, levers))
    write_section("recipes-demo", "## Recipes: cheaper settings for the CPU demo\n\n" + _table(rows, demo))
    if any(r["seed"] for r in rows):
        seeds_md = _table(rows, seeds)
    else:
        seeds_md = ("The repeats with other keys and initializations were queued last and did not run within the "
                    "machine time: every row above is one run (one key, one initialization), so differences of a "
                    "few points between rows are within run-to-run noise.")
    write_section("recipes-seeds", "## Recipes: repeats with other keys and initializations\n\n" + seeds_md)
    print(f"wrote {len(rows)} rows into docs/benchmarks.md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="write the datasets (.npz) and weights for the GPU machine")
    p.add_argument("--dir", default=".bench")
    p.set_defaults(func=export)
    p = sub.add_parser("sweep", help="run the sweep (GPU), one JSON line per configuration")
    p.add_argument("--data-dir", default=".bench")
    p.add_argument("--out", default="results.jsonl")
    p.add_argument("--workers", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=430, help="start no job after this many seconds")
    p.add_argument("--grace-s", type=float, default=90, help="then wait this long for running jobs")
    p.add_argument("--wrong-keys", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="tiny CPU check of the whole pipeline")
    p.set_defaults(func=sweep)
    p = sub.add_parser("report", help="write the tables into docs/benchmarks.md")
    p.add_argument("results", nargs="+")
    p.set_defaults(func=report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
