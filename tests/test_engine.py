"""The one engine and the one suppression setting: identities that every explainer inherits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_vlm_families import END, FAMILIES, IMAGE, START, TOKENS
from transformers import AutoModelForImageTextToText, DynamicCache

from atman import AtmanError, Explainer, LoadedModel, enable, manipulate
from atman.defaults import FACTOR_RENAMED
from atman.engine import Engine
from atman.rows import Suppression, spread_conceptually, suppression_rows
from atman.vision_language import has_multimodal_positions, language_model_inputs

LENGTH, N_TARGET = 12, 3


def _ids() -> torch.Tensor:
    return torch.randint(3, 100, (1, LENGTH), generator=torch.Generator().manual_seed(11))


def _rows() -> torch.Tensor:
    return suppression_rows(LENGTH, [[0], [2, 3], [5], [8], [9], [10]], 0.1)


def test_suppression_validates_once_for_every_client():
    assert Suppression().settings() == {"multiplier": 0.1, "kappa": None, "mode": "log-additive"}
    for bad in ({"multiplier": -0.1}, {"multiplier": 1.5}, {"multiplier": float("nan")}, {"multiplier": "0.1"},
                {"kappa": 0.0}, {"kappa": float("inf")}, {"mode": "additive"}, {"backend": "cuda"}):
        with pytest.raises(AtmanError):
            Suppression(**bad)
    base = Suppression(multiplier=0.2, kappa=0.7)
    assert base.with_options().kappa == 0.7 and base.with_options(kappa=None).kappa is None
    assert base.with_options(multiplier=0.0, mode="multiplicative").settings()["multiplier"] == 0.0


def test_the_old_factor_spelling_is_refused_everywhere_with_the_explanation(tmp_path):
    from atman import ClassifierExplainer, ImageClassifierExplainer, SimilarityExplainer
    from atman.baselines import AtMan

    lm = LoadedModel(model=enable(tiny_model("llama")), tokenizer=None, name="llama")
    for make in (lambda: Explainer(lm, factor=0.9), lambda: AtMan(lm, factor=0.9),
                 lambda: ClassifierExplainer(None, factor=0.9), lambda: SimilarityExplainer(None, factor=0.9),
                 lambda: ImageClassifierExplainer(None, factor=0.9)):
        with pytest.raises(AtmanError) as info:
            make()
        assert str(info.value) == FACTOR_RENAMED
    assert "multiplier = 1 - factor" in FACTOR_RENAMED


def test_multiplier_one_reproduces_the_model_and_rows_are_independent():
    model = enable(tiny_model("llama"))
    ids = _ids()
    engine = Engine(model)
    rows = _rows()
    rows[3] = 1.0  # a row with nothing damped
    losses = engine.target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -N_TARGET - 1:-1]
    plain = -torch.log_softmax(logits, -1).gather(-1, ids[0, -N_TARGET:, None])[:, 0]
    torch.testing.assert_close(losses[0], plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(losses[3], plain, atol=1e-5, rtol=0)
    for batch_size in (1, 2):
        single = Engine(model, batch_size=batch_size).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows)
        torch.testing.assert_close(single, losses, atol=2e-6, rtol=0)


def test_naive_engine_computes_logits_at_every_position_and_cached_only_at_the_target():
    """The naive engine is the yardstick of the cached engine's speed: it costs what the paper's code
    cost (logits at every position of every row); the cached engine computes the target's only."""
    model = enable(tiny_model("llama"))
    ids = _ids()
    head = model.get_output_embeddings()
    positions: list[int] = []
    hook = head.register_forward_hook(lambda module, args, out: positions.append(args[0].shape[0] * args[0].shape[1]))
    rows = _rows()
    try:
        naive = Engine(model).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows, engine="naive")
        naive_positions, positions[:] = sum(positions), []
        cached = Engine(model).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows)
    finally:
        hook.remove()
    assert naive_positions == rows.shape[0] * LENGTH
    assert sum(positions) <= rows.shape[0] * (N_TARGET + 1)
    torch.testing.assert_close(cached, naive, atol=2e-6, rtol=0)


def test_embeddings_in_equal_token_ids_in():
    model = enable(tiny_model("qwen2"))
    ids = _ids()
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
    engine = Engine(model)
    by_ids = engine.target_losses({"input_ids": ids}, ids[0, -N_TARGET:], _rows())
    by_embeds = engine.target_losses({"inputs_embeds": embeds}, ids[0, -N_TARGET:], _rows())
    naive = engine.target_losses({"inputs_embeds": embeds}, ids[0, -N_TARGET:], _rows(), engine="naive")
    torch.testing.assert_close(by_embeds, by_ids, atol=2e-6, rtol=0)
    torch.testing.assert_close(naive, by_ids, atol=2e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
@pytest.mark.parametrize("mode", ["log-additive", "multiplicative"])
def test_readout_suppression_equals_a_slow_reference(family, mode):
    """Readout from p: the context before p is encoded once, unperturbed; only the queries from p on
    see the multipliers. Reference: a plain cache of the unperturbed prefix, then each row's tail alone."""
    model = enable(tiny_model(family))
    ids = _ids()
    readout = 7
    rows = _rows()
    got = Engine(model).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows, mode=mode, readout_from=readout)
    expected = []
    with torch.no_grad():
        for row in rows:
            cache = DynamicCache()
            model(input_ids=ids[:, :readout], cache=cache, use_cache=True)
            with manipulate(row[None], mode=mode):
                logits = model(input_ids=ids[:, readout:], cache=cache, use_cache=True).logits
            logprobs = torch.log_softmax(logits[0, -N_TARGET - 1:-1].float(), -1)
            expected.append(-logprobs.gather(-1, ids[0, -N_TARGET:, None])[:, 0])
    torch.testing.assert_close(got, torch.stack(expected), atol=2e-5, rtol=0)
    # damping a context position changes the readout, and differs from full suppression
    full = Engine(model).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows, mode=mode)
    assert (got[2] - got[0]).abs().max() > 1e-5
    assert (got[2] - full[2]).abs().max() > 1e-6
    # rows damping only positions at or after p are the same under both
    torch.testing.assert_close(got[4:], full[4:], atol=2e-6, rtol=0)
    with pytest.raises(AtmanError, match="cached"):
        Engine(model).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], rows, engine="naive", readout_from=3)


def test_conceptual_spread_uses_the_multiplier():
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    rows = suppression_rows(4, [[0]], 0.1)
    spread_conceptually(rows, embeddings, [[0]], [0, 1, 2, 3], 0.1, kappa=0.7)
    # identical token: 1 - 0.9 * 1 = 0.1; cos 0.8 >= 0.7: 1 - 0.9 * 0.8; orthogonal: untouched
    torch.testing.assert_close(rows[1], torch.tensor([0.1, 0.1, 1.0, 1.0 - 0.9 * 0.8]))


def test_engine_counts_what_it_runs():
    model = enable(tiny_model("llama"))
    ids = _ids()
    engine = Engine(model, batch_size=2)
    engine.trace = []
    engine.target_losses({"input_ids": ids}, ids[0, -N_TARGET:], _rows())
    assert engine.forward_calls == len(engine.trace) >= 4
    assert engine.trace[0].rows == 1 and engine.trace[0].queries == LENGTH and engine.trace[0].reused == 0
    assert all(r.reused + r.queries == LENGTH for r in engine.trace)
    assert engine.token_forwards == sum(r.rows * r.queries for r in engine.trace)


def test_progress_is_reported_and_an_exception_cancels():
    model = enable(tiny_model("llama"))
    ids = _ids()
    seen = []
    Engine(model, batch_size=2).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], _rows(),
                                              progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (7, 7) and [d for d, _ in seen] == sorted(d for d, _ in seen)

    class Stop(Exception):
        pass

    def stop(done, total):
        if done > 1:
            raise Stop

    with pytest.raises(Stop):
        Engine(model, batch_size=2).target_losses({"input_ids": ids}, ids[0, -N_TARGET:], _rows(), progress=stop)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_language_fast_path_is_exact_where_it_is_used(family):
    """The vision tower runs once: the language model runs on its input embeddings with prefix reuse.
    Where that reproduces the model's own output it must equal running every row on the full inputs."""
    make_config, make_pixels = FAMILIES[family]
    config = make_config()
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa").eval()
    enable(model, implementation={"text_config": "atman", "vision_config": "sdpa"})
    ids = torch.tensor([[1, START] + [IMAGE] * TOKENS + [END, 10, 11, 12, 13, 14]])
    inputs = {"input_ids": ids, **make_pixels()}
    if family == "qwen2_vl":
        inputs["mm_token_type_ids"] = (ids == IMAGE).long()
    if family == "paligemma":
        inputs["token_type_ids"] = torch.zeros_like(ids)
    length, n_target = ids.shape[1], 3
    targets = ids[0, -n_target:]
    rows = suppression_rows(length, [[1], list(range(2, 2 + TOKENS // 2)), [length - 4]], 0.1)
    engine = Engine(model)
    exact = engine.target_losses(inputs, targets, rows, engine="naive")
    embeds, _ = language_model_inputs(model, inputs)
    split = 2 + TOKENS // 2  # inside the image block
    if not has_multimodal_positions(model) and engine.reuses_prefix_exactly({"inputs_embeds": embeds}, targets,
                                                                            exact[0], split):
        fast = engine.target_losses({"inputs_embeds": embeds}, targets, rows)
        torch.testing.assert_close(fast, exact, atol=2e-5, rtol=0)
    else:
        # the explainer falls back to the full inputs for such families (bidirectional image blocks,
        # prefix-LM prompts, positions the embeddings alone do not carry); LLaVA-style models must not
        assert family not in ("llava", "idefics3")
    assert has_multimodal_positions(model) == (family == "qwen2_vl")
