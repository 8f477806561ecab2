"""Vision-language explanation: the engine's path against running the whole model for every row.

    python benchmarks/vlm_speed.py --reps 5 --json benchmarks/results/cpu-vlm-llava.json

Both paths explain the same scenes with the same multiplier rows (every text word and every image
token tile of the committed reference LLaVA, tests/fixtures/tiny-llava-scenes):

* ``full-inputs``: every row runs the whole model on the processor's inputs (the vision tower and
  projector run once per row, every position is recomputed) — how the explainer ran before the
  engine took it over, and what it still does for models that fail the fast-path check;
* ``engine``: the vision tower runs once; the rows run the language model on its input embeddings,
  reusing the unperturbed prefix (``VisionLanguageExplainer.losses``).

It prints time and forward token-passes of each, their ratios, and the largest difference of the
losses (the two paths must agree). Runs alternate between the paths so that load on a shared
machine affects both alike.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from atman.evaluate.scenes import CAPTION_PREFIX, make_scene
from atman.rows import suppression_rows
from atman.tiles import ImageGrid, grid_tiles
from atman.units import prompt_units
from atman.vision_language import VisionLanguageExplainer, load_vision_language

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tiny-llava-scenes"


def rows_for(explainer: VisionLanguageExplainer, prepared) -> torch.Tensor:
    """One row per prompt word and per image token (the reference model's image run is a square grid)."""
    encoded = prepared.encoded
    units = [u.positions for u in prompt_units(encoded, "word")]
    run = prepared.image_runs[0]
    side = math.isqrt(len(run))
    tiles = grid_tiles(ImageGrid(side, side), "token")
    units += [tuple(run[c] for c in tile.cells) for tile in tiles]
    return suppression_rows(len(encoded.input_ids), units, explainer.multiplier)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    explainer = VisionLanguageExplainer(load_vision_language(str(FIXTURE)))
    rng = np.random.default_rng(31)
    cases = []
    for _ in range(args.scenes):
        scene = make_scene(rng, 2)
        prompt = "<image>" + CAPTION_PREFIX
        prepared = explainer.prepare(prompt, " " + scene.objects[0].name, [scene.image])
        cases.append((prepared, rows_for(explainer, prepared)))
    targets = [torch.tensor(p.encoded.input_ids[p.encoded.target_start:]) for p, _ in cases]
    explainer.losses(*cases[0])  # warm-up, and the fast-path check
    seconds = {"full-inputs": 0.0, "engine": 0.0}
    token_forwards = {"full-inputs": 0, "engine": 0}
    worst = 0.0
    for _ in range(args.reps):
        for (prepared, rows), target in zip(cases, targets, strict=True):
            engine = explainer.engine
            before = engine.token_forwards
            start = time.perf_counter()
            old = engine.target_losses(prepared.inputs, target, rows, engine="naive")
            seconds["full-inputs"] += time.perf_counter() - start
            token_forwards["full-inputs"] += engine.token_forwards - before
            before = engine.token_forwards
            start = time.perf_counter()
            new = explainer.losses(prepared, rows)
            seconds["engine"] += time.perf_counter() - start
            token_forwards["engine"] += engine.token_forwards - before
            worst = max(worst, float((old - new).abs().max()))
    report = {
        "model": "tiny-llava-scenes", "scenes": args.scenes, "reps": args.reps, "threads": args.threads,
        "rows_per_explanation": int(cases[0][1].shape[0]), "sequence_tokens": len(cases[0][0].encoded.input_ids),
        "fast_path": explainer.fast_path, "seconds": seconds, "token_forwards": token_forwards,
        "time_ratio_engine_vs_full_inputs": seconds["engine"] / seconds["full-inputs"],
        "token_forward_ratio_engine_vs_full_inputs": token_forwards["engine"] / token_forwards["full-inputs"],
        "max_abs_loss_difference": worst, "torch": torch.__version__, "machine": platform.machine(),
    }
    print(f"{report['rows_per_explanation']} rows of {report['sequence_tokens']} tokens, "
          f"{args.scenes} scenes x {args.reps} reps, fast path: {explainer.fast_path}")
    for name in seconds:
        print(f"  {name:12s} {seconds[name]:8.2f} s  {token_forwards[name]:>9} token-forwards (language model)")
    print(f"  engine / full inputs: time {report['time_ratio_engine_vs_full_inputs']:.3f}, token-forwards "
          f"{report['token_forward_ratio_engine_vs_full_inputs']:.3f}; largest loss difference {worst:.2e}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
