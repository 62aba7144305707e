"""Deploy a key-protected model as ONNX; the key stays with whoever serves it.

Public kp-plugin API only:

1. load a protected checkpoint (``kp protect`` / ``save_protected`` output)
   with the owner's key (the fingerprint is checked),
2. ``export_protected``: the base model alone as ``model.onnx`` (input
   ``pixel_values`` = keyed, normalized images; output ``logits``) beside
   ``protection.json``; no key, every file scanned for it,
3. serve it with onnxruntime behind ``load_keyed_input(deploy, key)``, and
   show what the same ONNX file does with a wrong key and on plain images.

Run:
    kp keygen --block-size 4 -o owner.key
    kp protect --data digits --key owner.key -o out/
    python integrations/export/serve_onnx.py --checkpoint out/ --key owner.key --deploy deploy/
"""

from __future__ import annotations

import argparse
import sys

import torch

from kp_plugin import SecretKey
from kp_plugin.autoload import load_protected_auto
from kp_plugin.checkpoint import ProtectionConfig
from kp_plugin.data import iterate_batches, load_dataset
from kp_plugin.objectives import logits_of
from kp_plugin.export import export_protected, load_keyed_input


def _accuracies(candidates: dict, batches) -> dict:
    """Accuracy in % of each ``name -> predict(images) -> logits`` over the
    ``(images, labels)`` batches, read once (an ImageFolder streams from disk)."""
    correct, total = dict.fromkeys(candidates, 0), 0
    for images, labels in batches:
        for name, predict in candidates.items():
            correct[name] += int((torch.as_tensor(predict(images)).argmax(1) == labels).sum())
        total += len(labels)
    # --limit 0: no images, 0% rather than a division by zero
    return {name: 100.0 * hits / total if total else 0.0 for name, hits in correct.items()}


def _limited(batches, limit):
    """The first ``limit`` examples of ``batches`` (all with ``None``)."""
    left = limit
    for images, labels in batches:
        if left is not None:
            if left <= 0:
                return
            images, labels, left = images[:left], labels[:left], left - len(labels[:left])
        yield images, labels


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a protected checkpoint folder (kp protect -o ...)")
    parser.add_argument("--key", required=True, help="the owner's key file")
    parser.add_argument("--deploy", required=True, help="folder for model.onnx + protection.json")
    parser.add_argument("--data", default=None, help="test data (default: the checkpoint's dataset)")
    parser.add_argument("--limit", type=_count, default=None, help="use the first N test images only")
    args = parser.parse_args(argv)

    try:
        import onnxruntime
    except ImportError:
        print('this recipe needs onnxruntime: pip install "kp-plugin[onnx]"', file=sys.stderr)
        return 1

    key = SecretKey.load(args.key)
    model = load_protected_auto(args.checkpoint, key)  # KeyMismatchError for another key
    extra = ProtectionConfig.load(args.checkpoint).extra
    path = export_protected(model, args.deploy, format="onnx", metadata=extra)
    print(f"exported {path} (no key; input: keyed images, output: logits)")

    # The serving side: the ONNX file, protection.json and the key file.
    session = onnxruntime.InferenceSession(str(path))
    keyed = load_keyed_input(args.deploy, key)
    wrong = load_keyed_input(args.deploy, SecretKey.generate_like(key), allow_wrong_key=True)
    config = ProtectionConfig.load(args.deploy)
    mean = torch.tensor(config.mean)[:, None, None]
    std = torch.tensor(config.std)[:, None, None]

    data = args.data or extra.get("dataset")
    if not data:
        print("the checkpoint does not record its dataset; pass --data", file=sys.stderr)
        return 1
    # Any dataset load_dataset reads (digits, photos, .npz, an ImageFolder), in batches.
    test = load_dataset(data, split="test", image_size=config.input_size[1])
    count = len(test) if args.limit is None else min(args.limit, len(test))

    def onnx(prepare):
        return lambda images: session.run(None, {"pixel_values": prepare(images).numpy()})[0]

    model.eval()
    with torch.no_grad():
        rows = _accuracies({
            "ONNX, with the key": onnx(keyed),
            "ONNX, a random wrong key": onnx(wrong),
            "ONNX, plain images (no key)": onnx(lambda x: (x - mean) / std),
            "PyTorch checkpoint, with the key": lambda images: logits_of(model(images)),
        }, _limited(iterate_batches(test, batch_size=256), count))
    print(f"{data} test split, {count} images:")
    for name, accuracy in rows.items():
        print(f"  {name:34s} {accuracy:5.1f}%")
    return 0


if __name__ == "__main__":
    from kp_plugin.cli import run_script

    sys.exit(run_script(main, "serve_onnx"))
