"""The AtMan paper's OpenImages-style check on held-out synthetic scenes: AtMan vs IG vs random.

For every object of every scene, a relevance grid over the image's patch tokens is scored against
the object's mask (precision and recall, ``atman.evaluate.image_metrics``):

* ``vlm``: the captioning LLaVA in tests/fixtures/tiny-llava-scenes. Prompt: image + "This is a
  picture of a" (+ the names before it, for the second object), target: the object's name.
* ``vit``: the ViT classifier in tests/fixtures/tiny-vit-scenes on one coloured shape among grey
  distractors; target: the true class.

Methods: AtMan (token tiles, multiplier 0.1, log-additive); Captum IntegratedGradients on the image
embeddings that the model consumes (the projector's output for the VLM, the patch embeddings for
the ViT; zero baseline, 32 steps; attribution summed over the hidden dimension); uniformly random
grids. Negative relevance is clipped to 0 for every method.

    python benchmarks/image_relevance.py --task vlm --scenes 100
    python benchmarks/image_relevance.py --task vit --scenes 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from atman.evaluate.image_metrics import mask_to_grid, precision_recall  # noqa: E402
from atman.evaluate.scenes import CAPTION_PREFIX, CLASSIFIER_CLUTTER, make_scene  # noqa: E402
from atman.tiles import ImageGrid, relevance_grid  # noqa: E402
from atman.vision import ImageClassifierExplainer, load_image_classifier  # noqa: E402
from atman.vision_language import VisionLanguageExplainer, load_vision_language  # noqa: E402

FIXTURES = Path(__import__("os").environ.get("ATMAN_FIXTURES", ROOT / "tests" / "fixtures"))
IG_STEPS = 32


def integrated_gradients(module: torch.nn.Module, run, embeddings: torch.Tensor) -> np.ndarray:
    """IG of ``run(batch size)`` (a per-row score) w.r.t. the output of ``module``, summed over the
    hidden dimension: one value per image token."""
    from captum.attr import IntegratedGradients

    state: dict = {}

    def replace(_module, _inputs, output):
        return state["value"]

    def forward(values: torch.Tensor) -> torch.Tensor:
        state["value"] = values.reshape(-1, *embeddings.shape[1:])
        return run(values.shape[0])

    handle = module.register_forward_hook(replace)
    try:
        attributions = IntegratedGradients(forward).attribute(
            embeddings, baselines=torch.zeros_like(embeddings), n_steps=IG_STEPS, internal_batch_size=IG_STEPS)
    finally:
        handle.remove()
    return attributions.sum(dim=-1).detach().numpy()


def vlm_case(explainer: VisionLanguageExplainer, scene, k: int, kappa: float | None) -> dict[str, np.ndarray]:
    model = explainer.loaded.model
    names = [obj.name for obj in scene.objects]
    prompt = "<image>" + CAPTION_PREFIX + "".join(f" {n} and a" for n in names[:k])
    target = " " + names[k]
    exp = explainer.explain(prompt, target, images=[scene.image], kappa=kappa)
    geometry = exp.settings["images"][0]
    grid = ImageGrid(geometry["rows"], geometry["cols"])
    atman = relevance_grid(exp.explanations[0].items, 0, grid)
    prepared = explainer.prepare(prompt, target, [scene.image])
    inputs = prepared.inputs
    start = prepared.encoded.target_start
    targets = torch.tensor(prepared.encoded.input_ids[start:])
    projector = model.model.multi_modal_projector
    with torch.no_grad():
        captured: dict = {}
        hook = projector.register_forward_hook(lambda m, i, o: captured.setdefault("out", o.detach()))
        model(**inputs)
        hook.remove()

    def run(rows: int) -> torch.Tensor:
        batch = {key: torch.cat([v] * rows) if isinstance(v, torch.Tensor) else v for key, v in inputs.items()}
        logits = model(**batch, use_cache=False).logits[:, start - 1:-1]
        logprobs = torch.log_softmax(logits.float(), -1)
        return logprobs.gather(-1, targets.expand(rows, -1)[..., None])[..., 0].sum(-1)

    ig = integrated_gradients(projector, run, captured["out"]).reshape(grid.rows, grid.cols)
    return {"atman": atman, "ig": ig, "mask": mask_to_grid(scene.objects[k].mask, grid.rows, grid.cols)}


def vit_case(explainer: ImageClassifierExplainer, scene) -> dict[str, np.ndarray]:
    model = explainer.loaded.model
    label = scene.objects[0].name
    exp = explainer.explain(scene.image, target=label)
    geometry = exp.settings["images"][0]
    grid = ImageGrid(geometry["rows"], geometry["cols"])
    atman = relevance_grid(exp.explanations[0].items, 0, grid)
    pixels = explainer.pixel_values(scene.image)
    index = exp.settings["class_index"]
    patches = model.vit.embeddings.patch_embeddings
    with torch.no_grad():
        embeddings = patches(pixels).detach()

    def run(rows: int) -> torch.Tensor:
        return torch.log_softmax(model(pixel_values=pixels.expand(rows, -1, -1, -1)).logits, -1)[:, index]

    ig = integrated_gradients(patches, run, embeddings).reshape(grid.rows, grid.cols)
    return {"atman": atman, "ig": ig, "mask": mask_to_grid(scene.objects[0].mask, grid.rows, grid.cols)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("vlm", "vit"), required=True)
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=20_000, help="held out: training used seeds below 10,100")
    parser.add_argument("--multiplier", type=float, default=0.1,
                        help="AtMan: attention multiplier of a suppressed tile")
    parser.add_argument("--kappa", type=float, help="vlm: AtMan conceptual suppression threshold (default off)")
    parser.add_argument("--output", type=Path, help="write the figures as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    noise = np.random.default_rng(args.seed + 1)
    cases = []
    start = time.monotonic()
    if args.task == "vlm":
        explainer = VisionLanguageExplainer(load_vision_language(str(FIXTURES / "tiny-llava-scenes")),
                                            multiplier=args.multiplier)
        for _ in range(args.scenes):
            scene = make_scene(rng, 2)
            cases += [vlm_case(explainer, scene, k, args.kappa) for k in range(len(scene.objects))]
    else:
        explainer = ImageClassifierExplainer(load_image_classifier(str(FIXTURES / "tiny-vit-scenes")),
                                             multiplier=args.multiplier)
        for _ in range(args.scenes):
            cases.append(vit_case(explainer, make_scene(rng, 1, clutter=CLASSIFIER_CLUTTER)))
    results = {}
    for method in ("atman", "ig", "random"):
        scores = [precision_recall(case[method] if method != "random" else noise.random(case["mask"].shape),
                                   case["mask"]) for case in cases]
        precision, recall = np.array(scores).T
        results[method] = {"mean_precision": round(float(precision.mean()) * 100, 1),
                           "mean_recall": round(float(recall.mean()) * 100, 1)}
    report = {"task": args.task, "cases": len(cases), "multiplier": args.multiplier, "kappa": args.kappa,
              "seconds": round(time.monotonic() - start), **results}
    print(json.dumps(report, indent=1))
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
