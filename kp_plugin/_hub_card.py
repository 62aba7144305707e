"""The model card of a protected model on the Hub: public facts only.

Built with huggingface_hub's ``ModelCard`` / ``ModelCardData``: library
``kp-plugin``, tags ``kp-plugin`` and ``key-protected``, the base model, the
scheme and block size, the accuracy with the key and with wrong keys when an
evaluation report exists, and how to load the model with a key. Nothing in
it is derived from the key except the public fingerprint.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional

from .checkpoint import ProtectionConfig

CARD_TAGS = ("kp-plugin", "key-protected")
REPORT_FILE = "report.json"


def read_report(source: Any) -> Optional[dict]:
    """An evaluation report as a dict: ``source`` is a mapping, a
    ``ProtectionReport``, a path to a ``report.json``, a checkpoint directory
    holding one (or ``report/report.json``), or None (no report)."""
    if source is None:
        return None
    if isinstance(source, Mapping):
        return dict(source)
    if callable(getattr(source, "to_dict", None)):  # kp_plugin.evaluate.ProtectionReport
        return dict(source.to_dict())
    path = Path(source)
    if path.is_dir():
        # kp evaluate writes CHECKPOINT/report/report.json by default.
        path = next((p for p in (path / REPORT_FILE, path / "report" / REPORT_FILE) if p.is_file()), path / REPORT_FILE)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    # Reports written before 0-wrong-key statistics became null hold NaN.
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in data.items()}


def _percent(value: Any) -> str:
    return f"{100 * float(value):.1f}%" if isinstance(value, (int, float)) else "n/a"


def _accuracy_section(report: dict) -> str:
    rows = [("with the key", _percent(report.get("key_accuracy")))]
    n = report.get("num_wrong_keys")
    if report.get("wrong_key_accuracy_mean") is not None:
        spread = report.get("wrong_key_accuracy_std")
        mean = _percent(report["wrong_key_accuracy_mean"])
        text = f"{mean} ± {_percent(spread)}" if spread is not None else mean
        rows.append((f"with wrong keys (mean over {n})", text))
    if report.get("wrong_key_accuracy_max") is not None:
        rows.append((f"with wrong keys (best of {n})", _percent(report["wrong_key_accuracy_max"])))
    if report.get("plain_accuracy") is not None:
        rows.append(("without any key (plain images)", _percent(report["plain_accuracy"])))
    if report.get("unprotected_accuracy") is not None:
        rows.append(("unprotected baseline", _percent(report["unprotected_accuracy"])))
    if report.get("chance") is not None:
        rows.append(("chance", _percent(report["chance"])))
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    dataset = report.get("dataset", "the evaluation set")
    return f"## Accuracy\n\nOn {dataset} (from the owner's evaluation report):\n\n| images | accuracy |\n|---|---|\n{table}\n"


def build_model_card(
    protection: ProtectionConfig,
    *,
    repo_id: str,
    native_library: Optional[str] = None,
    base_model: Optional[str] = None,
    report: Optional[dict] = None,
):
    """The ``ModelCard`` (README.md) for a protected model.

    Args:
        protection: the checkpoint's :class:`ProtectionConfig`.
        repo_id: where it is published (used in the loading example).
        native_library: ``"timm"`` or ``"transformers"`` (added as a tag).
        base_model: the Hub id of the pre-trained model it was fine-tuned from.
        report: an evaluation report (keys as ``kp_plugin.evaluate`` writes).

    Example:
        >>> card = build_model_card(ProtectionConfig.load("out/"), repo_id="org/name")  # doctest: +SKIP
        >>> card.save("out/README.md")                                                  # doctest: +SKIP
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    scheme = "+".join(protection.scheme)
    tags = list(CARD_TAGS) + ["image-classification"] + ([native_library] if native_library else [])
    eval_results = None
    if report and isinstance(report.get("key_accuracy"), (int, float)):
        dataset = str(report.get("dataset") or "evaluation")
        # model-index wants an identifier as the type ("digits (test)" is a name)
        slug = re.sub(r"[^a-z0-9_./-]+", "-", dataset.lower()).strip("-") or "evaluation"
        common = dict(task_type="image-classification", dataset_type=slug, dataset_name=dataset,
                      metric_type="accuracy")
        eval_results = [EvalResult(metric_value=float(report["key_accuracy"]), metric_name="accuracy with the key",
                                   **common)]
        if isinstance(report.get("wrong_key_accuracy_mean"), (int, float)):
            eval_results.append(EvalResult(metric_value=float(report["wrong_key_accuracy_mean"]),
                                           metric_name="accuracy with wrong keys (mean)", **common))
    data = ModelCardData(
        library_name="kp-plugin",
        tags=tags,
        base_model=base_model,
        pipeline_tag="image-classification",
        model_name=repo_id.split("/")[-1],
        eval_results=eval_results,
        kp_plugin={
            "scheme": scheme,
            "block_size": protection.block_size,
            "channels": protection.channels,
            "fingerprint": protection.fingerprint,
            "format_version": protection.format_version,
        },
    )
    size = protection.input_size
    size_text = f"{size[1]}x{size[2]}" if size and len(size) == 3 else "a multiple of the block size"
    # Claims only as far as a report backs them.
    measured = ("the owner's measurements are below" if eval_results else
                "no evaluation report was published with it, so this card states no accuracy")
    call = "model(images).logits" if native_library == "transformers" else "model(images)"
    body = f"""
# {repo_id.split('/')[-1]} (key-protected)

This {protection.architecture or 'image'} model is **protected with a secret key**
([kp-plugin](https://pypi.org/project/kp-plugin/), after AprilPyone & Kiya,
"Transfer Learning-Based Model Protection With Secret Key", ICIP 2021). It expects images
passed through a key-driven block-wise transform: it is meant to be accurate with the
owner's key only, and close to chance with any other key or none; {measured}.
**The key is not in this repository** and the weights alone are of little use.

## Protection

| setting | value |
|---|---|
| scheme | `{scheme}` |
| block size | {protection.block_size} |
| key fingerprint (public) | `{protection.fingerprint}` |
| architecture | `{protection.architecture}` |
| classes | {protection.num_classes} |
| input | {size_text}, RGB in [0, 1] |
{"" if base_model is None else f"| base model | [{base_model}](https://huggingface.co/{base_model}) |" + chr(10)}
{_accuracy_section(report) if report else ""}
## How to load (needs the key)

```python
from kp_plugin import SecretKey
from kp_plugin.hub import pull_protected

key = SecretKey.load("owner.key")          # or SecretKey.from_env("KP_KEY")
model = pull_protected("{repo_id}", key)
logits = {call}{" " * (26 - len(call))}# float images in [0, 1], shape (B, 3, H, W)
```

or from a shell: `kp pull {repo_id} --key owner.key --output model/`.
Loading with another key raises `KeyMismatchError`; the fingerprint above tells which key
is expected without revealing it.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
