"""How much of the digits task survives a fixed permutation of the pixels.

Block scrambling at the demo setting (32x32 digits, block size 4) moves each
4x4 block, i.e. each pixel of the original 8x8 scan, to a keyed place. A
learner that ignores pixel order (logistic regression, an RBF SVM, an MLP)
scores the same on permuted and unpermuted 8x8 digits, so whatever accuracy
a CNN loses with the key under scrambling is its spatial prior, not
information. Uses the demo's own train/test split.

    .venv/bin/python benchmarks/permutation_ceiling.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _features(dataset) -> tuple:
    import torch

    images = torch.stack([dataset[i][0] for i in range(len(dataset))])[:, 0]
    pixels = torch.nn.functional.avg_pool2d(images[:, None], 4)[:, 0].flatten(1).numpy()  # back to 8x8
    labels = np.array([dataset[i][1] for i in range(len(dataset))])
    return pixels, labels


def main() -> int:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.svm import SVC

    from kp_plugin.data import load_dataset

    x_train, y_train = _features(load_dataset("digits", split="train", image_size=32))
    x_test, y_test = _features(load_dataset("digits", split="test", image_size=32))
    perm = np.random.RandomState(0).permutation(x_train.shape[1])
    print("| learner | 8x8 digits | same, pixels permuted |")
    print("|---|---|---|")
    for name, make in (("logistic regression", lambda: LogisticRegression(max_iter=5000)),
                       ("SVM, RBF kernel", SVC),
                       ("MLP (256 hidden)", lambda: MLPClassifier((256,), max_iter=2000, random_state=0))):
        plain = make().fit(x_train, y_train).score(x_test, y_test)
        permuted = make().fit(x_train[:, perm], y_train).score(x_test[:, perm], y_test)
        print(f"| {name} | {100 * plain:.1f} | {100 * permuted:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
