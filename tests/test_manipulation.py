"""The primitive's identities, on tiny random-init models of many architectures and both kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS, VOCAB, tiny_model
from transformers import AutoModelForCausalLM, BloomConfig

from atman import AtmanError, UnsupportedModelError, enable, manipulate
from atman.manipulation import active

SEQ = 10
IMPLS = ("sdpa", "eager")
FAMILIES = sorted(TINY_CONFIGS)


def _ids(seed: int = 1, length: int = SEQ) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (1, length), generator=generator)


def _forward(model, ids, **kwargs) -> torch.Tensor:
    position_ids = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(input_ids=ids, position_ids=position_ids, use_cache=False, **kwargs).logits


@pytest.fixture(scope="module", params=[(f, i) for f in FAMILIES for i in IMPLS], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request):
    """(reference model with the stock kernel, the same weights switched to AtMan, kernel name)."""
    family, impl = request.param
    reference = tiny_model(family, impl)
    atman_model = enable(tiny_model(family, impl))
    return reference, atman_model, impl


def test_multiplier_one_reproduces_the_model(pair):
    reference, model, impl = pair
    ids = _ids()
    expected = _forward(reference, ids)
    assert torch.allclose(_forward(model, ids), expected, atol=1e-5, rtol=0)
    for mode in ("log-additive", "multiplicative"):
        with manipulate(torch.ones(1, SEQ), mode=mode, backend=impl) as state:
            got = _forward(model, ids)
        assert state.calls == model.config.num_hidden_layers
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), mode


@pytest.mark.parametrize("key", [0, 3, SEQ - 2])
def test_zero_multiplier_equals_masking_the_key(pair, key):
    reference, model, impl = pair
    ids = _ids()
    mask = torch.ones(1, SEQ, dtype=torch.long)
    mask[0, key] = 0
    masked = _forward(reference, ids, attention_mask=mask)
    multipliers = torch.ones(1, SEQ)
    multipliers[0, key] = 0.0
    with manipulate(multipliers, backend=impl):
        got = _forward(model, ids)
    assert not torch.isnan(got).any()
    # a query that loses its only key has no defined output: compare every other position
    keep = [p for p in range(SEQ) if p != 0 or key != 0]
    assert torch.allclose(got[:, keep], masked[:, keep], atol=1e-5, rtol=0)


def test_batched_rows_equal_single_runs(pair):
    _, model, impl = pair
    ids = _ids()
    multipliers = torch.ones(4, SEQ)
    multipliers[1, 2] = 0.1
    multipliers[2, [0, 5, 6]] = 0.0
    multipliers[3, 4] = 2.0
    for mode in ("log-additive", "multiplicative"):
        with manipulate(multipliers, mode=mode, backend=impl):
            batched = _forward(model, ids.expand(4, -1))
        for row in range(4):
            with manipulate(multipliers[row:row + 1], mode=mode, backend=impl):
                single = _forward(model, ids)
            assert torch.allclose(batched[row], single[0], atol=1e-5, rtol=0), (mode, row)


def test_suppression_changes_the_output(pair):
    _, model, impl = pair
    ids = _ids()
    plain = _forward(model, ids)
    multipliers = torch.ones(1, SEQ)
    multipliers[0, 2] = 0.1
    for mode in ("log-additive", "multiplicative"):
        with manipulate(multipliers, mode=mode, backend=impl):
            damped = _forward(model, ids)
        # positions before the damped key cannot see it; positions after it must change
        assert torch.allclose(damped[:, :2], plain[:, :2], atol=1e-5, rtol=0)
        assert (damped[:, 3:] - plain[:, 3:]).abs().max() > 1e-4


def test_log_additive_factor_reweights_softmax_probabilities():
    """log-additive m is softmax re-weighting: p'_k = m_k p_k / sum_j m_j p_j (checked on the eager weights)."""
    model = enable(tiny_model("llama", "eager"))
    ids = _ids()
    captured = {}

    def hook(name):
        def _hook(module, args, output):
            captured[name] = output[1]
        return _hook

    attn = model.model.layers[0].self_attn
    handle = attn.register_forward_hook(hook("w"))
    try:
        with manipulate(torch.ones(1, SEQ), backend="eager"):
            _forward(model, ids)
        plain = captured["w"].clone()
        multipliers = torch.ones(1, SEQ)
        multipliers[0, 1] = 0.25
        with manipulate(multipliers, backend="eager"):
            _forward(model, ids)
        damped = captured["w"]
    finally:
        handle.remove()
    expected = plain * multipliers[0]
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(damped, expected, atol=1e-6)


def test_flex_attention_backend_matches_sdpa():
    model = enable(tiny_model("llama", "sdpa"))
    ids = _ids()
    multipliers = torch.ones(2, SEQ)
    multipliers[1, 3] = 0.1
    with manipulate(multipliers):
        sdpa = _forward(model, ids.expand(2, -1))
    with manipulate(multipliers, backend="flex_attention"):
        flex = _forward(model, ids.expand(2, -1))
    assert torch.allclose(sdpa, flex, atol=1e-5, rtol=0)


def test_half_precision_has_no_nan_at_removal():
    model = enable(tiny_model("llama", "sdpa")).to(torch.bfloat16)
    multipliers = torch.ones(2, SEQ)
    multipliers[1, [0, 4]] = 0.0
    for backend in ("sdpa", "eager"):
        with manipulate(multipliers, backend=backend):
            logits = _forward(model, _ids().expand(2, -1))
        assert torch.isfinite(logits).all()


def test_manipulation_is_scoped():
    model = enable(tiny_model("llama"))
    multipliers = torch.ones(1, SEQ)
    with manipulate(multipliers) as state:
        assert active() is state
    assert active() is None
    _forward(model, _ids())
    assert state.calls == 0


def test_bad_multipliers_are_rejected():
    model = enable(tiny_model("llama"))
    with pytest.raises(AtmanError, match="finite and >= 0"), manipulate(-torch.ones(1, SEQ)):
        pass
    with pytest.raises(AtmanError, match="finite"), manipulate(torch.full((1, SEQ), float("nan"))):
        pass
    with pytest.raises(AtmanError, match="2-D"), manipulate(torch.ones(SEQ)):
        pass
    with pytest.raises(AtmanError, match="unknown mode"), manipulate(torch.ones(1, SEQ), mode="additive"):
        pass
    with pytest.raises(AtmanError, match="key positions"), manipulate(torch.ones(1, SEQ + 1)):
        _forward(model, _ids())
    with pytest.raises(AtmanError, match="rows"), manipulate(torch.ones(3, SEQ)):
        _forward(model, _ids().expand(2, -1))


def test_architecture_bypassing_the_interface_is_refused_by_name():
    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM"):
        enable(bloom)


def test_shorter_multipliers_leave_later_keys_untouched():
    """Keys past the multipliers (generated after a manipulated prompt) are not manipulated."""
    model = enable(tiny_model("llama"))
    ids = _ids()
    short = torch.ones(2, SEQ - 3)
    short[1, 2] = 0.0
    full = torch.cat([short, torch.ones(2, 3)], dim=1)
    with manipulate(short):
        got = _forward(model, ids.expand(2, -1))
    with manipulate(full):
        expected = _forward(model, ids.expand(2, -1))
    assert torch.equal(got, expected)
    assert not torch.allclose(got[0], got[1])


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt_oss"])
def test_multiplicative_positions_do_not_depend_on_later_tokens(family):
    """The row minimum runs over visible keys only: appending tokens leaves earlier logits unchanged."""
    model = enable(tiny_model(family))
    ids = _ids(length=SEQ + 4)
    multipliers = torch.ones(1, SEQ + 4)
    multipliers[0, [1, 5]] = torch.tensor([0.3, 2.0])
    with manipulate(multipliers[:, :SEQ], mode="multiplicative"):
        short = _forward(model, ids[:, :SEQ])
    with manipulate(multipliers, mode="multiplicative"):
        long = _forward(model, ids)
    assert torch.allclose(long[:, :SEQ], short, atol=1e-5, rtol=0)
