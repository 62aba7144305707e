"""GPU check of kp_plugin.hf in one run: the keyed processor on CUDA,
throughput (CPU and CUDA) against the base processor, KeyedTrainer with the
callback and the protection objective on the GPU (processor style: tiny ViT
on sklearn's digits, 8 epochs), pipeline with the right and a wrong key, and
a model-style run that writes a protected checkpoint.

    OUT=results/ python integrations/transformers/gpu_check.py          # full
    OUT=results/ python integrations/transformers/gpu_check.py quick    # seconds, for a smoke run

Writes ``$OUT/gpu_check.json``. Falls back to the CPU without a GPU.
"""
import argparse, json, os, statistics, tempfile, time

_parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="example: OUT=results/ python "
                                  "integrations/transformers/gpu_check.py quick",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
_parser.add_argument("mode", nargs="?", choices=["full", "quick"], default="full",
                     help="quick: seconds, for a smoke run (default: full)")
_args = _parser.parse_args()  # before anything is imported, written or run: --help only prints
import numpy as np, torch
from PIL import Image
import transformers
from transformers import TrainingArguments, ViTConfig, ViTForImageClassification, ViTImageProcessor, pipeline
from kp_plugin import SecretKey
from kp_plugin.hf import KeyedImageCollator, KeyedImageProcessor, KeyedTrainer, KeyProtectionCallback, wrap_hf_model
from kp_plugin.objectives import ProtectionObjective

OUT = os.environ.get("OUT", "gpu_check_out"); os.makedirs(OUT, exist_ok=True)
WORK = tempfile.mkdtemp(prefix="kp-gpu-check-")
dev = "cuda" if torch.cuda.is_available() else "cpu"
res = {"transformers": transformers.__version__, "torch": torch.__version__,
       "device": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu", "cpu_threads": torch.get_num_threads()}
quick = _args.mode == "quick"

# 1. processor on the GPU equals the CPU output
rng = np.random.default_rng(0)
imgs = [Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)) for _ in range(8 if quick else 64)]
key16 = SecretKey.generate(block_size=16)
kp = KeyedImageProcessor(ViTImageProcessor(), key16)
cpu_out = kp(imgs[:4], return_tensors="pt")["pixel_values"]
dev_out = kp(imgs[:4], return_tensors="pt", device=dev)["pixel_values"]
res["processor_device"] = str(dev_out.device)
res["processor_cpu_vs_device_maxdiff"] = float((dev_out.cpu() - cpu_out).abs().max())

# 2. throughput, base vs keyed, alternating
def bench(device, scheme, reps):
    base = ViTImageProcessor(); keyed = KeyedImageProcessor(ViTImageProcessor(), SecretKey.generate(block_size=16, scheme=scheme))
    kw = {"return_tensors": "pt", "device": device}
    for f in (base, keyed): f(imgs[:4], **kw)
    bt, kt = [], []
    for _ in range(reps):
        for f, acc in ((base, bt), (keyed, kt)):
            if device == "cuda": torch.cuda.synchronize()
            t = time.perf_counter(); y = f(imgs, **kw)["pixel_values"]
            if device == "cuda": torch.cuda.synchronize()
            acc.append(time.perf_counter() - t)
    b, k = statistics.median(bt), statistics.median(kt)
    return {"base_img_s": len(imgs) / b, "keyed_img_s": len(imgs) / k, "ratio": b / k}
res["throughput"] = {f"{d}/{s}": bench(d, s, 3 if quick else 11) for d in ({"cpu", dev}) for s in ("shuffle", "shuffle+np", "shuffle+np+ffx")}

# 3. Trainer on the device: processor style + callback + objective; pipeline with right/wrong key
from sklearn.datasets import load_digits
raw = load_digits(); order = np.random.default_rng(0).permutation(len(raw.target))
pix = (raw.images * (255 / 16)).round().astype(np.uint8)
def rows(idx): return [{"image": Image.fromarray(np.repeat(pix[i][:, :, None], 3, 2)), "label": int(raw.target[i])} for i in idx]
train, test = rows(order[:1400][: 128 if quick else None]), rows(order[1400:][: 64 if quick else None])
key = SecretKey.generate(block_size=4)
proc = KeyedImageProcessor(ViTImageProcessor(size={"height": 16, "width": 16}), key)
torch.manual_seed(0)
labels = {i: str(i) for i in range(10)}
def vit(): return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, num_labels=10, id2label=labels, label2id={v: k for k, v in labels.items()}))
args = TrainingArguments(f"{WORK}/run", num_train_epochs=1 if quick else 8, per_device_train_batch_size=32, learning_rate=3e-3, warmup_steps=20,
                         eval_strategy="epoch", save_strategy="no", report_to=[], disable_tqdm=True, logging_steps=50, seed=0, use_cpu=dev == "cpu")
t = time.time()
tr = KeyedTrainer(model=vit(), args=args, train_dataset=train, eval_dataset=test, data_collator=KeyedImageCollator(proc),
                  callbacks=[KeyProtectionCallback(key, wrong_keys=4, min_margin=0.0)], objective=ProtectionObjective(wrong_key_weight=0.5))
tr.train(); m = tr.evaluate()
res["trainer_processor_style_objective"] = {"seconds": time.time() - t, "model_device": str(next(tr.model.parameters()).device),
    **{k: m[k] for k in m if "acc" in k or "margin" in k}, "objective_logged": any("objective_wrong" in e for e in tr.state.log_history)}
def acc(p): return sum(int(r[0]["label"]) == ex["label"] for r, ex in zip(p([ex["image"] for ex in test], top_k=1, batch_size=64), test)) / len(test)
res["pipeline_right"] = acc(pipeline("image-classification", model=tr.model, image_processor=proc, device=0 if dev == "cuda" else -1))
res["pipeline_wrong"] = acc(pipeline("image-classification", model=tr.model, image_processor=KeyedImageProcessor(ViTImageProcessor(size={"height": 16, "width": 16}), SecretKey.generate_like(key)), device=0 if dev == "cuda" else -1))

# 4. model style with objective on the device, protected checkpoint
args2 = TrainingArguments(f"{WORK}/run2", max_steps=4, per_device_train_batch_size=32, learning_rate=3e-3, eval_strategy="steps", eval_steps=2,
                          save_strategy="steps", save_steps=4, report_to=[], disable_tqdm=True, logging_steps=2, seed=0, use_cpu=dev == "cpu")
tr2 = KeyedTrainer(model=wrap_hf_model(vit(), key, image_processor=proc), args=args2, train_dataset=train, eval_dataset=test,
                   data_collator=KeyedImageCollator(proc, output="images01"), callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)],
                   objective=ProtectionObjective(wrong_key_weight=0.5))
tr2.train()
res["model_style_checkpoint_files"] = sorted(os.listdir(f"{WORK}/run2/checkpoint-4"))
res["model_style_last_eval"] = [e for e in tr2.state.log_history if "eval_key_accuracy" in e][-1]
print(json.dumps(res, indent=1))
open(f"{OUT}/gpu_check.json", "w").write(json.dumps(res, indent=1))
