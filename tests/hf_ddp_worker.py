"""One rank of the two-process Trainer test (run under torchrun).

Every rank reads the same key file, builds the keyed processor, writes a
hash of its compiled transform, then runs a few Trainer steps (gloo on CPU)
with the protection objective and the callback. Usage:
    torchrun --nproc_per_node 2 tests/hf_ddp_worker.py KEY_FILE OUT_DIR

KEY_FILE may hold ``{rank}``: each rank then loads its own file, which
the run must refuse unless they hold the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

from hf_fixtures import IMAGE_SIZE, digits_dataset, tiny_vit, vit_processor  # noqa: E402
from kp_plugin import SecretKey, compile_plan  # noqa: E402
from kp_plugin.hf import KeyedImageCollator, KeyedImageProcessor, KeyedTrainer, KeyProtectionCallback  # noqa: E402
from kp_plugin.objectives import ProtectionObjective  # noqa: E402


def _accuracy(prediction) -> dict:
    """Trainer's own accuracy (gather_for_metrics drops the padding)."""
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main(key_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    key = SecretKey.load(key_file.format(rank=rank))  # "owner{rank}.key": a key file per rank (refused)
    processor = KeyedImageProcessor(vit_processor(), key)
    plan = compile_plan(key, 3, IMAGE_SIZE, IMAGE_SIZE)
    digest = hashlib.sha256(plan.source_index.numpy().tobytes())
    if plan.flip is not None:
        digest.update(plan.flip.numpy().tobytes())
    args = TrainingArguments(
        str(Path(out_dir) / "run"), max_steps=3, per_device_train_batch_size=16, per_device_eval_batch_size=16,
        learning_rate=1e-3, use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
        save_strategy="no", eval_strategy="no", logging_steps=1, seed=0,
    )
    trainer = KeyedTrainer(
        model=tiny_vit(), args=args, train_dataset=digits_dataset("train", size=96),
        # 33 examples in batches of 16 on 2 ranks: the ranks' last batches are
        # padded with repeated examples, which no accuracy may count.
        eval_dataset=digits_dataset("test", size=33), data_collator=KeyedImageCollator(processor),
        compute_metrics=_accuracy,
        callbacks=[KeyProtectionCallback(key, wrong_keys=2, min_margin=0.0)],
        # The objective's wrong-key passes run outside DDP's forward; the
        # replicas must still end identical.
        objective=ProtectionObjective(wrong_key_weight=0.5),
    )
    trainer.train()
    metrics = trainer.evaluate()
    report = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "transform_sha256": digest.hexdigest(),
        "global_step": trainer.state.global_step,
        "eval_key_accuracy": metrics["eval_key_accuracy"],
        "eval_accuracy": metrics["eval_accuracy"],
        "classifier_sum": float(trainer.model.classifier.weight.detach().sum()),
    }
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    # Says, in the test's failure output, whether a crash came before or after
    # the rank's work was done.
    print(f"rank {rank}: report written, process group destroyed", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # CI twice saw one rank abort with "terminate called without an active
    # exception" (SIGABRT) in fresh-clone runs, not reproduced here in 25
    # direct runs; the destroy above did not stop it. Leave without the
    # interpreter's teardown, where native threads can be destroyed while
    # still joinable. Everything the test reads is written and closed above.
    sys.stdout.flush()
    os._exit(0)
