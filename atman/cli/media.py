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
from typing import Any

from ..errors import ModelLoadError
from .shared import (
    UsageError,
    check_writable,
    quiet_libraries,
    read_prompt,
    said,
    said_written,
    suppression,
    text_only_options,
    write_explanation,
    write_file,
)

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
        raise UsageError("--image, --pair and --classify take one request; in an --input batch, give each line "
                         "its own \"image\", \"pair\" or \"classify\" field instead")
    if args.max_memory is not None:
        raise UsageError("--max-memory is for text explanations; give --batch-size with --image, --pair or --classify")
    ignored = text_only_options(args)
    if ignored:
        raise UsageError(f"{said(ignored)} only to text explanations; --image, --pair and --classify load their "
                         "model in float32 on --device and run every row in full")
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

    from ..vision import ImageClassifierExplainer, load_image_classifier
    from ..vision_language import IMAGE_MARKER, VisionLanguageExplainer, load_vision_language

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


# fields of a media line in an ``atman explain --input`` batch, by the field that marks its kind
MEDIA_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "pair": {"id": (str, int), "pair": (list,), "granularity": (str,), "multiplier": (int, float)},
    "classify": {"id": (str, int), "classify": (str,), "target": (str, int, type(None)), "granularity": (str,),
                 "multiplier": (int, float)},
    "image": {"id": (str, int), "image": (str, list), "prompt": (str,), "target": (str, int, type(None)),
              "granularity": (str,), "image_granularity": (str,), "multiplier": (int, float),
              "max_new_tokens": (int,)},
}


def media_kind(line: str) -> str | None:
    """``pair``, ``classify`` or ``image`` when a batch line is a media request (else None: a text prompt)."""
    try:
        request = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(request, dict):
        return None
    return next((kind for kind in MEDIA_FIELDS if kind in request), None)


class MediaBatch:
    """The media lines of a batch: each kind's model is loaded once, on its first line.

    Pair lines use the embedded all-MiniLM-L6-v2 (``--model`` is the model of the batch's other lines);
    classify and image lines use ``--model`` (a classifier, an image classifier or a vision-language
    model). Image paths are read relative to ``base`` (the input file's folder).
    """

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.base = base
        self.explainers: dict[str, Any] = {}
        # the batch's own settings: --batch-size, --backend, --mode (a line may set its multiplier)
        self.options: dict[str, Any] = {"batch_size": args.batch_size, "backend": args.backend}
        if args.mode:
            self.options["mode"] = args.mode

    def explainer(self, kind: str) -> Any:
        if kind in self.explainers:
            return self.explainers[kind]
        args = self.args
        device = args.device or "cpu"
        ignored = text_only_options(args)
        if ignored:
            # the batch's text lines honour them; say so once per kind rather than change this kind silently
            print(f"atman: {said(ignored)} only to the batch's text lines; its {kind} lines load their model in "
                  f"float32 on {device} and run every row in full", file=sys.stderr)
        quiet_libraries()
        if kind == "pair":
            from ..encoders import SimilarityExplainer, load_encoder

            made: Any = SimilarityExplainer(load_encoder(DEFAULT_PAIR_MODEL, device=device),
                                            **self.options)
        elif not args.model:
            raise UsageError(f"{kind} lines need --model (a classifier, an image classifier or a vision-language "
                             "model)")
        elif kind == "classify":
            from ..encoders import ClassifierExplainer, load_encoder

            made = ClassifierExplainer(load_encoder(args.model, task="classification", device=device),
                                       **self.options)
        elif _is_vision_language(args.model):
            from ..vision_language import VisionLanguageExplainer, load_vision_language

            made = VisionLanguageExplainer(load_vision_language(args.model, device=device),
                                           **self.options)
        else:
            from ..vision import ImageClassifierExplainer, load_image_classifier

            made = ImageClassifierExplainer(load_image_classifier(args.model, device=device),
                                            **self.options)
        self.explainers[kind] = made
        return made

    def __call__(self, line: str) -> dict[str, Any]:
        from ..batch import read_object

        kind = media_kind(line)
        if kind is None:
            raise UsageError("not a media request")
        request = read_object(line, MEDIA_FIELDS[kind], (kind,))
        options = {k: request[k] for k in ("multiplier",) if k in request}
        granularity = request.get("granularity", "auto")
        explainer = self.explainer(kind)
        if kind == "pair":
            texts = request["pair"]
            if len(texts) != 2 or not all(isinstance(t, str) for t in texts):
                raise UsageError("pair must be a list of two texts")
            return explainer.explain(*texts, granularity=granularity,
                                     multiplier=options.get("multiplier")).to_dict()
        if kind == "classify":
            return explainer.explain(request["classify"], request.get("target"), granularity=granularity,
                                     multiplier=options.get("multiplier")).to_dict()
        images = self._images(request["image"])
        tiles = image_granularity(request.get("image_granularity", "token"))
        if hasattr(explainer, "prepare"):  # a vision-language model
            from ..vision_language import IMAGE_MARKER

            prompt = request.get("prompt", "")
            if IMAGE_MARKER not in prompt:
                prompt = IMAGE_MARKER * len(images) + prompt
            target = request.get("target")
            if target is None:
                target = explainer.generate(prompt, images, max_new_tokens=request.get("max_new_tokens", 32))
            return explainer.explain(prompt, str(target), images=images,
                                     granularity="word" if granularity == "auto" else granularity,
                                     image_granularity=tiles, multiplier=options.get("multiplier")).to_dict()
        if len(images) != 1 or "prompt" in request:
            raise UsageError("an image classifier explains one image and takes no prompt")
        return explainer.explain(images[0], request.get("target"), granularity=tiles,
                                 multiplier=options.get("multiplier")).to_dict()

    def _images(self, value: str | list) -> list:
        from PIL import Image, UnidentifiedImageError

        paths = [value] if isinstance(value, str) else value
        if not paths or not all(isinstance(p, str) for p in paths):
            raise UsageError("image must be a path or a list of paths")
        images = []
        for name in paths:
            path = Path(name) if Path(name).is_absolute() else self.base / name
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, UnidentifiedImageError) as exc:
                raise UsageError(f"cannot read image {name}: {exc}") from None
        return images


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
            said_written(args.output, "the explanation as an HTML page with the images' overlays", args.quiet)
    else:
        write_explanation(explanation, args.format, args.output, args.quiet)
    if images and args.output is not None:
        from ..render.image import save_overlays

        scale = max(1, 256 // max(max(image.size) for image in images))
        try:
            paths = save_overlays(explanation, images, args.output, scale=scale)
        except OSError as exc:
            raise UsageError(f"cannot write the overlays next to {args.output}: {exc}") from None
        said_written(", ".join(str(p) for p in paths), "the relevance overlays (PNG)", args.quiet)
    elif images and not args.quiet:
        print("atman: give --output to also get overlay PNGs of the images", file=sys.stderr)
