"""Citation tasks on real documents: Wikipedia-based QA samples, long contexts, gold answer sentences.

The ``allennlp==0.9.0`` wheel ships small samples of five QA datasets as test fixtures (allennlp is
Apache-2.0 and is never imported or depended on: the wheel is read as a zip file, once, by
:func:`build`, and the result is committed as ``atman/evaluate/data/real-docs.json``). The wheel's
TriviaQA sample (``triviaqa-sample.tgz``) is kept aside: nothing is read from it.

It is one module because the builder and the loader are one contract: the loader reads exactly the
fields the builder writes, and a reader checking where a gold sentence came from needs both.

How a context is built (:func:`build`, seed 0):

1. **Questions.** Each question comes with its own document(s):

   * ``wikihop`` (``qangaroo.json``, 2 questions): the question's supporting documents, each one
     passage (9 and 15 documents: multi-document by construction). WikiHop's query is a relation and
     a subject (``country sms braunschweig``); it is written as a question from a template per
     relation (:data:`WIKIHOP_QUESTIONS`), the subject spelt as in the documents where it occurs.
   * ``squad`` (``squad.json``, 5 questions): the question's paragraph.
   * ``quoref`` (``quoref/quoref_sample.json``, 4 questions): the question's context, one passage per
     line (its own paragraphs, kept together and in order).
   * ``drop`` (``drop.json``): the question's passage; only questions with a span answer that occurs
     in exactly one sentence of the passage (3 of 19: the numeric answers are computed, not stated,
     and DROP gives no answer offsets to choose between two mentions).
   * ``quac`` (``quac_sample.json``, 6 questions; the file holds the same dialogue twice, read once):
     the section text without QuAC's ``CANNOTANSWER`` marker.

   A SQuAD, Quoref or QuAC answer is the dataset's first answer that lies inside one sentence; an
   answer cut inside a word is extended to the word's end (SQuAD's ``Father Julius Nieuwl``).
2. **Response.** ``The answer is {answer}.``; for QuAC, whose answers are extracts of a sentence or
   more, the answer text itself.
3. **Gold evidence.** The sentences of the question's own document(s) that contain the answer
   (case-insensitive), sentences split as :class:`atman.Citer` splits sources
   (``atman.units.text_spans(passage, "sentence")`` per passage). Where the dataset marks the answer's
   offset (SQuAD, Quoref, QuAC) that sentence is ``annotated`` and always among the gold.
4. **Distractors.** Other real paragraphs of the same five files (every passage of every other
   question, deduplicated) that do not contain the answer (case-insensitive), in a seeded random order,
   added while the context stays within a length drawn uniformly from 1,200-3,600 tokens (at least the
   question's own documents plus 300 tokens, at most :data:`MAX_TOKENS`).
5. **Position.** Each question is built three times, with its gold in the first, middle or last third
   of the context (``early``, ``middle``, ``late``): its own paragraphs go in as one block (WikiHop:
   each document holding a gold sentence on its own, the other supports shuffled among the
   distractors) at a seeded random passage boundary inside that third (by tokens; the nearest boundary
   where none is), and the draw (length, distractors, boundary) is repeated, up to :data:`ATTEMPTS`
   times, until the first gold sentence starts inside that third. ``evidence_at`` records where it
   starts (share of the context's characters); every shipped context lies in its third.
6. **Length.** Tokens of the context (passages joined by a blank line) with the SmolLM2 tokenizer,
   no special tokens; every context holds 1,000-4,000 (``context_tokens``). Every context is also
   checked to tokenise into its sources for both :class:`atman.Citer` and
   :func:`atman.evaluate.citation.layout`.

Example::

    >>> tasks = real_document_tasks("squad")
    >>> len(tasks), tasks[0].kind
    (15, 'squad')
    >>> doc = real_documents("wikihop")[0]
    >>> atman.cite(doc.passages, doc.question, doc.response)   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..citer import PASSAGE_SEPARATOR
from ..errors import AtmanError
from ..units import text_spans
from .citation import CitationTask, Sources
from .cite_data import CiteExample

SETS = ("wikihop", "squad", "quoref", "drop", "quac")
POSITIONS = ("early", "middle", "late")
MIN_TOKENS, MAX_TOKENS = 1000, 4000
TARGET_TOKENS = (1200, 3600)
SEED = 0
ATTEMPTS = 200
DATA_FILE = "data/real-docs.json"
FIXTURES = "allennlp/tests/fixtures/data/"
FILES = {
    "wikihop": FIXTURES + "qangaroo.json",
    "squad": FIXTURES + "squad.json",
    "quoref": FIXTURES + "quoref/quoref_sample.json",
    "drop": FIXTURES + "drop.json",
    "quac": FIXTURES + "quac_sample.json",
}
KEPT_ASIDE = FIXTURES + "triviaqa-sample.tgz"
# what the datasets' own pages say (the wheel itself states only allennlp's Apache-2.0)
LICENCES = {
    "wikihop": {"dataset": "QAngaroo WikiHop (Welbl, Stenetorp and Riedel, 2018)",
                "url": "https://qangaroo.cs.ucl.ac.uk/",
                "licence": "not stated in the wheel; the supporting documents are English Wikipedia text "
                           "(CC BY-SA); the QAngaroo release page was not reachable from here to confirm "
                           "the dataset's own licence"},
    "squad": {"dataset": "SQuAD v1.1 (Rajpurkar et al., 2016)", "url": "https://rajpurkar.github.io/SQuAD-explorer/",
              "licence": "CC BY-SA 4.0"},
    "quoref": {"dataset": "Quoref (Dasigi et al., 2019)", "url": "https://allenai.org/data/quoref",
               "licence": "CC BY 4.0 (the allenai/quoref dataset card); paragraphs from Wikipedia (CC BY-SA)"},
    "drop": {"dataset": "DROP (Dua et al., 2019)", "url": "https://allenai.org/data/drop",
             "licence": "CC BY-SA 4.0 (the ucinlp/drop dataset card); passages from Wikipedia"},
    "quac": {"dataset": "QuAC (Choi et al., 2018)", "url": "https://quac.ai/",
             "licence": "CC BY-SA 4.0 (quac.ai); sections from Wikipedia"},
}
WIKIHOP_QUESTIONS = {
    "country": "Which country does {subject} belong to?",
    "member_of_political_party": "Which political party was {subject} a member of?",
}
_WORD_END = re.compile(r"\w*")


@dataclass(frozen=True)
class RealDocument:
    """One context of real paragraphs, a question about it, the gold answer as response and its sources.

    ``passages`` are ``{"id", "text", "title"}`` dicts, the form :func:`atman.cite` takes; ``example``
    is the same case as the citation harness's :class:`CiteExample` (sentences as sources).
    """

    name: str
    set: str
    position: str
    question_id: str
    question: str
    answer: str
    response: str
    passages: tuple[dict, ...]
    evidence: tuple[int, ...]
    annotated: int | None
    context_tokens: int
    evidence_at: float
    example: CiteExample


@dataclass
class _Question:
    set: str
    item: str
    question_id: str
    question: str
    answer: str
    response: str
    own: list[str]
    together: bool
    annotated: tuple[str, int] | None  # (paragraph id, answer offset) where the dataset gives one


def _sentences(text: str) -> list[tuple[int, int]]:
    return text_spans(text, "sentence")


def _sentence_at(text: str, start: int, end: int) -> int | None:
    """The sentence of ``text`` holding [start, end), or None when the range crosses sentences."""
    for i, (a, b) in enumerate(_sentences(text)):
        if a <= start and end <= b:
            return i
    return None


def _holding(text: str, answer: str) -> list[int]:
    """Sentences of ``text`` that contain ``answer`` (case-insensitive)."""
    low = answer.lower()
    return [i for i, (a, b) in enumerate(_sentences(text)) if low in text[a:b].lower()]


def _whole_word(text: str, start: int, answer: str) -> str:
    """``answer`` at ``start``, extended to the end of a word it stops inside."""
    end = start + len(answer)
    if answer[-1:].isalnum():
        end = _WORD_END.match(text, end).end()
    return text[start:end]


def _span_answers(set_name: str, paragraphs: dict[str, dict], pid: str, qa: dict, answers: list[dict],
                  quac: bool = False) -> _Question | None:
    """A question whose answer (the first one of ``answers`` inside one sentence) lies in paragraph ``pid``."""
    text = paragraphs[pid]["text"]
    offset = paragraphs[pid]["offset"]
    for answer in answers:
        start = int(answer["answer_start"]) - offset
        if text[start:start + len(answer["text"])] != answer["text"]:
            continue
        if quac:  # QuAC's extracts may start with a space
            start += len(answer["text"]) - len(answer["text"].lstrip())
            surface = answer["text"].strip()
        else:
            surface = _whole_word(text, start, answer["text"])
        if _sentence_at(text, start, start + len(surface)) is None:
            continue
        response = surface if quac else f"The answer is {surface}."
        return _Question(set=set_name, item=paragraphs[pid]["item"], question_id=qa["id"], question=qa["question"],
                         answer=surface, response=response, own=[], together=True, annotated=(pid, start))
    return None


def read_wheel(wheel: str | Path) -> tuple[dict[str, dict], list[_Question], dict[str, str]]:
    """Paragraphs (id -> text and where it came from), questions and the files' SHA-256 from the wheel."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        missing = [f for f in FILES.values() if f not in names]
        if missing:
            raise AtmanError(f"{wheel} is not the allennlp 0.9.0 wheel: it lacks {', '.join(missing)}")
        raw = {s: archive.read(f) for s, f in FILES.items()}
    digests = {s: hashlib.sha256(b).hexdigest() for s, b in raw.items()}
    data = {s: json.loads(b.decode("utf-8")) for s, b in raw.items()}
    paragraphs: dict[str, dict] = {}
    questions: list[_Question] = []

    def add(pid: str, text: str, item: str, title: str | None, offset: int = 0) -> str:
        lead = len(text) - len(text.lstrip())
        paragraphs[pid] = {"text": text.strip(), "item": item, "title": title, "offset": offset + lead}
        return pid

    for entry in data["wikihop"]:
        relation, _, subject = entry["query"].partition(" ")
        own = [add(f"wikihop/{entry['id']}/{k}", doc, entry["id"], None) for k, doc in enumerate(entry["supports"])]
        spelt = next((m.group() for doc in entry["supports"]
                      for m in [re.search(re.escape(subject), doc, re.IGNORECASE)] if m), subject.title())
        surface = next(m.group() for doc in entry["supports"]
                       for m in [re.search(re.escape(entry["answer"]), doc, re.IGNORECASE)] if m)
        questions.append(_Question(set="wikihop", item=entry["id"], question_id=entry["id"],
                                   question=WIKIHOP_QUESTIONS[relation].format(subject=spelt), answer=surface,
                                   response=f"The answer is {surface}.", own=own, together=False, annotated=None))

    for article in data["squad"]["data"]:
        for p, paragraph in enumerate(article["paragraphs"]):
            pid = add(f"squad/{article['title']}/{p}", paragraph["context"], f"{article['title']}/{p}",
                      article["title"])
            for qa in paragraph["qas"]:
                q = _span_answers("squad", paragraphs, pid, qa, qa["answers"])
                if q:
                    q.own = [pid]
                    questions.append(q)

    for article in data["quoref"]["data"]:
        for paragraph in article["paragraphs"]:
            context, own, offset = paragraph["context"], [], 0
            for k, line in enumerate(context.split("\n")):
                if line.strip():
                    own.append(add(f"quoref/{article['title']}/{k}", line, article["title"], article["title"], offset))
                offset += len(line) + 1
            for qa in paragraph["qas"]:
                answer = qa["answers"][0]
                start = int(answer["answer_start"])
                pid = next(p for p in own if paragraphs[p]["offset"] <= start
                           < paragraphs[p]["offset"] + len(paragraphs[p]["text"]))
                q = _span_answers("quoref", paragraphs, pid, qa, qa["answers"])
                if q:
                    q.own = own
                    questions.append(q)

    for passage_id, passage in data["drop"].items():
        pid = add(f"drop/{passage_id}", passage["passage"], passage_id, None)
        text = paragraphs[pid]["text"]
        seen = set()
        for qa in passage["qa_pairs"]:
            spans = qa["answer"]["spans"]
            key = (qa["question"], tuple(spans))
            if len(spans) != 1 or key in seen or len(_holding(text, spans[0])) != 1:
                continue
            seen.add(key)
            questions.append(_Question(set="drop", item=passage_id, question_id=qa["query_id"], question=qa["question"],
                                       answer=spans[0], response=f"The answer is {spans[0]}.", own=[pid],
                                       together=True, annotated=None))

    done = set()
    for article in data["quac"]["data"]:
        for paragraph in article["paragraphs"]:
            if paragraph["id"] in done:
                continue
            done.add(paragraph["id"])
            context = paragraph["context"].removesuffix("CANNOTANSWER")
            pid = add(f"quac/{paragraph['id']}", context, article["title"], article["title"])
            for qa in paragraph["qas"]:
                q = _span_answers("quac", paragraphs, pid, qa, [qa["orig_answer"], *qa["answers"]], quac=True)
                if q:
                    q.own = [pid]
                    questions.append(q)
    return paragraphs, questions, digests


def _third(position: str) -> tuple[float, float]:
    k = POSITIONS.index(position)
    return k / 3, (k + 1) / 3


def _insert_at(order: list[str], tokens: dict[str, int], position: str, rng: random.Random) -> int:
    """A passage boundary of ``order`` whose share of the tokens before it lies in ``position``'s third."""
    total = sum(tokens[p] for p in order) or 1
    before, shares = 0, []
    for p in [*order, None]:
        shares.append(before / total)
        if p is not None:
            before += tokens[p]
    lo, hi = _third(position)
    inside = [k for k, s in enumerate(shares) if lo <= s < hi or (hi == 1 and s == 1)]
    if inside:
        return rng.choice(inside)
    return min(range(len(shares)), key=lambda k: abs(shares[k] - (lo + hi) / 2))


def _assemble(q: _Question, position: str, paragraphs: dict[str, dict], tokens: dict[str, int],
              rng: random.Random) -> list[str]:
    own_tokens = sum(tokens[p] for p in q.own)
    target = min(max(rng.randint(*TARGET_TOKENS), own_tokens + 300), MAX_TOKENS - 100)
    pool = [p for p in paragraphs if p not in q.own and paragraphs[p]["item"] != q.item
            and q.answer.lower() not in paragraphs[p]["text"].lower()]
    rng.shuffle(pool)
    chosen, total = [], own_tokens
    for p in pool:
        if total + tokens[p] <= target:
            chosen.append(p)
            total += tokens[p]
    if q.together:
        k = _insert_at(chosen, tokens, position, rng)
        return chosen[:k] + q.own + chosen[k:]
    gold = [p for p in q.own if _holding(paragraphs[p]["text"], q.answer)]
    order = [p for p in q.own if p not in gold] + chosen
    rng.shuffle(order)
    for p in gold:
        k = _insert_at(order, tokens, position, rng)
        order.insert(k, p)
    return order


def _context(order: Sequence[str], paragraphs: dict[str, dict]) -> tuple[str, list[tuple[int, int]], list[str]]:
    """The context text, its sentence sources (spans) and the paragraph each source belongs to."""
    spans, owners, start = [], [], 0
    for p in order:
        text = paragraphs[p]["text"]
        for a, b in _sentences(text):
            spans.append((start + a, start + b))
            owners.append(p)
        start += len(text) + len(PASSAGE_SEPARATOR)
    return PASSAGE_SEPARATOR.join(paragraphs[p]["text"] for p in order), spans, owners


def _name(q: _Question, index: int, position: str) -> str:
    item = re.sub(r"[^A-Za-z0-9]+", "-", q.item).strip("-")
    return f"{q.set}:{item}:q{index}:{position}"


def build(wheel: str | Path, count: Callable[[str], int], *, seed: int = SEED,
          check: Callable[[dict, list[str], list[tuple[int, int]]], None] | None = None) -> dict:
    """The real-document sets from the allennlp 0.9.0 wheel, as the JSON object of :data:`DATA_FILE`.

    ``count(text)`` counts tokens (the CLI: SmolLM2's tokenizer, no special tokens); ``check(context,
    passage texts, source spans)`` is called on every context (the CLI: the citer must split the same
    sources, and they must tokenise into tokens of their own for the citer and the harness).
    """
    paragraphs, questions, digests = read_wheel(wheel)
    tokens = {p: count(v["text"]) + 2 for p, v in paragraphs.items()}  # + the blank line before it
    rng = random.Random(seed)
    contexts, used = [], set()
    per_item: dict[tuple[str, str], int] = {}
    for q in questions:
        index = per_item.setdefault((q.set, q.item), 0)
        per_item[(q.set, q.item)] += 1
        for position in POSITIONS:
            lo, hi = _third(position)
            best = None
            for _ in range(ATTEMPTS):  # a draw whose first gold sentence starts inside the position's third
                order = _assemble(q, position, paragraphs, tokens, rng)
                text, spans, owners = _context(order, paragraphs)
                evidence = [i for i, ((a, b), p) in enumerate(zip(spans, owners, strict=True))
                            if p in q.own and q.answer.lower() in text[a:b].lower()]
                at = spans[evidence[0]][0] / len(text)
                miss = max(lo - at, at - hi, 0.0)
                if best is None or miss < best[0]:
                    best = (miss, order, text, spans, owners, evidence)
                if miss == 0.0:
                    break
            _, order, text, spans, owners, evidence = best
            annotated = None
            if q.annotated:
                pid, offset = q.annotated
                first = next(i for i, p in enumerate(owners) if p == pid)
                local = _sentence_at(paragraphs[pid]["text"], offset, offset + len(q.answer))
                annotated = first + local
                if annotated not in evidence:
                    raise AtmanError(f"{q.question_id}: the annotated sentence does not hold the answer")
            n_tokens = count(text)
            if not (MIN_TOKENS <= n_tokens <= MAX_TOKENS and evidence):
                raise AtmanError(f"{q.question_id} ({position}): {n_tokens} tokens, {len(evidence)} gold sentences")
            context = {
                "name": _name(q, index, position), "set": q.set, "source_file": FILES[q.set], "item": q.item,
                "question_id": q.question_id, "position": position, "question": q.question, "answer": q.answer,
                "response": q.response, "passages": order, "sources": len(spans), "evidence": evidence,
                "evidence_text": [text[spans[i][0]:spans[i][1]] for i in evidence], "annotated": annotated,
                "context_tokens": n_tokens, "evidence_at": round(spans[evidence[0]][0] / len(text), 3),
            }
            if check is not None:
                check(context, [paragraphs[p]["text"] for p in order], spans)
            contexts.append(context)
            used.update(order)
    return {
        "description": "Citation tasks on real documents (atman/evaluate/real_docs.py; docs/evaluation.md)",
        "wheel": "allennlp-0.9.0-py3-none-any.whl (Apache-2.0; read as a zip file, never imported)",
        "seed": seed,
        "token_count": "SmolLM2-135M-Instruct tokenizer, the context text (passages joined by a blank line), "
                       "no special tokens",
        "files": {s: {"path": FILES[s], "sha256": digests[s], **LICENCES[s]} for s in SETS},
        "kept_aside": f"{KEPT_ASIDE} (TriviaQA): not read",
        "paragraphs": {p: {"text": v["text"], "title": v["title"]} for p, v in paragraphs.items() if p in used},
        "contexts": contexts,
    }


def _load() -> dict:
    return json.loads(resources.files("atman.evaluate").joinpath(DATA_FILE).read_text(encoding="utf-8"))


def real_documents(set_name: str | None = None, position: str | None = None) -> list[RealDocument]:
    """The shipped real-document contexts (all sets, or one of :data:`SETS`; all positions, or one of
    :data:`POSITIONS`), in the data file's order."""
    if set_name is not None and set_name not in SETS:
        raise AtmanError(f"unknown real-document set {set_name!r}; choose one of {', '.join(SETS)}")
    if position is not None and position not in POSITIONS:
        raise AtmanError(f"unknown position {position!r}; choose one of {', '.join(POSITIONS)}")
    raw = _load()
    paragraphs = raw["paragraphs"]
    documents = []
    for seed, c in enumerate(raw["contexts"]):
        if (set_name and c["set"] != set_name) or (position and c["position"] != position):
            continue
        passages = tuple({"id": p, "text": paragraphs[p]["text"], "title": paragraphs[p]["title"]}
                         for p in c["passages"])
        text, spans, _ = _context(c["passages"], paragraphs)
        task = CitationTask(Sources.from_spans(text, spans), c["question"], c["response"])
        example = CiteExample(task=task, evidence=tuple(c["evidence"]), kind=c["set"], seed=seed)
        documents.append(RealDocument(
            name=c["name"], set=c["set"], position=c["position"], question_id=c["question_id"],
            question=c["question"], answer=c["answer"], response=c["response"], passages=passages,
            evidence=tuple(c["evidence"]), annotated=c["annotated"], context_tokens=c["context_tokens"],
            evidence_at=c["evidence_at"], example=example))
    return documents


def real_document_tasks(set_name: str | None = None, position: str | None = None) -> list[CiteExample]:
    """The real-document contexts as the citation harness's :class:`CiteExample` (``kind`` = the set)."""
    return [d.example for d in real_documents(set_name, position)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the real-document citation sets from the allennlp "
                                                 "0.9.0 wheel (pip download allennlp==0.9.0 --no-deps -d DIR).")
    parser.add_argument("--wheel", required=True, help="path of allennlp-0.9.0-py3-none-any.whl")
    parser.add_argument("-o", "--output", default=str(Path(__file__).parent / DATA_FILE))
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    from ..citer import Citer
    from ..models import load_model
    from .citation import layout

    lm = load_model()
    citer = Citer(lm)

    def count(text: str) -> int:
        return len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check(context: dict, texts: list[str], spans: list[tuple[int, int]]) -> None:
        passages = [{"id": p, "text": t} for p, t in zip(context["passages"], texts, strict=True)]
        prepared = citer.prepare(passages, context["question"], context["response"])
        if [(s.start, s.end) for s in prepared.sources] != spans:
            raise AtmanError(f"{context['name']}: the citer splits other sources than the builder")
        task = CitationTask(Sources.from_spans(PASSAGE_SEPARATOR.join(texts), spans), context["question"],
                            context["response"])
        layout(lm.tokenizer, task)

    data = build(args.wheel, count, seed=args.seed, check=check)
    Path(args.output).write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    sizes = {s: sum(c["set"] == s for c in data["contexts"]) for s in SETS}
    lengths = [c["context_tokens"] for c in data["contexts"]]
    print(f"{len(data['contexts'])} contexts {sizes}, {min(lengths)}-{max(lengths)} tokens -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
