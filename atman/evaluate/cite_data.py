"""Citation data: long contexts split into sources, a question, a response and its evidence sources.

:func:`invented_examples` writes documents about invented institutes, people and towns, so a model
can answer only from the context. Each document holds 40-120 sentence sources grouped into titled
passages, distractor sentences that share the question's words, and one of three question kinds:

* ``single``: one evidence sentence answers the question;
* ``multihop``: the answer joins two evidence sentences in different passages (who founded X,
  and where that person was born);
* ``multi-sentence``: a response of several sentences, each resting on its own evidence sentence.

:func:`squad_examples` turns the shipped SQuAD excerpt into the same shape (sentences as sources,
the gold answer as the response, the sentence holding the answer as the evidence).

Example::

    >>> ex = invented_examples(2, seed=0, n_sources=48)[0]
    >>> len(ex.sources.spans), ex.query
    (48, '...')
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources

from ..errors import AtmanError
from ..units import text_spans
from .citation import CitationTask, Sources

KINDS = ("single", "multihop", "multi-sentence")
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "th"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "m", "k", "nd", "rk"]
_FIELDS = ["tidal engines", "glass acoustics", "moss chemistry", "lantern optics", "salt mapping",
           "clockwork looms", "river genetics", "frost ceramics", "bell metallurgy", "wind archives"]
_OBJECTS = ["copper lens", "salt clock", "glass bell", "wind loom", "river gauge", "frost kiln", "moss press"]
_COLOURS = ["amber", "slate", "crimson", "olive", "ivory", "cobalt", "ochre"]


@dataclass(frozen=True)
class CiteExample:
    """One citation case: the task (sources, query, response), the evidence sources and what it is."""

    task: CitationTask
    evidence: tuple[int, ...]
    kind: str
    seed: int

    @property
    def sources(self) -> Sources:
        return self.task.sources

    @property
    def query(self) -> str:
        return self.task.query

    @property
    def response(self) -> str:
        return self.task.response


class _Names:
    """Distinct invented names from one random generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def word(self, syllables: int = 2) -> str:
        while True:
            name = "".join(self.rng.choice(_ONSETS) + self.rng.choice(_VOWELS) + self.rng.choice(_CODAS)
                           for _ in range(syllables)).capitalize()
            if name not in self.used and len(name) > 3:
                self.used.add(name)
                return name

    def person(self) -> str:
        return f"{self.word()} {self.word()}"


def _filler(rng: random.Random, names: _Names, town: str) -> str:
    """A sentence about other invented things: context that answers nothing that is asked."""
    person, place, inst = names.person(), names.word(), names.word()
    year = rng.randint(1700, 1990)
    templates = [
        f"{person} spent {rng.randint(2, 30)} years studying {rng.choice(_FIELDS)} near {place}.",
        f"The market of {place} sells {rng.choice(_COLOURS)} cloth every {rng.choice(['spring', 'autumn'])}.",
        f"In {year}, a flood reached the old bridge of {place} and closed it for {rng.randint(2, 11)} weeks.",
        f"The {inst} Society keeps a {rng.choice(_OBJECTS)} that {person} repaired in {year}.",
        f"{person} wrote a short history of {place} that few libraries hold.",
        f"Visitors to {town} often take the ferry to {place} to see the {rng.choice(_COLOURS)} cliffs.",
        f"The {inst} Guild was dissolved in {year} after a dispute over {rng.choice(_FIELDS)}.",
        f"A road of {rng.randint(12, 240)} kilometres links {place} with the coast.",
        f"{person} married a ferry captain from {place} in {year}.",
        f"The winters in {place} are mild, but the harbour freezes once a decade.",
    ]
    return rng.choice(templates)


def invented_example(seed: int, n_sources: int = 48, kind: str | None = None) -> CiteExample:
    """One invented-fact document of ``n_sources`` sentence sources (40-120 for the benchmark).

    ``kind`` is one of :data:`KINDS` (default: chosen by ``seed``). The same seed gives the same text.
    """
    if n_sources < 12:
        raise AtmanError(f"n_sources must be at least 12, got {n_sources}")
    kind = kind or KINDS[seed % len(KINDS)]
    if kind not in KINDS:
        raise AtmanError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    names = _Names(rng)
    inst, town, other_town = names.word(), names.word(), names.word()
    founder, rival, director = names.person(), names.person(), names.person()
    birthplace, rival_birthplace = names.word(), names.word()
    year, field, obj = rng.randint(1780, 1950), rng.choice(_FIELDS), rng.choice(_OBJECTS)

    if kind == "single":
        query = f"In which town was the {inst} Institute founded?"
        evidence_text = [f"The {inst} Institute was founded in {town} in {year}."]
        response = f"The {inst} Institute was founded in {town}."
        distractors = [
            f"The {inst} Archive was founded in {other_town} in {year + rng.randint(3, 40)}.",
            f"The {inst} Institute opened a second library in {other_town} decades later.",
            f"Which town the {inst} Institute should move to was debated for years.",
            f"The {inst} Choir was founded in {birthplace} by a teacher of {field}.",
        ]
    elif kind == "multihop":
        query = f"Where was the founder of the {inst} Institute born?"
        evidence_text = [f"The {inst} Institute was founded by {founder} in {year}.",
                         f"{founder} was born in {birthplace}, a village of weavers."]
        response = f"The founder of the {inst} Institute, {founder}, was born in {birthplace}."
        distractors = [
            f"{rival} was born in {rival_birthplace} and later taught at the {inst} Institute.",
            f"The {inst} Archive was founded by {rival}.",
            f"The first director of the {inst} Institute, {director}, was born in {other_town}.",
            f"Many founders of the region's institutes were born in {other_town}.",
        ]
    else:
        query = f"What do we know about the founding of the {inst} Institute and its first director?"
        evidence_text = [f"The {inst} Institute was founded in {town} in {year}.",
                         f"Its first director, {director}, built a {obj} for the institute.",
                         f"{director} made the {inst} Institute famous for {field}."]
        response = (f"The {inst} Institute was founded in {town} in {year}. Its first director was {director}, "
                    f"who built a {obj} and made it famous for {field}.")
        distractors = [
            f"The {inst} Archive was founded in {other_town} in {year + rng.randint(3, 40)}.",
            f"The second director of the {inst} Institute, {rival}, preferred {rng.choice(_FIELDS)}.",
            f"A {obj} much like the institute's was built in {other_town}.",
            f"The founding of the {inst} Institute is retold in a play by {names.person()}.",
        ]

    n_fill = n_sources - len(evidence_text) - len(distractors)
    sentences = [(s, "evidence", i) for i, s in enumerate(evidence_text)]
    sentences += [(s, "distractor", -1) for s in distractors]
    sentences += [(_filler(rng, names, town), "filler", -1) for _ in range(n_fill)]
    rng.shuffle(sentences)
    if kind == "multi-sentence":  # the response follows the document's order of evidence
        order = [i for _, role, i in sentences if role == "evidence"]
        evidence_text = [evidence_text[i] for i in order]
    # titled passages of 4-7 sentences; each sentence is one source
    context, spans, evidence = "", [], {}
    position = 0
    while position < len(sentences):
        size = rng.randint(4, 7)
        block = sentences[position:position + size]
        if context:
            context += "\n\n"
        context += f"{names.word()} notes ({position // 5 + 1}): "
        for j, (text, role, _) in enumerate(block):
            if j:
                context += " "
            if role == "evidence":
                evidence[text] = len(spans)
            spans.append((len(context), len(context) + len(text)))
            context += text
        position += size
    # the context as sources: whatever precedes a source (passage titles) travels with it
    task = CitationTask(Sources.from_spans(context, spans), query, response)
    return CiteExample(task=task, evidence=tuple(evidence[t] for t in evidence_text), kind=kind, seed=seed)


def invented_examples(n: int, *, seed: int = 0, n_sources: int = 48) -> list[CiteExample]:
    """``n`` invented-fact documents (seeds ``seed`` .. ``seed + n - 1``, kinds in turn)."""
    return [invented_example(seed + i, n_sources=n_sources) for i in range(n)]


def squad_examples(limit: int | None = None) -> list[CiteExample]:
    """The shipped SQuAD excerpt: sentences of each paragraph as sources, the gold answer as response."""
    raw = json.loads(resources.files("atman.evaluate").joinpath("data/squad.json").read_text(encoding="utf-8"))
    examples = []
    for article in raw["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            spans = text_spans(context, "sentence")
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = int(answer["answer_start"])
                hit = [i for i, (a, b) in enumerate(spans) if a <= start < b]
                if not hit:
                    continue
                task = CitationTask(Sources.from_spans(context, spans), qa["question"], answer["text"])
                examples.append(CiteExample(task=task, evidence=(hit[0],), kind="squad", seed=len(examples)))
                if limit is not None and len(examples) >= limit:
                    return examples
    return examples
