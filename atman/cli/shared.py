"""What every ``atman`` command shares: option types, model loading, reading inputs and writing outputs.

Nothing here imports torch or transformers at module level: ``atman --help`` and argument errors
must answer before those load. The option choices come from :mod:`atman.defaults`, which is free of
torch too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..defaults import BACKENDS, ENGINES, FACTOR_RENAMED
from ..errors import AtmanError

DTYPES = ("float32", "bfloat16", "float16")
# the largest count an option takes: beyond it numbers stop being sizes and start overflowing tensors
MAX_COUNT = 2**31 - 1
# the explainer's suppression option (see suppression()); "factor", its old, inverted spelling, is refused
SUPPRESSION_FIELD = "multiplier"
RENAMED_FIELD = "factor"


class UsageError(AtmanError):
    """Options or input that do not fit together (exit code 2)."""


def finite_float(text: str) -> float:
    """An argparse type: a float that is neither NaN nor infinite.

    >>> finite_float("0.5")
    0.5
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer from 1 to 2**31 - 1.

    >>> count("8")
    8
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must lie in 1..{MAX_COUNT}, got {text}")
    return value


def add_model_options(parser: argparse.ArgumentParser, *, explainer: bool = True) -> None:
    """``--model``, ``--dtype``, ``--device`` and (``explainer``) the explainer's batching options."""
    parser.add_argument("--model", "-m", default=None,
                        help="hub id, model directory, .gguf file, 'smollm2' (default) or 'gemma3-270m'")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps or auto")
    add_placement_options(parser)
    if not explainer:
        return
    parser.add_argument("--backend", default="sdpa", choices=BACKENDS, help="attention kernel for log-additive")
    parser.add_argument("--batch-size", type=count, help="perturbations per forward pass (default: automatic)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="memory budget for a batch, e.g. 2GB (default: a quarter of free RAM; on GPU "
                             "a few plain forward passes)")
    parser.add_argument("--engine", default="cached", choices=ENGINES,
                        help="cached: reuse the unperturbed prefix (exact, faster); naive: full passes")


def text_only_options(args: argparse.Namespace) -> list[str]:
    """The options given that only text models honour: media explainers and served vision-language models
    run in float32, whole, on ``--device`` (a command without one of these options never gives it)."""
    return [name for name, given in (("--dtype", getattr(args, "dtype", "float32") != "float32"),
                                     ("--device-map", getattr(args, "device_map", None) is not None),
                                     ("--engine", getattr(args, "engine", "cached") != "cached"),
                                     ("--max-memory", getattr(args, "max_memory", None) is not None)) if given]


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """Loading options passed to :func:`atman.load_model`: models split across devices, hub revisions."""
    parser.add_argument("--device-map", metavar="auto|JSON",
                        help="split the model across devices: 'auto', or a JSON object from module names to a GPU "
                             "index, \"cpu\" or \"disk\" (instead of --device)")
    parser.add_argument("--max-memory-per-device", metavar="DEV=SIZE,...",
                        help="with --device-map: memory per device, e.g. 0=70GiB,1=70GiB,cpu=200GiB")
    parser.add_argument("--offload-folder", type=Path, metavar="DIR", help="with --device-map: where disk layers go")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit) of --model")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a hub model's own code to run")


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of :func:`atman.load_model` from the loading options of ``args``."""
    options: dict[str, Any] = {"dtype": args.dtype}
    device_map = getattr(args, "device_map", None)
    if device_map is not None:
        if args.device is not None:
            raise UsageError("give --device (one device) or --device-map (a model split across devices), not both")
        if device_map.strip().startswith("{"):
            try:
                device_map = json.loads(device_map)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--device-map: not valid JSON: {exc}") from None
        options["device_map"] = device_map
    else:
        options["device"] = args.device or "cpu"
    per_device = getattr(args, "max_memory_per_device", None)
    if per_device is not None:
        if device_map is None:
            raise UsageError("--max-memory-per-device goes with --device-map")
        memory: dict[int | str, str] = {}
        for part in filter(None, (p.strip() for p in per_device.split(","))):
            name, eq, size = part.partition("=")
            if not eq or not size.strip():
                raise UsageError(f"--max-memory-per-device: write DEVICE=SIZE pairs, got {part!r}")
            memory[int(name) if name.strip().isdigit() else name.strip()] = size.strip()
        options["max_memory"] = memory
    if getattr(args, "offload_folder", None) is not None:
        options["offload_folder"] = args.offload_folder
    if getattr(args, "revision", None):
        options["revision"] = args.revision
    if getattr(args, "trust_remote_code", False):
        options["trust_remote_code"] = True
    return options


def add_suppression_option(parser: argparse.ArgumentParser) -> None:
    """The explainer's suppression option ``--multiplier`` (and the refused old ``--factor``)."""
    parser.add_argument("--multiplier", type=finite_float,
                        help="attention multiplier of a suppressed unit: 0.1 (default) damps it to a tenth, 0 removes "
                             "it, 1 leaves it (the paper's suppression factor f is 1 - multiplier)")
    parser.add_argument("--factor", type=finite_float, help=argparse.SUPPRESS)


def renamed_factor(where: str) -> UsageError:
    """The error for the old, inverted ``factor`` spelling (``where``: the option or field that used it)."""
    text = FACTOR_RENAMED.replace("`", "")
    if where.startswith("--"):
        text = text.replace("pass multiplier", "pass --multiplier")
    return UsageError(f"{where}: {text}")


def suppression(args: argparse.Namespace) -> dict[str, float]:
    """The explainer keyword for the suppression option of ``args`` (nothing when not given)."""
    if getattr(args, RENAMED_FIELD, None) is not None:
        raise renamed_factor("--" + RENAMED_FIELD)
    value = getattr(args, SUPPRESSION_FIELD)
    return {} if value is None else {SUPPRESSION_FIELD: value}


def quiet_libraries() -> None:
    """transformers' own warnings and progress bars off (the CLI reports what matters itself)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def memory_budget(text: str | None) -> int | str | None:
    """``--max-memory`` read as the core reads it, with a usage error for what it cannot take."""
    if text is None:
        return None
    from ..budget import parse_memory

    try:
        return parse_memory(text)
    except OverflowError:  # e.g. 1e999: a float that no integer holds
        raise UsageError(f"--max-memory {text!r} is too large a number") from None
    except AtmanError as exc:
        raise UsageError(f"--max-memory: {exc}") from None


def load_explainer(args: argparse.Namespace) -> Any:
    """The model named by ``args`` in an :class:`atman.Explainer` with the batching options."""
    budget = memory_budget(args.max_memory)
    quiet_libraries()
    from ..explainer import Explainer
    from ..models import load_model

    with status(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'}", args.quiet):
        lm = load_model(args.model, **load_options(args))
    return Explainer(lm, backend=args.backend, batch_size=args.batch_size, engine=args.engine, max_memory=budget)


def warn_small_budget(explainer: Any, text: str) -> bool:
    """Warn (once per call) when ``--max-memory`` is below one plain forward pass of ``text``.

    The explainer then still runs, one perturbation per pass, but above its budget; returns whether
    it warned.
    """
    engine = explainer.engine
    if not isinstance(engine.max_memory, int):
        return False
    budget = engine.max_memory
    length = len(explainer.lm.tokenizer(text)["input_ids"])
    plain = engine.memory.plain_forward(max(length, 1))
    if budget >= plain:
        return False
    print(f"atman: warning: --max-memory {budget} bytes is below one plain forward pass of this input "
          f"(about {plain / 1e6:.1f} MB); running one perturbation per pass, above the budget", file=sys.stderr)
    return True


def read_text(path: Path) -> str:
    """A UTF-8 text file (a byte-order mark is dropped), or a usage error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def strip_final_newline(text: str) -> str:
    """Files and pipes end with a newline the user did not mean as part of the prompt."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def read_prompt(args: argparse.Namespace) -> str:
    """The prompt from the argument, ``--prompt-file`` or standard input."""
    if args.prompt is not None and args.prompt_file is not None:
        raise UsageError("give the prompt either as an argument or with --prompt-file, not both")
    if args.prompt_file is not None:
        return strip_final_newline(read_text(args.prompt_file))
    if args.prompt is not None:
        return args.prompt
    if not sys.stdin.isatty():
        return strip_final_newline(sys.stdin.read())
    raise UsageError("no prompt: give one as an argument, with --prompt-file, --input or on stdin")


def check_writable(path: Path | None, *, directory: bool = False) -> None:
    """Refuse an output ``path`` that cannot be written, before any work is done.

    ``directory``: the path is a directory to create (or reuse) rather than a file.
    """
    if path is None:
        return
    if directory:
        existing = next((p for p in (path, *path.parents) if p.exists()), Path("."))
        if existing.exists() and not existing.is_dir():
            raise UsageError(f"cannot write into {path}: {existing} is not a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UsageError(f"cannot write into {path}: {existing} is not writable")
        return
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: no directory {parent}")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise UsageError(f"cannot write {path}: permission denied")


def write_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (UTF-8) or raise a usage error naming it."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror}") from None


def write_explanation(explanation: Any, fmt: str, output: Path | None, quiet: bool = False) -> None:
    """An :class:`atman.Explanation` as ``text`` (terminal), ``json`` or ``html``, to ``output`` or stdout;
    a file written is named on stderr (unless ``quiet``)."""
    if fmt == "json":
        text = explanation.to_json(indent=1) + "\n"
    elif fmt == "html":
        from ..render.html import render_html

        text = render_html(explanation)
    else:
        from rich.console import Console

        from ..render.terminal import render_terminal

        if output is None:
            render_terminal(explanation)
            return
        console = Console(record=True, file=io.StringIO(), width=100)
        render_terminal(explanation, console)
        text = console.export_text()
    if output is None:
        sys.stdout.write(text)
    else:
        write_file(output, text)
        said_written(output, WRITTEN[fmt], quiet)


# what each --format writes, for the line that names the file
WRITTEN = {"json": "the explanation as JSON", "html": "the explanation as an HTML page",
           "text": "the explanation as text"}


def said(options: list[str]) -> str:
    """``--dtype applies`` / ``--dtype and --engine apply``: options as the subject of a sentence."""
    if len(options) == 1:
        return f"{options[0]} applies"
    return f"{', '.join(options[:-1])} and {options[-1]} apply"


def said_written(path: Path, what: str, quiet: bool = False) -> None:
    """One line on stderr naming a file a command wrote and what it holds."""
    if not quiet:
        print(f"atman: wrote {what} to {path}", file=sys.stderr)


def interactive(quiet: bool) -> bool:
    """Progress bars and status lines only on a terminal, and not with ``--quiet``."""
    return not quiet and sys.stderr.isatty()


@contextlib.contextmanager
def status(message: str, quiet: bool) -> Iterator[None]:
    """A spinner with ``message`` on stderr while the block runs (on a terminal)."""
    if not interactive(quiet):
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message + " ..."):
        yield


@contextlib.contextmanager
def progress(description: str, quiet: bool, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """A callback ``(done, total)`` that drives a rich progress bar on stderr, or does nothing."""
    if not interactive(quiet):
        yield lambda done, total: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, all_: int) -> None:
            bar.update(task, completed=done, total=all_)

        yield update
