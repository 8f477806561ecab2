"""Context question answering over invented facts: the answer can only come from the context.

Each example holds several fact sentences about made-up people (some sharing the question's
relation, as distractors), a question about one fact, an answer prefix that restates the question,
and the answer as target. The fact sentence that states the answer is the ground truth.

Example::

    >>> ex = make_examples(1, seed=0)[0]
    >>> ex.prompt[ex.evidence_start:ex.evidence_end] in ex.prompt
    True
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = ["Br", "Ca", "Dr", "El", "Fi", "Gw", "Ha", "Is", "Jo", "Ka", "Lu", "Mo", "Ne", "Or", "Pe", "Qu",
           "Ro", "Sa", "Th", "Ul", "Va", "Wy", "Xa", "Yo", "Ze"]
_MIDDLES = ["ra", "len", "vo", "mi", "thar", "dri", "sel", "qua", "no", "ber", "lis", "gan", "tho", "ve"]
_ENDS = ["th", "na", "ric", "mond", "wyn", "ara", "dell", "iel", "ost", "ek", "ina", "vor"]
_PLACE_ENDS = ["mere", "haven", "ford", "holm", "stead", "wick", "dale", "gard", "port", "burgh"]
_JOBS = ["baker", "pilot", "carpenter", "nurse", "librarian", "fisherman", "painter", "chemist", "tailor",
         "blacksmith"]
_ANIMALS = ["cat", "dog", "parrot", "horse", "goat", "rabbit"]
_OBJECTS = ["lantern", "violin", "compass", "telescope", "kettle", "map"]
_SHIPS = ["ferry", "schooner", "barge", "tugboat"]

# (fact, question, answer prefix, kind of value)
_TEMPLATES = [
    ("{name} lives in {value}.", "Where does {name} live?", "{name} lives in", "place"),
    ("{name} works as a {value}.", "What is {name}'s job?", "{name} works as a", "job"),
    ("{name} has a {animal} called {value}.", "What is the name of {name}'s {animal}?",
     "The name of {name}'s {animal} is", "name"),
    ("{name} was born in the year {value}.", "In which year was {name} born?", "{name} was born in the year",
     "year"),
    ("The {object} of {name} was made in {value}.", "Where was the {object} of {name} made?",
     "The {object} of {name} was made in", "place"),
]
# further phrasings for the evaluation suite (``extended=True``): other relations, the value before
# the name, and questions whose wording differs from the fact's
_EXTENDED_TEMPLATES = [
    ("{name} is married to {value}.", "Who is {name} married to?", "{name} is married to", "person"),
    ("In {value}, {name} opened a small bakery.", "In which town did {name} open a bakery?",
     "{name} opened a bakery in", "place"),
    ("The {ship} that {name} sails is named {value}.", "What is the name of the {ship} that {name} sails?",
     "The {ship} that {name} sails is named", "name"),
    ("{name} learned to paint from {value}.", "Who taught {name} to paint?", "{name} was taught to paint by",
     "person"),
]


@dataclass(frozen=True)
class QAExample:
    """A context-QA prompt, its target, and the character span of the sentence stating the answer."""

    prompt: str
    target: str
    evidence_start: int
    evidence_end: int

    @property
    def evidence(self) -> str:
        return self.prompt[self.evidence_start:self.evidence_end]


def _word(rng: random.Random, ends: list[str]) -> str:
    return rng.choice(_ONSETS) + rng.choice(_MIDDLES) + rng.choice(ends)


def _value(rng: random.Random, kind: str) -> str:
    if kind == "place":
        return _word(rng, _PLACE_ENDS)
    if kind == "job":
        return rng.choice(_JOBS)
    if kind == "name":
        return _word(rng, _ENDS)
    if kind == "person":
        return _word(rng, _ENDS) + " " + _word(rng, _ENDS)
    return str(rng.randint(1200, 1999))


def make_examples(n: int, seed: int = 0, facts: int = 5, extended: bool = False) -> list[QAExample]:
    """``n`` examples of ``facts`` fact sentences each; at least one distractor shares the question's template.

    ``extended=True`` draws from four more templates as well (the evaluation suite's setting); the
    default keeps the original five so that earlier measurements stay reproducible.
    """
    if facts < 2:
        raise ValueError(f"facts must be at least 2 (the answer and a distractor), got {facts}")
    templates_pool = _TEMPLATES + (_EXTENDED_TEMPLATES if extended else [])
    rng = random.Random(seed)
    examples = []
    while len(examples) < n:
        # a list, not a set: set order of strings changes from process to process (hash seeds)
        names: list[str] = []
        while len(names) < facts:
            name = _word(rng, _ENDS) + " " + _word(rng, _ENDS)
            if name not in names:
                names.append(name)
        asked = rng.randrange(len(templates_pool))
        templates = [asked, asked] + [rng.randrange(len(templates_pool)) for _ in range(facts - 2)]
        rng.shuffle(templates)
        sentences, slots = [], []
        for name, t in zip(names, templates, strict=True):
            fact = templates_pool[t][0]
            slot = {"name": name, "animal": rng.choice(_ANIMALS), "object": rng.choice(_OBJECTS),
                    "value": _value(rng, templates_pool[t][3])}
            if extended:
                slot["ship"] = rng.choice(_SHIPS)
            sentences.append(fact.format(**slot))
            slots.append(slot)
        values = [s["value"] for s in slots]
        answer_index = templates.index(asked)
        if values.count(values[answer_index]) > 1:
            continue  # the answer must be stated once only
        _, question, prefix, _ = templates_pool[asked]
        slot = slots[answer_index]
        context = " ".join(sentences)
        prompt = f"{context}\nQuestion: {question.format(**slot)}\nAnswer: {prefix.format(**slot)}"
        start = context.index(sentences[answer_index])
        examples.append(QAExample(prompt=prompt, target=" " + slot["value"], evidence_start=start,
                                  evidence_end=start + len(sentences[answer_index])))
    return examples


def hits(explanation, example: QAExample) -> tuple[bool, bool]:
    """(top item lies inside the evidence sentence, top item's span overlaps the evidence sentence)."""
    top = explanation.top(1, kind="prompt")[0]
    inside = example.evidence_start <= top.start and top.start + top.length <= example.evidence_end
    overlaps = top.start < example.evidence_end and example.evidence_start < top.start + top.length
    return inside, overlaps
