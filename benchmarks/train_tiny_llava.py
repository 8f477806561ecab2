"""Train the small image-captioning reference model (a LLaVA: CLIP vision tower + projector + Llama).

The model learns to caption synthetic scenes (``atman.evaluate.scenes``): "This is a picture of a
red circle and a blue square", objects named left to right. It is a standard
``LlavaForConditionalGeneration`` with a ``LlavaProcessor``, so AtMan finds its image tokens the way
it does for any LLaVA. Weights, tokenizer and processor are saved to ``tests/fixtures/tiny-llava-scenes``.

    python benchmarks/train_tiny_llava.py            # at most 12 CPU-minutes (one thread)

Training stops at ``--steps`` or after ``--cpu-minutes`` of process CPU time, whichever comes
first (CPU time, not wall time, so that a shared machine gives the same model); the learning rate
follows a cosine over that progress.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from atman.evaluate.scenes import CANVAS, COLOURS, SHAPES, make_scene  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-llava-scenes"
PATCH = 8
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
WORDS = ["This", "is", "a", "picture", "of", "and", *COLOURS, *SHAPES]


def build_processor() -> LlavaProcessor:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": CANVAS}, crop_size={"height": CANVAS, "width": CANVAS},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def build_model(processor: LlavaProcessor) -> LlavaForConditionalGeneration:
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=CANVAS, patch_size=PATCH, projection_dim=64)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(CANVAS // PATCH) ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    return LlavaForConditionalGeneration(config)


def batch(processor: LlavaProcessor, rng: np.random.Generator, size: int) -> dict[str, torch.Tensor]:
    scenes = [make_scene(rng) for _ in range(size)]
    texts = ["<image>" + scene.caption() + "</s>" for scene in scenes]
    enc = processor(images=[s.image for s in scenes], text=texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[labels == processor.tokenizer.convert_tokens_to_ids("<image>")] = -100
    enc["labels"] = labels
    return enc


def caption_accuracy(model, processor, rng: np.random.Generator, count: int) -> float:
    """Share of fresh scenes whose greedy caption is exactly right."""
    from atman.evaluate.scenes import CAPTION_PREFIX

    right = 0
    for _ in range(count):
        scene = make_scene(rng)
        enc = processor(images=scene.image, text="<image>" + CAPTION_PREFIX, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=8, do_sample=False)
        words = processor.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += (CAPTION_PREFIX + " " + words).split() == scene.caption().split()
    return right / count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-minutes", type=float, default=12.0, help="stop after this much process CPU time")
    parser.add_argument("--output", type=Path, default=OUT)
    args = parser.parse_args()
    # one thread: on a small shared CPU, more threads mostly spin (measured: 0.1 s vs 1.7 s CPU per step)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    processor = build_processor()
    model = build_model(processor)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {params}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start, cpu_start = time.monotonic(), time.process_time()
    budget = args.cpu_minutes * 60
    model.train()
    progress = 0.0
    step = 0
    while progress < 1.0:
        step += 1
        warm = min(1.0, step / 50)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * warm * 0.5 * (1.0 + math.cos(math.pi * progress))
        loss = model(**batch(processor, rng, args.batch_size)).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        progress = max(step / args.steps, (time.process_time() - cpu_start) / budget)
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f} wall {time.monotonic() - start:.0f}s "
                  f"cpu {time.process_time() - cpu_start:.0f}s", flush=True)
    model.eval()
    heldout = 200
    accuracy = caption_accuracy(model, processor, np.random.default_rng(10_000 + args.seed), heldout)
    print(f"held-out caption accuracy: {accuracy:.3f}", flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    (args.output / "training.json").write_text(json.dumps(
        {"steps": step, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "parameters": params,
         "train_wall_seconds": round(time.monotonic() - start),
         "train_cpu_seconds": round(time.process_time() - cpu_start), "heldout_caption_accuracy": accuracy,
         "heldout_examples": heldout},
        indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
