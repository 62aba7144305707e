"""Load a key-protected model from the Hugging Face Hub, elsewhere.

The user's side of the Hub recipe (public kp-plugin API only): the key comes
from a file (``--key owner.key``) or from the ``KP_KEY`` environment
variable (the key file's contents, e.g. from a CI secret); the weights come
from the Hub, or from the local cache when ``HF_HUB_OFFLINE=1``.

Run:
    python integrations/hub/load.py --repo my-org/digits-locked --key owner.key --image cat.png
    KP_KEY="$(cat owner.key)" python integrations/hub/load.py --repo my-org/digits-locked
    HF_HUB_OFFLINE=1 python integrations/hub/load.py --repo my-org/digits-locked --key owner.key
"""

from __future__ import annotations

import argparse
import sys

import torch

from kp_plugin import SecretKey
from kp_plugin.hub import pull_protected


def _image(path, size):
    """An image file as a (1, 3, H, W) float tensor in [0, 1], resized to the model's input."""
    from PIL import Image

    import numpy as np

    picture = Image.open(path).convert("RGB").resize((size[2], size[1]), Image.BICUBIC)
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1).unsqueeze(0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="org/name on the Hub")
    parser.add_argument("--key", default=None, help="the owner's key file (default: the KP_KEY variable)")
    parser.add_argument("--image", default=None, help="an image to classify (default: a random one)")
    parser.add_argument("--revision", default=None)
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)

    key = SecretKey.load(args.key) if args.key else SecretKey.from_env("KP_KEY")
    model = pull_protected(args.repo, key, revision=args.revision, endpoint=args.endpoint).eval()
    size = tuple(model.keyed.input_size or (3, 224, 224))
    images = _image(args.image, size) if args.image else torch.rand(1, *size)
    with torch.no_grad():
        logits = model(images)
    logits = getattr(logits, "logits", logits)
    probabilities = logits.softmax(-1)[0]
    best = int(probabilities.argmax())
    print(f"loaded {args.repo} with key {key.fingerprint}; class {best} (p={float(probabilities[best]):.3f})")
    return 0


if __name__ == "__main__":
    from kp_plugin.cli import run_script

    sys.exit(run_script(main, "load.py"))
