"""Random readout masks and the sparse linear fit (atman/readout.py), and the prefix reuse of the scorer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atman import enable
from atman.errors import AtmanError
from atman.evaluate.citation import PrefixReuse, Sources, passages_of
from atman.readout import (
    LASSO_ALPHA,
    ReadoutPass,
    lasso,
    linear_surrogate,
    logit_prob,
    mask_scores,
    random_masks,
    removal_estimates,
    screened_scores,
)
from tests.conftest import have, tiny_model


def test_masks_are_drawn_as_context_cite_draws_them():
    masks = random_masks(30, 8, seed=5)
    assert masks.shape == (8, 30) and masks.dtype == bool
    assert np.array_equal(masks[3], np.random.RandomState(8).choice([False, True], size=30, p=[0.5, 0.5]))
    assert 0.2 < random_masks(200, 4, keep=0.3).mean() < 0.4
    with pytest.raises(AtmanError):
        random_masks(3, 2, keep=1.0)


@pytest.mark.skipif(not have("sklearn"), reason="scikit-learn is not installed")
@pytest.mark.parametrize(("n", "d"), [(32, 40), (64, 80), (256, 80)])
def test_lasso_equals_scikit_learns_in_context_cites_recipe(n, d):
    from sklearn.linear_model import Lasso
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(d)
    masks = random_masks(d, n, seed=n)
    weights = rng.normal(size=d) * (rng.random(d) < 0.2) * 3
    outputs = masks @ weights + rng.normal(size=n) * 0.5
    scaler, model = StandardScaler(), Lasso(alpha=LASSO_ALPHA, random_state=0)
    make_pipeline(scaler, model).fit(masks.astype(np.float32), outputs / 7)
    assert np.allclose(linear_surrogate(masks, outputs, 7), model.coef_ / scaler.scale_ * 7, atol=1e-5)


def test_lasso_solves_its_objective():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 6)), rng.normal(size=50)
    w, b = lasso(x, y, 0.05, tolerance=1e-10)

    def objective(w_, b_):
        return ((y - x @ w_ - b_) ** 2).sum() / (2 * len(y)) + 0.05 * np.abs(w_).sum()

    best = objective(w, b)
    for j in range(6):
        for step in (1e-3, -1e-3):
            moved = w.copy()
            moved[j] += step
            assert objective(moved, y.mean() - x.mean(axis=0) @ moved) >= best - 1e-12
    # a strong penalty keeps every weight at zero: the intercept is the mean
    zero, intercept = lasso(x, y, 100.0)
    assert not zero.any() and intercept == pytest.approx(y.mean())


def test_mask_scores_recover_an_additive_response_per_span():
    weights = np.array([[3.0, 0.0], [0.0, 2.0], [0.5, 0.5], [0.0, 0.0]])   # sources x spans

    def logprobs(keep):
        # token 0 belongs to span 0, tokens 1-2 to span 1; the response gets less likely as sources go
        dropped = (~keep).astype(float)
        span0 = -0.1 - dropped @ weights[:, 0]
        span1 = -0.2 - dropped @ weights[:, 1]
        return np.stack([span0, span1 / 2, span1 / 2], axis=1)

    scores = mask_scores(logprobs, 4, [[0], [1, 2]], masks=128, alpha=1e-4)
    assert scores.shape == (4, 2)
    assert [int(np.argmax(scores[:, k])) for k in range(2)] == [0, 1]
    assert np.all(scores[3] < scores[2]) and np.all(scores[2] > 0)
    with_singles = mask_scores(logprobs, 4, [[0]], masks=16, singles=True)
    assert int(np.argmax(with_singles[:, 0])) == 0
    with pytest.raises(AtmanError):
        mask_scores(lambda keep: np.zeros((1, 3)), 4, [[0]], masks=8)


def test_logit_prob_is_log_odds():
    p = np.array([0.1, 0.5, 0.9])
    assert np.allclose(logit_prob(np.log(p)), np.log(p / (1 - p)))


def test_prefix_reuse_equals_whole_passes():
    model = enable(tiny_model("llama", seed=2))
    ids = [int(t) for t in torch.randint(1, 120, (30,), generator=torch.Generator().manual_seed(4))]
    reuse = PrefixReuse(model, ids)
    variants = [ids, ids[:10] + ids[14:], ids[:25] + [7, 8] + ids[25:], ids[3:]]
    for seq in variants:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0]
        want = torch.log_softmax(logits[-5:-1], -1).gather(-1, torch.tensor(seq[-4:])[:, None])[:, 0].numpy()
        assert np.allclose(reuse.logprobs(seq, 4), want, atol=1e-5)
    assert reuse.shared(ids[:10] + [1] + ids[11:], len(ids)) == 10
    assert reuse.shared(ids, 12) == 12


def test_passages_are_the_blank_line_blocks():
    text = "A b. C d.\n\nE f.\n\n\nG h."
    sources = Sources.from_spans(text, [(0, 4), (5, 9), (11, 15), (18, 22)])
    assert passages_of(sources) == [0, 0, 1, 2]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_readout_pass_equals_the_engines_readout_rows(family):
    from atman.engine import Engine

    model = enable(tiny_model(family, seed=5))
    ids = [int(t) for t in torch.randint(1, 120, (40,), generator=torch.Generator().manual_seed(2))]
    readout_from, n_target = 28, 6
    rows = torch.ones(5, len(ids))
    rows[1, 2:9] = 0.0
    rows[2, 9:20] = 0.0
    rows[3, [0, 4, 22, 30]] = 0.3   # a tail key too
    rows[4, 12:14] = 0.5
    want = Engine(model).target_losses({"input_ids": torch.tensor([ids])}, torch.tensor(ids[-n_target:]), rows,
                                       readout_from=readout_from)
    readout = ReadoutPass(model, ids, readout_from, n_target, token_budget=30)   # several calls
    assert torch.allclose(readout.losses(rows), want, atol=1e-5)
    with pytest.raises(AtmanError):
        ReadoutPass(model, ids, 35, n_target)


def test_linear_estimates_are_the_derivative_in_the_multipliers():
    model = enable(tiny_model("llama", seed=5))
    ids = [int(t) for t in torch.randint(1, 120, (40,), generator=torch.Generator().manual_seed(2))]
    readout = ReadoutPass(model, ids, 28, 6)
    sources = [[3], list(range(10, 16)), [20, 21]]
    spans = [range(6), [0, 1]]
    base, linear = removal_estimates(readout, sources, spans, renormalised=False)
    _, renormalised = removal_estimates(readout, sources, spans)
    assert torch.allclose(base, readout.losses(torch.ones(1, len(ids)))[0], atol=1e-5)
    assert linear.shape == renormalised.shape == (3, 2)
    for s, positions in enumerate(sources):
        # minus the derivative of the span's loss in the source's multiplier, against a central difference
        step = torch.ones(2, len(ids))
        step[0, positions], step[1, positions] = 1 + 2e-2, 1 - 2e-2
        moved = readout.losses(step).double()
        for k, tokens in enumerate(spans):
            numeric = (moved[0, list(tokens)] - moved[1, list(tokens)]).sum() / 4e-2
            assert linear[s, k] == pytest.approx(-float(numeric), rel=3e-2, abs=3e-4)



@pytest.mark.parametrize("seed", [0, 2])
def test_renormalised_estimates_are_closer_to_exact_removal(seed):
    model = enable(tiny_model("llama", seed=5 + seed))
    ids = [int(t) for t in torch.randint(1, 120, (40,), generator=torch.Generator().manual_seed(2 + seed))]
    readout = ReadoutPass(model, ids, 28, 6)
    sources = [list(range(a, a + 3)) for a in range(0, 27, 3)]
    _, linear = removal_estimates(readout, sources, [range(6)], renormalised=False)
    _, renormalised = removal_estimates(readout, sources, [range(6)])
    rows = torch.ones(len(sources) + 1, len(ids))
    for s, positions in enumerate(sources):
        rows[s + 1, positions] = 0.0
    losses = readout.losses(rows).double()
    exact = (losses[1:] - losses[0]).sum(dim=1).numpy()
    assert np.abs(renormalised[:, 0] - exact).sum() < 0.7 * np.abs(linear[:, 0] - exact).sum()


def test_screened_scores_are_exact_for_the_top_sources():
    model = enable(tiny_model("llama", seed=7))
    ids = [int(t) for t in torch.randint(1, 120, (48,), generator=torch.Generator().manual_seed(3))]
    sources = [list(range(a, a + 4)) for a in range(0, 36, 4)]   # nine sources before the tail
    readout = ReadoutPass(model, ids, 38, 5)
    screened = screened_scores(readout, sources, [range(5)], top=3)
    scores, chosen = screened.scores, screened.exact
    assert scores.shape == (9, 1) and len(chosen) == 3
    rows = torch.ones(9, len(ids))
    for s, positions in enumerate(sources):
        rows[s, positions] = 0.0
    exact = (readout.losses(rows) - readout.losses(torch.ones(1, len(ids)))).sum(dim=1).numpy()
    assert np.allclose(scores[chosen, 0], exact[chosen], atol=1e-5)


def test_local_suppression_spans_readout_to_full_suppression():
    from atman.engine import Engine

    model = enable(tiny_model("llama", seed=9))
    ids = [int(t) for t in torch.randint(1, 120, (40,), generator=torch.Generator().manual_seed(6))]
    readout_from, n_target = 30, 5
    source = [8, 9, 10]
    rows = torch.ones(2, len(ids))
    rows[1, source] = 0.0
    engine = Engine(model)
    target = torch.tensor(ids[-n_target:])
    full = engine.target_losses({"input_ids": torch.tensor([ids])}, target, rows)[1]
    readout_only = engine.target_losses({"input_ids": torch.tensor([ids])}, target, rows, readout_from=readout_from)[1]
    readout = ReadoutPass(model, ids, readout_from, n_target)
    assert torch.allclose(readout.local_losses(source, readout_from), full, atol=1e-5)
    local = readout.local_losses(source, 20)
    assert not torch.allclose(local, full, atol=1e-4) and not torch.allclose(local, readout_only, atol=1e-4)
    # the pass is unchanged afterwards
    assert torch.allclose(readout.losses(rows)[1], readout_only, atol=1e-5)
    with pytest.raises(AtmanError):
        readout.local_losses(source, 35)
