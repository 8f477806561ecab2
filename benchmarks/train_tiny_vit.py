"""Train the small reference image classifier (a ViT) on synthetic scenes.

Each scene holds one coloured shape and two grey distractor shapes; the class is the coloured
shape's name ("red circle", ... 9 classes). A standard ``ViTForImageClassification`` with a
``ViTImageProcessor``, saved to ``tests/fixtures/tiny-vit-scenes``.

    python benchmarks/train_tiny_vit.py              # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atman.evaluate.scenes import CANVAS, CLASSIFIER_CLUTTER, COLOURS, SHAPES, make_scene  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-vit-scenes"
PATCH = 8
LABELS = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


def build_processor() -> ViTImageProcessor:
    return ViTImageProcessor(size={"height": CANVAS, "width": CANVAS}, image_mean=[0.5, 0.5, 0.5],
                             image_std=[0.5, 0.5, 0.5])


def build_model() -> ViTForImageClassification:
    config = ViTConfig(image_size=CANVAS, patch_size=PATCH, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=3, num_attention_heads=4, num_labels=len(LABELS),
                       id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    return ViTForImageClassification(config)


def scene_batch(rng: np.random.Generator, size: int):
    scenes = [make_scene(rng, 1, clutter=CLASSIFIER_CLUTTER) for _ in range(size)]
    pixels = np.stack([np.asarray(s.image, dtype=np.float32) / 255.0 for s in scenes])
    # the processor's normalisation (mean 0.5, std 0.5), done here in bulk
    pixels = torch.from_numpy((pixels - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor([LABELS.index(s.objects[0].name) for s in scenes])
    return scenes, pixels, labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    # one thread: on a small shared CPU, more threads mostly spin (measured: 0.1 s vs 1.7 s CPU per step)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps,
                                                   pct_start=0.05)
    start = time.monotonic()
    model.train()
    for step in range(1, args.steps + 1):
        _, pixels, labels = scene_batch(rng, args.batch_size)
        loss = model(pixel_values=pixels, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.monotonic() - start:.0f}s", flush=True)
        if time.monotonic() - start > args.minutes * 60:
            print(f"time limit reached at step {step}", flush=True)
            break
    model.eval()
    heldout = 500
    _, pixels, labels = scene_batch(np.random.default_rng(10_000 + args.seed), heldout)
    with torch.no_grad():
        accuracy = float((model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean())
    print(f"held-out accuracy: {accuracy:.3f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    build_processor().save_pretrained(args.output)
    (args.output / "training.json").write_text(json.dumps(
        {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
         "parameters": sum(p.numel() for p in model.parameters()),
         "train_seconds": round(time.monotonic() - start), "heldout_accuracy": accuracy,
         "heldout_examples": heldout}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
