"""The evaluation examples: invented-fact QA, the SQuAD fixture, and plain texts that ship with Python.

Every example is a prompt, a target (text, or None for the model's greedy continuation) and the
gold character spans of the prompt (empty where no ground truth is known, i.e. faithfulness only).

Example::

    >>> ex = squad_examples()[0]
    >>> ex.prompt[ex.gold[0][0]:ex.gold[0][1]] == ex.target.strip()
    True
"""

from __future__ import annotations

import ast
import codecs
import importlib
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .context_qa import make_examples

DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class Example:
    """One prompt to explain; ``gold`` are the prompt's ground-truth character spans (may be empty).

    ``target`` is text, token ids (a generated continuation) or None (to be generated).
    """

    id: str
    prompt: str
    target: str | tuple[int, ...] | None
    gold: tuple[tuple[int, int], ...] = ()


def context_qa(n: int, seed: int = 0, facts: int = 4) -> list[Example]:
    """Invented-fact QA over all templates; gold = the sentence stating the answer."""
    return [Example(f"qa-{seed}-{i}", ex.prompt, ex.target, ((ex.evidence_start, ex.evidence_end),))
            for i, ex in enumerate(make_examples(n, seed=seed, facts=facts, extended=True))]


def squad_examples(path: Path | None = None) -> list[Example]:
    """SQuAD questions: prompt = context + question + "Answer:", target = the first gold answer.

    Gold = the first answer's span in the context (the prompt starts with the context).
    """
    data = json.loads((path or DATA / "squad.json").read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for p_index, paragraph in enumerate(article["paragraphs"]):
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = int(answer["answer_start"])
                end = start + len(answer["text"])
                if context[start:end] != answer["text"]:
                    raise ValueError(f"SQuAD answer {answer['text']!r} is not at offset {start} of its context")
                prompt = f"{context}\nQuestion: {qa['question']}\nAnswer:"
                out.append(Example(f"squad-{article['title']}-{p_index}-{qa['id']}", prompt, " " + answer["text"],
                                   ((start, end),)))
    return out


def _zen() -> str:
    """The Zen of Python, decoded from the ``this`` module's source (importing it would print it)."""
    spec = importlib.util.find_spec("this")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the standard library's 'this' module is not available")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return codecs.decode(node.value.value, "rot13")
    raise ValueError("no text found in the 'this' module")


# (module, attribute or None for the module docstring) whose documentation is plain English prose
_DOCSTRINGS = [("json", None), ("heapq", None), ("functools", "lru_cache"), ("textwrap", "dedent"),
               ("pathlib", "Path"), ("contextlib", "contextmanager"), ("unittest", None), ("logging", None),
               ("argparse", None), ("csv", None), ("fractions", "Fraction"), ("shlex", None)]


def _first_sentences(text: str, max_chars: int) -> str:
    """Whitespace-normalised prose of ``text``, cut at the last sentence end before ``max_chars``."""
    text = re.sub(r"\s+", " ", text).strip()
    if len(text) <= max_chars:
        return text
    cut = max((m.end() for m in re.finditer(r"[.!?](?=\s)", text[:max_chars + 1])), default=0)
    return text[:cut] if cut else text[:max_chars]


def python_texts(n: int, max_chars: int = 320) -> list[Example]:
    """Plain-text prompts that ship with Python (the Zen of Python, stdlib docstrings); target = None."""
    zen = "\n".join(_zen().splitlines()[2:9])
    texts = [("zen", zen)]
    for module, attribute in _DOCSTRINGS:
        obj = importlib.import_module(module)
        if attribute:
            obj = getattr(obj, attribute)
        text = _first_sentences(obj.__doc__ or "", max_chars)
        # faithfulness curves need a few sentences to delete
        if len(re.findall(r"[.!?](?=\s|$)", text)) >= 3:
            texts.append((f"{module}.{attribute}" if attribute else module, text))
    return [Example(f"text-{name}", text, None) for name, text in texts[:n]]
