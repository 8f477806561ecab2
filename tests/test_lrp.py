"""AttnLRP through lxt in a child process: relevances, lxt's conservation, an untouched parent, clear errors.

The tests that run lxt need its environment (``python -m atman.baselines.lrp --setup``, or
``ATMAN_LXT_PYTHON`` naming the Python of one); without it they are skipped with that reason.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys

import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama

from atman import AtmanError
from atman.baselines import BaselineUnavailableError, get_method
from atman.baselines.lrp import ENV_VAR, AttnLRP, child_python
from atman.baselines.lrp_child import translate_config
from atman.models import LoadedModel
from atman.units import encode

PROMPT = "Ada Lovelace lives in Oslo. Bob lives in Paris. Question: Where does Ada live? Answer: Ada lives in"
TARGET = " Oslo. Bob"

PYTHON = child_python()
needs_lxt = pytest.mark.skipif(
    PYTHON is None or not PYTHON.is_file(),
    reason=f"no lxt environment: create one with `python -m atman.baselines.lrp --setup` or set {ENV_VAR}")


def _patch_points() -> dict[str, object]:
    """Everything lxt's Llama rules would replace, as this process sees it."""
    points = {f"attention:{key}": fn for key, fn in modeling_llama.ALL_ATTENTION_FUNCTIONS.items()}
    points.update(eager=modeling_llama.eager_attention_forward, norm=modeling_llama.LlamaRMSNorm.forward,
                  mlp=modeling_llama.LlamaMLP.forward, dropout=torch.nn.Dropout.forward)
    return points


def _atman_scores(lm) -> list[float]:
    exp = get_method("atman", lm).attribute(PROMPT, " Oslo", granularity="word")
    return [item.score for item in exp.explanations[0].items]


@pytest.fixture(scope="module")
def lrp(smollm2):
    """An AttnLRP method, with what the parent looked like before it started."""
    before = {"points": _patch_points(), "atman": _atman_scores(smollm2)}
    method = AttnLRP(smollm2)
    yield method, before
    method.close()


@pytest.fixture(scope="module")
def cp_lrp(smollm2):
    method = AttnLRP(smollm2, rules="cp-lrp")
    yield method
    method.close()


def _logit_gradient_x_input(lm, encoded) -> torch.Tensor:
    """Plain gradient x input of the target logits in this process: what lxt's rules replace."""
    ids = torch.tensor([encoded.input_ids])
    embeddings = lm.model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = lm.model(inputs_embeds=embeddings, use_cache=False).logits[0]
    start = encoded.target_start
    logits[start - 1:-1].gather(-1, ids[0, start:, None]).sum().backward()
    return (embeddings * embeddings.grad)[0].sum(-1).double()


@pytest.mark.slow
@needs_lxt
def test_relevances_per_token_and_the_same_model(lrp, smollm2):
    method, _ = lrp
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    answer = method.relevance(encoded)
    relevance = torch.tensor(answer["relevance"], dtype=torch.float64)
    assert relevance.shape == (len(encoded.input_ids),) and torch.isfinite(relevance).all()
    # the child's forward pass is this process's: same weights, config and log-probabilities
    assert answer["target_logprob"] == pytest.approx(method.target_logprob(encoded.input_ids, encoded.target_start),
                                                     abs=1e-4)
    exp = method.attribute(PROMPT, TARGET, granularity="token")
    items = exp.explanations[0].items
    prompt_positions = [pos for pos, span in enumerate(encoded.prompt_spans) if span is not None]
    assert len(items) == len(prompt_positions) and all(math.isfinite(item.score) for item in items)
    assert [item.score for item in items] == pytest.approx(relevance[prompt_positions].tolist(), abs=1e-6)
    assert exp.settings["method"] == "attnlrp" and exp.settings["lxt"] == "2.1"
    # lxt's rules are in force in the child: the relevance is not the plain gradient x input
    assert not torch.allclose(relevance, _logit_gradient_x_input(smollm2, encoded), atol=1e-2)


@pytest.mark.slow
@needs_lxt
def test_the_answer_in_the_context_is_the_most_relevant_word(lrp):
    method, _ = lrp
    items = method.attribute(PROMPT, " Oslo", granularity="word").explanations[0].items
    top = max(items, key=lambda item: item.score)
    assert top.start == PROMPT.index("Oslo") and top.text.strip().startswith("Oslo")


@pytest.mark.slow
@needs_lxt
def test_conservation_as_lxt_gives_it(lrp, cp_lrp, smollm2):
    """CP-LRP's rules all conserve relevance: the input relevances add up to the explained logits. AttnLRP's
    softmax rule (a first-order expansion at the attention scores) does not, so only CP-LRP's sum is
    asserted; AttnLRP must send relevance through the attention weights, where CP-LRP sends none."""
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    cp = cp_lrp.relevance(encoded)
    assert sum(cp["relevance"]) == pytest.approx(sum(cp["target_logits"]), rel=1e-4)
    attn = lrp[0].relevance(encoded)
    assert attn["target_logits"] == pytest.approx(cp["target_logits"], abs=1e-4)
    assert not torch.allclose(torch.tensor(attn["relevance"]), torch.tensor(cp["relevance"]), atol=1e-2)


@pytest.mark.slow
@needs_lxt
def test_the_parent_is_untouched(lrp, smollm2):
    method, before = lrp
    method.relevance(encode(smollm2.tokenizer, PROMPT, TARGET))
    assert "lxt" not in sys.modules
    assert _patch_points() == before["points"]
    assert _atman_scores(smollm2) == before["atman"]


@pytest.mark.slow
@needs_lxt
def test_worker_errors_are_reported(smollm2):
    method = AttnLRP(smollm2)
    encoded = encode(smollm2.tokenizer, PROMPT, TARGET)
    with pytest.raises(AtmanError, match="lxt worker failed: ValueError: target_start"):
        method.relevance(dataclasses.replace(encoded, target_start=len(encoded.input_ids)))
    method.close()
    with pytest.raises(AtmanError, match="lxt worker ended"):
        method.relevance(encode(smollm2.tokenizer, PROMPT, TARGET))


def _tiny_llama() -> LoadedModel:
    config = modeling_llama.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2)
    return LoadedModel(model=modeling_llama.LlamaForCausalLM(config).eval(), tokenizer=None, name="tiny")


def test_a_missing_environment_names_the_setup_command(monkeypatch, tmp_path):
    lm = _tiny_llama()
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("ATMAN_CACHE_DIR", str(tmp_path))
    with pytest.raises(BaselineUnavailableError, match=r"lxt.*python -m atman\.baselines\.lrp --setup"):
        AttnLRP(lm)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere" / "bin" / "python"))
    with pytest.raises(BaselineUnavailableError, match=r"nowhere/bin/python is not a file.*--setup"):
        AttnLRP(lm)
    with pytest.raises(AtmanError, match="unknown rules"):
        AttnLRP(lm, rules="epsilon")


def test_a_python_that_cannot_run_lxt_is_refused_with_the_reason():
    # this process's Python has transformers 5 and no lxt: the worker starts and reports lxt's import error
    with pytest.raises(BaselineUnavailableError, match="AttnLRP: the lxt worker failed: ModuleNotFoundError"):
        AttnLRP(_tiny_llama(), python=sys.executable)
    with pytest.raises(BaselineUnavailableError, match=r"the lxt worker ended \(exit code 1\)"):
        AttnLRP(_tiny_llama(), python=shutil.which("false"))


def test_an_architecture_without_rules_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = LoadedModel(model=GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=16)),
                     tokenizer=None, name="tiny")
    with pytest.raises(BaselineUnavailableError, match="no AttnLRP rules for GPT2LMHeadModel"):
        AttnLRP(lm)


def test_configs_are_translated_to_transformers_4():
    llama = translate_config({"model_type": "llama", "dtype": "float32",
                              "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}})
    assert llama == {"model_type": "llama", "rope_theta": 100000.0}
    scaled = translate_config({"rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0}})
    assert scaled == {"rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    gemma = translate_config({"rope_parameters": {"full_attention": {"rope_theta": 1e6, "rope_type": "default"},
                                                  "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}})
    assert gemma == {"rope_theta": 1e6, "rope_local_base_freq": 1e4}


@pytest.mark.slow
@needs_lxt
def test_source_scores_sum_each_sources_token_relevance(lrp, smollm2):
    from atman.evaluate.citation import CitationTask, Sources, layout

    method, _ = lrp
    sentences = ["Ada Lovelace lives in Oslo.", "Bob lives in Paris.", "The sky is green."]
    text = " ".join(sentences)
    spans = [(text.index(s), text.index(s) + len(s)) for s in sentences]
    task = CitationTask(Sources.from_spans(text, spans), "Where does Ada live?", "Ada lives in Oslo.")
    lay = layout(smollm2.tokenizer, task)
    relevance = method.relevance_of_ids(lay.input_ids, lay.response_start)["relevance"]
    scores = method.source_scores(task)
    assert scores.shape == (3,)
    for score, positions in zip(scores, lay.source_positions, strict=True):
        assert score == pytest.approx(sum(relevance[p] for p in positions), rel=1e-6, abs=1e-9)
    assert int(np.argmax(scores)) == 0   # the sentence that states the answer
    assert method.worker_cpu_seconds() > 0
