"""Citing the sources of a response in a context (atman.cite) on the embedded SmolLM2."""

from __future__ import annotations

import json

import pytest
import torch
from rich.console import Console

from atman import AtmanError, Citations, Citer, EmptyInputError, Explainer, Passage, cite
from atman.citer import CitationError, coarse_to_fine, passages_from, source_groups
from atman.render.citations import render_citations_html, render_citations_terminal, source_names
from atman.rows import suppression_rows

PASSAGES = [
    {"id": "a", "title": "Harbours", "text": "Tamsin Orrelby keeps bees on the island of Quellmark. "
                                             "The ferry to Quellmark leaves at dawn."},
    {"id": "b", "title": "Trades", "text": "Doran Vesk repairs clocks in the town of Lindhaven. "
                                           "Mirela Castaine teaches music in Olvereth."},
    {"id": "c", "title": "Rivers", "text": "The river Sorrow runs past the mill at Brackwater."},
]
QUESTION = "Where does Doran Vesk repair clocks?"
RESPONSE = "Doran Vesk repairs clocks in Lindhaven. He has done so for years."


@pytest.fixture(scope="module")
def citer(smollm2):
    return Citer(smollm2)


@pytest.fixture(scope="module")
def result(citer):
    return citer.cite(PASSAGES, QUESTION, RESPONSE)


def test_the_answer_sentence_cites_its_evidence(result):
    assert [s.text for s in result.spans] == ["Doran Vesk repairs clocks in Lindhaven.", "He has done so for years."]
    assert len(result.sources) == 5 and [s.passage for s in result.sources] == [0, 0, 1, 1, 2]
    best, score = result.cite(0, k=1)[0]
    assert best.text == "Doran Vesk repairs clocks in the town of Lindhaven." and score > 0
    assert result.passages[best.passage].id == "b"
    # offsets point into the context the result carries
    for source in result.sources:
        assert result.context[source.start:source.end] == source.text
    for span in result.spans:
        assert result.response[span.start:span.end] == span.text


def test_scores_are_the_engines_losses_summed_over_each_span(citer, result):
    """Readout suppression through Explainer.losses, summed over the tokens of each response span."""
    prepared = citer.prepare(PASSAGES, QUESTION, RESPONSE)
    rows = suppression_rows(len(prepared.encoded.input_ids), prepared.source_positions, 0.0)
    losses = citer.explainer.losses(prepared.encoded, rows, readout_from=prepared.readout_from)
    delta = losses[1:] - losses[0:1]
    for span, tokens in zip(result.spans, prepared.span_tokens, strict=True):
        assert span.scores == pytest.approx(delta[:, list(tokens)].sum(dim=1).tolist(), abs=1e-5)
    # every target token belongs to one span here; the readout starts right after the context
    covered = sorted(t for tokens in prepared.span_tokens for t in tokens)
    assert covered == list(range(len(prepared.encoded.target_spans)))
    question_start = prepared.encoded.prompt.index("Question:")
    first_after = [p for p, span in enumerate(prepared.encoded.prompt_spans)
                   if span is not None and span[0] >= question_start]
    assert prepared.readout_from <= first_after[0]


def test_full_suppression_equals_explaining_with_source_spans(smollm2):
    """method='atman' at sentence level is AtMan with those spans as units: the complete-target scores
    are the sum of the spans' scores when the spans cover the response."""
    result = Citer(smollm2, method="atman", multiplier=0.1).cite(PASSAGES, QUESTION, RESPONSE)
    prepared = Citer(smollm2).prepare(PASSAGES, QUESTION, RESPONSE)
    offset = prepared.encoded.prompt.index("Tamsin")
    spans = [(offset + s.start, offset + s.end) for s in result.sources]
    exp = Explainer(smollm2, multiplier=0.1).explain(prepared.encoded.prompt, RESPONSE, granularity="spans",
                                                     spans=spans, chat=True)
    assert exp.explanations[0].scores == pytest.approx(result.source_scores(), abs=1e-4)


def test_generated_response_and_passage_level(citer, smollm2):
    result = citer.cite(PASSAGES, QUESTION, sources="passage", max_new_tokens=12)
    assert result.settings["generated_response"] and result.response.strip()
    assert [s.text for s in result.sources] == [p["text"] for p in PASSAGES]
    assert result.settings["token_forwards"] > 0
    # the response is the model's greedy continuation of the prompt: each of its tokens is the argmax there
    prepared = citer.prepare(PASSAGES, QUESTION, result.response, sources="passage")
    ids = torch.tensor([prepared.encoded.input_ids])
    with torch.no_grad():
        greedy = smollm2.model(input_ids=ids).logits[0].argmax(-1)
    start = prepared.encoded.target_start
    assert greedy[start - 1:-1].tolist() == list(prepared.encoded.input_ids[start:])
    # and citing that text as a given response gives the same scores (generation changes nothing else)
    given = citer.cite(PASSAGES, QUESTION, result.response, sources="passage")
    assert not given.settings["generated_response"]
    for a, b in zip(given.spans, result.spans, strict=True):
        assert a.text == b.text and a.scores == pytest.approx(b.scores, abs=1e-5)


def test_an_empty_passage_is_said_and_the_others_keep_their_place(citer):
    passages = [PASSAGES[0], {"id": "blank", "text": "  "}, PASSAGES[1]]
    with pytest.warns(UserWarning, match=r"passage 1 \(blank\) is empty"):
        result = citer.cite(passages, QUESTION, "In Lindhaven.", sources="passage")
    assert [p.id for p in result.passages] == ["a", "b"] and [p.index for p in result.passages] == [0, 2]
    assert Citations.from_json(result.to_json()).passages[1].index == 2
    # a passage without an id is named by its place in the list given, the empty one counted
    with pytest.warns(UserWarning, match="passage 0 is empty"):
        unnamed = citer.cite(["  ", PASSAGES[1]["text"]], QUESTION, "In Lindhaven.")
    assert source_names(unnamed) == ["2:1", "2:2"]


def test_screened_citation_is_exact_for_the_sources_it_refines(smollm2, result):
    """screen=N: N sources get their own readout row (the default's scores), the rest first-order estimates."""
    screened = Citer(smollm2, screen=2).cite(PASSAGES, QUESTION, RESPONSE)
    refined = screened.settings["refined"]
    assert screened.settings["screen"] == 2 and len(refined) == 2
    # the evidence sentence is among the two the estimates rank highest
    assert 2 in refined
    for a, b in zip(screened.spans, result.spans, strict=True):
        assert [a.scores[s] for s in refined] == pytest.approx([b.scores[s] for s in refined], abs=1e-4)
    assert screened.spans[0].top(1)[0][0] == result.spans[0].top(1)[0][0] == 2
    assert screened.settings["token_forwards"] < result.settings["token_forwards"]
    assert Citer(smollm2, screen=0).cite(PASSAGES, QUESTION, RESPONSE).settings["refined"] == []
    for bad, method in ((-1, "readout"), (True, "readout"), (2.5, "readout"), (2, "atman")):
        with pytest.raises(AtmanError, match="screen must be"):
            Citer(smollm2, screen=bad, method=method)


def test_json_round_trip_and_views(result, tmp_path):
    again = Citations.from_json(result.to_json())
    assert again == result
    result.save(tmp_path / "c.json")
    assert Citations.load(tmp_path / "c.json") == result
    result.save(tmp_path / "c.html")
    page = (tmp_path / "c.html").read_text()
    assert "Lindhaven" in page and "data-source=\"4\"" in page and json.dumps(QUESTION)[1:-1] in page
    assert page == render_citations_html(result)
    console = Console(record=True, width=140)
    render_citations_terminal(result, console)
    text = console.export_text()
    assert "Doran Vesk repairs clocks in Lindhaven." in text and "(Trades)" in text
    # both views name a source as the terminal does (passage id, number in it) and say what a score is in
    names = source_names(result)
    assert f"<sup>{names[1]}</sup>" in page and f"[{names[result.spans[0].top(1)[0][0]]}] " in page
    assert "in nats" in page and "in nats" in " ".join(text.split())
    with pytest.raises(ValueError, match=".txt"):
        result.save(tmp_path / "c.txt")


def test_context_as_text_splits_at_blank_lines():
    passages = passages_from("First passage.\n\n  Second one.\n\n\n")
    assert [p.text for p in passages] == ["First passage.", "Second one."]
    assert passages[1].start == len("First passage.\n\n")
    assert passages_from([Passage("x", id="1"), "y"])[0].id == "1"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"context": "  \n\n ", "question": QUESTION, "response": RESPONSE}, EmptyInputError, "context is empty"),
        ({"context": PASSAGES, "question": " ", "response": RESPONSE}, EmptyInputError, "question"),
        ({"context": PASSAGES, "question": QUESTION, "response": ""}, EmptyInputError, "response"),
        ({"context": PASSAGES, "question": QUESTION, "response": RESPONSE, "spans": [(5, 500)]}, CitationError,
         "outside the response"),
        ({"context": PASSAGES, "question": QUESTION, "response": RESPONSE, "sources": "chapter"}, AtmanError,
         "source level"),
        ({"context": [{"title": "no text"}], "question": QUESTION, "response": RESPONSE}, CitationError, "no text"),
        ({"context": ["word " * 9000], "question": QUESTION, "response": RESPONSE}, AtmanError, "context of"),
        ({"context": PASSAGES, "question": QUESTION, "response": RESPONSE, "group_size": 1}, CitationError,
         "group_size"),
        ({"context": PASSAGES, "question": QUESTION, "response": RESPONSE, "refine_share": 0.0}, CitationError,
         "refine_share"),
        ({"context": PASSAGES, "question": QUESTION, "response": RESPONSE, "refine": "yes"}, CitationError,
         "refine must be"),
    ],
)
def test_bad_input_is_refused_with_a_message(citer, kwargs, error, message):
    with pytest.raises(error, match=message):
        citer.cite(**kwargs)


def test_one_call_cite_and_bad_method(smollm2):
    result = cite(PASSAGES[:2], QUESTION, "In Lindhaven.", model=smollm2, sources="passage")
    assert len(result.sources) == 2 and result.spans[0].top(1)[0][0] == 1
    with pytest.raises(AtmanError, match="citation method"):
        Citer(smollm2, method="lasso")


def _cli(*argv: str) -> int:
    from atman.cli import main

    return main(list(argv))


def test_cli_cites_passages_from_a_jsonl_file(tmp_path, capsys, smollm2):
    passages = tmp_path / "passages.jsonl"
    passages.write_text("\n".join(json.dumps(p) for p in PASSAGES) + "\n")
    out = tmp_path / "c.json"
    code = _cli("cite", "--passages", str(passages), "-Q", QUESTION, "-r", RESPONSE, "-f", "json", "-o", str(out),
                "-q")
    assert code == 0
    result = Citations.load(out)
    assert result.cite(0, k=1)[0][0].text == "Doran Vesk repairs clocks in the town of Lindhaven."
    assert [p.id for p in result.passages] == ["a", "b", "c"]
    code = _cli("cite", "--passages", str(passages), "-Q", QUESTION, "-r", RESPONSE, "-q", "--top", "1")
    text = capsys.readouterr().out
    # a source is named by its passage's id and its place in that passage: the first sentence of b
    assert code == 0 and "[b:1]" in text and "(Trades)" in text
    # without -q a command that writes a file says what it wrote where
    page = tmp_path / "c.html"
    code = _cli("cite", "--passages", str(passages), "-Q", QUESTION, "-r", RESPONSE, "-f", "html", "-o", str(page))
    captured = capsys.readouterr()
    assert code == 0 and captured.out == "" and page.read_text().lower().startswith("<!doctype html>")
    assert f"atman: wrote the citations as an HTML page (hover a sentence) to {page}" in captured.err


def test_cli_batch_keeps_going_past_a_bad_line(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join([
        json.dumps({"id": "ok", "context": [p["text"] for p in PASSAGES], "question": QUESTION,
                    "response": "In Lindhaven.", "sources": "passage"}),
        json.dumps({"id": "bad", "context": "", "question": QUESTION, "response": "x"}),
        "{not json",
        json.dumps({"id": 7, "context": "Some text.", "question": QUESTION, "response": "x", "factor": 0.9}),
    ]) + "\n")
    out = tmp_path / "results.jsonl"
    code = _cli("cite", "--input", str(requests), "-o", str(out), "-q")
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 1 and [r["line"] for r in results] == [1, 2, 3, 4]
    assert results[0]["id"] == "ok" and len(results[0]["sources"]) == 3 and "error" not in results[0]
    assert results[1]["id"] == "bad" and "context is empty" in results[1]["error"]
    assert "not valid JSON" in results[2]["error"]
    assert results[3]["id"] == 7 and "multiplier" in results[3]["error"]


def test_cli_batch_a_line_that_is_not_utf8_costs_only_itself(tmp_path):
    ok = json.dumps({"id": "ok", "context": [p["text"] for p in PASSAGES[:2]], "question": QUESTION,
                     "response": "In Lindhaven.", "sources": "passage"}).encode()
    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(ok + b"\n" + b'{"id": "bad", "question": "\xff"}\n' + ok.replace(b'"ok"', b'"again"') + b"\n")
    out = tmp_path / "results.jsonl"
    code = _cli("cite", "--input", str(requests), "-o", str(out), "-q")
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 1 and [r["line"] for r in results] == [1, 2, 3]
    assert "not valid UTF-8" in results[1]["error"]
    assert [r.get("id") for r in results] == ["ok", None, "again"] and "error" not in results[2]
    assert results[2]["sources"] == results[0]["sources"]


@pytest.mark.parametrize(("argv", "message"), [
    (["cite", "-Q", QUESTION], "exactly one of --context"),
    (["cite", "--context", "x", "--passages", "p.jsonl", "-Q", QUESTION], "exactly one of --context"),
    (["cite", "--context", "x"], "no question"),
    (["cite", "--context", "x", "-Q", QUESTION, "--refine-share", "2"], "--refine-share must lie in"),
    (["cite", "--context", "x", "-Q", QUESTION, "--group-size", "1"], "--group-size must be at least 2"),
    (["cite", "--context", "Ada lives in Oslo.", "-Q", QUESTION, "-r", "In Oslo.", "--span", "1-2"], "START:END"),
])
def test_cli_bad_options_exit_2(argv, message, capsys):
    assert _cli(*argv) == 2
    assert message in capsys.readouterr().err


def test_coarse_to_fine_refines_the_top_groups_and_shares_the_rest():
    true = [0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 0.2, 0.0]
    asked = []

    def score(units):
        asked.append(units)
        return torch.tensor([[sum(true[s] for s in unit)] for unit in units])

    groups = source_groups([0, 0, 0, 0, 1, 1, 1, 1], 2)
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    scores, refined = coarse_to_fine(score, groups, 8, share=0.9)
    # groups score 5, 1, 0, 0.2: the first two hold 6 / 6.2 >= 0.9 of the positive total
    assert asked == [groups, [[0], [1], [2], [3]]]
    assert refined == [True] * 4 + [False] * 4
    assert scores[:, 0].tolist() == pytest.approx([0.0, 5.0, 0.0, 1.0, 0.0, 0.0, 0.1, 0.1])


def test_refined_citation_finds_the_evidence_with_fewer_passes(smollm2):
    passages = [{"text": " ".join(f"Person {i} keeps {animal} in {town}." for i, (animal, town) in
                                  enumerate(zip(["goats", "bees", "hens", "ducks"], ["Arn", "Bel", "Cor", "Dun"],
                                                strict=True), start=k * 4))} for k in range(3)]
    passages[1]["text"] += " Doran Vesk repairs clocks in the town of Lindhaven."
    citer = Citer(smollm2)
    whole = citer.cite(passages, QUESTION, RESPONSE, refine=False)
    fine = citer.cite(passages, QUESTION, RESPONSE, refine=True, group_size=3)
    assert len(fine.sources) == 13 and fine.settings["refine"] == {"group_size": 3, "share": 0.99}
    assert whole.settings["refine"] is None and whole.settings["refined"] == list(range(13))
    evidence = [s for s, source in enumerate(fine.sources) if "Lindhaven" in source.text]
    assert evidence[0] in fine.settings["refined"] and len(fine.settings["refined"]) < 13
    assert fine.cite(0, k=1)[0][0].text == whole.cite(0, k=1)[0][0].text
    # refined sources carry the scores of scoring them alone, from the one unperturbed pass of both stages
    for s in fine.settings["refined"]:
        assert fine.spans[0].scores[s] == pytest.approx(whole.spans[0].scores[s], abs=1e-4)
    assert fine.settings["response_logprob"] == pytest.approx(whole.settings["response_logprob"], abs=1e-5)
    assert fine.settings["token_forwards"] < whole.settings["token_forwards"]
