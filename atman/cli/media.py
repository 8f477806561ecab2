"""``atman explain`` with images (``--image``), text pairs (``--pair``) and text classifiers (``--classify``).

    atman explain --model DIR --image cat.png "<image>This is a picture of a" --target " cat" -f html -o why.html
    atman explain --model DIR --image scene.png --target "red circle"        # an image classifier
    atman explain --pair "A man is eating food." "A man eats bread."          # embedding similarity
    atman explain --model DIR --classify "A wonderful film." --target POSITIVE

Overlay PNGs (one per image) are written next to the report (``--output``):
``<report stem>-image<N>.png``. A report on stdout comes without them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ModelLoadError
from .shared import UsageError, check_writable, quiet_libraries, read_prompt, suppression, write_explanation, write_file

DEFAULT_PAIR_MODEL = "all-minilm-l6-v2"
# mirror of atman.tiles.IMAGE_GRANULARITIES (tests check they agree)
IMAGE_GRANULARITY_NAMES = ("token", "word", "sentence", "paragraph")


def add_explain_options(parser: argparse.ArgumentParser) -> None:
    """The image, pair and classifier options of ``atman explain``."""
    parser.add_argument("--image", action="append", type=Path, metavar="PATH",
                        help="an image for a vision model (repeatable; <image> markers in the prompt place them)")
    parser.add_argument("--image-granularity", default="token", metavar="G",
                        help="image units: token, word (2x2 patches), sentence (4x4), paragraph (whole image) "
                             "or a tile size ROWSxCOLS (default token)")
    parser.add_argument("--pair", nargs=2, metavar=("TEXT_A", "TEXT_B"),
                        help="explain the embedding similarity of two texts (default model all-MiniLM-L6-v2)")
    parser.add_argument("--classify", action="store_true",
                        help="the model is a text classifier: explain --target (a class name or index; "
                             "default: the predicted class)")


def wanted(args: argparse.Namespace) -> bool:
    """Does this ``atman explain`` call need this module?"""
    return bool(getattr(args, "image", None) or getattr(args, "pair", None) or getattr(args, "classify", False))


def image_granularity(text: str):
    """``token`` .. ``paragraph``, an int or ``ROWSxCOLS``.

    >>> image_granularity("3x4")
    (3, 4)
    """
    if text in IMAGE_GRANULARITY_NAMES:
        return text
    try:
        parts = [int(v) for v in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1 and parts[0] > 0:
        return parts[0]
    if len(parts) == 2 and min(parts) > 0:
        return tuple(parts)
    names = ", ".join(IMAGE_GRANULARITY_NAMES)
    raise UsageError(f"--image-granularity must be one of {names} or ROWSxCOLS, got {text!r}")


def explain(args: argparse.Namespace) -> int:
    """Run the explanation that ``args`` ask for and write the report (and overlays)."""
    if args.input is not None:
        raise UsageError("--input batches are for causal LMs; --image, --pair and --classify take one request")
    if args.max_memory is not None:
        raise UsageError("--max-memory is for text explanations; give --batch-size with --image, --pair or --classify")
    chosen = [name for name, on in (("--image", args.image), ("--pair", args.pair), ("--classify", args.classify))
              if on]
    if len(chosen) > 1:
        raise UsageError(f"choose one of {', '.join(chosen)}")
    if args.pair:
        if args.prompt or args.prompt_file or args.target:
            raise UsageError("--pair takes the two texts itself; do not also give a prompt or --target")
        check_writable(args.output)
        quiet_libraries()
        return _pair(args)
    check_writable(args.output)
    quiet_libraries()
    if args.classify:
        return _classify(args)
    return _images(args)


def _options(args) -> dict:
    out = {"batch_size": args.batch_size, "backend": args.backend}
    if args.mode:
        out["mode"] = args.mode
    out.update(suppression(args))
    return out


def _pair(args) -> int:
    from ..encoders import SimilarityExplainer, load_encoder

    encoder = load_encoder(args.model or DEFAULT_PAIR_MODEL, device=args.device or "cpu")
    explanation = SimilarityExplainer(encoder, **_options(args)).explain(*args.pair, granularity=args.granularity)
    _report(explanation, args, [])
    return 0


def _classify(args) -> int:
    from ..encoders import ClassifierExplainer, load_encoder

    if not args.model:
        raise UsageError("--classify needs --model (a sequence-classification model directory or hub id)")
    text = read_prompt(args)
    encoder = load_encoder(args.model, task="classification", device=args.device or "cpu")
    explanation = ClassifierExplainer(encoder, **_options(args)).explain(text, args.target,
                                                                          granularity=args.granularity)
    _report(explanation, args, [])
    return 0


def _images(args) -> int:
    from PIL import Image, UnidentifiedImageError

    from ..vision import (
        IMAGE_MARKER,
        ImageClassifierExplainer,
        VisionLanguageExplainer,
        load_image_classifier,
        load_vision_language,
    )

    if not args.model:
        raise UsageError("--image needs --model (an image classifier or a vision-language model)")
    images = []
    for path in args.image:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"cannot read image {path}: {exc}") from None
    tiles = image_granularity(args.image_granularity)
    if _is_vision_language(args.model):
        loaded = load_vision_language(args.model, device=args.device or "cpu")
        explainer = VisionLanguageExplainer(loaded, **_options(args))
        prompt = _prompt(args)
        if IMAGE_MARKER not in prompt:
            prompt = IMAGE_MARKER * len(images) + prompt
        target = args.target
        if target is None:
            target = explainer.generate(prompt, images, max_new_tokens=args.max_new_tokens)
        granularity = "word" if args.granularity == "auto" else args.granularity
        explanation = explainer.explain(prompt, target, images=images, granularity=granularity,
                                        image_granularity=tiles, delimiter=args.delimiter)
    else:
        if len(images) != 1:
            raise UsageError("an image classifier explains one image at a time")
        if args.prompt or args.prompt_file:
            raise UsageError("an image classifier takes no prompt; give the class with --target")
        loaded = load_image_classifier(args.model, device=args.device or "cpu")
        explainer = ImageClassifierExplainer(loaded, **_options(args))
        explanation = explainer.explain(images[0], args.target, granularity=tiles)
    _report(explanation, args, images)
    return 0


def _prompt(args) -> str:
    if args.prompt is None and args.prompt_file is None and sys.stdin.isatty():
        return ""
    return read_prompt(args)


def _is_vision_language(model: str) -> bool:
    """A directory whose config names an image token (a vision-language model) or not (a classifier)."""
    config = Path(model) / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        return "image_token_id" in data or "image_token_index" in data
    try:
        from transformers import AutoConfig

        loaded = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {model!r}: {exc}") from exc
    return getattr(loaded, "image_token_id", None) is not None or hasattr(loaded, "image_token_index")


def _report(explanation, args, images: list) -> None:
    if args.format == "html" and images:
        from ..render.html import render_html

        text = render_html(explanation, images=images)
        if args.output is None:
            sys.stdout.write(text)
        else:
            write_file(args.output, text)
    else:
        write_explanation(explanation, args.format, args.output)
    if images and args.output is not None:
        from ..render.image import save_overlays

        scale = max(1, 256 // max(max(image.size) for image in images))
        try:
            paths = save_overlays(explanation, images, args.output, scale=scale)
        except OSError as exc:
            raise UsageError(f"cannot write the overlays next to {args.output}: {exc}") from None
        if not args.quiet:
            print("overlays: " + ", ".join(str(p) for p in paths), file=sys.stderr)
    elif images and not args.quiet:
        print("atman: give --output to also get overlay PNGs of the images", file=sys.stderr)
