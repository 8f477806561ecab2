"""Train AT2's score estimator for SmolLM2 with AT2's own training code, on the development split.

AT2 (``pip install at2``) publishes estimators for a few larger models, none for SmolLM2. This runs its
``AT2Trainer`` as its training notebook does — its random ablations of each training context (attention
masked over the dropped sources, keep probability 0.5, ``--masks`` per context), its attention features,
its Pearson-correlation loss and its Adam schedule — on the contexts of the real-document development split
(:func:`atman.evaluate.cite_real.split`), which share no question with the held-out split AT2 is measured
on. The responses are the gold responses (written as the trainer's "generations", so nothing is
generated), and the whole response is one target (``split_target_by=None``: the harness attributes the
whole response). AT2's own runs train on a few thousand examples; this is 27 contexts, all this CPU could
afford, so the estimator is a small one.

    OMP_NUM_THREADS=1 python benchmarks/train_at2.py --work /tmp/at2-smollm2 \\
        --out atman/baselines/data/at2-smollm2.pt
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from atman import load_model
from atman.baselines.at2 import harness_task, import_at2, model_type
from atman.evaluate.cite_real import shortest, split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="AT2's save path (ablation data, checkpoints)")
    parser.add_argument("--out", type=Path, required=True, help="where to copy the trained estimator")
    parser.add_argument("--split", default="dev", help="the real-document split to train on")
    parser.add_argument("--masks", type=int, default=32, help="ablations per context (AT2's default 32)")
    parser.add_argument("--iterations", type=int, default=1000, help="training steps (AT2's default 1,000)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="AT2's default 1e-3")
    parser.add_argument("--batch-size", type=int, default=4, help="ablated contexts per forward pass")
    parser.add_argument("--shortest", action="store_true",
                        help="one context per question: the shortest of its three positions")
    parser.add_argument("--limit", type=int, help="train on the first N contexts only (a smoke test)")
    args = parser.parse_args(argv)

    at2 = import_at2()
    from datasets import Dataset

    lm = load_model()
    documents = split(args.split)
    if args.shortest:
        documents = shortest(documents)
    documents = documents[: args.limit]
    tasks = [d.example.task for d in documents]
    generations = args.work / "generations"
    generations.mkdir(parents=True, exist_ok=True)
    # the trainer generates only the generations it does not find: ours are the gold responses
    (generations / "0_of_1.json").write_text(json.dumps({i: t.response for i, t in enumerate(tasks)}))
    config = lm.model.config
    extractor = at2.AT2FeatureExtractor(config.num_hidden_layers, config.num_attention_heads,
                                        model_type=model_type(lm))
    trainer = at2.AT2Trainer(
        save_path=args.work, dataset=Dataset.from_dict({"index": list(range(len(tasks)))}), model=lm.model,
        tokenizer=lm.tokenizer, task_from_example=lambda example, *_: harness_task(lm, tasks[example["index"]]),
        feature_extractor=extractor, split_target_by=None, num_masks=args.masks)
    started, cpu = time.time(), time.process_time()
    with contextlib.redirect_stderr(io.StringIO()):
        trainer.generate(job_index=0, num_jobs=1)
    trainer.compute_features_and_outputs(job_index=0, num_jobs=1, batch_size=args.batch_size)
    collected = time.process_time() - cpu
    torch.manual_seed(0)
    np.random.seed(0)   # the trainer samples its batches from NumPy's global generator
    estimator = trainer.train(num_iterations=args.iterations, learning_rate=args.learning_rate,
                              batch_size=min(512, len(tasks)), device="cpu", save_name="smollm2")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(args.work / "estimators" / "smollm2" / "score_estimator.pt", args.out)
    summary = {"contexts": [d.name for d in documents], "masks": args.masks, "iterations": args.iterations,
               "learning_rate": args.learning_rate, "collect_cpu_seconds": collected,
               "total_cpu_seconds": time.process_time() - cpu, "wall_seconds": time.time() - started,
               "weights": estimator.linear.weight.detach().flatten().tolist()}
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"trained on {len(tasks)} contexts in {summary['wall_seconds'] / 60:.1f} min -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
