"""The real-document citation sets: shipped, loadable, sized, gold sentences that state the answer."""

from __future__ import annotations

import doctest
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from atman.citer import Citer
from atman.errors import AtmanError
from atman.evaluate import real_docs
from atman.evaluate.citation import layout
from atman.evaluate.cite_data import CiteExample
from atman.evaluate.real_docs import (
    MAX_TOKENS,
    MIN_TOKENS,
    POSITIONS,
    SETS,
    build,
    real_document_tasks,
    real_documents,
)
from atman.units import text_spans

WHEEL = "allennlp-0.9.0-py3-none-any.whl"


def raw() -> dict:
    return json.loads(resources.files("atman.evaluate").joinpath(real_docs.DATA_FILE).read_text(encoding="utf-8"))


def test_every_set_loads_in_the_harness_task_type():
    documents = real_documents()
    assert len(documents) >= 24
    assert {d.set for d in documents} == set(SETS)
    for name in SETS:
        tasks = real_document_tasks(name)
        assert tasks and all(isinstance(t, CiteExample) and t.kind == name for t in tasks)
        assert all(d.name.startswith(f"{name}:") for d in real_documents(name))
    assert len({d.name for d in documents}) == len(documents)
    assert sum(len(real_document_tasks(position=p)) for p in POSITIONS) == len(documents)


def test_unknown_set_or_position_is_refused():
    with pytest.raises(AtmanError, match="unknown real-document set"):
        real_documents("triviaqa")
    with pytest.raises(AtmanError, match="unknown position"):
        real_document_tasks(position="centre")


def test_contexts_lie_in_the_token_range_and_sets_have_their_sizes():
    documents = real_documents()
    assert all(MIN_TOKENS <= d.context_tokens <= MAX_TOKENS for d in documents)
    sizes = {name: len(real_documents(name)) for name in SETS}
    assert sizes == {"wikihop": 6, "squad": 15, "quoref": 12, "drop": 9, "quac": 18}
    # wikihop is multi-document: each context holds all of its question's supporting documents
    assert all(sum(p["id"].startswith(f"wikihop/{d.question_id}/") for p in d.passages) >= 9
               for d in real_documents("wikihop"))


def test_stored_token_counts_match_the_smollm2_tokenizer(smollm2):
    for d in real_documents()[::7]:
        text = d.example.sources.text
        assert len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"]) == d.context_tokens


def test_every_gold_sentence_contains_the_answer_and_is_a_source():
    for d in real_documents():
        texts = d.example.sources.texts
        assert d.evidence and all(d.answer.lower() in texts[i].lower() for i in d.evidence)
        assert d.annotated is None or d.annotated in d.evidence
        # no distractor sentence contains the answer: the gold is every sentence that does
        assert [i for i, t in enumerate(texts) if d.answer.lower() in t.lower()] == list(d.evidence)
        # the sources are the citer's sentence split of each passage
        spans, start = [], 0
        for p in d.passages:
            spans += [(start + a, start + b) for a, b in text_spans(p["text"], "sentence")]
            start += len(p["text"]) + 2
        assert list(d.example.sources.spans) == spans
        assert d.example.sources.text == "\n\n".join(p["text"] for p in d.passages)
        assert d.response == d.example.response and d.question == d.example.query
        assert d.answer in d.response


def test_the_citer_splits_the_same_sources_and_both_tokenise_them(smollm2):
    citer = Citer(smollm2)
    for d in real_documents()[::5]:
        prepared = citer.prepare(list(d.passages), d.question, d.response)
        assert [(s.start, s.end) for s in prepared.sources] == list(d.example.sources.spans)
        assert all(d.answer.lower() in prepared.sources[i].text.lower() for i in d.evidence)
        assert len(layout(smollm2.tokenizer, d.example.task).source_positions) == len(d.example.sources)


def test_evidence_positions_vary_and_follow_the_position_names():
    documents = real_documents()
    for d in documents:
        k = POSITIONS.index(d.position)
        assert k / 3 <= d.evidence_at <= (k + 1) / 3, d.name
    at = [d.evidence_at for d in documents]
    assert min(at) < 0.1 and max(at) > 0.9
    assert len({d.evidence[0] for d in documents}) > 30


def test_no_triviaqa_content_and_the_sources_are_recorded():
    data = raw()
    assert "triviaqa" in data["kept_aside"]
    assert {f["path"] for f in data["files"].values()} == set(real_docs.FILES.values())
    assert all(f["licence"] and len(f["sha256"]) == 64 for f in data["files"].values())
    assert all(c["source_file"] == real_docs.FILES[c["set"]] for c in data["contexts"])
    assert all(pid.split("/")[0] in SETS for pid in data["paragraphs"])
    assert "trivia" not in json.dumps(data["contexts"]).lower()


def test_docstring_example():
    result = doctest.testmod(real_docs, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def find_wheel(tmp_path: Path) -> Path | None:
    """The allennlp 0.9.0 wheel: $ATMAN_ALLENNLP_WHEEL, /tmp/allennlp, or pip download (pip's cache)."""
    for candidate in (os.environ.get("ATMAN_ALLENNLP_WHEEL"), f"/tmp/allennlp/{WHEEL}"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "allennlp==0.9.0", "--no-deps", "-q", "-d",
                        str(tmp_path)], check=True, capture_output=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return tmp_path / WHEEL if (tmp_path / WHEEL).is_file() else None


def test_rebuilding_from_the_wheel_gives_the_shipped_file(smollm2, tmp_path):
    wheel = find_wheel(tmp_path)
    if wheel is None:
        pytest.skip("the allennlp 0.9.0 wheel is neither in pip's cache nor downloadable here "
                    "(set ATMAN_ALLENNLP_WHEEL to its path)")

    def count(text: str) -> int:
        return len(smollm2.tokenizer(text, add_special_tokens=False)["input_ids"])

    rebuilt = json.dumps(build(wheel, count), indent=1, ensure_ascii=False) + "\n"
    assert rebuilt == resources.files("atman.evaluate").joinpath(real_docs.DATA_FILE).read_text(encoding="utf-8")
