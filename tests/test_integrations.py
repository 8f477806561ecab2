"""atman beside inseq, Captum and pandas; saving explanations as JSON, HTML and PNG."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import have, tiny_model

from atman import Explainer, Explanation, ImageItem, Item, TargetExplanation, TargetSpan

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PROMPT = "Ada lives in Oslo. Bo lives in Rome. Ada lives in"
CONTINUATION = " Oslo. Bo"


def text_explanation(per_token: bool = True) -> Explanation:
    """A hand-made explanation of " Oslo." (two target tokens) over three word units of the prompt."""
    prompt, target = "Ada lives in Oslo.", " Oslo."
    words = [Item("prompt", "Ada", 0, 3, 0.5), Item("prompt", "lives", 4, 5, -0.25),
             Item("prompt", "Oslo.", 13, 5, 2.0)]
    if not per_token:
        return Explanation("m", prompt, target, (TargetExplanation(TargetSpan(target, 0, 6), tuple(words)),),
                           {"target_granularity": "complete"})
    second = [Item("prompt", w.text, w.start, w.length, w.score / 10) for w in words]
    return Explanation("m", prompt, target, (
        TargetExplanation(TargetSpan(" Oslo", 0, 5), tuple(words)),
        TargetExplanation(TargetSpan(".", 5, 1), (*second, Item("target", " Oslo", 0, 5, 0.75))),
    ), {"target_granularity": "token"})


def image_explanation() -> Explanation:
    tiles = tuple(ImageItem(image=0, left=x / 2, top=y / 2, width=0.5, height=0.5, score=float(x + 2 * y) - 1.0)
                  for y in range(2) for x in range(2))
    items = (*tiles, Item("prompt", "picture", 17, 7, 0.2))
    return Explanation("m", "<image>This is a picture of a", " circle",
                       (TargetExplanation(TargetSpan(" circle", 0, 7), items),), {"method": "atman"})


# ---------------------------------------------------------------- core stays free of optional packages

def test_core_imports_none_of_inseq_captum_pandas():
    code = ("import sys, atman, atman.explanation, atman.render; "
            "print([m for m in ('inseq', 'captum', 'pandas', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- save / to_html

def test_save_json_round_trips(tmp_path):
    exp = text_explanation()
    assert exp.save(tmp_path / "e.json") == [tmp_path / "e.json"]
    assert Explanation.load(tmp_path / "e.json") == exp
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))["target"] == " Oslo."


def test_save_html_by_extension_writes_the_report(tmp_path):
    exp = text_explanation()
    html = exp.to_html(title="Why Oslo?")
    assert html.startswith("<!DOCTYPE html>") and "<title>Why Oslo?</title>" in html
    assert "lives" in html and "Oslo." in html
    for name in ("e.html", "e.HTM"):
        exp.save(tmp_path / name, title="Why Oslo?")
        assert (tmp_path / name).read_text(encoding="utf-8") == html


def test_save_rejects_unknown_extensions_and_misplaced_options(tmp_path):
    exp = text_explanation()
    with pytest.raises(ValueError, match=r"\.json, \.html or \.png"):
        exp.save(tmp_path / "e.txt")
    with pytest.raises(ValueError, match="title and images"):
        exp.save(tmp_path / "e.json", title="x")
    with pytest.raises(ValueError, match="no image units"):
        exp.save(tmp_path / "e.png")
    assert not list(tmp_path.iterdir())


def test_save_png_overlays_image_explanations(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    exp = image_explanation()
    with pytest.raises(ValueError, match="needs the input images"):
        exp.save(tmp_path / "e.png")
    picture = Image.new("RGB", (40, 20), (128, 128, 128))
    assert exp.save(tmp_path / "one.png", images=[picture]) == [tmp_path / "one.png"]
    overlay = Image.open(tmp_path / "one.png")
    assert overlay.size == (40, 20)
    # bottom-right tile has the highest score, top-left a negative one: they get different colours
    assert overlay.getpixel((35, 15)) != overlay.getpixel((5, 5)) != (128, 128, 128)
    written = exp.save(tmp_path / "two.png", images=[picture, picture])
    assert [p.name for p in written] == ["two-image1.png", "two-image2.png"] and all(p.exists() for p in written)
    html = exp.to_html(images=[picture])
    assert "data:image/png;base64," in html


# ---------------------------------------------------------------- pandas

def test_to_frame_has_one_row_per_unit_and_target():
    pytest.importorskip("pandas")
    df = text_explanation().to_frame()
    assert list(df.columns) == ["method", "target_index", "target", "target_start", "target_end", "kind", "text",
                                "start", "end", "score", "refined"]
    assert len(df) == 3 + 4
    assert df["target"].tolist() == [" Oslo"] * 3 + ["."] * 4
    assert df[["target_start", "target_end"]].iloc[-1].tolist() == [5, 6]
    last = df.iloc[-1]
    assert (last["kind"], last["text"], last["start"], last["end"], last["score"]) == ("target", " Oslo", 0, 5, 0.75)
    assert df.loc[df["text"] == "Oslo.", "score"].tolist() == [2.0, 0.2]
    assert set(df["method"]) == {"atman"}


def test_to_frame_of_image_explanations_adds_the_rectangles():
    pytest.importorskip("pandas")
    df = image_explanation().to_frame()
    assert list(df.columns)[-5:] == ["image", "left", "top", "width", "height"]
    tiles = df[df["kind"] == "image"]
    assert len(tiles) == 4 and tiles["start"].isna().all() and (tiles["image"] == 0).all()
    assert tiles.sort_values("score")["left"].tolist() == [0.0, 0.5, 0.0, 0.5]
    word = df[df["kind"] == "prompt"].iloc[0]
    assert (word["start"], word["end"]) == (17, 24) and word[["image", "left"]].isna().all()


def test_pandas_missing_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r'pip install "atman\[pandas\]"'):
        text_explanation().to_frame()


def test_optional_packages_missing_name_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ImportError, match=r'pip install "atman\[captum\]"'):
        text_explanation().to_captum()
    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.delitem(sys.modules, "atman.integrations.pandas", raising=False)
    with pytest.raises(ImportError, match=r'pip install "atman\[pandas\]"'):
        import atman.integrations.pandas  # noqa: F401


def test_read_records_flattens_metrics():
    pytest.importorskip("pandas")
    from atman.integrations.pandas import read_records

    path = RESULTS / "evaluation-smollm2.records.jsonl"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    df = read_records(path)
    assert len(df) == len(lines)
    assert {"dataset", "granularity", "example", "method", "ap", "top1", "aopc_morf"} <= set(df.columns)
    for i, record in enumerate(lines):
        assert df.loc[i, "method"] == record["method"] and df.loc[i, "example"] == record["example"]
        assert all(df.loc[i, name] == value for name, value in record["metrics"].items())
    # the result .json holds the same records
    assert len(read_records(RESULTS / "evaluation-smollm2.json")) == len(lines)


def test_read_records_of_a_folder_names_each_run(tmp_path):
    pytest.importorskip("pandas")
    from atman.integrations.pandas import read_records

    record = {"dataset": "qa", "granularity": "word", "example": "e1", "method": "atman", "units": 3,
              "seconds": 1.0, "metrics": {"ap": 0.5}}
    (tmp_path / "a.records.jsonl").write_text(json.dumps(record) + "\n\n", encoding="utf-8")
    (tmp_path / "b.records.jsonl").write_text(json.dumps(dict(record, method="saliency")) + "\n", encoding="utf-8")
    df = read_records(tmp_path)
    assert df[["run", "method", "ap"]].values.tolist() == [["a", "atman", 0.5], ["b", "saliency", 0.5]]
    assert len(read_records(str(tmp_path / "*.records.jsonl"))) == 2
    (tmp_path / "c.records.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"c\.records\.jsonl:1"):
        read_records(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing")


def test_comparison_frame_stacks_methods():
    pytest.importorskip("pandas")
    from atman.integrations.pandas import comparison_frame

    exp = text_explanation(per_token=False)
    df = comparison_frame({"atman": exp, "saliency": exp.postprocessed("absolute")})
    wide = df.pivot_table(index="text", columns="method", values="score")
    assert wide.loc["lives"].tolist() == [-0.25, 0.25]
    with pytest.raises(ValueError, match="no explanations"):
        comparison_frame([])


# ---------------------------------------------------------------- Captum

def test_to_captum_per_token_result_plots():
    pytest.importorskip("captum")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    result = text_explanation().to_captum()
    assert result.input_tokens == ["Ada", "lives", "Oslo."]
    assert result.output_tokens == [" Oslo", "."]
    assert result.token_attr.flatten().tolist() == pytest.approx([0.5, -0.25, 2.0, 0.05, -0.025, 0.2])
    assert result.seq_attr.tolist() == pytest.approx([0.55, -0.275, 2.2])
    fig, ax = result.plot_token_attr()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Ada", "lives", "Oslo."]
    fig, ax = result.plot_seq_attr()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Ada", "lives", "Oslo."]
    assert sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height()) == [-0.275, 0.55, 2.2]


def test_to_captum_complete_target_has_no_token_attr():
    pytest.importorskip("captum")
    result = text_explanation(per_token=False).to_captum()
    assert result.output_tokens == [" Oslo."] and result.token_attr is None
    assert result.seq_attr.tolist() == pytest.approx([0.5, -0.25, 2.0])
    with pytest.raises(ValueError, match="plot_seq_attr"):
        result.plot_token_attr()


@pytest.mark.slow
def test_to_captum_sequence_scores_are_atmans_complete_scores(smollm2):
    pytest.importorskip("captum")
    explainer = Explainer(smollm2)
    per_token = explainer.explain(PROMPT, CONTINUATION, granularity="word", target_granularity="token")
    complete = explainer.explain(PROMPT, CONTINUATION, granularity="word")
    result = per_token.to_captum()
    assert result.token_attr.shape == (len(per_token.explanations), len(complete.explanations[0].items))
    # one batched pass per target token against one pass for the whole target: the same sums, another order
    assert result.seq_attr.tolist() == pytest.approx(complete.explanations[0].scores, abs=1e-4)


# ---------------------------------------------------------------- inseq

@pytest.fixture(scope="module")
def inseq():
    if not have("inseq"):
        pytest.skip("inseq is not installed (pip install --no-deps inseq==0.7.1 && pip install -e '.[inseq]')")
    import inseq

    import atman.integrations.inseq  # noqa: F401  registers the method

    return inseq


@pytest.mark.slow
def test_inseq_atman_equals_the_explainer_at_token_level(inseq, smollm2):
    assert "atman" in inseq.list_feature_attribution_methods()
    model = inseq.load_model(smollm2.model, "atman", tokenizer=smollm2.tokenizer)
    out = model.attribute(PROMPT, PROMPT + CONTINUATION, show_progress=False)
    seq = out.sequence_attributions[0]
    expected = Explainer(smollm2).explain(PROMPT, CONTINUATION, granularity="token", target_granularity="token")
    n_prompt = len(expected.explanations[0].items)
    assert [t.token for t in seq.target][n_prompt:] == smollm2.tokenizer.convert_ids_to_tokens(
        smollm2.tokenizer(CONTINUATION, add_special_tokens=False)["input_ids"])
    scores = seq.target_attributions
    assert scores.shape == (n_prompt + len(expected.explanations), len(expected.explanations))
    for step, target_explanation in enumerate(expected.explanations):
        column = scores[:, step]
        assert column[:n_prompt + step].tolist() == pytest.approx(target_explanation.scores, abs=1e-5)
        assert column[n_prompt + step:].isnan().all()
    assert out.info["attribution_method"] == "atman"
    html = out.show(display=False, return_html=True)
    assert "Oslo" in html and "Rome" in html
    out.show()  # the terminal view renders without error
    out.aggregate()


@pytest.mark.slow
def test_inseq_atman_takes_explainer_options_and_batches(inseq, smollm2):
    model = inseq.load_model(smollm2.model, "atman", tokenizer=smollm2.tokenizer, kappa=0.7)
    prompts = ["The capital of France is", PROMPT]
    out = model.attribute(prompts, [prompts[0] + " Paris", prompts[1] + " Oslo"], show_progress=False)
    explainer = Explainer(smollm2, kappa=0.7)
    for prompt, target, seq in zip(prompts, (" Paris", " Oslo"), out.sequence_attributions, strict=True):
        expected = explainer.explain(prompt, target, granularity="token", target_granularity="token")
        assert seq.target_attributions[:-1, 0].tolist() == pytest.approx(expected.explanations[0].scores, abs=1e-5)
    with pytest.raises(ValueError, match="attributed_fn"):
        model.attribute(prompts[0], prompts[0] + " Paris", attributed_fn="logit", show_progress=False)
    with pytest.raises(ValueError, match="when loading"):
        model.attribute(prompts[0], prompts[0] + " Paris", attribution_args={"kappa": 0.5}, show_progress=False)


@pytest.mark.slow
def test_inseq_atman_on_a_tiny_model_restores_its_attention(inseq, smollm2):
    tiny = tiny_model("llama", attn_implementation="eager", vocab_size=len(smollm2.tokenizer))
    model = inseq.load_model(tiny, "atman", tokenizer=smollm2.tokenizer)
    assert tiny.config._attn_implementation == "atman"
    out = model.attribute("Ada lives in Oslo.", "Ada lives in Oslo. Ada", show_progress=False)
    expected = Explainer(model.attribution_method.explainer.lm).explain(
        "Ada lives in Oslo.", " Ada", granularity="token", target_granularity="token")
    assert out.sequence_attributions[0].target_attributions[:-1, 0].tolist() == pytest.approx(
        expected.explanations[0].scores, abs=1e-5)
    model.attribution_method.unhook()
    assert tiny.config._attn_implementation == "eager"
