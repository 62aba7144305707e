"""Publish a key-protected model on the Hugging Face Hub; the key stays here.

The owner's side of the Hub recipe (public kp-plugin API only):

1. load the owner's key (or create one the first time),
2. take a protected checkpoint (``kp protect`` / ``save_protected`` output),
   or build a protected timm model,
3. ``push_protected``: weights + native config + protection.json + model
   card; private by default; the folder is scanned for key material first.

Run:
    export HF_TOKEN=hf_...                       # write access
    python integrations/hub/publish.py --repo my-org/digits-locked --key owner.key --checkpoint out/

Self-hosted hub: add ``--endpoint https://hub.example.org`` and set
``HF_HUB_DISABLE_XET=1`` (most self-hosted hubs speak only classic LFS).
"""

from __future__ import annotations

import argparse
import os
import sys

from kp_plugin import SecretKey
from kp_plugin.hub import push_protected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="org/name on the Hub")
    parser.add_argument("--key", required=True, help="the owner's key file (created if missing)")
    parser.add_argument("--checkpoint", default=None, help="a protected checkpoint folder (kp protect -o ...)")
    parser.add_argument("--model", default="resnet18", help="timm model to protect when no --checkpoint is given")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--pretrained", action="store_true", help="start from timm's pre-trained weights")
    parser.add_argument("--public", action="store_true", help="publish openly (default: private)")
    parser.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)

    if os.path.exists(args.key):
        key = SecretKey.load(args.key)
    else:
        key = SecretKey.generate(block_size=args.block_size)
        key.save(args.key)
        print(f"created {args.key} (fingerprint {key.fingerprint}); keep it private")

    if args.checkpoint:
        source = args.checkpoint  # scanned with the key below, fingerprint checked
    else:
        from kp_plugin.timm import create_protected_model

        source = create_protected_model(args.model, key, pretrained=args.pretrained, num_classes=args.num_classes)

    info = push_protected(source, args.repo, key=key if args.checkpoint else None, private=not args.public,
                          endpoint=args.endpoint)
    print(f"published {args.repo} ({'public' if args.public else 'private'}): {info.commit_url}")
    print(f"the key stayed in {args.key}; share it only with those who may use the model")
    return 0


if __name__ == "__main__":
    from kp_plugin.cli import run_script

    sys.exit(run_script(main, "publish.py"))
